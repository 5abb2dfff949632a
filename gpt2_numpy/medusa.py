"""Medusa heads: a few small layers on the target's own last hidden state, each guessing a token
further ahead, trained here in NumPy with the backward pass written out.

The target's LM head reads h_n, the final hidden state of the token at position n (after the
last layer norm), and scores the token at n + 1. Head k (k = 1..H) reads the same h_n and
guesses the token at n + k + 1, so one forward of the target proposes a whole chain (or tree) of
candidates with no draft model (Cai et al. 2024, "Medusa"). A head is one residual layer
followed by the target's own LM head, tied and frozen:

    u_k = h W_k + b_k                           [N, d] @ [d, d] + [d] -> [N, d]
    z_k = h + SiLU(u_k),  SiLU(u) = u s(u)      s: the logistic sigmoid
    logits_k = z_k wte^T                        [N, d] @ [d, V] -> [N, V]

W_k starts at zero (and b_k too), so an untrained head is the LM head: it guesses that the
token at n + k + 1 is the one the target expects at n + 1.

Training (`train`) minimises each head's cross-entropy against the token k + 1 positions ahead
in text the target wrote itself. Its gradients, each written beside the step it differentiates
(`cross_entropy_backward`, `lm_head_backward`, `head_backward`), with wte and h frozen:

    dlogits = (softmax(logits) - onehot(y)) / N     the mean cross-entropy's gradient
    dz      = dlogits wte                           through the tied LM head
    du      = dz * SiLU'(u),  SiLU'(u) = s(u) (1 + u (1 - s(u)))
    dW      = h^T du,  db = sum over rows of du

and `Adam` is the optimiser's update rule written out. tests/test_medusa.py checks every
gradient against central finite differences.

Notation: N rows (tokens), d = n_embd, V = n_vocab, H heads. Heads are numbered 1..H in prose
and 0..H-1 as array indices (W[k - 1] is head k's). h comes from the target's own
`hidden_states` (model.py); `MedusaHeads.q` turns it into each head's warped distribution, the
q that a token tree's children are drawn from (tree.py). The method, its output on a test model
and how it differs from the paper's: docs/medusa.md.

    python -m gpt2_numpy.medusa train --model 355M --tokens 2048 --heads 4 --out heads.npz
"""
import argparse
import math
import os
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import GPT2Error
from .load import load_model
from .model import lm_head
from .sampling import Warp, probabilities, sample

SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "n_vocab", "n_ctx")  # the target's, recorded
FILE_KEYS = {"W", "b", "target", *SHAPE_KEYS}  # exactly what a heads file holds


# --- The forward pass --------------------------------------------------------------------------


def sigmoid(u):
    """s(u) = 1 / (1 + e^-u), written as (1 + tanh(u / 2)) / 2: the same function, but no
    exp(-u) to overflow for very negative u."""
    return 0.5 * (1.0 + np.tanh(0.5 * u))


def silu(u):
    """SiLU(u) = u s(u) (also called swish)."""
    return u * sigmoid(u)


def head_forward(h, W, b):
    """z = h + SiLU(h W + b): a residual layer, zero at W = b = 0.  Returns (z, u), u for the
    backward pass.  One head: h [N, d], W [d, d], b [d] -> [N, d]; all heads at once:
    W [H, d, d], b [H, d] -> [H, N, d]."""
    u = h @ W + b[..., None, :]  # [N, d] @ [(H,) d, d] -> [(H,) N, d]
    return h + silu(u), u


def cross_entropy(logits, y):
    """The mean over rows of -log softmax(logits)[y], and the softmax (for the backward).
    logits [N, V] float32, y [N] token ids -> (loss: a float, summed in float64; probs [N, V])"""
    N = len(y)
    shifted = logits - np.max(logits, axis=-1, keepdims=True)  # [N, V], each row's max is 0
    e = np.exp(shifted)  # cannot overflow: every exponent is <= 0
    total = np.sum(e, axis=-1, keepdims=True)  # [N, 1]
    log_p = shifted[np.arange(N), y] - np.log(total[:, 0])  # [N]: log softmax at the target
    # float64 for the sum: the rows' losses are a few nats each, and a float32 running sum over
    # many rows would lose their last digits.
    return -float(np.sum(log_p, dtype=np.float64)) / N, e / total


# --- The backward pass, step by step -----------------------------------------------------------


def cross_entropy_backward(probs, y):
    """d loss / d logits for the mean cross-entropy: (softmax - onehot(y)) / N.
    probs [N, V] (cross_entropy's), y [N] -> [N, V]"""
    N = len(y)
    dlogits = probs.copy()
    dlogits[np.arange(N), y] -= 1.0  # - onehot(y)
    return dlogits / N


def lm_head_backward(dlogits, wte):
    """logits = z wte^T, so dz = dlogits wte (wte is the target's, frozen: no dwte).
    [N, V] @ [V, d] -> [N, d]"""
    return dlogits @ wte


def silu_grad(u):
    """SiLU'(u) = s(u) + u s(u) (1 - s(u)) = s(u) (1 + u (1 - s(u))), since s' = s (1 - s)."""
    s = sigmoid(u)
    return s * (1.0 + u * (1.0 - s))


def head_backward(dz, h, u):
    """z = h + SiLU(u), u = h W + b. h is frozen (no dh); the residual's own path h -> z carries
    no parameter. dz [N, d], h [N, d], u [N, d] -> (dW [d, d], db [d])"""
    du = dz * silu_grad(u)  # [N, d]
    dW = h.T @ du  # [d, N] @ [N, d] -> [d, d]: u_j = sum_i h_i W_ij + b_j
    db = np.sum(du, axis=0)  # [d]: b is added to every row
    return dW, db


def loss_and_gradients(W, b, h, targets, wte):
    """The training loss, the sum over heads of each head's mean cross-entropy, and its gradient.

    W [H, d, d], b [H, d], h [N, d] hidden states, targets [N, H + 1]: column k holds the token at
    n + k + 1 for row n (column 0 is the LM head's, unused here), -1 where the text has ended.
    Each head is scored on the rows where its target exists.
    Returns (loss, [loss_1, ..., loss_H], dW [H, d, d], db [H, d]).
    """
    dW, db, losses = np.zeros_like(W), np.zeros_like(b), []
    for k in range(1, len(W) + 1):
        has = targets[:, k] >= 0  # [N]: the rows with a token for head k
        if not has.any():  # every row's text ends before n + k + 1: no loss, no gradient
            losses.append(0.0)
            continue
        h_k, y = h[has], targets[has, k]  # [N_k, d], [N_k]
        # Forward: the head, the tied LM head, the cross-entropy.
        z, u = head_forward(h_k, W[k - 1], b[k - 1])  # [N_k, d]
        loss, probs = cross_entropy(lm_head(z, wte), y)  # [N_k, V]
        # Backward, in the reverse order.
        dz = lm_head_backward(cross_entropy_backward(probs, y), wte)  # [N_k, d]
        dW[k - 1], db[k - 1] = head_backward(dz, h_k, u)
        losses.append(loss)
    return sum(losses), losses, dW, db


class Adam:
    """Adam (Kingma and Ba 2015), updating the given arrays in place. With g the gradient at step
    t = 1, 2, ...:

        m = b1 m + (1 - b1) g              a running mean of the gradient
        v = b2 v + (1 - b2) g^2            and of its square
        m^ = m / (1 - b1^t),  v^ = v / (1 - b2^t)   corrected: m and v start at zero
        theta = theta - lr m^ / (sqrt(v^) + eps)

    Each parameter moves by about lr per step, whatever the scale of its gradient.
    """

    def __init__(self, params, lr: float = 1e-3, b1: float = 0.9, b2: float = 0.999,
                 eps: float = 1e-8):
        self.params, self.lr, self.b1, self.b2, self.eps = list(params), lr, b1, b2, eps
        self.m = [np.zeros_like(p) for p in self.params]
        self.v = [np.zeros_like(p) for p in self.params]
        self.t = 0

    def step(self, grads) -> None:
        self.t += 1
        b1, b2, t = self.b1, self.b2, self.t
        for theta, g, m, v in zip(self.params, grads, self.m, self.v):
            m[...] = b1 * m + (1 - b1) * g
            v[...] = b2 * v + (1 - b2) * g * g
            m_hat = m / (1 - b1 ** t)
            v_hat = v / (1 - b2 ** t)
            theta -= self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


# --- The heads ---------------------------------------------------------------------------------


def describe_shape(shape: dict) -> str:
    return ", ".join(f"{k} {shape[k]}" for k in SHAPE_KEYS)


class MedusaHeads:
    """H heads for one target: W [H, d, d] and b [H, d] float32, and the target's shape (its
    hparams: n_layer, n_head, n_embd, n_vocab, n_ctx) and name, recorded with them. The LM head
    they share is the target's wte, passed in at use and never stored."""

    def __init__(self, W, b, shape: dict, target: str = ""):
        self.W = np.asarray(W, dtype=np.float32)  # [H, d, d]
        self.b = np.asarray(b, dtype=np.float32)  # [H, d]
        self.shape = {k: int(shape[k]) for k in SHAPE_KEYS}
        self.target = str(target)

    @classmethod
    def untrained(cls, target, n_heads: int) -> "MedusaHeads":
        """n_heads heads for `target` (a GPT2) at W = b = 0: each scores like the LM head."""
        if n_heads < 1:
            raise GPT2Error(f"the number of heads must be >= 1, got {n_heads}")
        d = target.hparams["n_embd"]
        return cls(np.zeros((n_heads, d, d)), np.zeros((n_heads, d)), target.hparams, target.name)

    @property
    def n_heads(self) -> int:
        return len(self.W)

    def logits(self, h, wte):
        """Every head's logits at every row: one product with the LM head for all H * N rows.
        h [N, d], wte [V, d] -> [H, N, V]"""
        z, _ = head_forward(h, self.W, self.b)  # [H, N, d]
        H, N, d = z.shape
        return lm_head(z.reshape(H * N, d), wte).reshape(H, N, -1)  # [H * N, V] -> [H, N, V]

    def q(self, h_row, wte, warp: Warp) -> np.ndarray:
        """The heads' distributions for drafting at one position: row k - 1 is head k's guess
        for the token k + 1 positions after h_row's, warped by `warp`, which must be the
        target's own (p and q warped alike, or the accept rule compares different laws).
        h_row [d] or [1, d] -> [H, V] float64"""
        h_row = np.reshape(np.asarray(h_row), (1, -1))  # [1, d]
        return probabilities(self.logits(h_row, wte)[:, 0, :], warp)  # [H, 1, V] -> [H, V]

    def check_fits(self, target) -> None:
        """Heads belong to a model of one shape: a target of another shape is an error."""
        theirs = {k: target.hparams[k] for k in SHAPE_KEYS}
        if theirs != self.shape:
            raise GPT2Error(f"these Medusa heads were made for a model of "
                            f"{describe_shape(self.shape)} ({self.target}), not for "
                            f"{target.name}'s {describe_shape(theirs)}")

    def save(self, path) -> None:
        """One .npz: W, b, the target's shape and name. Written to a temporary file beside
        `path` and renamed, so `path` is never half-written."""
        path = Path(path)
        fields = dict(W=self.W, b=self.b, target=np.str_(self.target),
                      **{k: np.int64(v) for k, v in self.shape.items()})
        with temporary_beside(path) as tmp:
            with open(tmp, "wb") as f:  # a file object: np.savez adds no ".npz" to its name
                np.savez(f, **fields)
            os.replace(tmp, path)

    @classmethod
    def load(cls, path) -> "MedusaHeads":
        """Heads saved by `save`. Anything else (missing, not an .npz, truncated, other keys or
        shapes) is one GPT2Error naming the file."""
        path = Path(path)
        try:
            f = np.load(path, allow_pickle=False)  # no pickles: a file cannot run code
            if not isinstance(f, np.lib.npyio.NpzFile):  # an .npy: one array, no names
                raise ValueError("it holds one array, not an .npz of named arrays")
            with f:
                keys = set(f.files)
                if keys != FILE_KEYS:
                    missing, extra = sorted(FILE_KEYS - keys), sorted(keys - FILE_KEYS)
                    raise ValueError(f"it lacks {missing}" if missing else f"unexpected {extra}")
                fields = {k: f[k] for k in FILE_KEYS}
        except FileNotFoundError:
            raise GPT2Error(f"no Medusa heads file {path}") from None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise GPT2Error(f"{path} is not a readable Medusa heads file ({e})") from None
        problem = check_fields(fields)
        if problem:
            raise GPT2Error(f"{path} is not a valid Medusa heads file: {problem}")
        return cls(fields["W"], fields["b"], {k: fields[k] for k in SHAPE_KEYS},
                   fields["target"])

    def __repr__(self):
        return (f"MedusaHeads({self.n_heads} heads for {self.target!r}: "
                f"{describe_shape(self.shape)})")


def check_fields(f: dict) -> str:
    """What is wrong with a heads file's arrays ("" if nothing)."""
    for k in SHAPE_KEYS:
        if f[k].shape != () or f[k].dtype.kind not in "iu" or f[k] < 1:
            return f"{k} is not a positive integer"
    if f["target"].shape != () or f["target"].dtype.kind != "U":
        return "target is not a name"
    d = int(f["n_embd"])
    W, b = f["W"], f["b"]
    if W.dtype.kind != "f" or b.dtype.kind != "f":
        return "W and b are not floating-point arrays"
    if W.ndim != 3 or len(W) < 1 or W.shape[1:] != (d, d) or b.shape != (len(W), d):
        return f"W {list(W.shape)} and b {list(b.shape)} are not [H, {d}, {d}] and [H, {d}]"
    if not (np.all(np.isfinite(W)) and np.all(np.isfinite(b))):
        return "W or b holds a NaN or an infinity"
    return ""


@contextmanager
def temporary_beside(path: Path):
    """The name of a new empty file in `path`'s folder (so that os.replace onto `path` is a
    rename, never a copy), removed on the way out unless it was renamed."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# --- The training text: the target's own, with its hidden states ------------------------------


class Sequence(NamedTuple):
    """One training sequence: its tokens [L], the hidden state of every token but the last
    [L - 1, d] float32 (nothing is guessed from the last), and n_given, how many of its first
    tokens were given (a start or a prompt) rather than written by the target: only the target's
    own tokens are guessed (0 for a user's text: all of it is guessed)."""

    tokens: np.ndarray
    hidden: np.ndarray
    n_given: int


def sequence_lengths(n_tokens: int, length: int) -> list:
    """n_tokens split into sequences of at most `length` tokens, as even as can be, and at least
    two (one to train on, one to hold out).  e.g. (10, 4) -> [4, 3, 3]"""
    n = max(2, math.ceil(n_tokens / length))
    return [n_tokens // n + (i < n_tokens % n) for i in range(n)]


def write_sequence(target, start, length: int, warp: Warp, rng, on_tokens=None) -> Sequence:
    """The target writes tokens after `start` (a few token ids) until there are `length`,
    sampling each from its own warped distribution; the hidden state of every token it is fed is
    kept as it decodes (no second pass). The last token is never fed: nothing is guessed from it.
    on_tokens(n) is told of every n tokens added to the text (the start's too)."""
    tokens, cache = list(start), target.new_cache(length)
    hidden = [target.hidden_states(tokens, cache, n_rows=None)]  # [len(start), d]
    if on_tokens:
        on_tokens(len(start))
    while len(tokens) < length:
        logits = lm_head(hidden[-1][-1:], target.params["wte"])  # [1, V]: the newest token's
        tokens.append(sample(probabilities(logits, warp)[0], rng))
        if on_tokens:
            on_tokens(1)
        if len(tokens) < length:
            hidden.append(target.hidden_states(tokens[-1:], cache))  # [1, d]
    return Sequence(np.asarray(tokens), np.concatenate(hidden), len(start))


def write_text(target, n_tokens: int, length: int, warp: Warp, rng, prompts=None,
               on_tokens=None) -> list:
    """Self-distillation's text: n_tokens in sequences of at most `length` (sequence_lengths),
    each written by the target after a start: sequence i after prompts[i % P] (lists of token
    ids) if there are prompts; else after one token, for even i the end-of-text token that opens
    every GPT-2 document (if the tokenizer has one), for odd i a uniformly random one. Greedy
    decoding (temperature 0) writes one text per start: every start is then a random token, and
    a start seen before gets its text again without another run of the target."""
    eot = getattr(target.tokenizer, "eot_token", None)
    sequences, written = [], {}
    for i, L in enumerate(sequence_lengths(n_tokens, length)):
        if prompts:
            start = list(prompts[i % len(prompts)])
        elif i % 2 == 0 and eot is not None and not warp.greedy:
            start = [eot]
        else:
            start = [int(rng.integers(target.n_vocab))]
        if warp.greedy and (tuple(start), L) in written:
            sequences.append(written[tuple(start), L])
            if on_tokens:
                on_tokens(L)
            continue
        sequences.append(write_sequence(target, start, L, warp, rng, on_tokens))
        written[tuple(start), L] = sequences[-1]
    return sequences


def read_text(target, ids, length: int, on_tokens=None) -> list:
    """A user's text instead (token ids), cut into sequences as write_text's; one forward over
    each sequence gives all its hidden states."""
    sequences, start = [], 0
    for L in sequence_lengths(len(ids), length):
        tokens = np.asarray(ids[start : start + L])
        start += L
        hidden = target.hidden_states(tokens[:-1].tolist(), target.new_cache(L), n_rows=None)
        sequences.append(Sequence(tokens, hidden, 0))  # [L], [L - 1, d]; all of it is guessed
        if on_tokens:
            on_tokens(L)
    return sequences


def split(sequences, share: float, rng):
    """Hold out a share of the sequences (whole sequences, at least one, and at least one left
    to train on), chosen at random.  -> (training, held_out)"""
    n_held = min(len(sequences) - 1, max(1, round(share * len(sequences))))
    held = set(rng.permutation(len(sequences))[:n_held].tolist())
    return ([s for i, s in enumerate(sequences) if i not in held],
            [s for i, s in enumerate(sequences) if i in held])


def rows(sequences, n_heads: int):
    """The rows of some sequences: every fed token's hidden state, and the tokens the LM head and
    each head should guess there.  -> (h [R, d] float32, targets [R, H + 1] int64):
    targets[n, k] is the token at n + k + 1 (column 0: the LM head's, n + 1), or -1 where that
    position is past the sequence's end or among its given tokens."""
    h, targets = [], []
    for tokens, hidden, n_given in sequences:
        L = len(tokens)
        t = np.full((L - 1, n_heads + 1), -1, dtype=np.int64)  # [L - 1, H + 1]
        for k in range(n_heads + 1):
            t[: L - 1 - k, k] = tokens[k + 1 :]  # row n gets the token at n + k + 1, if any
            t[: max(0, n_given - k - 1), k] = -1  # ...unless it was given, not written
        h.append(hidden)
        targets.append(t)
    return np.concatenate(h).astype(np.float32), np.concatenate(targets)


# --- Training and evaluation -------------------------------------------------------------------


def evaluate(heads: MedusaHeads, h, targets, wte, top: int = 3, batch_size: int = 64):
    """How well the LM head (k = 0) and each head k guess their tokens on some rows: a list of
    H + 1 dicts of rows, loss (mean cross-entropy, nats), top1 and top (the share of rows whose
    token is the head's first guess, or among its `top` first guesses)."""
    sums = np.zeros((heads.n_heads + 1, 4))  # per head: rows, loss * rows, top-1, top-w hits
    for k in range(heads.n_heads + 1):
        has = np.flatnonzero(targets[:, k] >= 0)  # the rows with a token for head k
        for start in range(0, len(has), batch_size):  # [B, V] logits at a time
            batch = has[start : start + batch_size]
            h_b, y = h[batch], targets[batch, k]  # [B, d], [B]
            z = h_b if k == 0 else head_forward(h_b, heads.W[k - 1], heads.b[k - 1])[0]
            logits = lm_head(z, wte)  # [B, V]
            w = min(top, logits.shape[-1])
            best = np.argpartition(-logits, w - 1, axis=-1)[:, :w]  # [B, w]: the w largest
            sums[k] += (len(y), cross_entropy(logits, y)[0] * len(y),
                        np.sum(np.argmax(logits, axis=-1) == y), np.sum(best == y[:, None]))
    n = np.maximum(sums[:, 0], 1)
    return [dict(rows=int(s[0]), loss=s[1] / m, top1=s[2] / m, top=s[3] / m)
            for s, m in zip(sums, n)]


def train_epoch(heads: MedusaHeads, adam: Adam, h, targets, wte, batch_size: int, rng,
                on_step=None) -> float:
    """One pass over the rows in a random order, one Adam step per minibatch of rows (from any
    sequences). Returns the epoch's mean training loss (summed over heads)."""
    order = rng.permutation(len(h))
    total = 0.0
    for start in range(0, len(h), batch_size):
        batch = order[start : start + batch_size]
        loss, _, dW, db = loss_and_gradients(heads.W, heads.b, h[batch], targets[batch], wte)
        adam.step([dW, db])
        total += loss * len(batch)
        if on_step:
            on_step(loss)
    return total / len(h)


def train(heads: MedusaHeads, h, targets, wte, epochs: int = 3, lr: float = 1e-3,
          batch_size: int = 64, seed: int = 0) -> list:
    """Train the heads in place on rows h [R, d], targets [R, H + 1] (see `rows`); wte is the
    target's, frozen. Returns each epoch's mean training loss."""
    adam, rng = Adam([heads.W, heads.b], lr), np.random.default_rng(seed)
    wte = np.asarray(wte)
    return [train_epoch(heads, adam, h, targets, wte, batch_size, rng) for _ in range(epochs)]


# --- The command: python -m gpt2_numpy.medusa train ... -------------------------------------

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
