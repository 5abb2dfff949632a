"""Every clock the benchmarks read: wall time that notices other processes, a GPU's, and a virtual one.

On a shared machine a neighbour's work can halve a measurement. So each timed block records the
share of all CPUs that other processes used meanwhile ("foreign", from /proc/stat), and a sample
taken while they were busy is repeated after a pause. Timings are the best of several samples.
"""
import math
import os
import time

TICK = os.sysconf("SC_CLK_TCK")  # /proc/stat counts CPU time in ticks of 1/TICK s


N_CPU = os.cpu_count() or 1


def busy_ticks() -> int:
    """CPU ticks spent by everything on the machine so far, idle and iowait excluded."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]


def own_ticks() -> float:
    t = os.times()
    return (t.user + t.system) * TICK  # this process, all its threads (OpenBLAS's included)


class Watch:
    """Wall time of a block, and the share of all CPUs that OTHER processes used during it."""

    def __enter__(self):
        self.b0, self.o0, self.t0 = busy_ticks(), own_ticks(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        other = (busy_ticks() - self.b0) - (own_ticks() - self.o0)
        self.foreign = max(0.0, other) / TICK / max(self.seconds * N_CPU, 1e-9)
        # /proc/stat has a resolution of one tick per CPU: below ~2 ticks we cannot tell.
        self.resolution = 2.0 / TICK / max(self.seconds * N_CPU, 1e-9)


TRIES = 8  # how often quiet_sample takes a sample while other processes are busy


def quiet_sample(fn, min_seconds=0.0, max_foreign=0.10, tries=None):
    """Seconds per call of fn, retried (after a pause) while other processes used more than
    max_foreign of the CPUs, at most `tries` times (default TRIES). min_seconds > 0: averaged
    over enough back-to-back calls (after an untimed one) to last that long. Returns
    (seconds, foreign)."""
    tries = TRIES if tries is None else tries
    calls = 1
    if min_seconds > 0:
        with Watch() as w:
            fn()
        calls = max(1, math.ceil(min_seconds / max(w.seconds, 1e-6)))
    for attempt in range(tries):
        with Watch() as w:
            for _ in range(calls):
                fn()
        if w.foreign <= max(max_foreign, w.resolution):
            break
        time.sleep(1.0 + attempt)
    return w.seconds / calls, w.foreign


def quiet_run(fn, max_foreign=0.03, tries=3):
    """(result, foreign) of a long run (a whole decode), repeated while others were busy."""
    for attempt in range(tries):
        with Watch() as w:
            result = fn()
        if w.foreign <= max_foreign:
            break
        time.sleep(2.0 + 2 * attempt)
    return result, w.foreign


def best(samples):
    """Fastest of a list of (seconds, foreign) samples, with the median and worst foreign share."""
    secs = sorted(s for s, _ in samples)
    return {"best": secs[0], "median": secs[len(secs) // 2], "n": len(secs),
            "max_foreign": max(f for _, f in samples)}


def gpu_seconds(fn, n: int) -> float:
    """Seconds per call of fn over n back-to-back calls (after one untimed), the GPU drained
    before and after: what the calls cost when each waits for nothing but the GPU."""
    import cupy as cp

    fn()
    cp.cuda.Device().synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    cp.cuda.Device().synchronize()
    return (time.perf_counter() - start) / n


class VirtualClock:
    """A clock for the replay (bench/replay.py): the stand-in models advance it by the cost of
    each forward (`now`); the replay reads it around each run, and AdaptiveK reads it (its
    `clock` argument) for the timings it learns from.

    python_time=True also lets the wall clock run, less the stand-ins' own time (`exclude`), so
    that what the decoders spend in Python between forwards counts as it does in a real run."""

    def __init__(self, python_time: bool = False):
        self.now, self.python_time = 0.0, python_time
        self.start, self.excluded = time.perf_counter(), 0.0

    def exclude(self, seconds: float) -> None:
        """Wall time that is not the decoders' (a stand-in model's own bookkeeping)."""
        self.excluded += seconds

    def __call__(self) -> float:
        if not self.python_time:
            return self.now
        return self.now + time.perf_counter() - self.start - self.excluded
