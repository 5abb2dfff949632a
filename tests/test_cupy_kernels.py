"""The fused kernels (gpt2_cupy/kernels.cu), each held against the gpt2_numpy/model.py function
it implements, computed in float64. Needs CuPy and an NVIDIA GPU (skipped without).

Tolerances are bounds, not guesses. A float32 dot product of n terms summed in any order is off
by at most gamma_n * sum|x_i w_i| (gamma_n ~ n u, u = 2^-24, the unit roundoff), whatever the
order, so gemv and lm_head are held to that bound per element. Where a bound is harder to write
(attention, layer norm, a whole forward), the kernels are held to a multiple of the error that
NumPy's float32 makes on the same inputs against the same float64 reference: the GPU may sum in
another order, not worse. Half-precision weights are compared with a reference built from the
same rounded weights, so the tolerance covers the kernels' arithmetic, not the rounding.
"""
import numpy as np
import pytest

import gpt2_numpy
from conftest import FIXTURES
from gpt2_numpy import model as ref


def usable_gpu():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not usable_gpu(), reason="needs CuPy and a visible NVIDIA GPU")
U = 2.0**-24  # float32's unit roundoff
DTYPES = ["float32", "float16", "bfloat16"]


@pytest.fixture(scope="module", params=DTYPES)
def kernels(request):
    from gpt2_cupy import fused

    return fused.Kernels(request.param), request.param


def on_device(a, dtype="float32"):
    """(device array stored as dtype, the float64 host values the kernels see)"""
    import cupy as cp

    from gpt2_cupy import fused

    dev = cp.asarray(np.asarray(a, dtype=np.float32))
    if dtype == "float32":
        return dev, np.asarray(a, dtype=np.float32).astype(np.float64)
    tree = fused.convert_weights({"wte": dev, "wpe": dev, "blocks": []}, dtype)
    widened = fused.widen_weights(tree, dtype)["wte"]
    return tree["wte"], cp.asnumpy(widened).astype(np.float64)


def dot_bound(x, w):
    """gamma_n * (|x| @ |w|): the most a float32 x @ w can be off, in any summation order."""
    n = x.shape[-1]
    return 1.01 * n * U / (1 - n * U) * (np.abs(x) @ np.abs(w))


@pytest.mark.parametrize("T", [1, 2, 5, 9, 16, 20])
@pytest.mark.parametrize("n, m", [(768, 2304), (200, 136), (3072, 768)])
def test_gemv_is_linear_then_gelu_or_plus_the_residual(kernels, T, n, m):
    import cupy as cp

    from gpt2_cupy import fused

    kern, dtype = kernels
    if m % kern.per16:
        pytest.skip("gemv needs m to be a multiple of the weights per 16-byte load")
    rng = np.random.default_rng(T * 1000 + n)
    x = rng.standard_normal((T, n)).astype(np.float32)
    w_dev, w = on_device(rng.standard_normal((n, m)) * 0.05, dtype)
    b = rng.standard_normal(m).astype(np.float32)
    res = rng.standard_normal((T, m)).astype(np.float32)
    x64, b64 = x.astype(np.float64), b.astype(np.float64)
    hparams = {"n_embd": max(n, m)}
    workspace = fused.Workspace(hparams, kern)
    linear = x64 @ w + b64
    bound = dot_bound(x64, w) + U * np.abs(linear)
    g = (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)
    beta = (0.1 * rng.standard_normal(n)).astype(np.float32)
    normed = ref.layer_norm(x64, g.astype(np.float64), beta.astype(np.float64))
    ln_linear = normed @ w + b64
    # the layer norm's own float32 error (a few units of roundoff per element) goes through w
    ln_bound = dot_bound(normed, w) + 32 * U * (np.abs(normed) @ np.abs(w)) + U * np.abs(ln_linear)
    for epilogue, want, tol in [
            (fused.LN_INPUT, ln_linear, ln_bound),
            (fused.ADD_BIAS, linear, bound),
            (fused.GELU, ref.gelu(linear), 1.2 * bound + 4 * U * np.abs(ref.gelu(linear)) + 1e-7),
            (fused.ADD_RESIDUAL, linear + res, bound + 2 * U * np.abs(linear + res))]:
        outs = []
        for _ in range(2):  # a second launch: the arrival counters were reset by the first
            out = cp.asarray(res) if epilogue == fused.ADD_RESIDUAL else cp.full((T, m), np.nan, np.float32)
            ln = {"g": cp.asarray(g), "b": cp.asarray(beta)} if epilogue == fused.LN_INPUT else None
            kern.gemv(cp.asarray(x), w_dev, cp.asarray(b), out, workspace,
                      fused.ADD_BIAS if ln else epilogue, ln=ln)
            outs.append(cp.asnumpy(out))
        assert np.isfinite(outs[0]).all()  # every element written
        assert np.array_equal(outs[0], outs[1])  # a fixed order of sums: the same bits each time
        err = np.abs(outs[0] - want)
        assert (err <= tol).all(), f"epilogue {epilogue}: worst {np.max(err / tol):.2f}x the bound"
        assert int(workspace.counters.sum()) == 0


@pytest.mark.parametrize("T", [1, 3, 16, 17])
def test_lm_head_is_x_times_wte_transposed(kernels, T):
    import cupy as cp

    kern, dtype = kernels
    rng = np.random.default_rng(T)
    V, d = 1003, 768  # V not a multiple of the 8 rows a block covers
    x = rng.standard_normal((T, d)).astype(np.float32)
    wte_dev, wte = on_device(rng.standard_normal((V, d)) * 0.05, dtype)
    logits = cp.full((T, V), np.nan, dtype=np.float32)
    kern.lm_head(cp.asarray(x), wte_dev, logits)
    want = x.astype(np.float64) @ wte.T
    err = np.abs(cp.asnumpy(logits) - want)
    assert (err <= dot_bound(x.astype(np.float64), wte.T)).all()


def test_embed_adds_token_and_position_rows(kernels):
    import cupy as cp

    kern, dtype = kernels
    rng = np.random.default_rng(1)
    wte_dev, wte = on_device(rng.standard_normal((300, 64)), dtype)
    wpe_dev, wpe = on_device(rng.standard_normal((40, 64)), dtype)
    ids, positions = np.array([5, 299, 0, 17]), np.array([7, 8, 9, 10])
    x = cp.full((4, 64), np.nan, dtype=np.float32)
    kern.embed(wte_dev, wpe_dev, cp.asarray(ids), cp.asarray(positions), x)
    want = wte[ids] + wpe[positions]
    np.testing.assert_allclose(cp.asnumpy(x), want, rtol=U, atol=0)


def measured_tolerance(fn32, fn64, *inputs, factor=8.0):
    """factor x the largest error NumPy's float32 makes against float64 on these inputs, and at
    least a few units of roundoff of the result's scale."""
    want = fn64(*[np.asarray(a, dtype=np.float64) for a in inputs])
    err32 = np.max(np.abs(fn32(*[np.asarray(a, dtype=np.float32) for a in inputs]) - want))
    return want, factor * err32 + 4 * U * np.max(np.abs(want))


@pytest.mark.parametrize("d", [768, 1600, 100])
def test_layer_norm_matches_model_layer_norm(kernels, d):
    import cupy as cp

    kern, _ = kernels
    rng = np.random.default_rng(d)
    x = (rng.standard_normal((5, d)) * 3 + 1).astype(np.float32)
    g, b = rng.standard_normal(d).astype(np.float32), rng.standard_normal(d).astype(np.float32)
    want, tol = measured_tolerance(ref.layer_norm, ref.layer_norm, x, g, b)
    out = cp.full((5, d), np.nan, dtype=np.float32)
    kern.layer_norm(cp.asarray(x), cp.asarray(g), cp.asarray(b), out)
    assert np.max(np.abs(cp.asnumpy(out) - want)) <= tol


@pytest.mark.parametrize("n_past, T", [(0, 1), (0, 7), (13, 1), (13, 5), (100, 16), (3, 40)])
def test_attention_writes_the_cache_and_attends_causally(kernels, n_past, T):
    """The kernel against model.causal_self_attention's middle (cache write, attention with the
    causal mask, heads merged), with garbage in the cache rows it must not read."""
    import cupy as cp

    kern, _ = kernels
    H, D, C = 4, 64, 160
    d = H * D
    rng = np.random.default_rng(n_past * 100 + T)
    qkv = rng.standard_normal((T, 3 * d)).astype(np.float32)
    k_cache = np.full((H, C, D), 1e20, dtype=np.float32)  # unwritten rows: must stay unseen
    v_cache = np.full((H, C, D), -1e20, dtype=np.float32)
    k_cache[:, :n_past] = rng.standard_normal((H, n_past, D))
    v_cache[:, :n_past] = rng.standard_normal((H, n_past, D))

    def reference(qkv, k_cache, v_cache):
        k_cache, v_cache = k_cache.copy(), v_cache.copy()
        q, k, v = (ref.split_heads(qkv[:, i * d : (i + 1) * d], H) for i in range(3))
        L = n_past + T
        k_cache[:, n_past:L], v_cache[:, n_past:L] = k, v
        visible = ref.causal_mask(n_past, T, np) if T > 1 else None
        out = ref.attention(q, k_cache[:, :L], v_cache[:, :L], visible)
        return ref.merge_heads(out)

    want, tol = measured_tolerance(reference, reference, qkv, k_cache, v_cache)
    dev_k, dev_v = cp.asarray(k_cache), cp.asarray(v_cache)
    out = cp.full((T, d), np.nan, dtype=np.float32)
    positions = cp.arange(n_past, n_past + T, dtype=cp.int64)
    kern.attention(cp.asarray(qkv), dev_k, dev_v, positions, out)
    assert np.max(np.abs(cp.asnumpy(out) - want)) <= tol
    k_new = ref.split_heads(qkv[:, d : 2 * d], H)
    np.testing.assert_array_equal(cp.asnumpy(dev_k)[:, n_past : n_past + T], k_new)
    np.testing.assert_array_equal(cp.asnumpy(dev_k)[:, n_past + T :], k_cache[:, n_past + T :])


def float64_model(model):
    return gpt2_numpy.GPT2(model.hparams, gpt2_numpy.load.tree_map(
        lambda a: np.asarray(a, dtype=np.float64), model.params))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["tiny-3h", "tiny-4h"])
def test_fused_forward_matches_float64_within_float32s_own_error(dtype, name):
    """A whole forward (prefill, steps, a verify-sized step) through the fused kernels, eagerly
    and through CUDA graphs, against model.forward in float64 on the same (rounded) weights."""
    import cupy as cp

    import gpt2_cupy
    from gpt2_cupy import fused

    cpu = gpt2_numpy.load_model(str(FIXTURES / name), download=False)
    dev = gpt2_cupy.load_model(str(FIXTURES / name), download=False, dtype=dtype, fused=True)
    assert dev.fused is not None
    seen = fused.widen_weights(dev.params, dtype)  # the weights as the kernels see them
    host = gpt2_numpy.GPT2(cpu.hparams, gpt2_numpy.load.tree_map(cp.asnumpy, seen))
    exact = float64_model(host)
    ids = np.random.default_rng(3).integers(0, cpu.n_vocab, 30).tolist()
    caches = {m: m.new_cache(30) for m in (host, exact, dev)}
    for step in [ids[:10], ids[10:11], ids[11:12], ids[12:17], ids[17:18], ids[18:30]]:
        got = cp.asnumpy(dev(step, caches[dev], n_logits=None))
        want = exact(step, caches[exact], n_logits=None)
        err32 = np.max(np.abs(host(step, caches[host], n_logits=None) - want))
        assert np.max(np.abs(got - want)) <= 8 * err32 + 1e-6


def test_float16_greedy_tokens_equal_float32s_and_every_dtype_stays_exact():
    """float16 keeps 11 bits of each weight: on the fixtures its greedy tokens are float32's.
    bfloat16 keeps 8 and may part from them where two tokens are close; within each dtype,
    speculative decoding still reproduces that dtype's own autoregressive tokens."""
    import gpt2_cupy

    prompt = [1, 2, 3, 4]
    runs = {}
    for dtype in DTYPES:
        target = gpt2_cupy.load_model(str(FIXTURES / "tiny-4h"), download=False, dtype=dtype, fused=True)
        draft = gpt2_cupy.load_model(str(FIXTURES / "tiny-3h"), download=False, dtype=dtype, fused=True)
        ar, _ = gpt2_cupy.autoregressive_sample(target, prompt, 40)
        sp, _ = gpt2_cupy.speculative_sample(target, draft, prompt, 40, K=4)
        assert sp == ar
        runs[dtype] = ar
    assert runs["float16"] == runs["float32"]


@pytest.mark.parametrize("name", ["tiny-3h", "tiny-4h"])
def test_half_precision_logits_stay_within_32_units_of_the_weights_rounding(name):
    """The documented tolerance: |logits(half) - logits(float32)| <= 32 u_h max|logits|, u_h the
    storage type's unit roundoff (float16 2^-11, bfloat16 2^-8)."""
    import cupy as cp

    import gpt2_cupy

    ids = np.load(FIXTURES / name / "reference.npz")["tokens"][0].tolist()
    logits = {}
    for dtype in DTYPES:
        model = gpt2_cupy.load_model(str(FIXTURES / name), download=False, dtype=dtype, fused=True)
        logits[dtype] = cp.asnumpy(model(ids, model.new_cache(len(ids)), n_logits=None))
    scale = np.max(np.abs(logits["float32"]))
    for dtype, u in (("float16", 2.0**-11), ("bfloat16", 2.0**-8)):
        assert np.max(np.abs(logits[dtype] - logits["float32"])) <= 32 * u * scale
