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


class Parts:
    """Adds up the seconds of each named part of a decoding step (`time(name, fn, *args)`)."""

    def __init__(self):
        self.seconds = {}

    def time(self, name, fn, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        return out


class Untimed(Parts):
    """Runs each part without a timer."""

    def time(self, name, fn, *args, **kwargs):
        return fn(*args, **kwargs)


def step_in_parts(model, token: int, cache, parts: Parts, product=None):
    """One decoding step (one new token, NumPy weights), written out from model.py's forward,
    transformer_block, causal_self_attention and mlp, calling model.py's own functions, with
    each part timed by `parts`. product(x, w): the weight products (x @ w, which follows the
    model's products' plan; the caller may pass another), timed apart from their bias adds.
    Returns the logits [1, V]."""
    import gpt2_numpy.model as mm

    d, n_head = model.hparams["n_embd"], model.hparams["n_head"]
    kinds = {(d, 3 * d): "matmul c_attn", (d, d): "matmul attn.c_proj",
             (d, 4 * d): "matmul mlp.c_fc", (4 * d, d): "matmul mlp.c_proj"}
    product = product or (lambda x, w: x @ w)

    def linear(x, w, b):  # mm.linear, the product and the bias add timed apart
        return parts.time("bias adds", np.add, parts.time(kinds[w.shape], product, x, w), b)

    params, n_past = model.params, cache.length
    L = n_past + 1
    x = params["wte"][[token]] + params["wpe"][n_past : L]  # [1, d]
    for i, block in enumerate(params["blocks"]):
        h = parts.time("layer norms", mm.layer_norm, x, **block["ln_1"])
        heads = mm.split_heads(linear(h, **block["attn"]["c_attn"]), 3 * n_head)  # [3H, 1, D]
        q, k, v = heads[:n_head], heads[n_head : 2 * n_head], heads[2 * n_head :]
        cache.k[i, :, n_past:L, :], cache.v[i, :, n_past:L, :] = k, v
        out = parts.time("attention (scores, softmax, weighted values)", mm.attention,
                         q, cache.k[i, :, :L, :], cache.v[i, :, :L, :])  # [H, 1, D]
        x = x + linear(mm.merge_heads(out), **block["attn"]["c_proj"])
        h = parts.time("layer norms", mm.layer_norm, x, **block["ln_2"])
        h = parts.time("GELU", mm.gelu, linear(h, **block["mlp"]["c_fc"]))
        x = x + linear(h, **block["mlp"]["c_proj"])
    cache.length = L
    x = parts.time("layer norms", mm.layer_norm, x, **params["ln_f"])
    return parts.time("LM head (x @ wte.T)", product, x, params["wte"].T)  # mm.lm_head: [1, V]


def breakdown(model, label, n_past, n_steps, gbps):
    """Where the milliseconds of a decoding step go: the step written out from model.py's
    functions (step_in_parts), each part timed. The timers cost a microsecond or so per call,
    which the instrumented total includes. Each product is shown next to its floor: its weight
    bytes at the floor's rate, `gbps` GB/s. Then the same steps again with the weight products
    skipped (each returns its first output): what everything else costs when no weight stream
    evicts its data from the caches (no timers there)."""
    import gpt2_numpy.model as mm

    d = model.hparams["n_embd"]
    kinds = {(d, 3 * d): "matmul c_attn", (d, d): "matmul attn.c_proj",
             (d, 4 * d): "matmul mlp.c_fc", (4 * d, d): "matmul mlp.c_proj"}
    ids = prompt_ids(model, n_past + n_steps, seed=3)
    cache = model.new_cache(n_past + n_steps)
    model(ids[:n_past], cache, n_logits=0)
    logits = step_in_parts(model, ids[n_past], cache, Parts())  # warm-up, and a check:
    cache.rollback(n_past)  # the step written out gives the forward's own logits
    np.testing.assert_allclose(logits, model(ids[n_past : n_past + 1], cache), rtol=1e-4,
                               atol=1e-4)
    parts = Parts()
    start = time.perf_counter()
    for i in range(1, n_steps):
        step_in_parts(model, ids[n_past + i], cache, parts)
    total = time.perf_counter() - start
    seconds, steps = parts.seconds, n_steps - 1

    reused = {}

    def skipped(x, w):  # a weight product returns its first output
        if (x.shape, w.shape) not in reused:
            reused[x.shape, w.shape] = x @ w
        return reused[x.shape, w.shape]

    cache.rollback(n_past)
    step_in_parts(model, ids[n_past], cache, Untimed(), skipped)  # warm-up: one output each
    start = time.perf_counter()
    for i in range(1, n_steps):
        step_in_parts(model, ids[n_past + i], cache, Untimed(), skipped)
    hot = time.perf_counter() - start
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
