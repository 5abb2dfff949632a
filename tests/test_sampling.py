"""Warping, sampling, and the accept/resample rule, checked exactly (no model involved)."""
import math
import zlib

import numpy as np
import pytest

from gpt2_numpy import GPT2Error, Warp, accept_or_resample, probabilities, residual, sample


class ScriptedRng:
    """A stand-in for np.random.Generator whose random() returns the given numbers in order."""

    def __init__(self, *values):
        self.values = list(values)

    def random(self):
        assert self.values, "the code drew more random numbers than were scripted"
        return self.values.pop(0)


def random_pair(rng, V, kind):
    p, q = rng.dirichlet(np.ones(V)), rng.dirichlet(np.ones(V))
    if kind == "q_zero_where_p_positive":
        q[:2] = 0
    elif kind == "p_zero_where_q_positive":
        p[:2] = 0
    elif kind == "equal":
        q = p.copy()
    elif kind == "one_hot":
        p, q = np.eye(V)[1], np.eye(V)[3]
    elif kind == "same_one_hot":
        p = q = np.eye(V)[2]
    return p / p.sum(), q / q.sum()


def reference_residual(p, q):
    """norm(max(0, p - q)), written out here rather than taken from the code; p where p == q."""
    r = np.maximum(p - q, 0.0)
    return r / r.sum() if r.sum() > 1e-12 else p


@pytest.mark.parametrize("kind", ["random", "q_zero_where_p_positive", "p_zero_where_q_positive",
                                  "equal", "one_hot", "same_one_hot"])
def test_one_step_output_distribution_is_exactly_p(kind):
    """Draft x ~ q, keep it with probability min(1, p(x)/q(x)), else draw from norm(max(0, p - q)).
    Both halves are read off the code with scripted u: the acceptance threshold (u just below
    it accepts, u at it rejects), and after a rejection the token that u resamples, for u near
    both ends and at the middle of each token's interval of the residual's CDF (so each interval
    is the token's and no other's). The law of the output, summed exactly from those, must be p."""
    V = 6
    p, q = random_pair(np.random.default_rng(zlib.crc32(kind.encode())), V, kind)  # not hash(): salted
    r = reference_residual(p, q)
    ends = np.cumsum(r)  # token t is resampled for u in [ends[t] - r[t], ends[t])
    out = np.zeros(V)
    for x in np.flatnonzero(q):
        a = min(1.0, p[x] / q[x])
        if a > 0:  # u just below a accepts
            assert accept_or_resample([x], q[None], np.stack([p, p]), ScriptedRng(np.nextafter(a, 0), 0.5))[0] == 1
        if a < 1:  # u == a rejects (strict <), and then each u resamples its token of r
            for token in np.flatnonzero(r):
                for at in (1e-6, 0.5, 1 - 1e-6):  # fractions of the way through the interval
                    rng = ScriptedRng(a, ends[token] - (1 - at) * r[token])
                    assert accept_or_resample([x], q[None], np.stack([p, p]), rng) == (0, token)
        out[x] += q[x] * a
        out += q[x] * (1 - a) * r
    np.testing.assert_allclose(out, p, atol=1e-12)


def test_residual_is_normalised_and_falls_back_to_p():
    p = np.array([0.5, 0.3, 0.2])
    np.testing.assert_allclose(residual(p, np.array([0.2, 0.6, 0.2])), [1, 0, 0])
    np.testing.assert_array_equal(residual(p, p), p)  # 0/0 would be NaN


def test_rows_line_up_with_draft_positions():
    """Row i of p is the distribution for draft i; row K is the bonus position. Hand-crafted
    one-hot rows make any off-by-one visible."""
    V, drafts = 8, [5, 2, 7]
    q = np.eye(V)[drafts]  # the draft was certain of each of its tokens
    p = np.eye(V)[[5, 2, 7, 4]]  # the target agrees with all three, then wants 4
    assert accept_or_resample(drafts, q, p, ScriptedRng(0.3, 0.3, 0.3, 0.6)) == (3, 4)
    p = np.eye(V)[[5, 6, 7, 4]]  # the target disagrees at position 1 and wants 6 there
    assert accept_or_resample(drafts, q, p, ScriptedRng(0.3, 0.3, 0.6)) == (1, 6)
    p = np.eye(V)[[0, 2, 7, 4]]  # rejection at the very first draft
    assert accept_or_resample(drafts, q, p, ScriptedRng(0.0, 0.6)) == (0, 0)


def test_u_zero_never_accepts_a_token_the_target_rules_out():
    q, p = np.array([[0.5, 0.5]]), np.array([[0.0, 1.0], [0.5, 0.5]])
    assert accept_or_resample([0], q, p, ScriptedRng(0.0, 0.0)) == (0, 1)


def test_sample_never_returns_a_zero_probability_token():
    p = np.array([0.0, 0.5, 0.0, 0.5, 0.0])
    for u in (0.0, 0.25, 0.5, np.nextafter(1.0, 0)):
        assert p[sample(p, ScriptedRng(u))] > 0


def test_sample_frequencies_match_p():
    rng, p = np.random.default_rng(0), np.array([0.1, 0.0, 0.6, 0.3])
    counts = np.bincount([sample(p, rng) for _ in range(20000)], minlength=4) / 20000
    np.testing.assert_allclose(counts, p, atol=0.015)  # > 4 standard deviations


def test_greedy_is_one_hot_and_ties_pick_the_lowest_id():
    logits = np.array([1.0, 3.0, 3.0, -2.0], dtype=np.float32)
    np.testing.assert_array_equal(probabilities(logits, Warp(0.0)), [0, 1, 0, 0])


def test_temperature_top_k_top_p():
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1])).astype(np.float32)
    np.testing.assert_allclose(probabilities(logits, Warp(1.0)), [0.4, 0.3, 0.2, 0.1], atol=1e-6)
    hot = probabilities(logits, Warp(2.0))
    np.testing.assert_allclose(hot, np.sqrt([0.4, 0.3, 0.2, 0.1]) / np.sqrt([0.4, 0.3, 0.2, 0.1]).sum(), atol=1e-6)
    np.testing.assert_allclose(probabilities(logits, Warp(1.0, top_k=2)), [4 / 7, 3 / 7, 0, 0], atol=1e-6)
    # top_p keeps tokens until the mass first reaches top_p, the crossing token included; it
    # applies after top_k, to the renormalised top-k distribution
    np.testing.assert_allclose(probabilities(logits, Warp(1.0, top_p=0.5)), [4 / 7, 3 / 7, 0, 0], atol=1e-6)
    np.testing.assert_allclose(probabilities(logits, Warp(1.0, top_p=0.7)), [4 / 7, 3 / 7, 0, 0], atol=1e-6)
    np.testing.assert_allclose(probabilities(logits, Warp(1.0, top_p=0.71)), [4 / 9, 3 / 9, 2 / 9, 0], atol=1e-6)
    np.testing.assert_allclose(probabilities(logits, Warp(1.0, top_p=0.1)), [1, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(probabilities(logits, Warp(1.0, top_k=3, top_p=0.8)), [4 / 9, 3 / 9, 2 / 9, 0], atol=1e-6)


def reference_probabilities(logits, warp):
    """The sampling law written out from raw logits, independently of sampling.probabilities, in
    the order the README states: divide by the temperature, keep the top_k largest, softmax,
    keep the most likely tokens until their mass first reaches top_p, renormalise."""
    if warp.temperature == 0:
        return np.eye(len(logits))[int(np.argmax(logits))]
    z = [float(v) / warp.temperature for v in logits]
    ranked = sorted(range(len(z)), key=lambda i: -z[i])
    kept = ranked[: warp.top_k] if warp.top_k is not None else ranked
    top = max(z[i] for i in kept)
    weights = {i: math.exp(z[i] - top) for i in kept}
    law = {i: w / sum(weights.values()) for i, w in weights.items()}
    if warp.top_p is not None:
        nucleus, mass = {}, 0.0
        for i in sorted(law, key=lambda i: -law[i]):
            if mass >= warp.top_p:
                break
            nucleus[i], mass = law[i], mass + law[i]
        law = {i: v / mass for i, v in nucleus.items()}
    return np.array([law.get(i, 0.0) for i in range(len(z))])


@pytest.mark.parametrize("warp", [Warp(1.0), Warp(0.6), Warp(1.7, top_k=7), Warp(0.5, top_p=0.7),
                                  Warp(1.6, top_p=0.9), Warp(0.7, top_k=12, top_p=0.8),
                                  Warp(2.5, top_k=4, top_p=0.95)], ids=str)
def test_warping_equals_a_written_out_reference(warp):
    """probabilities() against reference_probabilities() on random rows, at temperatures other
    than 1 and with top-k and top-p together: the order of the steps matters (top-p on the
    untempered distribution keeps another set of tokens)."""
    rng = np.random.default_rng(17)
    for row in (3 * rng.standard_normal((20, 30))).astype(np.float32):
        want = reference_probabilities(row, warp)
        np.testing.assert_allclose(probabilities(row, warp), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("warp", [Warp(0.0), Warp(0.8), Warp(1.7, top_k=7), Warp(0.5, top_p=0.7),
                                  Warp(1.2, top_k=5, top_p=0.6)])
def test_several_rows_are_each_warped_alone(warp):
    """A verify step warps K + 1 rows in one call: each row must come out as if alone. The rows
    sit 300 apart, so a max or a sum taken over the whole matrix instead of each row (or an
    argmax over the flattened rows) gives other numbers."""
    rng = np.random.default_rng(5)
    rows = (2 * rng.standard_normal((6, 30)) + 300 * np.arange(6)[:, None]).astype(np.float32)
    rows[1, [4, 9]] = rows[1].max() + 1  # a tie at the top: the lowest id, as for one row
    want = np.stack([reference_probabilities(row, warp) for row in rows])
    np.testing.assert_allclose(probabilities(rows, warp), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(temperature=float("nan")),
                                 dict(temperature=float("inf")), dict(temperature=1e-300),
                                 dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_warps_are_rejected(bad):
    with pytest.raises(GPT2Error):
        Warp(**{"temperature": 1.0, **bad})


def test_the_smallest_temperature_allowed_gives_the_argmax():
    from gpt2_numpy.sampling import MIN_TEMPERATURE

    big = float(np.finfo(np.float32).max)
    logits = np.array([30.0, -5.0, big, 1.0], dtype=np.float32)  # float32's largest on top
    p = probabilities(logits, Warp(MIN_TEMPERATURE))
    np.testing.assert_array_equal(p, [0, 0, 1, 0])  # finite, no NaN: the argmax
    with pytest.raises(GPT2Error, match="overflows"):
        Warp(MIN_TEMPERATURE / 2)


@pytest.mark.parametrize("warp", [Warp(0.0), Warp(0.7), Warp(1.0, top_k=3), Warp(1.3, top_p=0.6)])
def test_probability_of_reads_each_rows_distribution_at_its_token(warp):
    """The look back's shortcut (greedy: an argmax test, no distribution) gives what the full
    distribution says, ties included (both pick the lowest id)."""
    from gpt2_numpy.adaptive import probability_of

    rng = np.random.default_rng(3)
    logits = rng.standard_normal((40, 9)).astype(np.float32)
    logits[0, [2, 5]] = logits[0].max() + 1  # an exact tie at the top
    tokens = rng.integers(0, 9, 40)
    tokens[:3] = [2, 5, np.argmax(logits[2])]
    want = [probabilities(row, warp)[t] for row, t in zip(logits, tokens)]
    np.testing.assert_array_equal(probability_of(logits, tokens, warp), want)
    if warp.greedy:
        assert 0 < sum(want) < len(want)  # both outcomes occur


def test_top_p_1_is_accepted_and_keeps_every_token():
    """top_p's range is (0, 1]: 1 is allowed, and keeps the whole (top-k) distribution."""
    logits = np.random.default_rng(2).standard_normal((3, 50)).astype(np.float32)
    for top_k in (None, 7):
        np.testing.assert_array_equal(probabilities(logits, Warp(0.9, top_k, top_p=1.0)),
                                      probabilities(logits, Warp(0.9, top_k)))


@pytest.mark.parametrize("warp", [Warp(1.0), Warp(0.5), Warp(2.0, top_k=3), Warp(1.0, top_p=0.9)],
                         ids=str)
def test_large_logits_give_finite_probabilities(warp):
    """Only differences of logits matter: rows of scores near 1e4 and 1e30 (float32) must give
    finite probabilities that sum to 1 and equal those of the shifted row. exp(1e4) overflows
    even in float64, so a softmax that forgets to subtract the row's max gives inf / inf = NaN."""
    rows = np.array([[1e4, 1e4 - 1, 1e4 - 2.5, 0.0, 1e4 - 0.5],
                     [1e30, 0.0, -1e30, 1e30, -3.0]], dtype=np.float32)
    p = probabilities(rows, warp)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=0, atol=1e-12)
    for got, row in zip(p, rows):
        shifted = (row.astype(np.float64) - row.max()).astype(np.float32)  # exact: same gaps
        want = reference_probabilities(shifted, warp)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("q_x", [0.0, float("nan")])
def test_a_draft_its_q_gives_no_mass_is_an_error_not_an_acceptance(q_x):
    """x must be drawn from q: a q(x) of 0 makes p/q 0/0 = NaN, and min(1, NaN) is 1, which
    would accept x even where the target gives it probability 0. It is the drafter's mistake,
    named in a GPT2Error, whatever u is and whatever p says."""
    q = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    q[0, 2] = q_x
    p = np.array([[0.0, 0.5, 0.5], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    for drafts, position in (([2, 1], 1), ([1, 2], None), ([0, 0], None)):
        for u in (0.0, 0.5, np.nextafter(1.0, 0)):
            if position is None:  # proposals q gives mass: no error
                accept_or_resample(drafts, q, p, ScriptedRng(u, u, u))
                continue
            with pytest.raises(GPT2Error, match=f"proposed token 2 as draft {position} of 2 but "
                                                "its q gives it probability 0: a drafter must"):
                accept_or_resample(drafts, q, p, ScriptedRng(u, u, u))
    q = np.array([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    with pytest.raises(GPT2Error, match="token 1 as draft 2 of 2"):  # a later draft: once reached
        accept_or_resample([1, 1], q, p, ScriptedRng(0.0, 0.0, 0.0))
