"""Host time per decoded token: everything a decoder does besides the forward.

    python -m bench host              # about 30 s
    python -m bench host --tokens 200 --reps 3

A decoded token costs a forward plus host work: the logits' copy, a distribution over the
50,257-token vocabulary in float64, the draw, and for the speculative decoder a round's
bookkeeping and the K policy's choice. Beside a CPU forward (30 ms for 124M on a 2-core Xeon)
that is noise; beside a GPU step (1.3 ms for 355M on an H100) it is not. Here it is measured
alone: `NullModel` returns a fixed logits row, freshly allocated as a device-to-host copy would
be, and computes nothing, so each microsecond a decoder spends per token is host time.

Decoders, each greedy and at temperature 1:
    autoregressive   one forward and one draw per token
    plain rounds     adaptive_speculative_sample with a policy that always says K = 0: what
                     a round adds over a plain step
    policy           AdaptiveK(8, explore=0, doubt=inf) with a draft that never agrees with
                     the target: every round plain, and no look backs: what choosing K adds
    adaptive         AdaptiveK(8), the same draft: plain rounds and now and then a look back.
                     A look back copies the logits of every token it judges, and here nothing
                     else costs anything, so this row overstates it (the GPU check's `overhead`
                     section times it with real forwards)
Each runs in a fresh process of its own, twice: with gpt2_numpy's malloc setting
(gpt2_numpy/_malloc.py) and with glibc's defaults (GPT2_MALLOC_DEFAULT=1). Times are the best of
--reps runs; page faults (minor: memory the kernel maps in on first touch) are counted over all
of them.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from gpt2_numpy.adaptive import AdaptiveK, adaptive_speculative_sample
from gpt2_numpy.decoding import autoregressive_sample
from gpt2_numpy.model import KVCache
from gpt2_numpy.sampling import Warp

from . import ROOT, command
from .machine import cpu_name

N_VOCAB = 50257
PROMPT = 20


class NullModel:
    """A model whose forward costs nothing: every row of logits is `row`, returned as a new
    array (as a device-to-host copy makes one). Its cache is a real KVCache of one number per
    position, so that lengths, rollbacks and the capacity check work as for a real model."""

    HPARAMS = {"n_layer": 1, "n_head": 1, "n_embd": 1, "n_ctx": 1024}

    def __init__(self, row: np.ndarray):
        self.row = row.astype(np.float32)
        self.n_vocab, self.n_ctx = len(row), self.HPARAMS["n_ctx"]

    def new_cache(self, capacity: int = None) -> KVCache:
        return KVCache(self.HPARAMS, capacity or self.n_ctx, np)

    def __call__(self, ids, cache, n_logits=1):
        cache.check_room(len(ids))
        cache.length += len(ids)
        n_logits = len(ids) if n_logits is None else n_logits
        return np.repeat(self.row[None], n_logits, axis=0) if n_logits else None

    def warm_up(self, capacity: int = None) -> None:
        pass


class PlainRounds(AdaptiveK):
    """Every round a plain target step, and nothing learnt: the decoder's own work alone."""

    def next_K(self) -> int:
        return 0

    def update(self, *round) -> None:
        pass


def models(seed: int = 0):
    """(target, draft): the draft's logits are the target's negated, so its likeliest tokens
    are the target's least likely: greedy drafts are never accepted, sampled ones rarely."""
    row = 3 * np.random.default_rng(seed).standard_normal(N_VOCAB)
    return NullModel(row), NullModel(-row)


DECODERS = ["autoregressive", "plain rounds", "policy", "adaptive"]


def measure(decoder: str, temperature: float, n_tokens: int, reps: int) -> dict:
    """The best microseconds per token of one decoder over reps runs."""
    target, draft = models()
    prompt, warp = list(range(PROMPT)), Warp(temperature)
    decode = {
        "autoregressive": lambda rng: autoregressive_sample(target, prompt, n_tokens, warp, rng),
        "plain rounds": lambda rng: adaptive_speculative_sample(target, draft, prompt, n_tokens,
                                                                PlainRounds(1), warp, rng),
        "policy": lambda rng: adaptive_speculative_sample(
            target, draft, prompt, n_tokens, AdaptiveK(8, explore=0, doubt=float("inf")), warp,
            rng),
        "adaptive": lambda rng: adaptive_speculative_sample(target, draft, prompt, n_tokens,
                                                            AdaptiveK(8), warp, rng),
    }[decoder]
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    runs = [decode(np.random.default_rng(i))[1] for i in range(reps)]
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    best = min(runs, key=lambda s: s.decode_seconds)
    return {"decoder": decoder, "temperature": temperature,
            "us_per_token": 1e6 * best.decode_seconds / best.n_generated,
            "page_faults_per_token": faults / sum(s.n_generated for s in runs),
            "K_per_round": np.bincount(best.K_per_round).tolist() if best.K_per_round else None}


def run_worker(decoder: str, temperature: float, n_tokens: int, reps: int,
               malloc_default: bool) -> dict:
    """measure() in a fresh process, as a user's run starts: malloc's setting is made when
    gpt2_numpy is imported, and what glibc does by default depends on what the process freed
    before (a large block freed raises its thresholds), so each row starts clean."""
    env = {k: v for k, v in os.environ.items() if k != "GPT2_MALLOC_DEFAULT"}
    if malloc_default:
        env["GPT2_MALLOC_DEFAULT"] = "1"
    out = subprocess.run([sys.executable, "-m", "bench", "host", "--worker", decoder,
                          "--temperature", str(temperature), "--tokens", str(n_tokens),
                          "--reps", str(reps)], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def table(kept: list, default: list) -> str:
    lines = ["| decoder | temperature | µs/token, malloc kept | over autoregressive | "
             "µs/token, glibc default | page faults/token, kept / default |",
             "|---|---|---|---|---|---|"]
    ar = {r["temperature"]: r["us_per_token"] for r in kept if r["decoder"] == "autoregressive"}
    for k, d in zip(kept, default):
        lines.append(f"| {k['decoder']} | {k['temperature']:g} | {k['us_per_token']:.0f} | "
                     f"{k['us_per_token'] - ar[k['temperature']]:+.0f} | {d['us_per_token']:.0f} | "
                     f"{k['page_faults_per_token']:.1f} / {d['page_faults_per_token']:.1f} |")
    return "\n".join(lines)


def host_section(n_tokens: int = 500, reps: int = 5) -> dict:
    """Both malloc settings, each in its own process; the table as Markdown too."""
    rows = [(decoder, temperature) for temperature in (0.0, 1.0) for decoder in DECODERS]
    kept = [run_worker(*row, n_tokens, reps, malloc_default=False) for row in rows]
    default = [run_worker(*row, n_tokens, reps, malloc_default=True) for row in rows]
    return {"cpu": cpu_name(), "n_tokens": n_tokens, "reps": reps, "malloc_kept": kept,
            "glibc_default": default, "markdown": table(kept, default)}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m bench host", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=500, help="tokens per run (at most 1004)")
    p.add_argument("--reps", type=int, default=5, help="runs per decoder; the best is kept")
    p.add_argument("--out", default="bench_out", help="where host.json goes")
    p.add_argument("--worker", choices=DECODERS, help=argparse.SUPPRESS)
    p.add_argument("--temperature", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not 1 <= args.tokens <= NullModel.HPARAMS["n_ctx"] - PROMPT or args.reps < 1:
        print(f"error: --tokens must be in 1..{NullModel.HPARAMS['n_ctx'] - PROMPT} and --reps "
              f">= 1", file=sys.stderr)
        return 2
    if args.worker:
        print(json.dumps(measure(args.worker, args.temperature, args.tokens, args.reps)))
        return 0
    start = time.perf_counter()
    res = host_section(args.tokens, args.reps)
    res["command"] = command("host", argv)
    print(f"# host time per token, zero-cost model, {args.tokens} tokens, best of {args.reps}; "
          f"{res['cpu']}\n\n{res['markdown']}\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "host.json").write_text(json.dumps(res, indent=1))
    print(f"{time.perf_counter() - start:.0f} s; table in {out / 'host.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
