"""GPT-2 from scratch in NumPy, with autoregressive and speculative sampling.

    import gpt2_numpy as gpt2
    model = gpt2.load_model("124M")                 # or a folder with the official files
    ids = model.tokenizer.encode("Alan Turing theorized that")
    cache = model.new_cache()                       # preallocated K/V for every layer
    logits = model(ids, cache)                      # [1, 50257]: logits of the next token
    cache.rollback(3)                               # forget all but the first 3 tokens: O(1)
"""
from ._malloc import keep_freed_memory
from ._openblas import prefer_haswell_kernels

prefer_haswell_kernels()  # before anything imports NumPy: OpenBLAS reads it once (_openblas.py)
keep_freed_memory()  # each token's vocabulary-sized arrays reuse the same pages (_malloc.py)

import numpy as _np  # noqa: E402

from .adaptive import AdaptiveK, FixedK, KPolicy, expected_tokens
from .decoding import ModelDrafter, Stats, autoregressive_sample, speculative_sample
from .drafters import Drafter, NGramDrafter
from .errors import GPT2Error
from .load import OFFICIAL_HPARAMS, load_hparams, official_hparams, random_params
from .load import load_model as _load_model
from .model import GPT2, KVCache, forward
from .sampling import Warp, accept_or_resample, probabilities, residual, sample
from .tree import tree_speculative_sample

xp = _np  # the array module this package computes with


def load_model(model="124M", models_dir=None, dtype=None, download=True, progress=True,
               verify=None):
    """Load GPT-2 by size or folder, with its weights as NumPy arrays (see load.load_model)."""
    return _load_model(model, models_dir, xp=xp, dtype=dtype, download=download, progress=progress,
                       verify=verify)


__all__ = ["AdaptiveK", "Drafter", "FixedK", "GPT2", "GPT2Error", "KPolicy", "KVCache",
           "ModelDrafter", "NGramDrafter", "OFFICIAL_HPARAMS", "Stats", "Warp",
           "accept_or_resample", "autoregressive_sample", "expected_tokens", "forward",
           "load_hparams", "load_model", "official_hparams", "probabilities", "random_params",
           "residual", "sample", "speculative_sample", "tree_speculative_sample", "xp"]
