"""Everything `import gpt2_numpy` offers (the package's __init__ loads it on first use)."""
import numpy as _np

from .adaptive import AdaptiveK, adaptive_speculative_sample, expected_tokens
from .decoding import Drafter, ModelDrafter, autoregressive_sample, speculative_sample
from .drafters import NGramDrafter
from .errors import GPT2Error
from . import products as _products
from .load import GPT2, OFFICIAL_HPARAMS, load_hparams, official_hparams, random_params
from .load import load_model as _load_model
from .medusa import MedusaHeads
from .model import KVCache, forward
from .sampling import Warp, accept_or_resample, probabilities, residual, sample
from .stats import Stats
from .tree import tree_speculative_sample

xp = _np  # the array module this package computes with


def load_model(model="124M", models_dir=None, dtype=None, download=True, progress=True,
               verify=None):
    """Load GPT-2 by size or folder, with its weights as NumPy arrays (see load.load_model),
    its few-row products following the plan measured for this machine (products.attach)."""
    loaded = _load_model(model, models_dir, xp=xp, dtype=dtype, download=download,
                         progress=progress, verify=verify)
    _products.attach(loaded, progress)
    return loaded

