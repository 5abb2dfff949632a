"""What a benchmark ran on: CPU, memory, BLAS and its kernels, GPU, git revision."""
import os
import platform
import subprocess
import sys

import numpy as np
from gpt2_numpy._openblas import cpu_flags, cpuinfo_field

from . import ROOT
from .timing import N_CPU


def machine_info() -> dict:
    info = {"python": sys.version.split()[0], "executable": sys.executable,
            "numpy": np.__version__, "cpus": N_CPU, "platform": platform.platform()}
    info["cpu"] = cpu_name()
    info["loadavg"] = os.getloadavg()  # as `uptime` shows it: others' work on a shared machine
    info["simd"] = [f for f in ("avx2", "fma", "avx512f") if f in cpu_flags()]
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        keep = ("Model name", "Vendor ID", "CPU(s)", "Thread(s) per core", "L2 cache", "L3 cache",
                "Hypervisor vendor")
        info["lscpu"] = {k.strip(): v.strip() for k, v in (l.split(":", 1) for l in lscpu.splitlines() if ":" in l)
                         if k.strip() in keep}
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        mem = open("/proc/meminfo").read().split("\n")[0].split()
        info["memory_gib"] = round(int(mem[1]) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info["blas"] = {k: blas.get(k) for k in ("name", "version", "openblas configuration")}
    except Exception:  # show_config's layout differs across NumPy versions
        pass
    try:
        import threadpoolctl

        info["threadpoolctl"] = threadpoolctl.threadpool_info()
    except ImportError:
        info["threadpoolctl"] = "not installed (pip install threadpoolctl to record BLAS threads)"
    info["openblas_core"] = openblas_core()
    info["env"] = {k: os.environ[k] for k in ("OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE",
                                             "GPT2_OPENBLAS_DEFAULT", "OMP_NUM_THREADS",
                                             "MKL_NUM_THREADS") if k in os.environ}
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        info["git"] = rev + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def openblas_core():
    """The kernel set ("core") OpenBLAS is using in this process, or None if that cannot be asked:
    the loaded OpenBLAS library (NumPy's bundled copy prefixes its symbols) is asked directly."""
    import ctypes

    try:
        libs = sorted({l.split()[-1] for l in open("/proc/self/maps") if "openblas" in l.lower()})
    except OSError:
        return None
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename",
                     "openblas_get_corename"):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                return fn().decode()
    return None


def cpu_name() -> str:
    return cpuinfo_field("model name") or platform.processor() or "unknown CPU"


def device_name(backend: str) -> str:
    """The GPU's name for cupy, else the CPU's."""
    if backend == "cupy":
        return gpu_info()["gpu"] + " (CuPy)"
    return cpu_name()


def gpu_info() -> dict:
    import cupy as cp

    props = cp.cuda.runtime.getDeviceProperties(0)
    return {"gpu": props["name"].decode(), "gpu_memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
            "cupy": cp.__version__, "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
            "cuda_driver": cp.cuda.runtime.driverGetVersion()}
