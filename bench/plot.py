"""The figures in img/, drawn from a benchmark's JSON (matplotlib).

    python -m bench plot bench_out      # bench_out/bench.json and bench_out/adaptive.json
"""
import argparse
import json
from pathlib import Path

from . import ROOT
from .report import bad_input


def plot(out_dir: Path, img_dir: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        bad_input("plotting needs matplotlib (an optional extra): pip install matplotlib")
    img_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name, title, fontsize=8):
        fig.suptitle(title, fontsize=fontsize)
        fig.tight_layout()
        fig.savefig(img_dir / name, dpi=110)
        written.append(name)
    if (out_dir / "adaptive.json").exists():  # python -m bench adaptive
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
        save(fig, "speculative_speedup.png", f"{cpu}; {res['speculative'][0]['weights']}", fontsize=9)

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
        save(fig, "r_of_T.png", f"{cpu}; {res['r_of_T'][0]['weights']}")

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
        save(fig, "no_cache.png", f"{cpu}; {rows[0]['weights']}")
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
        fixed = [r for r in rows if r["K"] != "adaptive"]
        speed = [r["tps"] / ar for r in fixed]
        ax.bar(range(len(fixed)), speed, color=["gray"] + ["C0"] * (len(fixed) - 1))
        ax.axhline(0.95 * max(speed), color="black", ls=":", lw=1, label="5% below the best bar")
        for i, adaptive in enumerate(r for r in rows if r["K"] == "adaptive"):  # one per stake
            stake = adaptive.get("stake") or 1.0
            ax.axhline(adaptive["tps"] / ar, color=f"C{3 + i}", lw=2, label=f"adaptive"
                       + (f", stake {stake:g}" if stake != 1 else "")
                       + f": {adaptive['tps'] / ar:.2f}x")
        ax.set_xticks(range(len(fixed)), ["AR"] + [str(r["K"]) for r in fixed[1:]])
        ax.set_title(situation["title"].replace(" (", "\n("), fontsize=8)
        ax.set_xlabel("fixed K (AR: autoregressive)", fontsize=8)
        ax.legend(fontsize=7, loc="upper left")
    axes[0][0].set_ylabel("tokens/s vs autoregressive")
    fig.suptitle(f"Adaptive K vs every fixed K: {res['target']} target, {res['draft']} draft, "
                 f"{res['weights']} weights, greedy; {res['machine']}", fontsize=8)
    fig.tight_layout()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench plot", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="where bench.json and/or adaptive.json are")
    p.add_argument("--img", default=str(ROOT / "img"), help="where the figures go")
    args = p.parse_args(argv)
    plot(Path(args.out_dir), Path(args.img))
    return 0
