"""Everything that measures, simulates or replays gpt2_numpy and gpt2_cupy; run from the
repository's root as `python -m bench COMMAND [ARGS]` (`python -m bench` lists the commands).

The library never imports this package: bench/ sits on top of gpt2_cupy and gpt2_numpy.
"""
from pathlib import Path

import gpt2_numpy

# bench/ is an application, like main.py: it tunes its process (and every worker process it
# starts, `python -m bench.workers` included) before any of its modules imports NumPy.
gpt2_numpy.tune_process()

ROOT = Path(__file__).resolve().parents[1]  # the repository: img/, weights/, .git


def command(name: str, argv) -> str:
    """The command line that ran a benchmark, as its JSON records it."""
    return " ".join(["python -m bench", name, *argv])
