"""How a decoding step uses two threads: the whole step at 1 and 2 BLAS threads, each kind of
weight product alone at 1 and 2, the per-call cost of a small product, and the LM head split in
two halves on two Python threads (NumPy releases the GIL in matmul). Needs threadpoolctl, which
sets OpenBLAS's thread count inside this process, so that every setting is timed interleaved
with the others."""
import threading

import numpy as np

from .models import prompt_ids
from .report import print_row
from .timing import best, quiet_sample


def blas_threads(n):
    """A context in which OpenBLAS uses n threads (threadpoolctl)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=n, user_api="blas")


def decode_threads(model, label, n_past, n_tokens, reps, threads=(1, 2)):
    """ms per decoded token (greedy, one token per forward, logits of one row) at each BLAS
    thread count, the counts interleaved within each repetition."""
    ids = prompt_ids(model, n_past + n_tokens, seed=4)
    cache = model.new_cache(n_past + n_tokens)
    model(ids[:n_past], cache, n_logits=0)
    runs = {n: [] for n in threads}

    def decode():
        cache.rollback(n_past)
        for t in ids[n_past:]:
            model([t], cache)

    for _ in range(reps):
        for n in threads:
            with blas_threads(n):
                seconds, foreign = quiet_sample(decode)
            runs[n].append((seconds / n_tokens, foreign))
    rows = []
    for n in threads:
        b = best(runs[n])
        rows.append({"model": model.name, "weights": label, "part": "decoding step",
                     "threads": n, "ms": 1e3 * b["best"], "ms_median": 1e3 * b["median"],
                     "max_foreign": b["max_foreign"]})
    return with_speedups(rows)


def product_kinds(model):
    """{kind: [(x, w), ...]}: every one-row weight product of a step, by kind."""
    d = model.hparams["n_embd"]
    x, x4 = np.ones((1, d), np.float32), np.ones((1, 4 * d), np.float32)
    kinds = {}
    for block in model.params["blocks"]:
        kinds.setdefault("c_attn [d, 3d]", []).append((x, block["attn"]["c_attn"]["w"]))
        kinds.setdefault("attn.c_proj [d, d]", []).append((x, block["attn"]["c_proj"]["w"]))
        kinds.setdefault("mlp.c_fc [d, 4d]", []).append((x, block["mlp"]["c_fc"]["w"]))
        kinds.setdefault("mlp.c_proj [4d, d]", []).append((x4, block["mlp"]["c_proj"]["w"]))
    kinds["LM head [d, V] (wte.T)"] = [(x, model.params["wte"].T)]
    kinds["small product [1, 64] @ [64, 64], 97 calls"] = [
        (np.ones((1, 64), np.float32), np.ones((64, 64), np.float32))] * 97
    return kinds


def split_head(x, wte):
    """x @ wte.T with the vocabulary in two halves, one on a second Python thread: each half a
    one-thread product when called under blas_threads(1).  [1, d] -> [1, V]"""
    V = wte.shape[0]
    out = np.empty((x.shape[0], V), np.float32)  # [1, V]
    half = V // 2
    other = threading.Thread(target=np.matmul, args=(x, wte[half:].T), kwargs={"out": out[:, half:]})
    other.start()
    np.matmul(x, wte[:half].T, out=out[:, :half])
    other.join()
    return out


def products_threads(model, label, reps, threads=(1, 2), min_seconds=0.2):
    """ms per step of each kind of one-row product (all layers', back to back) at each BLAS
    thread count, and the LM head split on two Python threads; all interleaved."""
    kinds = product_kinds(model)
    settings = [(kind, n) for kind in kinds for n in threads]
    samples = {s: [] for s in settings}
    x, wte = kinds["LM head [d, V] (wte.T)"][0][0], model.params["wte"]
    np.testing.assert_allclose(split_head(x, wte), x @ wte.T, rtol=1e-4, atol=1e-4)
    split = ("LM head in two halves on two Python threads, 1 BLAS thread each", 1)
    samples[split] = []
    for _ in range(reps):
        for kind, n in settings:
            def run(pairs=kinds[kind]):
                for x, w in pairs:
                    x @ w
            with blas_threads(n):
                samples[kind, n].append(quiet_sample(run, min_seconds=min_seconds))
        with blas_threads(1):
            samples[split].append(quiet_sample(lambda: split_head(x, wte),
                                                           min_seconds=min_seconds))
    rows = []
    for (kind, n), s in samples.items():
        b = best(s)
        rows.append({"model": model.name, "weights": label, "part": kind, "threads": n,
                     "ms": 1e3 * b["best"], "ms_median": 1e3 * b["median"],
                     "max_foreign": b["max_foreign"]})
    return with_speedups(rows, {split[0]: "LM head [d, V] (wte.T)"})


def with_speedups(rows, compare=None):
    """Each row's speedup over the same part at 1 thread (`compare`: part -> the part it is
    compared with, for the split LM head)."""
    one = {r["part"]: r["ms"] for r in rows if r["threads"] == 1}
    for r in rows:
        r["speedup_over_1_thread"] = one[(compare or {}).get(r["part"], r["part"])] / r["ms"]
    return rows


def threads_section(models, n_past, n_tokens, reps, min_seconds=0.2):
    """Both parts for each (model, label); rows printed as they come. Skipped, with the reason,
    when threadpoolctl is missing."""
    try:
        import threadpoolctl  # noqa: F401
    except ImportError:
        print("[threads] skipped: pip install threadpoolctl", flush=True)
        return {"skipped": "threadpoolctl not installed"}
    rows = []
    for model, label in models:
        part = decode_threads(model, label, n_past, n_tokens, reps)
        part += products_threads(model, label, reps, min_seconds=min_seconds)
        for row in part:
            print_row("threads", row)
        rows += part
    return rows
