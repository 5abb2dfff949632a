"""Prompt-lookup drafting: what it proposes, and that decoding with it is still exact."""
import numpy as np
import pytest

import gpt2_numpy as gpt2
from gpt2_numpy import (AdaptiveK, NGramDrafter, Warp, adaptive_speculative_sample,
                        autoregressive_sample, speculative_sample)
from gpt2_numpy.drafters import lookup
from conftest import FIXTURES, SHARED_TOKENIZER, tiny_model
from test_decoding import exact_distribution, goodness_of_fit


@pytest.mark.parametrize("tokens, K, expected", [
    ([1, 2, 3, 9, 1, 2], 2, [3, 9]),  # the trigram is new, the bigram "1 2" was seen
    ([5, 1, 2, 7, 6, 1, 2, 8, 0, 1, 2], 3, [8, 0, 1]),  # the latest occurrence wins
    ([1, 2, 3, 4, 0, 2, 3, 9, 7, 1, 2, 3], 1, [4]),  # the longest match wins (n = 3 over n = 2)
    ([4, 7, 7, 7], 5, [7, 7, 7, 7, 7]),  # the copy runs into itself: a run continues
    ([1, 2, 1, 2], 5, [1, 2, 1, 2, 1]),
    ([1, 2, 3, 4], 3, []),  # the last token never occurred before
    ([1, 2, 1], 0, []),
    ([6], 4, []),  # nothing before the last token
])
def test_lookup(tokens, K, expected):
    assert lookup(tokens, K) == expected


def test_lookup_never_matches_the_suffix_with_itself():
    assert lookup([3, 4, 5], 2, n_max=3) == []
    assert lookup([9, 3, 9], 2, n_max=1) == [3, 9]


def test_proposals_are_one_hot_and_cost_no_model():
    drafter = NGramDrafter(n_vocab=10)
    drafter.start([1, 2, 1], capacity=8)
    drafts, q = drafter.propose([1, 2, 1], 3, Warp(1.0), rng=None)
    assert drafts == [2, 1, 2] and q.shape == (3, 10)
    np.testing.assert_array_equal(q.argmax(axis=1), drafts)
    np.testing.assert_array_equal(q.sum(axis=1), 1.0)
    assert drafter.calls == 1
    drafts, q = drafter.propose([1, 2, 3], 3, Warp(1.0), rng=None)
    assert drafts == [] and q.shape == (0, 10)


REPEATING = [7, 3, 9, 1, 7, 3, 9, 1, 7, 3]


@pytest.mark.parametrize("K", [1, 2, 4, 8, "adaptive"])
def test_greedy_ngram_equals_greedy_autoregressive(target, K):
    n = 40
    ar, _ = autoregressive_sample(target, REPEATING, n)
    if K == "adaptive":
        sp, stats = adaptive_speculative_sample(target, NGramDrafter(target.n_vocab), REPEATING,
                                                n, AdaptiveK(8))
    else:
        sp, stats = speculative_sample(target, NGramDrafter(target.n_vocab), REPEATING, n, K)
    assert sp == ar and stats.n_generated == n
    if K != "adaptive":  # (adaptive K drafts or not depending on measured times)
        assert stats.drafted > 0 and stats.accepted > 0  # proposals happened and some were right
        assert stats.rounds < n  # fewer target forwards than tokens


def test_greedy_ngram_on_the_official_format_fixture():
    model = gpt2.load_model(str(FIXTURES / "tiny-4h"))
    prompt = model.tokenizer.encode("the cat sat on the mat. the cat sat on the")
    ar, _ = autoregressive_sample(model, prompt, 30)
    sp, stats = speculative_sample(model, NGramDrafter(model.n_vocab), prompt, 30, K=4)
    assert sp == ar and stats.drafted > 0


def test_ngram_samples_follow_the_exact_target_distribution():
    """As test_decoding's statistical test, with proposals copied from a repetitive prompt:
    the first 3 tokens' empirical law passes chi-square (significance 1e-4) and a total-variation
    bound against the target's enumerated law, and fails both against a nearby wrong law (the
    same target at temperature 3 instead of 2)."""
    tiny = dict(n_vocab=4, n_ctx=16, n_embd=8, n_head=2, n_layer=1)
    target = tiny_model(seed=21, scale=1.0, **tiny)
    prompt, n, N, warp = [2, 0, 2, 0], 3, 8000, Warp(2.0)  # "2 0" repeats: "2 0 2" is proposed
    p_exact = exact_distribution(target, prompt, n, warp)
    wrong = exact_distribution(target, prompt, n, Warp(3.0))
    assert max(p_exact.values()) < 0.25  # spread over many outcomes: a meaningful test
    assert 0.5 * sum(abs(p_exact[k] - wrong[k]) for k in p_exact) > 0.1
    rng = np.random.default_rng(4321)
    samples, drafted, accepted, rejected = [], 0, 0, 0
    for _ in range(N):
        ids, stats = speculative_sample(target, NGramDrafter(4), prompt, n, K=2, warp=warp, rng=rng)
        samples.append(tuple(ids))
        drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
        rejected += sum(m < K for m, K in zip(stats.accepted_per_round, stats.K_per_round))
    assert drafted > N and accepted > N / 4 and rejected > N / 4  # both branches, often
    chi2, critical, tv, tv_bound = goodness_of_fit(samples, p_exact, N)
    assert chi2 < critical and tv < tv_bound, (chi2, critical, tv, tv_bound)
    chi2_w, critical_w, tv_w, _ = goodness_of_fit(samples, wrong, N)
    assert chi2_w > critical_w and tv_w > tv_bound


@pytest.mark.skipif(not SHARED_TOKENIZER.is_dir(), reason="needs ../shared/gpt2-tokenizer")
def test_replayed_prompt_lookup_pays_where_text_repeats_and_adaptive_k_guards_new_text():
    """python -m bench replay --ngram, on the Xeon's costs: the real drafter over real
    GPT-2 tokens (the replay asserts every decoder emitted the text). Text that repeats its
    prompt gets most drafts accepted and pays; new prose gets few, fixed K loses to plain
    decoding on this CPU, and adaptive K stays within its guard."""
    from bench.replay import ngram_replay
    from gpt2_numpy.tokenizer import load_tokenizer
    from test_adaptive import XEON

    code, quote, prose = ngram_replay(XEON, load_tokenizer(SHARED_TOKENIZER), K_max=8)

    def acceptance(row, decoder):
        return row["stats"][decoder].acceptance_rate

    def speedup(row, decoder):
        return row["rates"][decoder] / row["rates"]["autoregressive"]

    for repeats in (code, quote):
        assert acceptance(repeats, repeats["best"]) > 0.5 > acceptance(prose, prose["best"])
        assert speedup(repeats, repeats["best"]) > 1.5
        assert speedup(repeats, "adaptive, K_max=8") > 1.5
    assert speedup(prose, prose["best"]) < 1
    assert speedup(prose, "adaptive, K_max=8") >= 1 / 1.05
