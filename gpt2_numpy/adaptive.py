"""Cost-aware adaptive lookahead: choose K, the number of drafts, before every round.

A round with K drafts costs K draft steps and one target forward over T = K + 1 positions, and
if each draft is accepted with probability a it emits on average (Leviathan et al. 2023, eq. 1)

    tokens(K, a) = (1 - a^(K+1)) / (1 - a)          (K + 1 when a = 1)

K = 0 is a plain autoregressive step: one token for r(1), the cost of a 1-position forward.
`AdaptiveK` keeps running estimates of a, of the draft step time t_draft and of r(T), and before
each round picks the K that maximises the expected tokens per second:

    K* = argmax over K in [0, K_max] of  tokens(K, a) / (K t_draft + r(K + 1))

What wins depends on the hardware as much as on the draft. On a CPU a 2-position forward can
cost twice a 1-position one (a matrix-vector product becomes a matrix-matrix product), so only
high acceptance pays for the verify step; on a GPU r(T) is nearly flat for small T.

A guard keeps every run within a few percent of plain decoding: the policy never bets more on
drafting than the run can afford to lose (see AdaptiveK).

`adaptive_speculative_sample` runs the rounds of decoding.speculative_round with the K a policy
chooses before each, and owns what only a changing K needs: the look back (a draft that sat out
plain rounds catches up on their tokens and says how often it would have been accepted there,
`LookBackDrafter`) and the timings the policy learns from (`Timed`, read with the policy's
clock).

Choosing K never changes what is sampled, only how fast: whatever K a round uses, its tokens
follow the target's distribution, and K is decided from past rounds only.
"""

import numbers
import time
from typing import Callable, List

import numpy as np

from .backend import to_numpy
from .decoding import (Drafter, ModelDrafter, check_vocabularies, checked_request, prefill,
                       speculative_round)
from .errors import GPT2Error
from .sampling import Warp, probabilities
from .stats import Timed


def expected_tokens(K: int, a: float) -> float:
    """Tokens a round with K drafts emits on average when each draft passes with probability a:
    1 + a + a^2 + ... + a^K (the accepted drafts, plus the resampled or bonus token)."""
    return K + 1.0 if a >= 1 else (1 - a ** (K + 1)) / (1 - a)


class KPolicy:
    """How many drafts each round proposes. adaptive_speculative_sample calls, in this order:

        begin(n_new, lags)      once, before a run of n_new tokens; lags: the drafter falls
                                behind in rounds without drafts and catches up (a draft model)
        next_K()                before every round: K >= 0, where 0 is a plain target step
        look_back(acceptance, seconds)   when a lagging drafter has caught up, before it drafts:
                                for each token it missed, the chance a draft there would have
                                been accepted, and the catch-up's time; next_K() is asked again
        update(K, accepted, draft_seconds, target_seconds)   after every round
        overhead(seconds)       after every update: the round's host time outside its forwards
                                and catch-up (choosing K, the round's bookkeeping), which
                                plain autoregressive decoding does not spend

    Subclasses need only next_K. Every time a policy hears is read with its `clock` (the wall
    clock; a replay gives a virtual one).
    """

    clock = staticmethod(time.perf_counter)  # also for a subclass that sets no clock

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock

    def begin(self, n_new: int, lags: bool = True) -> None:
        pass

    def next_K(self) -> int:
        raise NotImplementedError

    def look_back(self, acceptance, seconds: float) -> None:
        pass

    def update(self, K: int, accepted: int, draft_seconds: float, target_seconds: float) -> None:
        pass

    def overhead(self, seconds: float) -> None:
        pass


class FixedK(KPolicy):
    """The classic policy: K drafts every round (speculative_sample with an int K does the same)."""

    def __init__(self, K: int, clock: Callable[[], float] = time.perf_counter):
        super().__init__(clock)
        if not isinstance(K, numbers.Integral):
            raise GPT2Error(f"K must be an int, got {K!r}")
        if K < 1:
            raise GPT2Error(f"K (draft tokens per round) must be >= 1, got {K}")
        self.K = K

    def next_K(self) -> int:
        return self.K


def probability_of(logits: np.ndarray, tokens, warp: Warp) -> np.ndarray:
    """probabilities(row, warp)[token] for each row of logits and its token.  [n, V], [n] -> [n]

    A look back judges many rows at once (LookBackDrafter.catch_up). Greedy needs no
    distribution: a token has probability 1 where it is its row's argmax, else 0.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    if warp.greedy:
        return (np.argmax(logits, axis=-1) == tokens).astype(np.float64)
    return probabilities(logits, warp)[np.arange(len(tokens)), tokens]


class LookBackDrafter(ModelDrafter):
    """A ModelDrafter that looks back. Rounds without drafts leave its cache behind; before it
    drafts again it catches up on their tokens in one forward, which also gives its q at each."""

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
        logits = to_numpy(self.forward(missed, self.cache, n_logits=len(tokens) - first))  # [n, V]
        q = probability_of(logits[[i - first for i in plain]], [tokens[i] for i in plain], warp)
        return {i: min(1.0, q_i / p) for (i, p), q_i in zip(plain.items(), q)}


class TimedProposals(Drafter):
    """A drafter whose proposals are timed (propose: a Timed), everything else passed through."""

    def __init__(self, drafter: Drafter, clock):
        self.drafter, self.n_vocab = drafter, drafter.n_vocab
        self.propose = Timed(drafter.propose, clock)

    def rollback(self, tokens: List[int]) -> None:
        self.drafter.rollback(tokens)


def adaptive_speculative_sample(target, draft, prompt: List[int], n_new: int, policy: KPolicy,
                                warp: Warp = Warp(), rng: np.random.Generator = None,
                                on_tokens: Callable = None):
    """speculative_sample with each round's K chosen by `policy` (a KPolicy, e.g. AdaptiveK),
    from what the rounds before it measured; K = 0 makes a round a plain target step.

    draft: a model (it drafts through a LookBackDrafter, which looks back after plain rounds),
    or a Drafter (e.g. an NGramDrafter; one that is no LookBackDrafter never looks back).
    Arguments and result otherwise as speculative_sample's; the stats' seconds are read with
    the policy's clock, the draft's (draft_seconds) with the wall clock.

    Rounds without drafts leave a draft model behind: its cache has not seen their tokens.
    Before it drafts again it feeds them in one forward, which also gives its q at each: with
    the target's p(token) from that round, min(1, q / p) has mean sum_x min(p(x), q(x)), the
    chance a draft proposed there would have been accepted (LookBackDrafter.catch_up). The
    policy hears it (look_back) and is asked for K again.
    """
    if not isinstance(policy, KPolicy):
        raise GPT2Error(f"policy must be a KPolicy (adaptive.py), got {policy!r}")
    clock = policy.clock
    drafter = draft if isinstance(draft, Drafter) else LookBackDrafter(draft)
    lags = isinstance(drafter, LookBackDrafter)
    check_vocabularies(drafter, target)
    rng = rng if rng is not None else np.random.default_rng()
    tokens, n_new, stats = checked_request(target, prompt, n_new, "speculative")
    n_stop = len(tokens) + n_new
    cache = target.new_cache(n_stop - 1)

    start = clock()
    prefill(target, cache, tokens)
    drafter.start(tokens, n_stop - 1)
    stats.prefill_seconds = clock() - start

    timed_target, timed_drafter = Timed(target, clock), TimedProposals(drafter, clock)
    plain = {}  # index -> p(token), for tokens committed by rounds without drafts, not yet seen
    policy.begin(n_new, lags)
    start = clock()
    while len(tokens) < n_stop:
        # 1. K from the policy; a lagging draft catches up first, and the policy may reconsider.
        began, caught_up = clock(), 0.0
        most = n_stop - len(tokens) - 1  # a round emits K + 1 tokens at most
        K = min(policy.next_K(), most)
        if K and plain:
            looked = clock()
            acceptance = drafter.catch_up(tokens, plain, warp)
            plain.clear()
            caught_up = clock() - looked
            policy.look_back(list(acceptance.values()), caught_up)
            K = min(policy.next_K(), most)
        # 2. The round, its draft and target forwards timed (this round's seconds only).
        timed_drafter.propose.seconds = timed_target.seconds = 0.0
        r = speculative_round(tokens, K, timed_drafter, timed_target, cache, warp, rng)
        # 3. The policy hears the round, and its host time outside the forwards and catch-up.
        entered = clock()
        policy.update(r.K, r.accepted, timed_drafter.propose.seconds, timed_target.seconds)
        if not r.K and lags:  # a token the draft has not seen: p(token), for the look back
            plain[len(tokens) - 1] = float(r.p[0, tokens[-1]])
        forwards = timed_drafter.propose.seconds + timed_target.seconds + caught_up
        policy.overhead(max(0.0, entered - began - forwards) + clock() - entered)
        stats.target_seconds += timed_target.seconds
        stats.add_round(r.K, r.accepted)
        if on_tokens:
            on_tokens(tokens[-(r.accepted + 1) :], r.kinds())
    stats.decode_seconds = clock() - start
    stats.target_calls = stats.rounds
    stats.draft_seconds, stats.draft_calls = drafter.seconds, drafter.calls
    stats.n_generated = len(tokens) - stats.n_prompt
    return tokens[stats.n_prompt :], stats


class RunningMean:
    """A mean of the values seen so far that becomes exponentially weighted after 1/(1 - decay)
    values: unbiased at the start, and still able to follow a drift (another process taking a
    core, a CPU clock that changes)."""

    def __init__(self, decay: float):
        self.decay, self.n, self.value = decay, 0, 0.0

    def add(self, x: float) -> None:
        self.n += 1
        self.value += max(1 / self.n, 1 - self.decay) * (x - self.value)


class Estimates:
    """What the rounds so far measured (AdaptiveK's docstring says how each is estimated):

      a          accepted / (accepted + rejected), pseudo-counts weighted by decay per round
      t_draft    seconds per draft step, a RunningMean
      r(T)       seconds of a target forward over T positions, a RunningMean per measured T
      catch-ups  seconds of the last catch-up, and of the last at each lag
    """

    def __init__(self, decay: float, prior: float):
        self.decay = decay
        self.accepted, self.rejected = prior, prior  # pseudo-counts: a = 0.5 at first
        self.t_draft = RunningMean(decay)
        self.r = {}  # T -> RunningMean of the seconds of a target forward over T positions
        self.stands_for = {}  # T -> the RunningMean in r that gives r(T) (target_seconds)
        self.catch_up_seconds = None  # the last catch-up's time: t_draft until one is timed
        self.catch_ups = {}  # lag (plain tokens fed and judged) -> seconds, of the last such

    @property
    def acceptance(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def acceptance_plus(self, standard_errors: float) -> float:
        """a plus that many standard errors of a, sqrt(a (1 - a) / (n + 1)) with n the judged
        drafts (weighted), at most 1."""
        a, n = self.acceptance, self.accepted + self.rejected
        return min(1.0, a + standard_errors * (a * (1 - a) / (n + 1)) ** 0.5)

    @property
    def optimistic_acceptance(self) -> float:
        """a plus one standard error: the acceptance that decides whether to draft at all. A few
        judged drafts say little (3 of 4 passing fits a = 0.5 as well as a = 0.95), so the doubt
        is resolved in the draft's favour until enough drafts have been judged to settle it."""
        return self.acceptance_plus(1)

    def target_seconds(self, T: int) -> float:
        """r(T): measured, else the nearest measured T' < T (see AdaptiveK's docstring)."""
        if T not in self.stands_for:  # which T' stands for T changes only when a new T' is measured
            self.stands_for[T] = self.r[self.nearest_measured(T)]
        return self.stands_for[T].value

    def nearest_measured(self, T: int) -> int:
        if T in self.r:
            return T
        several = [t for t in self.r if t > 1]  # forwards over several positions measured
        below = [t for t in several if t < T]
        if below:
            return max(below)
        if several:  # below every measured one: the nearest above, the same kind of product
            return min(several)
        return 1

    def draft_seconds(self, lags: bool) -> float:
        """t_draft: measured, else the last catch-up's time, else r(1) (pessimistic), or 0 for
        a drafter that never lags (no model to run: an n-gram lookup)."""
        if self.t_draft.n:
            return self.t_draft.value
        if self.catch_up_seconds is not None:
            return self.catch_up_seconds
        return self.target_seconds(1) if lags else 0.0

    def catch_up_estimate(self, lag: int) -> float:
        """Seconds of a catch-up over `lag` plain tokens: as the last one, or past the longest
        lag seen, on the line through the shortest and the longest (a catch-up's cost grows
        with its lag: one more token to feed and one more row to judge)."""
        short, long = min(self.catch_ups), max(self.catch_ups)
        if lag <= long or short == long:
            return self.catch_up_seconds
        slope = max(0.0, (self.catch_ups[long] - self.catch_ups[short]) / (long - short))
        return self.catch_ups[long] + slope * (lag - long)

    def add_target_forward(self, T: int, seconds: float) -> None:
        if T not in self.r:  # a T measured for the first time: it may stand for others
            self.r[T], self.stands_for = RunningMean(self.decay), {}
        self.r[T].add(seconds)

    def add_drafting_round(self, K: int, accepted: int, draft_seconds: float) -> None:
        """A round accepting m of K drafts counts m acceptances and one rejection if m < K."""
        self.accepted = self.decay * self.accepted + accepted
        self.rejected = self.decay * self.rejected + (accepted < K)
        self.t_draft.add(draft_seconds / K)

    def add_look_back(self, acceptance, seconds: float) -> None:
        """Each judged token counts as a draft: that many acceptances in expectation."""
        passed = float(sum(acceptance))
        self.accepted += passed
        self.rejected += len(acceptance) - passed
        self.catch_ups[max(1, len(acceptance))] = seconds
        self.catch_up_seconds = seconds


class Probes:
    """When to try drafting again while plain steps win (AdaptiveK's docstring, Exploration and
    Doubt): the time spent in plain steps since the last probe, the plain tokens since the last
    look back, and what the last probe cost."""

    def __init__(self, explore: float, doubt: float):
        self.explore, self.doubt = explore, doubt
        self.idle = 0.0  # seconds spent in plain steps since the last probe
        self.unjudged = 0  # plain tokens since the last look back
        self.last_loss = 0.0  # what the last probe cost beyond plain steps (0: none yet)
        self.probing = False  # this round is a probe


class Guard:
    """The guard's account (AdaptiveK's docstring, Guard): a run of n_new tokens may lose
    `share` of the time n_new plain steps take, one round at most `stake` of what is left."""

    def __init__(self, share: float, stake: float):
        self.share, self.stake = share, stake
        self.n_new = None  # tokens this run will emit (begin); None: no guard
        self.loss = 0.0  # seconds drafting has cost this run beyond plain steps (< 0: gained)


class AdaptiveK(KPolicy):
    """Picks K in [0, K_max] before each round from what the previous rounds measured. Its
    state comes in parts: `estimates` (what it measured), `probes` (when to try drafting
    again), `guard` (what the run may still lose), and the draft's state in this run (`lags`,
    `lagging`, and `round_catch_up`: the catch-up this round made, 0 until it looks back).

    Estimates:
      a        per-draft acceptance = accepted / (accepted + rejected), exponentially weighted
               per round (decay). A round accepting m of K drafts counts m acceptances and one
               rejection if m < K; the drafts after a rejection are never judged, so they count
               neither way (accepted / drafted would underestimate a). Prior: a quarter of
               each, i.e. a = 0.5 but weak, so that a few rounds decide. Whether to draft at all
               is decided with a plus one standard error (`optimistic_acceptance`); how many
               drafts, with a itself.
      t_draft  seconds per draft token (the round's drafting time / K). Until a draft step has
               been timed: the time of the last catch-up (an upper bound: it fed at least one
               token), or before any, r(1); for a drafter without a model (n-gram lookup, which
               never lags), 0.
      r(T)     seconds of a target forward over T positions, a running mean per T. An unmeasured
               T is taken to cost what the nearest measured T below it costs (above 1, if any):
               a forward over more positions never costs less, so this is a lower bound, i.e.
               optimistic: a K that might pay gets tried once, and from then on it is measured.
               (Cost curves have steps, e.g. OpenBLAS pads a few rows to a block and one row
               more costs more, which interpolating between measured points would hide.) T = 1
               is never used for T > 1 once any T > 1 is measured, because one row is a cheaper
               kind of product (matrix-vector) than several: below the smallest measured T > 1,
               that one is used.
    Looking back: after plain rounds the draft model must catch up on the tokens it missed, in
    one forward over all of them, and that forward also tells how probable the draft found each
    of them. adaptive_speculative_sample turns this into the chance that a draft would have been
    accepted at each missed position, passes it to `look_back`, and asks for K again: every
    plain step becomes a judged draft, for the price of the catch-up alone.
    Exploration: while K* = 0 nothing new is learnt, so now and then the best K >= 1 is asked
    for anyway (a probe). The draft catches up, the look back re-estimates a from every token it
    missed, and the probe goes on to draft only if that says it may pay. Each probe's loss, the
    seconds it took beyond what plain steps would have taken for the tokens it emitted (the
    catch-up included), is measured; the next probe waits until the time spent in plain steps
    reaches loss / explore, so probing costs about `explore` (1%) of the time when the draft is
    useless, and the longer the wait, the more tokens the next look back judges. A probe whose
    drafts all passed is followed by another at once (if speculation can pay at all). The first
    drafting round, after the plain step of round 1, proposes K_max / 2 drafts: enough for a
    good draft to show itself in one round, few enough that a useless one costs little.
    explore = 0 never probes.
    Doubt: a few unlucky rounds early on can drag the estimate below break-even for a draft
    that is in fact good. So once the plain tokens since the last look back outnumber `doubt`
    (4) times the drafts judged so far, if a plus two standard errors could pay, the policy
    looks back without waiting for the probe (`in_doubt`).
    Catch-ups grow with the lag: one feeds every token the draft missed and judges each, so
    after a long plain stretch it costs more than the last one did (steeply where a plain step
    is short: more chunks to feed, and for a sampling warp a full distribution per judged row on
    the host; docs/adaptive.md). Beyond the longest lag caught up so far, its time is
    extrapolated along the line through the shortest and the longest (`catch_up_estimate`), and
    a probe also waits for that growth.
    Guard (a conservative bandit: Wu et al. 2016): a run of n_new tokens may lose at most
    `guard` (4%) of the time n_new plain steps take. The policy counts what drafting has lost
    so far (each drafting round's and catch-up's time beyond plain steps for the same tokens,
    gains counting negative, and every round's host time outside its forwards: choosing K and
    the bookkeeping, which plain decoding does not spend) and clips K to the largest K whose
    worst case (every draft rejected, after a catch-up as estimated) still fits. So a run is
    never more than ~4% slower than plain decoding, whatever the prompt; the price is that in
    short runs, where one failed round costs a few percent of the run, drafting stops after
    early failures or never starts (docs/adaptive.md gives the run lengths on a CPU). Unmeasured
    costs are the estimates above (optimistic), so the first round of a new size, or a catch-up
    while only one lag is known, can overshoot its worst case. guard = inf: no guard.
    stake: the share of what is left of the budget one round may risk (1: all of it). Below 1,
    a failed round leaves room for smaller ones, which keeps a good draft drafting after an
    unlucky round in a short run where rounds are cheap; where every round risks a large share
    of a short run's budget, it holds K below the best until gains raise the budget
    (docs/adaptive.md, "Short runs on a GPU's costs").

    Round 1 is a plain step, which measures r(1). A policy carries its estimates from one call
    of adaptive_speculative_sample to the next; make a new one for a cold start. clock: what
    the decoder reads the times it reports with (KPolicy).
    """

    def __init__(self, K_max: int, explore: float = 0.01, decay: float = 0.95,
                 prior: float = 0.25, guard: float = 0.04, doubt: float = 4.0,
                 stake: float = 1.0, clock: Callable[[], float] = time.perf_counter):
        super().__init__(clock)
        if K_max < 1:
            raise GPT2Error(f"K_max (the most drafts per round) must be >= 1, got {K_max}")
        if guard < 0:
            raise GPT2Error(f"guard (the share of a run drafting may lose) must be >= 0, "
                            f"got {guard}")
        if not 0 < stake <= 1:
            raise GPT2Error(f"stake (the share of the budget one round may risk) must be in "
                            f"(0, 1], got {stake}")
        self.K_max = K_max
        self.estimates = Estimates(decay, prior)
        self.probes = Probes(explore, doubt)
        self.guard = Guard(guard, stake)
        self.known_costs = None  # cost(K) for every K, since the estimates last changed
        self.known_rates = {}  # acceptance -> rates(acceptance), since the estimates last changed
        self.lags = True  # the drafter catches up after plain rounds (a draft model does)
        self.lagging = False  # the last round was plain: the draft must catch up first
        self.round_catch_up = 0.0  # seconds of this round's catch-up (look_back), until update
        self.looked_back = False  # look_back came this round: next_K is asked again

    def begin(self, n_new: int, lags: bool = True) -> None:
        """A run of n_new tokens starts (adaptive_speculative_sample calls this): the guard's
        budget, guard x the time of n_new plain steps, is counted from here. lags: the drafter
        catches up on the tokens of plain rounds before drafting (a draft model; n-gram drafting
        does not), and next_K is asked again after that catch-up. The estimates carry over from
        the previous run; its plain tokens, never looked back on, do not."""
        self.guard.n_new, self.guard.loss, self.lags, self.lagging = n_new, 0.0, lags, False
        self.probes.unjudged = 0

    def cost(self, K: int) -> float:
        """Expected seconds of a round with K drafts: K draft steps + one target forward over
        K + 1 positions."""
        return K * self.estimates.draft_seconds(self.lags) + self.estimates.target_seconds(K + 1)

    def rates(self, a: float) -> list:
        """Expected tokens per second of a round with K drafts, for K = 0..K_max, if each draft
        passes with probability a. Computed once per round and acceptance (the costs once)."""
        if self.known_costs is None:  # cost(K), with t_draft looked up once
            t_draft = self.estimates.draft_seconds(self.lags)
            self.known_costs = [K * t_draft + self.estimates.target_seconds(K + 1)
                                for K in range(self.K_max + 1)]
        if a not in self.known_rates:
            self.known_rates[a] = [expected_tokens(K, a) / cost
                                   for K, cost in enumerate(self.known_costs)]
        return self.known_rates[a]

    def next_K(self) -> int:
        est, probes = self.estimates, self.probes
        if 1 not in est.r:
            return 0  # a plain step first: it measures r(1), which everything is compared with
        # Whether to draft at all is decided optimistically (a doubtful draft gets judged
        # again), how many drafts with the estimate itself (optimism would overshoot K).
        best = self.best_K() if self.pays(est.optimistic_acceptance) else 0
        if not self.looked_back:  # before the round; asked again after a look back, it decides
            growth = 0.0 if not est.catch_ups else (  # a longer catch-up than the last probe's
                est.catch_up_estimate(probes.unjudged) - est.catch_up_seconds)
            due = probes.explore > 0 and probes.idle * probes.explore >= probes.last_loss + growth
            probes.probing = best == 0 and (due or self.in_doubt())
            if probes.probing:
                best = self.best_K()
        if best and not est.t_draft.n:
            best = (self.K_max + 1) // 2  # the first drafting round: see the class docstring
        if best:  # (the guard is only asked about drafting rounds)
            best = min(best, self.affordable())
        if not self.looked_back:
            probes.probing = probes.probing and best > 0  # a probe the guard forbids is not made
        return best

    def best_K(self) -> int:
        """The K >= 1 with the most expected tokens per second at the estimated acceptance."""
        rates = self.rates(self.estimates.acceptance)
        return max(range(1, self.K_max + 1), key=rates.__getitem__)

    def pays(self, a: float) -> bool:
        """Would some K >= 1 beat plain steps if drafts passed with probability a?"""
        return max(self.rates(a)[1:]) > self.rates(a)[0]

    def in_doubt(self) -> bool:
        """Time to look back again: the plain tokens since the last look back outnumber `doubt`
        times the drafts judged so far, and at a plus two standard errors drafting could still
        pay. A few early rejections must not settle the question for the rest of the run: the
        look backs come after geometrically longer stretches, so each judges several times as
        many tokens as everything before it, and they stop once the estimate is sure that
        drafting cannot pay."""
        est = self.estimates
        return (self.probes.unjudged >= self.probes.doubt * (est.accepted + est.rejected)
                and self.pays(est.acceptance_plus(2)))

    def worst_loss(self, K: int) -> float:
        """The most a round with K drafts can lose against a plain step: every draft rejected,
        one token for K draft steps and a target forward over K + 1, and before that a catch-up
        if the draft lags (catch_up_estimate)."""
        est = self.estimates
        if K == 0:
            return 0.0
        catch_up = 0.0
        if self.lagging and not self.looked_back:
            if est.catch_up_seconds is None and not est.t_draft.n:
                # The draft's speed is unknown until its first catch-up times it, and K is asked
                # again after that: until then, the catch-up alone is at stake (a draft smaller
                # than the target catches up on a token in less than a plain step).
                return est.target_seconds(1)
            if est.catch_ups:
                catch_up = est.catch_up_estimate(self.probes.unjudged)
            else:  # a draft step was timed, no catch-up yet: one of a token
                catch_up = est.draft_seconds(self.lags)
        return catch_up + self.cost(K) - est.target_seconds(1)

    def affordable(self) -> int:
        """The largest K whose worst case keeps the run within guard of plain decoding: what
        drafting has lost so far (a catch-up just made included) plus the round's worst loss
        must stay within guard x (n_new plain steps), and the worst loss within `stake` of what
        is left. Gains raise the budget."""
        guard = self.guard
        if guard.n_new is None:
            return self.K_max
        allowed = guard.share * guard.n_new * self.estimates.target_seconds(1)
        left = allowed - guard.loss - self.round_catch_up
        return max([0] + [K for K in range(1, self.K_max + 1)
                          if self.worst_loss(K) <= guard.stake * left])

    def look_back(self, acceptance, seconds: float) -> None:
        """The draft caught up on tokens it missed, in `seconds`; `acceptance` holds, for each
        missed token a plain round chose, the probability that a draft proposed there would
        have been accepted. Each counts as a judged draft: that many acceptances in
        expectation, the rest rejections. next_K is asked again after this."""
        self.estimates.add_look_back(acceptance, seconds)
        self.probes.unjudged = 0
        self.round_catch_up, self.looked_back = seconds, True
        self.known_costs, self.known_rates = None, {}  # draft_seconds may have changed

    def overhead(self, seconds: float) -> None:
        """A round's host time outside its forwards (choosing K, bookkeeping): plain decoding
        does not spend it, so the guard counts it as lost, in plain rounds too."""
        self.guard.loss += seconds

    def update(self, K: int, accepted: int, draft_seconds: float, target_seconds: float) -> None:
        """Record a finished round: K drafts proposed, `accepted` of them kept, and its times
        (draft_seconds: proposing them; a catch-up is reported to look_back instead)."""
        est, probes, guard = self.estimates, self.probes, self.guard
        looked, self.round_catch_up, self.looked_back = self.round_catch_up, 0.0, False
        est.add_target_forward(K + 1, target_seconds)
        self.known_costs, self.known_rates = None, {}  # r(T) changed, and so do the rates
        # The guard's account: a plain step costs what it costs; drafting (its catch-up included)
        # is charged what it took beyond plain steps for the same tokens.
        guard.loss += looked
        if K:
            guard.loss += draft_seconds + target_seconds - (accepted + 1) * est.target_seconds(1)
        self.lagging = K == 0 and self.lags
        if K == 0:
            probes.idle += target_seconds
            probes.unjudged += 1
            if probes.probing:  # the probe's look back said no: it cost the catch-up
                probes.idle, probes.last_loss, probes.probing = 0.0, looked, False
            return
        est.add_drafting_round(K, accepted, draft_seconds)
        probes.idle = 0.0
        if probes.probing:
            plain = (accepted + 1) * est.target_seconds(1)  # plain steps for the same tokens
            probes.last_loss = max(0.0, looked + draft_seconds + target_seconds - plain)
            if accepted == K and self.pays(1.0):
                probes.last_loss = 0.0  # every draft passed: look again at once
