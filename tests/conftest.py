"""Shared test helpers: tiny in-memory GPT-2 models and paths to the committed fixtures."""
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # main.py and bench/ live at the top level

import gpt2_numpy as gpt2  # noqa: E402
from gpt2_numpy.load import tree_map  # noqa: E402

# Products' plans measured by the tests go to a folder of their own, never the user's cache
# (subprocesses inherit it).
os.environ["GPT2_NUMPY_CACHE"] = tempfile.mkdtemp(prefix="gpt2-numpy-test-cache-")

FIXTURES = ROOT / "tests" / "fixtures"
SHARED_TOKENIZER = ROOT.parent / "shared" / "gpt2-tokenizer"


def tiny_hparams(n_vocab=50, n_ctx=64, n_embd=24, n_head=3, n_layer=2):
    return dict(n_vocab=n_vocab, n_ctx=n_ctx, n_embd=n_embd, n_head=n_head, n_layer=n_layer)


def tiny_model(seed=0, scale=0.5, **hparams):
    """A random GPT-2 whose activations are of order one (scale 0.5), so tokens differ."""
    h = tiny_hparams(**hparams)
    return gpt2.GPT2(h, gpt2.random_params(h, seed=seed, scale=scale), name=f"tiny{seed}")


def perturbed(model, noise, seed=1):
    """A draft that agrees with `model` more the smaller `noise` is (0: an identical copy)."""
    rng = np.random.default_rng(seed)
    params = tree_map(lambda a: a + np.float32(noise) * rng.standard_normal(a.shape, dtype=np.float32),
                      model.params)
    return gpt2.GPT2(model.hparams, params, name=f"{model.name}+{noise}")


def diverse_model():
    """A tiny random GPT-2 whose greedy continuation of PROMPT does not fall into a loop at once
    (most random tiny models repeat one token forever, which hides bugs that pick the wrong row:
    tests/test_decoding.py checks that this one does not). Found by trying seeds."""
    return tiny_model(seed=28, scale=0.3, n_embd=64, n_head=4)


@pytest.fixture(scope="session")
def target():
    return diverse_model()


@pytest.fixture(scope="session")
def drafts(target):
    """Drafts for `target` that agree with it always (a copy), often (weights perturbed by about
    3% of their scale) and rarely (an unrelated model)."""
    return {"always": perturbed(target, 0.0), "often": perturbed(target, 0.01),
            "rarely": tiny_model(seed=11)}
