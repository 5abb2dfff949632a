"""Fidelity: does speculative sampling reproduce the target's distribution? Measured for K = 1..8.

    python -m bench fidelity          # the test fixtures; from the repository root

For a model pair, a prompt and a temperature > 0, the outcome of a run is the pair of its
first two generated tokens (x1, x2): V * V possible outcomes. Each decoder is run N times and
gives an empirical distribution of that pair; two distributions are compared by their
Jensen-Shannon divergence, in bits (0: identical, 1: disjoint):

    JS(P, Q) = KL(P || M) / 2 + KL(Q || M) / 2,   M = (P + Q) / 2

Two finite samples of ONE distribution still differ, so a JS near zero is not zero: the noise
floor is the JS between two independent target-alone samples of the same size N, drawn for many
seeds; its spread over the seeds is the band in which an exact decoder's JS falls. Measured:

    speculative   gpt2_numpy.speculative_sample with K = 1..8 drafts per round, each against
                  the target alone (gpt2_numpy.autoregressive_sample with the target): N runs
    draft alone   autoregressive_sample with the draft: what speculation must not produce
    broken rules  the speculative round copied below with its acceptance rule as a parameter,
                  run with two wrong rules: "keep every draft", and "resample from p" (a
                  rejection draws from p instead of the residual max(0, p - q)); run with the
                  library's rule it is the control, which must sit in the band like the
                  library's decoder

Two pairs by default. The test fixtures (tiny-3h drafts for tiny-4h) are unrelated random
models: their drafts are almost never accepted, so there nearly every token comes from the
residual max(0, p - q). The second pair exercises the acceptance test and the bonus token: its
draft is the target with N(0, sigma^2) noise added to every weight (--draft_noise), which agrees
with the target often, as a trained draft does. Both pairs share the target, and with it the
noise floor and the target-alone sample.

Every run asks for K + 1 tokens, so that its first round drafts the full K, and stops as soon as
its first two tokens are committed (an exception raised from the on_tokens callback): later
rounds cannot change them. The noise floor is vectorised: the target's exact distribution of
(x1, x2) takes one forward per x1 (V + 1 forwards), and target-alone samples are then drawn from
it directly; one library-decoded target-alone sample is compared with such a draw as a check.

It writes bench_out/fidelity.json (every number) and img/fidelity.png (one row per pair: JS vs K
with the band and the contrasts as separate marks; acceptance and tokens per target forward of
the runs' first rounds).
"""
import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import gpt2_numpy  # noqa: E402  first: it picks OpenBLAS's kernels before NumPy loads OpenBLAS
import numpy as np  # noqa: E402
from gpt2_numpy import (GPT2Error, ModelDrafter, Warp, accept_or_resample,  # noqa: E402
                        autoregressive_sample, probabilities, sample, speculative_sample)
from gpt2_numpy.decoding import prefill  # noqa: E402
from gpt2_numpy.load import tree_map  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
DEFAULTS = dict(draft=str(FIXTURES / "tiny-3h"), target=str(FIXTURES / "tiny-4h"),
                prompt="the cat sat", temperature=0.5, samples=500, K="1-8", broken_K="4",
                control_K=4, seeds=200, seed=0, draft_noise=0.005)


# --- the divergence -------------------------------------------------------------------------------

def js_bits(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence of two distributions over the same outcomes, in bits.  [n], [n]"""
    m = (p + q) / 2
    return float(kl_bits(p, m) + kl_bits(q, m)) / 2


def kl_bits(p: np.ndarray, m: np.ndarray) -> float:
    """KL(p || m) in bits, where m > 0 wherever p > 0 (m is a mixture containing p)."""
    seen = p > 0  # 0 log 0 = 0
    return float(np.sum(p[seen] * np.log2(p[seen] / m[seen])))


def js_divergence(a, b) -> float:
    """JS divergence, in bits, between the empirical distributions of two samples of outcomes
    (integer codes; the samples may differ in size).  [N_a], [N_b] -> a float in [0, 1]"""
    a, b = np.asarray(a), np.asarray(b)
    outcomes, index = np.unique(np.concatenate([a, b]), return_inverse=True)  # index: [N_a + N_b]
    p = np.bincount(index[: len(a)], minlength=len(outcomes)) / len(a)  # [n_outcomes]
    q = np.bincount(index[len(a) :], minlength=len(outcomes)) / len(b)
    return js_bits(p, q)


def pair_code(first_two, n_vocab: int) -> int:
    """The outcome (x1, x2) as one integer, x1 * V + x2."""
    x1, x2 = first_two
    return x1 * n_vocab + x2


# --- samples of the first two tokens --------------------------------------------------------------

class Enough(Exception):
    """Raised from on_tokens once the first two tokens are committed: the run stops there."""


def first_two(decode, *args):
    """Run decode(*args, on_tokens) until two tokens are committed.
    Returns ((x1, x2), the number of drafts the first round accepted) (0 for autoregressive)."""
    ids, first_round = [], []

    def on_tokens(new_ids, kinds):
        ids.extend(new_ids)
        if not first_round:
            first_round.append(kinds.count("accepted"))
        if len(ids) >= 2:
            raise Enough

    try:
        decode(*args, on_tokens)
    except Enough:
        pass
    return tuple(ids[:2]), first_round[0]


def alone_samples(model, prompt, n, warp, rng):
    """n pairs from autoregressive_sample with one model, as codes.  -> [n] int"""
    return np.array([pair_code(first_two(autoregressive_sample, model, prompt, 2, warp, rng)[0],
                               model.n_vocab) for _ in range(n)])


def speculative_samples(target, draft, prompt, n, K, warp, rng, decode=speculative_sample):
    """n pairs from a speculative decoder with K drafts per round, as codes, and the number of
    drafts its first rounds accepted.  -> [n] int, [n] int

    Each run asks for K + 1 tokens (the first round then drafts all K; it would draft fewer if
    fewer tokens were still wanted) and stops when two are committed."""
    codes, accepted = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
    for i in range(n):
        pair, accepted[i] = first_two(decode, target, draft, prompt, K + 1, K, warp, rng)
        codes[i] = pair_code(pair, target.n_vocab)
    return codes, accepted


def exact_first_two(model, prompt, warp) -> np.ndarray:
    """The model's exact distribution of (x1, x2): p(x1) p(x2 | x1), one forward per x1 after
    the prompt's (a cache rollback between them).  -> [V * V] float64, indexed by pair_code"""
    V = model.n_vocab
    cache = model.new_cache(len(prompt) + 1)
    p1 = probabilities(model(prompt, cache)[-1], warp)  # [V]
    joint = np.zeros((V, V))
    for x1 in np.flatnonzero(p1):
        cache.rollback(len(prompt))
        joint[x1] = p1[x1] * probabilities(model([int(x1)], cache)[-1], warp)  # [V]
    return joint.reshape(-1)  # [V * V]: row x1, column x2, so code = x1 * V + x2


def noise_floor(joint, n, n_seeds, rng) -> np.ndarray:
    """JS between two independent size-n samples of `joint`, for n_seeds seeds.  -> [n_seeds]"""
    draws = rng.choice(len(joint), size=(n_seeds, 2, n), p=joint / joint.sum())  # [seeds, 2, n]
    return np.array([js_divergence(a, b) for a, b in draws])


# --- a speculative round with its acceptance rule as a parameter ----------------------------------

def accept_every_draft(drafts, q, p, rng):
    """A deliberately WRONG rule: keep every draft, then a bonus token from p. Its output is the
    draft's distribution, not the target's."""
    return len(drafts), sample(p[len(drafts)], rng)


def resample_from_p(drafts, q, p, rng):
    """A subtly WRONG rule: the right acceptance test, but a rejection resamples from p instead of
    the residual norm(max(0, p - q)), so tokens the draft favours are drawn too often. Its error
    grows with the acceptance: with drafts that are never accepted it cannot be seen."""
    for i, x in enumerate(drafts):
        if rng.random() < min(1.0, p[i, x] / q[i, x]):
            continue
        return i, sample(p[i], rng)
    return len(drafts), sample(p[len(drafts)], rng)


BROKEN_RULES = {"keep every draft": accept_every_draft, "resample from p": resample_from_p}


def speculative_sample_with_rule(target, draft, prompt, n_new, K, warp, rng, on_tokens=None,
                                 accept=accept_or_resample):
    """gpt2_numpy.speculative_sample reduced to its round (fixed K, a draft model, no timing),
    built from the library's public pieces, with the acceptance rule `accept` as a parameter:
    accept(drafts, q [K, V], p [K + 1, V], rng) -> (n_accepted, next_token). With the library's
    accept_or_resample it is an exact decoder (the control); with accept_every_draft it is not.
    Returns the new token ids."""
    drafter = ModelDrafter(draft)
    tokens = [int(t) for t in prompt]
    n_stop = len(tokens) + n_new
    cache = target.new_cache(n_stop - 1)
    prefill(target, cache, tokens)
    drafter.start(tokens, n_stop - 1)
    while len(tokens) < n_stop:
        drafts, q = drafter.propose(tokens, min(K, n_stop - len(tokens) - 1), warp, rng)  # 1.
        logits = target(tokens[cache.length :] + drafts, cache, n_logits=len(drafts) + 1)  # 2.
        p = probabilities(logits, warp)  # [K + 1, V]
        m, next_token = accept(drafts, q, p, rng)  # 3.
        tokens += drafts[:m] + [next_token]
        cache.rollback(len(tokens) - 1)  # 4.
        drafter.rollback(tokens)
        assert cache.length == len(tokens) - 1
        if on_tokens:
            last = "resampled" if m < len(drafts) else "bonus" if drafts else "target"
            kinds = ["accepted"] * m + [last]
            on_tokens(tokens[-(m + 1) :], kinds)
    return tokens[len(prompt) :]


def noisy_copy(model, sigma: float, seed: int = 0):
    """The model with sigma * N(0, 1) added to every weight: a draft that agrees with it often
    (the fixtures' weights are of order one; sigma = 0.005 gives an acceptance of ~0.6 there)."""
    rng = np.random.default_rng(seed)
    params = tree_map(lambda w: w + np.float32(sigma) * rng.standard_normal(w.shape, np.float32),
                      model.params)
    return gpt2_numpy.GPT2(model.hparams, params, model.tokenizer, f"{model.name} + noise {sigma}")


# --- the measurement ------------------------------------------------------------------------------

def measure(target, draft, prompt, warp, n, Ks, broken_Ks=(), control_K=None, n_seeds=200,
            seed=0, broken_rules=BROKEN_RULES, log=lambda *a: None) -> dict:
    """Everything the figure shows, for one pair, prompt and warp; n samples per decoder.
    broken_rules: {name: accept}, each run in speculative_sample_with_rule with K in broken_Ks."""
    if draft.n_vocab != target.n_vocab:
        raise GPT2Error(f"draft and target vocabularies differ ({draft.n_vocab} vs "
                        f"{target.n_vocab} tokens)")
    # One independent stream per part, so that no part's numbers depend on which others ran.
    n_streams = 5 + len(Ks) + len(broken_rules) * len(broken_Ks)
    streams = iter([np.random.default_rng(s)
                    for s in np.random.SeedSequence(seed).spawn(n_streams)])
    start = time.perf_counter()
    joint_target = exact_first_two(target, prompt, warp)
    joint_draft = exact_first_two(draft, prompt, warp)
    floor = noise_floor(joint_target, n, n_seeds, next(streams))
    reference = alone_samples(target, prompt, n, warp, next(streams))  # the target alone
    exact_draw = next(streams).choice(len(joint_target), size=n,
                                      p=joint_target / joint_target.sum())
    draft_alone = alone_samples(draft, prompt, n, warp, next(streams))
    res = {
        "noise_floor": {"min": float(floor.min()), "median": float(np.median(floor)),
                        "max": float(floor.max()), "mean": float(floor.mean()),
                        "p1": float(np.percentile(floor, 1)),
                        "p99": float(np.percentile(floor, 99))},
        "target_alone_vs_exact_draw": js_divergence(reference, exact_draw),
        "draft_alone": js_divergence(draft_alone, reference),
        "exact_target_vs_draft": js_bits(joint_target, joint_draft),
        "speculative": [], "broken": [], "control": None,
    }
    log(f"floor and the models alone: {time.perf_counter() - start:.1f}s")
    for K in Ks:
        start = time.perf_counter()
        codes, accepted = speculative_samples(target, draft, prompt, n, K, warp, next(streams))
        res["speculative"].append({
            "K": K, "js": js_divergence(codes, reference),
            "first_round_acceptance": float(accepted.mean() / K),
            "first_round_tokens": float(accepted.mean() + 1),  # per target forward
        })
        log(f"K={K}: JS {res['speculative'][-1]['js']:.4f} bits "
            f"({time.perf_counter() - start:.1f}s)")
    for rule, accept in broken_rules.items():
        broken = partial(speculative_sample_with_rule, accept=accept)
        for K in broken_Ks:
            codes, _ = speculative_samples(target, draft, prompt, n, K, warp, next(streams), broken)
            res["broken"].append({"rule": rule, "K": K, "js": js_divergence(codes, reference)})
    if control_K:
        codes, _ = speculative_samples(target, draft, prompt, n, control_K, warp, next(streams),
                                       speculative_sample_with_rule)
        res["control"] = {"K": control_K, "js": js_divergence(codes, reference)}
    log("broken rules and control: done")
    return res


# --- the figure -----------------------------------------------------------------------------------

def plot(res: dict, path: Path, plt) -> None:
    """One row per pair: JS vs K with the noise band and the contrasts (left), the runs' first
    rounds (right)."""
    pairs = res["pairs"]
    fig, axes = plt.subplots(len(pairs), 2, figsize=(11, 4.2 * len(pairs)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2]})
    for (ax, ax2), pair in zip(axes, pairs):
        plot_pair(ax, ax2, pair, res)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8)
    fig.suptitle(f"Distribution of the first two tokens after {res['prompt']!r}, temperature "
                 f"{res['temperature']}, {res['n_samples']} runs per point. The broken rules run "
                 f"in a copy of the round in\nbench/fidelity.py with its acceptance rule as a "
                 f"parameter; the control is that copy with the library's rule.   "
                 f"python -m bench fidelity", fontsize=9)
    fig.tight_layout(rect=(0, 0.8 / fig.get_figheight(), 1, 1))  # 0.8 inch for the legend
    fig.savefig(path, dpi=110)


def plot_pair(ax, ax2, pair: dict, res: dict) -> None:
    sp, floor = pair["speculative"], pair["noise_floor"]
    Ks = [r["K"] for r in sp]
    lo, hi = min(Ks) - 0.5, max(Ks) + 0.5
    ax.fill_between([lo, hi], floor["min"], floor["max"], color="gray", alpha=0.3, lw=0,
                    label="noise floor: target alone vs target alone, "
                    f"min-max of {res['n_seeds']} seeds")
    ax.hlines(floor["median"], lo, hi, color="gray", ls="--", lw=1, label="noise floor: median")
    ax.plot(Ks, [r["js"] for r in sp], "o-", color="C0", label="speculative_sample vs target alone")
    ax.hlines(pair["draft_alone"], lo, hi, color="C1", lw=2, label="draft alone vs target alone")
    for rule, marker, color, shift, label in (  # shifted sideways so that no mark hides another
            ("keep every draft", "X", "C3", -0.2, "keep every draft"),
            ("resample from p", "^", "C5", 0.2, "resample from p, not the residual")):
        rows = [r for r in pair["broken"] if r["rule"] == rule]
        ax.plot([r["K"] + shift for r in rows], [r["js"] for r in rows], marker, ms=9, color=color,
                label=f"broken rule: {label} vs target alone")
    if pair["control"]:
        ax.plot([pair["control"]["K"]], [pair["control"]["js"]], "D", mfc="none", ms=10,
                color="C2", label="control: the copied round with the library's rule")
    ax.set(yscale="log", xlim=(lo, hi), ylim=(floor["min"] / 3, 2), xlabel="K (drafts per round)",
           ylabel="Jensen-Shannon divergence (bits)",
           title=f"{pair['draft']} drafts for {pair['target']}")
    ax.set_xticks(Ks)
    ax2.plot(Ks, [r["first_round_acceptance"] for r in sp], "o-", color="C0",
             label="acceptance (accepted / drafted)")
    ax2.plot([], [], "s--", color="C4", label="tokens per target forward (right axis)")
    ax2.set(xlabel="K", ylabel="acceptance", ylim=(-0.05, 1.05),
            title="The same speculative runs' first rounds")
    ax2.set_xticks(Ks)
    right = ax2.twinx()
    right.plot(Ks, [r["first_round_tokens"] for r in sp], "s--", color="C4")
    right.set_ylabel("tokens per target forward")
    right.set_ylim(0.9, max(2.0, max(r["first_round_tokens"] for r in sp) * 1.1))
    ax2.legend(fontsize=7, loc="upper left")


# --- the command ----------------------------------------------------------------------------------

def int_list(text: str, flag: str):
    """'1-8' or '1,2,4,8' -> [1, ..., 8] or [1, 2, 4, 8]; each K >= 1."""
    try:
        if "-" in text:
            first, last = text.split("-")
            Ks = list(range(int(first), int(last) + 1))
        else:
            Ks = [int(k) for k in text.split(",") if k]
    except ValueError:
        raise GPT2Error(f"{flag} takes K values as 1-8 or 1,2,4, got {text!r}") from None
    if min(Ks, default=1) < 1:
        raise GPT2Error(f"{flag}: every K must be >= 1, got {text!r}")
    return Ks


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--draft", default=DEFAULTS["draft"],
                   help="a size or a folder of official files")
    p.add_argument("--target", default=DEFAULTS["target"],
                   help="a size or a folder of official files")
    p.add_argument("--prompt", default=DEFAULTS["prompt"])
    p.add_argument("--temperature", type=float, default=DEFAULTS["temperature"], help="> 0")
    p.add_argument("--samples", type=int, default=DEFAULTS["samples"], help="runs per point")
    p.add_argument("--K", default=DEFAULTS["K"], help="e.g. 1-8 or 1,2,4")
    p.add_argument("--broken_K", default=DEFAULTS["broken_K"], help="K values of the broken rules")
    p.add_argument("--control_K", type=int, default=DEFAULTS["control_K"],
                   help="K of the control (0: none)")
    p.add_argument("--seeds", type=int, default=DEFAULTS["seeds"], help="for the noise floor")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--draft_noise", type=float, default=DEFAULTS["draft_noise"],
                   help="also measure the target drafting for itself with this much noise on its "
                   "weights (0: only --draft)")
    p.add_argument("--models_dir", default=None, help="download cache (default: weights/)")
    p.add_argument("--out", default=str(ROOT / "bench_out"), help="where fidelity.json goes")
    p.add_argument("--img", default=str(ROOT / "img"), help="where fidelity.png goes")
    p.add_argument("--no_plot", action="store_true", help="only the JSON (no matplotlib needed)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        plt = None if args.no_plot else import_pyplot()
        Ks, broken_Ks = int_list(args.K, "--K"), int_list(args.broken_K, "--broken_K")
        if not Ks or args.control_K < 0:
            raise GPT2Error("--K needs at least one value, and --control_K must be >= 0")
        if not args.temperature > 0:
            raise GPT2Error(f"--temperature must be > 0 (greedy decoding has one outcome), "
                            f"got {args.temperature}")
        if args.samples < 2 or args.seeds < 1:
            raise GPT2Error("--samples must be >= 2 and --seeds >= 1")
        if not args.draft_noise >= 0:
            raise GPT2Error(f"--draft_noise must be >= 0, got {args.draft_noise}")
        start = time.perf_counter()
        target = gpt2_numpy.load_model(args.target, args.models_dir, progress=False)
        drafts = [gpt2_numpy.load_model(args.draft, args.models_dir, progress=False)]
        if args.draft_noise:
            drafts.append(noisy_copy(target, args.draft_noise))  # the same draft for any --seed
        prompt = target.tokenizer.encode(args.prompt, allowed_special="all")
        if not prompt:
            raise GPT2Error("the prompt is empty")
        if len(prompt) + max(Ks + broken_Ks + [args.control_K]) + 1 > target.n_ctx:
            raise GPT2Error(f"the prompt ({len(prompt)} tokens) leaves no room for K + 1 tokens "
                            f"in a context of {target.n_ctx}")
        pairs = []
        for draft in drafts:
            name = Path(draft.name).name if draft is drafts[0] else \
                f"{Path(target.name).name} + noise (sd {args.draft_noise} on every weight)"
            print(f"{name} drafts for {Path(target.name).name}:")
            pair = measure(target, draft, prompt, Warp(args.temperature), args.samples, Ks,
                           broken_Ks, args.control_K, args.seeds, args.seed, log=print)
            pairs.append({"draft": name, "target": Path(target.name).name, **pair})
    except GPT2Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    command = "python -m bench fidelity " + " ".join(sys.argv[1:] if argv is None else argv)
    res = {"command": command.strip(), "prompt": args.prompt, "prompt_token_ids": prompt,
           "temperature": args.temperature, "n_samples": args.samples, "n_seeds": args.seeds,
           "seed": args.seed, "seconds": time.perf_counter() - start, "pairs": pairs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fidelity.json").write_text(json.dumps(res, indent=1, allow_nan=False))
    print(f"wrote {out / 'fidelity.json'} ({res['seconds']:.0f}s)")
    if plt:
        Path(args.img).mkdir(parents=True, exist_ok=True)
        plot(res, Path(args.img) / "fidelity.png", plt)
        print(f"wrote {Path(args.img) / 'fidelity.png'}")
    return 0


def import_pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise GPT2Error("the figure needs matplotlib (an optional extra): pip install matplotlib, "
                        "or --no_plot") from None
    return plt


if __name__ == "__main__":
    sys.exit(main())
