"""tune_process() asks glibc's malloc to keep freed memory (M_TOP_PAD) only where that is
possible and wanted, and the setting is visible in malloc's own statistics."""
import ctypes
import os
import platform
import subprocess
import sys

import pytest

from conftest import ROOT
from gpt2_numpy._malloc import M_TOP_PAD, TOP_PAD, keep_freed_memory, wanted


@pytest.mark.parametrize("environ, libc, expected", [
    ({}, "glibc", True),
    ({"GPT2_MALLOC_DEFAULT": "1"}, "glibc", False),  # the documented opt-out
    ({"GPT2_MALLOC_DEFAULT": "0"}, "glibc", True),
    ({}, "", False),  # musl, macOS, Windows: no M_TOP_PAD
])
def test_the_setting_is_made_only_on_glibc_unless_opted_out(environ, libc, expected):
    assert wanted(environ, libc) == expected


class FakeLibc:
    def __init__(self, answer=1):
        self.calls, self.answer = [], answer

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return self.answer


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_calls_mallopt_with_the_top_pad(monkeypatch):
    monkeypatch.delenv("GPT2_MALLOC_DEFAULT", raising=False)
    libc = FakeLibc()
    assert keep_freed_memory(libc) is True and libc.calls == [(M_TOP_PAD, TOP_PAD)]
    assert keep_freed_memory(FakeLibc(answer=0)) is False  # mallopt refused
    monkeypatch.setenv("GPT2_MALLOC_DEFAULT", "1")
    libc = FakeLibc()
    assert keep_freed_memory(libc) is False and libc.calls == []


KEEPCOST = """
import ctypes
import gpt2_numpy
gpt2_numpy.tune_process()
import numpy as np

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
rows = [np.ones(50257) for _ in range(4)]  # a decoding step's vocabulary-sized arrays
del rows
print(libc.mallinfo2().keepcost)  # freed bytes at the top of the heap that malloc kept
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not hasattr(ctypes.CDLL(None), "mallinfo2"),
                    reason="needs glibc >= 2.33 (mallinfo2)")
def test_tune_process_keeps_freed_memory_and_the_opt_out_does_not():
    def keepcost(**env):
        environ = {k: v for k, v in os.environ.items() if k != "GPT2_MALLOC_DEFAULT"}
        out = subprocess.run([sys.executable, "-c", KEEPCOST], cwd=ROOT, capture_output=True,
                             text=True, env={**environ, **env}, timeout=120)
        assert out.returncode == 0, out.stderr
        return int(out.stdout)

    assert keepcost() >= TOP_PAD // 2
    assert keepcost(GPT2_MALLOC_DEFAULT="1") < TOP_PAD // 2
