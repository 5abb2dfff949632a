"""Autoregressive and speculative sampling.

Both decoders return the new token ids and a `Stats` record. They share one bookkeeping rule:

    `tokens` is the committed sequence (prompt + generated). A model's KV cache always holds a
    prefix tokens[:cache.length], and never the newest committed token: that one was just sampled
    and is fed at the start of the next forward.

Speculative sampling (Leviathan et al. 2023, Algorithm 1; Chen et al. 2023), p = target, q = draft:
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
from dataclasses import dataclass, field
from typing import Callable, List, NamedTuple, Optional

import numpy as np

from .adaptive import FixedK, Lookahead
from .backend import synchronize, to_numpy
from .drafters import Drafter
from .errors import GPT2Error
from .sampling import Warp, accept_or_resample, probabilities, probability_of, sample


@dataclass
class Stats:
    """What a run did and how long it took. Times in seconds; prefill is not in `decode_seconds`."""

    mode: str
    n_prompt: int = 0
    n_generated: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    target_seconds: float = 0.0  # inside target forwards (prefill excluded)
    draft_seconds: float = 0.0  # inside draft forwards (prefill excluded)
    target_calls: int = 0
    draft_calls: int = 0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    accepted_per_round: List[int] = field(default_factory=list)  # m for every round
    K_per_round: List[int] = field(default_factory=list)
    stopped_at_context: bool = False

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of decoding (prompt and model loading excluded)."""
        return self.n_generated / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    @property
    def acceptance_rate(self) -> float:
        """alpha-hat: accepted drafts / proposed drafts."""
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_round(self) -> float:
        """tau: emitted tokens per target forward (1 for autoregressive decoding)."""
        return self.n_generated / self.rounds if self.rounds else float("nan")

    def add_round(self, K: int, accepted: int) -> None:
        self.rounds += 1
        self.drafted += K
        self.accepted += accepted
        self.accepted_per_round.append(accepted)
        self.K_per_round.append(K)

    def accepted_histogram(self) -> List[int]:
        """histogram[m] = number of rounds in which exactly m drafts were accepted."""
        most = max(self.K_per_round, default=0)
        return np.bincount(np.asarray(self.accepted_per_round, dtype=int), minlength=most + 1).tolist()

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items()}
        d.update(seconds=self.seconds, tokens_per_second=self.tokens_per_second)
        if self.mode != "autoregressive":
            d.update(acceptance_rate=self.acceptance_rate, tokens_per_round=self.tokens_per_round,
                     accepted_histogram=self.accepted_histogram())
        return d


class Timed:
    """Calls a model and accumulates the time spent, logits copied to the host included (the
    copy is also what waits for an asynchronous GPU to finish). clock() reads seconds: the wall
    clock, or a replay's virtual one (bench/replay.py)."""

    def __init__(self, model, clock: Callable[[], float] = time.perf_counter):
        self.model, self.clock, self.seconds, self.calls = model, clock, 0.0, 0

    def __call__(self, ids, cache, n_logits=1) -> Optional[np.ndarray]:
        start = self.clock()
        logits = self.model(ids, cache, n_logits)
        logits = None if logits is None else to_numpy(logits)
        self.seconds += self.clock() - start
        self.calls += 1
        return logits


def check_room(model, n_prompt: int) -> None:
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


def plan(model, prompt, n_new: int, mode: str):
    """Validate a request; cap it at the context. Returns (tokens, n_new, stats)."""
    check_n_new(n_new)
    tokens = [int(t) for t in prompt]
    check_room(model, len(tokens))
    room = model.n_ctx - len(tokens)  # generation stops when the context is full
    stats = Stats(mode, n_prompt=len(tokens), stopped_at_context=n_new > room)
    return tokens, min(n_new, room), stats


def autoregressive_sample(model, prompt: List[int], n_new: int, warp: Warp = Warp(),
                          rng: np.random.Generator = None, on_tokens: Callable = None, *,
                          clock: Callable[[], float] = time.perf_counter):
    """Sample n_new tokens from `model`, one single-token forward per step.

    Stops early, with stats.stopped_at_context set, when the context (n_ctx) is full.
    on_tokens(ids, kinds) is called as tokens are committed (for streaming); kinds are "target".
    clock() reads the seconds the stats report (default: the wall clock).
    Returns (new_token_ids, stats).
    """
    rng = rng if rng is not None else np.random.default_rng()
    tokens, n_new, stats = plan(model, prompt, n_new, "autoregressive")
    cache = model.new_cache(len(tokens) + n_new - 1)  # the last new token is never fed

    start = clock()
    prefill(model, cache, tokens)
    stats.prefill_seconds = clock() - start

    target = Timed(model, clock)
    start = clock()
    for _ in range(n_new):
        logits = target(tokens[cache.length :], cache)  # [1, V]: feeds the newest token only
        tokens.append(sample(probabilities(logits[-1], warp), rng))
        assert cache.length == len(tokens) - 1
        if on_tokens:
            on_tokens(tokens[-1:], ["target"])
    stats.decode_seconds = clock() - start
    stats.target_seconds, stats.target_calls = target.seconds, target.calls
    stats.rounds = stats.n_generated = len(tokens) - stats.n_prompt
    return tokens[stats.n_prompt :], stats


class ModelDrafter(Drafter):
    """Proposes tokens by sampling a small draft model, keeping its KV cache across rounds.
    Rounds without drafts leave its cache behind: it lags, and catches up before drafting."""

    lags = True

    def __init__(self, model, clock: Callable[[], float] = time.perf_counter):
        self.model = Timed(model, clock)
        self.n_vocab = model.n_vocab
        self.cache = None

    def start(self, tokens: List[int], capacity: int) -> None:
        self.cache = None  # dropped first, so that a GPU model can hand its arrays out again
        self.cache = self.model.model.new_cache(capacity)
        prefill(self.model, self.cache, tokens)
        self.model.seconds, self.model.calls = 0.0, 0  # count decoding only

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
            logits = self.model(new, self.cache)  # [1, V]
            q[i] = probabilities(logits[-1], warp)
            drafts.append(sample(q[i], rng))
            new = drafts[-1:]
        return drafts, q

    def catch_up(self, tokens: List[int], plain: dict, warp: Warp) -> dict:
        """Feed every token the cache lacks but the newest (propose feeds that) in one forward,
        and look back: for each token a plain round chose, plain = {index: p(token)} with p the
        target's distribution there, return {index: min(1, q(token) / p(token))}, q the draft's.
        Its mean over token ~ p is sum_x min(p(x), q(x)), the probability that a draft x ~ q
        proposed there would have been accepted (for greedy decoding: 1 if the two argmaxes
        agree, else 0). Feeding the missed tokens is needed before drafting anyway; the look
        back adds only the logits rows of the plain tokens and their softmaxes."""
        missed = tokens[self.cache.length : -1]
        if not missed or not plain:
            return {}
        # Plain tokens come after everything the cache holds, and the newest is one of them: the
        # last n rows of the forward predict tokens[first:], which include them all.
        first = min(plain)
        logits = self.model(missed, self.cache, n_logits=len(tokens) - first)  # [n, V]
        q = probability_of(logits[[i - first for i in plain]], [tokens[i] for i in plain], warp)
        return {i: min(1.0, q_i / p) for (i, p), q_i in zip(plain.items(), q)}

    @property
    def seconds(self) -> float:
        return self.model.seconds

    @property
    def calls(self) -> int:
        return self.model.calls

    def rollback(self, tokens: List[int]) -> None:
        """Keep the cached prefix that is still committed (and never the newest token)."""
        self.cache.rollback(min(self.cache.length, len(tokens) - 1))


class Round(NamedTuple):
    """What one round did: K drafts proposed, `accepted` of them kept, then one more token t."""

    K: int
    accepted: int
    p_t: float  # p(t): the target's probability of t where it was drawn (for look backs)
    draft_seconds: float  # proposing the drafts
    target_seconds: float  # verifying them: the target's forward, p, accept or resample

    def kinds(self) -> List[str]:
        """How each emitted token came about (on_tokens' kinds)."""
        last = "resampled" if self.accepted < self.K else "bonus" if self.K else "target"
        return ["accepted"] * self.accepted + [last]


def speculative_round(tokens: List[int], K: int, drafter: Drafter, verify: Timed, cache,
                      warp: Warp, rng: np.random.Generator, clock=time.perf_counter) -> Round:
    """One round of speculative sampling: append 1 to K + 1 tokens to `tokens`, each distributed
    exactly as the target alone would sample it. p is the target's distribution, q the draft's.

    verify: the target, whose KV `cache` holds every token but the newest. K = 0, or a drafter
    that finds nothing to propose, makes the round a plain target step.
    """
    start = clock()
    # 1. The draft proposes x_1..x_K, sampling x_i ~ q_i (a drafter may propose fewer).
    x, q = drafter.propose(tokens, K, warp, rng) if K else ([], None)  # q: [K, V]
    K, drafted = len(x), clock()
    # 2. ONE target forward over the newest token and x_1..x_K: its K + 1 rows are p_1..p_{K+1},
    #    where p_i is the target's distribution at the position of x_i.
    logits = verify(tokens[cache.length :] + x, cache, n_logits=K + 1)  # [K + 1, V]
    p = probabilities(logits, warp)  # [K + 1, V] float64
    # 3. Keep x_i with probability min(1, p_i(x_i) / q_i(x_i)). At the first rejection draw t
    #    from norm(max(0, p_i - q_i)) instead; if all K are kept, draw a bonus t from p_{K+1}.
    m, t = accept_or_resample(x, q, p, rng)
    verified = clock()
    tokens += x[:m] + [t]
    # 4. Both caches roll back to the committed tokens they have seen: a length change, no copy.
    cache.rollback(len(tokens) - 1)
    drafter.rollback(tokens)
    assert cache.length == len(tokens) - 1  # never the newest token: the next round feeds it
    return Round(K, m, float(p[m, t]), drafted - start, verified - drafted)


def speculative_sample(target, draft, prompt: List[int], n_new: int, K=4,
                       warp: Warp = Warp(), rng: np.random.Generator = None,
                       on_tokens: Callable = None, *,
                       clock: Callable[[], float] = time.perf_counter):
    """Sample n_new tokens from `target`, letting `draft` propose up to K tokens per round.

    draft: a model (it drafts through a ModelDrafter), or a Drafter (drafters.py), e.g. an
    NGramDrafter. K: an int >= 1, or a KPolicy that chooses each round's K (adaptive.py, e.g.
    AdaptiveK); a round with K = 0 is a plain target step.
    Exactly n_new tokens come out (a round never proposes more than are still needed), fewer
    only if the context fills up (stats.stopped_at_context). on_tokens(ids, kinds) streams each
    round's tokens with kinds "accepted" (a draft the target kept), "resampled" (drawn from the
    residual after a rejection), "bonus" (all drafts accepted, one more from p_{K+1}) or
    "target" (a round without drafts). clock() reads the seconds the stats report (default: the
    wall clock). Returns (new_token_ids, stats).
    """
    policy = FixedK(K) if isinstance(K, numbers.Number) else K
    drafter = draft if isinstance(draft, Drafter) else ModelDrafter(draft, clock)
    if drafter.n_vocab != target.n_vocab:
        raise GPT2Error(f"draft and target vocabularies differ ({drafter.n_vocab} vs "
                        f"{target.n_vocab} tokens): speculative decoding needs the same tokenizer")
    rng = rng if rng is not None else np.random.default_rng()
    tokens, n_new, stats = plan(target, prompt, n_new, "speculative")
    n_stop = len(tokens) + n_new
    cache = target.new_cache(n_stop - 1)

    start = clock()
    prefill(target, cache, tokens)
    drafter.start(tokens, n_stop - 1)
    stats.prefill_seconds = clock() - start

    verify = Timed(target, clock)
    lookahead = Lookahead(policy, drafter, warp, clock, n_new)  # each round's K (adaptive.py)
    start = clock()
    while len(tokens) < n_stop:
        K = lookahead.next_K(tokens, most=n_stop - len(tokens) - 1)  # K + 1 tokens at most
        r = speculative_round(tokens, K, drafter, verify, cache, warp, rng, clock)
        lookahead.update(tokens, r)
        stats.add_round(r.K, r.accepted)
        if on_tokens:
            on_tokens(tokens[-(r.accepted + 1) :], r.kinds())
    stats.decode_seconds = clock() - start
    stats.target_seconds, stats.target_calls = verify.seconds, verify.calls
    stats.draft_seconds, stats.draft_calls = drafter.seconds, drafter.calls
    stats.n_generated = len(tokens) - stats.n_prompt
    return tokens[stats.n_prompt :], stats
