"""What a decoding run did and how long it took (`Stats`), and the models' share of that time
(`Timed`).

The decoders time two blocks, the prefill and the decoding loop (`Stats.timing`); the seconds and
calls of the forwards come from `Timed`, a wrapper the decoders put around each model.
"""
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, List

import numpy as np

from .backend import synchronize


@dataclass
class Stats:
    """What a run did and how long it took. Times in seconds; prefill is not in `decode_seconds`."""

    mode: str
    n_prompt: int = 0
    n_generated: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    target_seconds: float = 0.0  # inside target forwards (prefill excluded)
    draft_seconds: float = 0.0  # drafting: its forwards (a tree's: and choosing children)
    target_calls: int = 0
    draft_calls: int = 0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    accepted_per_round: List[int] = field(default_factory=list)  # m for every round
    K_per_round: List[int] = field(default_factory=list)
    most_accepted: int = 0  # the most drafts a round could keep: the largest K, a tree's depth
    stopped_at_context: bool = False

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of decoding (prompt and model loading excluded)."""
        return self.n_generated / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    @property
    def acceptance_rate(self) -> float:
        """alpha-hat: accepted drafts / proposed drafts."""
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_round(self) -> float:
        """tau: emitted tokens per target forward (1 for autoregressive decoding)."""
        return self.n_generated / self.rounds if self.rounds else float("nan")

    @contextmanager
    def timing(self, name: str, clock: Callable[[], float] = None):
        """Adds the seconds the with-block takes to the field `name`, as `clock` reads them (the
        wall clock unless told otherwise)."""
        clock = clock or time.perf_counter
        start = clock()
        yield
        setattr(self, name, getattr(self, name) + clock() - start)

    def count_forwards(self, target, drafter=None) -> None:
        """The decoding forwards' seconds and calls: target a Timed model, drafter a Drafter."""
        self.target_seconds, self.target_calls = target.seconds, target.calls
        if drafter is not None:
            self.draft_seconds, self.draft_calls = drafter.seconds, drafter.calls

    def add_round(self, K: int, accepted: int, depth: int = None) -> None:
        """A round that proposed K drafts (a tree: K nodes, `depth` levels) and kept `accepted`."""
        self.most_accepted = max(self.most_accepted, K if depth is None else depth)
        self.rounds += 1
        self.drafted += K
        self.accepted += accepted
        self.accepted_per_round.append(accepted)
        self.K_per_round.append(K)

    def accepted_histogram(self) -> List[int]:
        """histogram[m] = number of rounds in which exactly m drafts were accepted, for m up to
        the most a round could accept."""
        return np.bincount(np.asarray(self.accepted_per_round, dtype=int),
                           minlength=self.most_accepted + 1).tolist()

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items()}
        d.update(seconds=self.seconds, tokens_per_second=self.tokens_per_second)
        if self.mode != "autoregressive":
            d.update(acceptance_rate=self.acceptance_rate, tokens_per_round=self.tokens_per_round,
                     accepted_histogram=self.accepted_histogram())
        return d


def kinds(K: int, accepted: int) -> List[str]:
    """How each token a round emitted came about (the kinds on_tokens streams): `accepted` drafts
    the target kept, then "resampled" (drawn from the residual after a rejection), "bonus" (every
    draft kept: one more from the next p) or "target" (a round that proposed no drafts)."""
    return ["accepted"] * accepted + ["resampled" if accepted < K else "bonus" if K else "target"]


class Timed:
    """Calls `fn` (a model, or a drafter's propose) and adds up the calls and the seconds they
    take, as `clock()` reads them (the wall clock unless told otherwise). The seconds include the
    device's work: a GPU's forward returns before it has finished, so the timer waits for it
    (synchronize; a no-op on the CPU)."""

    def __init__(self, fn, clock: Callable[[], float] = time.perf_counter):
        self.fn, self.clock, self.seconds, self.calls = fn, clock, 0.0, 0

    def __call__(self, *args, **kwargs):
        start = self.clock()
        out = self.fn(*args, **kwargs)
        synchronize(out)
        self.seconds += self.clock() - start
        self.calls += 1
        return out
