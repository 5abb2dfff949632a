"""python -m gpt2_numpy.medusa train: heads trained on text the target writes, and saved.

    python -m gpt2_numpy.medusa train --model 355M --tokens 2048 --heads 4 --out heads.npz

Prints each head's held-out loss and accuracy before and after training (docs/medusa.md).
"""
import argparse
import math
import sys
from pathlib import Path

import numpy as np

from ..errors import GPT2Error
from ..load import load_model
from ..sampling import Warp
from .heads import Adam, MedusaHeads, describe_shape, temporary_beside
from .train import evaluate, read_text, rows, sequence_lengths, split, train_epoch, write_text

# 2048 tokens, 4 heads, 3 epochs: a few minutes for 355M on a 2-core CPU, most of it the target
# writing its text one token at a time (docs/medusa.md, "How long the default takes").
DEFAULT_TOKENS = 2048
MIN_TOKENS = 32  # at least two short sequences: one to train on, one held out


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one `error:` line (exit 2) like every other bad input."""

    def error(self, message):
        self.exit(2, f"error: {message} (python -m gpt2_numpy.medusa train --help lists the "
                  "flags)\n")


def parse_args(argv=None):
    p = Parser(prog="python -m gpt2_numpy.medusa",
               description="Medusa heads for a GPT-2: train them on text the model writes itself.")
    sub = p.add_subparsers(dest="command", required=True, metavar="train")
    t = sub.add_parser("train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="train heads and save them as one .npz",
                       description="Let the target write its own text (or read --text), train "
                       "H heads to guess its tokens 2..H+1 positions ahead, print each head's "
                       "held-out loss and accuracy before and after, and save the heads.")
    t.add_argument("--model", default="355M", help="the target: a size (downloaded on first "
                   "use) or a folder of official files")
    t.add_argument("--models_dir", default=None, help="where sizes are downloaded (None: "
                   "$GPT2_MODELS_DIR, else weights/)")
    t.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="tokens of training "
                   f"text, the held-out share included (at least {MIN_TOKENS})")
    t.add_argument("--heads", type=int, default=4, help="H: head k guesses the token k + 1 "
                   "positions ahead")
    t.add_argument("--out", default="medusa_heads.npz", help="the .npz to write")
    t.add_argument("--text", default=None, metavar="FILE", help="train on this UTF-8 text "
                   "(its first --tokens tokens) instead of text the target writes")
    t.add_argument("--prompts", default=None, metavar="FILE", help="UTF-8, one prompt a line: "
                   "the target continues each in turn (None: each sequence starts from a single "
                   "token, the end-of-text token or a random one)")
    t.add_argument("--temperature", type=float, default=1.0, help="the temperature the target "
                   "writes at (0: greedy, each start always gives the same text)")
    t.add_argument("--length", type=int, default=64, help="tokens per sequence (at most the "
                   "target's context)")
    t.add_argument("--held_out", type=float, default=0.1, help="share of the sequences held "
                   "out (whole sequences) to score the heads on")
    t.add_argument("--epochs", type=int, default=3, help="passes over the training rows")
    t.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    t.add_argument("--batch", type=int, default=64, help="rows per Adam step")
    t.add_argument("--top", type=int, default=3, help="w of the top-w accuracy")
    t.add_argument("--seed", type=int, default=0, help="seeds the text, the split and the order")
    t.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def check_args(args) -> None:
    """Values no library function checks, before anything is loaded."""
    checks = [(args.tokens >= MIN_TOKENS,
               f"--tokens must be at least {MIN_TOKENS}, got {args.tokens}"),
              (args.heads >= 1, f"--heads must be at least 1, got {args.heads}"),
              (args.length >= 3, f"--length must be at least 3, got {args.length}"),
              (0 < args.held_out < 1, f"--held_out must be between 0 and 1, got {args.held_out}"),
              (args.epochs >= 1, f"--epochs must be at least 1, got {args.epochs}"),
              (args.lr > 0 and math.isfinite(args.lr),
               f"--lr must be a positive number, got {args.lr}"),
              (args.batch >= 1, f"--batch must be at least 1, got {args.batch}"),
              (args.top >= 1, f"--top must be at least 1, got {args.top}"),
              (args.seed >= 0, f"--seed must be >= 0, got {args.seed}"),
              (not (args.text and args.prompts), "--text and --prompts do not go together: the "
               "text is either yours or the target's")]
    for ok, message in checks:
        if not ok:
            raise GPT2Error(message)
    Warp(args.temperature)  # its own checks: a number >= 0, not so small that it overflows


def read_utf8(path: str, flag: str) -> str:
    """A text file's contents, or one GPT2Error: missing, unreadable, empty, not UTF-8."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise GPT2Error(f"{flag} {path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise GPT2Error(f"{flag} {path} is not UTF-8 (byte {e.start} cannot be decoded)") from None
    if not text.strip():
        raise GPT2Error(f"{flag} {path} is empty")
    return text


def check_writable(path: Path) -> None:
    """Fail now, not after minutes of work: --out must be creatable in an existing folder."""
    if path.is_dir():
        raise GPT2Error(f"--out {path} is a folder: name a file")
    try:
        with temporary_beside(path):
            pass
    except OSError as e:
        raise GPT2Error(f"--out {path}: cannot write in {path.parent} ({e.strerror})") from None


def training_text(target, args, text, rng, progress: bool):
    """The sequences to train and score on, and a line saying what they are. text: the contents
    of --text or --prompts (None: neither)."""
    from tqdm import tqdm

    length = min(args.length, target.n_ctx)
    bar = tqdm(total=args.tokens, desc="reading" if args.text else "writing", unit="tok",
               disable=not progress, leave=False, file=sys.stderr)
    with bar:
        if args.text:
            ids = target.tokenizer.encode(text, disallowed_special=())
            if len(ids) < MIN_TOKENS:
                raise GPT2Error(f"--text {args.text} has {len(ids)} tokens, fewer than "
                                f"{MIN_TOKENS}")
            ids = ids[: args.tokens]
            bar.total = len(ids)
            check_lengths(sequence_lengths(len(ids), length), 0, args.heads)
            return read_text(target, ids, length, bar.update), f"{len(ids)} tokens of {args.text}"
        prompts = None
        if args.prompts:
            prompts = [target.tokenizer.encode(line, disallowed_special=())
                       for line in text.splitlines() if line.strip()]
        longest = max(map(len, prompts)) if prompts else 1
        check_lengths(sequence_lengths(args.tokens, length), longest, args.heads)
        sequences = write_text(target, args.tokens, length, Warp(args.temperature), rng,
                               prompts, bar.update)
    after = (f"the {len(prompts)} prompts of {args.prompts}" if prompts
             else "single tokens (end-of-text or random)")
    return sequences, (f"{args.tokens} tokens written by {target.name} at temperature "
                       f"{args.temperature:g} after {after}")


def check_lengths(lengths, n_given: int, n_heads: int) -> None:
    """Every head needs a row in every sequence: a sequence of L tokens, n_given of them given,
    has rows for head k only if L >= k + 2 and L > n_given (see `rows`)."""
    need = max(n_heads + 2, n_given + 1)
    if min(lengths) < need:
        raise GPT2Error(f"sequences of {min(lengths)} tokens are too short for {n_heads} heads"
                        + (f" after prompts of up to {n_given} tokens" if n_given > 1 else "")
                        + f": they need {need}; raise --length or --tokens")


def score_table(before, after, top: int) -> str:
    """Held-out scores per head before and after training, one row per head; the LM head's
    first, for scale (it is the target's own, frozen: training leaves it as it is)."""
    lines = [f"{'':16} {'rows':>6}  {'loss (nats)':>15}  {'top-1':>15}  {f'top-{top}':>15}",
             f"{'':16} {'':>6}" + f"  {'before':>7} {'after':>7}" * 3]
    for k, (b, a) in enumerate(zip(before, after)):
        name = "LM head (n + 1)" if k == 0 else f"head {k} (n + {k + 1})"
        lines.append(f"{name:16} {b['rows']:6d}  {b['loss']:7.3f} {a['loss']:7.3f}  "
                     f"{b['top1']:7.1%} {a['top1']:7.1%}  {b['top']:7.1%} {a['top']:7.1%}")
    return "\n".join(lines)


def run(args) -> None:
    """Check the flags, load the target, get the text, score, train, score again, save."""
    from tqdm import tqdm

    check_args(args)
    out = Path(args.out)
    check_writable(out)
    text = None  # a file's problems (missing, empty, not UTF-8) are said before loading
    if args.text or args.prompts:
        text = read_utf8(args.text or args.prompts, "--text" if args.text else "--prompts")
    progress = not args.no_progress
    # The loader's own load_model: decoding feeds one row at a time, which needs no products plan.
    target = load_model(args.model, args.models_dir, progress=progress)
    print(f"Target: {target.name} ({describe_shape(target.hparams)})")
    rng = np.random.default_rng(args.seed)
    sequences, what = training_text(target, args, text, rng, progress)
    training, held = split(sequences, args.held_out, rng)
    h, targets = rows(training, args.heads)
    h_held, targets_held = rows(held, args.heads)
    print(f"Text: {what}")
    print(f"Sequences: {len(sequences)}, {len(training)} to train on ({len(h)} rows), "
          f"{len(held)} held out ({len(h_held)} rows)")
    seen = {tuple(s.tokens) for s in training}
    repeated = sum(tuple(s.tokens) in seen for s in held)
    if repeated:  # likely at low temperatures, certain at 0 with fewer starts than sequences
        print(f"Note: {repeated} of the {len(held)} held-out sequences are training sequences "
              "too (the same start gave the same text): scores on them show what the heads "
              "remember, not how they generalise")

    heads = MedusaHeads.untrained(target, args.heads)
    wte = np.asarray(target.params["wte"])  # [V, d], the tied LM head, frozen
    before = evaluate(heads, h_held, targets_held, wte, args.top)
    adam = Adam([heads.W, heads.b], args.lr)
    steps = math.ceil(len(h) / args.batch)
    d = target.hparams["n_embd"]
    print(f"Training {args.heads} heads of [{d}, {d}]: {args.epochs} epochs of {steps} Adam steps "
          f"(batch {args.batch}, lr {args.lr:g}, seed {args.seed})")
    print(f"  untrained: summed loss {sum(s['loss'] for s in before[1:]):.3f} held out (each "
          "head scores like the LM head)")
    with tqdm(total=args.epochs * steps, desc="training", unit="step", disable=not progress,
              leave=False, file=sys.stderr) as bar:
        def on_step(loss):
            bar.update()
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

        for epoch in range(1, args.epochs + 1):
            loss = train_epoch(heads, adam, h, targets, wte, args.batch, rng, on_step)
            held_loss = sum(s["loss"] for s in evaluate(heads, h_held, targets_held, wte, 1)[1:])
            bar.write(f"  epoch {epoch}: summed loss {loss:.3f} training, {held_loss:.3f} held out",
                      file=sys.stdout)
    after = evaluate(heads, h_held, targets_held, wte, args.top)
    print("Held out, before and after training:")
    print(score_table(before, after, args.top))
    heads.save(out)
    print(f"Wrote {out} ({out.stat().st_size / 1e6:.2f} MB): {args.heads} heads for "
          f"{target.name}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except GPT2Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
