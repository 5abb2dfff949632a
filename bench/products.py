"""Every way of computing a few-row product, timed on all of a model's weight matrices.

    python -m bench products                      # 355M shapes, random weights, best of 3
    python -m bench products --size 124M --reps 5

What products.attach measures on two blocks, here on every block and the whole LM head: for each
number of rows T = 1..16, one step's weight products (every matrix once, in forward order)
computed each way products.py knows ("one", "pad4/8/16", "rows"), the ways interleaved, the best
of --reps kept. Prints each way's time over the one-row step (r), the plan it gives, the OpenBLAS
kernels in use and the load average (`uptime`) before and after, since other processes on a
shared machine slow every number. Run it under another OPENBLAS_CORETYPE to compare kernels.
"""
import argparse
import os
import sys
import time

from .report import bad_input


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m bench products", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="355M", help="official shapes to time (random weights)")
    p.add_argument("--reps", type=int, default=3, help="repetitions, the best kept")
    args = p.parse_args(argv)
    import gpt2_numpy as gpt2
    from gpt2_numpy.products import Products, describe, weight_matrices

    from .machine import cpu_name, openblas_core

    if args.reps < 1:
        bad_input(f"--reps must be at least 1, not {args.reps}")
    if args.size not in gpt2.OFFICIAL_HPARAMS:
        bad_input(f"--size must be one of {', '.join(gpt2.OFFICIAL_HPARAMS)}, not {args.size!r}")
    h = gpt2.official_hparams(args.size)
    params = gpt2.random_params(h, seed=0)
    matrices = weight_matrices(params, n_layers=None)
    for w in matrices:  # page in
        w.sum()
    print(f"{cpu_name()}, OpenBLAS kernels {openblas_core()}, {args.size} (random weights), "
          f"load average before {os.getloadavg()}", flush=True)
    products = Products()
    start = time.perf_counter()
    plan = products.measure(matrices, reps=args.reps)
    t1 = products.timings[1, "one"]
    print(f"one-row step: {1e3 * t1:.1f} ms; measured in {time.perf_counter() - start:.0f} s; "
          f"load average after {os.getloadavg()}")
    for T in sorted(plan):
        ways = "  ".join(f"{o}={s / t1:.2f}" for (t, o), s in products.timings.items() if t == T)
        print(f"T={T:<3} r: {ways}   -> {plan[T]}")
    print(f"plan: {describe(plan)}")
    return 0
