"""Adaptive K: the policy's decisions under injected timings, and speculative_sample driven by it
(still exact: greedy tokens equal autoregressive ones, caches stay consistent)."""
import numpy as np
import pytest

import gpt2_numpy as gpt2
from gpt2_numpy import AdaptiveK, Warp, autoregressive_sample, speculative_sample
from gpt2_numpy.adaptive import expected_tokens
from conftest import perturbed, tiny_model
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
    policy = AdaptiveK(8, decay=1.0, prior=0.25, forget=1.0)
    policy.update(0, 0, 0.0, 0.1)
    policy.next_K()
    policy.update(4, 2, 0.1, 0.3)  # drafts 1, 2 accepted, 3 rejected, 4 never looked at
    assert policy.accepted == pytest.approx(2.25) and policy.rejected == pytest.approx(1.25)
    policy.update(3, 3, 0.1, 0.3)  # all accepted: no rejection
    assert policy.accepted == pytest.approx(5.25) and policy.rejected == pytest.approx(1.25)


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
        draft = np.argmax([rate(K, policy.optimistic_acceptance) for K in range(9)]) > 0
        expected = 1 + int(np.argmax([rate(K, policy.acceptance) for K in range(1, 9)])) if draft else 0
        chosen.append(policy.next_K())
        assert chosen[-1] == expected, policy.acceptance
        policy.update(8, accepted, 8 * CPU["t_draft"], CPU["r"](9))
    assert chosen[0] == 0 and chosen[-1] == 8


def test_an_expensive_verify_and_a_useless_draft_fall_back_to_plain_steps():
    policy = AdaptiveK(8)
    Ks = play(policy, CPU, acceptance=0.0, n_rounds=2000)
    assert Ks[0] == 0 and Ks[1] >= 1  # the first probe
    assert sum(K > 0 for K in Ks) >= 3  # probes now and then keep the estimate current...
    spent, total = probe_seconds(Ks, CPU)
    assert spent / total < 0.03  # ...at a small price: about `explore` of the time
    assert policy.acceptance < 0.1


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


@pytest.fixture(scope="module")
def drafts(target):
    return {"always": perturbed(target, 0.0), "often": perturbed(target, 0.03),
            "rarely": tiny_model(seed=11)}


@pytest.mark.parametrize("agreement", ["always", "often", "rarely"])
@pytest.mark.parametrize("costs", [CPU, GPU, None], ids=["cpu", "gpu", "measured"])
def test_greedy_adaptive_equals_greedy_autoregressive(target, drafts, agreement, costs):
    n = 40
    policy = AdaptiveK(6) if costs is None else Stubbed(6, costs)
    ar, _ = autoregressive_sample(target, PROMPT, n)
    sp, stats = speculative_sample(target, drafts[agreement], PROMPT, n, K=policy)
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
    sp, stats = speculative_sample(target, drafts["rarely"], PROMPT, 30, policy, warp,
                                   np.random.default_rng(5))
    assert sp == ar and set(stats.K_per_round) == {0} and stats.draft_calls == 0


class Scripted:
    """A policy that plays a fixed list of K (then repeats it)."""

    def __init__(self, Ks):
        self.Ks, self.i = Ks, 0

    def next_K(self):
        self.i += 1
        return self.Ks[(self.i - 1) % len(self.Ks)]

    def update(self, *round):
        pass


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
            np.testing.assert_allclose(model.cache.k[:, :, :n], fresh.k, atol=1e-5)
            np.testing.assert_allclose(model.cache.v[:, :, :n], fresh.v, atol=1e-5)

    speculative_sample(t, d, PROMPT, 40, K=Scripted([0, 0, 0, 3, 0, 5, 0, 0, 0, 0, 2, 4]),
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


def test_optimism_shrinks_as_drafts_are_judged_and_grows_in_plain_rounds():
    policy = AdaptiveK(8, explore=0, decay=1.0)
    policy.update(0, 0, 0.0, 0.1)
    doubts = []
    for _ in range(20):
        policy.update(4, 3, 0.1, 0.2)
        doubts.append(policy.optimistic_acceptance - policy.acceptance)
    assert all(b < a for a, b in zip(doubts, doubts[1:])) and doubts[-1] < 0.05
    a = policy.acceptance
    for _ in range(50):
        policy.update(0, 0, 0.0, 0.1)
    assert policy.acceptance == pytest.approx(a)  # forgetting keeps the estimate...
    assert policy.optimistic_acceptance - a > 1.5 * doubts[-1]  # ...and regains the doubt
