"""The CuPy twin on a real GPU. Skipped, with the reason, on machines without CuPy and a GPU;
the CPU-side proof that the shared code has no NumPy-only path is in test_model.py
(test_no_hidden_numpy_only_path)."""
import numpy as np
import pytest

import gpt2_numpy
from conftest import FIXTURES


def usable_gpu():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not usable_gpu(), reason="needs CuPy and a visible NVIDIA GPU")
NAMES = ["tiny-3h", "tiny-4h"]


@pytest.fixture(scope="module")
def gpu():
    import gpt2_cupy

    return gpt2_cupy


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
    want = cpu(ids, cpu.new_cache(len(ids)), n_logits=None)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


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
