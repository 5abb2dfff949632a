"""Compare autoregressive and speculative decoding of GPT-2, side by side.

    python main.py --K 4 --temperature 0

The draft (124M by default) proposes K tokens per round; the target (355M) checks them all in one
forward. Both runs sample from the same target distribution with the same seed, so with
--temperature 0 they print the same text; whether speculative decoding is faster depends on the
hardware and on how often the target accepts the draft (docs/performance.md). --mode all adds a
third run, the draft alone, and says where speculative decoding lands between the two speeds.
Flags, errors and output: docs/cli.md.
"""
import argparse
import json
import math
import os
import sys
import time

import gpt2_numpy

gpt2_numpy.tune_process()  # first, before NumPy loads OpenBLAS: its kernels, malloc (tuning.py)

import numpy as np  # noqa: E402
from gpt2_numpy.errors import GPT2Error  # noqa: E402
from gpt2_numpy.sampling import MIN_TEMPERATURE  # noqa: E402
from gpt2_numpy.show import visible  # noqa: E402

DEFAULT_PROMPT = "Alan Turing theorized that computers would one day become"
MODES = {"both": ["autoregressive", "speculative"],
         "all": ["autoregressive", "draft_alone", "speculative"],
         "autoregressive": ["autoregressive"], "speculative": ["speculative"]}


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one `error:` line (exit 2) like every other bad input."""

    def error(self, message):
        self.exit(2, f"error: {message} (python main.py --help lists the flags)\n")


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--n_tokens_to_generate", type=int, default=60)
    p.add_argument("--draft_model_size", default="124M", help="a size or a folder of official files")
    p.add_argument("--target_model_size", default="355M", help="a size or a folder of official files")
    p.add_argument("--K", type=int, default=4, help="draft tokens proposed per round (with "
                   "--adaptive: the most)")
    p.add_argument("--adaptive", action="store_true",
                   help="choose K in [0, --K] before each round, for the most tokens per second")
    p.add_argument("--draft", choices=["model", "ngram"], default="model",
                   help="model: --draft_model_size drafts; ngram: copy from the context itself")
    p.add_argument("--tree", default=None, metavar="W1,W2,...",
                   help="draft a token tree instead of a chain: W_d children per node at depth d "
                   "(e.g. 2,2,1,1; gpt2_numpy/tree.py)")
    p.add_argument("--show", action="store_true",
                   help="stream the speculative text, coloured by how each token was produced")
    p.add_argument("--temperature", type=float, default=0.0,
                   help=f"0 means greedy; otherwise at least {MIN_TEMPERATURE:.2g} (a smaller "
                   "one makes logits / T overflow, and is an error)")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=123, help="an integer >= 0")
    p.add_argument("--models_dir", default=None, help="download cache (default: weights/)")
    p.add_argument("--verify", action="store_true",
                   help="check the weights against the checkpoint's CRC-32Cs even if that was "
                   "done before (it is done once per downloaded or changed file anyway)")
    p.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="how the GPU stores the weights (--backend cupy); sums stay float32")
    p.add_argument("--mode", choices=list(MODES), default="both",
                   help="both (the default): the target alone, then speculative decoding, the "
                   "comparison that matters (the same distribution, and how much faster); all: "
                   "also the draft model alone, the speed ceiling, at the cost of one more run; "
                   "autoregressive or speculative: one of them")
    p.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def check_args(args):
    """Reject flags that do not go together, and values the library does not check, before
    anything is downloaded or loaded. (The library checks the rest: see decoding_settings.)"""
    if args.seed < 0:
        raise GPT2Error(f"--seed must be >= 0, got {args.seed}")
    if args.show and args.json:
        raise GPT2Error("--show streams text and --json prints nothing but one JSON object: "
                        "use one of them")
    if args.dtype != "float32" and args.backend != "cupy":
        raise GPT2Error(f"--dtype {args.dtype} is for the GPU: it needs --backend cupy")
    if args.mode == "all" and args.draft == "ngram":
        raise GPT2Error("--mode all also runs the draft model alone: it needs --draft model")
    speculative_only = {"--adaptive": args.adaptive, "--show": args.show,
                        "--draft ngram": args.draft == "ngram"}
    for flag, used in speculative_only.items():
        if used and args.mode == "autoregressive":
            raise GPT2Error(f"{flag} is about speculative decoding: it needs --mode speculative "
                            "or both")


def decoding_settings(args):
    """The warp, and with --adaptive the K policy, built by the library's own classes and
    checks. Returns (warp, policy or None)."""
    from gpt2_numpy import AdaptiveK, Warp
    from gpt2_numpy.decoding import check_K, check_n_new

    check_n_new(args.n_tokens_to_generate)
    warp = Warp(args.temperature, args.top_k, args.top_p)
    if args.adaptive:
        return warp, AdaptiveK(args.K)
    check_K(args.K)
    return warp, None


def tree_widths(args):
    """--tree W1,W2,... as a list of widths (None without --tree), checked as far as it can be
    before the prompt is known; run() checks it against the room the prompt leaves."""
    if args.tree is None:
        return None
    from gpt2_numpy.tree import check_widths

    if args.mode == "autoregressive":
        raise GPT2Error("--tree is about speculative decoding: it needs --mode speculative or both")
    if args.adaptive:
        raise GPT2Error("--tree and --adaptive do not go together: a tree's widths are fixed")
    try:
        widths = [int(w) for w in args.tree.split(",")]
    except ValueError:
        raise GPT2Error(f"--tree takes integers separated by commas, got {args.tree!r}") from None
    check_widths(widths)
    return widths


def backend_module(name):
    if name == "cupy":
        import gpt2_cupy

        return gpt2_cupy
    return gpt2_numpy


def model_names(args, modes):
    """The models the runs need: the target, and the draft unless n-gram lookup drafts."""
    uses_draft = ("speculative" in modes and args.draft == "model") or "draft_alone" in modes
    return [args.target_model_size] + ([args.draft_model_size] if uses_draft else [])


def load_models(args, modes, gpt2):
    """Download what is missing (every failure named at once), check the weights' CRC-32Cs if
    --verify asks, and load. Returns (target, draft or None, seconds spent loading)."""
    from gpt2_numpy.download import resolve_model_dirs
    from gpt2_numpy.load import repair_advice
    from gpt2_numpy.verify import verify_checkpoint

    names = model_names(args, modes)
    progress = not args.no_progress
    folders = resolve_model_dirs(dict.fromkeys(names), args.models_dir, progress=progress)
    if args.verify:  # check now, whatever was recorded; load_model then finds the fresh record
        for name, folder in zip(dict.fromkeys(names), folders):
            with repair_advice(name):
                verify_checkpoint(folder, progress)
    start = time.perf_counter()
    on_gpu = {"dtype": args.dtype} if args.backend == "cupy" else {}
    target, *draft = [gpt2.load_model(name, args.models_dir, progress=progress, **on_gpu)
                      for name in names]
    if "speculative" in modes and args.draft == "ngram":
        draft = [gpt2_numpy.NGramDrafter(target.n_vocab)]
    return target, (draft[0] if draft else None), time.perf_counter() - start


def encode_prompt(target, args):
    prompt = target.tokenizer.encode(args.prompt, allowed_special="all")
    if len(prompt) + args.n_tokens_to_generate > target.n_ctx:
        raise GPT2Error(f"prompt ({len(prompt)} tokens) + --n_tokens_to_generate "
                        f"({args.n_tokens_to_generate}) exceeds the context of {target.n_ctx} tokens")
    return prompt


def progress_bar(total, desc, enabled):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="tok", disable=not enabled, leave=False, file=sys.stderr)
    return bar, (lambda ids, kinds: bar.update(len(ids)))


def decode(mode, gpt2, target, draft, prompt, args, warp, policy, widths):
    """One run, seeded alike for every mode: (new token ids, Stats)."""
    from gpt2_numpy.show import show_stream

    rng = np.random.default_rng(args.seed)  # the same stream for every mode: same seed, same draws
    showing = args.show and mode == "speculative"
    bar, on_tokens = progress_bar(args.n_tokens_to_generate, mode,
                                  not (args.no_progress or args.json or showing))
    if showing:  # the coloured text is the progress display
        on_tokens = show_stream(target.tokenizer, target.tokenizer.decode(prompt))
    n = args.n_tokens_to_generate
    if mode in ("autoregressive", "draft_alone"):  # the target alone, or the draft alone
        model = target if mode == "autoregressive" else draft
        ids, stats = gpt2.autoregressive_sample(model, prompt, n, warp, rng, on_tokens)
    elif widths:  # a token tree in place of the chain
        ids, stats = gpt2.tree_speculative_sample(target, draft, prompt, n, widths, warp, rng,
                                                  on_tokens)
    elif policy is not None:  # --adaptive: the policy chooses each round's K
        ids, stats = gpt2.adaptive_speculative_sample(target, draft, prompt, n, policy, warp,
                                                      rng, on_tokens)
    else:
        ids, stats = gpt2.speculative_sample(target, draft, prompt, n, args.K, warp, rng,
                                             on_tokens)
    bar.close()
    if showing:
        on_tokens.close()
        print()
    return ids, stats


def run(args):
    """Check the flags, load the models, decode in every mode asked for, and report."""
    check_args(args)
    warp, policy = decoding_settings(args)  # checked before anything is downloaded or loaded
    widths = tree_widths(args)
    gpt2, modes = backend_module(args.backend), MODES[args.mode]
    target, draft, load_seconds = load_models(args, modes, gpt2)
    prompt = encode_prompt(target, args)
    if widths:
        from gpt2_numpy.tree import check_widths

        check_widths(widths, room=target.n_ctx - len(prompt))
    # Untimed: page every weight in (or, on a GPU, compile the kernels and record the CUDA graphs
    # the timed runs replay, for caches of the capacity the decoders ask for: gpt2_cupy/graphs.py).
    for model in [target] + ([draft] if draft is not None and args.draft == "model" else []):
        model.warm_up(len(prompt) + args.n_tokens_to_generate - 1)
    results = {}
    for mode in modes:
        ids, stats = decode(mode, gpt2, target, draft, prompt, args, warp, policy, widths)
        results[mode] = {"token_ids": ids, "text": target.tokenizer.decode(ids), **stats.as_dict()}
    return make_report(args, target.tokenizer.decode(prompt), prompt, draft, widths, load_seconds,
                       results)


def make_report(args, prompt_text, prompt, draft, widths, load_seconds, results):
    """The runs' results, the settings, and what compares them. `prompt_text` is the prompt as
    its tokens decode (an invalid UTF-8 byte on the command line becomes U+FFFD, as it was fed)."""
    report = {
        "prompt": prompt_text, "prompt_token_ids": prompt, "backend": args.backend,
        "dtype": args.dtype,
        "draft": (args.draft_model_size if args.draft == "model" else "ngram") if draft else None,
        "target": args.target_model_size, "K": args.K, "adaptive": args.adaptive, "tree": widths,
        "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
        "seed": args.seed, "load_seconds": load_seconds, **results,
    }
    if "autoregressive" in results and "speculative" in results:
        ar, sp = results["autoregressive"], results["speculative"]
        report["same_tokens"] = ar["token_ids"] == sp["token_ids"]
        # Nothing drafted: both runs were plain target steps, and their ratio is only noise.
        report["speedup"] = ar["decode_seconds"] / sp["decode_seconds"] if sp["drafted"] else None
        if not (args.adaptive or args.draft == "ngram" or widths) and sp["drafted"]:
            # With a draft model and a fixed K, the papers' prediction from the measured
            # acceptance a and the cost ratio c of one draft forward to one target forward:
            # (1 - a^(K+1)) / ((1 - a)(K c + 1)), i.e. tokens per round / round cost.
            c = ((sp["draft_seconds"] / sp["draft_calls"])
                 / (ar["target_seconds"] / ar["target_calls"]))
            tokens = gpt2_numpy.expected_tokens(args.K, sp["acceptance_rate"])
            report["c"], report["predicted_speedup"] = c, tokens / (args.K * c + 1)
    if "draft_alone" in results:
        speeds = (results[m]["tokens_per_second"] for m in MODES["all"])  # target, draft, spec.
        report["speculative_position"] = position_between(*speeds)
    return report


def position_between(target_speed, draft_speed, speculative_speed):
    """Where speculative decoding lands between its two bounds, in tokens per second:
    0 at the target alone's speed, 1 at the draft alone's. Below 0 it is slower than the target
    alone; above 1 faster than the draft alone (timing noise: every round runs K draft forwards and
    a target forward). None (JSON null) when there is no range: the draft alone is not faster than
    the target alone, or a speed is undefined."""
    speeds = (target_speed, draft_speed, speculative_speed)
    if not all(math.isfinite(s) for s in speeds) or draft_speed <= target_speed:
        return None
    return (speculative_speed - target_speed) / (draft_speed - target_speed)


def describe_position(r) -> str:
    """The position between the bounds in words (print_report)."""
    target, draft, sp = (r[m]["tokens_per_second"] for m in ("autoregressive", "draft_alone",
                                                              "speculative"))
    f = r["speculative_position"]
    if f is None:
        return (f"Between the bounds: none to place speculative in (draft alone {draft:.1f} "
                f"tokens/s is not faster than target alone {target:.1f})")
    if f < 0:
        return (f"Between the bounds: below them, speculative is slower than the target alone "
                f"({sp / target:.2f}x its speed)")
    if f > 1:
        return (f"Between the bounds: above them, speculative is faster than the draft alone "
                f"({sp / draft:.2f}x its speed)")
    return (f"Between the bounds: speculative reaches {100 * f:.0f}% of the way from target speed "
            f"({target:.1f} tokens/s) to draft speed ({draft:.1f} tokens/s)")


def print_report(r):
    three = "draft_alone" in r  # --mode all
    for mode, title in (("autoregressive", "Autoregressive Decoding, Target Alone" if three
                         else "Autoregressive Decoding"),
                        ("draft_alone", "Autoregressive Decoding, Draft Alone"),
                        ("speculative", "Speculative Decoding")):
        if mode not in r:
            continue
        m = r[mode]
        print(title)
        print("-" * len(title))
        print(f"Time = {m['decode_seconds']:.2f}s for {m['n_generated']} tokens "
              f"({m['tokens_per_second']:.1f} tokens/s), after {m['prefill_seconds']:.2f}s "
              "reading the prompt (prefill)")
        print(f"Text = {visible(r['prompt'] + m['text'])}")  # control characters shown, not sent
        if mode == "speculative":
            hist = " ".join(f"{k}:{n}" for k, n in enumerate(m["accepted_histogram"]))
            rate = (f"acceptance rate {m['acceptance_rate']:.2f}" if m["drafted"]
                    else "no acceptance rate: nothing was drafted")
            print(f"Rounds = {m['rounds']}, drafted {m['drafted']}, accepted {m['accepted']} "
                  f"({rate}), {m['tokens_per_round']:.2f} tokens per round")
            print(f"Accepted per round (accepted:rounds) = {hist}")
            if r["adaptive"] or r["draft"] == "ngram":
                Ks = np.bincount(m["K_per_round"]).tolist()
                print("Drafts per round (K:rounds) = " + " ".join(f"{k}:{n}" for k, n in
                                                               enumerate(Ks) if n))
            print(f"Time in draft = {m['draft_seconds']:.2f}s, in target = {m['target_seconds']:.2f}s")
        if m["stopped_at_context"]:
            print("(stopped: the context is full)")
        print()
    if "speedup" in r and r["speedup"] is None:
        print("Speedup: none to report, nothing was drafted (every round was a plain target step)")
    elif "predicted_speedup" in r:
        print(f"Speedup = {r['speedup']:.2f}x  (the formula predicts {r['predicted_speedup']:.2f}x "
              f"for acceptance {r['speculative']['acceptance_rate']:.2f}, K={r['K']}, "
              f"c={r['c']:.2f})")
    elif "speedup" in r:  # K varied from round to round: no single-K prediction
        print(f"Speedup = {r['speedup']:.2f}x")
    if "same_tokens" in r and r["temperature"] == 0:
        print("Same tokens = " + ("yes" if r["same_tokens"] else "NO"))
    if three:
        print(describe_position(r))


def strict_json(value):
    """The report with every NaN or infinity (a rate of nothing, e.g. the acceptance rate when
    nothing was drafted) as None, i.e. JSON's null: RFC 8259 has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
        if args.json:
            print(json.dumps(strict_json(report), allow_nan=False))
        else:
            print_report(report)
    except GPT2Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. piped into `head`, which has read what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
    return 0


if __name__ == "__main__":
    sys.exit(main())
