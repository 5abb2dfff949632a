"""Autoregressive vs speculative sampling: identical greedy tokens, the target's exact
distribution when sampling, and cache bookkeeping after every round."""
import itertools
import math

import numpy as np
import pytest

import gpt2_numpy as gpt2
from gpt2_numpy import Warp, autoregressive_sample, probabilities, speculative_sample
from gpt2_numpy.decoding import ModelDrafter
from conftest import perturbed, tiny_model
from test_sampling import ScriptedRng, reference_probabilities

PROMPT = [3, 14, 15, 9, 26]
N_GREEDY = 23  # not a multiple of K + 1 for any K here: rounds end mid-way


def top2_gap(model, tokens, n):
    """Smallest gap between the two largest logits at the last n positions of tokens (where a
    float32 near-tie could flip between a 1-row and a (K+1)-row product)."""
    logits = model(tokens[:-1], model.new_cache(len(tokens)), n_logits=n)
    top2 = np.sort(logits, axis=-1)[:, -2:]
    return float(np.min(top2[:, 1] - top2[:, 0]))


def test_the_greedy_target_path_is_diverse_and_has_no_near_ties(target):
    """A path that repeats one token lets a bonus from the wrong row, or a stale cache, print the
    right text; near-ties would let rounding flip tokens. This target has neither."""
    ar, _ = autoregressive_sample(target, PROMPT, N_GREEDY)
    assert len(set(ar)) >= 15
    assert top2_gap(target, PROMPT + ar, N_GREEDY) >= 1e-3


@pytest.mark.parametrize("agreement", ["always", "often", "rarely"])
@pytest.mark.parametrize("K", range(1, 9))
def test_greedy_speculative_equals_greedy_autoregressive(target, drafts, agreement, K):
    n = N_GREEDY  # a diverse path without near-ties (the test above): equal, token for token
    ar, ar_stats = autoregressive_sample(target, PROMPT, n)
    sp, sp_stats = speculative_sample(target, drafts[agreement], PROMPT, n, K=K)
    assert len(sp) == n == sp_stats.n_generated
    assert sp == ar
    # acceptance behaves as the agreement says it should
    if agreement == "always":
        assert sp_stats.acceptance_rate == 1.0
        assert sp_stats.rounds == math.ceil(n / (K + 1))
    elif agreement == "rarely":
        assert sp_stats.acceptance_rate < 0.5
    assert sum(sp_stats.accepted_per_round) + sp_stats.rounds == n
    assert sp_stats.target_calls == sp_stats.rounds


def test_generation_stops_cleanly_at_the_context_limit(target, drafts):
    prompt = PROMPT * 10  # 50 of 64 positions used
    room = target.n_ctx - len(prompt)
    ar, ar_stats = autoregressive_sample(target, prompt, 100)
    sp, sp_stats = speculative_sample(target, drafts["often"], prompt, 100, K=5)
    assert len(ar) == len(sp) == room
    assert ar_stats.stopped_at_context and sp_stats.stopped_at_context
    assert sp == ar or top2_gap(target, prompt + ar, room) < 1e-4
    exact, stats = speculative_sample(target, drafts["often"], prompt, room, K=5)
    assert len(exact) == room and not stats.stopped_at_context


def test_bad_requests_are_clear_errors(target, drafts):
    with pytest.raises(gpt2.GPT2Error, match="K"):
        speculative_sample(target, drafts["often"], PROMPT, 5, K=0)
    with pytest.raises(gpt2.GPT2Error, match="context"):
        autoregressive_sample(target, [1] * target.n_ctx, 5)
    with pytest.raises(gpt2.GPT2Error, match="at least one"):
        autoregressive_sample(target, [], 5)
    with pytest.raises(gpt2.GPT2Error, match="vocabularies"):
        speculative_sample(target, tiny_model(n_vocab=40), PROMPT, 5)


class ProposesOutsideItsQ(gpt2.Drafter):
    """A custom drafter with a bug: its q says "always token 0", but it proposes `token`."""

    def __init__(self, n_vocab, token):
        self.n_vocab, self.token = n_vocab, token

    def propose(self, tokens, K, warp, rng):
        q = np.zeros((K, self.n_vocab))
        q[:, 0] = 1.0
        return [self.token] * K, q


@pytest.mark.parametrize("warp", [Warp(0.0), Warp(1.0), Warp(0.9, top_k=3)], ids=str)
def test_a_drafter_proposing_outside_its_q_gets_an_error_naming_its_mistake(target, warp):
    """Whatever the target thinks of the token (the greedy target's own token included, where
    p/q would be 1/0 = inf and accept), the round stops with a GPT2Error that names the drafter's
    mistake; never a silent acceptance of a token its q gave no mass."""
    greedy, _ = autoregressive_sample(target, PROMPT, 1)
    for token in (greedy[0], (greedy[0] + 1) % target.n_vocab):
        if token == 0:
            continue
        with pytest.raises(gpt2.GPT2Error, match=f"the drafter proposed token {token} as draft 1 "
                                                 f"of 3 but its q gives it probability 0"):
            speculative_sample(target, ProposesOutsideItsQ(target.n_vocab, token), PROMPT, 10,
                               K=3, warp=warp, rng=np.random.default_rng(0))


class Recording:
    """Wraps a model and remembers each cache it fills and the tokens it has fed into it."""

    def __init__(self, model):
        self.model, self.n_ctx, self.n_vocab = model, model.n_ctx, model.n_vocab
        self.cache, self.fed = None, []

    def new_cache(self, capacity=None):
        self.cache, self.fed = self.model.new_cache(capacity), []
        return self.cache

    def __call__(self, ids, cache, n_logits=1):
        self.fed = self.fed[: cache.length] + list(ids)  # what the cache holds after this call
        return self.model(ids, cache, n_logits)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_caches_hold_exactly_the_committed_prefix_after_every_round(target, drafts, temperature):
    t, d = Recording(target), Recording(drafts["often"])
    committed = list(PROMPT)
    checked = []

    draft_lag = [1]

    def after_round(ids, kinds):
        committed.extend(ids)
        # The draft never fed its last proposal: after a rejection it holds everything but the
        # resampled token (lag 1), after a bonus also not the last draft (lag 2). A round
        # without drafts (the last one, when one token is left) does not feed the draft at all,
        # so it falls one token further behind.
        draft_lag[0] = {"resampled": 1, "bonus": 2, "target": draft_lag[0] + 1}[kinds[-1]]
        for model, lag in ((t, {1}), (d, {draft_lag[0]})):
            n = model.cache.length
            assert len(committed) - n in lag
            assert model.fed[:n] == committed[:n]
            fresh = model.model.new_cache(n)
            model.model(committed[:n], fresh, n_logits=0)
            np.testing.assert_allclose(model.cache.k[:, :, :n], fresh.k, atol=1e-4, rtol=0)
            np.testing.assert_allclose(model.cache.v[:, :, :n], fresh.v, atol=1e-4, rtol=0)
        checked.append(kinds)

    speculative_sample(t, d, PROMPT, 20, K=4, warp=Warp(temperature),
                       rng=np.random.default_rng(0), on_tokens=after_round)
    kinds = [k for ks in checked for k in ks]
    assert len(kinds) == 20 and {"accepted", "resampled", "bonus"} <= set(kinds)
    assert set(kinds) <= {"accepted", "resampled", "bonus", "target"}


@pytest.mark.parametrize("warp", [Warp(1.2, top_k=10, top_p=0.6), Warp(0.8, top_p=0.5),
                                  Warp(1.5, top_k=4)], ids=str)
def test_the_draft_samples_from_the_very_q_it_returns(drafts, warp):
    """The ratio p(x) / q(x) is right only if x was drawn from that q. With u scripted over
    [0, 1), each draft must be the token whose interval of q's CDF holds u: a draft sampled
    from another law (say without the top-p the ratio's q has) lands elsewhere."""
    drafter = ModelDrafter(drafts["often"])
    for u in (np.arange(40) + 0.5) / 40:
        drafter.start(PROMPT, 16)
        tokens, q = drafter.propose(PROMPT, 3, warp, ScriptedRng(u, u, u))
        assert len(tokens) == 3 and q.shape == (3, drafter.n_vocab)
        for x, q_i in zip(tokens, q):
            cdf = np.cumsum(q_i)
            assert cdf[x] - q_i[x] <= u < cdf[x], (u, x, q_i[x])


@pytest.mark.parametrize("warp", [Warp(1.2, top_k=10, top_p=0.6), Warp(0.8, top_k=3),
                                  Warp(0.0)], ids=str)
def test_the_drafts_q_is_the_warped_distribution_of_the_drafts_logits(drafts, warp):
    """q_i = probabilities(draft logits at x_i's position, warp), the same warp as p's: a draft
    that leaves out top-k or top-p still gives exact output, but it is accepted less often."""
    draft = drafts["often"]
    drafter = ModelDrafter(draft)
    drafter.start(PROMPT, 16)
    x, q = drafter.propose(PROMPT, 4, warp, np.random.default_rng(0))
    for i in range(4):
        context = PROMPT + x[:i]
        logits = draft(context, draft.new_cache(len(context)))[-1]  # a fresh forward, no cache
        np.testing.assert_allclose(q[i], probabilities(logits, warp), rtol=0, atol=1e-4)


# --- the sampled distribution, end to end -----------------------------------------------------

def exact_distribution(model, prompt, n, warp):
    """P(x_1..x_n | prompt) under the warped target, by enumerating every continuation. The warp
    is test_sampling's written-out reference, not the code's: a warping bug must show."""
    V = model.n_vocab
    dist = {}
    for seq in itertools.product(range(V), repeat=n):
        logits = model(list(prompt) + list(seq[:-1]), model.new_cache(len(prompt) + n), n_logits=n)
        dist[seq] = math.prod(reference_probabilities(logits[i], warp)[seq[i]] for i in range(n))
    return dist


def chi2_critical(df, alpha):
    """Upper alpha point of chi-square(df), Wilson-Hilferty approximation (no SciPy)."""
    z = {1e-3: 3.090, 1e-4: 3.719}[alpha]
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def goodness_of_fit(samples, dist, N):
    """(chi-square, its critical value at alpha = 1e-4, total variation, bound on it)."""
    counts = {s: 0 for s in dist}
    for s in samples:
        counts[s] += 1
    keys = sorted(dist, key=dist.get)
    # merge the rarest outcomes until each bin expects >= 5 samples (chi-square's usual rule)
    bins, acc_p, acc_c = [], 0.0, 0
    for k in keys:
        acc_p, acc_c = acc_p + dist[k], acc_c + counts[k]
        if acc_p * N >= 5:
            bins.append((acc_p, acc_c))
            acc_p, acc_c = 0.0, 0
    if acc_p > 0:
        bins[-1] = (bins[-1][0] + acc_p, bins[-1][1] + acc_c)
    chi2 = sum((c - p * N) ** 2 / (p * N) for p, c in bins)
    tv = 0.5 * sum(abs(counts[k] / N - dist[k]) for k in dist)
    # E|count/N - p| <= sqrt(p(1-p)/N); summed and halved this bounds E[TV]. 1.5x leaves room
    # for the fluctuation of TV itself, which is far smaller than its mean over 16-64 outcomes.
    tv_bound = 1.5 * 0.5 * sum(math.sqrt(p * (1 - p) / N) for p in dist.values())
    return chi2, chi2_critical(len(bins) - 1, 1e-4), tv, tv_bound


def total_variation(a, b):
    return 0.5 * sum(abs(a[k] - b[k]) for k in a)


TINY = dict(n_vocab=4, n_ctx=16, n_embd=8, n_head=2, n_layer=1)
STATISTICAL = {"T=1": (Warp(1.0), 3, 10000), "top_k": (Warp(0.8, top_k=2), 2, 6000),
               "top_p": (Warp(1.3, top_p=0.8), 2, 6000),
               "T=1.5,top_k,top_p": (Warp(1.5, top_k=3, top_p=0.8), 2, 6000)}


@pytest.mark.parametrize("case", STATISTICAL)
def test_speculative_samples_follow_the_exact_target_distribution(case):
    """Thousands of seeded runs on a 4-token vocabulary, with a draft that is right about half
    the time (so that acceptances and resamples both shape the law); the first n tokens'
    empirical law must pass a chi-square test at significance 1e-4 and be within a
    total-variation bound of the target's law (enumerated, warped by the test's own reference),
    while the draft's own law (a deliberately wrong reference) must fail both. No sample may be
    a sequence the target rules out. Where top-k and top-p are used together, each of them
    changes the law (so both are tested)."""
    warp, n, N = STATISTICAL[case]
    target = tiny_model(seed=21, scale=1.0, **TINY)
    draft = perturbed(target, 0.2)
    prompt = [1, 2]
    p_exact = exact_distribution(target, prompt, n, warp)
    q_exact = exact_distribution(draft, prompt, n, warp)
    assert total_variation(p_exact, q_exact) > 0.1  # a meaningful test
    if warp.top_k is not None and warp.top_p is not None:
        T = warp.temperature
        for one_filter in (Warp(T, top_k=warp.top_k), Warp(T, top_p=warp.top_p)):
            assert total_variation(p_exact, exact_distribution(target, prompt, n, one_filter)) > 0.05
    rng = np.random.default_rng(1234)
    samples, drafted, accepted = [], 0, 0
    for _ in range(N):
        ids, stats = speculative_sample(target, draft, prompt, n, K=2, warp=warp, rng=rng)
        samples.append(tuple(ids))
        drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
    assert all(p_exact[s] > 0 for s in samples)
    chi2, critical, tv, tv_bound = goodness_of_fit(samples, p_exact, N)
    assert chi2 < critical and tv < tv_bound, (chi2, critical, tv, tv_bound)
    assert 0.2 < accepted / drafted < 0.8  # both branches of the rule were taken, often
    chi2_q, critical_q, tv_q, _ = goodness_of_fit(samples, q_exact, N)
    assert chi2_q > critical_q and tv_q > tv_bound
