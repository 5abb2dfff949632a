"""tune_process() picks OpenBLAS's Haswell kernels only where that is safe and wanted."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from gpt2_numpy._openblas import CORETYPE, coretype_to_set, cpu_flags

AVX2 = {"sse4_2", "avx", "avx2", "fma"}


@pytest.mark.parametrize("environ, machine, flags, numpy_loaded, expected", [
    ({}, "x86_64", AVX2, False, CORETYPE),
    ({}, "AMD64", AVX2 | {"avx512f"}, False, CORETYPE),
    ({"OPENBLAS_CORETYPE": "SkylakeX"}, "x86_64", AVX2, False, None),  # the user's choice wins
    ({"GPT2_OPENBLAS_DEFAULT": "1"}, "x86_64", AVX2, False, None),     # the documented opt-out
    ({}, "x86_64", AVX2, True, None),                 # too late: OpenBLAS already read its env
    ({}, "x86_64", {"sse4_2", "avx"}, False, None),   # no AVX2: Haswell kernels would not run
    ({}, "x86_64", set(), False, None),               # flags unknown (not Linux)
    ({}, "aarch64", AVX2, False, None),               # another architecture's OpenBLAS
])
def test_coretype_choice(environ, machine, flags, numpy_loaded, expected):
    assert coretype_to_set(environ, machine, flags, numpy_loaded) == expected


def test_cpu_flags_parses_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 fma\nbogomips\t: 5199.99\n")
    assert cpu_flags(str(info)) == {"fpu", "avx2", "fma"}
    assert cpu_flags(str(tmp_path / "missing")) == set()


def run_python(code, **env):
    environ = {k: v for k, v in os.environ.items()
               if k not in ("OPENBLAS_CORETYPE", "GPT2_OPENBLAS_DEFAULT")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**environ, **env}, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


SHOW = "import os; print(os.environ.get('OPENBLAS_CORETYPE'))"
TUNE = "import gpt2_numpy; gpt2_numpy.tune_process(); "


@pytest.mark.skipif(not {"avx2", "fma"} <= cpu_flags(), reason="needs a Linux x86-64 CPU with AVX2")
def test_tune_process_first_sets_the_variable_and_numpy_first_does_not():
    assert run_python(TUNE + SHOW) == CORETYPE
    assert run_python("import numpy; " + TUNE + SHOW) == "None"
    assert run_python(TUNE + SHOW, OPENBLAS_CORETYPE="Sandybridge") == "Sandybridge"
    assert run_python(TUNE + SHOW, GPT2_OPENBLAS_DEFAULT="1") == "None"
    assert run_python("import gpt2_numpy; " + SHOW) == "None"  # importing alone sets nothing

