"""Adaptive K: the policy's decisions under injected timings, and adaptive_speculative_sample
driven by it (still exact: greedy tokens equal autoregressive ones, caches stay consistent)."""
import math

import numpy as np
import pytest

import gpt2_numpy as gpt2
from gpt2_numpy import AdaptiveK, Warp, adaptive_speculative_sample, autoregressive_sample
from gpt2_numpy.adaptive import LookBackDrafter, expected_tokens
from gpt2_numpy.sampling import probabilities
from test_decoding import PROMPT, Recording

# Per-round costs in seconds, r(T) for a target forward over T positions and one draft step.
# On a CPU a forward over 2+ positions costs about 2.5x one over a single position (a matrix-
# matrix product instead of a matrix-vector one); on a GPU r(T) is nearly flat for small T.
CPU = dict(r=lambda T: 0.1 if T == 1 else 0.24 + 0.005 * T, t_draft=0.04)
GPU = dict(r=lambda T: 0.010 + 0.0002 * T, t_draft=0.003)


def play(policy, costs, acceptance, n_rounds, seed=0):
    """Run the policy against simulated rounds: each draft passes with probability
    `acceptance`, times come from `costs`. Returns the K of every round."""
    rng = np.random.default_rng(seed)
    Ks = []
    for _ in range(n_rounds):
        K = policy.next_K()
        m = 0
        while m < K and rng.random() < acceptance:
            m += 1
        policy.update(K, m, K * costs["t_draft"], costs["r"](K + 1))
        Ks.append(K)
    return Ks


def probe_seconds(Ks, costs):
    """Time spent in rounds with drafts, and in all rounds."""
    seconds = [K * costs["t_draft"] + costs["r"](K + 1) for K in Ks]
    return sum(s for K, s in zip(Ks, seconds) if K), sum(seconds)


def test_expected_tokens_is_the_geometric_sum():
    assert expected_tokens(4, 0.0) == 1
    assert expected_tokens(4, 1.0) == 5
    assert expected_tokens(2, 0.5) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens(0, 0.9) == pytest.approx(1)


@pytest.mark.parametrize("K_max, first_probe", [(1, 1), (4, 2), (8, 4), (9, 5)])
def test_first_a_plain_step_then_a_probe_of_half_K_max(K_max, first_probe):
    policy = AdaptiveK(K_max)
    assert policy.next_K() == 0  # nothing measured yet: a plain step measures r(1)
    policy.update(0, 0, 0.0, 0.1)
    assert policy.next_K() == first_probe and policy.probing


def test_acceptance_counts_only_the_drafts_the_target_judged():
    policy = AdaptiveK(8, decay=1.0, prior=0.25)
    policy.update(0, 0, 0.0, 0.1)
    policy.next_K()
    policy.update(4, 2, 0.1, 0.3)  # drafts 1, 2 accepted, 3 rejected, 4 never looked at
    est = policy
    assert est.accepted == pytest.approx(2.25) and est.rejected == pytest.approx(1.25)
    policy.update(3, 3, 0.1, 0.3)  # all accepted: no rejection
    assert est.accepted == pytest.approx(5.25) and est.rejected == pytest.approx(1.25)


@pytest.mark.parametrize("K_max", [1, 3, 8])
@pytest.mark.parametrize("seed", range(4))
def test_K_never_leaves_0_to_K_max(K_max, seed):
    rng = np.random.default_rng(seed)
    policy = AdaptiveK(K_max)
    for _ in range(300):  # erratic timings and acceptance
        K = policy.next_K()
        assert 0 <= K <= K_max and isinstance(K, int)
        m = int(rng.integers(0, K + 1))
        policy.update(K, m, K * rng.exponential(0.05), rng.exponential(0.1) + 1e-6)


def test_the_choice_is_the_argmax_of_expected_tokens_per_second():
    policy = AdaptiveK(8, explore=0)
    for K in range(9):  # measure every T = K + 1
        policy.update(K, K // 2, K * CPU["t_draft"], CPU["r"](K + 1))
    chosen = []
    for accepted in (0, 0, 2, 4, 6) + (8,) * 10:  # drafts get better and better
        def rate(K, a):
            return expected_tokens(K, a) / (K * CPU["t_draft"] + CPU["r"](K + 1))
        # draft at all if an optimistic a says so; then the K that is best for a itself
        draft = np.argmax([rate(K, policy.acceptance(1)) for K in range(9)]) > 0
        a = policy.acceptance()
        expected = 1 + int(np.argmax([rate(K, a) for K in range(1, 9)])) if draft else 0
        chosen.append(policy.next_K())
        assert chosen[-1] == expected, policy.acceptance()
        policy.update(8, accepted, 8 * CPU["t_draft"], CPU["r"](9))
    assert chosen[0] == 0 and chosen[-1] == 8


def test_an_expensive_verify_and_a_useless_draft_fall_back_to_plain_steps():
    policy = AdaptiveK(8)
    Ks = play(policy, CPU, acceptance=0.0, n_rounds=2000)
    assert Ks[0] == 0 and Ks[1] >= 1  # the first probe
    assert sum(K > 0 for K in Ks) >= 3  # probes now and then keep the estimate current...
    spent, total = probe_seconds(Ks, CPU)
    assert spent / total < 0.03  # ...at a small price: about `explore` of the time
    assert policy.acceptance() < 0.1


def test_a_draft_that_pays_is_used_at_once():
    for costs, acceptance, expected in ((GPU, 1.0, [8]), (CPU, 1.0, [8]), (GPU, 0.8, range(1, 6))):
        Ks = play(AdaptiveK(8), costs, acceptance, n_rounds=60)
        assert Ks[0] == 0 and all(K in expected for K in Ks[5:]), (costs, acceptance, Ks)


def test_on_a_cpu_a_mediocre_draft_does_not_pay():
    # a = 0.7: K = 8 emits 3.2 tokens for 0.32 + 0.285 s; three plain steps take 0.3 s
    Ks = play(AdaptiveK(8), CPU, acceptance=0.7, n_rounds=500)
    assert Ks[100:].count(0) > 0.95 * len(Ks[100:])


def test_probes_wait_for_the_time_their_loss_is_worth():
    policy = AdaptiveK(4, explore=0.05)
    Ks = play(policy, CPU, acceptance=0.0, n_rounds=400)
    probes = [i for i, K in enumerate(Ks) if K][1:]  # the first probe comes at once
    # a failed K=1 probe loses 0.04 + 0.25 - 0.1 s; 0.19 / 0.05 = 3.8 s of plain steps follow
    # (the first probe, K=2, loses more)
    assert probes and all(b - a >= 38 for a, b in zip(probes, probes[1:]))
    assert play(AdaptiveK(4, explore=0), CPU, 0.0, 200)[1:] == [0] * 199  # explore = 0: never


class Stubbed(AdaptiveK):
    """AdaptiveK that sees made-up costs instead of the measured ones."""

    def __init__(self, K_max, costs, **kw):
        super().__init__(K_max, **kw)
        self.costs = costs

    def update(self, K, accepted, draft_seconds, target_seconds):
        super().update(K, accepted, K * self.costs["t_draft"], self.costs["r"](K + 1))


@pytest.mark.parametrize("agreement", ["always", "often", "rarely"])
@pytest.mark.parametrize("costs", [CPU, GPU, None], ids=["cpu", "gpu", "measured"])
def test_greedy_adaptive_equals_greedy_autoregressive(target, drafts, agreement, costs):
    n = 40
    policy = AdaptiveK(6) if costs is None else Stubbed(6, costs)
    ar, _ = autoregressive_sample(target, PROMPT, n)
    sp, stats = adaptive_speculative_sample(target, drafts[agreement], PROMPT, n, policy)
    assert sp == ar and stats.n_generated == n
    assert all(0 <= K <= 6 for K in stats.K_per_round) and stats.K_per_round[0] == 0
    assert sum(stats.accepted_per_round) + stats.rounds == n
    if costs is GPU and agreement == "always":
        assert stats.K_per_round.count(6) >= 4  # speculation pays: it is used
    if costs is CPU and agreement == "rarely":
        assert stats.K_per_round.count(0) >= stats.rounds - 2  # it does not: plain steps


def test_plain_rounds_draw_exactly_what_autoregressive_sampling_draws(target, drafts):
    """Only plain steps (a useless draft, probes off): the same seed gives the same sample."""
    warp = Warp(1.0, top_k=20)
    ar, _ = autoregressive_sample(target, PROMPT, 30, warp, np.random.default_rng(5))
    policy = Stubbed(4, CPU, explore=0)
    sp, stats = adaptive_speculative_sample(target, drafts["rarely"], PROMPT, 30, policy, warp,
                                            np.random.default_rng(5))
    assert sp == ar and set(stats.K_per_round) == {0} and stats.draft_calls == 0


class Scripted(AdaptiveK):
    """A policy that plays a fixed list of K (then repeats it)."""

    def __init__(self, Ks):
        super().__init__(max(max(Ks), 1))
        self.Ks, self.i = Ks, 0

    def next_K(self):
        self.i += 1
        return self.Ks[(self.i - 1) % len(self.Ks)]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_caches_stay_the_committed_prefix_when_plain_rounds_let_the_draft_lag(target, drafts,
                                                                                temperature):
    t, d = Recording(target), Recording(drafts["often"])
    committed, lags = list(PROMPT), []

    def after_round(ids, kinds):
        committed.extend(ids)
        assert len(committed) - t.cache.length == 1  # the target never lags more than one
        lags.append(len(committed) - d.cache.length)  # the draft may lag behind plain rounds
        for model in (t, d):
            n = model.cache.length
            assert model.fed[:n] == committed[:n]
            fresh = model.model.new_cache(n)
            model.model(committed[:n], fresh, n_logits=0)
            np.testing.assert_allclose(model.cache.k[:, :, :n], fresh.k, atol=1e-4, rtol=0)
            np.testing.assert_allclose(model.cache.v[:, :, :n], fresh.v, atol=1e-4, rtol=0)

    adaptive_speculative_sample(t, d, PROMPT, 40, Scripted([0, 0, 0, 3, 0, 5, 0, 0, 0, 0, 2, 4]),
                                warp=Warp(temperature), rng=np.random.default_rng(0),
                                on_tokens=after_round)
    assert max(lags) >= 4 and min(lags) >= 1  # the draft caught up after lagging


def test_bad_K_max():
    with pytest.raises(gpt2.GPT2Error, match="K_max"):
        AdaptiveK(0)


def test_a_step_in_the_verify_cost_is_found():
    # OpenBLAS with padding: 2..8 positions cost the same, 9 cost more. With every draft right
    # the best K is 7 (8 tokens for 7 draft steps + r(8)), not K_max = 8 (9 tokens, dearer r(9)).
    steps = dict(r=lambda T: 0.1 if T == 1 else 0.19 if T <= 8 else 0.24, t_draft=0.035)
    rate = [expected_tokens(K, 1.0) / (K * steps["t_draft"] + steps["r"](K + 1)) for K in range(9)]
    assert int(np.argmax(rate)) == 7
    Ks = play(AdaptiveK(8), steps, acceptance=1.0, n_rounds=40)
    assert Ks[:5] == [0, 4, 8, 7, 7] and Ks[5:] == [7] * 35, Ks  # no detour through small K


def test_unmeasured_costs_are_the_nearest_measured_below():
    policy = AdaptiveK(8, explore=0)
    for K, seconds in ((0, 0.1), (2, 0.2), (6, 0.3)):  # T = 1, 3, 7
        policy.update(K, 0, 0.01 * K, seconds)
    assert [round(policy.target_seconds(T), 3) for T in range(1, 10)] == \
        [0.1, 0.2, 0.2, 0.2, 0.2, 0.2, 0.3, 0.3, 0.3]  # T = 2: from T = 3, not from one row
    only_one_row = AdaptiveK(8, explore=0)
    only_one_row.update(0, 0, 0.0, 0.1)
    assert only_one_row.target_seconds(5) == 0.1


def test_optimism_shrinks_as_drafts_are_judged():
    policy = AdaptiveK(8, explore=0, decay=1.0)
    policy.update(0, 0, 0.0, 0.1)
    doubts = []
    for _ in range(20):
        policy.update(4, 3, 0.1, 0.2)
        doubts.append(policy.acceptance(1) - policy.acceptance())
    assert all(b < a for a, b in zip(doubts, doubts[1:])) and doubts[-1] < 0.05
    before = (policy.acceptance(), policy.acceptance(1))
    for _ in range(50):
        policy.update(0, 0, 0.0, 0.1)
    est = policy
    assert (est.acceptance(), est.acceptance(1)) == before  # plain rounds learn nothing


def play_looking_back(policy, costs, acceptance, n_rounds, seed=0, catch_up=0.05):
    """`play`, with the draft catching up after plain rounds as adaptive_speculative_sample
    does: each token a plain round committed is looked back on (it would have passed with
    probability `acceptance`), the catch-up takes `catch_up` seconds, then the policy is asked
    again.
    Returns the K of every round and the number of look backs."""
    rng = np.random.default_rng(seed)
    Ks, missed, looks = [], 0, 0
    for _ in range(n_rounds):
        K = policy.next_K()
        if K and missed:
            policy.look_back((rng.random(missed) < acceptance).astype(float).tolist(), catch_up)
            K, missed, looks = policy.next_K(), 0, looks + 1
        m = 0
        while m < K and rng.random() < acceptance:
            m += 1
        policy.update(K, m, K * costs["t_draft"], costs["r"](K + 1))
        missed += K == 0
        Ks.append(K)
    return Ks, looks


def test_a_look_back_counts_every_missed_token_as_a_judged_draft():
    policy = AdaptiveK(8, decay=1.0, prior=0.25)
    policy.look_back([1.0, 0.0, 1.0, 0.5], 0.05)
    est = policy
    assert est.accepted == pytest.approx(2.75) and est.rejected == pytest.approx(1.75)
    assert est.draft_seconds() == 0.05  # no draft step timed yet: the catch-up bounds it


def test_a_probe_whose_look_back_says_no_costs_only_the_catch_up():
    policy = AdaptiveK(8)
    policy.update(0, 0, 0.0, 0.1)  # round 1, plain: r(1) = 0.1 s
    assert policy.next_K() == 4 and policy.probing  # the first probe...
    policy.update(4, 0, 0.16, 0.265)  # ...meets a useless draft: it lost 0.16 + 0.265 - 0.1 s
    waited = 0
    while policy.next_K() == 0:
        policy.update(0, 0, 0.0, 0.1)
        waited += 1
    assert waited == pytest.approx(0.325 / 0.01 / 0.1, abs=1) and policy.probing
    policy.look_back([0.0] * waited, 0.03)  # none of the missed tokens would have passed
    assert policy.next_K() == 0  # asked again: the look back cancels the drafts
    policy.update(0, 0, 0.0, 0.1)
    assert not policy.probing and policy.probe_loss == 0.03 and policy.idle == 0
    waited = 0
    while policy.next_K() == 0:  # the next probe waits until plain steps took 0.03 / explore
        policy.update(0, 0, 0.0, 0.1)
        waited += 1
    assert waited == pytest.approx(0.03 / 0.01 / 0.1, abs=1)


def test_a_bad_start_is_undone_by_the_next_look_back():
    """A good draft (a = 0.95) whose first probes happen to fail: the estimate drops and plain
    steps follow; the next probe's look back judges every token they committed and drafting
    resumes. Without it, the few judged drafts of a probe would keep the estimate low."""
    policy = Stubbed(8, CPU)
    policy.update(0, 0, 0.0, 0.1)
    for K in (policy.next_K(), policy.next_K()):  # two probes, both rejected at once
        policy.update(K, 0, 0.0, 0.0)
    Ks, looks = play_looking_back(policy, CPU, acceptance=0.95, n_rounds=600)
    first = next(i for i, K in enumerate(Ks) if K)
    assert looks >= 1 and first < 400 and Ks[-50:].count(0) <= 2, Ks


def test_looking_back_on_a_useless_draft_costs_little():
    policy = Stubbed(8, CPU)
    Ks, looks = play_looking_back(policy, CPU, acceptance=0.0, n_rounds=2000)
    assert looks >= 3  # the draft is checked now and then...
    spent, total = probe_seconds(Ks, CPU)
    assert (spent + 0.05 * looks) / total < 0.03  # ...at about `explore` of the time
    assert policy.acceptance() < 0.05  # every plain token judged: a is known to be ~0


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_catch_up_looks_back_with_min_1_q_over_p(target, drafts, temperature):
    """LookBackDrafter.catch_up feeds what the draft missed in one forward and returns, per token a
    plain round chose, min(1, q(token) / p(token)), q from the draft's own forward over the
    prefix; the draft == target gives 1 everywhere."""
    warp = Warp(temperature)
    tokens = PROMPT + [5, 17, 3, 29, 42]
    plain = {len(PROMPT) + 1: 0.5, len(PROMPT) + 3: 0.25, len(PROMPT) + 4: 1.0}
    drafter = LookBackDrafter(drafts["often"])
    drafter.start(PROMPT, 40)
    looked = drafter.catch_up(tokens, plain, warp)
    assert drafter.cache.length == len(tokens) - 1  # everything but the newest fed
    assert len(looked) == len(plain)
    for (i, p), score in zip(plain.items(), looked):
        q = probabilities(drafts["often"](tokens[:i], drafts["often"].new_cache(i))[-1], warp)
        assert score == pytest.approx(min(1.0, q[tokens[i]] / p), abs=1e-6)
    same = LookBackDrafter(target)
    same.start(PROMPT, 40)
    agreed = PROMPT + autoregressive_sample(target, PROMPT, 5)[0]  # the target's greedy choices
    scores = same.catch_up(agreed, {i: 1.0 for i in range(len(PROMPT) + 1, len(agreed))}, Warp(0.0))
    assert set(scores) == {1.0}


class Listening(Stubbed):
    """AdaptiveK (on made-up costs, so that what it decides does not depend on the machine's
    speed) that checks what adaptive_speculative_sample tells it: a look back covers exactly the
    plain rounds since the previous one."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.plain_rounds, self.heard = 0, []

    def look_back(self, acceptance, seconds):
        assert len(acceptance) == self.plain_rounds
        self.heard.append(len(acceptance))
        self.plain_rounds = 0
        super().look_back(acceptance, self.costs["t_draft"])  # a made-up catch-up cost too

    def update(self, K, *args):
        self.plain_rounds += K == 0
        super().update(K, *args)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_adaptive_sample_looks_back_on_every_plain_token_once(target, drafts, temperature):
    # Probes often: many look backs (no guard: it would soon stop drafting so useless a draft)
    policy = Listening(6, CPU, explore=1.0, guard=float("inf"))
    warp = Warp(temperature)
    ar, _ = autoregressive_sample(target, PROMPT, 40, warp, np.random.default_rng(3))
    sp, stats = adaptive_speculative_sample(target, drafts["rarely"], PROMPT, 40, policy, warp,
                                            np.random.default_rng(3))
    assert len(policy.heard) >= 3 and sum(policy.heard) > 10
    if temperature == 0:
        assert sp == ar


# The replay harness of `python -m bench replay` (bench/replay.py): the real decoders
# against stand-in models that cost virtual seconds. Round costs in it must add up exactly.
REPLAY_COSTS = dict(target={T: 0.05 if T == 1 else 0.1 + 0.001 * T for T in range(1, 6)},
                    draft={1: 0.02, 2: 0.03}, catch_up=([1, 2, 64], [0.02, 0.04, 0.1]),
                    per_row=0.001)


def test_replayed_autoregressive_costs_one_target_step_per_token():
    from bench.replay import replay

    rates = replay(REPLAY_COSTS, error=0.0, n=12, seed=0, K_max=4)
    assert rates["autoregressive"] == pytest.approx(1 / (0.05 + 0.001))


def test_the_replay_clock_adds_the_wall_time_but_the_stand_ins_own(monkeypatch):
    """--python_time: the replay's clock is the modelled forwards plus the wall clock, less the
    stand-in models' own wall time (a wall clock that ticks one second per reading here)."""
    import time

    from bench import replay as replay_module
    from bench.timing import VirtualClock

    ticks = iter(range(100, 200))
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(ticks)))
    virtual, wall = VirtualClock(), VirtualClock(python_time=True)  # wall starts at 100
    model = replay_module.CostModel(wall, lambda T, n_logits: 0.25, [1, 2, 3], n_prompt=2)
    model([5], model.new_cache(4))  # reads the wall clock at 101 and 102: 1 s excluded
    virtual.now += 0.25
    assert wall.now == 0.25 and wall.excluded == 1.0
    assert wall() == 0.25 + (103 - 100) - 1.0  # the modelled 0.25 s, plus 2 s of "Python"
    assert virtual() == 0.25  # without python_time, only the modelled cost


def test_replayed_rejections_cost_one_draft_step_and_one_verify_per_token():
    from bench.replay import replay

    # Every draft wrong: a K=1 round drafts once (feeding the one new token) and verifies 2
    # positions, and emits the one resampled token; the last token is a plain step (a round
    # never proposes more than are still wanted). Every replayed decoder still printed the
    # autoregressive tokens (replay asserts it).
    rates = replay(REPLAY_COSTS, error=1.0, n=12, seed=0, K_max=4)
    assert rates["K=1"] == pytest.approx(12 / (11 * (0.02 + 0.001 + 0.102 + 2 * 0.001) + 0.051))
    # All drafts right: a K=2 round emits 3 tokens for a 2-token draft step (x_K and the bonus
    # of the round before), one 1-token step, and a verify over 3 (the first round feeds 1).
    rates = replay(REPLAY_COSTS, error=0.0, n=3 * 5, seed=0, K_max=4)
    first, later = 0.02 + 0.02 + 0.103 + 0.005, 0.03 + 0.02 + 0.103 + 0.005
    assert rates["K=2"] == pytest.approx(15 / (first + 4 * later))


# Costs as `python -m bench replay` measured them on the 2-core Xeon (seconds): 355M
# target over T positions, 124M draft steps over 1 and 2, catch-ups over N, a row of logits.
XEON = dict(target={1: 0.055, **{T: 0.105 for T in range(2, 9)}, 9: 0.124},
            draft={1: 0.0196, 2: 0.0304},
            catch_up=([1, 2, 4, 8, 9, 16, 32, 64], [0.0197, 0.0417, 0.0415, 0.0415, 0.0472,
                                                   0.054, 0.0776, 0.1177]),
            per_row=0.00018)


def test_the_guard_keeps_every_prompt_within_5_percent_of_autoregressive():
    """Near this CPU's break-even (a draft 70% right) some prompts lose >5% to plain decoding
    when drafting is unguarded; with the guard (4% of the run's plain time) none does."""
    from bench.replay import replay

    def ratios(**kw):
        runs = [replay(XEON, error=0.3, n=96, seed=s, K_max=8,
                       adaptive=lambda K_max, clock: AdaptiveK(K_max, clock=clock, **kw))
                for s in range(12)]
        return [r["adaptive"] / r["autoregressive"] for r in runs]

    assert min(ratios(guard=float("inf"))) < 1 / 1.05  # what the guard is for
    assert min(ratios()) >= 1 / 1.05


def test_the_guard_bets_no_more_than_is_left():
    policy = Stubbed(8, CPU)  # r(1) = 0.1 s, r(T > 1) = 0.24 + 0.005 T, a draft step 0.04 s
    policy.begin(100, lags=False)  # budget: 0.04 x 100 plain steps of 0.1 s = 0.4 s
    policy.update(0, 0, 0.0, 0.0)
    policy.update(2, 2, 0.0, 0.0)  # 3 tokens for 0.08 + 0.255 s: 0.035 s more than plain steps
    assert policy.lost == pytest.approx(0.08 + 0.255 - 0.3)

    def largest_affordable():
        # Every draft rejected, a K-draft round loses 0.04 K + r(K + 1) - 0.1 s, where an
        # unmeasured r(K + 1) is taken as the nearest measured below: here r(3) = 0.255 s.
        left = 0.4 - policy.lost
        return max([0] + [K for K in range(1, 9) if 0.04 * K + 0.255 - 0.1 <= left])

    assert policy.affordable() == largest_affordable() == 5
    policy.update(3, 0, 0.0, 0.0)  # a failed round
    assert policy.affordable() == largest_affordable() < 5
    for _ in range(3):  # more failures, while it can afford them
        policy.update(policy.next_K(), 0, 0.0, 0.0)
    assert 0 < policy.lost <= 0.4 and policy.next_K() == 0  # spent: plain steps to the end
    policy.begin(100, lags=False)  # the next run has a budget of its own
    assert policy.lost == 0 and policy.affordable() == largest_affordable() > 0
    assert AdaptiveK(8).affordable() == 8  # no run begun: no guard


@pytest.mark.parametrize("stake, K", [(1.0, 7), (0.5, 1), (0.25, 0)])
def test_a_round_risks_at_most_the_stake_of_what_is_left(stake, K):
    policy = Stubbed(8, CPU, stake=stake)  # a draft step 0.04 s, r(T > 1) = 0.24 + 0.005 T
    policy.begin(175, lags=False)  # budget: 0.04 x 175 plain steps of 0.1 s = 0.7 s
    policy.update(0, 0, 0.0, 0.0)
    policy.update(2, 0, 0.0, 0.0)  # a failed round: 0.08 + 0.255 - 0.1 s lost
    left = 0.7 - policy.lost  # 0.465 s
    # Every draft rejected, a K-draft round loses 0.04 K + r(3) - 0.1 s (r(K + 1) unmeasured:
    # the nearest measured below, r(3)): K = 7 risks 0.435 s, K = 1 0.195 s.
    risk = lambda K: 0.04 * K + 0.255 - 0.1  # noqa: E731
    assert policy.affordable() == K
    assert risk(K + 1) > stake * left and (K == 0 or risk(K) <= stake * left)


@pytest.mark.parametrize("stake", [0.0, -0.5, 1.5])
def test_a_stake_outside_0_to_1_is_refused(stake):
    with pytest.raises(gpt2.GPT2Error, match="stake"):
        AdaptiveK(8, stake=stake)


def test_a_bad_start_is_looked_back_on_soon():
    """A good draft on this Xeon's costs whose first drafting round fails: plain steps follow,
    and once they number doubt x the drafts judged so far the policy looks back (at a + 2 SE
    drafting could still pay), instead of waiting loss / explore for the next probe."""
    xeon = dict(r=lambda T: 0.1 if T == 1 else 0.19, t_draft=0.036)

    def first_drafting_round(doubt):
        policy = Stubbed(8, xeon, doubt=doubt)
        policy.update(0, 0, 0.0, 0.0)
        policy.next_K()
        policy.look_back([1.0], 0.036)  # the catch-up: the one plain token would have passed
        policy.update(policy.next_K(), 0, 0.0, 0.0)  # the first drafting round: all rejected
        judged = policy.accepted + policy.rejected
        Ks, _ = play_looking_back(policy, xeon, acceptance=0.95, n_rounds=1000)
        return next(i for i, K in enumerate(Ks) if K), judged

    soon, judged = first_drafting_round(doubt=4.0)
    assert soon == math.ceil(4 * judged)
    assert first_drafting_round(doubt=float("inf"))[0] > 10 * soon  # the explore probe's wait


def test_a_catch_up_is_projected_to_the_current_lag():
    """Past the longest lag caught up so far, a catch-up is extrapolated along the line through
    the shortest and the longest; the guard's worst case uses that projection."""
    policy = AdaptiveK(8)
    policy.update(0, 0, 0.0, 0.003)  # r(1) = 3 ms
    policy.look_back([1.0], 0.002)  # a catch-up over 1 token: 2 ms
    policy.update(0, 0, 0.0, 0.003)
    assert policy.catch_up_estimate(40) == 0.002  # one lag seen: no slope yet
    policy.look_back([0.0] * 6, 0.004)  # over 6: 4 ms, i.e. 0.4 ms per token more
    assert policy.catch_up_estimate(3) == 0.004  # within what was seen: the last one
    assert policy.catch_up_estimate(26) == pytest.approx(0.004 + 20 * 0.0004)
    policy.update(0, 0, 0.0, 0.003)
    policy.begin(100)
    for _ in range(26):
        policy.update(0, 0, 0.0, 0.003)
    assert policy.worst_loss(1) == pytest.approx(policy.catch_up_estimate(26)
                                                 + policy.cost(1) - 0.003)


# Costs shaped like the H100's of docs/gpu.md (CUDA graphs; seconds): r(T) nearly flat, a draft
# step half a target step, catch-ups past 16 tokens in chunks of 16, and host work per judged
# row as for a sampling warp (a full distribution per row): on a GPU a look back over many
# plain tokens costs many plain steps.
H100_LIKE = dict(target={1: 0.003, **{T: 0.0037 + 0.00003 * T for T in range(2, 10)}},
                 draft={1: 0.0014, 2: 0.0018},
                 catch_up=([1, 2, 16, 32, 64], [0.0014, 0.0018, 0.0019, 0.0039, 0.0077]),
                 per_row=0.00018)


def test_the_guard_holds_where_long_catch_ups_are_dear():
    """With a useless draft the probes' look backs grow with the plain stretch before them;
    the guard, projecting each catch-up to its lag, keeps every prompt within 5%."""
    from bench.replay import replay

    for error in (0.5, 1.0):
        ratios = [replay(H100_LIKE, error=error, n=256, seed=s, K_max=8) for s in range(6)]
        assert min(r["adaptive"] / r["autoregressive"] for r in ratios) >= 1 / 1.05


def test_the_adaptive_benchmark_records_every_decoder_and_each_reproduces_the_target(tmp_path,
                                                                                      capsys):
    """python -m bench adaptive, shrunk (124M as both models, a few tokens): its JSON, which the
    figure in docs/adaptive.md is drawn from, holds autoregressive, every fixed K and adaptive
    for each situation, each run gave the target's greedy tokens, and no round left [0, K_max]."""
    import json

    from bench import adaptive as adaptive_bench

    adaptive_bench.main(["--target", "124M", "--draft", "124M", "--n_tokens", "6",
                         "--n_tokens_unrelated", "3", "--repeats", "1", "--K_max", "2",
                         "--stakes", "1", "0.5", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "adaptive.json").read_text())
    assert len(res["situations"]) == 4
    for situation in res["situations"]:
        rows = situation["rows"]
        assert [(r["K"], r["stake"]) for r in rows] == [
            (0, None), (1, None), (2, None), ("adaptive", 1.0), ("adaptive", 0.5)]
        assert all(len(r["runs"]) == r["repeats"] for r in rows)  # every run's own numbers
        for r in rows:
            assert r["same"] and r["tps"] > 0
            Ks = {int(K): int(n) for K, n in (pair.split(":") for pair in r["Ks"].split())}
            assert set(Ks) <= {0, 1, 2} and sum(Ks.values()) >= 1
    assert "| autoregressive | 6 | 1 |" in capsys.readouterr().out


class Clock:
    """A clock that stands still until told to advance."""

    def __init__(self):
        self.now = 10.0

    def __call__(self):
        return self.now


class Costly:
    """A model whose every forward advances `clock` by `seconds`."""

    def __init__(self, model, clock, seconds):
        self.model, self.clock, self.seconds = model, clock, seconds
        self.n_vocab, self.n_ctx = model.n_vocab, model.n_ctx

    def new_cache(self, capacity=None):
        return self.model.new_cache(capacity)

    def __call__(self, ids, cache, n_logits=1):
        self.clock.now += self.seconds
        return self.model(ids, cache, n_logits)


def test_the_policy_hears_each_rounds_forwards_and_is_charged_its_host_time(target, drafts):
    """The round's draft and target seconds are its forwards' (draft steps 0.05 s, a target
    forward 0.3 s). Host time between the round's first next_K and the end of its update
    (here 0.1 s in update, outside every forward) counts against the guard, in every round;
    what the caller does between rounds (on_tokens, 1 s here) does not."""

    def run(host_seconds):
        clock = Clock()

        class Listening(AdaptiveK):
            def update(self, K, accepted, draft_seconds, target_seconds):
                self.heard.append((K, draft_seconds, target_seconds))
                clock.now += host_seconds
                super().update(K, accepted, draft_seconds, target_seconds)

        def on_tokens(ids, kinds):
            clock.now += 1.0

        policy = Listening(4, guard=float("inf"), clock=clock)  # no guard: the same K either way
        policy.heard = []
        adaptive_speculative_sample(Costly(target, clock, 0.3),
                                    Costly(drafts["often"], clock, 0.05), PROMPT, 20, policy,
                                    on_tokens=on_tokens)
        return policy

    quick, slow = run(0.0), run(0.1)
    Ks = [K for K, _, _ in quick.heard]
    assert [K for K, _, _ in slow.heard] == Ks and set(Ks) > {0}
    for K, draft_seconds, target_seconds in quick.heard:
        assert draft_seconds == pytest.approx(0.05 * K) and target_seconds == pytest.approx(0.3)
    assert slow.lost - quick.lost == pytest.approx(0.1 * len(quick.heard))


def test_host_time_counts_against_the_guard():
    clock = Clock()
    policy = Stubbed(8, CPU, clock=clock)  # r(1) = 0.1 s: a budget of 0.04 x 100 x 0.1 = 0.4 s
    policy.begin(100, lags=False)
    policy.update(0, 0, 0.0, 0.0)
    policy.update(2, 2, 0.0, 0.0)  # 0.035 s lost; a K-draft round risks 0.155 + 0.04 K s
    assert policy.affordable() == 5

    def plain_round_with_host_time(seconds):
        K = policy.next_K()
        clock.now += 0.1 + seconds  # the plain step's forward (0.1 s), and the host's time
        policy.update(0, 0, 0.0, 0.0)  # (Stubbed: the forward took 0.1 s)
        return K

    plain_round_with_host_time(0.15)  # a slow host: 0.215 s left
    assert policy.lost == pytest.approx(0.185) and policy.affordable() == 1
    plain_round_with_host_time(0.1)
    assert plain_round_with_host_time(0.0) == 0  # nothing left to risk: plain steps to the end


def test_optimistic_acceptance_is_a_plus_its_standard_error():
    """Written out for given counts: four rounds that each accepted 1 of 4 drafts, after the prior
    of 0.25 each, leave 4.25 acceptances and 4.25 rejections: a = 0.5, n = 8.5, and a plus one
    standard error is a + sqrt(a (1 - a) / (n + 1)); the doubt adds two."""
    policy = AdaptiveK(8, decay=1.0, prior=0.25)
    policy.update(0, 0, 0.0, 0.1)
    for _ in range(4):
        policy.update(4, 1, 0.1, 0.2)
    standard_error = math.sqrt(0.5 * 0.5 / 9.5)  # 0.162
    assert policy.acceptance() == pytest.approx(0.5)
    assert policy.acceptance(1) == pytest.approx(0.5 + standard_error)
    assert policy.acceptance(2) == pytest.approx(0.5 + 2 * standard_error)


class PlainThenMany(AdaptiveK):
    """Plain rounds until `plain` tokens, then asks for `many` drafts, again after the look back."""

    def __init__(self, plain, many):
        super().__init__(many)
        self.plain, self.many, self.rounds, self.asked = plain, many, 0, []

    def next_K(self):
        K = 0 if self.rounds < self.plain else self.many
        self.asked.append(K)
        return K

    def update(self, K, *args):
        self.rounds += 1


class RoomyCaches:
    """A model whose caches have room for its whole context, whatever the decoder asks for: a
    round that proposes too many drafts shows as too many tokens, not as a full cache."""

    def __init__(self, model):
        self.model, self.n_vocab, self.n_ctx = model, model.n_vocab, model.n_ctx

    def new_cache(self, capacity=None):
        return self.model.new_cache(self.n_ctx)

    def __call__(self, ids, cache, n_logits=1):
        return self.model(ids, cache, n_logits)


@pytest.mark.parametrize("n_new", [10, 11, 12])
def test_a_look_back_near_the_end_drafts_no_more_than_remain(target, drafts, n_new):
    """After 8 plain rounds the policy asks for 6 drafts, before and after the look back; with
    2 to 4 tokens left, every round's K is capped to what remains, and exactly n_new tokens
    come out."""
    policy = PlainThenMany(8, 6)
    committed = []

    def after_round(ids, kinds):
        committed.extend(ids)

    ids, stats = adaptive_speculative_sample(RoomyCaches(target), RoomyCaches(drafts["always"]),
                                             PROMPT, n_new, policy, on_tokens=after_round)
    assert policy.asked.count(6) >= 2  # asked again after the look back
    assert len(ids) == stats.n_generated == len(committed) == n_new
    assert ids == autoregressive_sample(target, PROMPT, n_new)[0]
    done = 0
    for K, accepted in zip(stats.K_per_round, stats.accepted_per_round):
        assert K <= n_new - done - 1  # K + 1 tokens at most: no more than remain
        done += accepted + 1


def test_a_look_back_is_charged_to_the_guard():
    """A catch-up of s seconds adds s to what drafting has lost, whether the round after it
    drafts or stays plain."""
    policy = Stubbed(8, CPU)  # r(1) = 0.1 s
    policy.begin(100)
    policy.update(0, 0, 0.0, 0.0)
    before = policy.lost
    policy.look_back([0.0, 0.0], 0.07)
    policy.update(0, 0, 0.0, 0.0)  # the look back said no: a plain round, the catch-up lost
    assert policy.lost == pytest.approx(before + 0.07)
    policy.look_back([1.0], 0.03)
    policy.update(2, 2, 0.0, 0.0)  # drafted: 3 tokens for 2 x 0.04 + r(3), and the catch-up
    assert policy.lost == pytest.approx(before + 0.07 + 0.03 + 0.08 + 0.255 - 0.3)


class Hearing(Scripted):
    """Scripted, keeping every acceptance a look back reports."""

    def __init__(self, Ks):
        super().__init__(Ks)
        self.heard = []

    def look_back(self, acceptance, seconds):
        self.heard += acceptance
        super().look_back(acceptance, seconds)


def test_with_the_target_as_its_own_draft_every_look_back_passes(target):
    """Sampling at temperature 1, the target drafting for itself: at every token a plain round
    chose, q = p, so min(1, q / p) = 1 (up to float32 rounding between a one-token and a
    many-token forward). The decoder must pass the catch-up p at the very token chosen."""
    policy = Hearing([0, 0, 0, 2])
    ids, stats = adaptive_speculative_sample(target, target, PROMPT, 30, policy, Warp(1.0),
                                             np.random.default_rng(1))
    assert len(policy.heard) >= 10 and stats.n_generated == 30
    assert policy.heard == [pytest.approx(1.0, abs=1e-3)] * len(policy.heard)


def scripted_run(n_new, draft_wrong_after):
    """adaptive_speculative_sample against stand-ins on a virtual clock whose costs the policy
    can know exactly: a target forward over any number of positions takes 1 s, a draft step and
    a catch-up over any lag 0.6 s. The draft is right for the first `draft_wrong_after` tokens
    and wrong after them. Returns (the K of every round, the run's seconds)."""
    from bench.replay import CostModel
    from bench.timing import VirtualClock

    clock, n_prompt = VirtualClock(), 5
    rng = np.random.default_rng(0)
    script, prompt = rng.integers(0, 64, n_new + 1), rng.integers(0, 64, n_prompt).tolist()
    wrong = np.arange(n_new + 1) >= draft_wrong_after
    target = CostModel(clock, lambda T, n_logits: 1.0 if n_logits else 0.0, script, n_prompt)
    draft = CostModel(clock, lambda T, n_logits: 0.6 if n_logits else 0.0, script, n_prompt, wrong)
    start = clock()
    ids, stats = adaptive_speculative_sample(target, draft, prompt, n_new,
                                             AdaptiveK(8, clock=clock), Warp(0.0))
    assert ids == script[:n_new].tolist()
    return stats.K_per_round, clock() - start


def test_the_guard_counts_a_catch_up_before_the_drafts_it_allows():
    """27 tokens may lose 4% of 27 plain steps: 1.08 s. The first probe's catch-up (0.6 s) says
    the draft would have been right, so drafting may pay; but after that catch-up a round
    with one draft risks 0.6 s more, which would overshoot the budget. Drafts are then wrong,
    and the run must stay within 4% of plain decoding."""
    Ks, seconds = scripted_run(n_new=27, draft_wrong_after=1)
    assert seconds <= 1.04 * 27 * 1.0, Ks


def test_a_catch_up_just_paid_is_not_charged_again():
    """40 tokens may lose 1.6 s. After the first probe's catch-up (0.6 s), which says the draft is
    right, a round with one draft risks 0.6 s: within what is left (1 s), so the draft, right
    every time, drafts from that round on, and the run beats plain decoding."""
    Ks, seconds = scripted_run(n_new=40, draft_wrong_after=40)
    assert Ks[:2] == [0, 1] and seconds < 40 * 1.0, Ks


def test_a_policy_is_an_AdaptiveK(target, drafts):
    with pytest.raises(gpt2.GPT2Error, match="AdaptiveK"):
        adaptive_speculative_sample(target, drafts["often"], PROMPT, 5, 4)  # K where a policy goes
