"""Autoregressive and speculative sampling (Leviathan et al. 2023, Algorithm 1; Chen et al. 2023).

Both decoders keep one bookkeeping rule: `tokens` is the committed sequence (prompt + generated),
and a model's KV cache holds its prefix tokens[:cache.length] but never the newest committed
token, which was just sampled and is fed first by the next forward.

A speculative round: the draft proposes K tokens, ONE target forward checks them all, the rule
of sampling.accept_or_resample keeps them, both caches roll back. 1 to K + 1 tokens for one
target forward, each distributed exactly as the target alone would sample it.
"""
from typing import Callable, List

import numpy as np

from .backend import synchronize, to_numpy
from .checks import check_draft_context, check_K, check_vocabularies, checked_request
from .sampling import Warp, accept_or_resample, probabilities, sample
from .stats import Timed, kinds


def prefill(model, cache, tokens: List[int]) -> None:
    """Feed every prompt token but the last in one forward, without logits: the last prompt
    token is fed by the first decoding step, as every newest token is."""
    if len(tokens) > 1:
        model(tokens[:-1], cache, n_logits=0)
        synchronize(cache.k)  # so that the prefill's time is counted as prefill


def autoregressive_sample(model, prompt: List[int], n_new: int, warp: Warp = Warp(),
                          rng: np.random.Generator = None, on_tokens: Callable = None):
    """Sample n_new tokens from `model`, one single-token forward each (fewer if the context fills
    up: stats.stopped_at_context), streamed to on_tokens(ids, kinds).  -> (new ids, stats)"""
    rng = rng if rng is not None else np.random.default_rng()
    tokens, n_new, stats = checked_request(model, prompt, n_new, "autoregressive")
    cache = model.new_cache(len(tokens) + n_new - 1)  # the last new token is never fed
    with stats.timing("prefill_seconds"):
        prefill(model, cache, tokens)
    target = Timed(model)  # counts the decoding forwards and their seconds
    with stats.timing("decode_seconds"):
        for _ in range(n_new):
            logits = to_numpy(target(tokens[cache.length :], cache))  # [1, V]: the newest token
            tokens.append(sample(probabilities(logits[-1], warp), rng))
            assert cache.length == len(tokens) - 1
            if on_tokens:
                on_tokens(tokens[-1:], ["target"])
    stats.count_forwards(target)
    stats.rounds = stats.n_generated = len(tokens) - stats.n_prompt
    return tokens[stats.n_prompt :], stats


class Drafter:
    """What speculative_sample asks for drafts: start once; each round propose -> (up to K ids,
    q [len(drafts), V], the laws they were drawn from), then rollback to the committed tokens.
    It reads n_vocab, and `seconds` and `calls` (proposing) for the stats."""

    n_vocab: int
    seconds, calls = 0.0, 0

    def start(self, tokens: List[int], capacity: int) -> None:
        pass

    def propose(self, tokens: List[int], K: int, warp: Warp, rng):
        raise NotImplementedError

    def rollback(self, tokens: List[int]) -> None:
        pass


class ModelDrafter(Drafter):
    """Drafts by sampling a small model, keeping its KV cache across rounds."""

    def __init__(self, model):
        self.model, self.n_vocab = model, model.n_vocab

    def start(self, tokens: List[int], capacity: int) -> None:
        check_draft_context(self.model, capacity)
        self.cache = None  # dropped first, so that a GPU model can hand its arrays out again
        self.cache = self.model.new_cache(capacity)
        prefill(self.model, self.cache, tokens)
        self.forward = Timed(self.model)  # the draft's forwards from here on (stats)

    def propose(self, tokens: List[int], K: int, warp: Warp, rng):
        """x_1..x_K, x_i ~ q_i, one forward each: the first feeds what the cache lacks (the newest
        token, and the last draft too after a round that kept them all), each later one the
        draft before. x_K is never fed.  -> (drafts, q [K, V])"""
        drafts, q = [], np.empty((K, self.n_vocab))
        new = tokens[self.cache.length :]
        for i in range(K):
            logits = to_numpy(self.forward(new, self.cache))  # [1, V]
            q[i] = probabilities(logits[-1], warp)
            drafts.append(sample(q[i], rng))
            new = drafts[-1:]
        return drafts, q

    def rollback(self, tokens: List[int]) -> None:
        """Keep the cached prefix that is still committed (never the newest token)."""
        self.cache.rollback(min(self.cache.length, len(tokens) - 1))

    seconds = property(lambda self: self.forward.seconds)
    calls = property(lambda self: self.forward.calls)


def speculative_round(tokens: List[int], K: int, drafter: Drafter, target, cache, warp: Warp,
                      rng: np.random.Generator):
    """One round: append 1 to K + 1 tokens to `tokens`, each distributed exactly as the target
    alone would sample it; the target's `cache` holds every token but the newest.
    Returns (K, accepted): the drafts proposed (a drafter may find fewer) and kept."""
    # 1. The draft proposes x_1..x_K, sampling x_i ~ q_i.
    x, q = drafter.propose(tokens, K, warp, rng)  # q: [K, V]
    K = len(x)
    # 2. ONE target forward over the newest token and x_1..x_K: its K + 1 rows are p_1..p_{K+1},
    #    where p_i is the target's distribution at the position of x_i.
    logits = to_numpy(target(tokens[cache.length :] + x, cache, n_logits=K + 1))  # [K + 1, V]
    p = probabilities(logits, warp)  # [K + 1, V] float64, on the host
    # 3. Keep x_i with probability min(1, p_i(x_i) / q_i(x_i)). At the first rejection draw t
    #    from norm(max(0, p_i - q_i)) instead; if all K are kept, draw a bonus t from p_{K+1}.
    m, t = accept_or_resample(x, q, p, rng)
    tokens += x[:m] + [t]
    # 4. Both caches roll back to the committed tokens they have seen: a length change, no copy.
    cache.rollback(len(tokens) - 1)
    drafter.rollback(tokens)
    assert cache.length == len(tokens) - 1  # never the newest token: the next round feeds it
    return K, m


def speculative_setup(target, drafter: Drafter, prompt: List[int], n_new: int):
    """The request checked, the target's KV cache made.  -> (tokens, n_stop, cache, stats)"""
    check_vocabularies(drafter, target)
    tokens, n_new, stats = checked_request(target, prompt, n_new, "speculative")
    n_stop = len(tokens) + n_new
    return tokens, n_stop, target.new_cache(n_stop - 1), stats  # the last token is never fed


def speculative_sample(target, draft, prompt: List[int], n_new: int, K: int = 4,
                       warp: Warp = Warp(), rng: np.random.Generator = None,
                       on_tokens: Callable = None):
    """Sample n_new tokens from `target`, `draft` proposing K tokens a round: a model (drafting
    through a ModelDrafter) or a Drafter. Exactly n_new tokens come out (fewer only if the
    context fills up), as a round proposes no more than are still needed. on_tokens(ids, kinds)
    streams each round's tokens (stats.kinds). Returns (new_token_ids, stats)."""
    check_K(K)
    drafter = draft if isinstance(draft, Drafter) else ModelDrafter(draft)
    rng = rng if rng is not None else np.random.default_rng()
    tokens, n_stop, cache, stats = speculative_setup(target, drafter, prompt, n_new)
    with stats.timing("prefill_seconds"):
        prefill(target, cache, tokens)
        drafter.start(tokens, n_stop - 1)
    timed_target = Timed(target)  # counts the decoding forwards and their seconds
    with stats.timing("decode_seconds"):
        while len(tokens) < n_stop:
            most = n_stop - len(tokens) - 1  # a round emits K + 1 tokens at most
            proposed, m = speculative_round(tokens, min(K, most), drafter, timed_target, cache,
                                            warp, rng)
            stats.add_round(proposed, m)
            if on_tokens:
                on_tokens(tokens[-(m + 1) :], kinds(proposed, m))
    stats.count_forwards(timed_target, drafter)
    stats.n_generated = len(tokens) - stats.n_prompt
    return tokens[stats.n_prompt :], stats
