"""The GPU twin: `import gpt2_cupy as gpt2` is a drop-in for `import gpt2_numpy as gpt2`.

The decoders, the sampler and the model's reference code are gpt2_numpy's own. gpt2_numpy's
forward pass asks its weights for their array namespace (backend.namespace_of), so on CuPy arrays
every matmul, softmax and KV-cache write of gpt2_numpy/model.py runs as a CuPy kernel. The
decoders copy to the host only the logits rows they sample from (backend.to_numpy); sampling and
the accept/resample rule run in NumPy with one host random generator, so a seed gives the same
draws on CPU and GPU.

What is GPU-specific: fused.py and kernels.cu, the same forward in five kernels per layer (each
written from the model.py function it replaces), with weights stored in float32, float16 or
bfloat16; graphs.py, where `GPT2` is `GraphedGPT2`, which replays short forwards (decoding
steps, verify steps) as CUDA graphs, one launch per step; and static.py, model.py's functions in
the form a graph can record, the fallback where the fused kernels do not compile.
"""
from gpt2_numpy import (OFFICIAL_HPARAMS, AdaptiveK, GPT2Error, KVCache,
                        ModelDrafter, NGramDrafter, Stats, Warp, accept_or_resample,
                        adaptive_speculative_sample, autoregressive_sample, forward,
                        load_hparams, official_hparams, probabilities, residual, sample,
                        speculative_sample, tree_speculative_sample)
from gpt2_numpy import load as _load

try:
    import cupy as xp
except ImportError:
    raise GPT2Error("--backend cupy needs CuPy: pip install cupy-cuda13x (CUDA 13), "
                    "cupy-cuda12x (CUDA 12) or cupy-cuda11x (CUDA 11), matching your driver's "
                    "CUDA version") from None

try:
    _n_gpus = xp.cuda.runtime.getDeviceCount()
except Exception as e:  # no driver, or a driver/toolkit mismatch
    raise GPT2Error(f"CuPy is installed but no GPU is usable ({type(e).__name__}: {e})") from None
if _n_gpus == 0:
    raise GPT2Error("CuPy is installed but no GPU is visible (check CUDA_VISIBLE_DEVICES)")


from .graphs import GraphedGPT2  # noqa: E402  (needs CuPy, checked above)

GPT2 = GraphedGPT2


def load_model(model="124M", models_dir=None, dtype="float32", download=True, progress=True,
               graphs=True, fused=None, verify=None):
    """Load GPT-2 by size or folder, with its weights copied once to the GPU and stored as
    `dtype` (float32, float16 or bfloat16; see GraphedGPT2). graphs=False: every forward runs
    eagerly. fused: the fused kernels (None: the default, see graphs.FUSED_BY_DEFAULT).
    verify: as gpt2_numpy.load_model's."""
    loaded = _load.load_model(model, models_dir, xp=xp, download=download, progress=progress,
                              verify=verify)
    return GraphedGPT2(loaded.hparams, loaded.params, loaded.tokenizer, loaded.name, graphs,
                       fused, dtype)


def random_params(hparams, seed=0, scale=0.02):
    return _load.random_params(hparams, seed, scale, xp=xp)


__all__ = ["AdaptiveK", "NGramDrafter", "GPT2", "GraphedGPT2", "GPT2Error", "KVCache", "ModelDrafter", "OFFICIAL_HPARAMS", "Stats", "Warp",
           "accept_or_resample", "adaptive_speculative_sample", "autoregressive_sample", "forward", "load_hparams", "load_model",
           "official_hparams", "probabilities", "random_params", "residual", "sample",
           "tree_speculative_sample",
           "speculative_sample", "xp"]
