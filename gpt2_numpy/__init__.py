"""GPT-2 from scratch in NumPy, with autoregressive and speculative sampling.

    import gpt2_numpy as gpt2
    gpt2.tune_process()                             # optional, first thing: see below
    model = gpt2.load_model("124M")                 # or a folder with the official files
    ids = model.tokenizer.encode("Alan Turing theorized that")
    cache = model.new_cache()                       # preallocated K/V for every layer
    logits = model(ids, cache)                      # [1, 50257]: logits of the next token
    cache.rollback(3)                               # forget all but the first 3 tokens: O(1)

Importing the package changes nothing in your process. `tune_process()` is the one call that
does (tuning.py): it picks OpenBLAS's kernels and sets malloc's top pad, for the whole process.
An application calls it first, as main.py and `python -m bench` do. OpenBLAS reads its setting
only when NumPy loads it, so this file imports no NumPy: the library (api.py) is loaded on
first use of any name below, by `__getattr__`, after tune_process has had its chance.
"""
import importlib

from .tuning import tune_process

__all__ = ["AdaptiveK", "Drafter", "GPT2", "GPT2Error", "KVCache", "MedusaHeads",
           "ModelDrafter", "NGramDrafter", "OFFICIAL_HPARAMS", "Stats", "Warp",
           "accept_or_resample", "adaptive_speculative_sample", "autoregressive_sample",
           "expected_tokens", "forward", "load_hparams", "load_model", "official_hparams",
           "probabilities", "random_params", "residual", "sample", "speculative_sample",
           "tree_speculative_sample", "tune_process", "xp"]


def __getattr__(name):
    """gpt2_numpy.X for X in api.py: loads the library (and NumPy) the first time."""
    if name in __all__:
        value = getattr(importlib.import_module(".api", __name__), name)
        globals()[name] = value  # found by the ordinary lookup from now on
        return value
    raise AttributeError(f"module 'gpt2_numpy' has no attribute {name!r}")
