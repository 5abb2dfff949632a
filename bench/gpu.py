"""The GPU run: gpt2_cupy with and without CUDA graphs, r(T), speculative decoding.

    python -m bench gpu                 # ~3 min on an H100
    python -m bench gpu --quick         # 124M and 355M only, fewer K and repetitions

Random weights in the official shapes (speed only). Writes bench_out/bench.json and CSVs.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import gpt2_numpy as gpt2

from . import command
from .adaptive import ScriptedDrafter
from .floor import autoregressive
from .machine import gpu_info, machine_info
from .models import RANDOM, prompt_ids, weight_bytes
from .report import print_row, write_csv
from .speculative import speculative
from .timing import N_CPU, gpu_seconds
from .verify import r_of_T
from .workers import transformers_section

GPU_SIZES = ["124M", "355M", "774M", "1558M"]


def gpu_bandwidth(mib: int, reps: int) -> dict:
    """The GPU's weight-streaming rate: one row times ONE matrix far larger than its L2 cache,
    a single kernel, so that launch costs vanish (the floor's rate); and, for contrast, the
    same bytes as [1024, 4096] products launched one by one, as an eager decoding step does."""
    import cupy as cp

    big = cp.full((mib * 2**20 // (4 * 8192), 8192), 0.5, dtype=cp.float32)  # [rows, 8192]
    x = cp.ones((1, big.shape[0]), dtype=cp.float32)
    seconds = min(gpu_seconds(lambda: x @ big, 10) for _ in range(reps))
    small = [cp.full((1024, 4096), 0.5, dtype=cp.float32) for _ in range(256)]  # 4 GiB / 1024
    x_small = cp.ones((1, 1024), dtype=cp.float32)
    one_by_one = min(gpu_seconds(lambda: [x_small @ w for w in small], 1) for _ in range(reps))
    y = cp.ones((1, 1024), dtype=cp.float32)
    launch = min(gpu_seconds(lambda: x_small + y, 2000) for _ in range(reps))
    nbytes = big.nbytes
    del big, small
    return {"MiB": nbytes // 2**20, "GB_per_s": nbytes / seconds / 1e9,
            "GB_per_s_16MiB_products_one_by_one": 256 * 1024 * 4096 * 4 / one_by_one / 1e9,
            "us_per_16MiB_product": 1e6 * one_by_one / 256, "tiny_kernel_us": 1e6 * launch,
            "weights": RANDOM}


def scripted(draft, script, n_prompt, error):
    """A drafter that pays for `draft`'s forwards but proposes `script` (bench/adaptive.py)."""
    return ScriptedDrafter(draft, script, n_prompt, error=error, seed=0)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m bench gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_out", help="where bench.json and the CSVs go")
    p.add_argument("--quick", action="store_true", help="124M and 355M only, fewer K and repetitions")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: transformers")
    args = p.parse_args(argv)
    import gpt2_cupy as gpu  # after parsing: --help works without CuPy

    q = args.quick
    cfg = {"prompt": 64, "ar_tokens": 32 if q else 64, "ar_reps": 2 if q else 3,
           "spec_tokens": 32 if q else 64, "spec_reps": 1 if q else 2,
           "Ks": [1, 4, 8] if q else list(range(1, 9)), "Ts": list(range(1, 10)) + [16],
           "reps": 3 if q else 7, "pool_mib": 2048,
           "sizes": GPU_SIZES[:2] if q else GPU_SIZES, "eager_sizes": GPU_SIZES[:2]}
    out_dir = Path(args.out)
    started = time.perf_counter()
    res = {"command": command("gpu", argv), "config": cfg, "backend": "cupy", "machine": {**machine_info(), **gpu_info()}}
    m = res["machine"]
    print(f"machine: {m['gpu']} ({m['gpu_memory_gib']} GiB), CuPy {m['cupy']}, CUDA runtime "
          f"{m['cuda_runtime']}, driver {m['cuda_driver']}; host {m.get('cpu')}, {m['cpus']} CPUs",
          flush=True)

    def checkpoint(section):
        res["total_seconds"] = time.perf_counter() - started
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "bench.json").write_text(json.dumps(res, indent=1, default=str))
        for key in ("autoregressive", "r_of_T", "speculative"):
            write_csv(out_dir / f"{key}.csv", res.get(key, []))
        print(f"-- {section} done at {res['total_seconds']:.0f} s", flush=True)

    res["bandwidth"] = gpu_bandwidth(cfg["pool_mib"], 3)
    print_row("bandwidth", res["bandwidth"])
    gbps = res["bandwidth"]["GB_per_s"]

    models = {}
    for i, size in enumerate(cfg["sizes"]):
        h = gpu.official_hparams(size)
        models[size] = gpu.GPT2(h, gpu.random_params(h, seed=i), name=size)
    prompt = prompt_ids(models["355M"], cfg["prompt"])

    # 1. Autoregressive: CUDA graphs (gpt2_cupy's default) and eager, kernel by kernel.
    res["autoregressive"] = []
    for size, model in models.items():
        floor = 1e3 * weight_bytes(model, streamed=True) / gbps / 1e9
        variants = [("CUDA graphs", model)]
        if size in cfg["eager_sizes"]:
            variants.append(("eager", gpt2.GPT2(model.hparams, model.params, name=size)))
        for how, mdl in variants:
            first = gpt2.autoregressive_sample(mdl, prompt, cfg["ar_tokens"], gpt2.Warp(0.0))[1]
            row = {"size": size, "forward": how,
                   **autoregressive(mdl, RANDOM, prompt, cfg["ar_tokens"], cfg["ar_reps"]),
                   "first_call_ms_per_token": 1e3 * first.decode_seconds / first.n_generated,
                   "floor_ms": floor}
            row["ratio_to_floor"] = row["ms_per_token"] / floor
            res["autoregressive"].append(row)
            print_row("autoregressive", row)
    checkpoint("autoregressive")

    # 2. r(T) and c (CUDA graphs).
    res["r_of_T"], costs = [], {}
    for size, model in models.items():
        rows, t1, t2 = r_of_T(model, RANDOM, cfg["prompt"], cfg["Ts"], cfg["reps"])
        res["r_of_T"] += rows
        costs[size] = (t1, t2, {row["T"]: row["r"] for row in rows})
        for row in rows:
            print_row("r(T)", row)
    checkpoint("r(T)")

    # 3. Speculative vs autoregressive. Random weights make every real pair disagree, so the
    #    drafts that agree are scripted: the draft model's forwards run (its cost is real) but it
    #    proposes the target's own greedy tokens, all of them or 90% (bench/adaptive.py).
    res["speculative"] = []
    draft = models["124M"]
    targets = ["355M", "1558M"] if "1558M" in models else ["355M"]
    for size in targets:
        target = models[size]
        n = cfg["spec_tokens"]
        script = gpt2.autoregressive_sample(target, prompt, n, gpt2.Warp(0.0))[0]
        t1, t2, r = costs[size]
        c, c2 = costs["124M"][0] / t1, costs["124M"][1] / t1
        res.setdefault("c", {})[f"{size}/124M"] = c
        pairs = [(f"{size}/124M scripted, every draft right (a=1)", scripted(draft, script, len(prompt), 0.0)),
                 (f"{size}/124M scripted, 10% of drafts wrong", scripted(draft, script, len(prompt), 0.1))]
        if size == "355M":
            pairs.append((f"{size}/124M random weights (a~0)", draft))
        for name, d in pairs:
            res["speculative"] += speculative(name, target, d, RANDOM, prompt, n, cfg["Ks"], c, c2, r,
                                              cfg["spec_reps"])
            checkpoint(f"speculative {name}")

    # 4. Hugging Face transformers on the same GPU, same shapes, if torch and transformers import.
    if "transformers" not in set(filter(None, args.skip.split(","))):
        res["transformers"] = transformers_section(
            res, {"sizes": ["124M", "355M"], "prompt": cfg["prompt"], "tokens": cfg["ar_tokens"],
                  "reps": 2, "threads": N_CPU, "device": "cuda"},
            lambda row: row["forward"] == "CUDA graphs")
    checkpoint("all")
    return 0
