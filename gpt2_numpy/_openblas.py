"""Pick OpenBLAS's Haswell kernels before NumPy loads OpenBLAS (this module must not import NumPy).

Why: a speculative verify step multiplies a few rows (K + 1) by every weight matrix. On an
AVX-512 CPU, OpenBLAS (the BLAS inside NumPy's wheels) uses its SkylakeX kernels, with which a
few-row product costs about 3 one-row products; its Haswell (AVX2) kernels do the same in about
1.8 (docs/performance.md, "OpenBLAS kernels and threads"). One-row products, which only stream
the weights, run at the same speed either way. What may be lost: AVX2 does half the arithmetic
per instruction of AVX-512, so products bound by arithmetic (a long prefill) can be slower.

OpenBLAS reads OPENBLAS_CORETYPE once, when it is loaded, so this only works if it runs before
the first `import numpy` of the process: gpt2_numpy.tune_process() calls it, and an application
calls that first thing (main.py, bench/); importing gpt2_numpy alone does not. It does nothing
if OPENBLAS_CORETYPE is already set (your choice wins), if GPT2_OPENBLAS_DEFAULT=1 (keep
the kernels OpenBLAS picks for this CPU), if NumPy is already imported, or unless the CPU is
x86-64 with AVX2 and FMA on Linux (where /proc/cpuinfo says so). The kernels change no result
beyond float32 rounding.
"""
import os
import platform
import sys

CORETYPE = "Haswell"


def cpuinfo_field(name: str, path="/proc/cpuinfo"):
    """The first value of a /proc/cpuinfo field ("flags", "model name"), or None if unknown."""
    try:
        with open(path) as f:
            for line in f:
                if line.split(":", 1)[0].strip() == name:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags(path="/proc/cpuinfo") -> set:
    """The CPU's feature flags as Linux lists them (empty if unknown)."""
    return set((cpuinfo_field("flags", path) or "").split())


def coretype_to_set(environ, machine: str, flags: set, numpy_loaded: bool):
    """The OPENBLAS_CORETYPE to set, or None to leave OpenBLAS's own choice alone."""
    if "OPENBLAS_CORETYPE" in environ or environ.get("GPT2_OPENBLAS_DEFAULT") == "1":
        return None  # the user chose
    if numpy_loaded:
        return None  # too late: OpenBLAS read its environment when NumPy loaded it
    if machine.lower() not in ("x86_64", "amd64") or not {"avx2", "fma"} <= flags:
        return None  # the Haswell kernels would not run (or this is not OpenBLAS's x86 build)
    return CORETYPE


def prefer_haswell_kernels() -> None:
    coretype = coretype_to_set(os.environ, platform.machine(), cpu_flags(), "numpy" in sys.modules)
    if coretype:
        os.environ["OPENBLAS_CORETYPE"] = coretype
