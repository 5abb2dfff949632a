"""Ask glibc's malloc to keep freed memory for reuse rather than hand it back to the OS at once.

Why: every decoded token makes a few arrays the size of the vocabulary: the logits' host copy
(50,257 float32, 200 KB) and float64 distributions (400 KB each). By default glibc returns the
freed space at the top of its heap to the OS as soon as it exceeds a threshold that these arrays
cross, so the next token's arrays fault their pages back in. Sampling at temperature 1 in a fresh
process, on the 2-core Xeon of docs/performance.md, that was ~165 page faults and 0.4-0.8 ms of
host time per token (`python -m bench host`): noise beside a 30 ms CPU forward, a third or more
of a 1.3 ms GPU step. M_TOP_PAD makes malloc keep TOP_PAD bytes at the top of the heap when it
trims, so the same pages serve every token; the price is up to TOP_PAD of freed memory that stays
mapped to the process, and 10-25 µs per greedy token (memory that would have come zeroed from the
OS is cleared by calloc).

gpt2_numpy.tune_process() calls keep_freed_memory(); importing the package does not. It does
nothing unless the C library is glibc, or if GPT2_MALLOC_DEFAULT=1 (keep malloc's defaults). It
changes no result, only where memory comes from; like the OpenBLAS setting (_openblas.py), it
holds for the whole process.
"""
import ctypes
import os
import platform

M_TOP_PAD = -2  # mallopt's parameter number, from glibc's <malloc.h>
TOP_PAD = 64 << 20  # bytes


def wanted(environ, libc_name: str) -> bool:
    """Whether to change malloc's setting: only glibc's mallopt has M_TOP_PAD, and the user may
    keep the defaults."""
    return libc_name == "glibc" and environ.get("GPT2_MALLOC_DEFAULT") != "1"


def keep_freed_memory(libc=None) -> bool:
    """mallopt(M_TOP_PAD, TOP_PAD) where wanted. libc: the C library (ctypes; None: this
    process's). Returns whether the setting was made."""
    if not wanted(os.environ, platform.libc_ver()[0]):
        return False
    try:
        libc = libc or ctypes.CDLL(None)
        return libc.mallopt(M_TOP_PAD, TOP_PAD) == 1  # mallopt returns 1 on success
    except (OSError, AttributeError):  # no C library to load, or one without mallopt
        return False
