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

Choosing K never changes what is sampled, only how fast: whatever K a round uses, its tokens
follow the target's distribution, and K is decided from past rounds only.
"""
import numbers

from .errors import GPT2Error


def expected_tokens(K: int, a: float) -> float:
    """Tokens a round with K drafts emits on average when each draft passes with probability a:
    1 + a + a^2 + ... + a^K (the accepted drafts, plus the resampled or bonus token)."""
    return K + 1.0 if a >= 1 else (1 - a ** (K + 1)) / (1 - a)


class KPolicy:
    """How many drafts each round proposes. speculative_sample calls, in this order:

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

    Subclasses need only next_K. (An object that is not a KPolicy can serve as one if it has
    next_K, look_back and update; it is not told when a run begins, nor the overheads.)
    """

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
    """The classic policy: K drafts every round."""

    def __init__(self, K: int):
        if not isinstance(K, numbers.Integral):
            raise GPT2Error(f"K must be an int or a KPolicy, got {K!r}")
        if K < 1:
            raise GPT2Error(f"K (draft tokens per round) must be >= 1, got {K}")
        self.K = K

    def next_K(self) -> int:
        return self.K


class Lookahead:
    """Each round's K, from the policy; and, for a drafter that lags, the look back.

    Rounds without drafts leave a draft model behind: its cache has not seen their tokens.
    Before it drafts again it feeds them in one forward, which also gives its q at each: with
    the target's p(token) from that round, min(1, q / p) has mean sum_x min(p(x), q(x)), the
    chance a draft proposed there would have been accepted (ModelDrafter.catch_up). The policy
    hears it (look_back) and is asked for K again. With FixedK every round drafts, so none of
    this happens.
    """

    def __init__(self, policy: KPolicy, drafter, warp, clock, n_new: int):
        self.policy, self.drafter, self.warp, self.clock = policy, drafter, warp, clock
        self.plain = {}  # index -> p(token), for tokens committed by rounds without drafts
        self.began = self.caught_up = 0.0  # when next_K was asked; its catch-up's seconds
        if isinstance(policy, KPolicy):
            policy.begin(n_new, lags=drafter.lags)

    def next_K(self, tokens, most: int) -> int:
        """The policy's K for the next round, at most `most`."""
        self.began = self.clock()
        K = min(self.policy.next_K(), most)
        if K and self.plain:  # the draft lags: it catches up first, and the policy may reconsider
            start = self.clock()
            looked = self.drafter.catch_up(tokens, self.plain, self.warp)
            self.plain.clear()
            self.caught_up = self.clock() - start
            self.policy.look_back(list(looked.values()), self.caught_up)
            K = min(self.policy.next_K(), most)
        return K

    def update(self, tokens, round) -> None:
        """After a round (decoding.Round) that appended its tokens to `tokens`. The policy also
        hears the round's host time outside its forwards and catch-up: from next_K to here, and
        this update."""
        entered = self.clock()
        self.policy.update(round.K, round.accepted, round.draft_seconds, round.target_seconds)
        if not round.K and self.drafter.lags:  # a token the draft has not seen: looked back on
            self.plain[len(tokens) - 1] = round.p_t
        if isinstance(self.policy, KPolicy):
            forwards = round.draft_seconds + round.target_seconds + self.caught_up
            self.policy.overhead(max(0.0, entered - self.began - forwards) + self.clock() - entered)
        self.caught_up = 0.0


class RunningMean:
    """A mean of the values seen so far that becomes exponentially weighted after 1/(1 - decay)
    values: unbiased at the start, and still able to follow a drift (another process taking a
    core, a CPU clock that changes)."""

    def __init__(self, decay: float):
        self.decay, self.n, self.value = decay, 0, 0.0

    def add(self, x: float) -> None:
        self.n += 1
        self.value += max(1 / self.n, 1 - self.decay) * (x - self.value)


class AdaptiveK(KPolicy):
    """Picks K in [0, K_max] before each round from what the previous rounds measured.

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
               (Cost curves have steps, e.g. OpenBLAS pads 2..7 rows to 8 and 9 rows cost
               more, which interpolating between measured points would hide.) T = 1 is never
               used for T > 1 once any T > 1 is measured, because one row is a cheaper kind of
               product (matrix-vector) than several: below the smallest measured T > 1, that one
               is used.
    Looking back: after plain rounds the draft model must catch up on the tokens it missed, in
    one forward over all of them, and that forward also tells how probable the draft found each
    of them. speculative_sample turns this into the chance that a draft would have been
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
    after a long plain stretch it costs more than the last one did (on a GPU steeply, where a
    plain step takes ~3 ms: more chunks to feed, and for a sampling warp a full distribution
    per judged row, 0.05-0.2 ms on the host). Beyond the longest lag
    caught up so far, its time is extrapolated along the line through the shortest and the
    longest (`catch_up_estimate`), and a probe also waits for that growth.
    Guard (a conservative bandit: Wu et al. 2016): a run of n_new tokens may lose at most
    `guard` (4%) of the time n_new plain steps take. The policy counts what drafting has lost
    so far (each drafting round's and catch-up's time beyond plain steps for the same tokens,
    gains counting negative, and every round's host time outside its forwards: choosing K and
    the bookkeeping, which plain decoding does not spend) and clips K to the largest K whose
    worst case (every draft rejected, after a catch-up as estimated) still fits. So a run is never more than ~4%
    slower than plain decoding, whatever the prompt; the price is that in short runs on a CPU,
    where one failed round costs a few percent of the run, drafting stops after early failures
    or (on the Xeon of docs/performance.md, below ~40 tokens) never starts. Unmeasured costs
    are the estimates above (optimistic), so the first round of a new size, or a catch-up
    while only one lag is known, can overshoot its worst case. guard = inf: no guard.
    stake: the share of what is left of the budget one round may risk (1: all of it). Below 1,
    a failed round leaves room for smaller ones, which keeps a good draft drafting after an
    unlucky round in a short run on a GPU; on a CPU, where every round risks a large share of
    a short run's budget, it holds K below the best until gains raise the budget
    (docs/adaptive.md, "Short runs on a GPU's costs").

    Round 1 is a plain step, which measures r(1). A policy carries its estimates from one call
    of speculative_sample to the next; make a new one for a cold start.
    """

    def __init__(self, K_max: int, explore: float = 0.01, decay: float = 0.95,
                 prior: float = 0.25, guard: float = 0.04, doubt: float = 4.0,
                 stake: float = 1.0):
        if K_max < 1:
            raise GPT2Error(f"K_max (the most drafts per round) must be >= 1, got {K_max}")
        if guard < 0:
            raise GPT2Error(f"guard (the share of a run drafting may lose) must be >= 0, "
                            f"got {guard}")
        self.K_max, self.explore, self.decay = K_max, explore, decay
        if not 0 < stake <= 1:
            raise GPT2Error(f"stake (the share of the budget one round may risk) must be in "
                            f"(0, 1], got {stake}")
        self.guard, self.doubt, self.stake = guard, doubt, stake
        self.accepted, self.rejected = prior, prior  # pseudo-counts: a = 0.5 at first
        self.t_draft = RunningMean(decay)
        self.catch_up_seconds = None  # the last catch-up's time: t_draft until one is timed
        self.catch_ups = {}  # lag (plain tokens fed and judged) -> seconds, of the last such
        self.r = {}  # T -> RunningMean of the seconds of a target forward over T positions
        self.stands_for = {}  # T -> the RunningMean in r that gives r(T) (target_seconds)
        self.known_costs = None  # cost(K) for every K, since the last update
        self.known_rates = {}  # acceptance -> rates(acceptance), since the last update
        self.idle = 0.0  # seconds spent in plain steps since the last probe
        self.unjudged = 0  # plain tokens since the last look back
        self.probe_loss = 0.0  # what the last probe cost beyond plain steps (0: none yet)
        self.probing = False
        self.look_seconds = None  # this round's catch-up time, once look_back has been called
        self.n_new = None  # tokens this run will emit (begin); None: no guard
        self.loss = 0.0  # seconds drafting has cost this run beyond plain steps (< 0: gained)
        self.lags = True  # the drafter catches up after plain rounds (a draft model does)
        self.lagging = False  # the last round was plain: the draft must catch up first

    def begin(self, n_new: int, lags: bool = True) -> None:
        """A run of n_new tokens starts (speculative_sample calls this): the guard's budget,
        guard x the time of n_new plain steps, is counted from here. lags: the drafter catches
        up on the tokens of plain rounds before drafting (a draft model; n-gram drafting does
        not), and next_K is asked again after that catch-up. The estimates carry over from the
        previous run; its plain tokens, never looked back on, do not."""
        self.n_new, self.loss, self.lags, self.lagging = n_new, 0.0, lags, False
        self.unjudged = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    @property
    def optimistic_acceptance(self) -> float:
        """a plus one standard error: the acceptance that decides whether to draft at all. A few
        judged drafts say little (3 of 4 passing fits a = 0.5 as well as a = 0.95), so the doubt
        is resolved in the draft's favour until enough drafts have been judged to settle it."""
        a, n = self.acceptance, self.accepted + self.rejected
        return min(1.0, a + (a * (1 - a) / (n + 1)) ** 0.5)

    def target_seconds(self, T: int) -> float:
        """r(T): measured, else the nearest measured T' < T (see the class docstring)."""
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

    def draft_seconds(self) -> float:
        """t_draft: measured, else the last catch-up's time, else r(1) (pessimistic), or 0 for
        a drafter that never lags (no model to run: an n-gram lookup)."""
        if self.t_draft.n:
            return self.t_draft.value
        if self.catch_up_seconds is not None:
            return self.catch_up_seconds
        return self.target_seconds(1) if self.lags else 0.0

    def cost(self, K: int) -> float:
        """Expected seconds of a round with K drafts: K draft steps + one verify over K + 1."""
        return K * self.draft_seconds() + self.target_seconds(K + 1)

    def rates(self, a: float) -> list:
        """Expected tokens per second of a round with K drafts, for K = 0..K_max, if each draft
        passes with probability a. Computed once per round and acceptance (the costs once)."""
        if self.known_costs is None:  # cost(K), with t_draft looked up once
            t_draft = self.draft_seconds()
            self.known_costs = [K * t_draft + self.target_seconds(K + 1)
                                for K in range(self.K_max + 1)]
        if a not in self.known_rates:
            self.known_rates[a] = [expected_tokens(K, a) / cost
                                   for K, cost in enumerate(self.known_costs)]
        return self.known_rates[a]

    def next_K(self) -> int:
        if 1 not in self.r:
            return 0  # a plain step first: it measures r(1), which everything is compared with
        # Whether to draft at all is decided optimistically (a doubtful draft gets judged
        # again), how many drafts with the estimate itself (optimism would overshoot K).
        best = self.best_K() if self.pays(self.optimistic_acceptance) else 0
        if self.look_seconds is None:  # before the round; asked again after a look back, it decides
            growth = 0.0 if not self.catch_ups else (  # a longer catch-up than the last probe's
                self.catch_up_estimate(self.unjudged) - self.catch_up_seconds)
            due = self.explore > 0 and self.idle * self.explore >= self.probe_loss + growth
            self.probing = best == 0 and (due or self.in_doubt())
            if self.probing:
                best = self.best_K()
        if best and not self.t_draft.n:
            best = (self.K_max + 1) // 2  # the first drafting round: see the class docstring
        if best:  # (the guard is only asked about drafting rounds)
            best = min(best, self.affordable())
        if self.look_seconds is None:
            self.probing = self.probing and best > 0  # a probe the guard forbids is not made
        return best

    def best_K(self) -> int:
        """The K >= 1 with the most expected tokens per second at the estimated acceptance."""
        rates = self.rates(self.acceptance)
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
        a, n = self.acceptance, self.accepted + self.rejected
        return (self.unjudged >= self.doubt * n
                and self.pays(min(1.0, a + 2 * (a * (1 - a) / (n + 1)) ** 0.5)))

    def catch_up_estimate(self, lag: int) -> float:
        """Seconds of a catch-up over `lag` plain tokens: as the last one, or past the longest
        lag seen, on the line through the shortest and the longest (a catch-up's cost grows
        with its lag: one more token to feed and one more row to judge)."""
        short, long = min(self.catch_ups), max(self.catch_ups)
        if lag <= long or short == long:
            return self.catch_up_seconds
        slope = max(0.0, (self.catch_ups[long] - self.catch_ups[short]) / (long - short))
        return self.catch_ups[long] + slope * (lag - long)

    def worst_loss(self, K: int) -> float:
        """The most a round with K drafts can lose against a plain step: every draft rejected,
        one token for K draft steps and a verify over K + 1, and before that a catch-up if the
        draft lags (catch_up_estimate)."""
        if K == 0:
            return 0.0
        catch_up = 0.0
        if self.lagging and self.look_seconds is None:
            if self.catch_up_seconds is None and not self.t_draft.n:
                # The draft's speed is unknown until its first catch-up times it, and K is asked
                # again after that: until then, the catch-up alone is at stake (a draft smaller
                # than the target catches up on a token in less than a plain step).
                return self.target_seconds(1)
            if self.catch_ups:
                catch_up = self.catch_up_estimate(self.unjudged)
            else:  # a draft step was timed, no catch-up yet: one of a token
                catch_up = self.draft_seconds()
        return catch_up + self.cost(K) - self.target_seconds(1)

    def affordable(self) -> int:
        """The largest K whose worst case keeps the run within guard of plain decoding: what
        drafting has lost so far (a catch-up just made included) plus the round's worst loss
        must stay within guard x (n_new plain steps), and the worst loss within `stake` of what
        is left. Gains raise the budget."""
        if self.n_new is None:
            return self.K_max
        allowed = self.guard * self.n_new * self.target_seconds(1)
        left = allowed - self.loss - (self.look_seconds or 0.0)
        return max([0] + [K for K in range(1, self.K_max + 1)
                          if self.worst_loss(K) <= self.stake * left])

    def look_back(self, acceptance, seconds: float) -> None:
        """The draft caught up on tokens it missed, in `seconds`; `acceptance` holds, for each
        missed token a plain round chose, the probability that a draft proposed there would
        have been accepted. Each counts as a judged draft: that many acceptances in
        expectation, the rest rejections. next_K is asked again after this."""
        passed = float(sum(acceptance))
        self.accepted, self.rejected = self.accepted + passed, self.rejected + len(acceptance) - passed
        self.catch_ups[max(1, len(acceptance))] = seconds
        self.unjudged = 0
        self.look_seconds = self.catch_up_seconds = seconds
        self.known_costs, self.known_rates = None, {}  # draft_seconds may have changed

    def overhead(self, seconds: float) -> None:
        """A round's host time outside its forwards (choosing K, bookkeeping): plain decoding
        does not spend it, so the guard counts it as lost, in plain rounds too."""
        self.loss += seconds

    def update(self, K: int, accepted: int, draft_seconds: float, target_seconds: float) -> None:
        """Record a finished round: K drafts proposed, `accepted` of them kept, and its times
        (draft_seconds: proposing them; a catch-up is reported to look_back instead)."""
        looked, self.look_seconds = self.look_seconds or 0.0, None
        if K + 1 not in self.r:  # a T measured for the first time: it may stand for others
            self.r[K + 1], self.stands_for = RunningMean(self.decay), {}
        self.r[K + 1].add(target_seconds)
        self.known_costs, self.known_rates = None, {}  # r(T) changed, and so do the rates
        # The guard's account: a plain step costs what it costs; drafting (its catch-up included)
        # is charged what it took beyond plain steps for the same tokens.
        self.loss += looked
        if K:
            self.loss += draft_seconds + target_seconds - (accepted + 1) * self.target_seconds(1)
        self.lagging = K == 0 and self.lags
        if K == 0:
            self.idle += target_seconds
            self.unjudged += 1
            if self.probing:  # the probe's look back said no: it cost the catch-up
                self.idle, self.probe_loss, self.probing = 0.0, looked, False
            return
        self.accepted = self.decay * self.accepted + accepted
        self.rejected = self.decay * self.rejected + (accepted < K)
        self.t_draft.add(draft_seconds / K)
        self.idle = 0.0
        if self.probing:
            plain = (accepted + 1) * self.target_seconds(1)  # plain steps for the same tokens
            self.probe_loss = max(0.0, looked + draft_seconds + target_seconds - plain)
            if accepted == K and self.pays(1.0):
                self.probe_loss = 0.0  # every draft passed: look again at once
