"""main.py's command line: the flags and their checks, loading the models, the report (text and
JSON) with the numbers that compare the runs, and output a terminal cannot be fooled by.

main.py reads as the comparison itself (load, decode from the same seed, report); everything a
user can get wrong, and how the results are put into words, lives here. Flags, output and
errors: docs/cli.md.
"""
import argparse
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional

import numpy as np

from .adaptive import AdaptiveK, expected_tokens
from .checks import check_K, check_n_new, check_vocabularies
from .download import MODEL_FILES, MODEL_SIZES, resolve_model_dirs
from .drafters import NGramDrafter
from .errors import GPT2Error
from .load import official_hparams, repair_advice
from .medusa import MedusaHeads
from .sampling import MIN_TEMPERATURE, Warp
from .show import show_stream, visible
from .tree import check_widths, tree_size
from .verify import verify_checkpoint

DEFAULT_PROMPT = "Alan Turing theorized that computers would one day become"
DEFAULT_K = 4
MODES = {"both": ["autoregressive", "speculative"],
         "all": ["autoregressive", "draft_alone", "speculative"],
         "autoregressive": ["autoregressive"], "speculative": ["speculative"]}

# A ratio of two times (a speedup, c, the position between speeds) is reported only when each
# time is long enough to measure: at least MIN_SECONDS, so that one hiccup of the operating
# system (a context switch, a page touched for the first time: about a millisecond) moves it by
# a few percent at most, and over at least MIN_FORWARDS forwards, so that neither one round's
# luck nor what a first call costs decides it (docs/cli.md).
MIN_SECONDS, MIN_FORWARDS = 0.05, 10
RUNS = {"autoregressive": "the target alone", "draft_alone": "the draft alone",
        "speculative": "speculative decoding"}  # each run in words


class DraftKind(NamedTuple):
    """A way to draft (--draft NAME): its help, whether it loads --draft_model_size, and how to
    build what the decoders take as `draft` from the target and the draft model (or None)."""

    help: str
    loads_draft_model: bool
    make: Callable


def fitting_heads(path: str, target) -> MedusaHeads:
    """--heads FILE, made for the target's shape (one error line if not)."""
    heads = MedusaHeads.load(path)
    heads.check_fits(target)
    return heads


DRAFTS = {
    "model": DraftKind("--draft_model_size drafts", True, lambda args, target, model: model),
    "ngram": DraftKind("copy from the context itself (docs/ngram.md)", False,
                       lambda args, target, model: NGramDrafter(target.n_vocab)),
    "medusa": DraftKind("Medusa heads on the target itself, --heads FILE (docs/medusa.md)", False,
                        lambda args, target, model: fitting_heads(args.heads, target)),
}


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one `error:` line (exit 2) like every other bad input."""

    def error(self, message):
        self.exit(2, f"error: {one_line(message)} (python main.py --help lists the flags)\n")


def parse_args(argv=None, description: str = None):
    return make_parser(description).parse_args(argv)


def make_parser(description: str = None) -> Parser:
    p = Parser(description=description)
    p.add_argument("--prompt", default=DEFAULT_PROMPT, metavar="TEXT",
                   help=f"the text to continue (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--n_tokens_to_generate", type=int, default=60, metavar="N",
                   help="exactly this many new tokens; with the prompt they must fit in each "
                   "model's context (default: %(default)s)")
    p.add_argument("--draft_model_size", default="124M", metavar="MODEL", help="the draft: a size ("
                   f"{', '.join(MODEL_SIZES)}) or a folder of official files "
                   "(default: %(default)s)")
    p.add_argument("--target_model_size", default="355M", metavar="MODEL",
                   help="the target: a size or a folder of official files (default: %(default)s)")
    p.add_argument("--K", type=int, default=None, help="draft tokens proposed per round; with "
                   f"--adaptive, the most; not with --tree (default: {DEFAULT_K})")
    p.add_argument("--adaptive", action="store_true", help="choose K in [0, --K] before each "
                   "round, for the most tokens per second (default: off)")
    p.add_argument("--draft", choices=list(DRAFTS), default="model", help="; ".join(
        f"{name}: {kind.help}" for name, kind in DRAFTS.items()) + " (default: %(default)s)")
    p.add_argument("--heads", default=None, metavar="FILE", help="the Medusa heads --draft medusa "
                   "drafts with: an .npz from python -m gpt2_numpy.medusa train (default: none)")
    p.add_argument("--tree", default=None, metavar="W1,...,WD",
                   help="draft a token tree instead of a chain, of widths (W1, ..., WD): "
                   "a node at depth d - 1 gets up to W_d children, the root (the newest committed "
                   "token) being depth 0 (e.g. 2,2,1,1; gpt2_numpy/tree.py) (default: off)")
    p.add_argument("--show", action="store_true", help="stream the speculative text, coloured by "
                   "how each token was produced (default: off)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help=f"0 means greedy; otherwise at least {MIN_TEMPERATURE:.2g} (a smaller "
                   "one makes logits / T overflow, and is an error) (default: 0)")
    p.add_argument("--top_k", type=int, default=None, metavar="k", help="sample among the k "
                   "most likely tokens only; needs a temperature > 0 (default: off)")
    p.add_argument("--top_p", type=float, default=None, metavar="p", help="sample among the "
                   "most likely tokens whose probabilities add up to p, in (0, 1]; needs a "
                   "temperature > 0 (default: off)")
    p.add_argument("--seed", type=int, default=123, metavar="N",
                   help="an integer >= 0, seeding every run alike (default: %(default)s)")
    p.add_argument("--models_dir", default=None, metavar="FOLDER",
                   help="download cache (default: $GPT2_MODELS_DIR, else weights/)")
    p.add_argument("--verify", action="store_true",
                   help="check the weights against the checkpoint's CRC-32Cs even if that was "
                   "done before (it is done once per downloaded or changed file anyway) "
                   "(default: off)")
    p.add_argument("--backend", choices=["numpy", "cupy"], default="numpy",
                   help="numpy: the CPU; cupy: an NVIDIA GPU (default: %(default)s)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="how the GPU stores the weights (--backend cupy); sums stay float32 "
                   "(default: %(default)s)")
    p.add_argument("--mode", choices=list(MODES), default="both",
                   help="both: the target alone, then speculative decoding, the comparison that "
                   "matters (the same distribution, and how much faster); all: also the draft "
                   "model alone, the speed ceiling, at the cost of one more run; autoregressive "
                   "or speculative: one of them (default: %(default)s)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object and nothing else (default: off)")
    p.add_argument("--no_progress", action="store_true",
                   help="no progress bars (default: off)")
    return p


# --- the checks that need no model ----------------------------------------------------------------

class Settings(NamedTuple):
    """The flags, checked and resolved."""

    modes: List[str]  # the runs, in order
    warp: Warp
    K: Optional[int]  # drafts per round (with --adaptive the most); None where no chain drafts
    policy: Optional[AdaptiveK]  # --adaptive
    widths: Optional[List[int]]  # --tree
    models: List[str]  # the target, then the draft model if one is loaded


def check(args) -> Settings:
    """Every check that needs no model, so that a mistake is named before anything is downloaded
    or loaded. The library checks values in its own words (Warp, check_K, AdaptiveK)."""
    modes = MODES[args.mode]
    speculative = "speculative" in modes
    if not args.prompt:
        raise GPT2Error("--prompt is empty: the target needs at least one token to continue")
    check_n_new(args.n_tokens_to_generate)
    if args.seed < 0:
        raise GPT2Error(f"--seed must be >= 0, got {args.seed}")
    warp = Warp(args.temperature, args.top_k, args.top_p)
    for flag, value in (("--top_k", args.top_k), ("--top_p", args.top_p)):
        if value is not None and warp.temperature == 0:
            raise GPT2Error(f"{flag} filters what is sampled, but --temperature 0 (the default) "
                            "takes the most likely token, which every filter keeps: give a "
                            f"temperature > 0, or leave {flag} out")
    if args.show and args.json:
        raise GPT2Error("--show streams text and --json prints nothing but one JSON object: "
                        "use one of them")
    if args.dtype != "float32" and args.backend != "cupy":
        raise GPT2Error(f"--dtype {args.dtype} is for the GPU: it needs --backend cupy")
    speculative_only = {"--adaptive": args.adaptive, "--show": args.show,
                        "--K": args.K is not None, "--tree": args.tree is not None,
                        f"--draft {args.draft}": args.draft != "model"}
    for flag, used in speculative_only.items():
        if used and not speculative:
            raise GPT2Error(f"{flag} is about speculative decoding: it needs --mode both, all "
                            "or speculative")
    draft = DRAFTS[args.draft]
    if args.mode == "all" and not draft.loads_draft_model:
        raise GPT2Error("--mode all also runs the draft model alone: it needs --draft model")
    widths = tree_widths(args)
    if args.draft == "medusa" and speculative:
        widths = medusa_widths(args, widths)
    elif args.heads is not None:
        raise GPT2Error("--heads is for --draft medusa: Medusa heads draft for no other kind")
    K = None if widths or not speculative else DEFAULT_K if args.K is None else args.K
    policy = AdaptiveK(K) if args.adaptive else None  # checks K as the most drafts per round
    if K is not None and policy is None:
        check_K(K)
    models = {"--target_model_size": args.target_model_size}
    if draft.loads_draft_model and (speculative or "draft_alone" in modes):
        models["--draft_model_size"] = args.draft_model_size
    for flag, name in models.items():
        check_model_name(flag, name, args.n_tokens_to_generate)
    return Settings(modes, warp, K, policy, widths, list(models.values()))


def tree_widths(args) -> Optional[List[int]]:
    """--tree W1,...,WD as a list of widths (None without --tree), checked as far as it can be
    before the prompt is known; encode_prompt checks it against the room the prompt leaves."""
    if args.tree is None:
        return None
    if args.adaptive:
        raise GPT2Error("--tree and --adaptive do not go together: a tree's widths are fixed")
    if args.K is not None:
        raise GPT2Error("--K is a chain's drafts per round: a tree drafts the nodes its widths "
                        "give (--tree), so leave --K out")
    try:
        widths = [int(w) for w in args.tree.split(",")]
    except ValueError:
        raise GPT2Error(f"--tree takes integers separated by commas, got {args.tree!r}") from None
    check_widths(widths)
    return widths


def medusa_widths(args, widths: Optional[List[int]]) -> List[int]:
    """--draft medusa drafts a token tree from the heads of --heads FILE (read now, so that a bad
    file is named before any model is loaded): --tree's widths, or a chain of one candidate per
    head. A chain's K and --adaptive's choice of it are no Medusa settings."""
    if args.heads is None:
        raise GPT2Error("--draft medusa needs --heads FILE: Medusa heads trained for the target "
                        "(python -m gpt2_numpy.medusa train)")
    for flag, used in (("--K", args.K is not None), ("--adaptive", args.adaptive)):
        if used:
            raise GPT2Error(f"{flag} does not go with --draft medusa: the heads draft one "
                            "candidate per head, or the tree of --tree")
    n_heads = MedusaHeads.load(args.heads).n_heads
    widths = widths or [1] * n_heads
    if len(widths) > n_heads:
        raise GPT2Error(f"--tree {args.tree} is {len(widths)} levels deep, but {args.heads} has "
                        f"{n_heads} heads: one head drafts each level")
    return widths


def is_folder(name: str) -> bool:
    return bool(name) and Path(name).expanduser().is_dir()  # a folder wins, as in download.py


def check_model_name(flag: str, name: str, n_new: int) -> None:
    """A size or a folder; a size's context known without loading it (1024 tokens)."""
    wanted = f"a size ({', '.join(MODEL_SIZES)}) or a folder holding {', '.join(MODEL_FILES)}"
    if not name.strip():
        raise GPT2Error(f"{flag} is empty: it wants {wanted}")
    if not is_folder(name) and name not in MODEL_SIZES:
        raise GPT2Error(f"{flag}: unknown model {name!r}: use {wanted}")
    if not is_folder(name) and n_new >= official_hparams(name)["n_ctx"]:
        n_ctx = official_hparams(name)["n_ctx"]
        raise GPT2Error(f"--n_tokens_to_generate ({n_new}) leaves no room for the prompt in the "
                        f"context of {n_ctx} tokens ({flag} {name})")


# --- loading, and the checks that need the models ------------------------------------------------

def load_models(args, settings: Settings, gpt2):
    """Download what is missing (every failure named at once), check the weights' CRC-32Cs if
    --verify asks, and load on the backend `gpt2` (gpt2_numpy or gpt2_cupy). Returns (target,
    draft, seconds spent loading); the draft is what speculative decoding drafts with (for
    --mode all, the draft model), None when no run drafts."""
    progress = not args.no_progress
    names = list(dict.fromkeys(settings.models))
    folders = resolve_model_dirs(names, args.models_dir, progress=progress)
    if args.verify:  # check now, whatever was recorded; load_model then finds the fresh record
        for name, folder in zip(names, folders):
            with repair_advice(name):
                verify_checkpoint(folder, progress)
    start = time.perf_counter()
    on_gpu = {"dtype": args.dtype} if args.backend == "cupy" else {}
    target, *model = [gpt2.load_model(name, args.models_dir, progress=progress, **on_gpu)
                      for name in settings.models]
    model = model[0] if model else None
    if model is not None:  # before any run: the same tokenizer, or no speculative decoding
        check_vocabularies(model, target)
    if "speculative" in settings.modes:
        model = DRAFTS[args.draft].make(args, target, model)
    return target, model, time.perf_counter() - start


def encode_prompt(args, settings: Settings, target, draft) -> List[int]:
    """The prompt's tokens, once they and the tokens to generate are known to fit in each
    model's context (and a whole tree beyond them in the draft's)."""
    prompt = target.tokenizer.encode(args.prompt, allowed_special="all")
    n, needed = args.n_tokens_to_generate, len(prompt) + args.n_tokens_to_generate
    models = {"target": (target, "--target_model_size")}
    if hasattr(draft, "n_ctx"):
        models["draft"] = (draft, "--draft_model_size")
    for role, (model, flag) in models.items():
        if needed > model.n_ctx:
            raise GPT2Error(f"prompt ({len(prompt)} tokens) + --n_tokens_to_generate ({n}) "
                            f"exceeds the {role}'s context of {model.n_ctx} tokens "
                            f"({flag} {model.name})")
    if settings.widths:
        check_widths(settings.widths, room=min(m.n_ctx for m, _ in models.values()) - len(prompt))
        # The tree's caches hold a whole tree beyond the committed tokens, within the target's
        # context (tree.py): a draft with a shorter context must have that room too.
        tree_end = min(target.n_ctx, needed - 1 + tree_size(settings.widths))
        if "draft" in models and tree_end > draft.n_ctx:
            raise GPT2Error(f"a tree of widths {settings.widths} after the prompt and the tokens "
                            f"to generate needs up to {tree_end} positions, more than the draft's "
                            f"context of {draft.n_ctx} tokens (--draft_model_size {draft.name})")
    return prompt


@contextmanager
def streaming(mode: str, args, tokenizer, prompt: List[int]):
    """on_tokens for one run: with --show, the speculative text in colour (the progress display);
    otherwise a progress bar on stderr, unless --no_progress or --json."""
    if args.show and mode == "speculative":
        show = show_stream(tokenizer, tokenizer.decode(prompt), out=Output(sys.stdout))
        yield show
        show.close()
        show.out.write("\n")
        return
    from tqdm import tqdm

    bar = tqdm(total=args.n_tokens_to_generate, desc=mode, unit="tok", leave=False,
               disable=args.no_progress or args.json, file=sys.stderr)
    yield lambda ids, kinds: bar.update(len(ids))
    bar.close()


# --- the report -----------------------------------------------------------------------------------

def too_short(times: dict) -> Optional[str]:
    """Why a ratio of these times is not reported, or None if each is long enough to measure.
    times: {what, in words: (seconds, forwards)}."""
    short = [f"{what}: {seconds:.3f} s, {forwards} forwards"
             for what, (seconds, forwards) in times.items()
             if not seconds >= MIN_SECONDS or forwards < MIN_FORWARDS]
    if not short:
        return None
    return (f"too short to measure ({'; '.join(short)}; a ratio of times needs at least "
            f"{MIN_SECONDS:g} s and {MIN_FORWARDS} forwards of each: docs/cli.md)")


def drafts_used(sp: dict) -> int:
    """The K of a fixed-K run as its rounds used it: the most any round drafted (a round drafts
    no more than the tokens left, so a K beyond them is never used)."""
    return max(sp["K_per_round"])


def make_report(args, settings: Settings, tokenizer, prompt, load_seconds, runs) -> dict:
    """The runs' results (runs: {mode: (new token ids, Stats)}), the settings, and the numbers
    that compare the runs. A number that cannot be trusted is None (JSON's null), and
    report["why_null"] says why."""
    results = {mode: {"token_ids": ids, "text": tokenizer.decode(ids), **stats.as_dict()}
               for mode, (ids, stats) in runs.items()}
    draft = args.draft_model_size if DRAFTS[args.draft].loads_draft_model else args.draft
    report = {
        # the prompt as its tokens decode: an invalid UTF-8 byte became U+FFFD, as it was fed
        "prompt": tokenizer.decode(prompt), "prompt_token_ids": prompt, "backend": args.backend,
        "dtype": args.dtype, "draft": None if list(runs) == ["autoregressive"] else draft,
        "target": args.target_model_size, "K": settings.K, "adaptive": args.adaptive,
        "tree": settings.widths, "temperature": args.temperature, "top_k": args.top_k,
        "top_p": args.top_p, "seed": args.seed, "load_seconds": load_seconds, **results,
    }
    why = {}
    if "autoregressive" in results and "speculative" in results:
        ar, sp = results["autoregressive"], results["speculative"]
        report["same_tokens"] = ar["token_ids"] == sp["token_ids"]
        # Nothing drafted: both runs were plain target steps, and their ratio is only noise.
        why["speedup"] = (too_short(decoding_times(results, ["autoregressive", "speculative"]))
                          if sp["drafted"] else
                          "nothing was drafted (every round was a plain target step)")
        report["speedup"] = None if why["speedup"] else ar["decode_seconds"] / sp["decode_seconds"]
        fixed_K = settings.K is not None and settings.policy is None
        if fixed_K and DRAFTS[args.draft].loads_draft_model and sp["drafted"]:
            report.update(prediction(ar, sp, drafts_used(sp), why))
    if "draft_alone" in results:
        why["speculative_position"] = too_short(decoding_times(results, MODES["all"]))
        speeds = (results[mode]["tokens_per_second"] for mode in MODES["all"])
        report["speculative_position"] = None if why["speculative_position"] else \
            position_between(*speeds)
        if report["speculative_position"] is None and not why["speculative_position"]:
            why["speculative_position"] = ("no range: the draft alone is not faster than the "
                                           "target alone")
    report["why_null"] = {name: reason for name, reason in why.items() if reason}
    return report


def decoding_times(results: dict, modes) -> dict:
    """{run in words: (decoding seconds, forwards)} for the runs `modes`: what a ratio of their
    speeds divides (the forwards of the run's own model: the target, or the draft alone)."""
    return {RUNS[m]: (results[m]["decode_seconds"], results[m]["target_calls"]) for m in modes}


def prediction(ar: dict, sp: dict, K: int, why: dict) -> dict:
    """The papers' prediction for a draft model and a fixed K, from the measured acceptance a
    and the cost ratio c of one draft forward to one target forward:
        (1 - a^(K+1)) / ((1 - a)(K c + 1)),  i.e. tokens per round / cost of a round,
    for the K the rounds used. Returns {"c", "predicted_speedup"}, None where c is too short to
    measure (and then why[...] says so)."""
    why["c"] = too_short({"the draft's forwards": (sp["draft_seconds"], sp["draft_calls"]),
                          "the target's forwards": (ar["target_seconds"], ar["target_calls"])})
    if why["c"]:
        why["predicted_speedup"] = f"c is {why['c']}"
        return {"c": None, "predicted_speedup": None}
    c = (sp["draft_seconds"] / sp["draft_calls"]) / (ar["target_seconds"] / ar["target_calls"])
    return {"c": c, "predicted_speedup": expected_tokens(K, sp["acceptance_rate"]) / (K * c + 1)}


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
    target, draft, sp = (r[m]["tokens_per_second"] for m in MODES["all"])
    f, why = r["speculative_position"], r.get("why_null", {}).get("speculative_position", "")
    if f is None and why.startswith("too short"):
        return f"Between the bounds: none to report, {why}"
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


def print_report(r, out=None):
    """The report as text, model text shown safely (visible), on `out` (default stdout)."""
    out = out if out is not None else sys.stdout
    three = "draft_alone" in r  # --mode all
    for mode, title in (("autoregressive", "Autoregressive Decoding, Target Alone" if three
                         else "Autoregressive Decoding"),
                        ("draft_alone", "Autoregressive Decoding, Draft Alone"),
                        ("speculative", "Speculative Decoding")):
        if mode not in r:
            continue
        m = r[mode]
        lines = [title, "-" * len(title),
                 f"Time = {m['decode_seconds']:.2f}s for {m['n_generated']} tokens "
                 f"({m['tokens_per_second']:.1f} tokens/s), after {m['prefill_seconds']:.2f}s "
                 "reading the prompt (prefill)",
                 f"Text = {visible(r['prompt'] + m['text'])}"]  # control characters shown, not sent
        if mode == "speculative":
            hist = " ".join(f"{k}:{n}" for k, n in enumerate(m["accepted_histogram"]))
            rate = (f"acceptance rate {m['acceptance_rate']:.2f}" if m["drafted"]
                    else "no acceptance rate: nothing was drafted")
            lines += [f"Rounds = {m['rounds']}, drafted {m['drafted']}, accepted {m['accepted']} "
                      f"({rate}), {m['tokens_per_round']:.2f} tokens per round",
                      f"Accepted per round (accepted:rounds) = {hist}"]
            if r["adaptive"] or r["draft"] in DRAFTS and r["draft"] != "model":
                Ks = np.bincount(m["K_per_round"]).tolist()
                lines.append("Drafts per round (K:rounds) = " + " ".join(
                    f"{k}:{n}" for k, n in enumerate(Ks) if n))
            lines.append(f"Time in draft = {m['draft_seconds']:.2f}s, "
                         f"in target = {m['target_seconds']:.2f}s")
        if m["stopped_at_context"]:
            lines.append("(stopped: the context is full)")
        print("\n".join(lines) + "\n", file=out)
    why = r.get("why_null", {})
    if "speedup" in r:
        line = (f"Speedup = {r['speedup']:.2f}x" if r["speedup"] is not None
                else f"Speedup: none to report, {why['speedup']}")
        if r.get("predicted_speedup") is not None:
            line += (f"  (the formula predicts {r['predicted_speedup']:.2f}x for acceptance "
                     f"{r['speculative']['acceptance_rate']:.2f}, "
                     f"K={drafts_used(r['speculative'])}, c={r['c']:.2f})")
        print(line, file=out)
        if "predicted_speedup" in r and r["predicted_speedup"] is None:
            print(f"Prediction: none, {why['predicted_speedup']}", file=out)
    if "same_tokens" in r and r["temperature"] == 0:
        print("Same tokens = " + ("yes" if r["same_tokens"] else "NO"), file=out)
    if three:
        print(describe_position(r), file=out)


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


# --- output, and the exit status ------------------------------------------------------------------

class OutputError(Exception):
    """stdout refused a write: the disk is full, or the reader is gone (a closed pipe)."""

    def __init__(self, error: OSError):
        super().__init__(error.strerror or str(error))
        self.error = error


class Output:
    """A stream (stdout) whose failed writes raise OutputError, so that a full disk or a closed
    pipe is told apart from every other error, wherever the writing happens (--show writes
    while decoding)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        try:
            self.stream.write(text)
        except OSError as e:
            raise OutputError(e) from None

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as e:
            raise OutputError(e) from None

    def isatty(self) -> bool:
        return self.stream.isatty()


def one_line(text: str) -> str:
    """A message as one terminal line: control characters, newlines included, shown."""
    return visible(text).replace("\n", "\u240a")


def run(compare, args) -> int:
    """Report compare(args) as text or JSON on stdout; returns the exit status. Bad input is one
    `error:` line on stderr and status 2, never a traceback; Ctrl-C is status 130."""
    try:
        report = compare(args)
        out = Output(sys.stdout)
        if args.json:
            out.write(json.dumps(strict_json(report), allow_nan=False) + "\n")
        else:
            print_report(report, out)
        out.flush()
    except GPT2Error as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OutputError as e:
        discard_stdout()  # what is still buffered would fail again at exit, with a traceback
        if isinstance(e.error, BrokenPipeError):  # e.g. piped into `head`, which read enough
            return 0
        print(f"error: cannot write the output: {one_line(str(e))}", file=sys.stderr)
        return 2
    return 0


def discard_stdout() -> None:
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # not a file (a test's capture): nothing to do
        pass

