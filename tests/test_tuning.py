"""Importing gpt2_numpy changes nothing in the process: neither os.environ nor malloc's settings.
tune_process() is the one call that does (main.py and bench/ make it; tuning.py)."""
import ctypes
import json
import os
import platform
import subprocess
import sys

import pytest

from conftest import ROOT
from gpt2_numpy._malloc import TOP_PAD

IMPORT_AND_MEASURE = """
import ctypes, importlib, json, os, pkgutil
before = dict(os.environ)
import gpt2_numpy
TUNE
gpt2_numpy.GPT2  # the library itself (api.py, and NumPy with it)
for module in pkgutil.iter_modules(gpt2_numpy.__path__):  # and every module of the package
    importlib.import_module("gpt2_numpy." + module.name)

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
blocks = [libc.malloc(100_000) for _ in range(50)]  # 5 MB: the heap grows at its top
arena = libc.mallinfo2().arena  # with M_TOP_PAD set, each growth adds the pad
for block in blocks:
    libc.free(block)
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
print(json.dumps({"changed": changed, "arena": arena}))
"""


def run(tune: bool) -> dict:
    environ = {k: v for k, v in os.environ.items()
               if k not in ("OPENBLAS_CORETYPE", "GPT2_OPENBLAS_DEFAULT", "GPT2_MALLOC_DEFAULT")}
    code = IMPORT_AND_MEASURE.replace("TUNE", "gpt2_numpy.tune_process()" if tune else "")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env=environ, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


needs_mallinfo2 = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc" or not hasattr(ctypes.CDLL(None), "mallinfo2"),
    reason="needs glibc >= 2.33 (mallinfo2)")


@needs_mallinfo2
def test_importing_gpt2_numpy_leaves_the_environment_and_malloc_as_they_were():
    untouched = run(tune=False)
    assert untouched["changed"] == []
    assert untouched["arena"] < TOP_PAD // 2  # glibc's default pad (128 kB), not ours


@needs_mallinfo2
def test_the_same_check_sees_what_tune_process_changes():
    """The control: tune_process() in the same script moves both measures. (On a CPU without
    AVX2 the kernel choice is not made, so only malloc's pad shows.)"""
    from gpt2_numpy._openblas import cpu_flags

    tuned = run(tune=True)
    assert tuned["arena"] >= TOP_PAD
    if {"avx2", "fma"} <= cpu_flags() and platform.machine() in ("x86_64", "AMD64"):
        assert tuned["changed"] == ["OPENBLAS_CORETYPE"]
