"""Our logits vs an independent implementation (Hugging Face transformers), on genuine
TensorFlow checkpoints with tiny shapes and the official variable names.

tests/fixtures/make_fixtures.py wrote the checkpoints with real TensorFlow and the reference
logits with transformers' GPT2LMHeadModel, in float64 (`logits64`) and float32 (`logits32`). The
weights are scaled so activations are of order one; with GPT-2's own init (std 0.02) most wiring
mistakes would hide below float32 noise.

Tolerances come from measured noise, not round numbers. The reference's own float32 error
(logits32 vs logits64) is the float32 noise of this computation. Our model is dtype-generic, so
it also runs in float64, where the same rounding shrinks by eps64 / eps32 ~ 1.9e-9: ten times
that scaled noise is the float64 tolerance (~1e-12). At that precision every classic porting
mistake, introduced on purpose below, fails by many orders of magnitude, including the subtle
ones (erf GELU, a layer-norm epsilon of 1e-6) that float32 noise could half hide.
"""
import math

import numpy as np
import pytest

import gpt2_numpy as gpt2
import gpt2_numpy.model as model_module
from conftest import FIXTURES

NAMES = ["tiny-3h", "tiny-4h"]  # 3 heads (not a power of two) and 4 heads
EPS_RATIO = np.finfo(np.float64).eps / np.finfo(np.float32).eps


def reference(name):
    return np.load(FIXTURES / name / "reference.npz")


def float32_noise(name):
    ref = reference(name)
    return float(np.abs(ref["logits32"] - ref["logits64"]).max())


def tolerance(name, dtype):
    """float32: 2x the reference's own float32 error; float64: that error scaled to float64
    precision, times 10."""
    return 2 * float32_noise(name) if dtype == np.float32 else 10 * float32_noise(name) * EPS_RATIO


@pytest.fixture(scope="module")
def models():
    return {(n, dt): gpt2.load_model(str(FIXTURES / n), dtype=dt, download=False)
            for n in NAMES for dt in (np.float32, np.float64)}


def max_error(model, name):
    ref = reference(name)
    errors = []
    for ids, want in zip(ref["tokens"], ref["logits64"]):
        got = model(ids.tolist(), model.new_cache(len(ids)), n_logits=None)  # every position
        errors.append(np.abs(got - want).max())
    return max(errors)


@pytest.mark.parametrize("name", NAMES)
def test_tolerances_come_from_measured_noise(name):
    assert 1e-6 < tolerance(name, np.float32) < 1e-3  # rounding on logits of size ~30
    assert 1e-14 < tolerance(name, np.float64) < 1e-11


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers_at_every_position(models, name, dtype):
    model = models[name, dtype]
    assert model(reference(name)["tokens"][0].tolist(), model.new_cache(), n_logits=None).dtype == dtype
    assert max_error(model, name) < tolerance(name, dtype)


@pytest.mark.parametrize("name", NAMES)
def test_cached_decoding_matches_transformers(models, name):
    """The same logits when the reference sequence is fed token by token through the cache."""
    model, ref = models[name, np.float32], reference(name)
    ids = ref["tokens"][1].tolist()
    cache = model.new_cache(len(ids))
    got = np.concatenate([model([t], cache) for t in ids])
    assert np.abs(got - ref["logits64"][1]).max() < tolerance(name, np.float32)


@pytest.mark.parametrize("name", NAMES)
def test_greedy_continuation_equals_transformers_generate(models, name):
    ref = reference(name)
    ids, _ = gpt2.autoregressive_sample(models[name, np.float32], ref["greedy_prompt"].tolist(),
                                        len(ref["greedy_tokens"]))
    assert ids == ref["greedy_tokens"].tolist()


# --- each mistake below must be caught ----------------------------------------------------------

def erf_gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2))).astype(x.dtype)


def swap_qk(params):
    """Read q, k, v from c_attn in the wrong order (k first)."""
    out = {**params, "blocks": []}
    for block in params["blocks"]:
        w, b = block["attn"]["c_attn"]["w"], block["attn"]["c_attn"]["b"]
        d = w.shape[0]
        order = np.r_[d : 2 * d, 0:d, 2 * d : 3 * d]
        attn = {**block["attn"], "c_attn": {"w": w[:, order], "b": b[order]}}
        out["blocks"].append({**block, "attn": attn})
    return out


MUTATIONS = {
    "erf GELU": lambda mp, p: (mp.setattr(model_module, "gelu", erf_gelu), p)[1],
    "layer-norm gain and bias swapped": lambda mp, p: (mp.setattr(
        model_module, "layer_norm", _wrap(model_module.layer_norm, lambda x, g, b, **k: (x, b, g), )), p)[1],
    "dropped bias": lambda mp, p: (mp.setattr(model_module, "linear", lambda x, w, b: x @ w), p)[1],
    "q/k/v in the wrong order": lambda mp, p: swap_qk(p),
    "no causal mask": lambda mp, p: (mp.setattr(
        model_module, "attention", _wrap(model_module.attention, lambda q, k, v, visible: (q, k, v, None))), p)[1],
    "attention scaled by 1/D": lambda mp, p: (mp.setattr(
        model_module, "attention", _wrap(model_module.attention, lambda q, k, v, visible: (q / math.sqrt(q.shape[-1]), k, v, visible))), p)[1],
    "layer-norm epsilon 1e-6": lambda mp, p: (mp.setattr(
        model_module, "layer_norm", _wrap(model_module.layer_norm, lambda x, g, b, **k: (x, g, b), eps=1e-6)), p)[1],
    "untied LM head": lambda mp, p: (mp.setattr(
        model_module, "lm_head", lambda x, wte: x @ np.random.default_rng(0).standard_normal(wte.T.shape) * 0.02), p)[1],
}


def _wrap(fn, rewrite_args, **fixed):
    """fn with its positional arguments rewritten (and keyword arguments fixed)."""
    return lambda *args, **kwargs: fn(*rewrite_args(*args, **kwargs), **fixed)


@pytest.mark.parametrize("mistake", MUTATIONS)
@pytest.mark.parametrize("name", NAMES)
def test_each_porting_mistake_is_caught(models, name, mistake, monkeypatch):
    model = models[name, np.float64]
    params = MUTATIONS[mistake](monkeypatch, model.params)
    broken = gpt2.GPT2(model.hparams, params)
    assert max_error(broken, name) > 1e6 * tolerance(name, np.float64), f"{mistake} went unnoticed"
