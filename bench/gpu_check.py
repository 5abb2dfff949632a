"""The GPU check: everything worth knowing about the GPU twin, in one command of a few minutes.

    python -m bench gpu-check --out DIR

On a machine with an NVIDIA GPU and CuPy it runs, in this order, each section bounded in time:
    shapes       tests/test_cupy_shapes.py: the kernels on every official shape, a 1,024-row
                 cache, chunked forwards replayed back to back, 774M and 1558M greedy tokens
    tests        tests/test_cupy.py and tests/test_cupy_kernels.py on the GPU
    decode       ms/token of greedy decoding for 124M and 355M (random weights in the official
                 shapes): unfused and fused forwards, float32 / float16 / bfloat16, each against
                 its memory floor (bytes a step reads / the measured streaming rate)
    peer         Hugging Face transformers generate() on the same GPU and shapes: default cache
                 and static cache (float32, and bfloat16 with the static cache)
    r_of_T       the cost of a forward over T new tokens relative to one (fused, float32)
    speculative  1558M target / 124M draft, every draft right (scripted), K = 1..8 vs plain
    overhead     the host time a plain round of the speculative decoder adds over a plain step
    kernels      each fused kernel of a 355M step timed alone, weights read from memory
    adaptive     the adaptive-K benchmark (python -m bench adaptive --backend cupy), shortened
    anchor       a plain PyTorch CUDA-graph step, if ../shared/tools/torch_graph_anchor.py or
                 .gpu_carry/torch_graph_anchor.py is there
    host         the host time per token alone, with a model that costs nothing (bench/host.py)
and writes DIR/gpu_check.json and DIR/gpu_check.md (the goal table first).
"""
import argparse
import contextlib
import cProfile
import io
import json
import platform
import pstats
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

import gpt2_numpy as gpt2

ROOT = Path(__file__).resolve().parent.parent

SIZES = ["124M", "355M"]
SPEC = ["1558M"]  # the speculative section's target (124M drafts)
PEER_CACHES = ["default", "static"]  # transformers' caches timed (default: float32 only)
PROMPT, N_TOKENS, REPS = 64, 64, 3
SPEC_TOKENS = 96  # tokens per run in the speculative and overhead sections


def log(*args):
    print(*args, flush=True)


def sync():
    import cupy as cp

    cp.cuda.Device().synchronize()


def device_random_params(hparams, seed, scale=0.02):
    """gpt2_numpy.load.random_params, drawn on the GPU (seconds instead of a minute for 1558M)."""
    import cupy as cp

    rng = cp.random.default_rng(seed)
    d, V = hparams["n_embd"], hparams["n_vocab"]

    def normal(*shape):
        return rng.standard_normal(shape, dtype=cp.float32) * cp.float32(scale)

    def ln():
        return {"g": 1 + normal(d), "b": normal(d)}

    def dense(n_in, n_out):
        return {"w": normal(n_in, n_out), "b": normal(n_out)}

    blocks = [{"ln_1": ln(), "attn": {"c_attn": dense(d, 3 * d), "c_proj": dense(d, d)},
               "ln_2": ln(), "mlp": {"c_fc": dense(d, 4 * d), "c_proj": dense(4 * d, d)}}
              for _ in range(hparams["n_layer"])]
    return {"wte": normal(V, d), "wpe": normal(hparams["n_ctx"], d), "blocks": blocks, "ln_f": ln()}


def streamed_bytes(params) -> int:
    """Bytes one decoding step reads: every parameter, but one row of wpe."""
    total = 0

    def walk(node):
        nonlocal total
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        else:
            total += node.nbytes
    walk(params)
    wpe = params["wpe"]
    return total - wpe.nbytes + wpe.nbytes // wpe.shape[0]


def make_model(size, seed=0, dtype="float32", fused=True, graphs=True, params=None):
    import gpt2_cupy

    h = gpt2.official_hparams(size)
    params = params if params is not None else device_random_params(h, seed)
    return gpt2_cupy.GPT2(h, params, name=size, graphs=graphs, fused=fused, dtype=dtype)


def ms_per_token(model, prompt, n=N_TOKENS, reps=REPS):
    """Greedy decoding of n tokens: the fastest of reps runs, after warm_up (graphs recorded)."""
    model.warm_up(len(prompt) + n - 1)
    runs = [gpt2.autoregressive_sample(model, prompt, n, gpt2.Warp(0.0))[1] for _ in range(reps)]
    return min(1e3 * s.decode_seconds / s.n_generated for s in runs)


def bandwidth() -> dict:
    """The streaming rate that makes the floor: one row times one 2 GiB matrix (cuBLAS GEMV),
    and a device-to-device copy (bytes read + written)."""
    import cupy as cp

    big = cp.full((2**29 // 8192, 8192), 0.5, dtype=cp.float32)  # 2 GiB
    x = cp.ones((1, big.shape[0]), dtype=cp.float32)
    best = float("inf")
    for _ in range(5):
        sync()
        t = time.perf_counter()
        for _ in range(5):
            x @ big
        sync()
        best = min(best, (time.perf_counter() - t) / 5)
    dst = cp.empty_like(big)
    sync()
    t = time.perf_counter()
    for _ in range(5):
        cp.copyto(dst, big)
    sync()
    copy = 2 * big.nbytes * 5 / (time.perf_counter() - t)
    out = {"gemv_GB_per_s": big.nbytes / best / 1e9, "copy_GB_per_s": copy / 1e9}
    del big, dst
    return out


def run_tests(res, out_dir, key, files, timeout):
    """pytest on `files` in a fresh process; res[key]: its summary line and failures."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    text = proc.stdout + proc.stderr
    (out_dir / f"gpu_{key}.log").write_text(text)
    summary = [line for line in text.splitlines() if " passed" in line or " failed" in line
               or " error" in line]
    res[key] = {"returncode": proc.returncode, "summary": summary[-1] if summary else text[-500:],
                "failures": [line for line in text.splitlines() if line.startswith("FAILED")
                             or line.startswith("ERROR")][:40]}
    log(f"{key}:", res[key]["summary"])
    for line in res[key]["failures"]:
        log("  ", line)


def section_shapes(res, out_dir):
    # ~60 s on an H100 (docs/gpu.md): the kernels' compilation, then cached for `tests`
    run_tests(res, out_dir, "shapes", ["tests/test_cupy_shapes.py"], timeout=150)


def section_tests(res, out_dir):
    run_tests(res, out_dir, "tests", ["tests/test_cupy_kernels.py", "tests/test_cupy.py"], timeout=180)


def section_decode(res, out_dir):
    gbps = res["bandwidth"]["gemv_GB_per_s"]
    rows = []
    for size in SIZES:
        h = gpt2.official_hparams(size)
        params = device_random_params(h, 0)
        prompt = np.random.default_rng(0).integers(0, h["n_vocab"], PROMPT).tolist()
        variants = [("unfused, graphs", "float32", False, True),
                    ("fused, eager", "float32", True, False),
                    ("fused, graphs", "float32", True, True),
                    ("fused, graphs", "float16", True, True),
                    ("fused, graphs", "bfloat16", True, True)]
        tokens = {}
        for how, dtype, fused, graphs in variants:
            model = make_model(size, dtype=dtype, fused=fused, graphs=graphs, params=params)
            ms = ms_per_token(model, prompt, reps=2 if not graphs else REPS)
            floor = 1e3 * streamed_bytes(model.params) / gbps / 1e9
            ids = gpt2.autoregressive_sample(model, prompt, 16, gpt2.Warp(0.0))[0]
            tokens[(how, dtype)] = ids
            row = {"size": size, "forward": how, "dtype": dtype, "ms_per_token": ms,
                   "floor_ms": floor, "ratio_to_floor": ms / floor,
                   "same_tokens_as_unfused_fp32": ids == tokens.get(("unfused, graphs", "float32"))}
            rows.append(row)
            log(f"decode {size} {how} {dtype}: {ms:.3f} ms/token, floor {floor:.3f}, "
                f"{ms / floor:.2f}x, tokens as unfused fp32: {row['same_tokens_as_unfused_fp32']}")
            del model
        del params
    res["decode"] = rows


def section_peer(res, out_dir):
    import torch
    import transformers

    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for size in SIZES:
        h = gpt2.official_hparams(size)
        config = transformers.GPT2Config(vocab_size=h["n_vocab"], n_positions=h["n_ctx"],
                                         n_embd=h["n_embd"], n_layer=h["n_layer"], n_head=h["n_head"])
        for dtype_name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            with torch.device("cuda"):
                model = transformers.GPT2LMHeadModel(config).eval().to(dtype)
            ids = torch.tensor([np.random.default_rng(0).integers(0, h["n_vocab"], PROMPT).tolist()],
                               device="cuda")
            caches = [c for c in PEER_CACHES if c == "static" or dtype_name == "float32"]
            for cache in caches:
                kwargs = {} if cache == "default" else {"cache_implementation": "static"}

                def generate(n):
                    with torch.no_grad():
                        torch.cuda.synchronize()
                        t = time.perf_counter()
                        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                             max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                             pad_token_id=h["n_vocab"] - 1, **kwargs)
                        torch.cuda.synchronize()
                        assert out.shape[1] == PROMPT + n
                        return time.perf_counter() - t
                try:
                    generate(4)
                    one = min(generate(1) for _ in range(2))
                    full = min(generate(N_TOKENS + 1) for _ in range(2))
                    ms = 1e3 * (full - one) / N_TOKENS
                except Exception as e:  # a transformers version without it, say
                    log(f"peer {size} {dtype_name} {cache}: failed: {type(e).__name__}: {e}")
                    continue
                ours = [r for r in res.get("decode", []) if r["size"] == size
                        and r["dtype"] == dtype_name and r["forward"] == "fused, graphs"]
                row = {"size": size, "dtype": dtype_name, "cache": cache, "ms_per_token": ms,
                       "ours_ms_per_token": ours[0]["ms_per_token"] if ours else None}
                row["ours_over_theirs"] = row["ours_ms_per_token"] / ms if ours else None
                rows.append(row)
                log(f"peer {size} {dtype_name} {cache} cache: {ms:.3f} ms/token; ours/theirs "
                    f"{row['ours_over_theirs']}")
            del model
            torch.cuda.empty_cache()
    res["peer"] = {"torch": torch.__version__, "transformers": transformers.__version__, "rows": rows}


def forward_ms(model, n_past, T, reps=30):
    ids = list(range(1, n_past + T + 1))
    cache = model.new_cache(n_past + 16)
    model(ids[:n_past], cache, n_logits=0)
    samples = []
    for _ in range(reps):
        cache.rollback(n_past)
        sync()
        t = time.perf_counter()
        model(ids[n_past : n_past + T], cache, n_logits=T)
        sync()
        samples.append(time.perf_counter() - t)
    return 1e3 * float(np.median(samples))


def section_r_of_T(res, out_dir, models):
    rows = []
    for size, model in models.items():
        model.warm_up(PROMPT + 16)
        t1 = forward_ms(model, PROMPT, 1)
        for T in list(range(1, 10)) + [16]:
            ms = forward_ms(model, PROMPT, T)
            rows.append({"size": size, "T": T, "ms": ms, "r": ms / t1})
        log(f"r(T) {size}: " + " ".join(f"{r['T']}:{r['r']:.2f}" for r in rows if r["size"] == size))
    res["r_of_T"] = rows


def section_speculative(res, out_dir, models):
    from bench.adaptive import ScriptedDrafter

    target, draft = models[SPEC[0]], models["124M"]
    prompt = np.random.default_rng(0).integers(0, target.n_vocab, PROMPT).tolist()
    n = SPEC_TOKENS
    for m in (target, draft):
        m.warm_up(len(prompt) + n - 1)
    script, _ = gpt2.autoregressive_sample(target, prompt, n, gpt2.Warp(0.0))
    rows = []
    for K in range(1, 9):
        ar = min(gpt2.autoregressive_sample(target, prompt, n, gpt2.Warp(0.0))[1].decode_seconds
                 for _ in range(2))
        runs = [gpt2.speculative_sample(target, ScriptedDrafter(draft, script, len(prompt), 0.0),
                                        prompt, n, K, gpt2.Warp(0.0)) for _ in range(2)]
        assert all(ids == script for ids, _ in runs)
        sp = min(s.decode_seconds for _, s in runs)
        rows.append({"pair": f"{SPEC[0]}/124M, every draft right", "K": K, "ar_ms_per_token": 1e3 * ar / n,
                     "ms_per_token": 1e3 * sp / n, "speedup": ar / sp})
        log(f"speculative {SPEC[0]}/124M a=1 K={K}: {ar / sp:.2f}x ({1e3 * sp / n:.3f} vs "
            f"{1e3 * ar / n:.3f} ms/token)")
    res["speculative"] = rows


class PlainOnly(gpt2.AdaptiveK):
    """A K policy that never drafts: every round is a plain target step, and nothing learnt."""

    def next_K(self):
        return 0

    def update(self, *round):
        pass


def section_overhead(res, out_dir, models):
    """What a plain round of speculative_sample costs over a plain autoregressive step, and where
    the host time of each goes (cProfile of both)."""
    target = models[SIZES[-1]]
    prompt = np.random.default_rng(0).integers(0, target.n_vocab, PROMPT).tolist()
    n = SPEC_TOKENS
    target.warm_up(len(prompt) + n - 1)
    draft = models["124M"]
    draft.warm_up(len(prompt) + n - 1)
    ar = [gpt2.autoregressive_sample(target, prompt, n, gpt2.Warp(0.0))[1].decode_seconds for _ in range(3)]
    pl = [gpt2.adaptive_speculative_sample(target, draft, prompt, n, PlainOnly(1),
                                           gpt2.Warp(0.0))[1].decode_seconds for _ in range(3)]
    ad = [gpt2.adaptive_speculative_sample(target, draft, prompt, n, gpt2.AdaptiveK(8),
                                           gpt2.Warp(0.0))[1] for _ in range(3)]
    profiles = {}
    for name, fn in (("autoregressive", lambda: gpt2.autoregressive_sample(target, prompt, n, gpt2.Warp(0.0))),
                     ("plain rounds", lambda: gpt2.adaptive_speculative_sample(target, draft, prompt, n, PlainOnly(1), gpt2.Warp(0.0)))):
        prof = cProfile.Profile()
        prof.enable()
        fn()
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(14)
        profiles[name] = s.getvalue()
    (out_dir / "overhead_profiles.txt").write_text("\n\n".join(f"== {k}\n{v}" for k, v in profiles.items()))
    res["overhead"] = {"ar_ms_per_token": 1e3 * min(ar) / n, "plain_rounds_ms_per_token": 1e3 * min(pl) / n,
                       "plain_over_ar": min(pl) / min(ar),
                       "adaptive_unrelated_ms_per_token": 1e3 * min(s.decode_seconds for s in ad) / n,
                       "adaptive_unrelated_over_ar": min(s.decode_seconds for s in ad) / min(ar),
                       "adaptive_K_per_round": np.bincount(ad[0].K_per_round).tolist()}
    log("overhead:", json.dumps(res["overhead"]))


def section_host(res):
    from bench.host import host_section

    res["host"] = host_section(n_tokens=300, reps=3)
    log(res["host"]["markdown"])


def section_adaptive(res, out_dir):
    from bench import adaptive

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        adaptive.main(["--backend", "cupy", "--repeats", "2", "--stakes", "1", "0.5",
                       "--out", str(out_dir)])
    text = buf.getvalue()
    log(text)
    res["adaptive_table"] = text
    path = out_dir / "adaptive.json"
    if path.exists():
        res["adaptive"] = json.loads(path.read_text())


def graph_us(fn, n=100):
    """Microseconds per call of fn, n calls recorded in one CUDA graph and replayed (what a
    kernel costs inside a graphed step, launch gaps included)."""
    import cupy as cp

    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        fn()
        stream.begin_capture()
        for _ in range(n):
            fn()
        graph = stream.end_capture()
        graph.launch()
        stream.synchronize()
        best = float("inf")
        for _ in range(5):
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record(stream)
            graph.launch()
            end.record(stream)
            end.synchronize()
            best = min(best, cp.cuda.get_elapsed_time(start, end) * 1e3 / n)
    return best


def section_kernels(res, out_dir):
    """Where a fused step's time goes: each kernel of a 355M step timed alone (in a graph),
    with the bytes it must read and the rate that makes; the cuBLAS product for contrast."""
    import cupy as cp

    from gpt2_cupy import fused
    from gpt2_cupy.graphs import CuBLAS

    rows = []
    for size in (SIZES[-1],):
        h = gpt2.official_hparams(size)
        d, H, V, L = h["n_embd"], h["n_head"], h["n_vocab"], h["n_layer"]
        for dtype in ("float32", "bfloat16"):
            kern = fused.Kernels(dtype)
            ws = fused.Workspace(h, kern)
            wbytes = 4 if dtype == "float32" else 2
            rng = cp.random.default_rng(0)

            def weights(n, m):
                return fused.convert_weights({"wte": rng.standard_normal((n, m), dtype=cp.float32) * 0.02,
                                              "wpe": cp.zeros((1, m), cp.float32), "blocks": []}, dtype)["wte"]

            def rotating(n, m):
                """Copies of one weight shape, more bytes than the L2 cache holds, used in
                turn: each launch reads its weights from memory, as in a real step."""
                copies = [weights(n, m) for _ in range(max(2, -(-120 * 2**20 // (n * m * wbytes))))]
                state = {"i": 0}

                def next_copy():
                    state["i"] = (state["i"] + 1) % len(copies)
                    return copies[state["i"]]
                return next_copy
            for T in (1, 4):
                x = rng.standard_normal((T, d), dtype=cp.float32)
                x4 = rng.standard_normal((T, 4 * d), dtype=cp.float32)
                ln = {"g": cp.ones(d, cp.float32), "b": cp.zeros(d, cp.float32)}
                qkv = rng.standard_normal((T, 3 * d), dtype=cp.float32)
                out_d, out_3d, out_4d = (cp.empty((T, k * d), cp.float32) for k in (1, 3, 4))
                w_qkv, w_proj, w_fc, w_fc2 = rotating(d, 3 * d), rotating(d, d), rotating(d, 4 * d), rotating(4 * d, d)
                wte = weights(V, d)
                kc = cp.zeros((H, 1024, d // H), cp.float32)
                vc = cp.zeros((H, 1024, d // H), cp.float32)
                pos = cp.arange(95, 95 + T, dtype=cp.int64)
                logits = cp.empty((T, V), cp.float32)
                b3, b1, b4 = (cp.zeros(k * d, cp.float32) for k in (3, 1, 4))
                per_layer = [
                    ("gemv qkv + LN", d * 3 * d, lambda: kern.gemv(x, w_qkv(), b3, out_3d, ws, ln=ln)),
                    ("attention L=96", 0, lambda: kern.attention(qkv, kc, vc, pos, out_d)),
                    ("gemv attn proj + residual", d * d, lambda: kern.gemv(x, w_proj(), b1, out_d, ws, fused.ADD_RESIDUAL)),
                    ("gemv fc + LN + gelu", d * 4 * d, lambda: kern.gemv(x, w_fc(), b4, out_4d, ws, fused.GELU, ln=ln)),
                    ("gemv mlp proj + residual", 4 * d * d, lambda: kern.gemv(x4, w_fc2(), b1, out_d, ws, fused.ADD_RESIDUAL))]
                once = [("layer_norm (ln_f)", 0, lambda: kern.layer_norm(x, ln["g"], ln["b"], out_d)),
                        ("lm_head", V * d, lambda: kern.lm_head(x, wte, logits)),
                        ("embed", 0, lambda: kern.embed(wte, wte, pos, pos, out_d))]
                step = 0.0
                for name, n_weights, fn in per_layer + once:
                    us = graph_us(fn)
                    count = L if (name, n_weights, fn) in per_layer else 1
                    step += us * count
                    row = {"size": size, "dtype": dtype, "T": T, "kernel": name, "us": us,
                           "per_step": count, "GB_per_s": n_weights * wbytes / us / 1e3 if n_weights else None}
                    rows.append(row)
                    log(f"kernel {size} {dtype} T={T} {name}: {us:.2f} us x{count}"
                        + (f", {row['GB_per_s']:.0f} GB/s" if n_weights else ""))
                rows.append({"size": size, "dtype": dtype, "T": T, "kernel": "sum of the above per step",
                             "us": step, "per_step": 1, "GB_per_s": None})
                log(f"kernel {size} {dtype} T={T} sum per step: {step / 1e3:.3f} ms")
                if dtype == "float32":
                    cublas = CuBLAS()
                    for w, xin in zip([w_qkv, w_proj, w_fc, w_fc2], [x, x, x, x4]):
                        shape = w().shape
                        us = graph_us(lambda: cublas.matmul(xin, w()))
                        nbytes = shape[0] * shape[1] * 4
                        rows.append({"size": size, "dtype": dtype, "T": T, "kernel": f"cuBLAS {shape}",
                                     "us": us, "per_step": L, "GB_per_s": nbytes / us / 1e3})
                        log(f"kernel {size} cuBLAS T={T} {shape}: {us:.2f} us, {nbytes / us / 1e3:.0f} GB/s")
    res["kernels"] = rows


def section_anchor(res, out_dir):
    for path in (ROOT.parent / "shared/tools/torch_graph_anchor.py", ROOT / ".gpu_carry/torch_graph_anchor.py"):
        if path.exists():
            proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120)
            res["anchor"] = proc.stdout[-4000:] + proc.stderr[-2000:]
            log(res["anchor"])
            return
    res["anchor"] = "torch_graph_anchor.py not found"


def goal_table(res) -> str:
    dec = {(r["size"], r["forward"], r["dtype"]): r for r in res.get("decode", [])}
    peer = {(r["size"], r["dtype"], r["cache"]): r for r in res.get("peer", {}).get("rows", [])}
    lines = ["| figure | goal | measured |", "|---|---|---|"]

    def cell(row, key, fmt="{:.2f}"):
        return fmt.format(row[key]) if row and row.get(key) is not None else "-"
    for size, goal in (("355M", "<= 2.5"), ("124M", "<= 3.5")):
        r = dec.get((size, "fused, graphs", "float32"))
        lines.append(f"| {size} fp32 decode ms/token / floor | {goal} | {cell(r, 'ratio_to_floor')} "
                     f"({cell(r, 'ms_per_token', '{:.3f}')} ms, floor {cell(r, 'floor_ms', '{:.3f}')} ms) |")
    for size in SIZES:
        r = peer.get((size, "float32", "static"))
        lines.append(f"| ours / transformers static cache, {size} fp32 | <= 0.4 | {cell(r, 'ours_over_theirs')} |")
    for dtype in ("float16", "bfloat16"):
        r = dec.get(("355M", "fused, graphs", dtype))
        lines.append(f"| 355M {dtype} decode / its floor | <= 3 | {cell(r, 'ratio_to_floor')} |")
    spec = res.get("speculative", [])
    if spec:
        best = max(spec, key=lambda r: r["speedup"])
        lines.append(f"| 1558M/124M every draft right, best K | >= 2.5x | {best['speedup']:.2f}x (K={best['K']}) |")
    for title, vs_ar, vs_best in adaptive_ratios(res):
        goal = ">= 0.95 of the best" if "10%" in title else ">= 0.95x autoregressive"
        lines.append(f"| adaptive K, {title} | {goal} | {vs_ar:.2f}x autoregressive, "
                     f"{vs_best:.2f} of the best |")
    return "\n".join(lines)


def adaptive_ratios(res):
    """(situation, adaptive / autoregressive, adaptive / the best fixed K or autoregressive) for
    each adaptive row (one per stake) of each situation of the adaptive section but draft ==
    target."""
    out = []
    for situation in res.get("adaptive", {}).get("situations", []):
        rows = situation["rows"]
        if "acceptance 1" in situation["title"]:
            continue
        fixed = [r for r in rows if r["K"] != "adaptive"]  # autoregressive first
        for r in rows:
            if r["K"] == "adaptive":
                stake = "" if r.get("stake") in (None, 1.0) else f", stake {r['stake']:g}"
                out.append((situation["title"] + stake, r["tps"] / fixed[0]["tps"],
                            r["tps"] / max(f["tps"] for f in fixed)))
    return out


def write(res, out_dir):
    (out_dir / "gpu_check.json").write_text(json.dumps(res, indent=1, default=str))
    md = [f"# GPU check: {res.get('gpu', '?')}", "", f"command: `{res['command']}`", "",
          goal_table(res), ""]
    for key in ("shapes", "tests", "bandwidth", "overhead"):
        if key in res:
            md += [f"## {key}", "```", json.dumps(res[key], indent=1, default=str), "```", ""]
    if isinstance(res.get("host"), dict):  # the section's result (before it: the host's CPU)
        md += ["## host", f"host time per token, zero-cost model ({res['host']['cpu']})", "",
               res["host"]["markdown"], ""]
    for key in ("decode", "peer", "r_of_T", "speculative", "kernels"):
        rows = res.get(key, {}).get("rows") if key == "peer" else res.get(key)
        if rows:
            cols = list(rows[0])
            md += [f"## {key}", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            md += ["| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c])
                                     for c in cols) + " |" for r in rows]
            md.append("")
    if "adaptive_table" in res:
        md += ["## adaptive", res["adaptive_table"], ""]
    md += ["## sections", "```", json.dumps(res["sections"], indent=1), "```"]
    (out_dir / "gpu_check.md").write_text("\n".join(md))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_out/gpu_check")
    p.add_argument("--skip", default="", help="comma-separated sections to skip")
    p.add_argument("--budget", type=float, default=300, help="seconds; later sections are skipped past it")
    p.add_argument("--sizes", default="124M,355M", help="model sizes of the decode and peer tables")
    p.add_argument("--spec_target", default="1558M", help="the speculative section's target")
    p.add_argument("--peer_caches", default="default,static",
                   help="transformers' caches to time: default (float32 only), static")
    args = p.parse_args(argv)
    PEER_CACHES[:] = args.peer_caches.split(",")
    SIZES[:] = args.sizes.split(",")
    SPEC[0] = args.spec_target
    try:
        import cupy as cp

        props = cp.cuda.runtime.getDeviceProperties(0)
    except Exception as e:
        print(f"error: the GPU check needs CuPy and an NVIDIA GPU ({type(e).__name__}: {e})",
              file=sys.stderr)
        return 2
    import gpt2_cupy
    from gpt2_cupy import graphs

    graphs.FUSED_BY_DEFAULT = True  # the adaptive section's models
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    started = time.perf_counter()
    res = {"command": "python -m bench gpu-check " + " ".join(argv or sys.argv[1:]),
           "gpu": props["name"].decode(), "cupy": cp.__version__,
           "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
           "driver": cp.cuda.runtime.driverGetVersion(), "host": platform.processor(),
           "sections": {}}
    log(f"{res['gpu']}, CuPy {res['cupy']}, CUDA runtime {res['cuda_runtime']}, driver {res['driver']}")
    res["bandwidth"] = bandwidth()
    log("bandwidth:", res["bandwidth"])
    models = {}

    def get_models():
        if not models:
            for i, size in enumerate(dict.fromkeys(["124M", SIZES[-1], SPEC[0]])):
                models[size] = make_model(size, seed=i)
        return models
    sections = [("shapes", lambda: section_shapes(res, out_dir)),
                ("tests", lambda: section_tests(res, out_dir)),
                ("decode", lambda: section_decode(res, out_dir)),
                ("peer", lambda: section_peer(res, out_dir)),
                ("r_of_T", lambda: section_r_of_T(res, out_dir, get_models())),
                ("speculative", lambda: section_speculative(res, out_dir, get_models())),
                ("overhead", lambda: section_overhead(res, out_dir, get_models())),
                ("kernels", lambda: section_kernels(res, out_dir)),
                ("adaptive", lambda: section_adaptive(res, out_dir)),
                ("anchor", lambda: section_anchor(res, out_dir)),
                ("host", lambda: section_host(res))]
    for name, fn in sections:
        elapsed = time.perf_counter() - started
        if name in skip or elapsed > args.budget:
            res["sections"][name] = "skipped" if name in skip else f"skipped: past the budget at {elapsed:.0f} s"
            continue
        t = time.perf_counter()
        try:
            fn()
            res["sections"][name] = f"ok in {time.perf_counter() - t:.1f} s"
        except Exception as e:
            res["sections"][name] = f"failed after {time.perf_counter() - t:.1f} s: {type(e).__name__}: {e}"
            with open(out_dir / "errors.txt", "a") as f:
                f.write(f"== {name}\n{traceback.format_exc()}\n")
            log(traceback.format_exc())
        log(f"-- {name}: {res['sections'][name]} (total {time.perf_counter() - started:.0f} s)")
        write(res, out_dir)
    write(res, out_dir)
    log(goal_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
