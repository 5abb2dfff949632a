"""Token trees against chains: tokens per target forward, and the speedup each would give.

    python -m bench tree                             # ~5 min on a quiet 2-core machine
    python -m bench tree --cpu_costs performance.md  # this CPU's costs from docs/performance.md

Tokens per target forward (tau) is measured by decoding: greedy (T = 0) and sampled (T = 1)
runs of gpt2_numpy.speculative_sample (chains, K = 1..15) and gpt2_numpy.tree_speculative_sample
(every tree of non-increasing widths with at most 15 nodes), on 12 random 8-token prompts, 40
tokens each, for three pairs built from the test fixtures (genuine TF checkpoints):

    unrelated     tiny-3h drafting for tiny-4h (another architecture, other random weights)
    near          tiny-4h + N(0, 0.01^2) noise on every weight (bench/fidelity.py's noisy_copy)
    noisier       tiny-4h + N(0, 0.02^2) noise

A round with a tree of N nodes costs one target forward over N + 1 rows, r_t(N + 1), and one
draft forward per depth d over the nodes of depth d - 1 (one row for the root), each c r_d(n),
in units of a target forward over one row (c = draft step / target step). So, relative to
autoregressive decoding:

    speedup = tau / (c * sum_d r_d(n_{d-1}) + r_t(N + 1))

(for a chain, K c + r(K + 1), the formula of bench/cpu.py). The costs come from two machines:
    this CPU   r(T) measured here on random weights in the official 355M (target) and 124M
               (draft) shapes, at cache length 64, the best of several interleaved repetitions;
               or (--cpu_costs performance.md) docs/performance.md's table, T <= 9 only
    H100       the r(T) of docs/gpu.md (fused kernels, CUDA graphs), interpolated linearly
               between its T = 1, 2, 5, 9, 16, and c = 0.55 / 1.26 ms (124M / 355M, T = 1)
The tiny fixtures give the acceptance, the big shapes the costs: a prediction, labelled so.

It writes bench_out/tree.json and img/tree.png, and prints the tables of docs/tree.md.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import gpt2_numpy as gpt2
import numpy as np
from gpt2_numpy.products import attach
from gpt2_numpy.tree import tree_size

from . import ROOT, command
from .machine import machine_info
from .models import RANDOM, prompt_ids
from .timing import quiet_sample

FIXTURES = ROOT / "tests" / "fixtures"
H100_R = {"355M": {1: 1.0, 2: 1.07, 5: 1.18, 9: 1.68, 16: 2.06},  # docs/gpu.md, r(T) table
          "124M": {1: 1.0, 2: 1.07, 5: 1.32, 9: 2.01, 16: 2.56}}
H100_C = 0.55 / 1.26  # docs/gpu.md: 124M and 355M forwards over one token, ms
# docs/performance.md's r(T) table (python -m bench cpu, this 2-core machine when it was quiet):
# T = 1..9 only, so with these costs a prediction covers shapes whose forwards have <= 9 rows.
PERF_R = {"355M": dict(enumerate([1.00, 1.86, 1.88, 1.88, 1.89, 1.91, 1.92, 1.91, 2.23], 1)),
          "124M": dict(enumerate([1.00, 2.12, 2.12, 2.12, 2.12, 2.15, 2.17, 2.17, 2.47], 1))}
PERF_C = 19.4 / 53.8


EXTRA = [(2, 2, 2, 2)]  # 30 nodes: the tree, against the chain K = 4


def shapes(max_nodes: int, widest: int = 8):
    """Every widths tuple, non-increasing, of at most max_nodes nodes (chains included)."""
    def grow(prefix):
        for w in range(1, (prefix[-1] if prefix else widest) + 1):
            if tree_size(prefix + [w]) <= max_nodes:
                yield tuple(prefix + [w])
                yield from grow(prefix + [w])
    return sorted(grow([]), key=lambda s: (tree_size(s), s))


def is_chain(widths) -> bool:
    return all(w == 1 for w in widths)


def draft_rows(widths):
    """Rows of each draft forward of a round: 1 (the root), then the nodes of each depth but
    the deepest."""
    rows, level = [1], 1
    for w in widths[:-1]:
        level *= w
        rows.append(level)
    return rows


def round_cost(widths, r_target, r_draft, c):
    """A round's cost in target forwards over one row (None where a cost is unknown)."""
    parts = [r_draft(n) for n in draft_rows(widths)] + [r_target(tree_size(widths) + 1)]
    if None in parts:
        return None
    return c * sum(parts[:-1]) + parts[-1]


def interpolated(points: dict):
    """r(T) from measured points, linear in between (and beyond the last two)."""
    Ts = sorted(points)

    def r(T):
        for a, b in zip(Ts, Ts[1:]):
            if T <= b or b == Ts[-1]:
                return points[a] + (points[b] - points[a]) * (T - a) / (b - a)
    return r


def cpu_costs(Ts, reps, log):
    """r(T) of 355M and 124M on random weights here, and c: each repetition times every T of
    both models once, interleaved (after one untimed pass), a sample taken while other processes
    were busy retried once (bench/timing.py); the best of the repetitions counts."""
    models = {}
    for size in ("355M", "124M"):
        h = gpt2.official_hparams(size)
        models[size] = gpt2.GPT2(h, gpt2.random_params(h, seed=0), name=size)
        attach(models[size])  # the products' plan, as load_model attaches it
    n_past = 64
    caches, steps = {}, {}
    for size, model in models.items():
        ids = prompt_ids(model, n_past + max(Ts), seed=1)
        caches[size] = cache = model.new_cache(n_past + max(Ts))
        model(ids[:n_past], cache, n_logits=0)
        for T in Ts:
            def step(model=model, cache=cache, new=ids[n_past : n_past + T]):
                cache.rollback(n_past)
                model(new, cache, n_logits=len(new))
            steps[size, T] = step
            step()  # untimed: pages and buffers touched once
    samples = {key: [] for key in steps}
    for rep in range(reps):
        for key, step in steps.items():
            samples[key].append(quiet_sample(step, tries=2))
        log(f"  costs: repetition {rep + 1}/{reps}")
    best = {k: min(s for s, _ in v) for k, v in samples.items()}
    return {"r": {size: {T: best[size, T] / best[size, 1] for T in Ts} for size in models},
            "ms_T1": {size: 1e3 * best[size, 1] for size in models},
            "c": best["124M", 1] / best["355M", 1], "weights": RANDOM, "n_past": n_past,
            "reps": reps, "max_foreign_of_best": max(
                min(v)[1] for v in samples.values())}


def pairs():
    from .fidelity import noisy_copy

    target = gpt2.load_model(str(FIXTURES / "tiny-4h"), progress=False)
    draft = gpt2.load_model(str(FIXTURES / "tiny-3h"), progress=False)
    return target, {"unrelated (tiny-3h)": draft, "near (noise 0.01)": noisy_copy(target, 0.01),
                    "noisier (noise 0.02)": noisy_copy(target, 0.02)}


def tokens_per_forward(target, draft, widths, temperature, prompts, n_new) -> dict:
    """tau over all prompts (tokens / target forwards), and whether greedy text equalled the
    target's own (checked by the caller)."""
    tokens = rounds = 0
    outputs = []
    for i, prompt in enumerate(prompts):
        rng, warp = np.random.default_rng(i), gpt2.Warp(temperature)
        if is_chain(widths):
            ids, stats = gpt2.speculative_sample(target, draft, prompt, n_new, K=len(widths),
                                                 warp=warp, rng=rng)
        else:
            ids, stats = gpt2.tree_speculative_sample(target, draft, prompt, n_new, widths, warp, rng)
        tokens, rounds = tokens + stats.n_generated, rounds + stats.rounds
        outputs.append(ids)
    return {"tau": tokens / rounds, "outputs": outputs}


def measured_only(points: dict):
    """r(T) where it was measured, None beyond: no prediction for larger forwards."""
    return lambda T: points.get(T)


def measure(n_prompts, n_new, max_nodes, reps, log, cpu="measure"):
    if cpu == "measure":
        costs = cpu_costs(list(range(1, max_nodes + 2)), reps, log)
    else:  # the table of docs/performance.md
        costs = {"r": PERF_R, "c": PERF_C, "ms_T1": {"355M": 53.8, "124M": 19.4},
                 "weights": RANDOM, "n_past": 64, "source": "docs/performance.md"}
    machines = {"this CPU": (measured_only(costs["r"]["355M"]), measured_only(costs["r"]["124M"]),
                             costs["c"]),
                "H100": (interpolated(H100_R["355M"]), interpolated(H100_R["124M"]), H100_C)}
    target, drafts = pairs()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, target.n_vocab, 8).tolist() for _ in range(n_prompts)]
    greedy = [gpt2.autoregressive_sample(target, p, n_new)[0] for p in prompts]
    rows = []
    for pair, draft in drafts.items():
        for temperature in (0.0, 1.0):
            start = time.perf_counter()
            for widths in shapes(max_nodes) + EXTRA:
                m = tokens_per_forward(target, draft, widths, temperature, prompts, n_new)
                if temperature == 0:
                    assert m["outputs"] == greedy, (pair, widths)  # greedy: the target's text
                row = {"pair": pair, "temperature": temperature, "widths": list(widths),
                       "chain": is_chain(widths), "nodes": tree_size(widths),
                       "verify_rows": tree_size(widths) + 1, "tau": m["tau"]}
                for name, (r_t, r_d, c) in machines.items():
                    cost = round_cost(widths, r_t, r_d, c)
                    row[f"speedup {name}"] = None if cost is None else m["tau"] / cost
                rows.append(row)
            log(f"  {pair}, T = {temperature:g}: {time.perf_counter() - start:.0f} s")
    return {"costs": costs, "rows": rows, "n_prompts": n_prompts, "n_new": n_new,
            "h100": {"r": H100_R, "c": H100_C, "source": "docs/gpu.md"}}


def best(rows, key, chain=None, max_rows=None):
    rows = [r for r in rows if r[key] is not None and (chain is None or r["chain"] == chain)
            and (max_rows is None or r["verify_rows"] <= max_rows)]
    return max(rows, key=lambda r: r[key])


def shape(r) -> str:
    return f"K={len(r['widths'])}" if r["chain"] else ",".join(map(str, r["widths"]))


def tables(res) -> str:
    """The Markdown of docs/tree.md's results."""
    out = ["| pair | T | chain K=7 | best tree <= 8 rows | chain K=15 | best tree <= 16 rows |",
           "|---|---|---|---|---|---|"]
    groups = dict.fromkeys((r["pair"], r["temperature"]) for r in res["rows"])
    for pair, T in groups:
        rows = [r for r in res["rows"] if r["pair"] == pair and r["temperature"] == T]
        cells = []
        for n_rows in (8, 16):
            if n_rows > max(r["verify_rows"] for r in rows):  # --quick
                cells += ["", ""]
                continue
            chain = next(r for r in rows if r["chain"] and r["verify_rows"] == n_rows)
            tree = best(rows, "tau", chain=False, max_rows=n_rows)
            cells += [f"{chain['tau']:.2f}", f"{tree['tau']:.2f} ({shape(tree)}, "
                      f"{tree['tau'] / chain['tau']:.2f}x)"]
        out.append(f"| {pair} | {T:g} | " + " | ".join(cells) + " |")
    out += ["", "The issue's comparison, a 2,2,2,2 tree (31 verify rows) against the chain K = 4 "
            "(5 rows):", "", "| pair | T | K=4 | 2,2,2,2 | ratio |", "|---|---|---|---|---|"]
    for pair, T in groups:
        rows = [r for r in res["rows"] if r["pair"] == pair and r["temperature"] == T]
        chain = next(r for r in rows if r["chain"] and r["nodes"] == 4)
        tree = next(r for r in rows if r["widths"] == [2, 2, 2, 2])
        out.append(f"| {pair} | {T:g} | {chain['tau']:.2f} | {tree['tau']:.2f} | "
                   f"{tree['tau'] / chain['tau']:.2f}x |")
    for name in ("this CPU", "H100"):
        key = f"speedup {name}"
        out += ["", f"Predicted speedup over autoregressive, {name}'s costs (best shape of each kind):",
                "", "| pair | T | best chain | best tree | tree / chain |", "|---|---|---|---|---|"]
        for pair, T in groups:
            rows = [r for r in res["rows"] if r["pair"] == pair and r["temperature"] == T]
            chain, tree = best(rows, key, chain=True), best(rows, key, chain=False)
            out.append(f"| {pair} | {T:g} | {chain[key]:.2f}x ({shape(chain)}, tau "
                       f"{chain['tau']:.2f}) | {tree[key]:.2f}x ({shape(tree)}, tau "
                       f"{tree['tau']:.2f}) | {tree[key] / chain[key]:.2f} |")
    return "\n".join(out)


def plot(res, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["pair"], r["temperature"]) for r in res["rows"]))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for i, (pair, T) in enumerate(groups):
        rows = [r for r in res["rows"] if r["pair"] == pair and r["temperature"] == T
                and tuple(r["widths"]) not in EXTRA]
        style = dict(color=f"C{i // 2}", ls="-" if T == 0 else "--")
        label = f"{pair}, T={T:g}"
        chains = [r for r in rows if r["chain"]]
        n = sorted({r["verify_rows"] for r in rows})
        trees = [best(rows, "tau", chain=False, max_rows=k) if k > 2 else None for k in n]
        axes[0].plot([r["verify_rows"] for r in chains], [r["tau"] for r in chains], marker="o",
                     ms=3, alpha=0.5, **style)
        axes[0].plot([k for k, t in zip(n, trees) if t], [t["tau"] for t in trees if t],
                     marker="s", ms=3, label=label, **style)
        for ax, name in zip(axes[1:], ("this CPU", "H100")):
            key = f"speedup {name}"
            nan = float("nan")  # a cost that was not measured: no point
            ax.plot([r["verify_rows"] for r in chains],
                    [nan if r[key] is None else r[key] for r in chains], marker="o", ms=3,
                    alpha=0.5, **style)
            known = [k for k in n if k > 2 and any(r[key] is not None for r in rows
                                                   if r["verify_rows"] == k)]
            ax.plot(known, [best(rows, key, chain=False, max_rows=k)[key] for k in known],
                    marker="s", ms=3, label=label, **style)
    axes[0].set(xlabel="verify rows (nodes + 1)", ylabel="tokens per target forward",
                title="Measured: chain K = rows - 1 (faint circles)\nvs the best tree with at most "
                "that many rows (squares)", )
    for ax, name in zip(axes[1:], ("this CPU", "H100")):
        ax.axhline(1, color="black", lw=0.6)
        ax.set(xlabel="verify rows (nodes + 1)", ylabel="predicted speedup over autoregressive",
               title=f"Predicted at {name}'s r(T) and c\n(355M target, 124M draft)")
    axes[0].legend(fontsize=7)
    cpu = res["costs"].get("source", f"{res['machine']['cpu']}, {res['costs']['weights']}")
    fig.suptitle(f"Token trees vs chains: acceptance from the fixtures (tiny-4h and its drafts); "
                 f"costs from {cpu} (this CPU) and docs/gpu.md (H100)", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m bench tree", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_out", help="where tree.json goes")
    p.add_argument("--img", default=str(ROOT / "img"), help="where tree.png goes")
    p.add_argument("--quick", action="store_true", help="6 prompts, trees up to 7 nodes, 2 reps")
    p.add_argument("--reps", type=int, default=None, help="repetitions of the cost measurement")
    p.add_argument("--cpu_costs", choices=["measure", "performance.md"], default="measure",
                   help="this CPU's r(T) and c: measured now (needs a quiet machine), or the "
                   "table of docs/performance.md (T <= 9)")
    args = p.parse_args(argv)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    n_prompts, max_nodes, reps = (6, 7, 2) if args.quick else (12, 15, 3)
    reps = args.reps or reps
    res = measure(n_prompts, 40, max_nodes, reps, log, args.cpu_costs)
    res.update(command=command("tree", argv), machine=machine_info())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tree.json").write_text(json.dumps(res, indent=1))
    c = res["costs"]
    print(f"this CPU ({c.get('source', c['weights'])}): c = {c['c']:.3f}; r(T) 355M: "
          + " ".join(f"{T}:{r:.2f}" for T, r in c["r"]["355M"].items())
          + "; 124M: " + " ".join(f"{T}:{r:.2f}" for T, r in c["r"]["124M"].items())
          + f"; T=1: 355M {c['ms_T1']['355M']:.0f} ms, 124M {c['ms_T1']['124M']:.0f} ms"
          + (f"; other processes' CPU share during the best samples <= "
             f"{c['max_foreign_of_best']:.2f}" if "max_foreign_of_best" in c else ""))
    print()
    print(tables(res))
    plot(res, Path(args.img) / "tree.png")
    print(f"\nwrote {out / 'tree.json'} and {Path(args.img) / 'tree.png'}")
    return 0
