"""Decoding against the memory-bandwidth floor: the streaming rate, ms/token, and where it goes.

Generating a token multiplies one row by every weight matrix, so it streams every weight from
memory once: weight bytes / streaming rate is the floor no decoder can beat.
"""
import time

import numpy as np

from .models import RANDOM, prompt_ids
from .report import print_row
from .timing import best, quiet_run, quiet_sample


def bandwidth(pool_mib, reps):
    """GB/s of one-row x @ W streamed over a pool of [1024, 4096] float32 matrices, far larger
    than the caches (lscpu reports up to hundreds of MiB of L3 on cloud CPUs: a pool that fits
    would measure the cache, not memory), with W stored row-major (as in the checkpoint) and
    column-major; the faster of the two is the floor's rate."""
    rng = np.random.default_rng(0)
    n = max(2, pool_mib * 2**20 // (1024 * 4096 * 4))
    w = rng.standard_normal((1024, 4096), dtype=np.float32)
    pools = {"row-major": [w.copy() for _ in range(n)]}  # speed does not depend on the values
    pools["column-major"] = [np.asfortranarray(w) for _ in range(n)]
    x = rng.standard_normal((1, 1024), dtype=np.float32)
    nbytes = sum(w.nbytes for w in pools["row-major"])
    samples = {k: [] for k in pools}
    for _ in range(reps):
        for layout, pool in pools.items():
            def sweep():
                for w in pool:
                    x @ w
            samples[layout].append(quiet_sample(sweep, min_seconds=0.3))
    rows = []
    for layout, s in samples.items():
        b = best(s)
        rows.append({"layout": layout, "weights": RANDOM, "pool_MiB": nbytes // 2**20,
                     "GB_per_s": nbytes / b["best"] / 1e9,
                     "GB_per_s_median": nbytes / b["median"] / 1e9, "reps": b["n"],
                     "max_foreign": b["max_foreign"]})
    return rows


def autoregressive(model, label, prompt, n_tokens, reps):
    """Greedy decoding of n_tokens after `prompt`, repeated; the fastest run is reported."""
    import gpt2_numpy as gpt2

    runs = []
    for _ in range(reps):
        runs.append(quiet_run(lambda: gpt2.autoregressive_sample(
            model, prompt, n_tokens, gpt2.Warp(0.0), np.random.default_rng(0))[1]))
    stats, foreign = min(runs, key=lambda r: r[0].decode_seconds)
    per_token = [s.decode_seconds / s.n_generated for s, _ in runs]
    return {"model": model.name, "weights": label, "prompt_tokens": len(prompt),
            "new_tokens": stats.n_generated, "ms_per_token": 1e3 * min(per_token),
            "ms_per_token_median": 1e3 * sorted(per_token)[len(per_token) // 2],
            "tokens_per_s": 1 / min(per_token),
            "prefill_ms": 1e3 * stats.prefill_seconds,
            "prefill_tokens_per_s": (len(prompt) - 1) / stats.prefill_seconds if stats.prefill_seconds else None,
            "reps": reps, "foreign_of_best": foreign, "max_foreign": max(f for _, f in runs)}


def matmuls_only(model, reps):
    """Seconds for the one-row products of one decoding step alone (every weight matrix, in
    forward order, same layouts), without the rest of the forward pass: the part of a step
    that is pure weight streaming, to tell it apart from the elementwise work in between."""
    d = model.hparams["n_embd"]
    x, x4 = np.ones((1, d), np.float32), np.ones((1, 4 * d), np.float32)
    products = [(x4 if name == "mlp" and layer == "c_proj" else x, block[name][layer]["w"])
                for block in model.params["blocks"]
                for name, layer in (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj"))]
    products.append((x, model.params["wte"].T))  # the tied LM head

    def step():
        for row, w in products:
            row @ w
    return best([quiet_sample(step, min_seconds=0.3) for _ in range(reps)])["best"]


def breakdown(model, label, n_past, n_steps, gbps):
    """Where the milliseconds of a decoding step go: model.py's functions wrapped with timers.
    The wrappers cost a microsecond or so per call, which the instrumented total includes. Each
    product is shown next to its floor: its weight bytes at the floor's rate, `gbps` GB/s.
    Then the same steps again with the weight products skipped (each returns its first
    output): what everything else costs when no weight stream evicts its data from the caches."""
    import gpt2_numpy.model as mm

    d = model.hparams["n_embd"]
    kinds = {(d, 3 * d): "matmul c_attn", (d, d): "matmul attn.c_proj",
             (d, 4 * d): "matmul mlp.c_fc", (4 * d, d): "matmul mlp.c_proj"}
    seconds = {}
    originals = {name: getattr(mm, name) for name in ("linear", "attention", "layer_norm", "gelu",
                                                      "lm_head")}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
            return out
        return wrapper

    def linear(x, w, b, matmul=mm.matmul):  # the product and the bias add, timed apart
        start = time.perf_counter()
        y = matmul(x, w)
        middle = time.perf_counter()
        y = y + b
        end = time.perf_counter()
        kind = kinds[tuple(w.shape)]
        seconds[kind] = seconds.get(kind, 0.0) + middle - start
        seconds["bias adds"] = seconds.get("bias adds", 0.0) + end - middle
        return y

    ids = prompt_ids(model, n_past + n_steps, seed=3)
    cache = model.new_cache(n_past + n_steps)
    model(ids[:n_past], cache, n_logits=0)
    try:
        mm.linear = linear
        mm.attention = timed("attention (scores, softmax, weighted values)", originals["attention"])
        mm.layer_norm = timed("layer norms", originals["layer_norm"])
        mm.gelu = timed("GELU", originals["gelu"])
        mm.lm_head = timed("LM head (x @ wte.T)", originals["lm_head"])
        model(ids[n_past : n_past + 1], cache)  # warm-up
        seconds.clear()
        start = time.perf_counter()
        for i in range(1, n_steps):
            model(ids[n_past + i : n_past + i + 1], cache)
        total = time.perf_counter() - start
    finally:
        for name, fn in originals.items():
            setattr(mm, name, fn)
    steps = n_steps - 1

    products, reused = model.products, {}

    def skipped(x, w):  # each weight product returns its first output
        if (x.shape, w.shape) not in reused:
            reused[x.shape, w.shape] = products(x, w)
        return reused[x.shape, w.shape]

    try:
        model.products = skipped
        cache.rollback(n_past)
        model(ids[n_past : n_past + 1], cache)  # warm-up: records one output per product
        start = time.perf_counter()
        for i in range(1, n_steps):
            model(ids[n_past + i : n_past + i + 1], cache)
        hot = time.perf_counter() - start
    finally:
        model.products = products
    rest = total - sum(seconds.values())
    n_layer, V = model.hparams["n_layer"], model.hparams["n_vocab"]
    weight_bytes_of = {kind: 4 * n_layer * rows * cols for (rows, cols), kind in kinds.items()}
    weight_bytes_of["LM head (x @ wte.T)"] = 4 * V * d
    rows = [{"model": model.name, "weights": label, "part": k, "ms_per_token": 1e3 * v / steps,
             "share": v / total,
             "floor_ms": 1e3 * weight_bytes_of[k] / gbps / 1e9 if k in weight_bytes_of else None}
            for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])]
    rows.append({"model": model.name, "weights": label,
                 "part": "the rest (embedding, head split/merge, cache writes, residual adds, Python)",
                 "ms_per_token": 1e3 * rest / steps, "share": rest / total})
    rows.append({"model": model.name, "weights": label, "part": "total (instrumented)",
                 "ms_per_token": 1e3 * total / steps, "share": 1.0})
    rows.append({"model": model.name, "weights": label,
                 "part": "not instrumented, weight products skipped: all the rest, in cache",
                 "ms_per_token": 1e3 * hot / steps, "share": hot / total})
    for row in rows:
        print_row("breakdown", row)
    return rows
