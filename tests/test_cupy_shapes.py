"""The fused kernels on every official shape, and forwards that follow each other closely: the
first section of `python -m bench gpu-check`. Needs CuPy and an NVIDIA GPU (skipped without).
Random weights in the official shapes, so no checkpoint is needed.

The tolerances are test_cupy_kernels.py's (a bound on float32 rounding for gemv, a multiple of
NumPy's own float32 error for attention); where a kernel must give the same bits every time
(a replay, a token computed by another forward), the test asks for equality.
"""
import numpy as np
import pytest

import gpt2_numpy
from gpt2_numpy import model as ref
from test_cupy_kernels import DTYPES, U, dot_bound, measured_tolerance, on_device, usable_gpu

pytestmark = pytest.mark.skipif(not usable_gpu(), reason="needs CuPy and a visible NVIDIA GPU")
SIZES = ("124M", "355M", "774M", "1558M")


@pytest.fixture(scope="module", params=DTYPES)
def kernels(request):
    from gpt2_cupy import fused

    return fused.Kernels(request.param), request.param


def official_matrices(size):
    """(name, n, m, epilogue) of the four gemv launches of a layer, as fused.py makes them."""
    from gpt2_cupy import fused

    d = gpt2_numpy.official_hparams(size)["n_embd"]
    return [("attn.c_attn", d, 3 * d, fused.LN_INPUT), ("attn.c_proj", d, d, fused.ADD_RESIDUAL),
            ("mlp.c_fc", d, 4 * d, fused.LN_INPUT | fused.GELU),
            ("mlp.c_proj", 4 * d, d, fused.ADD_RESIDUAL)]


@pytest.mark.parametrize("size", SIZES)
def test_gemv_on_every_official_shape_with_its_layers_epilogue(kernels, size):
    """Each of the layer's four products, with the layer norm, gelu or residual it has in a
    forward, at T = 1, 9 and 16 rows (the kernel's three unrolling depths): within the float32
    bound, the same bits on a second launch, the arrival counters back at zero."""
    import cupy as cp

    from gpt2_cupy import fused

    kern, dtype = kernels
    h = gpt2_numpy.official_hparams(size)
    ws = fused.Workspace(h, kern)
    for name, n, m, epilogue in official_matrices(size):
        rng = np.random.default_rng(n * 7 + m)
        x = rng.standard_normal((16, n)).astype(np.float32)
        w_dev, w = on_device(rng.standard_normal((n, m)) * 0.02, dtype)
        b = (0.1 * rng.standard_normal(m)).astype(np.float32)
        res = rng.standard_normal((16, m)).astype(np.float32)
        g = (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)
        beta = (0.1 * rng.standard_normal(n)).astype(np.float32)
        x64 = x.astype(np.float64)
        xin = ref.layer_norm(x64, g.astype(np.float64), beta.astype(np.float64)) \
            if epilogue & fused.LN_INPUT else x64
        linear = xin @ w + b.astype(np.float64)
        bound = dot_bound(xin, w) + U * np.abs(linear)
        if epilogue & fused.LN_INPUT:  # the layer norm's own rounding, carried through w
            bound += 32 * U * (np.abs(xin) @ np.abs(w))
        if epilogue & fused.GELU:
            want = ref.gelu(linear)
            tol = 1.2 * bound + 4 * U * np.abs(want) + 1e-7
        elif epilogue & fused.ADD_RESIDUAL:
            want = linear + res
            tol = bound + 2 * U * np.abs(want)
        else:
            want, tol = linear, bound
        ln = {"g": cp.asarray(g), "b": cp.asarray(beta)} if epilogue & fused.LN_INPUT else None
        for T in (1, 9, 16):
            outs = []
            for _ in range(2):
                out = (cp.array(res[:T]) if epilogue & fused.ADD_RESIDUAL
                       else cp.full((T, m), np.nan, np.float32))
                kern.gemv(cp.asarray(x[:T]), w_dev, cp.asarray(b), out, ws,
                          epilogue & ~fused.LN_INPUT, ln=ln)
                outs.append(cp.asnumpy(out))
            err = np.abs(outs[0] - want[:T])
            worst = np.max(err / tol[:T])
            assert (err <= tol[:T]).all(), f"{size} {name} T={T}: worst {worst:.2f}x the bound"
            assert np.array_equal(outs[0], outs[1]), f"{size} {name} T={T}: other bits on a second launch"
            assert int(ws.counters.sum()) == 0


@pytest.mark.parametrize("H", [16, 20, 25])
@pytest.mark.parametrize("n_past, T", [(1023, 1), (1008, 16)])
def test_attention_over_a_full_1024_row_cache(H, n_past, T):
    """The official head counts (355M, 774M, 1558M; D = 64) with the cache full after this call:
    position 1023 is the last row of a 1,024-row cache."""
    import cupy as cp

    from gpt2_cupy import fused

    kern = fused.Kernels("float32")
    D, C = 64, 1024
    d = H * D
    rng = np.random.default_rng(H * 10 + T)
    qkv = rng.standard_normal((T, 3 * d)).astype(np.float32)
    k_cache = rng.standard_normal((H, C, D)).astype(np.float32)
    v_cache = rng.standard_normal((H, C, D)).astype(np.float32)

    def reference(qkv, k_cache, v_cache):
        k_cache, v_cache = k_cache.copy(), v_cache.copy()
        q, k, v = (ref.split_heads(qkv[:, i * d : (i + 1) * d], H) for i in range(3))
        k_cache[:, n_past:], v_cache[:, n_past:] = k, v
        visible = ref.causal_mask(n_past, T, np) if T > 1 else None
        return ref.merge_heads(ref.attention(q, k_cache, v_cache, visible))

    want, tol = measured_tolerance(reference, reference, qkv, k_cache, v_cache)
    dev_k, dev_v = cp.asarray(k_cache), cp.asarray(v_cache)
    out = cp.full((T, d), np.nan, dtype=np.float32)
    kern.attention(cp.asarray(qkv), dev_k, dev_v, cp.arange(n_past, C, dtype=cp.int64), out)
    assert np.max(np.abs(cp.asnumpy(out) - want)) <= tol
    np.testing.assert_array_equal(cp.asnumpy(dev_k)[:, n_past:], ref.split_heads(qkv[:, d : 2 * d], H))


def official_model(size, seed=0, **kwargs):
    import gpt2_cupy
    from bench.gpu_check import device_random_params

    h = gpt2_numpy.official_hparams(size)
    params = kwargs.pop("params", None) or device_random_params(h, seed)
    return gpt2_cupy.GPT2(h, params, name=size, **kwargs)


def test_a_graphed_chunked_forward_repeats_the_eager_one_ten_times():
    """355M: a 20-token forward after a 5-token prefill is a 16-token graph, then a 4-token one,
    on one cache and one split-K workspace. Issued ten times with no host transfer in between,
    every run gives the eager forward's logits bit for bit (a replay that overlapped the one
    before would read half-written cache rows or count with another launch's counters), and
    the counters end at zero."""
    import cupy as cp

    graphed = official_model("355M", fused=True)
    eager = official_model("355M", fused=True, graphs=False, params=graphed.params)
    ids = np.random.default_rng(5).integers(0, graphed.n_vocab, 25).tolist()
    g_cache, e_cache = graphed.new_cache(25), eager.new_cache(25)
    for model, cache in ((graphed, g_cache), (eager, e_cache)):
        model(ids[:5], cache, n_logits=0)
    want = cp.asnumpy(eager(ids[5:], e_cache, n_logits=20))
    runs = []
    for _ in range(10):
        g_cache.rollback(5)
        runs.append(graphed(ids[5:], g_cache, n_logits=20))
    for i, got in enumerate(runs):
        got = cp.asnumpy(got)
        assert np.array_equal(got, want), f"run {i}: max |diff| {np.max(np.abs(got - want)):.3g}"
    assert int(graphed.fused.workspace.counters.sum()) == 0
    assert int(eager.fused.workspace.counters.sum()) == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_tokens_logits_are_the_same_bits_whichever_forward_computes_them(dtype):
    """gemv's split does not depend on T, and every kernel computes a row alone: 20 tokens fed
    one at a time, all at once eagerly, and through replayed graphs (16 + 4) give the same
    logits, bit for bit."""
    import cupy as cp

    from bench.gpu_check import device_random_params

    params = device_random_params(gpt2_numpy.official_hparams("124M"), 0)  # float32
    one = official_model("124M", fused=True, graphs=False, dtype=dtype, params=params)
    ids = np.random.default_rng(6).integers(0, one.n_vocab, 25).tolist()
    cache = one.new_cache(25)
    one(ids[:5], cache, n_logits=0)
    steps = np.concatenate([cp.asnumpy(one(ids[i : i + 1], cache)) for i in range(5, 25)])
    for graphs in (False, True):
        model = official_model("124M", fused=True, graphs=True, dtype=dtype,
                               params=params) if graphs else one
        cache = model.new_cache(25)
        model(ids[:5], cache, n_logits=0)
        for _ in range(1 + graphs):  # through graphs: recorded, then replayed
            cache.rollback(5)
            whole = cp.asnumpy(model(ids[5:], cache, n_logits=20))
        diff = np.max(np.abs(whole - steps))
        assert np.array_equal(whole, steps), f"graphs={graphs}: max |diff| {diff:.3g}"


@pytest.mark.parametrize("size", ["774M", "1558M"])
def test_greedy_tokens_of_the_largest_models_equal_the_unfused_forwards(size):
    """Random weights in the official shapes: 12 greedy tokens after a 32-token prompt, fused
    kernels through graphs against model.py on CuPy arrays."""
    fused = official_model(size, seed=1, fused=True)
    unfused = official_model(size, fused=False, graphs=False, params=fused.params)
    prompt = np.random.default_rng(7).integers(0, fused.n_vocab, 32).tolist()
    greedy = gpt2_numpy.Warp(0.0)
    got, _ = gpt2_numpy.autoregressive_sample(fused, prompt, 12, greedy)
    want, _ = gpt2_numpy.autoregressive_sample(unfused, prompt, 12, greedy)
    assert got == want
