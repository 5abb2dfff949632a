"""The CPU run: every table of docs/performance.md, from one command.

    python -m bench cpu                 # the full run: ~5 min on a 2-core machine
    python -m bench cpu --quick         # fewer tokens, K and repetitions: ~1 min
    python -m bench plot bench_out      # then the figures in img/ (matplotlib)

It writes bench_out/bench.json (everything, with the machine and BLAS it ran on), one CSV per
table, and summary.md (the tables as Markdown), and prints the tables as it goes. Sections:

    bandwidth      one-row x @ W over 1 GiB of weights (far larger than any cache): the rate at
                   which this machine can stream weights, and from it the ms/token FLOOR of each
                   size (every weight but wpe is read once per token)
    autoregressive ms/token of 124M and 355M (prefill reported apart) and its ratio to the floor
    plan           each model's products' plan (gpt2_numpy/products.py), as attached at load
    r(T)           cost of one forward over T = 1..9 new tokens / cost over 1, at cache length 64,
                   and c = draft step / target step; then r(T) three ways: every T as one
                   product over the rows padded to 8, as the measured plan says, and as T
                   one-row products
    threads        the decoding step at 1 and 2 BLAS threads, each kind of weight product alone
                   at 1 and 2, the per-call cost of a small product, and the LM head split on two
                   Python threads (needs threadpoolctl)
    knobs          T = 1, 2, 5, 8 with model.py's padding off and on, and c_proj column-major
                   (both, or only attention's or only the MLP's)
    speculative    end to end, K = 1..8 (autoregressive re-timed next to each), next to the
                   speedup predicted from the measured acceptance a, c and r:
                   E[tokens/round] / (K c + r(K+1)),  E = (1 - a^(K+1)) / (1 - a);
                   also for pairs whose acceptance is known: draft == target (a = 1) and an
                   unrelated draft (a ~ 0)
    breakdown      where a decoding step's milliseconds go, part by part (355M and 124M)
    no cache       ms/token at positions 16..512 when every token re-runs the whole sequence (as
                   minimal NumPy demos do) vs the KV-cached decoder (124M)
    memory         peak RSS with both models loaded vs their weight bytes, load time (subprocess,
                   run first)
    blas           the same forward under other OpenBLAS kernels and threads (subprocesses)
    transformers   Hugging Face GPT2LMHeadModel.generate() (greedy, use_cache=True), same shapes,
                   same threads, same prompt length, if torch and transformers import (subprocess)

Weights: official ones where <models_dir>/<size>/ holds them (nothing is downloaded); otherwise
random weights in the official shapes. Speed does not depend on the values, so then every timing
is real, but acceptance rates are meaningless (two random models almost never agree), and every
row says so. Timings are the best of several repetitions; each repetition records the share of
the CPUs that other processes used meanwhile ("foreign"), and one taken while another process
was busy is repeated, since on a shared 2-core machine a neighbour's test run halves our speed.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import gpt2_numpy as gpt2
from gpt2_numpy.adaptive import expected_tokens
from gpt2_numpy.products import describe, products_of

from . import command, timing
from .floor import autoregressive, bandwidth, breakdown, matmuls_only
from .machine import machine_info
from .models import DRAFT_SIZE, OFFICIAL, RANDOM, TARGET_SIZE, get_model, prompt_ids, weight_bytes
from .no_cache import no_cache
from .report import bad_input, print_row, save
from .speculative import predicted_steady, speculative
from .timing import N_CPU
from .threads import threads_section
from .verify import knobs, r_by_strategy, r_of_T
from .workers import memory_section, run_worker, transformers_section


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench cpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_out", help="where bench.json, the CSVs and summary.md go")
    p.add_argument("--quick", action="store_true", help="fewer tokens, K values and repetitions (~1 min)")
    p.add_argument("--models_dir", default=None, help="where official weights are looked for (default weights/)")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: autoregressive "
                   "(with bandwidth and the breakdown, which needs its floor), strategies,threads,knobs,"
                   "speculative,breakdown,no_cache,memory,blas,transformers")
    p.add_argument("--tries", type=int, default=timing.TRIES,
                   help="how often a sample taken while other processes were busy is taken again "
                        f"(default {timing.TRIES}; 1: never, for a machine that is never quiet: "
                        "then every row's foreign CPU share says how busy it was)")
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.tries < 1:
        bad_input(f"--tries must be at least 1, not {args.tries}")
    timing.TRIES = args.tries
    q = args.quick
    cfg = {"prompt": 64, "ar_tokens": 24 if q else 64, "ar_reps": 2 if q else 3,
           "spec_tokens": 16 if q else 24, "spec_reps": 1 if q else 2,
           "Ks": [1, 4] if q else list(range(1, 9)), "Ts": list(range(1, 10)),
           "reps": 3 if q else 7, "pool_mib": 1024,
           "positions": [16, 128] if q else [16, 64, 128, 256, 512], "nc_reps": 2,
           "hf_sizes": [DRAFT_SIZE] if q else [DRAFT_SIZE, TARGET_SIZE],
           "thread_tokens": 8 if q else 16, "thread_reps": 3 if q else 5}
    skip = set(filter(None, args.skip.split(",")))
    if q:
        skip |= {"knobs", "blas"}  # the full run has them
    out_dir = Path(args.out)
    started = time.perf_counter()
    res = {"command": command("cpu", argv), "config": cfg, "machine": machine_info()}
    m = res["machine"]
    print(f"machine: {m.get('cpu')}, {m['cpus']} CPUs, NumPy {m['numpy']}, BLAS {m.get('blas')}, "
          f"OpenBLAS core {m.get('openblas_core')}, load average {m.get('loadavg')}", flush=True)

    def checkpoint(section):
        res["total_seconds"] = time.perf_counter() - started
        save(res, out_dir)
        res.setdefault("load", []).append({"after": section, "loadavg": os.getloadavg()})
        print(f"-- {section} done at {res['total_seconds']:.0f} s (load average "
              f"{' '.join(f'{v:.2f}' for v in os.getloadavg())})", flush=True)

    # 0. Memory and loading, in a fresh process started while this one is still small: Linux
    #    hands a child spawned from a big process that process's peak RSS (getrusage).
    if "memory" not in skip:
        res["memory"] = memory_section(args.models_dir)
        print_row("memory", {k: v for k, v in res["memory"].items()})
        checkpoint("memory")

    # Models: official weights where present, else random ones (seed 0 target, seed 1 draft).
    target, t_label, _ = get_model(TARGET_SIZE, args.models_dir, seed=0)
    draft, d_label, _ = get_model(DRAFT_SIZE, args.models_dir, seed=1)
    res["weights"] = {TARGET_SIZE: t_label, DRAFT_SIZE: d_label}
    models = {TARGET_SIZE: (target, t_label), DRAFT_SIZE: (draft, d_label)}
    prompt = prompt_ids(target, cfg["prompt"])
    res["plans"] = {}
    for model, _ in models.values():  # page every weight in; the products' plan, as attached
        start = time.perf_counter()
        model.warm_up()
        res["plans"][model.name] = {"plan": describe(products_of(model).plan),
                                    "warm_up_seconds": time.perf_counter() - start}
        print(f"[plan] {model.name}: {products_of(model)!r} (warm_up "
              f"{time.perf_counter() - start:.1f} s)", flush=True)

    # 1. Bandwidth and the floor; 2. autoregressive decoding; bandwidth again, to catch drift.
    gbps = None
    if "autoregressive" not in skip:
        res["bandwidth"] = bandwidth(cfg["pool_mib"], max(3, cfg["reps"] // 2))
        for row in res["bandwidth"]:
            print_row("bandwidth", row)
        res["autoregressive"] = []
        for size in (DRAFT_SIZE, TARGET_SIZE):
            model, label = models[size]
            res["autoregressive"].append({"size": size, **autoregressive(model, label, prompt, cfg["ar_tokens"],
                                                                         cfg["ar_reps"])})
        again = bandwidth(cfg["pool_mib"], max(3, cfg["reps"] // 2))
        for row in again:
            row["when"] = "after autoregressive"
            print_row("bandwidth", row)
        res["bandwidth"] += again
        gbps = max(r["GB_per_s"] for r in res["bandwidth"])  # the best streaming rate seen: the floor
        res["floor"] = {size: {"streamed_bytes": weight_bytes(model, streamed=True),
                               "GB_per_s": gbps, "ms": 1e3 * weight_bytes(model, streamed=True) / gbps / 1e9}
                        for size, (model, _) in models.items()}
        for row in res["autoregressive"]:
            model = models[row["size"]][0]
            row["floor_ms"] = res["floor"][row["size"]]["ms"]
            row["ratio_to_floor"] = row["ms_per_token"] / row["floor_ms"]
            row["matmuls_only_ms"] = 1e3 * matmuls_only(model, 5)
            row["matmuls_GB_per_s"] = weight_bytes(model, streamed=True) / row["matmuls_only_ms"] / 1e6
            print_row("autoregressive", row)
        checkpoint("bandwidth + autoregressive")

    # 3. r(T) and c at cache length 64.
    res["r_of_T"], t1, c2_abs = r_of_T(target, t_label, cfg["prompt"], cfg["Ts"], cfg["reps"])
    draft_rows, d1, d2_abs = r_of_T(draft, d_label, cfg["prompt"], cfg["Ts"], cfg["reps"])
    res["r_of_T"] += draft_rows
    for row in res["r_of_T"]:
        print_row("r(T)", row)
    res["c"], res["c2"], res["target_c2"] = d1 / t1, d2_abs / t1, c2_abs / t1
    r_target = {row["T"]: row["r"] for row in res["r_of_T"] if row["model"] == target.name}
    print(f"[r(T)] c = {res['c']:.3f}  draft catch-up c2 = {res['c2']:.3f}  ({t_label})", flush=True)
    # What a 124M draft would buy this 355M target at plausible acceptance rates, from the
    # measured costs alone (the acceptance is assumed, not measured).
    res["what_if"] = [{"acceptance": a, "K": K, "formula": expected_tokens(K, a) / (K * res["c"] + r_target[K + 1]),
                       "with_catch_up": predicted_steady(a, K, res["c"], res["c2"], r_target),
                       "if_verify_were_free": expected_tokens(K, a) / (K * res["c"] + 1),
                       "weights": f"prediction from measured c and r ({t_label}); acceptance assumed"}
                      for a in (0.6, 0.7, 0.8, 0.9, 1.0) for K in range(1, max(cfg["Ts"]))]
    # 3b. r(T) three ways: one padded product, the measured plan, T one-row products.
    if "strategies" not in skip:
        res["strategies"] = []
        for size in (TARGET_SIZE, DRAFT_SIZE):
            model, label = models[size]
            res["strategies"] += r_by_strategy(model, label, cfg["prompt"], cfg["Ts"], cfg["reps"])
        for row in res["strategies"]:
            print_row("r(T) by strategy", row)
    checkpoint("r(T)")

    # 3c. Two threads against one: the decoding step, each kind of product, the LM head split.
    if "threads" not in skip:
        res["threads"] = threads_section([models[TARGET_SIZE], models[DRAFT_SIZE]], cfg["prompt"],
                                         cfg["thread_tokens"], cfg["thread_reps"])
        checkpoint("threads")

    # 4. model.py's speed measures on/off, on random weights in both shapes.
    if "knobs" not in skip:
        sizes_params = {}
        for size, seed in ((DRAFT_SIZE, 1), (TARGET_SIZE, 0)):
            h = gpt2.official_hparams(size)
            sizes_params[size] = (h, gpt2.random_params(h, seed=seed))
        res["knobs"] = knobs(sizes_params, cfg["prompt"], 5)
        del sizes_params
        for row in res["knobs"]:
            print_row("knobs", row)
        checkpoint("knobs")

    # 5. Speculative vs autoregressive. Pairs: the real one (355M target, 124M draft), draft ==
    #    target (acceptance 1), an unrelated random draft (acceptance ~0: with random weights that
    #    IS the real pair, so it is not run twice).
    if "speculative" not in skip:
        official_pair = t_label == OFFICIAL and d_label == OFFICIAL
        pairs = [("355M/124M" if official_pair else "355M/124M (random: a~0)", draft,
                  OFFICIAL if official_pair else RANDOM, res["c"], res["c2"])]
        if official_pair:
            unrelated, _, _ = get_model(DRAFT_SIZE, None, seed=1, force_random=True)
            pairs.append(("355M/unrelated random 124M (a~0)", unrelated,
                          "official target, random draft: acceptance ~0 by construction", res["c"], res["c2"]))
        pairs.append(("draft = target (a=1)", target, t_label, 1.0, res["target_c2"]))
        res["speculative"] = []
        for name, d, label, c, c2 in pairs:
            res["speculative"] += speculative(name, target, d, label, prompt, cfg["spec_tokens"], cfg["Ks"],
                                              c, c2, r_target, cfg["spec_reps"])
            checkpoint(f"speculative {name}")

    # 5b. Where a decoding step's time goes.
    if "breakdown" not in skip and gbps is not None:
        res["breakdown"] = []
        for size in (TARGET_SIZE, DRAFT_SIZE):
            model, label = models[size]
            res["breakdown"] += breakdown(model, label, cfg["prompt"], 33, gbps)
        checkpoint("breakdown")

    # 6. No cache vs KV cache, 124M.
    if "no_cache" not in skip:
        res["no_cache"] = no_cache(draft, d_label, cfg["positions"], cfg["nc_reps"])
        checkpoint("no cache")

    # 7. Fresh processes: memory and loading; OpenBLAS settings; transformers.
    if "blas" not in skip:
        res["blas"] = []
        for setting, env in (
                ("gpt2_numpy's choice (no variable set)", {"OPENBLAS_CORETYPE": None}),
                ("GPT2_OPENBLAS_DEFAULT=1 (OpenBLAS's own choice)",
                 {"OPENBLAS_CORETYPE": None, "GPT2_OPENBLAS_DEFAULT": "1"}),
                ("gpt2_numpy's choice, OPENBLAS_NUM_THREADS=1",
                 {"OPENBLAS_CORETYPE": None, "OPENBLAS_NUM_THREADS": "1"})):
            row = {"setting": setting, "weights": RANDOM,
                   **run_worker("blas", {"reps": 3, "tries": timing.TRIES}, env)}
            res["blas"].append(row)
            print_row("blas", row)
        checkpoint("blas")
    if "transformers" not in skip and "autoregressive" in res:
        threads = next((d.get("num_threads") for d in m["threadpoolctl"] if isinstance(d, dict)),
                       None) if isinstance(m.get("threadpoolctl"), list) else None
        res["transformers"] = transformers_section(
            res, {"sizes": cfg["hf_sizes"], "prompt": cfg["prompt"], "tokens": cfg["ar_tokens"],
                  "reps": 2, "threads": threads or N_CPU})
    checkpoint("all")
    print(f"\nwrote {out_dir}/bench.json, *.csv, summary.md; figures: python -m bench plot {out_dir}")
    return 0
