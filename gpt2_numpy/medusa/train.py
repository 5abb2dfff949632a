"""Medusa heads, trained: the text the target writes itself, with its hidden states, and the
training loop (heads.py holds the heads, their gradients and Adam).

Self-distillation: the target writes sequences after short starts, keeping the hidden state of
every token it is fed as it decodes (no second pass); head k learns the token k + 1 positions
after each row. Whole sequences are held out to score the heads on.
"""
import math
from typing import NamedTuple

import numpy as np

from ..model import lm_head
from ..sampling import Warp, probabilities, sample
from .heads import Adam, MedusaHeads, cross_entropy, head_forward, loss_and_gradients


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
