"""Everything that measures, simulates or replays gpt2_numpy and gpt2_cupy; run from the
repository's root as `python -m bench COMMAND [ARGS]` (`python -m bench` lists the commands).

The library never imports this package: bench/ sits on top of gpt2_cupy and gpt2_numpy.
"""
from pathlib import Path

import gpt2_numpy  # noqa: F401  first: it picks OpenBLAS's kernels before NumPy loads OpenBLAS

ROOT = Path(__file__).resolve().parents[1]  # the repository: img/, weights/, .git


def command(name: str, argv) -> str:
    """The command line that ran a benchmark, as its JSON records it."""
    return " ".join(["python -m bench", name, *argv])
