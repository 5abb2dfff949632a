"""bench/fidelity.py: the divergence, the early stop, and that the measurement tells an exact
decoder from a broken acceptance rule (on the fixtures, in seconds; no timing is asserted)."""
import json
import sys

import numpy as np
import pytest

import gpt2_numpy as gpt2
from conftest import FIXTURES


from bench import fidelity  # noqa: E402


@pytest.fixture(scope="module")
def target():
    return gpt2.load_model(str(FIXTURES / "tiny-4h"), progress=False)


def entropy_bits(p):
    p = p[p > 0]
    return -np.sum(p * np.log2(p))


def test_js_is_zero_for_identical_samples_and_one_for_disjoint_ones():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 50, size=400)
    assert fidelity.js_divergence(a, a) == pytest.approx(0, abs=1e-12)
    assert fidelity.js_divergence(a, rng.permutation(a)) == pytest.approx(0, abs=1e-12)
    assert fidelity.js_divergence(a, np.concatenate([a, a])) == pytest.approx(0, abs=1e-12)
    assert fidelity.js_divergence(a, a + 50) == pytest.approx(1)  # no outcome in common
    b = rng.integers(0, 60, size=300)
    assert 0 < fidelity.js_divergence(a, b) < 1
    assert fidelity.js_divergence(a, b) == pytest.approx(fidelity.js_divergence(b, a))


def test_js_equals_the_entropy_form():
    """JS(P, Q) = H(M) - (H(P) + H(Q)) / 2: an independent way to compute the same number."""
    rng = np.random.default_rng(1)
    for _ in range(5):
        p, q = rng.dirichlet(np.ones(12)), rng.dirichlet(np.ones(12))
        p[rng.integers(12)] = 0  # a zero in one of them, never in the mixture
        p /= p.sum()
        expected = entropy_bits((p + q) / 2) - (entropy_bits(p) + entropy_bits(q)) / 2
        assert fidelity.js_bits(p, q) == pytest.approx(expected, abs=1e-12)


def test_stopping_after_two_tokens_keeps_the_full_runs_first_two(target):
    draft = fidelity.noisy_copy(target, 0.005)
    prompt, warp = target.tokenizer.encode("the cat sat"), gpt2.Warp(0.7)
    for K in (1, 3):
        for seed in range(5):
            full, _ = gpt2.speculative_sample(target, draft, prompt, K + 1, K, warp,
                                              np.random.default_rng(seed))
            pair, accepted = fidelity.first_two(gpt2.speculative_sample, target, draft, prompt,
                                                K + 1, K, warp, np.random.default_rng(seed))
            assert list(pair) == full[:2] and 0 <= accepted <= K


def test_the_exact_distribution_of_two_tokens_is_normalised(target):
    joint = fidelity.exact_first_two(target, target.tokenizer.encode("the cat"), gpt2.Warp(0.7))
    assert joint.shape == (target.n_vocab ** 2,) and joint.sum() == pytest.approx(1)


def test_speculative_sits_in_the_noise_band_and_a_broken_rule_does_not(target):
    """The property the figure shows, shrunk: with a draft that is often accepted, the library's
    decoder and the copied round with the library's rule stay near the noise floor; the copy
    with the rule "keep every draft", and the draft alone, are far above it."""
    draft = fidelity.noisy_copy(target, 0.005)
    prompt = target.tokenizer.encode("the cat sat")
    r = fidelity.measure(target, draft, prompt, gpt2.Warp(0.5), n=200, Ks=[2], broken_Ks=[2],
                         control_K=2, n_seeds=40, seed=0,
                         broken_rules={"keep every draft": fidelity.accept_every_draft})
    top = r["noise_floor"]["max"]
    assert r["speculative"][0]["first_round_acceptance"] > 0.3  # the acceptance test is exercised
    assert r["speculative"][0]["js"] < 1.5 * top
    assert r["control"]["js"] < 1.5 * top
    assert r["broken"][0]["js"] > 2 * top
    assert r["draft_alone"] > 2 * top
    json.dumps(r, allow_nan=False)  # plain numbers only


def strict_json(text):
    def reject(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=reject)


def test_the_command_writes_strict_json(tmp_path, capsys):
    argv = ["--samples", "20", "--seeds", "5", "--K", "1,2", "--broken_K", "1", "--control_K", "0",
            "--no_plot", "--out", str(tmp_path)]
    assert fidelity.main(argv) == 0
    res = strict_json((tmp_path / "fidelity.json").read_text())
    assert [p["draft"] for p in res["pairs"]] == ["tiny-3h",
                                                  "tiny-4h + noise (sd 0.005 on every weight)"]
    for pair in res["pairs"]:
        assert [r["K"] for r in pair["speculative"]] == [1, 2]
        assert [(r["rule"], r["K"]) for r in pair["broken"]] == [("keep every draft", 1),
                                                                  ("resample from p", 1)]
        assert pair["control"] is None
        floor = pair["noise_floor"]
        assert 0 < floor["min"] <= floor["median"] <= floor["max"] < 1


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--K", "a-b"], "--K takes K values"),
    (["--K", "0,1"], "every K must be >= 1"),
    (["--broken_K", "0"], "every K must be >= 1"),
    (["--samples", "1"], "--samples must be >= 2"),
    (["--draft_noise", "-1"], "--draft_noise must be >= 0"),
    (["--target", str(FIXTURES)], "a model folder needs"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path, capsys, flags, message):
    assert fidelity.main(flags + ["--no_plot", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "fidelity.json").exists()


def test_without_matplotlib_the_figure_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    assert fidelity.main(["--out", str(tmp_path), "--img", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "matplotlib" in err and "\n" not in err
    assert not list(tmp_path.iterdir())  # it stopped before measuring anything
