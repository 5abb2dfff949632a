"""The forward pass over the KV cache: cached == full recompute, rollback, limits, portability."""
import numpy as np
import pytest

import gpt2_numpy as gpt2
from gpt2_numpy.load import tree_map
from conftest import tiny_model

# float32 rounding differs between one T-row product and T one-row products; with activations of
# order one the logits are O(10), and the measured difference is ~1e-5. 1e-4 leaves margin while
# any real cache bug (wrong position, stale row, missing mask) moves logits by O(1).
ATOL = 1e-4


def full_logits(model, ids):
    return model(ids, model.new_cache(len(ids)), n_logits=None)  # [T, V]


@pytest.mark.parametrize("n_head", [3, 4])
def test_token_by_token_equals_full_sequence(n_head):
    model = tiny_model(seed=3, n_head=n_head, n_embd=12 * n_head // 3 if n_head == 4 else 24)
    ids = np.random.default_rng(0).integers(0, model.n_vocab, 40).tolist()
    full = full_logits(model, ids)
    cache = model.new_cache(len(ids))
    stepwise = np.concatenate([model([t], cache) for t in ids])
    assert cache.length == len(ids)
    assert full.dtype == stepwise.dtype == np.float32
    np.testing.assert_allclose(stepwise, full, atol=ATOL, rtol=0)


def test_chunks_of_any_size_equal_full_sequence(target):
    ids = np.random.default_rng(1).integers(0, target.n_vocab, 30).tolist()
    full = full_logits(target, ids)
    cache, rows, i = target.new_cache(30), [], 0
    for size in (7, 1, 5, 2, 9, 6):  # prefill, decode, and verify-sized chunks
        rows.append(target(ids[i : i + size], cache, n_logits=None))
        i += size
    np.testing.assert_allclose(np.concatenate(rows), full, atol=ATOL, rtol=0)


def test_rollback_then_new_continuation_equals_fresh_run(target):
    rng = np.random.default_rng(2)
    prefix = rng.integers(0, target.n_vocab, 12).tolist()
    rejected = rng.integers(0, target.n_vocab, 5).tolist()
    accepted = rng.integers(0, target.n_vocab, 4).tolist()
    cache = target.new_cache(32)
    target(prefix + rejected, cache, n_logits=None)
    k_before = cache.k.copy()
    cache.rollback(len(prefix) + 2)  # keep two of the five
    np.testing.assert_array_equal(cache.k, k_before)  # rollback touches no data
    got = target(accepted, cache, n_logits=None)
    want = full_logits(target, prefix + rejected[:2] + accepted)[-len(accepted):]
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    assert cache.length == len(prefix) + 2 + len(accepted)


def test_n_logits_selects_the_last_rows(target):
    ids = [1, 2, 3, 4, 5]
    full = full_logits(target, ids)
    assert target(ids, target.new_cache(5), n_logits=0) is None
    np.testing.assert_allclose(target(ids, target.new_cache(5), n_logits=2), full[-2:], atol=ATOL)
    np.testing.assert_allclose(target(ids, target.new_cache(5)), full[-1:], atol=ATOL)


def test_positions_start_at_the_cache_length(target):
    """Feeding the same token at different cache lengths must give different logits (wpe offset)."""
    cache = target.new_cache(10)
    a = target([7], cache)
    b = target([7], cache)
    c = target([7], target.new_cache(1))
    np.testing.assert_allclose(a, c, atol=ATOL)
    assert np.abs(a - b).max() > 1e-2


def test_context_limits_are_clear_errors(target):
    with pytest.raises(gpt2.GPT2Error, match="does not fit"):
        target(list(range(5)), target.new_cache(4))
    with pytest.raises(gpt2.GPT2Error, match="n_ctx"):
        target.new_cache(target.n_ctx + 1)
    cache = target.new_cache(target.n_ctx)
    target([i % target.n_vocab for i in range(target.n_ctx)], cache, n_logits=0)
    with pytest.raises(gpt2.GPT2Error):
        target([1], cache)
    with pytest.raises(ValueError):
        cache.rollback(target.n_ctx + 1)


def test_softmax_of_large_scores_is_finite_and_sums_to_one():
    """softmax(x) = softmax(x - max x): float32 scores near 1e4 or 1e30 must give finite
    probabilities that sum to 1 and equal the shifted row's. Without the max subtraction,
    exp(1e4) is inf and inf / inf is NaN."""
    from gpt2_numpy.model import softmax

    scores = np.array([[1e4, 1e4 - 1, 1e4 - 2.5, 0.0], [1e30, 0.0, -1e30, 1e30]], dtype=np.float32)
    got = softmax(scores)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    np.testing.assert_allclose(got.sum(axis=-1), 1.0, rtol=0, atol=1e-6)
    e = np.exp([[0.0, -1.0, -2.5, -1e4], [0.0, -1e30, -2e30, 0.0]])  # the shifted rows, float64
    np.testing.assert_allclose(got, e / e.sum(axis=-1, keepdims=True), rtol=0, atol=1e-6)


def test_gelu_is_the_tanh_form():
    from gpt2_numpy.model import gelu

    x = np.linspace(-4, 4, 9, dtype=np.float32)
    erf_form = 0.5 * x * (1 + np.vectorize(__import__("math").erf)(x / np.sqrt(2)))
    assert gelu(x).dtype == np.float32
    assert 1e-4 < np.abs(gelu(x) - erf_form).max() < 1e-2  # close to erf-GELU, but not it


def test_no_hidden_numpy_only_path():
    """Run the forward pass and both decoders on array_api_strict arrays: a library that accepts
    only the Array API standard (no NumPy methods, no implicit conversions, no float64 promotion).
    This is the code CuPy runs; if it passes here it uses nothing NumPy-specific."""
    xps = pytest.importorskip("array_api_strict", reason="install the test extra: pip install -e .[test]")
    model = tiny_model(seed=5)
    strict = gpt2.GPT2(model.hparams, tree_map(lambda a: xps.asarray(a), model.params))
    assert strict.xp is xps
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    cache = strict.new_cache(12)
    assert isinstance(cache.k, type(strict.params["wte"]))
    got = np.concatenate([np.from_dlpack(strict(ids[:5], cache, n_logits=None)),
                          np.from_dlpack(strict(ids[5:], cache, n_logits=None))])
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, full_logits(model, ids), atol=ATOL, rtol=0)
    draft = gpt2.GPT2(model.hparams, tree_map(lambda a: xps.asarray(a * 1.01), model.params))
    a, _ = gpt2.autoregressive_sample(strict, ids, 10)
    s, _ = gpt2.speculative_sample(strict, draft, ids, 10, K=3)
    assert a == s == gpt2.autoregressive_sample(model, ids, 10)[0]
