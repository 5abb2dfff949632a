"""Every performance number in the README, from one command.

    python bench.py                     # the full run: ~5 min on a 2-core machine
    python bench.py --quick             # fewer tokens, K and repetitions: ~1 min
    python bench.py --plot bench_out    # the figures in img/ from bench_out/*.json (matplotlib)

It writes bench_out/bench.json (everything, with the machine and BLAS it ran on), one CSV per
table, and summary.md (the tables as Markdown), and prints the tables as it goes. Sections:

    bandwidth      one-row x @ W over 1 GiB of weights (far larger than any cache): the rate at
                   which this machine can stream weights, and from it the ms/token FLOOR of each
                   size (every weight but wpe is read once per token)
    autoregressive ms/token of 124M and 355M (prefill reported apart) and its ratio to the floor
    r(T)           cost of one forward over T = 1..9 new tokens / cost over 1, at cache length 64,
                   and c = draft step / target step
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
import csv
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import gpt2_numpy  # noqa: F401  first: it picks OpenBLAS's kernels before NumPy loads OpenBLAS
import numpy as np
from gpt2_numpy.backend import synchronize

RANDOM = "random weights: speed is real, acceptance is not"
OFFICIAL = "official weights"
TARGET_SIZE, DRAFT_SIZE = "355M", "124M"
PROMPT_TEXT = ("Alan Turing theorized that computers would one day become the most powerful "
               "machines on the planet. He imagined a machine that could")


# --- timing that notices other processes ------------------------------------------------------

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


def quiet_sample(fn, min_seconds=0.0, max_foreign=0.10, tries=8):
    """Seconds per call of fn, retried (after a pause) while other processes used more than
    max_foreign of the CPUs. min_seconds > 0: averaged over enough back-to-back calls (after an
    untimed one) to last that long. Returns (seconds, foreign)."""
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


# --- machine and models ------------------------------------------------------------------------

def machine_info() -> dict:
    info = {"python": sys.version.split()[0], "executable": sys.executable,
            "numpy": np.__version__, "cpus": N_CPU, "platform": platform.platform()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        names = [l.split(":", 1)[1].strip() for l in cpuinfo.splitlines() if l.startswith("model name")]
        flags = next((l.split(":", 1)[1].split() for l in cpuinfo.splitlines() if l.startswith("flags")), [])
        info["cpu"] = names[0] if names else platform.processor()
        info["simd"] = [f for f in ("avx2", "fma", "avx512f") if f in flags]
    except OSError:
        info["cpu"] = platform.processor()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        keep = ("Model name", "Vendor ID", "CPU(s)", "Thread(s) per core", "L2 cache", "L3 cache",
                "Hypervisor vendor")
        info["lscpu"] = {k.strip(): v.strip() for k, v in (l.split(":", 1) for l in lscpu.splitlines() if ":" in l)
                         if k.strip() in keep}
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        mem = Path("/proc/meminfo").read_text().split("\n")[0].split()
        info["memory_gib"] = round(int(mem[1]) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info["blas"] = {k: blas.get(k) for k in ("name", "version", "openblas configuration")}
    except Exception:  # show_config's layout differs across NumPy versions
        pass
    try:
        import threadpoolctl

        info["threadpoolctl"] = threadpoolctl.threadpool_info()
    except ImportError:
        info["threadpoolctl"] = "not installed (pip install threadpoolctl to record BLAS threads)"
    info["openblas_core"] = openblas_core()
    info["env"] = {k: os.environ[k] for k in ("OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE",
                                             "GPT2_OPENBLAS_DEFAULT", "OMP_NUM_THREADS",
                                             "MKL_NUM_THREADS") if k in os.environ}
    try:
        root = Path(__file__).resolve().parent
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        info["git"] = rev + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def openblas_core():
    """The kernel set ("core") OpenBLAS is using in this process, or None if that cannot be asked:
    the loaded OpenBLAS library (NumPy's bundled copy prefixes its symbols) is asked directly."""
    import ctypes

    try:
        libs = sorted({l.split()[-1] for l in open("/proc/self/maps") if "openblas" in l.lower()})
    except OSError:
        return None
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename",
                     "openblas_get_corename"):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                return fn().decode()
    return None


def official_dir(size, models_dir):
    """The folder holding official weights for `size`, or None (never downloads)."""
    from gpt2_numpy.download import resolve_model_dir
    from gpt2_numpy.errors import GPT2Error

    try:
        return resolve_model_dir(size, models_dir, download=False)
    except GPT2Error:
        return None


def get_model(size, models_dir, seed, force_random=False):
    """(model, label, seconds): official weights if present, else random ones in the same shapes."""
    import gpt2_numpy as gpt2

    folder = None if force_random else official_dir(size, models_dir)
    start = time.perf_counter()
    if folder is not None:
        model = gpt2.load_model(str(folder), download=False, progress=False)
        model.name, label = size, OFFICIAL
    else:
        h = gpt2.official_hparams(size)
        model = gpt2.GPT2(h, gpt2.random_params(h, seed=seed), name=f"{size} (random, seed {seed})")
        label = RANDOM
    return model, label, time.perf_counter() - start


def arrays(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from arrays(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from arrays(v)
    else:
        yield tree


def weight_bytes(model, streamed=False) -> int:
    """Bytes of all weights; streamed=True: those a decoding step reads (wpe: one row only)."""
    total = sum(a.nbytes for a in arrays(model.params))
    if streamed:
        wpe = model.params["wpe"]
        total -= wpe.nbytes - wpe.nbytes // wpe.shape[0]
    return total


def prompt_ids(model, length, seed=0):
    """`length` prompt tokens: the tokenized English prompt (repeated) when there is a tokenizer,
    otherwise fixed random ids (a random model has no tokenizer and no preference anyway)."""
    if model.tokenizer is not None:
        ids = model.tokenizer.encode(PROMPT_TEXT)
        return (ids * (length // len(ids) + 1))[:length]
    return np.random.default_rng(seed).integers(0, model.n_vocab, length).tolist()


# --- sections ------------------------------------------------------------------------------------

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


def forward_costs(model, n_past, Ts, reps, extra=((2, 1),)):
    """Seconds of one forward over T new tokens after n_past cached ones, for each T (logits for
    all T rows, as a verify step needs) and for each (T, n_logits) in `extra`."""
    ids = prompt_ids(model, n_past + max(Ts), seed=1)
    cache = model.new_cache(n_past + max(Ts))
    model(ids[:n_past], cache, n_logits=0)
    calls = [(T, T) for T in Ts] + list(extra)
    samples = {c: [] for c in calls}
    for _ in range(reps):
        # One call per sample, the calls interleaved: a slow spell hits every T alike, and each
        # call follows a different one, as in decoding (back-to-back repeats of the same call
        # run ~5% faster than they do in a real decode).
        for T, n_logits in calls:
            def step():
                cache.rollback(n_past)
                model(ids[n_past : n_past + T], cache, n_logits=n_logits)
                synchronize(cache.k)  # a GPU returns before it has finished; a no-op on NumPy
            samples[T, n_logits].append(quiet_sample(step))
    return {c: best(s) for c, s in samples.items()}


def r_of_T(model, label, n_past, Ts, reps):
    costs = forward_costs(model, n_past, Ts, reps)
    t1 = costs[1, 1]["best"]
    rows = [{"model": model.name, "weights": label, "T": T, "n_past": n_past,
             "ms": 1e3 * costs[T, T]["best"], "ms_median": 1e3 * costs[T, T]["median"],
             "r": costs[T, T]["best"] / t1, "max_foreign": costs[T, T]["max_foreign"]} for T in Ts]
    return rows, t1, costs[2, 1]["best"]


def column_major_c_proj(params, parts=("attn", "mlp")):
    """The tree with the c_proj matrices of `parts` in every block copied column by column (F
    order): the layout an earlier version of model.py used for both. Same names, shapes and
    values."""
    def proj(part):
        return {**part, "c_proj": {**part["c_proj"], "w": np.asfortranarray(part["c_proj"]["w"])}}
    blocks = [{**b, **{part: proj(b[part]) for part in parts}} for b in params["blocks"]]
    return {**params, "blocks": blocks}


KNOBS = {  # name: (PAD_ROWS_TO, transform of the parameter tree)
    "as shipped: checkpoint layout, 2..7 rows padded to 8": (8, None),
    "no padding": (1, None),
    "c_proj copied column-major, padded": (8, column_major_c_proj),
    "attn.c_proj only copied column-major, padded": (8, lambda p: column_major_c_proj(p, ["attn"])),
    "mlp.c_proj only copied column-major, padded": (8, lambda p: column_major_c_proj(p, ["mlp"])),
}


def knobs(sizes_params, n_past, reps, Ts=(1, 2, 5, 8)):
    """Forward costs with model.py's padding of few-row products off and on, and with the c_proj
    matrices in the other layout, all configurations interleaved within every repetition."""
    import gpt2_numpy as gpt2
    import gpt2_numpy.model as model_module

    rows = []
    for size, (h, params) in sizes_params.items():
        models = {name: gpt2.GPT2(h, fn(params) if fn else params, name=size)
                  for name, (_, fn) in KNOBS.items()}
        ids = prompt_ids(next(iter(models.values())), n_past + max(Ts), seed=1)
        caches = {}
        for name, model in models.items():
            caches[name] = model.new_cache(n_past + max(Ts))
            model(ids[:n_past], caches[name], n_logits=0)
        samples = {}
        try:
            for _ in range(reps):
                for name, model in models.items():
                    # PAD_ROWS_TO = 1: `1 < T < 1` never holds, so every T goes straight to x @ w
                    model_module.PAD_ROWS_TO = KNOBS[name][0]
                    for T in Ts:
                        def step():
                            caches[name].rollback(n_past)
                            model(ids[n_past : n_past + T], caches[name], n_logits=T)
                        samples.setdefault((name, T), []).append(quiet_sample(step))
        finally:
            model_module.PAD_ROWS_TO = 8
        for name in models:
            ms = {T: 1e3 * best(samples[name, T])["best"] for T in Ts}
            rows.append({"model": size, "weights": RANDOM, "configuration": name,
                         **{f"ms_T{T}": ms[T] for T in Ts}, **{f"r{T}": ms[T] / ms[1] for T in Ts[1:]},
                         "max_foreign": max(best(samples[name, T])["max_foreign"] for T in Ts)})
        del models, caches
    return rows


def expected_tokens(a, K):
    """E[tokens per round] = 1 + a + ... + a^K for i.i.d. acceptance a."""
    return K + 1.0 if a >= 1 else (1 - a ** (K + 1)) / (1 - a)


def predicted_steady(a, K, c, c2, r):
    """Speedup in the steady state for i.i.d. acceptance a: E[tokens/round] over the round's cost
    in target steps, K c + r(K+1), plus (c2 - c) in the fraction a^K of rounds that follow a
    fully accepted one (the draft then feeds 2 tokens)."""
    return expected_tokens(a, K) / (K * c + r[K + 1] + a ** K * (c2 - c))


def predicted_per_round(stats, c, c2, r):
    """Target-step units for the rounds exactly as they ran: K_r c + r(K_r + 1), plus (c2 - c)
    when the previous round accepted every draft (the draft then feeds 2 tokens: its last draft
    and the bonus). Returns tokens per target-step-equivalent, i.e. the predicted speedup."""
    cost, prev_full = 0.0, False
    for K_r, m in zip(stats.K_per_round, stats.accepted_per_round):
        cost += K_r * c + r[K_r + 1] + ((c2 - c) if prev_full and K_r else 0.0)
        prev_full = K_r > 0 and m == K_r
    return stats.n_generated / cost


def speculative(pair, target, draft, label, prompt, n_tokens, Ks, c, c2, r, reps):
    """Greedy speculative decoding for each K (the fastest of `reps` runs), with predictions.
    The autoregressive baseline is re-measured next to each K (same tokens, same repetitions),
    so that the machine's speed drifting over minutes does not leak into the speedup."""
    import gpt2_numpy as gpt2

    rows = []
    for K in Ks:
        runs, ar_runs = [], []
        for _ in range(reps):
            ar_runs.append(quiet_run(lambda: gpt2.autoregressive_sample(
                target, prompt, n_tokens, gpt2.Warp(0.0), np.random.default_rng(0))[1]))
            runs.append(quiet_run(lambda: gpt2.speculative_sample(
                target, draft, prompt, n_tokens, K, gpt2.Warp(0.0), np.random.default_rng(0))[1]))
        stats, foreign = min(runs, key=lambda run: run[0].decode_seconds)
        ar_ms = 1e3 * min(s.decode_seconds / s.n_generated for s, _ in ar_runs)
        a = stats.acceptance_rate
        ms = 1e3 * stats.decode_seconds / stats.n_generated
        formula = expected_tokens(a, K) / (K * c + r[K + 1])
        steady = predicted_steady(a, K, c, c2, r)
        per_round = predicted_per_round(stats, c, c2, r)
        measured = ar_ms / ms
        rows.append({"pair": pair, "weights": label, "K": K, "new_tokens": stats.n_generated,
                     "tokens_per_s": 1e3 / ms, "ms_per_token": ms, "ar_ms_per_token": ar_ms, "acceptance": a,
                     "tokens_per_round": stats.tokens_per_round, "rounds": stats.rounds,
                     "draft_s": stats.draft_seconds, "target_s": stats.target_seconds,
                     "speedup": measured, "predicted_formula": formula,
                     "predicted_with_catch_up": steady, "predicted_per_round": per_round,
                     "error_formula": measured / formula - 1, "error_with_catch_up": measured / steady - 1,
                     "error_per_round": measured / per_round - 1,
                     "c": c, "r_K1": r[K + 1], "reps": reps, "foreign": foreign})
        print_row("speculative", rows[-1])
    return rows


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

    def linear(x, w, b):  # the product and the bias add, timed apart
        start = time.perf_counter()
        y = mm.matmul(x, w)
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

    matmul, reused = mm.matmul, {}

    def skipped(x, w):  # a weight product (2-D by 2-D) returns its first output; attention's run
        if x.ndim != 2 or w.ndim != 2:
            return matmul(x, w)
        if (x.shape, w.shape) not in reused:
            reused[x.shape, w.shape] = matmul(x, w)
        return reused[x.shape, w.shape]

    try:
        mm.matmul = skipped
        cache.rollback(n_past)
        model(ids[n_past : n_past + 1], cache)  # warm-up: records one output per product
        start = time.perf_counter()
        for i in range(1, n_steps):
            model(ids[n_past + i : n_past + i + 1], cache)
        hot = time.perf_counter() - start
    finally:
        mm.matmul = matmul
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


def no_cache(model, label, positions, reps):
    """ms per generated token at position p: re-running all p tokens (no cache; logits for every
    row, as picoGPT computes them, and for the last row only) vs one cached step."""
    ids = prompt_ids(model, max(positions), seed=2)
    rows = []
    for p in positions:
        cache = model.new_cache(p)
        model(ids[: p - 1], cache, n_logits=0)

        def cached():
            cache.rollback(p - 1)
            model(ids[p - 1 : p], cache)

        full = best([quiet_sample(lambda: model(ids[:p], model.new_cache(p), n_logits=None))
                      for _ in range(reps)])
        last = best([quiet_sample(lambda: model(ids[:p], model.new_cache(p), n_logits=1))
                     for _ in range(reps)])
        step = best([quiet_sample(cached) for _ in range(max(3, reps))])
        rows.append({"model": model.name, "weights": label, "position": p,
                     "no_cache_all_logits_ms": 1e3 * full["best"],
                     "no_cache_last_logits_ms": 1e3 * last["best"], "kv_cache_ms": 1e3 * step["best"],
                     "ratio": full["best"] / step["best"],
                     "max_foreign": max(full["max_foreign"], last["max_foreign"], step["max_foreign"])})
        print_row("no cache", rows[-1])
    return rows


# --- subprocess workers (fresh processes: peak RSS, BLAS environment, torch) --------------------

def run_worker(name, args, env=None, timeout=900):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", name, "--_args", json.dumps(args)]
    try:
        environ = {**os.environ, **(env or {})}  # a value None removes the variable
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                             env={k: v for k, v in environ.items() if v is not None})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def proc_status_bytes(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def rss_bytes():
    return proc_status_bytes("VmRSS")


TOKENIZER_FILES = ("encoder.json", "vocab.bpe")


def tokenizer_source(models_dir):
    """A folder with the official tokenizer files, or None: a downloaded model's, else the
    developers' ../shared copy. Only used to make random-weight checkpoint folders loadable."""
    root = Path(__file__).resolve().parent
    candidates = [Path(models_dir or root / "weights") / size for size in (DRAFT_SIZE, TARGET_SIZE)]
    candidates.append(root.parent / "shared" / "gpt2-tokenizer")
    return next((c for c in candidates if all((c / f).is_file() for f in TOKENIZER_FILES)), None)


def worker_write_random(a):
    """Write random weights in the official shapes AND the official file format (our
    write_checkpoint: a TF tensor bundle, byte for byte what TensorFlow writes) into a folder."""
    import shutil

    import gpt2_numpy as gpt2
    from gpt2_numpy.checkpoint import write_checkpoint

    h = gpt2.official_hparams(a["size"])
    start = time.perf_counter()
    write_checkpoint(a["folder"], h, gpt2.random_params(h, seed=a["seed"]))
    if a.get("tokenizer"):
        for name in TOKENIZER_FILES:
            shutil.copy(Path(a["tokenizer"]) / name, Path(a["folder"]) / name)
    print(json.dumps({"seconds": time.perf_counter() - start}))


def worker_memory(a):
    """Load both models from checkpoint folders as main.py does, run one token through each
    (which pages every weight in), and report load times and RSS."""
    import gpt2_numpy as gpt2
    from gpt2_numpy.checkpoint import load_checkpoint
    from gpt2_numpy.load import load_hparams

    base = rss_bytes()
    out = {"rss_before_bytes": base}
    models = {}
    for size in (TARGET_SIZE, DRAFT_SIZE):
        folder = Path(a["folders"][size])
        start = time.perf_counter()
        if all((folder / f).is_file() for f in TOKENIZER_FILES):
            models[size] = gpt2.load_model(str(folder), download=False, progress=False)
            what = "load_model (index, memory map, tokenizer)"
        else:  # no tokenizer files on this machine: everything load_model does but the tokenizer
            h = load_hparams(folder)
            models[size] = gpt2.GPT2(h, load_checkpoint(folder, h))
            what = "index and memory map (no tokenizer files here)"
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        models[size]([0], models[size].new_cache(1))  # touches every weight once
        out[size] = {"weights": a["labels"][size], "weight_bytes": weight_bytes(models[size]),
                     "load_s": load_s, "loaded": what,
                     "first_forward_s": time.perf_counter() - start}
    out["rss_after_bytes"] = rss_bytes()
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    out["vm_hwm_bytes"] = proc_status_bytes("VmHWM")  # the same peak, counted for this image only
    print(json.dumps(out))


def memory_section(models_dir):
    """Memory and load time, always from checkpoint files: the official ones where present, else
    random weights written in the official format to a temporary folder (deleted afterwards)."""
    import shutil
    import tempfile

    folders, labels, tmp = {}, {}, None
    try:
        for size, seed in ((TARGET_SIZE, 0), (DRAFT_SIZE, 1)):
            folders[size] = official_dir(size, models_dir)
            labels[size] = OFFICIAL
            if folders[size] is None:
                tmp = tmp or Path(tempfile.mkdtemp(prefix="gpt2-bench-"))
                folders[size] = tmp / size
                labels[size] = "random weights in the official file format: sizes and times are real"
                src = tokenizer_source(models_dir)
                w = run_worker("write_random", {"size": size, "seed": seed, "folder": str(folders[size]),
                                                "tokenizer": str(src) if src else None})
                if "error" in w:
                    return {"error": f"writing a {size} checkpoint failed: {w['error']}"}
        return run_worker("memory", {"folders": {k: str(v) for k, v in folders.items()}, "labels": labels})
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def worker_blas(a):
    """355M forwards of T = 1, 5, 8 and 64 new tokens under this process's OpenBLAS environment."""
    import gpt2_numpy as gpt2

    h = gpt2.official_hparams(TARGET_SIZE)
    model = gpt2.GPT2(h, gpt2.random_params(h, seed=0))
    costs = forward_costs(model, 64, [1, 5, 8, 64], a["reps"], extra=())
    info = {f"ms_T{T}": 1e3 * costs[T, T]["best"] for T in (1, 5, 8, 64)}
    info.update(core=openblas_core(), max_foreign=max(c["max_foreign"] for c in costs.values()))
    print(json.dumps(info))


def worker_transformers(a):
    """Hugging Face GPT2LMHeadModel, random init in the same shapes, greedy generate()."""
    try:
        import torch
        import transformers
    except Exception as e:
        print(json.dumps({"skipped": f"torch/transformers not importable in {sys.executable}: "
                                     f"{type(e).__name__}: {e}"}))
        return
    import gpt2_numpy as gpt2

    torch.set_num_threads(a["threads"])
    torch.manual_seed(0)
    device = a.get("device", "cpu")
    rows = []
    for size in a["sizes"]:
        h = gpt2.official_hparams(size)
        config = transformers.GPT2Config(vocab_size=h["n_vocab"], n_positions=h["n_ctx"],
                                         n_embd=h["n_embd"], n_layer=h["n_layer"], n_head=h["n_head"])
        model = transformers.GPT2LMHeadModel(config).eval().float().to(device)
        ids = torch.tensor([np.random.default_rng(0).integers(0, h["n_vocab"], a["prompt"]).tolist()],
                           device=device)
        mask = torch.ones_like(ids)

        def generate(n, model=model):
            with torch.no_grad():
                start = time.perf_counter()
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                                     min_new_tokens=n, do_sample=False, use_cache=True,
                                     pad_token_id=h["n_vocab"] - 1)
                if device != "cpu":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
            assert out.shape[1] == a["prompt"] + n
            return seconds

        generate(2)  # warm-up: first-call allocations
        one = min(generate(1) for _ in range(a["reps"]))  # prefill + the first token
        full = min(generate(a["tokens"]) for _ in range(a["reps"]))
        rows.append({"model": size, "ms_per_token": 1e3 * (full - one) / (a["tokens"] - 1),
                     "prefill_plus_first_ms": 1e3 * one})
        del model
    print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                      "torch_threads": torch.get_num_threads(), "device": device, "rows": rows}))


def transformers_section(res, worker_args, is_ours=lambda row: True) -> dict:
    """Hugging Face generate() in a fresh process; each of its rows beside our autoregressive
    row of the same size (the first one `is_ours` accepts)."""
    t = run_worker("transformers", worker_args)
    for row in t.get("rows", []):
        ours = next(r for r in res["autoregressive"] if r["size"] == row["model"] and is_ours(r))
        row["ours_ms_per_token"] = ours["ms_per_token"]
        row["ours_over_theirs"] = ours["ms_per_token"] / row["ms_per_token"]
        row["weights"] = RANDOM
        print_row("transformers", row)
    if "rows" not in t:
        print(f"[transformers] skipped: {t.get('skipped') or t.get('error')}", flush=True)
    return t


WORKERS = {"memory": worker_memory, "write_random": worker_write_random, "blas": worker_blas,
           "transformers": worker_transformers}


# --- output --------------------------------------------------------------------------------------

def fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def print_row(section, row):
    print(f"[{section}] " + "  ".join(f"{k}={fmt(v)}" for k, v in row.items()), flush=True)


def write_csv(path, rows):
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def md_table(rows, columns):
    """columns: (header, key or function of the row, format)."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        cells = []
        for _, key, f in columns:
            v = key(r) if callable(key) else r.get(key)
            cells.append("n/a" if v is None else (f.format(v) if f else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_markdown(res) -> str:
    m = res["machine"]
    out = [f"Machine: {m.get('cpu')} ({m['cpus']} CPUs, {', '.join(m.get('simd', []))}), "
           f"{m.get('memory_gib')} GiB; Python {m['python']}, NumPy {m['numpy']}, "
           f"{(m.get('blas') or {}).get('name')} {(m.get('blas') or {}).get('version')} "
           f"(kernels: {m.get('openblas_core')}); "
           f"git {m.get('git')}; command: `{res['command']}` ({res['total_seconds']:.0f} s)."]
    if "floor" in res:
        out += ["", "### Bandwidth and the floor", "",
                md_table(res["bandwidth"], [("x @ W, W stored", "layout", None), ("pool", "pool_MiB", "{} MiB"),
                                            ("GB/s (best)", "GB_per_s", "{:.1f}"),
                                            ("GB/s (median)", "GB_per_s_median", "{:.1f}"),
                                            ("foreign CPU (max)", "max_foreign", "{:.0%}")]),
                "", md_table(res["autoregressive"], [
                    ("model", "model", None), ("weights", "weights", None),
                    ("streamed MB/token", lambda r: res["floor"][r["size"]]["streamed_bytes"] / 1e6, "{:.0f}"),
                    ("floor ms/token", lambda r: res["floor"][r["size"]]["ms"], "{:.1f}"),
                    ("ms/token", "ms_per_token", "{:.1f}"), ("ratio to floor", "ratio_to_floor", "{:.2f}"),
                    ("its matmuls alone", lambda r: f"{r['matmuls_only_ms']:.1f} ms ({r['matmuls_GB_per_s']:.1f} GB/s)", None),
                    ("tokens/s", "tokens_per_s", "{:.1f}"),
                    ("prefill", lambda r: f"{r['prefill_ms']:.0f} ms / {r['prompt_tokens'] - 1} tokens", None),
                    ("foreign CPU (max)", "max_foreign", "{:.0%}")])]
    if "r_of_T" in res:
        by = {}
        for row in res["r_of_T"]:
            by.setdefault(row["model"], {})[row["T"]] = row
        Ts = sorted(next(iter(by.values())))
        out += ["", "### r(T): one forward over T new tokens at cache length 64 / one over 1 token", "",
                "| model | " + " | ".join(f"r({T})" for T in Ts) + " | T=1 ms |",
                "|---|" + "---|" * (len(Ts) + 1)]
        for name, d in by.items():
            out.append(f"| {name} | " + " | ".join(f"{d[T]['r']:.2f}" for T in Ts) + f" | {d[1]['ms']:.1f} |")
        out += ["", f"c = draft step / target step = {res['c']:.3f}; draft catch-up step (2 tokens, "
                    f"1 logit row) / target step = {res['c2']:.3f}"]
    if "what_if" in res:
        Ks = sorted({r["K"] for r in res["what_if"]})
        out += ["", "### Predicted speedup of a 124M draft for this 355M target, if acceptance were a",
                "(from the measured c, c2 and r(K+1); formula with the draft's catch-up step)", "",
                "| a | " + " | ".join(f"K={K}" for K in Ks) + " |", "|---|" + "---|" * len(Ks)]
        for a in sorted({r["acceptance"] for r in res["what_if"]}):
            row = {r["K"]: r for r in res["what_if"] if r["acceptance"] == a}
            out.append(f"| {a:.1f} | " + " | ".join(f"{row[K]['with_catch_up']:.2f}" for K in Ks) + " |")
        out += ["", "The same with a verify step as cheap as one decoding step, r(K+1) = 1 (what a GPU, or",
                "a BLAS whose few-row product is bandwidth-bound, would give), and the same c:", "",
                "| a | " + " | ".join(f"K={K}" for K in Ks) + " |", "|---|" + "---|" * len(Ks)]
        for a in sorted({r["acceptance"] for r in res["what_if"]}):
            row = {r["K"]: r for r in res["what_if"] if r["acceptance"] == a}
            out.append(f"| {a:.1f} | " + " | ".join(f"{row[K]['if_verify_were_free']:.2f}" for K in Ks) + " |")
    if "knobs" in res:
        out += ["", "### Padding and weight layout (random weights)", "",
                md_table(res["knobs"], [("model", "model", None), ("configuration", "configuration", None),
                                        ("T=1 ms", "ms_T1", "{:.1f}"), ("T=2 ms", "ms_T2", "{:.1f}"),
                                        ("T=5 ms", "ms_T5", "{:.1f}"), ("T=8 ms", "ms_T8", "{:.1f}"),
                                        ("r(2)", "r2", "{:.2f}"), ("r(5)", "r5", "{:.2f}"),
                                        ("r(8)", "r8", "{:.2f}")])]
    if "speculative" in res:
        out += ["", "### Speculative vs autoregressive (greedy, 355M target)", "",
                md_table(res["speculative"], [
                    ("pair", "pair", None), ("K", "K", None), ("tokens/s", "tokens_per_s", "{:.2f}"),
                    ("AR tokens/s", lambda r: 1e3 / r["ar_ms_per_token"], "{:.2f}"),
                    ("acceptance", "acceptance", "{:.2f}"), ("tokens/round", "tokens_per_round", "{:.2f}"),
                    ("speedup", "speedup", "{:.2f}"), ("predicted (formula)", "predicted_formula", "{:.2f}"),
                    ("error", "error_formula", "{:+.0%}"),
                    ("predicted (formula + catch-up)", "predicted_with_catch_up", "{:.2f}"),
                    ("error", "error_with_catch_up", "{:+.0%}"),
                    ("predicted (per round)", "predicted_per_round", "{:.2f}"),
                    ("error", "error_per_round", "{:+.0%}"), ("weights", "weights", None)])]
    if "breakdown" in res:
        out += ["", "### Where a decoding step's time goes (64 tokens in the cache)", "",
                md_table(res["breakdown"], [("model", "model", None), ("part", "part", None),
                                            ("ms/token", "ms_per_token", "{:.2f}"),
                                            ("its floor (weight bytes at the floor's rate)", "floor_ms", "{:.2f}"),
                                            ("share", "share", "{:.0%}")])]
    if "no_cache" in res:
        out += ["", "### ms/token without and with the KV cache (124M shapes)", "",
                md_table(res["no_cache"], [
                    ("position", "position", None),
                    ("no cache, all logits (picoGPT-style)", "no_cache_all_logits_ms", "{:.0f}"),
                    ("no cache, last logits", "no_cache_last_logits_ms", "{:.0f}"),
                    ("KV cache", "kv_cache_ms", "{:.1f}"), ("ratio", "ratio", "{:.0f}x"),
                    ("weights", "weights", None)])]
    if "memory" in res and "error" not in res["memory"]:
        mem = res["memory"]
        wb = sum(mem[s]["weight_bytes"] for s in (TARGET_SIZE, DRAFT_SIZE))
        out += ["", "### Memory and loading (fresh process, both models)", "",
                f"Weights {wb / 1e9:.2f} GB; RSS before loading {mem['rss_before_bytes'] / 1e9:.2f} GB, "
                f"after {mem['rss_after_bytes'] / 1e9:.2f} GB, peak {mem['peak_rss_bytes'] / 1e9:.2f} GB "
                f"(getrusage; VmHWM {mem['vm_hwm_bytes'] / 1e9:.2f} GB; "
                f"peak - before = {(mem['peak_rss_bytes'] - mem['rss_before_bytes']) / wb:.2f} x weights). "
                + "; ".join(f"{s} ({mem[s]['weights']}): {mem[s]['loaded']} {mem[s]['load_s']:.3f} s, "
                            f"then the first forward, which pages the weights in from the page cache, "
                            f"{mem[s]['first_forward_s']:.2f} s" for s in (TARGET_SIZE, DRAFT_SIZE))]
    if "blas" in res:
        out += ["", "### OpenBLAS kernels and threads (355M, random weights, fresh process each)", "",
                md_table(res["blas"], [("environment", "setting", None), ("core", "core", None),
                                       ("T=1 ms", "ms_T1", "{:.1f}"), ("T=5 ms", "ms_T5", "{:.1f}"),
                                       ("T=8 ms", "ms_T8", "{:.1f}"),
                                       ("r(5)", lambda r: r["ms_T5"] / r["ms_T1"] if "ms_T1" in r else None, "{:.2f}"),
                                       ("T=64 (a prefill) ms", "ms_T64", "{:.0f}"),
                                       ("note", lambda r: r.get("error", ""), None)])]
    if "transformers" in res:
        t = res["transformers"]
        if "rows" in t:
            out += ["", f"### vs Hugging Face transformers {t['transformers']} (torch {t['torch']}, "
                        f"{t['torch_threads']} threads), random init, greedy generate(use_cache=True)", "",
                    md_table(t["rows"], [("model", "model", None), ("theirs ms/token", "ms_per_token", "{:.1f}"),
                                         ("ours ms/token", "ours_ms_per_token", "{:.1f}"),
                                         ("ours / theirs", "ours_over_theirs", "{:.2f}"),
                                         ("weights", lambda r: RANDOM, None)])]
        else:
            out += ["", f"transformers: skipped ({t.get('skipped') or t.get('error')})"]
    return "\n".join(out) + "\n"


def save(res, out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(res, indent=1, default=str))
    for key in ("bandwidth", "autoregressive", "r_of_T", "what_if", "knobs", "speculative", "breakdown",
                "no_cache", "blas"):
        write_csv(out_dir / f"{key}.csv", res.get(key, []))
    if "rows" in res.get("transformers", {}):
        write_csv(out_dir / "transformers.csv", res["transformers"]["rows"])
    if "memory" in res:
        write_csv(out_dir / "memory.csv", [{"size": s, **res["memory"][s]} for s in (TARGET_SIZE, DRAFT_SIZE)
                                           if s in res["memory"]])
    (out_dir / "summary.md").write_text(summary_markdown(res))


# --- figures -------------------------------------------------------------------------------------

def bad_input(message: str):
    """A one-line error and exit status 2, as for any bad input."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def plot(out_dir: Path, img_dir: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        bad_input("--plot needs matplotlib (an optional extra): pip install matplotlib")
    img_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if (out_dir / "adaptive.json").exists():  # python bench.py --adaptive
        plot_adaptive(json.loads((out_dir / "adaptive.json").read_text()), plt)
        plt.savefig(img_dir / "adaptive.png", dpi=110)
        written.append("adaptive.png")
    bench_json = out_dir / "bench.json"
    res = json.loads(bench_json.read_text()) if bench_json.exists() else {}
    cpu = res.get("machine", {}).get("cpu", "?")

    if res.get("speculative"):
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 5.2), gridspec_kw={"width_ratios": [2, 1]})
        for i, pair in enumerate(dict.fromkeys(r["pair"] for r in res["speculative"])):
            rows = [r for r in res["speculative"] if r["pair"] == pair]
            K = [r["K"] for r in rows]
            color = f"C{i}"
            ax.plot(K, [r["speedup"] for r in rows], "o-", color=color, label=f"{pair}: measured")
            key = "predicted_with_catch_up" if "predicted_with_catch_up" in rows[0] else "predicted_formula"
            ax.plot(K, [r[key] for r in rows], "--", color=color,
                    label=f"{pair}: formula" + (" + catch-up" if key != "predicted_formula" else ""))
            ax.plot(K, [r["predicted_per_round"] for r in rows], ":", color=color, label=f"{pair}: per round")
            ax2.plot(K, [r["acceptance"] for r in rows], "o-", color=color, label=pair)
        for a, style in ((0.7, "-."), (0.9, "--")):
            rows = [r for r in res.get("what_if", []) if r["acceptance"] == a]
            ax.plot([r["K"] for r in rows], [r["with_catch_up"] for r in rows], style, color="gray",
                    lw=1, label=f"predicted if a were {a} (124M draft, measured c and r)")
        ax.axhline(1, color="black", lw=0.6)
        ax.set(xlabel="K (drafts per round)", ylabel="speedup over autoregressive",
               title="Speculative decoding, 355M target: measured and predicted")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
        ax2.set(xlabel="K", ylabel="acceptance rate", ylim=(-0.05, 1.05), title="Acceptance")
        ax2.legend(fontsize=8)
        fig.suptitle(f"{cpu}; {res['speculative'][0]['weights']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(img_dir / "speculative_speedup.png", dpi=110)
        written.append("speculative_speedup.png")

    if res.get("r_of_T"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, name in enumerate(dict.fromkeys(r["model"] for r in res["r_of_T"])):
            rows = [r for r in res["r_of_T"] if r["model"] == name]
            ax.plot([r["T"] for r in rows], [r["r"] for r in rows], "o-", color=f"C{i}", label=name)
        T = sorted({r["T"] for r in res["r_of_T"]})
        ax.plot(T, T, ":", color="gray", label="T separate steps")
        ax.axhline(1, color="gray", lw=0.8)
        ax.set(xlabel="T (new tokens in one forward)", ylabel="r(T) = cost(T) / cost(1)",
               title="Cost of a T-token forward at cache length 64")
        ax.legend(fontsize=8)
        fig.suptitle(f"{cpu}; {res['r_of_T'][0]['weights']}", fontsize=8)
        fig.tight_layout()
        fig.savefig(img_dir / "r_of_T.png", dpi=110)
        written.append("r_of_T.png")

    if res.get("no_cache"):
        rows = res["no_cache"]
        fig, ax = plt.subplots(figsize=(6, 4))
        p = [r["position"] for r in rows]
        ax.plot(p, [r["no_cache_all_logits_ms"] for r in rows], "o-", label="no cache, all logits (picoGPT-style)")
        ax.plot(p, [r["no_cache_last_logits_ms"] for r in rows], "s-", label="no cache, last logits only")
        ax.plot(p, [r["kv_cache_ms"] for r in rows], "^-", label="KV cache")
        ax.set(xscale="log", yscale="log", xlabel="position (tokens so far)", ylabel="ms per new token",
               title="124M: re-running the sequence vs the KV cache")
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(p, [str(x) for x in p])
        ax.legend(fontsize=8)
        fig.suptitle(f"{cpu}; {rows[0]['weights']}", fontsize=8)
        fig.tight_layout()
        fig.savefig(img_dir / "no_cache.png", dpi=110)
        written.append("no_cache.png")
    for name in written:
        print(f"wrote {img_dir / name}")
    if not written:
        bad_input(f"nothing to plot: neither {bench_json} nor {out_dir / 'adaptive.json'}")


def plot_adaptive(res: dict, plt):
    """One panel per situation: every fixed decoder's speed (bars; K = 0 is autoregressive),
    adaptive K's (a line), and the 5% bound below the best bar that adaptive K must clear."""
    fig, axes = plt.subplots(1, len(res["situations"]), figsize=(3.3 * len(res["situations"]), 3.8),
                             sharey=True, squeeze=False)
    for ax, situation in zip(axes[0], res["situations"]):
        rows = situation["rows"]
        ar = rows[0]["tps"]
        fixed, adaptive = rows[:-1], rows[-1]
        speed = [r["tps"] / ar for r in fixed]
        ax.bar(range(len(fixed)), speed, color=["gray"] + ["C0"] * (len(fixed) - 1))
        ax.axhline(0.95 * max(speed), color="black", ls=":", lw=1, label="5% below the best bar")
        ax.axhline(adaptive["tps"] / ar, color="C3", lw=2,
                   label=f"adaptive: {adaptive['tps'] / ar:.2f}x")
        ax.set_xticks(range(len(fixed)), ["AR"] + [str(r["K"]) for r in fixed[1:]])
        ax.set_title(situation["title"].replace(" (", "\n("), fontsize=8)
        ax.set_xlabel("fixed K (AR: autoregressive)", fontsize=8)
        ax.legend(fontsize=7, loc="upper left")
    axes[0][0].set_ylabel("tokens/s vs autoregressive")
    fig.suptitle(f"Adaptive K vs every fixed K: {res['target']} target, {res['draft']} draft, "
                 f"{res['weights']} weights, greedy; {res['machine']}", fontsize=8)
    fig.tight_layout()


# --- GPU: python bench.py --backend cupy ---------------------------------------------------------

GPU_SIZES = ["124M", "355M", "774M", "1558M"]


def gpu_info() -> dict:
    import cupy as cp

    props = cp.cuda.runtime.getDeviceProperties(0)
    return {"gpu": props["name"].decode(), "gpu_memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
            "cupy": cp.__version__, "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
            "cuda_driver": cp.cuda.runtime.driverGetVersion()}


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
    """A drafter that pays for `draft`'s forwards but proposes `script` (adaptive_bench.py)."""
    from gpt2_numpy.adaptive_bench import ScriptedDrafter

    return ScriptedDrafter(draft, script, n_prompt, error=error, seed=0)


def gpu_main(args):
    """The GPU run: CuPy twin, random weights in the official shapes (speed only)."""
    import gpt2_cupy as gpu
    import gpt2_numpy as gpt2

    q = args.quick
    cfg = {"prompt": 64, "ar_tokens": 32 if q else 64, "ar_reps": 2 if q else 3,
           "spec_tokens": 32 if q else 64, "spec_reps": 1 if q else 2,
           "Ks": [1, 4, 8] if q else list(range(1, 9)), "Ts": list(range(1, 10)) + [16],
           "reps": 3 if q else 7, "pool_mib": 2048,
           "sizes": GPU_SIZES[:2] if q else GPU_SIZES, "eager_sizes": GPU_SIZES[:2]}
    out_dir = Path(args.out)
    started = time.perf_counter()
    res = {"command": "python " + " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "config": cfg,
           "backend": "cupy", "machine": {**machine_info(), **gpu_info()}}
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
    #    proposes the target's own greedy tokens, all of them or 90% (adaptive_bench.py).
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


# --- main ----------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_out", help="where bench.json, the CSVs and summary.md go")
    p.add_argument("--quick", action="store_true", help="fewer tokens, K values and repetitions (~1 min)")
    p.add_argument("--models_dir", default=None, help="where official weights are looked for (default weights/)")
    p.add_argument("--adaptive", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="run the adaptive-K vs fixed-K benchmark instead (gpt2_numpy/adaptive_bench.py; "
                        "ARGS go to it, e.g. --adaptive --help)")
    p.add_argument("--plot", metavar="OUT_DIR",
                   help="only draw the figures from OUT_DIR/bench.json and OUT_DIR/adaptive.json")
    p.add_argument("--img", default=str(Path(__file__).resolve().parent / "img"), help="where --plot writes")
    p.add_argument("--backend", choices=["numpy", "cupy"], default="numpy",
                   help="cupy: the GPU run instead (decoding with and without CUDA graphs, r(T), "
                        "speculative decoding; random weights)")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: "
                   "knobs,speculative,breakdown,no_cache,memory,blas,transformers")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    p.add_argument("--_args", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if args._worker:
        WORKERS[args._worker](json.loads(args._args))
        return 0
    if args.plot:
        plot(Path(args.plot), Path(args.img))
        return 0
    if args.adaptive is not None:
        from gpt2_numpy import adaptive_bench

        return adaptive_bench.main(args.adaptive + (["--backend", args.backend]
                                                    if args.backend != "numpy" else []))
    if args.backend == "cupy":
        return gpu_main(args)

    q = args.quick
    cfg = {"prompt": 64, "ar_tokens": 24 if q else 64, "ar_reps": 2 if q else 3,
           "spec_tokens": 16 if q else 24, "spec_reps": 1 if q else 2,
           "Ks": [1, 4] if q else list(range(1, 9)), "Ts": list(range(1, 10)),
           "reps": 3 if q else 7, "pool_mib": 1024,
           "positions": [16, 128] if q else [16, 64, 128, 256, 512], "nc_reps": 2,
           "hf_sizes": [DRAFT_SIZE] if q else [DRAFT_SIZE, TARGET_SIZE]}
    skip = set(filter(None, args.skip.split(",")))
    if q:
        skip |= {"knobs", "blas"}  # the full run has them
    out_dir = Path(args.out)
    started = time.perf_counter()
    res = {"command": "python " + " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "config": cfg,
           "machine": machine_info()}
    m = res["machine"]
    print(f"machine: {m.get('cpu')}, {m['cpus']} CPUs, NumPy {m['numpy']}, BLAS {m.get('blas')}, "
          f"OpenBLAS core {m.get('openblas_core')}", flush=True)

    def checkpoint(section):
        res["total_seconds"] = time.perf_counter() - started
        save(res, out_dir)
        print(f"-- {section} done at {res['total_seconds']:.0f} s", flush=True)

    # 0. Memory and loading, in a fresh process started while this one is still small: Linux
    #    hands a child spawned from a big process that process's peak RSS (getrusage).
    if "memory" not in skip:
        res["memory"] = memory_section(args.models_dir)
        print_row("memory", {k: v for k, v in res["memory"].items()})
        checkpoint("memory")

    # Models: official weights where present, else random ones (seed 0 target, seed 1 draft).
    import gpt2_numpy as gpt2

    target, t_label, _ = get_model(TARGET_SIZE, args.models_dir, seed=0)
    draft, d_label, _ = get_model(DRAFT_SIZE, args.models_dir, seed=1)
    res["weights"] = {TARGET_SIZE: t_label, DRAFT_SIZE: d_label}
    models = {TARGET_SIZE: (target, t_label), DRAFT_SIZE: (draft, d_label)}
    prompt = prompt_ids(target, cfg["prompt"])
    for model, _ in models.values():  # page every weight in before anything is timed
        model(prompt[:1], model.new_cache(1))

    # 1. Bandwidth and the floor; 2. autoregressive decoding; bandwidth again, to catch drift.
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
    res["what_if"] = [{"acceptance": a, "K": K, "formula": expected_tokens(a, K) / (K * res["c"] + r_target[K + 1]),
                       "with_catch_up": predicted_steady(a, K, res["c"], res["c2"], r_target),
                       "if_verify_were_free": expected_tokens(a, K) / (K * res["c"] + 1),
                       "weights": f"prediction from measured c and r ({t_label}); acceptance assumed"}
                      for a in (0.6, 0.7, 0.8, 0.9, 1.0) for K in range(1, max(cfg["Ts"]))]
    checkpoint("r(T)")

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
    if "breakdown" not in skip:
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
            row = {"setting": setting, "weights": RANDOM, **run_worker("blas", {"reps": 3}, env)}
            res["blas"].append(row)
            print_row("blas", row)
        checkpoint("blas")
    if "transformers" not in skip:
        threads = next((d.get("num_threads") for d in m["threadpoolctl"] if isinstance(d, dict)),
                       None) if isinstance(m.get("threadpoolctl"), list) else None
        res["transformers"] = transformers_section(
            res, {"sizes": cfg["hf_sizes"], "prompt": cfg["prompt"], "tokens": cfg["ar_tokens"],
                  "reps": 2, "threads": threads or N_CPU})
    checkpoint("all")
    print(f"\nwrote {out_dir}/bench.json, *.csv, summary.md; figures: python bench.py --plot {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
