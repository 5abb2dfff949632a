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

Drafting (MedusaHeads is a tree.TreeDrafter): the target's verify forward runs through its
hidden states (model.hidden_states, then the LM head), so the heads can read the row the walk
stops at, the last accepted node, the token before the next round's root. From that one row
every head's distribution comes at once, and depth d's children, under every node of depth
d - 1, are drawn WITHOUT replacement from head d's warped q (its top-w at temperature 0). tree.py
judges each child against the very q it was drawn from, so the output is exactly the target's
at any temperature: no second model, no second forward. The first round has no row to read yet:
it is a plain target step.

Notation: N rows (tokens), d = n_embd, V = n_vocab, H heads. Heads are numbered 1..H in prose
and 0..H-1 as array indices (W[k - 1] is head k's). The training text and loop: train.py; the
command: __main__.py; the method and how it differs from the paper's: docs/medusa.md.
"""
import os
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..backend import to_numpy
from ..errors import GPT2Error
from ..model import lm_head
from ..sampling import Warp, probabilities
from ..tree import Tree, TreeDrafter, feed_tree, sample_without_replacement, top_w

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


class MedusaHeads(TreeDrafter):
    """H heads for one target: W [H, d, d] and b [H, d] float32, and the target's shape (its
    hparams: n_layer, n_head, n_embd, n_vocab, n_ctx) and name, recorded with them. The LM head
    they share is the target's wte, passed in at use and never stored. As a TreeDrafter they
    draft token trees for tree_speculative_sample (the methods at the end)."""

    def __init__(self, W, b, shape: dict, target: str = ""):
        self.W = np.asarray(W, dtype=np.float32)  # [H, d, d]
        self.b = np.asarray(b, dtype=np.float32)  # [H, d]
        self.shape = {k: int(shape[k]) for k in SHAPE_KEYS}
        self.target = str(target)
        self.n_vocab = self.shape["n_vocab"]
        self.start([], 0)

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
        for the token k + 1 positions after h_row's, warped by `warp`, the target's own: the
        rule is exact for any q its children were drawn from, and q warped as p is the likelier
        to agree with it.
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

    # --- Drafting: the heads as tree.py's TreeDrafter -------------------------------------------

    def start(self, tokens, capacity: int) -> None:
        """A run starts: no row to read yet (the first round is a plain target step)."""
        self.h = self.rows = self.wte = None  # [d] the row to read; [1 + N, d] the last verify's
        self.calls = 0  # rounds the heads drafted

    def draft(self, tokens, widths, warp: Warp, rng) -> Tree:
        """A tree rooted at the newest token, depth d's children drawn from head d at self.h: the
        heads see only that row, not the path, so every node of a depth gets the same q."""
        tree = Tree(tokens[-1])
        if self.h is None or not widths:
            return tree
        if len(widths) > self.n_heads:
            raise GPT2Error(f"a tree of depth {len(widths)} needs as many Medusa heads; these are "
                            f"{self.n_heads}")
        self.calls += 1
        logits = self.logits(self.h[None, :], self.wte)[:, 0, :]  # [H, V]: every head at once
        level = [0]
        for d, w in enumerate(widths):
            q = None if warp.greedy else probabilities(logits[d], warp)  # [V]: head d + 1's law
            for node in level:
                tree.q[node] = q  # the law its children are drawn from (None: its top-w)
                for token in (top_w(logits[d], w) if warp.greedy
                              else sample_without_replacement(q, w, rng)):
                    tree.add(node, token)
            level = [c for node in level for c in tree.children[node]]
        return tree

    def verify(self, target, tree: Tree, cache):
        """The target's ONE forward over the tree, as its hidden states then its LM head: the
        logits [1 + N, V], and every row's hidden state kept (on the host) for the next draft."""
        if self.wte is None:
            self.check_fits(target)
            self.wte = to_numpy(target.params["wte"])  # [V, d], the heads' LM head, on the host
        h = feed_tree(target.hidden_states, tree.tokens, cache, tree.parents)  # [1 + N, d]
        self.rows = to_numpy(h)
        return lm_head(h, target.params["wte"])  # [1 + N, V]

    def keep(self, tokens, path) -> None:
        """The next round reads the last accepted node's row (the root's if none was)."""
        self.h = self.rows[path[-1] if path else 0]  # [d]

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
