"""Many prompts in seconds: the real decoders replayed against models that only cost time.

    python -m bench replay                          # about a minute on 2 CPU cores
    python -m bench replay --ngram weights/124M     # prompt lookup, on real text

`python -m bench adaptive` times real forwards, so it can afford three prompts per situation;
whether adaptive K is "never more than 5% slower on any prompt" is a question about the spread
over many prompts. Speed depends on the prompt only through which drafts pass, so this measures
every cost once, then replays the decoders over 50 scripted prompts per situation:

  1. Measure, on the real 355M target and 124M draft (official shapes, random weights), the
     seconds of a target forward over T = 1..K_max + 1 positions, of a draft forward over 1 and 2,
     of a draft catch-up over N positions, of turning one row of logits into a distribution, and
     of judging one row in a look back (`--backend cupy`: the forwards on the GPU, CUDA graphs
     recorded first). Or take them from a JSON file (`--costs FILE`, written by `--save_costs`),
     or use `--costs h100`: the forwards docs/gpu.md's H100 tables report (`h100_costs`).
  2. Replay `autoregressive_sample`, `speculative_sample` for every fixed K and
     `adaptive_speculative_sample` with AdaptiveK (the real functions) with `CostModel`s:
     stand-ins that return one-hot logits for a script and advance a virtual clock by the
     measured cost of each forward instead of computing it. A run's time is the virtual time
     that passed during it; AdaptiveK reads the same clock (its `clock` argument). The
     draft's argmax is wrong at a random fraction `error` of the positions (a new draw per
     prompt), its look back judges the same script.

What it leaves out: the decoders' own Python time between forwards (unless --python_time: then
it counts as this machine spends it, over the stand-ins' 64-token rows, whose full-vocabulary
sampling work is charged as measured in step 1 as well), and drafts that are wrong in bursts
rather than independently. It is a model of the timings, so its
tables say "replayed". Its last lines replay the prompts bench/adaptive.py times for real, so
that the two can be compared (docs/adaptive.md does).

`--ngram TOKENIZER_DIR` replays prompt-lookup drafting instead (`ngram_replay`). Its acceptance
depends on the text, so there the text is real: the drafter reads GPT-2 tokens of texts built
from gpt2_numpy's source (`ngram_texts`), and the stand-in target emits a given continuation.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
from gpt2_numpy import backend as backend_module
from gpt2_numpy.adaptive import AdaptiveK, adaptive_speculative_sample, probability_of
from gpt2_numpy.decoding import autoregressive_sample, speculative_sample
from gpt2_numpy.load import official_hparams
from gpt2_numpy.model import KVCache
from gpt2_numpy.products import attach
from gpt2_numpy.sampling import Warp, probabilities

from .machine import cpu_name, device_name
from .timing import VirtualClock

NGRAM_TEXTS = Path(__file__).with_name("ngram_texts.json")


class CostModel:
    """Quacks like a GPT2 for the decoders: the logits of position i are one-hot at
    next_token(i), and each call advances the virtual clock by `seconds(T, n_logits)`.

    The sequence is the prompt followed by `script`; the token after position i (i >= n_prompt - 1)
    is script[i + 1 - n_prompt], except where `wrong` says this model gets it wrong."""

    def __init__(self, clock, seconds, script, n_prompt, wrong=None, n_vocab=64, n_ctx=1024):
        self.clock, self.seconds, self.script, self.n_prompt = clock, seconds, script, n_prompt
        self.wrong = np.zeros(len(script), bool) if wrong is None else wrong
        self.n_vocab, self.n_ctx = n_vocab, n_ctx
        self.hparams = dict(n_layer=1, n_head=1, n_embd=1, n_ctx=n_ctx)

    def next_token(self, position: int) -> int:
        i = position + 1 - self.n_prompt  # index into script of the token that follows
        return (self.script[i] + int(self.wrong[i])) % self.n_vocab

    def new_cache(self, capacity=None):
        return KVCache(self.hparams, capacity or self.n_ctx, np)  # only its length is used

    def __call__(self, ids, cache, n_logits=1):
        began = time.perf_counter()
        T, start = len(ids), cache.length
        cache.length += T
        self.clock.now += self.seconds(T, n_logits)
        logits = None
        if n_logits:
            logits = np.zeros((n_logits, self.n_vocab), np.float32)
            for row, position in enumerate(range(start + T - n_logits, start + T)):
                logits[row, self.next_token(position)] = 1.0
        self.clock.exclude(time.perf_counter() - began)  # only the modelled cost counts
        return logits


def host_costs():
    """The host's work on each row of logits a decoder samples from (greedy: an argmax into a
    float64 one-hot), and on each row a look back judges (greedy: an argmax test)."""
    rows = np.random.default_rng(0).standard_normal((16, 50257)).astype(np.float32)

    def per_row(work):
        start = time.perf_counter()
        for _ in range(20):
            work()
        return (time.perf_counter() - start) / 20 / len(rows)

    return dict(per_row=per_row(lambda: [probabilities(row, Warp(0.0)) for row in rows]),
                look_back_row=per_row(lambda: probability_of(rows, range(16), Warp(0.0))))


def measure_costs(K_max: int, reps: int = 3, backend: str = "numpy"):
    """Best-of-reps seconds of every kind of forward the decoders make, on the official shapes."""
    if backend == "cupy":
        import gpt2_cupy as gpt2
    else:
        import gpt2_numpy as gpt2
    n_past, Ns = 64, [1, 2, 4, 8, 9, 16, 32, 64]

    def model(size, seed):
        h = official_hparams(size)
        m = gpt2.GPT2(h, gpt2.random_params(h, seed=seed))
        attach(m)  # NumPy: the products' plan, as load_model attaches it (a GPU: nothing)
        m.warm_up(n_past + max(Ns))  # on a GPU: record the graphs outside the timings
        return m

    def seconds(m, T, n_logits):
        ids = list(range(n_past + T))
        cache = m.new_cache(n_past + max(Ns))
        m(ids[:n_past], cache, n_logits=0)
        best = float("inf")
        for _ in range(reps):
            cache.rollback(n_past)
            start = time.perf_counter()
            backend_module.to_numpy(m(ids[n_past:], cache, n_logits=n_logits))  # waits for a GPU
            best = min(best, time.perf_counter() - start)
        return best

    target, draft = model("355M", 0), model("124M", 1)
    return dict(
        target={T: seconds(target, T, T) for T in range(1, K_max + 2)},
        draft={T: seconds(draft, T, 1) for T in (1, 2)},
        catch_up=(Ns, [seconds(draft, N, N) for N in Ns]),
        **host_costs())


def h100_costs(K_max: int):
    """The forwards of docs/gpu.md's H100 run (`python -m bench gpu-check`, fused kernels and
    CUDA graphs): T = 1 ms and r(T) at T = 2, 5, 9, 16 of 355M and 124M, linear in between. A
    catch-up over N > 16 tokens runs as ceil(N / 16) graphed chunks (gpt2_cupy/graphs.py), each
    costing a 16-token forward. The host's work per row is measured on this machine."""
    ms = {"355M": 1.264, "124M": 0.548}
    r = {"355M": ([1, 2, 5, 9, 16], [1, 1.07, 1.18, 1.68, 2.06]),
         "124M": ([1, 2, 5, 9, 16], [1, 1.07, 1.32, 2.01, 2.56])}

    def seconds(size, T):
        return 1e-3 * ms[size] * float(np.interp(T, *r[size]))

    Ns = [1, 2, 4, 8, 9, 16, 32, 64]
    return dict(target={T: seconds("355M", T) for T in range(1, K_max + 2)},
                draft={T: seconds("124M", T) for T in (1, 2)},
                catch_up=(Ns, [seconds("124M", min(N, 16)) * -(-N // 16) for N in Ns]),
                **host_costs())


def load_costs(path: str) -> dict:
    costs = json.loads(open(path).read())
    for kind in ("target", "draft"):  # JSON keys are strings
        costs[kind] = {int(T): s for T, s in costs[kind].items()}
    return costs


def cost_functions(costs):
    """(target_seconds, draft_seconds) as functions of (T, n_logits), for CostModel."""
    Ns, catch = costs["catch_up"]

    def target(T, n_logits):
        return costs["target"][T] + n_logits * costs["per_row"] if n_logits else 0.0

    def draft(T, n_logits):
        if not n_logits:
            return 0.0  # the prefill: not part of the decoding time
        if n_logits == 1 and T in costs["draft"]:  # a draft step
            return costs["draft"][T] + costs["per_row"]
        # A catch-up (logits for its plain tokens; timed with logits for all N), whose rows
        # are judged, not turned into distributions.
        return float(np.interp(T, Ns, catch)) + n_logits * costs.get("look_back_row",
                                                                     costs["per_row"])

    return target, draft


def replay(costs, error: float, n: int, seed: int, K_max: int, n_prompt: int = 20,
           adaptive=AdaptiveK, python_time: bool = False):
    """tokens/s of autoregressive, of every fixed K and of adaptive K (the policy
    adaptive(K_max, clock=...) makes) on one scripted prompt. python_time: the decoders' own
    Python time between forwards counts too, as this machine spends it (VirtualClock)."""
    # Wrong positions drawn as ScriptedDrafter draws them: seed s replays the s-th repetition
    # of `python -m bench adaptive` (another prompt, the same pattern of wrong drafts).
    wrong = np.append(np.random.default_rng(seed).random(n) < error, False)
    rng = np.random.default_rng([seed, 1])
    script, prompt = rng.integers(0, 64, n + 1), rng.integers(0, 64, n_prompt).tolist()
    clock = VirtualClock(python_time)
    target_cost, draft_cost = cost_functions(costs)
    target = CostModel(clock, target_cost, script, n_prompt)
    draft = CostModel(clock, draft_cost, script, n_prompt, wrong)
    decoders = {"autoregressive": lambda: autoregressive_sample(target, prompt, n, Warp(0.0))}
    for K in range(1, K_max + 1):
        decoders[f"K={K}"] = lambda K=K: speculative_sample(target, draft, prompt, n, K, Warp(0.0))
    decoders["adaptive"] = lambda: adaptive_speculative_sample(
        target, draft, prompt, n, adaptive(K_max, clock=clock), Warp(0.0))
    rates, reference = {}, None
    for name, decode in decoders.items():
        start = clock()  # the prefill costs no virtual time (cost_functions)
        ids, stats = decode()
        rates[name] = stats.n_generated / (clock() - start)
        reference = reference or ids
        assert ids == reference, "a replayed decoder changed the output"
    return rates


def ngram_texts() -> list:
    """(name, prompt, continuation): texts for the n-gram replay, the continuation playing the
    target's greedy output. Made from gpt2_numpy's source and stored (ngram_texts.json), so
    that the table in docs/ngram.md does not move with the library's docstrings:
    `drafters.lookup` with `tokens` renamed to `context`, after the original; the four steps of
    `decoding.py`'s docstring, restated after that docstring; and paragraphs of `adaptive.py`'s
    docstring, new prose on the same subject, after it."""
    return [tuple(text) for text in json.loads(NGRAM_TEXTS.read_text())]


def ngram_replay(costs, tokenizer, K_max: int, n_max: int = 3):
    """Prompt-lookup drafting (drafters.NGramDrafter, the real one) on texts that repeat their
    prompt to different degrees, against a stand-in 355M target that emits the text (one-hot
    logits) and costs what the measured forwards cost. The lookup's own time is real: it runs,
    and its wall time is added to the virtual clock. Returns rows for a table."""
    from gpt2_numpy.drafters import NGramDrafter

    clock = VirtualClock()
    target_cost = cost_functions(costs)[0]

    class TimedLookup(NGramDrafter):
        def propose(self, tokens, K, warp, rng):
            start = time.perf_counter()
            out = super().propose(tokens, K, warp, rng)
            clock.now += time.perf_counter() - start
            return out

    rows = []
    for name, prompt_text, text in ngram_texts():
        prompt, script = tokenizer.encode(prompt_text), tokenizer.encode(text)
        n = len(script)
        target = CostModel(clock, target_cost, script + [0], len(prompt),
                           n_vocab=tokenizer.n_vocab)
        rates, runs = {}, {}
        decoders = {"autoregressive": lambda: autoregressive_sample(target, prompt, n, Warp(0.0))}
        for K in range(1, K_max + 1):
            decoders[f"K={K}"] = lambda K=K: speculative_sample(
                target, TimedLookup(target.n_vocab, n_max), prompt, n, K, Warp(0.0))
        decoders[f"adaptive, K_max={K_max}"] = lambda: adaptive_speculative_sample(
            target, TimedLookup(target.n_vocab, n_max), prompt, n, AdaptiveK(K_max, clock=clock),
            Warp(0.0))
        for label, decode in decoders.items():
            start = clock()
            ids, stats = decode()
            assert ids == script, "a replayed decoder changed the output"
            rates[label], runs[label] = stats.n_generated / (clock() - start), stats
        best = max((k for k in rates if k.startswith("K=")), key=rates.get)
        rows.append(dict(text=name, n_prompt=len(prompt), n=n, rates=rates, best=best,
                         stats=runs))
    return rows


def spread(x):
    return f"{np.median(x):.2f} / {np.percentile(x, 10):.2f} / {np.min(x):.2f}"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench replay",
                                description="adaptive K over many replayed prompts")
    p.add_argument("--n_tokens", type=int, nargs="+", default=[96, 256])
    p.add_argument("--prompts", type=int, default=50, help="scripted prompts per situation")
    p.add_argument("--errors", type=float, nargs="+",
                   default=[0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0])
    p.add_argument("--K_max", type=int, default=8)
    p.add_argument("--python_time", action="store_true",
                   help="count the decoders' own Python time between forwards, as this "
                        "machine spends it")
    p.add_argument("--stake", type=float, default=1.0,
                   help="AdaptiveK's stake: the share of its budget left one round may risk")
    p.add_argument("--backend", choices=["numpy", "cupy"], default="numpy",
                   help="where the costs are measured")
    p.add_argument("--costs", help="replay with these costs instead: a JSON file from "
                   "--save_costs, or h100 (docs/gpu.md's H100 tables, see h100_costs)")
    p.add_argument("--save_costs", help="write the measured costs to this JSON file")
    p.add_argument("--ngram", metavar="TOKENIZER_DIR", help="replay n-gram (prompt-lookup) "
                   "drafting instead, on texts tokenized with GPT-2's tokenizer from this folder "
                   "(encoder.json and vocab.bpe, e.g. weights/124M)")
    args = p.parse_args(argv)
    if args.prompts < 1 or args.K_max < 1 or min(args.n_tokens) < 2:
        p.error("--prompts and --K_max must be >= 1, --n_tokens >= 2")
    if not 0 < args.stake <= 1:
        p.error("--stake is a share of the budget, in (0, 1]")
    policy = lambda K_max, clock: AdaptiveK(K_max, stake=args.stake, clock=clock)  # noqa: E731
    if not all(0 <= e <= 1 for e in args.errors):
        p.error("--errors are fractions of wrong drafts, in [0, 1]")
    if args.ngram:  # before the costs are measured: a wrong folder fails at once
        from gpt2_numpy.errors import GPT2Error
        from gpt2_numpy.tokenizer import load_tokenizer

        try:
            tokenizer = load_tokenizer(args.ngram)
        except GPT2Error as e:
            p.error(f"--ngram: {e}")

    start = time.perf_counter()
    if args.costs == "h100":
        costs, where = h100_costs(args.K_max), (f"from docs/gpu.md's H100 tables (host work per "
                                                f"row measured on {cpu_name()})")
    elif args.costs:
        costs, where = load_costs(args.costs), f"from {args.costs}"
    else:
        costs = measure_costs(args.K_max, backend=args.backend)
        where = f"measured on {device_name(args.backend)} (random weights)"
    if args.save_costs:
        open(args.save_costs, "w").write(json.dumps(costs, indent=1))
    if args.ngram:
        print(f"# replayed: 355M target costs {where}, greedy; prompt-lookup drafting "
              f"(drafters.NGramDrafter, its lookups timed) on GPT-2 tokens")
    else:
        print(f"# replayed: 355M target / 124M draft costs {where}, "
              f"greedy, {args.prompts} scripted prompts per row"
              + (f"; AdaptiveK(stake={args.stake:g})" if args.stake != 1 else "")
              + ("; the decoders' Python time counted" if args.python_time else ""))
    print("# ms: target T=1.." + str(args.K_max + 1) + ": "
          + " ".join(f"{1e3 * s:.1f}" for s in costs["target"].values())
          + f"; draft T=1,2: {1e3 * costs['draft'][1]:.1f} {1e3 * costs['draft'][2]:.1f}"
          + "; catch-up N=" + ",".join(map(str, costs["catch_up"][0])) + ": "
          + " ".join(f"{1e3 * s:.1f}" for s in costs["catch_up"][1])
          + f"; one row of logits to a distribution {1e3 * costs['per_row']:.3f}"
          + f", judged in a look back {1e3 * costs.get('look_back_row', costs['per_row']):.3f}")
    if args.ngram:
        return print_ngram(costs, tokenizer, args, start)
    print("\n| tokens | wrong drafts | best fixed decoder (by median) | adaptive vs autoregressive: "
          "median / p10 / min | adaptive vs best fixed: median / p10 / min | "
          "best fixed vs autoregressive: median / p10 / min |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n in args.n_tokens:
        for error in args.errors:
            runs = [replay(costs, error, n, seed, args.K_max, adaptive=policy,
                           python_time=args.python_time) for seed in range(args.prompts)]
            names = [k for k in runs[0] if k != "adaptive"]
            rates = {k: np.array([r[k] for r in runs]) for k in runs[0]}
            best = max(names, key=lambda k: np.median(rates[k]))
            ar = rates["autoregressive"]
            print(f"| {n} | {error:.0%} | {best} | {spread(rates['adaptive'] / ar)} | "
                  f"{spread(rates['adaptive'] / rates[best])} | {spread(rates[best] / ar)} |",
                  flush=True)
    print("\nThe prompts `python -m bench adaptive` runs (seeds 0, 1, 2; wrong drafts 0%, 10%, 30%, 100%), "
          f"{args.n_tokens[0]} tokens: adaptive vs autoregressive, replayed")
    for error in (0.0, 0.1, 0.3, 1.0):
        ratios = [replay(costs, error, args.n_tokens[0], seed, args.K_max, adaptive=policy,
                         python_time=args.python_time) for seed in range(3)]
        print(f"  {error:.0%} wrong: " + ", ".join(f"seed {i} {r['adaptive'] / r['autoregressive']:.2f}x"
                                                 for i, r in enumerate(ratios)))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


def print_ngram(costs, tokenizer, args, start):
    rows = ngram_replay(costs, tokenizer, args.K_max)
    adaptive = f"adaptive, K_max={args.K_max}"
    print("\n| text (prompt + continuation tokens) | best fixed K: vs autoregressive | drafts "
          "accepted / proposed | tokens per target forward | K=4 | adaptive: vs autoregressive "
          "| adaptive: accepted / proposed | adaptive: K:rounds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        speed = {k: v / r["rates"]["autoregressive"] for k, v in r["rates"].items()}
        best, a = r["stats"][r["best"]], r["stats"][adaptive]
        Ks = " ".join(f"{K}:{c}" for K, c in enumerate(np.bincount(a.K_per_round)) if c)
        print(f"| {r['text']} ({r['n_prompt']} + {r['n']}) | "
              f"{r['best']}: {speed[r['best']]:.2f}x | {best.accepted} / {best.drafted} | "
              f"{best.tokens_per_round:.2f} | "
              f"{speed.get('K=4', float('nan')):.2f}x | {speed[adaptive]:.2f}x | "
              f"{a.accepted} / {a.drafted} | {Ks} |", flush=True)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
