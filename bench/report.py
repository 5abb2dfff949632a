"""The benchmark's output: rows as they are measured, CSV files, and the Markdown summary."""
import csv
import json
import sys
from pathlib import Path

from .models import DRAFT_SIZE, RANDOM, TARGET_SIZE


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
    if "plans" in res:
        out += ["", "### The products' plans (products.attach: kept per machine and shape)", ""]
        out += [f"- {name}: {p['plan']} (warm_up {p['warm_up_seconds']:.1f} s)"
                for name, p in res["plans"].items()]
    if res.get("strategies"):
        out += ["", "### r(T) three ways: one product over the rows padded to 8, the measured plan, "
                    "T one-row products", "",
                md_table(res["strategies"], [
                    ("model", "model", None), ("T", "T", None), ("plan", "plan", None),
                    ("r, padded", "r_padded", "{:.2f}"), ("r, plan", "r_plan", "{:.2f}"),
                    ("r, rows", "r_rows", "{:.2f}"), ("ms, plan", "ms_plan", "{:.1f}"),
                    ("foreign CPU (max)", "max_foreign", "{:.0%}")])]
    if isinstance(res.get("threads"), list):
        out += ["", "### One BLAS thread against two (random weights)", "",
                md_table(res["threads"], [
                    ("model", "model", None), ("part", "part", None), ("threads", "threads", None),
                    ("ms", "ms", "{:.2f}"), ("speedup over 1 thread", "speedup_over_1_thread", "{:.2f}"),
                    ("foreign CPU (max)", "max_foreign", "{:.0%}")])]
    if "what_if" in res:
        Ks = sorted({r["K"] for r in res["what_if"]})
        intros = {
            "with_catch_up": ["### Predicted speedup of a 124M draft for this 355M target, if "
                              "acceptance were a", "(from the measured c, c2 and r(K+1); formula "
                              "with the draft's catch-up step)"],
            "if_verify_were_free": ["The same with a verify step as cheap as one decoding step, "
                                    "r(K+1) = 1 (what a GPU, or", "a BLAS whose few-row product is "
                                    "bandwidth-bound, would give), and the same c:"]}
        for key, intro in intros.items():
            out += ["", *intro, "", "| a | " + " | ".join(f"K={K}" for K in Ks) + " |",
                    "|---|" + "---|" * len(Ks)]
            for a in sorted({r["acceptance"] for r in res["what_if"]}):
                row = {r["K"]: r for r in res["what_if"] if r["acceptance"] == a}
                out.append(f"| {a:.1f} | " + " | ".join(f"{row[K][key]:.2f}" for K in Ks) + " |")
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
                                       ("T=1 ms", "ms_T1", "{:.1f}"),
                                       *((f"r({T})", lambda r, T=T: r[f"ms_T{T}"] / r["ms_T1"]
                                          if "ms_T1" in r else None, "{:.2f}") for T in (2, 3, 5, 8)),
                                       ("T=64 (a prefill) ms", "ms_T64", "{:.0f}"),
                                       ("plan", "plan", None),
                                       ("note", lambda r: r.get("error", ""), None)])]
    if "transformers" in res:
        t = res["transformers"]
        if "rows" in t:
            out += ["", f"### vs Hugging Face transformers {t['transformers']} (torch {t['torch']}, "
                        f"{t['torch_threads']} threads), random init, greedy generate(use_cache=True)", "",
                    md_table([r for r in t["rows"] if "error" not in r],
                             [("model", "model", None),
                              ("cache", lambda r: r.get("cache", "default"), None),
                              ("theirs ms/token", "ms_per_token", "{:.1f}"),
                              ("ours ms/token", "ours_ms_per_token", "{:.1f}"),
                              ("ours / theirs", "ours_over_theirs", "{:.2f}"),
                              ("weights", lambda r: RANDOM, None)])]
        else:
            out += ["", f"transformers: skipped ({t.get('skipped') or t.get('error')})"]
    return "\n".join(out) + "\n"


def save(res, out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(res, indent=1, default=str))
    for key in ("bandwidth", "autoregressive", "r_of_T", "strategies", "threads", "what_if", "knobs",
                "speculative", "breakdown", "no_cache", "blas"):
        if isinstance(res.get(key, []), list):
            write_csv(out_dir / f"{key}.csv", res.get(key, []))
    if "rows" in res.get("transformers", {}):
        write_csv(out_dir / "transformers.csv", res["transformers"]["rows"])
    if "memory" in res:
        write_csv(out_dir / "memory.csv", [{"size": s, **res["memory"][s]} for s in (TARGET_SIZE, DRAFT_SIZE)
                                           if s in res["memory"]])
    (out_dir / "summary.md").write_text(summary_markdown(res))


def bad_input(message: str):
    """A one-line error and exit status 2, as for any bad input."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
