"""Adaptive lookahead: before every round, choose K, the number of drafts.

A round with K drafts costs K draft steps and a target forward over K + 1 positions, and emits
tokens(K, a) = 1 + a + ... + a^K tokens on average if each draft passes with probability a
(Leviathan et al. 2023, eq. 1). From what the rounds before it measured, `AdaptiveK` picks

    K* = argmax over K in [0, K_max] of  tokens(K, a) / (K t_draft + r(K + 1)),

t_draft being a draft step's time, r(T) a target forward's over T positions, and K = 0 a plain
target step (docs/adaptive.md: the reasoning, the measurements). K depends on past rounds only,
so `adaptive_speculative_sample` (the chain's round, or a plain step for K = 0) changes how fast
tokens come, never their distribution.
"""
import time
from types import SimpleNamespace
from typing import Callable, List

import numpy as np

from .backend import to_numpy
from .decoding import Drafter, ModelDrafter, prefill, speculative_round, speculative_setup
from .errors import GPT2Error
from .sampling import Warp, probabilities, sample
from .stats import Timed, kinds


def expected_tokens(K: int, a: float) -> float:
    """1 + a + a^2 + ... + a^K: the accepted drafts, plus the resampled or bonus token."""
    return K + 1.0 if a >= 1 else (1 - a ** (K + 1)) / (1 - a)


class RunningMean:
    """A mean, exponentially weighted after 1/(1 - decay) values: unbiased, yet following drift."""

    def __init__(self, decay: float):
        self.decay, self.n, self.value = decay, 0, 0.0

    def add(self, x: float) -> None:
        self.n += 1
        self.value += max(1 / self.n, 1 - self.decay) * (x - self.value)


class AdaptiveK:
    """Picks each round's K in [0, K_max] (docs/adaptive.md, "How the policy learns"):

      K*      the argmax above; drafting at all only if a + 1 standard error says it pays
      probe   while K* = 0, the best K >= 1 anyway, once plain steps took the last probe's loss
              / explore or at once in doubt (wants_probe); the look back then decides
      guard   a run of n_new tokens may lose guard x (n_new plain steps), host time included; a
              round risks (all drafts rejected, after its catch-up) at most stake x what is left

    adaptive_speculative_sample calls begin(n_new, lags) once per run, next_K() before each
    round and again after look_back(acceptance, seconds), and update(...) after it; the round's
    seconds are read with `clock`. What the policy measured carries over to later runs.
    """

    def __init__(self, K_max: int, explore: float = 0.01, decay: float = 0.95,
                 prior: float = 0.25, guard: float = 0.04, doubt: float = 4.0,
                 stake: float = 1.0, clock: Callable[[], float] = time.perf_counter):
        if K_max < 1 or guard < 0 or not 0 < stake <= 1:
            raise GPT2Error(f"K_max (the most drafts per round) must be >= 1, guard >= 0 and stake "
                            f"in (0, 1] (shares of a run's budget drafting may lose, and of what "
                            f"is left), got {K_max}, {guard} and {stake}")
        self.K_max, self.explore, self.decay, self.doubt = K_max, explore, decay, doubt
        self.guard, self.stake, self.clock = guard, stake, clock
        # What the rounds measured
        self.accepted, self.rejected = prior, prior  # a = 0.5 at first, but weakly held
        self.t_draft = RunningMean(decay)  # seconds of a draft step
        self.r, self.stands_for = {}, {}  # T -> RunningMean of r(T); T -> the one giving r(T)
        self.catch_up_seconds, self.catch_ups = None, {}  # the last's; lag -> the last's at it
        self.known_costs, self.known_rates = None, {}  # cost(K), rates(a): until a measure changes
        self.n_new, self.lost, self.lags = None, 0.0, True  # the run: see begin
        self.idle, self.probe_loss = 0.0, 0.0  # plain steps' seconds since the last probe; its loss
        self.unjudged, self.probing = 0, False  # plain tokens since the last look back; a probe?
        self.began = self.caught_up = None  # this round: when first asked; its catch-up's seconds

    def begin(self, n_new: int, lags: bool = True) -> None:
        """A run of n_new tokens starts: nothing lost yet. lags: plain steps leave the drafter
        behind, and it catches up before drafting (a draft model does, an n-gram lookup not)."""
        self.n_new, self.lost, self.lags, self.unjudged = n_new, 0.0, lags, 0

    def acceptance(self, standard_errors: float = 0.0) -> float:
        """a plus that many standard errors sqrt(a (1 - a) / (n + 1)) (n drafts judged), <= 1."""
        n = self.accepted + self.rejected
        a = self.accepted / n
        return min(1.0, a + standard_errors * (a * (1 - a) / (n + 1)) ** 0.5)

    def target_seconds(self, T: int) -> float:
        """r(T) if measured, else r(T') for the nearest measured T' < T, where T' > 1 once any
        such is measured (else the smallest measured T' > 1): a lower bound."""
        if T not in self.stands_for:
            several = [t for t in self.r if t > 1]
            below = [t for t in several if t < T]
            nearest = T if T in self.r else max(below) if below else min(several, default=1)
            self.stands_for[T] = self.r[nearest]
        return self.stands_for[T].value

    def draft_seconds(self) -> float:
        """t_draft, else the last catch-up's time (an upper bound), else r(1) (0: never lags)."""
        if self.t_draft.n:
            return self.t_draft.value
        if self.catch_up_seconds is not None:
            return self.catch_up_seconds
        return self.target_seconds(1) if self.lags else 0.0

    def catch_up_estimate(self, lag: int) -> float:
        """A catch-up's seconds over `lag` plain tokens: the last one's, or past the longest lag
        seen, on the line through the shortest and the longest."""
        short, long = min(self.catch_ups), max(self.catch_ups)
        if lag <= long or short == long:
            return self.catch_up_seconds
        slope = max(0.0, (self.catch_ups[long] - self.catch_ups[short]) / (long - short))
        return self.catch_ups[long] + slope * (lag - long)

    def cost(self, K: int) -> float:
        """Expected seconds of a round with K drafts: K draft steps, a forward over K + 1."""
        if self.known_costs is None:
            t_draft = self.draft_seconds()
            self.known_costs = [k * t_draft + self.target_seconds(k + 1)
                                for k in range(self.K_max + 1)]
        return self.known_costs[K]

    def rates(self, a: float) -> list:
        """Expected tokens per second of K = 0..K_max drafts, each passing with probability a."""
        if a not in self.known_rates:
            self.known_rates[a] = [expected_tokens(K, a) / self.cost(K)
                                   for K in range(self.K_max + 1)]
        return self.known_rates[a]

    def pays(self, a: float) -> bool:
        """Would some K >= 1 beat plain steps if drafts passed with probability a?"""
        return max(self.rates(a)[1:]) > self.rates(a)[0]

    def best_K(self) -> int:
        """The K >= 1 with the most expected tokens per second at the estimated a."""
        return max(range(1, self.K_max + 1), key=self.rates(self.acceptance()).__getitem__)

    def next_K(self) -> int:
        first_ask = self.caught_up is None
        self.began = self.clock() if first_ask else self.began
        if 1 not in self.r:
            return 0  # a plain step first: it measures r(1), which everything is compared with
        best = self.best_K() if self.pays(self.acceptance(1)) else 0
        if first_ask:  # (asked again after a look back, the look back has decided)
            self.probing = best == 0 and self.wants_probe()
            if self.probing:
                best = self.best_K()
        if best and not self.t_draft.n:
            best = (self.K_max + 1) // 2  # the first drafting round: a good draft shows itself
        if best:
            best = min(best, self.affordable())
        if first_ask:
            self.probing = self.probing and best > 0  # a probe the guard forbids is not made
        return best

    def wants_probe(self) -> bool:
        """Due: plain steps took the last probe's loss / explore, and paid for the catch-up's
        growth since. In doubt: the plain tokens since the last look back outnumber doubt x the
        drafts judged, and at a + 2 standard errors drafting could pay."""
        growth = (self.catch_up_estimate(self.unjudged) - self.catch_up_seconds
                  if self.catch_ups else 0.0)
        due = self.explore > 0 and self.idle * self.explore >= self.probe_loss + growth
        return due or (self.unjudged >= self.doubt * (self.accepted + self.rejected)
                       and self.pays(self.acceptance(2)))

    def worst_loss(self, K: int) -> float:
        """What a round with K drafts loses against a plain step if every draft is rejected,
        with the catch-up it has yet to make."""
        catch_up = 0.0
        if self.lags and self.unjudged:  # plain tokens the draft has yet to catch up on
            if self.catch_up_seconds is None and not self.t_draft.n:
                return self.target_seconds(1)  # the draft's speed is unknown until it catches up
            catch_up = (self.catch_up_estimate(self.unjudged) if self.catch_ups
                        else self.draft_seconds())
        return catch_up + self.cost(K) - self.target_seconds(1)

    def affordable(self) -> int:
        """The largest K whose worst loss is within stake x what is left of the run's budget,
        after what it lost so far and the catch-up this round made."""
        if self.n_new is None:
            return self.K_max  # no run begun: no guard
        allowed = self.guard * self.n_new * self.target_seconds(1)
        left = allowed - self.lost - (self.caught_up or 0.0)
        return max([0] + [K for K in range(1, self.K_max + 1)
                          if self.worst_loss(K) <= self.stake * left])

    def look_back(self, acceptance, seconds: float) -> None:
        """The draft caught up in `seconds`; `acceptance` holds, for each plain token it missed,
        the chance that a draft there would have been accepted: each counts as a judged draft."""
        passed = float(sum(acceptance))
        self.accepted += passed
        self.rejected += len(acceptance) - passed
        self.catch_ups[max(1, len(acceptance))] = self.catch_up_seconds = seconds
        self.unjudged, self.caught_up = 0, seconds
        self.known_costs, self.known_rates = None, {}

    def update(self, K: int, accepted: int, draft_seconds: float, target_seconds: float) -> None:
        """The round proposed K drafts and kept `accepted`; its forwards took these seconds."""
        entered, caught_up = self.clock(), self.caught_up or 0.0
        if K + 1 not in self.r:  # a new T may stand for others
            self.r[K + 1], self.stands_for = RunningMean(self.decay), {}
        self.r[K + 1].add(target_seconds)
        self.known_costs, self.known_rates = None, {}
        # Drafting, its catch-up included, is charged what it took beyond plain steps.
        self.lost += caught_up
        if K == 0:
            self.idle += target_seconds
            self.unjudged += 1
            if self.probing:  # the probe's look back said no: it lost the catch-up
                self.idle, self.probe_loss, self.probing = 0.0, caught_up, False
        else:
            plain = (accepted + 1) * self.target_seconds(1)  # plain steps for the same tokens
            self.lost += draft_seconds + target_seconds - plain
            # m of K drafts kept: m acceptances, one rejection if m < K (the rest unjudged)
            self.accepted = self.decay * self.accepted + accepted
            self.rejected = self.decay * self.rejected + (accepted < K)
            self.t_draft.add(draft_seconds / K)
            self.idle = 0.0
            if self.probing:  # after a probe whose drafts all passed, another at once
                loss = caught_up + draft_seconds + target_seconds - plain
                self.probe_loss = 0.0 if accepted == K and self.pays(1.0) else max(0.0, loss)
        if self.began is not None:  # host time outside the forwards, which plain steps save
            forwards = draft_seconds + target_seconds + caught_up
            self.lost += max(0.0, entered - self.began - forwards) + self.clock() - entered
        self.began = self.caught_up = None


def probability_of(logits: np.ndarray, tokens, warp: Warp) -> np.ndarray:
    """probabilities(row, warp)[token] per row and token (greedy: argmax). [n, V], [n] -> [n]"""
    tokens = np.asarray(tokens, dtype=np.int64)
    if warp.greedy:
        return (np.argmax(logits, axis=-1) == tokens).astype(np.float64)
    return probabilities(logits, warp)[np.arange(len(tokens)), tokens]


class LookBackDrafter(ModelDrafter):
    """A ModelDrafter that plain steps leave behind, and that looks back as it catches up."""

    def catch_up(self, tokens: List[int], plain: dict, warp: Warp) -> List[float]:
        """Feed all the cache lacks but the newest token in one forward; for each token plain
        steps chose, plain = {index: p(token)}, return min(1, q(token) / p(token)): over token ~ p
        its mean, sum_x min(p(x), q(x)), is the chance that a draft there would have passed."""
        missed = tokens[self.cache.length : -1]
        first = min(plain)  # the plain tokens are the newest: the last rows predict them all
        logits = to_numpy(self.forward(missed, self.cache, n_logits=len(tokens) - first))  # [n, V]
        q = probability_of(logits[[i - first for i in plain]], [tokens[i] for i in plain], warp)
        return [min(1.0, q_i / p) for p, q_i in zip(plain.values(), q)]


def adaptive_speculative_sample(target, draft, prompt: List[int], n_new: int, policy: AdaptiveK,
                                warp: Warp = Warp(), rng: np.random.Generator = None,
                                on_tokens: Callable = None):
    """speculative_sample with each round's K chosen by `policy` (an AdaptiveK); K = 0 is a
    plain target step. draft: a model (drafting through a LookBackDrafter), or a Drafter (e.g.
    an NGramDrafter, which never lags). Arguments and result otherwise as speculative_sample's;
    the stats' seconds are read with the policy's clock, draft_seconds with the wall clock."""
    if not isinstance(policy, AdaptiveK):
        raise GPT2Error(f"policy must be an AdaptiveK (adaptive.py), got {policy!r}")
    clock, rng = policy.clock, rng if rng is not None else np.random.default_rng()
    drafter = draft if isinstance(draft, Drafter) else LookBackDrafter(draft)
    tokens, n_stop, cache, stats = speculative_setup(target, drafter, prompt, n_new)
    with stats.timing("prefill_seconds", clock):
        prefill(target, cache, tokens)
        drafter.start(tokens, n_stop - 1)
    lags = isinstance(drafter, LookBackDrafter)
    timed_target = Timed(target, clock)  # each round's forwards, as the policy's clock reads them
    timed_draft = SimpleNamespace(propose=Timed(drafter.propose, clock), rollback=drafter.rollback)
    plain = {}  # index -> p(token), for the tokens of plain steps the draft has not seen
    policy.begin(n_stop - len(tokens), lags)
    start = clock()
    while len(tokens) < n_stop:
        # 1. K from the policy; a lagging draft catches up first, and the policy may reconsider.
        most = n_stop - len(tokens) - 1  # a round emits K + 1 tokens at most
        K = min(policy.next_K(), most)
        if K and plain:
            looked = clock()
            policy.look_back(drafter.catch_up(tokens, plain, warp), clock() - looked)
            plain.clear()
            K = min(policy.next_K(), most)
        # 2. The chain's round, or a plain step: the target samples from p, as autoregressive.
        timed_draft.propose.seconds = timed_target.seconds = 0.0
        if K:
            K, accepted = speculative_round(tokens, K, timed_draft, timed_target, cache, warp, rng)
        else:
            logits = to_numpy(timed_target(tokens[cache.length :], cache))  # [1, V]: the newest
            p = probabilities(logits[-1], warp)  # [V]
            tokens.append(sample(p, rng))
            accepted = 0
            if lags:
                plain[len(tokens) - 1] = float(p[tokens[-1]])
        # 3. The policy hears the round.
        policy.update(K, accepted, timed_draft.propose.seconds, timed_target.seconds)
        stats.target_seconds += timed_target.seconds
        stats.add_round(K, accepted)
        if on_tokens:
            on_tokens(tokens[-(accepted + 1) :], kinds(K, accepted))
    stats.decode_seconds, stats.target_calls = clock() - start, stats.rounds
    stats.draft_seconds, stats.draft_calls = drafter.seconds, drafter.calls
    stats.n_generated = len(tokens) - stats.n_prompt
    return tokens[stats.n_prompt :], stats
