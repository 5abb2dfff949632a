"""Adaptive K against every fixed K and plain autoregressive decoding, timed for real.

    python -m bench adaptive                       # about 6 minutes on 2 CPU cores
    python -m bench adaptive --backend cupy        # the same on the GPU twin
    python -m bench replay                         # many prompts, replayed: bench/replay.py

The models have the official 355M (target) and 124M (draft) shapes and random weights: the
timings are real, the acceptance is not. Random weights make no draft agree with the target,
so the first three situations use a *scripted* draft: it runs the real 124M forwards
(same cost, same cache catch-up) but proposes the target's own greedy tokens, each replaced by a
wrong one with probability `error`. Situations:
    draft == target    scripted, error 0     acceptance 1
    perturbed target   scripted, error 0.1   acceptance ~0.9
    perturbed target   scripted, error 0.3   acceptance ~0.7, below this CPU's break-even
    unrelated draft    the random 124M model itself, acceptance ~0
Everything is greedy (temperature 0), so every run must print the autoregressive tokens.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from gpt2_numpy.adaptive import AdaptiveK, LookBackDrafter, adaptive_speculative_sample
from gpt2_numpy.decoding import autoregressive_sample, speculative_sample
from gpt2_numpy.load import official_hparams, random_params
from gpt2_numpy.load import GPT2
from gpt2_numpy.products import attach
from gpt2_numpy.sampling import Warp, probabilities
from gpt2_numpy.backend import to_numpy

from . import command
from .machine import device_name


class ScriptedDrafter(LookBackDrafter):
    """Pays for the draft model's forwards but proposes `script` (the target's greedy output),
    with the token at each position wrong with probability `error`. Which positions are wrong is
    drawn once per seed, like the places where a real draft model disagrees with the target: it
    depends on the text, not on K, so every decoder run with the same seed meets the same hard
    positions and their speeds compare fairly. Benchmark only."""

    def __init__(self, model, script, n_prompt: int, error: float, seed: int = 0):
        super().__init__(model)
        self.script, self.n_prompt = script, n_prompt
        self.wrong = np.random.default_rng(seed).random(len(script)) < error  # [position]

    def propose(self, tokens, K, warp, rng):
        drafts, q = [], np.zeros((K, self.n_vocab))
        new = tokens[self.cache.length :]
        for i in range(K):
            probabilities(to_numpy(self.forward(new, self.cache))[-1], warp)  # work, discarded
            position = len(tokens) - self.n_prompt + i
            x = self.script[position]  # rounds never propose past the requested tokens
            if self.wrong[position]:
                x = (x + 1) % self.n_vocab  # certainly not the target's argmax
            drafts.append(x)
            q[i, x] = 1.0  # a deterministic proposal: one-hot q keeps the output exact
            new = [x]
        return drafts, q

    def catch_up(self, tokens, plain, warp):
        """The real catch-up forward; the look back says what the script would have proposed."""
        super().catch_up(tokens, plain, warp)
        return [0.0 if self.wrong[i - self.n_prompt] else 1.0 for i in plain]


def decode(target, make_drafter, prompt, n, decoder, K_max, seed=0):
    """One timed run. decoder: None (autoregressive), an int K (speculative, fixed K), or
    ("adaptive", stake); make_drafter(seed)."""
    if decoder is None:
        return autoregressive_sample(target, prompt, n, Warp(0.0))
    if isinstance(decoder, tuple):
        return adaptive_speculative_sample(target, make_drafter(seed), prompt, n,
                                           AdaptiveK(K_max, stake=decoder[1]), Warp(0.0))
    return speculative_sample(target, make_drafter(seed), prompt, n, decoder, Warp(0.0))


def row(name, K, n, runs, reference, stake=None):
    """A table row from repeated runs: the median tokens/s, the first run's other numbers, and
    each run's own in `runs` (the JSON's). K: 0 (autoregressive), the fixed K, or "adaptive"
    (with AdaptiveK's `stake`)."""
    ids, stats = runs[0]
    acceptance = stats.acceptance_rate
    return dict(name=name, K=K, stake=stake, n=n, repeats=len(runs),
                tps=float(np.median([s.tokens_per_second for _, s in runs])),
                acceptance=None if np.isnan(acceptance) else acceptance,
                same=all(ids == reference[:n] for ids, _ in runs), Ks=K_counts(stats),
                runs=[dict(tps=s.tokens_per_second, Ks=K_counts(s), drafted=s.drafted,
                           accepted=s.accepted) for _, s in runs])


def K_counts(stats) -> str:
    """'K:rounds ...' of a run (autoregressive: every round K = 0)."""
    Ks = np.bincount(stats.K_per_round) if stats.K_per_round else [stats.rounds]
    return " ".join(f"{K}:{count}" for K, count in enumerate(Ks) if count)


def run_situation(target, make_drafter, prompt, n, n_fixed, K_max, reference, repeats,
                  stakes=(1.0,)):
    """Every fixed K once over n_fixed tokens; then autoregressive and adaptive (one row per
    stake) over n tokens and the best fixed K again over n_fixed, `repeats` times each,
    interleaved (so that a slow spell of the machine hits them all). Repetition i uses the
    scripted draft's seed i for every decoder (the fixed-K sweep is repetition 0), so that they
    meet the same wrong drafts."""
    fixed = {K: [decode(target, make_drafter, prompt, n_fixed, K, K_max)] for K in
             range(1, K_max + 1)}
    best = max(fixed, key=lambda K: fixed[K][0][1].tokens_per_second)
    finals = {None: [], best: [], **{("adaptive", stake): [] for stake in stakes}}
    for seed in range(repeats):
        for decoder in finals:
            finals[decoder].append(decode(target, make_drafter, prompt,
                                          n_fixed if decoder == best else n, decoder, K_max, seed))
    rows = [row("autoregressive", 0, n, finals[None], reference)]
    rows += [row(f"K={K} (best K >= 1)", K, n_fixed, finals[K], reference) if K == best else
             row(f"K={K}", K, n_fixed, fixed[K], reference) for K in fixed]
    for stake in stakes:
        name = f"adaptive, K_max={K_max}" + (f", stake {stake:g}" if stake != 1 else "")
        rows.append(row(name, "adaptive", n, finals["adaptive", stake], reference, stake))
    return rows


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m bench adaptive",
                                description="adaptive K vs fixed K, official shapes, random weights")
    p.add_argument("--n_tokens", type=int, default=96, help="tokens per run")
    p.add_argument("--n_tokens_unrelated", type=int, default=24,
                   help="tokens per fixed-K run with the unrelated draft (every round emits one)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--K_max", type=int, default=8)
    p.add_argument("--target", default="355M")
    p.add_argument("--draft", default="124M")
    p.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    p.add_argument("--stakes", type=float, nargs="+", default=[1.0],
                   help="an adaptive row for each AdaptiveK stake, in (0, 1]")
    p.add_argument("--out", default="bench_out", help="where adaptive.json goes (the table, "
                   "for python -m bench plot)")
    args = p.parse_args(argv)
    if not all(0 < stake <= 1 for stake in args.stakes):
        p.error("--stakes are shares of the budget, in (0, 1]")

    start = time.perf_counter()
    model_class, params, where = GPT2, random_params, device_name(args.backend)
    if args.backend == "cupy":  # the GPU twin: CUDA-graphed forwards, weights on the device
        import gpt2_cupy

        model_class, params = gpt2_cupy.GPT2, gpt2_cupy.random_params
    target = model_class(official_hparams(args.target), params(official_hparams(args.target), seed=0))
    draft = model_class(official_hparams(args.draft), params(official_hparams(args.draft), seed=1))
    prompt = np.random.default_rng(0).integers(0, target.n_vocab, 20).tolist()
    for model in (target, draft):  # the products' plan (NumPy), as load_model attaches it
        attach(model)
    for model in (target, draft):  # page every weight in once, outside the timings
        model(prompt, model.new_cache(len(prompt)))

    n = args.n_tokens
    print(f"# {args.target} target, {args.draft} draft, random weights, greedy; {where}")
    reference = autoregressive_sample(target, prompt, n, Warp(0.0))[0]  # the target's own tokens
    situations = [
        ("draft == target (scripted, acceptance 1)", n,
         lambda seed: ScriptedDrafter(draft, reference, len(prompt), error=0.0, seed=seed)),
        ("perturbed target (scripted, 10% of drafts wrong)", n,
         lambda seed: ScriptedDrafter(draft, reference, len(prompt), error=0.1, seed=seed)),
        ("perturbed target (scripted, 30% of drafts wrong)", n,
         lambda seed: ScriptedDrafter(draft, reference, len(prompt), error=0.3, seed=seed)),
        (f"unrelated random {args.draft} draft", args.n_tokens_unrelated,
         lambda seed: LookBackDrafter(draft)),
    ]
    print("| situation | decoder | tokens | runs | tokens/s | vs autoregressive | "
          "vs best fixed K | acceptance | K:rounds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    if args.backend == "cupy":
        # Untimed: record the CUDA graphs of every kind of step (verify steps, draft steps and
        # catch-ups of any length) at both run lengths, so that no timed run pays for a
        # recording: a cost per process, not per decode (gpt2_cupy/graphs.py).
        for length in {n, args.n_tokens_unrelated}:
            for model in (target, draft):
                model.warm_up(len(prompt) + length - 1)
    results = {"command": command("adaptive", argv), "machine": where,
               "target": args.target, "draft": args.draft, "weights": "random", "situations": []}
    for title, n_fixed, make_drafter in situations:
        rows = run_situation(target, make_drafter, prompt, n, n_fixed, args.K_max, reference,
                             args.repeats, args.stakes)
        ar = rows[0]["tps"]
        best = max(r["tps"] for r in rows if r["K"] != "adaptive")  # autoregressive included
        for r in rows:
            flag = "" if r["same"] else " (tokens differ!)"
            acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
            print(f"| {title} | {r['name']}{flag} | {r['n']} | {r['repeats']} | {r['tps']:.2f} | "
                  f"{r['tps'] / ar:.2f}x | {r['tps'] / best:.2f} | {acc} | {r['Ks']} |", flush=True)
        results["situations"].append({"title": title, "rows": rows})
        out = Path(args.out)  # rewritten after every situation: an interrupted run keeps some
        out.mkdir(parents=True, exist_ok=True)
        (out / "adaptive.json").write_text(json.dumps(results, indent=1))
    print(f"\ntotal {time.perf_counter() - start:.0f} s; load average now "
          f"{os.getloadavg()[0]:.2f} (other processes share these cores); "
          f"table in {Path(args.out) / 'adaptive.json'}")


if __name__ == "__main__":
    main()
