"""From logits to a token: warping, sampling, and the speculative accept/resample rule.

On the host, in NumPy, in float64: a float32 logit is exact there, and a distribution then sums
to 1 to ~1e-16, which the ratio p/q and the residual max(0, p - q) rely on. Letters as in
Leviathan et al. (2023): p is the TARGET's distribution, q the DRAFT's (Chen et al. swap them).
"""
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .checks import not_drawn_from_q
from .errors import GPT2Error

# The smallest temperature at which logits / T is finite for every float32 logit: below it the
# division can overflow to inf, inf - inf is NaN, and so such a temperature is an error.
MIN_TEMPERATURE = float(np.finfo(np.float32).max) / float(np.finfo(np.float64).max)  # ~1.9e-270


@dataclass(frozen=True)
class Warp:
    """How logits become a distribution. The SAME warp must be applied to p and q, otherwise the
    accept rule compares two different distributions and the output is no longer the target's."""

    temperature: float = 0.0  # 0 means greedy
    top_k: Optional[int] = None  # keep the k most likely tokens
    top_p: Optional[float] = None  # keep the smallest set whose mass reaches top_p

    def __post_init__(self):
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise GPT2Error(f"temperature must be a number >= 0, got {self.temperature}")
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise GPT2Error(f"temperature {self.temperature} is so small that logits / temperature "
                            f"overflows: use 0 for greedy, or at least {MIN_TEMPERATURE:.2g}")
        if self.top_k is not None and self.top_k < 1:
            raise GPT2Error(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GPT2Error(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probabilities(logits: np.ndarray, warp: Warp) -> np.ndarray:
    """The sampling distribution of each row of logits.  [..., V] float32 -> [..., V] float64,
    each row sums to 1. One row (a decoding step) or several (a verify step's K + 1) alike.

    temperature 0 is an explicit branch: a one-hot at the argmax (no division by zero, and an
    exact tie resolves to the lowest id on both models instead of becoming a 50/50 split).
    """
    logits = np.asarray(logits)
    if warp.greedy:  # the argmax of the float32 row is that of its exact float64 copy
        p = np.zeros(logits.shape)
        np.put_along_axis(p, np.argmax(logits, axis=-1)[..., None], 1.0, axis=-1)
        return p
    z = logits.astype(np.float64) / warp.temperature
    if warp.top_k is not None and warp.top_k < z.shape[-1]:
        kth_largest = np.partition(z, -warp.top_k, axis=-1)[..., -warp.top_k, None]
        z = np.where(z >= kth_largest, z, -np.inf)  # ties at the k-th value are all kept
    p = np.exp(z - np.max(z, axis=-1, keepdims=True))  # each max is finite: one token survives
    p /= p.sum(axis=-1, keepdims=True)
    if warp.top_p is not None and warp.top_p < 1:
        # Nucleus: sort by probability, keep tokens until the cumulative mass first reaches
        # top_p; the token that crosses the threshold is kept (so the most likely one always is).
        order = np.argsort(-p, axis=-1, kind="stable")
        ranked = np.take_along_axis(p, order, axis=-1)
        mass_before = np.cumsum(ranked, axis=-1) - ranked  # mass of the tokens ranked above
        np.put_along_axis(p, order, np.where(mass_before >= warp.top_p, 0.0, ranked), axis=-1)
        p /= p.sum(axis=-1, keepdims=True)
    return p


def sample(p: np.ndarray, rng: np.random.Generator) -> int:
    """Draw one token from the distribution p [V] by inverting its CDF with u ~ U[0, 1)."""
    u = rng.random()  # drawn in every case, so that a seed gives one stream of draws
    token = int(np.argmax(p))
    if p[token] == 1.0:  # a one-hot (greedy): the CDF would find this token; skip building it
        return token
    cdf = np.cumsum(p)
    # side="right" skips zero-probability tokens: their CDF value equals their predecessor's.
    token = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    return min(token, len(p) - 1)


def residual(p_row: np.ndarray, q_row: np.ndarray) -> np.ndarray:
    """norm(max(0, p - q)): where to resample after a rejection.  [V], [V] -> [V]
    Its mass is the total variation between p and q; where that is ~0 (p == q up to rounding),
    a rejection is almost impossible, and sampling p itself is exact."""
    r = np.maximum(p_row - q_row, 0.0)
    total = r.sum()
    return r / total if total > 1e-12 else p_row


def accept_or_resample(drafts, q: np.ndarray, p: np.ndarray, rng: np.random.Generator):
    """The speculative sampling step: verify K drafted tokens against the target.

    drafts: K token ids, draft i sampled from q[i].
    q: [K, V] draft distributions; p: [K + 1, V] target distributions, where row i is the
    target's distribution for the position of draft i (0-based here; Leviathan et al.'s and
    decoding.py's p_1..p_{K+1} are rows 0..K).
    Returns (n_accepted, next_token): the first n_accepted drafts stand, followed by next_token,
    which is a resample from norm(max(0, p[i] - q[i])) at the first rejection i, or, if all K
    are accepted, a bonus token from p[K] (p_{K+1}: the position after the last draft). Every
    draft and the bonus are distributed exactly as p.
    """
    for i, x in enumerate(drafts):
        if not q[i, x] > 0:  # x ~ q[i] has q[i, x] > 0 (else p/q is NaN, and min(1, NaN) = 1)
            raise not_drawn_from_q(x, f"as draft {i + 1} of {len(drafts)}")
        # p[i, x] may be 0 (then always rejected). u < p/q, not <=: u can be exactly 0 and must
        # not accept a token with p = 0.
        if rng.random() < min(1.0, p[i, x] / q[i, x]):
            continue
        return i, sample(residual(p[i], q[i]), rng)
    return len(drafts), sample(p[len(drafts)], rng)
