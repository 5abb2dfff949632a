"""Loading a model: a size ("355M") or a folder of official files -> a ready `GPT2`.

The weights are NumPy memory maps of the checkpoint's data file (see checkpoint.py): loading is
almost free, nothing is copied, and the OS pages bytes in as the first forward touches them.
On another backend (CuPy) each tensor is copied to the device once, here, and never again.
"""
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np

from .checkpoint import HPARAM_KEYS, load_checkpoint
from .backend import namespace_of
from .download import resolve_model_dir
from .errors import DamagedFile, GPT2Error
from .model import KVCache, forward, hidden_states
from .tokenizer import load_tokenizer

# The released sizes. Every size shares n_vocab 50257 and n_ctx 1024.
OFFICIAL_HPARAMS = {
    "124M": dict(n_layer=12, n_head=12, n_embd=768),
    "355M": dict(n_layer=24, n_head=16, n_embd=1024),
    "774M": dict(n_layer=36, n_head=20, n_embd=1280),
    "1558M": dict(n_layer=48, n_head=25, n_embd=1600),
}


class GPT2:
    """A loaded model: hyperparameters, parameters (model.py's nested dicts; for official files,
    read-only views of the checkpoint's bytes) and, optionally, its tokenizer.
    `model(ids, cache)` is model.forward(model.params, ids, cache, n_head)."""

    def __init__(self, hparams: dict, params: dict, tokenizer=None, name: str = "gpt2"):
        self.hparams, self.params, self.tokenizer, self.name = hparams, params, tokenizer, name
        self.xp = namespace_of(params["wte"])

    n_ctx = property(lambda self: self.hparams["n_ctx"])
    n_vocab = property(lambda self: self.hparams["n_vocab"])

    def new_cache(self, capacity: int = None) -> KVCache:
        """An empty KV cache for up to `capacity` tokens (default: the whole context)."""
        return KVCache(self.hparams, capacity or self.n_ctx, self.xp, self.params["wte"].dtype)

    def __call__(self, ids, cache: KVCache, n_logits=1, positions=None, visible=None):
        return forward(self.params, ids, cache, self.hparams["n_head"], n_logits, positions,
                       visible)

    def hidden_states(self, ids, cache: KVCache, n_rows=1, positions=None, visible=None):
        return hidden_states(self.params, ids, cache, self.hparams["n_head"], n_rows, positions,
                             visible)

    def warm_up(self, capacity: int = None) -> None:
        """One untimed forward, so that no timed one pays for first-time work (paging the
        weights in from the checkpoint's memory map). `capacity`, the cache size the decoders
        will ask for, matters only to gpt2_cupy, which records its CUDA graphs for it."""
        self([0], self.new_cache(1))

    def __repr__(self):
        h = self.hparams
        return (f"GPT2({self.name!r}, n_layer={h['n_layer']}, n_head={h['n_head']}, "
                f"n_embd={h['n_embd']}, n_vocab={h['n_vocab']}, n_ctx={h['n_ctx']})")


def load_hparams(model_dir) -> dict:
    """hparams.json: a JSON object with a positive integer for each of HPARAM_KEYS."""
    path = Path(model_dir) / "hparams.json"
    try:
        hparams = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: lists nested too deep
        raise GPT2Error(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(hparams, dict):
        raise GPT2Error(f"{path} must hold a JSON object such as {{\"n_layer\": 12, ...}}, "
                        f"not a {type(hparams).__name__}")
    missing = [k for k in HPARAM_KEYS if type(hparams.get(k)) is not int or hparams[k] < 1]
    if missing:
        raise GPT2Error(f"{path} lacks a positive integer for {', '.join(missing)}")
    if hparams["n_embd"] % hparams["n_head"]:
        raise GPT2Error(f"{path}: n_embd {hparams['n_embd']} is not a multiple of n_head "
                        f"{hparams['n_head']}")
    return {k: hparams[k] for k in HPARAM_KEYS}


def tree_map(fn, tree):
    """Apply fn to every array of a nested dict/list parameter tree."""
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [tree_map(fn, v) for v in tree]
    return fn(tree)


def to_backend(params: dict, xp=np, dtype=None) -> dict:
    """The parameter tree on backend `xp` (NumPy: plain views of the memory maps, no copy)."""
    if xp is np and dtype in (None, np.float32):
        return tree_map(np.asarray, params)  # memmap subclass -> ndarray view of the same bytes
    return tree_map(lambda a: xp.asarray(a, dtype=dtype or xp.float32), params)


@contextmanager
def repair_advice(model: str):
    """Say how to repair a damaged file in a way that fits where its folder came from: a size is
    downloaded again once the file is deleted, a folder the user named is not."""
    try:
        yield
    except DamagedFile as e:
        if Path(str(model)).expanduser().is_dir():  # resolve_model_dir's rule: a folder wins
            e.advice = ("replace it with an intact copy of OpenAI's file (or name a size, such "
                        "as 124M, to have the files downloaded)")
        raise


def load_model(model: str = "124M", models_dir=None, xp=np, dtype=None, download: bool = True,
               progress: bool = True, verify: Optional[bool] = None) -> GPT2:
    """Load GPT-2 by size ("124M", "355M", "774M", "1558M"; downloaded on first use into
    `models_dir`, default weights/) or by a path to a folder holding the official files.

    xp: the array module to run on (numpy, or cupy: see gpt2_cupy). dtype: float32 by default.
    verify: None checks the data file's CRC-32Cs once per file version (verify.py), True checks
    them now whatever was recorded, False skips the check.
    """
    model_dir = resolve_model_dir(str(model), models_dir, download=download, progress=progress)
    with repair_advice(model):
        hparams = load_hparams(model_dir)
        checkpoint = load_checkpoint(model_dir, hparams)  # the index agrees with hparams.json
        if verify is not False:
            from .verify import ensure_verified  # here: `python -m gpt2_numpy.verify` runs clean

            ensure_verified(model_dir, force=bool(verify), progress=progress)
        tokenizer = load_tokenizer(model_dir)
    if tokenizer.n_vocab != hparams["n_vocab"]:  # a token id without text, or text without an id
        raise GPT2Error(f"{model_dir / 'hparams.json'} says n_vocab {hparams['n_vocab']} but the "
                        f"tokenizer (encoder.json, vocab.bpe) has {tokenizer.n_vocab} tokens")
    return GPT2(hparams, to_backend(checkpoint, xp, dtype), tokenizer, name=str(model))


def random_params(hparams: dict, seed: int = 0, scale: float = 0.02, xp=np) -> dict:
    """Random weights in the checkpoint's shapes, e.g. to time a size whose weights are absent.
    Speed does not depend on the values; everything else about such a model is meaningless."""
    rng = np.random.default_rng(seed)
    d, V = hparams["n_embd"], hparams["n_vocab"]

    def normal(*shape):
        return xp.asarray(rng.standard_normal(shape, dtype=np.float32) * np.float32(scale))

    def ln():
        return {"g": xp.asarray(1 + normal(d)), "b": normal(d)}

    def dense(n_in, n_out):
        return {"w": normal(n_in, n_out), "b": normal(n_out)}

    blocks = [{"ln_1": ln(), "attn": {"c_attn": dense(d, 3 * d), "c_proj": dense(d, d)},
               "ln_2": ln(), "mlp": {"c_fc": dense(d, 4 * d), "c_proj": dense(4 * d, d)}}
              for _ in range(hparams["n_layer"])]
    return {"wte": normal(V, d), "wpe": normal(hparams["n_ctx"], d), "blocks": blocks,
            "ln_f": ln()}


def official_hparams(size: str) -> dict:
    if size not in OFFICIAL_HPARAMS:
        raise GPT2Error(f"unknown model size {size!r}: use one of {', '.join(OFFICIAL_HPARAMS)}")
    return dict(n_vocab=50257, n_ctx=1024, **OFFICIAL_HPARAMS[size])
