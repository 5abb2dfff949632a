"""Autoregressive and speculative sampling.

Both decoders return the new token ids and a `Stats` record. They share one bookkeeping rule:

    `tokens` is the committed sequence (prompt + generated). A model's KV cache always holds a
    prefix tokens[:cache.length], and never the newest committed token: that one was just sampled
    and is fed at the start of the next forward.

Speculative sampling (Leviathan et al. 2023, Algorithm 1; Chen et al. 2023), in Leviathan et al.'s
letters, p = target, q = draft (Chen et al. swap them: q is their target, p their draft):
    1. the draft proposes K tokens, sampling x_i ~ q_i one cached forward at a time;
    2. the target scores the unseen tail of `tokens` plus x_1..x_K in ONE forward, whose last
       K + 1 rows give p_1..p_{K+1};
    3. x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection a
       token is drawn from norm(max(0, p_i - q_i)) instead; if all K pass, a bonus from p_{K+1};
    4. both caches roll back (a length change, no copy) to the committed prefix they have seen.
Each round therefore emits between 1 and K + 1 tokens for one target forward, and every emitted
token is distributed exactly as the (warped) target alone would have sampled it.
"""
import numbers
import time
from typing import Callable, List, NamedTuple

import numpy as np

from .backend import synchronize, to_numpy
from .errors import GPT2Error
from .sampling import Warp, accept_or_resample, probabilities, sample
from .stats import Stats, Timed


def check_prompt_fits(model, n_prompt: int) -> None:
    if n_prompt < 1:
        raise GPT2Error("the prompt must contain at least one token")
    if n_prompt >= model.n_ctx:
        raise GPT2Error(f"the prompt has {n_prompt} tokens but the model's context is "
                        f"{model.n_ctx}: no room left to generate")


def prefill(model, cache, tokens) -> None:
    """Feed all prompt tokens but the last in one forward. No logits: the last prompt token is
    fed by the first decoding step, like every newest token (the bookkeeping rule above)."""
    if len(tokens) > 1:
        model(tokens[:-1], cache, n_logits=0)
        synchronize(cache.k)  # so that the prefill's time is counted as prefill


def check_n_new(n_new: int) -> None:
    if n_new < 1:
        raise GPT2Error(f"the number of tokens to generate must be >= 1, got {n_new}")


def check_K(K) -> None:
    if not isinstance(K, numbers.Integral):
        raise GPT2Error(f"K (draft tokens per round) must be an int, got {K!r} (a policy that "
                        f"chooses K goes to adaptive.adaptive_speculative_sample)")
    if K < 1:
        raise GPT2Error(f"K (draft tokens per round) must be >= 1, got {K}")


def check_vocabularies(drafter, target) -> None:
    if drafter.n_vocab != target.n_vocab:
        raise GPT2Error(f"draft and target vocabularies differ ({drafter.n_vocab} vs "
                        f"{target.n_vocab} tokens): speculative decoding needs the same tokenizer")


def checked_request(model, prompt, n_new: int, mode: str):
    """Validate a request; cap it at the context. Returns (tokens, n_new, stats)."""
    check_n_new(n_new)
    tokens = [int(t) for t in prompt]
    check_prompt_fits(model, len(tokens))
    room = model.n_ctx - len(tokens)  # generation stops when the context is full
    stats = Stats(mode, n_prompt=len(tokens), stopped_at_context=n_new > room)
    return tokens, min(n_new, room), stats


def autoregressive_sample(model, prompt: List[int], n_new: int, warp: Warp = Warp(),
                          rng: np.random.Generator = None, on_tokens: Callable = None):
    """Sample n_new tokens from `model`, one single-token forward per step.

    Stops early, with stats.stopped_at_context set, when the context (n_ctx) is full.
    on_tokens(ids, kinds) is called as tokens are committed (for streaming); kinds are "target".
    Returns (new_token_ids, stats); the stats' seconds are wall-clock time.
    """
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
    """What speculative_sample asks for drafts. It calls, in this order:

        start(tokens, capacity)        once, before the first round
        propose(tokens, K, warp, rng)  -> (drafts, q): at most K token ids, and q [len(drafts),
                                       V], the distributions they were drawn from
        rollback(tokens)               after every round; `tokens` is the committed sequence

    and reads n_vocab (the vocabulary size), and for its stats seconds and calls (time spent and
    calls made proposing).
    """

    n_vocab: int
    seconds, calls = 0.0, 0

    def start(self, tokens: List[int], capacity: int) -> None:
        pass

    def propose(self, tokens: List[int], K: int, warp, rng):
        raise NotImplementedError

    def rollback(self, tokens: List[int]) -> None:
        pass


class ModelDrafter(Drafter):
    """Proposes tokens by sampling a small draft model, keeping its KV cache across rounds."""

    def __init__(self, model):
        self.model, self.n_vocab = model, model.n_vocab
        self.cache = self.forward = None

    def start(self, tokens: List[int], capacity: int) -> None:
        self.cache = None  # dropped first, so that a GPU model can hand its arrays out again
        self.cache = self.model.new_cache(capacity)
        prefill(self.model, self.cache, tokens)
        self.forward = Timed(self.model)  # the draft's forwards from here on (stats)

    def propose(self, tokens: List[int], K: int, warp: Warp, rng):
        """Sample x_1..x_K, x_i ~ q_i. Returns (drafts, q [K, V]).

        K forwards: the first feeds whatever of `tokens` the cache has not seen (one token, two
        when the previous round accepted everything, more after rounds without drafts), each
        later one the previous draft.
        x_K itself is never fed; the next round does that if it is accepted.
        """
        drafts, q = [], np.empty((K, self.n_vocab))
        new = tokens[self.cache.length :]
        for i in range(K):
            logits = to_numpy(self.forward(new, self.cache))  # [1, V]
            q[i] = probabilities(logits[-1], warp)
            drafts.append(sample(q[i], rng))
            new = drafts[-1:]
        return drafts, q

    def rollback(self, tokens: List[int]) -> None:
        """Keep the cached prefix that is still committed (and never the newest token)."""
        self.cache.rollback(min(self.cache.length, len(tokens) - 1))

    seconds = property(lambda self: self.forward.seconds)
    calls = property(lambda self: self.forward.calls)


class Round(NamedTuple):
    """What one round did: K drafts proposed, `accepted` of them kept, then one more token."""

    K: int
    accepted: int
    p: np.ndarray  # [K + 1, V]: p_1..p_{K+1}, the target's distributions it verified against

    def kinds(self) -> List[str]:
        """How each emitted token came about (on_tokens' kinds)."""
        last = "resampled" if self.accepted < self.K else "bonus" if self.K else "target"
        return ["accepted"] * self.accepted + [last]


def speculative_round(tokens: List[int], K: int, drafter: Drafter, target, cache, warp: Warp,
                      rng: np.random.Generator) -> Round:
    """One round of speculative sampling: append 1 to K + 1 tokens to `tokens`, each distributed
    exactly as the target alone would sample it. p is the target's distribution, q the draft's.

    target: the target model, whose KV `cache` holds every token but the newest. A drafter
    that proposes nothing (it finds nothing, or a run's last token asks it for K = 0) makes the
    round a plain target step.
    """
    # 1. The draft proposes x_1..x_K, sampling x_i ~ q_i (a drafter may propose fewer).
    x, q = drafter.propose(tokens, K, warp, rng)  # q: [K, V]
    K = len(x)
    # 2. ONE target forward over the newest token and x_1..x_K: its K + 1 rows are p_1..p_{K+1},
    #    where p_i is the target's distribution at the position of x_i.
    logits = target(tokens[cache.length :] + x, cache, n_logits=K + 1)
    logits = to_numpy(logits)  # [K + 1, V], copied to the host, where sampling runs
    p = probabilities(logits, warp)  # [K + 1, V] float64
    # 3. Keep x_i with probability min(1, p_i(x_i) / q_i(x_i)). At the first rejection draw t
    #    from norm(max(0, p_i - q_i)) instead; if all K are kept, draw a bonus t from p_{K+1}.
    m, t = accept_or_resample(x, q, p, rng)
    tokens += x[:m] + [t]
    # 4. Both caches roll back to the committed tokens they have seen: a length change, no copy.
    cache.rollback(len(tokens) - 1)
    drafter.rollback(tokens)
    assert cache.length == len(tokens) - 1  # never the newest token: the next round feeds it
    return Round(K, m, p)


def speculative_setup(target, draft, prompt: List[int], n_new: int,
                      make_drafter: Callable = ModelDrafter, clock: Callable = time.perf_counter):
    """What a speculative decoder does before its first round: check the request, make the
    drafter (make_drafter(draft) if draft is a model), the target's KV cache, and prefill both.
    Returns (tokens, n_stop, drafter, cache, stats): the committed tokens, the length at which
    to stop, and the stats with the prefill's seconds as `clock` reads them."""
    drafter = draft if isinstance(draft, Drafter) else make_drafter(draft)
    check_vocabularies(drafter, target)
    tokens, n_new, stats = checked_request(target, prompt, n_new, "speculative")
    n_stop = len(tokens) + n_new
    cache = target.new_cache(n_stop - 1)  # the last new token is never fed
    start = clock()
    prefill(target, cache, tokens)
    drafter.start(tokens, n_stop - 1)
    stats.prefill_seconds = clock() - start
    return tokens, n_stop, drafter, cache, stats


def speculative_sample(target, draft, prompt: List[int], n_new: int, K: int = 4,
                       warp: Warp = Warp(), rng: np.random.Generator = None,
                       on_tokens: Callable = None):
    """Sample n_new tokens from `target`, letting `draft` propose K tokens per round.

    draft: a model (it drafts through a ModelDrafter), or a Drafter (drafters.py), e.g. an
    NGramDrafter. K: an int >= 1 (adaptive.py's adaptive_speculative_sample chooses each
    round's K instead).
    Exactly n_new tokens come out (a round never proposes more than are still needed), fewer
    only if the context fills up (stats.stopped_at_context). on_tokens(ids, kinds) streams each
    round's tokens with kinds "accepted" (a draft the target kept), "resampled" (drawn from the
    residual after a rejection), "bonus" (all drafts accepted, one more from p_{K+1}) or
    "target" (a round without drafts). Returns (new_token_ids, stats); the stats' seconds are
    wall-clock time.
    """
    check_K(K)
    rng = rng if rng is not None else np.random.default_rng()
    tokens, n_stop, drafter, cache, stats = speculative_setup(target, draft, prompt, n_new)
    timed_target = Timed(target)  # counts the decoding forwards and their seconds
    with stats.timing("decode_seconds"):
        while len(tokens) < n_stop:
            most = n_stop - len(tokens) - 1  # a round emits K + 1 tokens at most
            r = speculative_round(tokens, min(K, most), drafter, timed_target, cache, warp, rng)
            stats.add_round(r.K, r.accepted)
            if on_tokens:
                on_tokens(tokens[-(r.accepted + 1) :], r.kinds())
    stats.count_forwards(timed_target, drafter)
    stats.n_generated = len(tokens) - stats.n_prompt
    return tokens[stats.n_prompt :], stats

