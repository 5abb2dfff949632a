"""The CuPy twin: on a real GPU when there is one, and always on tests/fake_cupy.py, CuPy's API
over NumPy with CUDA graphs that re-run what they recorded. The fake checks graphs.py's
bookkeeping (which forward replays which graph, chunks, reuse, warm_up, no host transfer in a
capture) on every machine; numbers, capture rules and cuBLAS need the GPU. The CPU-side proof
that the shared code has no NumPy-only path is in test_model.py (test_no_hidden_numpy_only_path).
"""
import numpy as np
import pytest

import fake_cupy
import gpt2_numpy
from conftest import FIXTURES
from test_cli import strict_loads


def usable_gpu():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


NAMES = ["tiny-3h", "tiny-4h"]
# A graph that cannot be recorded falls back to eager forwards with a RuntimeWarning: here that
# is a failure (on the fake, a host transfer inside a capture raises as CUDA would)
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


@pytest.fixture(scope="module", params=["fake", "fake-fused", "gpu", "gpu-fused"])
def gpu(request):
    """gpt2_cupy on the fake CuPy, or on the real one (skipped without CuPy and a GPU), with the
    unfused forward (model.py's functions) or the fused kernels (gpt2_cupy/fused.py) by default.
    On the fake, the fused kernels are NumPy stand-ins (fake_cupy.RawModule): what runs for real
    is fused.py's host side."""
    if request.param.startswith("fake"):
        with fake_cupy.installed() as fake:
            fake.graphs.FUSED_BY_DEFAULT = request.param == "fake-fused"
            yield fake
        return
    if not usable_gpu():
        pytest.skip("needs CuPy and a visible NVIDIA GPU")
    import gpt2_cupy

    saved = gpt2_cupy.graphs.FUSED_BY_DEFAULT
    gpt2_cupy.graphs.FUSED_BY_DEFAULT = request.param == "gpu-fused"
    yield gpt2_cupy
    gpt2_cupy.graphs.FUSED_BY_DEFAULT = saved


def float64_logits(model, ids):
    """model.forward in float64 over ids, logits for every row: the reference."""
    exact = gpt2_numpy.GPT2(model.hparams, gpt2_numpy.load.tree_map(
        lambda a: np.asarray(a, dtype=np.float64), model.params))
    return exact(ids, exact.new_cache(len(ids)), n_logits=None)


@pytest.mark.parametrize("name", NAMES)
def test_cupy_logits_match_numpy(gpu, name):
    import cupy

    cpu = gpt2_numpy.load_model(str(FIXTURES / name), download=False)
    dev = gpu.load_model(str(FIXTURES / name), download=False)
    assert isinstance(dev.params["wte"], cupy.ndarray) and dev.params["wte"].dtype == cupy.float32
    ids = np.load(FIXTURES / name / "reference.npz")["tokens"][0].tolist()
    cache = dev.new_cache(len(ids))
    assert isinstance(cache.k, cupy.ndarray)  # the KV cache lives on the device
    got = cupy.asnumpy(dev(ids, cache, n_logits=None))
    exact = float64_logits(cpu, ids)
    # Both are float32 with other summation orders (cuBLAS or the fused kernels vs OpenBLAS), so
    # the GPU is held to a multiple of the CPU's own float32 error against float64, not to a
    # fixed tolerance; a real bug moves logits by O(1)
    cpu_error = np.max(np.abs(cpu(ids, cpu.new_cache(len(ids)), n_logits=None) - exact))
    assert np.max(np.abs(got - exact)) <= 8 * cpu_error + 1e-6


def test_static_forward_equals_forward_through_steps_and_rollbacks(gpu):
    """gpt2_cupy/static.py (positions as data, what CUDA graphs replay) gives model.forward's
    logits at every step, with garbage in the cache rows it must not read."""
    import cupy

    from gpt2_cupy.static import static_forward

    target = gpt2_numpy.load_model(str(FIXTURES / "tiny-4h"), download=False)
    dev = gpt2_numpy.GPT2(target.hparams, gpt2_numpy.load.tree_map(cupy.asarray, target.params))
    rng = np.random.default_rng(4)
    ids = rng.integers(0, target.n_vocab, 24).tolist()
    eager, static = target.new_cache(24), dev.new_cache(24)
    static.k[...] = 1e20  # rows not yet written hold garbage: the mask, not zeros, must hide them
    static.v[...] = -1e20
    n_head = target.hparams["n_head"]
    fed = 0
    for T, n_logits, keep in [(6, 6, None), (1, 1, None), (4, 4, None), (3, 2, 9), (1, 1, None),
                              (5, 5, 10)]:
        if keep is not None:  # a rejected draft: both caches forget everything after `keep`
            eager.rollback(keep)
            fed = keep
        new = ids[fed : fed + T]
        want = target(new, eager, n_logits=n_logits)
        positions = cupy.arange(fed, fed + T)
        got = static_forward(dev.params, cupy.asarray(new), positions, static.k, static.v,
                             n_head, n_logits, lambda x, w: x @ w)
        fed += T
        np.testing.assert_allclose(cupy.asnumpy(got), want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(cupy.asnumpy(static.k[:, :, :fed]), eager.k[:, :, :fed], atol=1e-4, rtol=0)


@pytest.mark.parametrize("K", [1, 3, 6])
def test_greedy_speculative_equals_greedy_autoregressive_on_gpu(gpu, K):
    target = gpu.load_model(str(FIXTURES / "tiny-4h"), download=False)
    draft = gpu.load_model(str(FIXTURES / "tiny-3h"), download=False)
    prompt = target.tokenizer.encode("the model is learning the")
    ar, _ = gpu.autoregressive_sample(target, prompt, 30)
    sp, _ = gpu.speculative_sample(target, draft, prompt, 30, K=K)
    assert sp == ar
    cpu = gpt2_numpy.load_model(str(FIXTURES / "tiny-4h"), download=False)
    assert gpt2_numpy.autoregressive_sample(cpu, prompt, 30)[0] == ar


def test_sampling_draws_match_the_cpu_with_the_same_seed(gpu):
    target = gpu.load_model(str(FIXTURES / "tiny-4h"), download=False)
    draft = gpu.load_model(str(FIXTURES / "tiny-3h"), download=False)
    cpu_t = gpt2_numpy.load_model(str(FIXTURES / "tiny-4h"), download=False)
    cpu_d = gpt2_numpy.load_model(str(FIXTURES / "tiny-3h"), download=False)
    warp = gpt2_numpy.Warp(1.0)
    prompt = [1, 2, 3]
    dev, _ = gpu.speculative_sample(target, draft, prompt, 20, K=3, warp=warp, rng=np.random.default_rng(5))
    host, _ = gpt2_numpy.speculative_sample(cpu_t, cpu_d, prompt, 20, K=3, warp=warp, rng=np.random.default_rng(5))
    # the same host random stream; logits differ only by float32 rounding, so the draws agree
    # unless a uniform lands within ~1e-6 of a decision boundary
    assert np.mean(np.array(dev) == np.array(host)) > 0.9


def test_cuda_graphs_replay_the_eager_forward(gpu):
    """Decoding and verify-sized steps, with rollbacks, through recorded CUDA graphs give the
    eager forward's logits, and a step of a kind seen before replays its graph."""
    import cupy

    path = str(FIXTURES / "tiny-4h")
    graphed = gpu.load_model(path, download=False)
    eager = gpu.load_model(path, download=False, graphs=False)
    ids = np.random.default_rng(6).integers(0, graphed.n_vocab, 40).tolist()
    g_cache, e_cache = graphed.new_cache(40), eager.new_cache(40)
    graphed(ids[:8], g_cache, n_logits=0)  # a prefill: eager in both
    eager(ids[:8], e_cache, n_logits=0)
    fed = 8
    # (T, roll back to, n_logits): fewer logits than T (a draft step after a bonus, a catch-up)
    # come from the same graph as all T of them
    steps = [(1, None, 1), (1, None, 1), (5, None, 5), (1, 12, 1), (5, None, 2), (5, 15, 5),
             (2, None, 1), (1, None, 1), (2, None, 2)]
    for T, keep, n_logits in steps:
        if keep is not None:
            g_cache.rollback(keep)
            e_cache.rollback(keep)
            fed = keep
        got = graphed(ids[fed : fed + T], g_cache, n_logits=n_logits)
        want = eager(ids[fed : fed + T], e_cache, n_logits=n_logits)
        fed += T
        assert g_cache.length == e_cache.length == fed
        assert got.shape == want.shape == (n_logits, graphed.n_vocab)
        np.testing.assert_allclose(cupy.asnumpy(got), cupy.asnumpy(want), atol=1e-4, rtol=1e-4)
    recorded = {key[1:]: g for key, g in graphed.graphs.items() if key[0] == g_cache.k.data.ptr}
    assert set(recorded) == {(1,), (2,), (5,)} and all(g.graph is not None for g in recorded.values())
    assert not eager.graphs  # graphs=False records nothing
    k = g_cache.k
    del g_cache
    again = graphed.new_cache(40)  # a dropped cache's arrays come back, graphs and all
    assert again.k is k and again.length == 0
    n_graphs = len(graphed.graphs)
    other = gpu.KVCache(graphed.hparams, 40, cupy)  # not from new_cache: run eagerly, no graph
    graphed(ids[:1], other)
    assert other.length == 1 and len(graphed.graphs) == n_graphs


@pytest.mark.parametrize("n_logits", [1, 3, 8, 9, 24, 25, 40])
def test_a_long_forward_with_logits_runs_as_chunks_of_graphs(gpu, n_logits):
    """A catch-up over 40 tokens: chunks of 16, 16 and 8 through the graphs give the eager
    forward's logits, whichever chunks the rows asked for fall in."""
    import cupy

    from gpt2_cupy.graphs import GRAPH_MAX_T

    path = str(FIXTURES / "tiny-4h")
    graphed = gpu.load_model(path, download=False)
    eager = gpu.load_model(path, download=False, graphs=False)
    ids = np.random.default_rng(7).integers(0, graphed.n_vocab, 45).tolist()
    g_cache, e_cache = graphed.new_cache(45), eager.new_cache(45)
    for model, cache in ((graphed, g_cache), (eager, e_cache)):
        model(ids[:5], cache, n_logits=0)
    got = graphed(ids[5:], g_cache, n_logits=n_logits)
    want = eager(ids[5:], e_cache, n_logits=n_logits)
    assert g_cache.length == e_cache.length == 45 and got.shape == (n_logits, graphed.n_vocab)
    np.testing.assert_allclose(cupy.asnumpy(got), cupy.asnumpy(want), atol=1e-4, rtol=1e-4)
    Ts = {key[1] for key in graphed.graphs if key[0] == g_cache.k.data.ptr}
    assert Ts == {GRAPH_MAX_T, 40 % GRAPH_MAX_T}


def test_warm_up_records_every_graph_an_adaptive_run_replays(gpu):
    """After warm_up(capacity) no decoding step records a graph (a recording costs about two
    eager forwards, which adaptive K would count as the cost of drafting): AR, fixed K and
    adaptive K, whose catch-ups come in many lengths, replay only."""
    target = gpu.load_model(str(FIXTURES / "tiny-4h"), download=False)
    draft = gpu.load_model(str(FIXTURES / "tiny-3h"), download=False)
    prompt = target.tokenizer.encode("the model is learning the")
    n = 40
    for model in (target, draft):
        model.warm_up(len(prompt) + n - 1)
    counts = len(target.graphs), len(draft.graphs)
    assert counts == (16, 16)  # T = 1..GRAPH_MAX_T, on one cache each
    ar, _ = gpu.autoregressive_sample(target, prompt, n)
    assert gpu.speculative_sample(target, draft, prompt, n, 3)[0] == ar
    for policy in (gpu.AdaptiveK(8), PlainStretches([0, 2, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0, 0, 4])):
        sp, stats = gpu.adaptive_speculative_sample(target, draft, prompt, n, policy)
        assert sp == ar
    assert {1, 2, 3, 4} <= set(stats.K_per_round)
    assert (len(target.graphs), len(draft.graphs)) == counts


class PlainStretches(gpt2_numpy.AdaptiveK):
    """A policy that repeats a pattern of K per round: after plain stretches of 1 to 4 rounds
    the draft catches up on 1 to 5 tokens, each length its own kind of forward."""

    def __init__(self, pattern):
        super().__init__(max(pattern))
        self.pattern, self.round = pattern, 0

    def next_K(self):
        return self.pattern[self.round % len(self.pattern)]

    def update(self, K, accepted, draft_seconds, target_seconds):
        self.round += 1


@pytest.mark.parametrize("flags", [["--K", "4"], ["--K", "8", "--adaptive"], ["--draft", "ngram"],
                                   ["--temperature", "0.8", "--seed", "3"]])
def test_main_with_backend_cupy_prints_the_numpy_backends_tokens(gpu, capsys, flags):
    """python main.py --backend cupy, end to end (warm_up, graphs, both decoders): the same
    tokens as --backend numpy. Sampled ones too: one host random stream, and logits that differ
    by float32 rounding at most."""
    import main

    argv = ["--draft_model_size", str(FIXTURES / "tiny-3h"), "--target_model_size",
            str(FIXTURES / "tiny-4h"), "--prompt", "the cat sat", "--n_tokens_to_generate", "40",
            "--no_progress", "--json", *flags]
    runs = {}
    for backend in ("numpy", "cupy"):
        assert main.main(argv + ["--backend", backend]) == 0
        runs[backend] = strict_loads(capsys.readouterr().out)
    for mode in ("autoregressive", "speculative"):
        assert runs["cupy"][mode]["token_ids"] == runs["numpy"][mode]["token_ids"]
    assert runs["cupy"]["backend"] == "cupy" and runs["cupy"]["same_tokens"] == runs["numpy"]["same_tokens"]


@pytest.mark.filterwarnings("default::RuntimeWarning")
def test_a_graph_that_cannot_be_recorded_leaves_eager_forwards_with_the_same_logits():
    """If a capture fails (here: the forward reads a device value on the host, which CUDA
    refuses while recording), graphs.py warns once and runs eagerly from then on: the failed
    step, the chunks after it in a long forward and every later step. Fake CuPy only: a failed
    capture on a real device is not something to provoke in a test."""
    with fake_cupy.installed() as gpu:
        from gpt2_cupy import graphs

        path = str(FIXTURES / "tiny-4h")
        graphed = gpu.load_model(path, download=False, fused=False)  # records static_forward
        eager = gpu.load_model(path, download=False, graphs=False, fused=False)
        ids = np.random.default_rng(8).integers(0, graphed.n_vocab, 45).tolist()
        g_cache, e_cache = graphed.new_cache(45), eager.new_cache(45)
        graphed(ids[:3], g_cache, n_logits=None)  # T = 3 is recorded while that still works
        eager(ids[:3], e_cache, n_logits=None)
        record = graphs.static_forward

        def reads_the_device(params, ids, *args):
            int(ids[0])  # a host transfer: fine eagerly, refused inside a capture
            return record(params, ids, *args)

        graphs.static_forward = reads_the_device
        with pytest.warns(RuntimeWarning, match="CUDA graphs unavailable"):
            got = graphed(ids[3:40], g_cache, n_logits=30)  # chunks 16 (fails), 16, 5
        want = eager(ids[3:40], e_cache, n_logits=30)
        assert not graphed.use_graphs and g_cache.length == e_cache.length == 40
        np.testing.assert_allclose(fake_cupy.asnumpy(got), fake_cupy.asnumpy(want), atol=1e-4, rtol=1e-4)
        n_graphs = len(graphed.graphs)
        for step in (ids[40:43], ids[43:45]):  # later steps, even of a T with a graph: eagerly
            got, want = graphed(step, g_cache), eager(step, e_cache)
            np.testing.assert_allclose(fake_cupy.asnumpy(got), fake_cupy.asnumpy(want), atol=1e-4, rtol=1e-4)
        assert len(graphed.graphs) == n_graphs and g_cache.length == e_cache.length == 45


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_main_with_half_precision_weights_decodes_exactly_in_that_precision(gpu, capsys, dtype):
    """python main.py --backend cupy --dtype float16|bfloat16: the fused kernels read half-
    precision weights; greedy speculative decoding still prints the same model's greedy tokens."""
    import main

    argv = ["--draft_model_size", str(FIXTURES / "tiny-3h"), "--target_model_size",
            str(FIXTURES / "tiny-4h"), "--prompt", "the cat sat", "--n_tokens_to_generate", "30",
            "--no_progress", "--json", "--backend", "cupy", "--dtype", dtype]
    assert main.main(argv) == 0
    run = strict_loads(capsys.readouterr().out)
    assert run["dtype"] == dtype and run["same_tokens"]
    assert run["speculative"]["token_ids"] == run["autoregressive"]["token_ids"]


def test_dtype_other_than_float32_needs_the_gpu(capsys):
    import main

    assert main.main(["--dtype", "float16", "--no_progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--backend cupy" in err and "\n" not in err


@pytest.mark.filterwarnings("default::RuntimeWarning")
def test_kernels_that_do_not_compile_leave_the_unfused_forward_with_one_warning(monkeypatch, capsys):
    """Where the CUDA compiler refuses kernels.cu, a float32 model warns once and runs the
    unfused forward with the same logits; half precision, which needs the kernels, is a one-line
    error from main.py (fake CuPy: a real compiler failure is not something to provoke)."""
    import main

    def refuses(*args, **kwargs):
        raise fake_cupy.cuda.compiler.CompileException("nvrtc: error: not this GPU")

    monkeypatch.setattr(fake_cupy, "RawModule", refuses)
    with fake_cupy.installed() as gpu:
        path = str(FIXTURES / "tiny-4h")
        with pytest.warns(RuntimeWarning, match="fused kernels unavailable") as warned:
            model = gpu.load_model(path, download=False, fused=True)
        assert len(warned) == 1 and model.fused is None
        cpu = gpt2_numpy.load_model(path, download=False)
        ids = [5, 9, 2, 7]
        got = fake_cupy.asnumpy(model(ids, model.new_cache(8), n_logits=None))
        np.testing.assert_allclose(got, cpu(ids, cpu.new_cache(8), n_logits=None), atol=1e-5, rtol=0)
        argv = ["--draft_model_size", str(FIXTURES / "tiny-3h"), "--target_model_size", path,
                "--no_progress", "--backend", "cupy", "--dtype", "float16"]
        assert main.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: float16 weights need the fused kernels") and "\n" not in err


def test_the_fake_flags_two_streams_touching_one_array_with_nothing_ordering_them():
    """The fake's stream model, which the ordering tests below rely on: work on two blocking
    streams over one array races unless a synchronize, an event, or work on the legacy default
    stream comes between; reads alone never race."""
    cp = fake_cupy
    a, b = cp.zeros(8), cp.zeros(8)
    one, two = cp.cuda.Stream(), cp.cuda.Stream()
    with one:
        cp.launch(writes=[a[:4]])
    with two:
        cp.launch(writes=[a[4:]])  # other bytes: fine
        cp.launch(reads=[b])
        with pytest.raises(cp.StreamRace):
            cp.launch(reads=[a[2:3]])
    with one:
        cp.launch(reads=[b])  # read and read: fine
    event = cp.cuda.Event()
    event.record(one)
    two.wait_event(event)
    with two:
        cp.launch(writes=[a])  # after the event: ordered
    with one:
        with pytest.raises(cp.StreamRace):
            cp.launch(reads=[a])
    cp.launch(reads=[b])  # the legacy default stream: after both streams' work, before later work
    with one:
        cp.launch(writes=[a])
    one.synchronize()
    with two:
        cp.launch(writes=[a])
    cp.cuda.Device().synchronize()


@pytest.mark.parametrize("gpu", ["fake", "fake-fused"], indirect=True)
def test_replays_of_one_model_run_one_after_another(gpu):
    """A 20-token forward with logits is a 16-token graph, then a 4-token one, on one cache and
    (fused) one split-K workspace: the second must not start before the first is done. On the
    fake, a replay that could overlap another of the same model raises StreamRace; the logits
    must equal the eager forward's every time (tests/test_cupy_shapes.py runs it on a GPU)."""
    import cupy

    path = str(FIXTURES / "tiny-4h")
    graphed = gpu.load_model(path, download=False)
    eager = gpu.load_model(path, download=False, graphs=False)
    ids = np.random.default_rng(9).integers(0, graphed.n_vocab, 25).tolist()
    g_cache, e_cache = graphed.new_cache(25), eager.new_cache(25)
    for model, cache in ((graphed, g_cache), (eager, e_cache)):
        model(ids[:5], cache, n_logits=0)
    want = cupy.asnumpy(eager(ids[5:], e_cache, n_logits=20))
    runs = []
    for _ in range(3):  # recorded, then replayed twice; no host transfer in between
        g_cache.rollback(5)
        runs.append(graphed(ids[5:], g_cache, n_logits=20))
    for got in runs:
        np.testing.assert_allclose(cupy.asnumpy(got), want, atol=1e-4, rtol=1e-4)
    if graphed.fused:
        assert not cupy.asnumpy(graphed.fused.workspace.counters).any()


def test_a_gemv_counter_left_behind_stops_the_next_forward():
    """The fake gemv refuses to start on a column tile whose arrival counter is not zero (on a
    GPU its last block would sum the partials too early, silently)."""
    with fake_cupy.installed() as gpu:
        model = gpu.load_model(str(FIXTURES / "tiny-4h"), download=False, fused=True)
        cache = model.new_cache(8)
        model([1, 2], cache)
        model.fused.workspace.counters[0] = 1
        with pytest.raises(AssertionError, match="counter was left behind"):
            model([3], cache)


@pytest.mark.parametrize("gpu", ["fake", "fake-fused"], indirect=True)
@pytest.mark.parametrize("graphs", [True, False])
def test_token_ids_outside_the_vocabulary_are_a_one_line_error(gpu, graphs):
    model = gpu.load_model(str(FIXTURES / "tiny-4h"), download=False, graphs=graphs)
    cache = model.new_cache(8)
    for ids in ([1, model.n_vocab], [-1], [2, 3, model.n_vocab + 7]):
        with pytest.raises(gpu.GPT2Error, match=r"token id -?\d+ is outside the vocabulary") as e:
            model(ids, cache, n_logits=1)
        assert "\n" not in str(e.value) and cache.length == 0
    model([0, model.n_vocab - 1], cache)  # the ends of the range are fine
    assert cache.length == 2


@pytest.mark.parametrize("gpu", ["fake", "fake-fused"], indirect=True)
@pytest.mark.parametrize("graphs", [True, False])
def test_more_logits_than_new_tokens_is_a_one_line_error(gpu, graphs):
    model = gpu.load_model(str(FIXTURES / "tiny-4h"), download=False, graphs=graphs)
    cache = model.new_cache(8)
    with pytest.raises(gpu.GPT2Error, match="n_logits must be in 0..3"):
        model([1, 2, 3], cache, n_logits=4)
    assert cache.length == 0


def test_fused_kernels_refuse_weights_they_cannot_read_as_row_major_16_byte_loads():
    """Weights that are not C-contiguous, or start off a 16-byte boundary, are a one-line
    GPT2Error from FusedForward; a float32 model then runs the unfused forward (one warning).
    (Half-precision weights are fresh arrays, converted at load.)"""
    with fake_cupy.installed() as gpu:
        from gpt2_cupy import fused

        base = gpt2_numpy.load_model(str(FIXTURES / "tiny-4h"), download=False)
        params = gpt2_numpy.load.tree_map(fake_cupy.asarray, base.params)
        w = params["blocks"][1]["mlp"]["c_fc"]["w"]
        shifted = fake_cupy.zeros(w.size + 1, dtype=w.dtype)[1:].reshape(w.shape)  # 4 bytes off
        shifted[...] = w
        for bad, message in ((fake_cupy.asfortranarray(w), "contiguous weights; blocks.1.mlp.c_fc.w"),
                             (shifted, "blocks.1.mlp.c_fc.w on a 16-byte boundary")):
            tree = gpt2_numpy.load.tree_map(lambda a: a, params)
            tree["blocks"][1]["mlp"]["c_fc"]["w"] = bad
            with pytest.raises(gpu.GPT2Error, match=message) as e:
                fused.FusedForward(tree, base.hparams)
            assert "\n" not in str(e.value)
            with pytest.warns(RuntimeWarning, match="fused kernels unavailable"):
                model = gpu.GPT2(base.hparams, tree, fused=True)
            assert model.fused is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gemv_splits_fill_two_waves_of_sms_for_every_official_shape(dtype):
    """split_k_rows gives every official weight matrix column tiles x row slices >= two blocks
    per SM of the (fake) device, but where the fewest rows a block reads (MIN_KC) binds, the
    same split for every T; and the workspace holds the partial sums of every launch of a
    16-row forward (the fake gemv asserts the launch's geometry and room)."""
    with fake_cupy.installed():
        from gpt2_cupy import fused

        kern = fused.Kernels(dtype)
        for size in ("124M", "355M", "774M", "1558M"):
            h = gpt2_numpy.official_hparams(size)
            d = h["n_embd"]
            ws = fused.Workspace(h, kern)
            for n, m in [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)]:
                kc = kern.split_rows(n, m)
                blocks = -(-m // kern.cols) * -(-n // kc)
                assert blocks >= fused.WAVES * fake_cupy.SMS or kc == fused.MIN_KC, (size, n, m, kc)
                assert kc % 8 == 0 and kc <= 256
                w = fake_cupy.zeros((n, m), dtype=np.float32 if dtype == "float32" else np.uint16)
                x = fake_cupy.ones((16, n), dtype=np.float32)
                out = fake_cupy.zeros((16, m), dtype=np.float32)
                kern.gemv(x, w, fake_cupy.zeros(m, dtype=np.float32), out, ws)
