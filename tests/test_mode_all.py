"""main.py --mode all: the target alone, the draft alone and speculative decoding, and where the
speculative speed lies between the other two."""
import json

import numpy as np
import pytest

import gpt2_numpy as gpt2
import main
from gpt2_numpy import cli
from conftest import FIXTURES
from test_cli import timing_rule_lifted  # noqa: F401  (a fixture)

DRAFT, TARGET = str(FIXTURES / "tiny-3h"), str(FIXTURES / "tiny-4h")
BASE = ["--draft_model_size", DRAFT, "--target_model_size", TARGET, "--prompt", "the cat sat",
        "--n_tokens_to_generate", "17", "--no_progress", "--mode", "all"]


def strict_json(text):
    """json.loads that rejects NaN and Infinity, which are not JSON."""
    def reject(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=reject)


def test_strict_json_rejects_nan():  # the parser below would let a NaN through otherwise
    with pytest.raises(ValueError):
        strict_json(json.dumps({"x": float("nan")}))


def test_json_has_three_runs_and_the_position(capsys, timing_rule_lifted):
    assert main.main(BASE + ["--json", "--temperature", "0.8", "--seed", "5"]) == 0
    r = strict_json(capsys.readouterr().out)
    for mode in ("autoregressive", "draft_alone", "speculative"):
        assert len(r[mode]["token_ids"]) == 17 and r[mode]["tokens_per_second"] > 0
    # The draft block is the draft model decoding alone, with the run's seed.
    draft = gpt2.load_model(DRAFT, progress=False)
    prompt = draft.tokenizer.encode("the cat sat")
    ids, _ = gpt2.autoregressive_sample(draft, prompt, 17, gpt2.Warp(0.8), np.random.default_rng(5))
    assert r["draft_alone"]["token_ids"] == ids
    assert ids != r["autoregressive"]["token_ids"]  # (the fixtures' two models disagree)
    assert "acceptance_rate" not in r["draft_alone"]
    speeds = [r[m]["tokens_per_second"] for m in ("autoregressive", "draft_alone", "speculative")]
    assert r["speculative_position"] == cli.position_between(*speeds)
    assert "speedup" in r and "predicted_speedup" in r  # what --mode both reports, too


def test_both_stays_as_it_was(capsys):
    assert main.main(BASE[:-1] + ["both", "--json"]) == 0
    r = strict_json(capsys.readouterr().out)
    assert "draft_alone" not in r and "speculative_position" not in r
    assert set(r) >= {"autoregressive", "speculative", "speedup", "same_tokens"}


def test_human_readable_report_has_three_blocks(capsys, timing_rule_lifted):
    assert main.main(BASE + ["--temperature", "0"]) == 0
    out = capsys.readouterr().out
    for heading in ("Autoregressive Decoding, Target Alone", "Autoregressive Decoding, Draft Alone",
                    "Speculative Decoding", "Speedup = ", "Same tokens = yes",
                    "Between the bounds: "):
        assert heading in out
    assert out.count("Text = the cat sat") == 3 and out.count(" tokens/s), after ") == 3


def test_mode_all_with_an_ngram_draft_is_an_error(capsys):
    assert main.main(BASE + ["--draft", "ngram"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--mode all" in err and "\n" not in err


@pytest.mark.parametrize("speeds, expected", [
    ((100.0, 200.0, 162.0), 0.62),  # between the bounds
    ((100.0, 200.0, 100.0), 0.0),  # at the target's speed
    ((100.0, 200.0, 80.0), -0.2),  # slower than the target alone
    ((100.0, 200.0, 250.0), 1.5),  # faster than the draft alone
])
def test_position_between_the_bounds(speeds, expected):
    assert cli.position_between(*speeds) == pytest.approx(expected)


@pytest.mark.parametrize("speeds", [
    (100.0, 100.0, 120.0),  # equal bounds: no range
    (100.0, 90.0, 95.0),  # the draft is slower than the target
    (float("nan"), 200.0, 150.0),  # an undefined speed
    (100.0, float("inf"), 150.0),
])
def test_position_is_none_without_a_range(speeds):
    assert cli.position_between(*speeds) is None
    assert json.dumps({"p": cli.position_between(*speeds)}) == '{"p": null}'


@pytest.mark.parametrize("speeds, words", [
    ((100.0, 200.0, 162.0), "speculative reaches 62% of the way from target speed (100.0 tokens/s) "
                            "to draft speed (200.0 tokens/s)"),
    ((100.0, 200.0, 80.0), "speculative is slower than the target alone (0.80x its speed)"),
    ((100.0, 200.0, 250.0), "speculative is faster than the draft alone (1.25x its speed)"),
    ((100.0, 100.0, 80.0), "none to place speculative in (draft alone 100.0 tokens/s is not "
                           "faster"),
])
def test_position_in_words(speeds, words):
    modes = ("autoregressive", "draft_alone", "speculative")
    r = {m: {"tokens_per_second": s} for m, s in zip(modes, speeds)}
    r["speculative_position"] = cli.position_between(*speeds)
    line = cli.describe_position(r)
    assert line.startswith("Between the bounds: ") and words in line


def test_mode_all_on_the_cupy_backend_gives_the_numpy_backends_tokens(capsys):
    """--backend cupy, on tests/fake_cupy.py (CuPy's API over NumPy, CUDA graphs included): the
    same tokens in all three runs as --backend numpy."""
    import fake_cupy

    runs = {}
    for backend in ("numpy", "cupy"):
        with fake_cupy.installed():
            assert main.main(BASE + ["--json", "--temperature", "0.8", "--backend", backend]) == 0
        runs[backend] = strict_json(capsys.readouterr().out)
    for mode in ("autoregressive", "draft_alone", "speculative"):
        assert runs["cupy"][mode]["token_ids"] == runs["numpy"][mode]["token_ids"]
    assert runs["cupy"]["backend"] == "cupy"


def test_the_draft_alone_run_honours_top_k_and_top_p(capsys):
    assert main.main(BASE + ["--json", "--temperature", "1.5", "--top_k", "5", "--top_p", "0.9",
                             "--seed", "3"]) == 0
    r = strict_json(capsys.readouterr().out)
    draft = gpt2.load_model(DRAFT, progress=False)
    prompt = draft.tokenizer.encode("the cat sat")
    runs = {warp: gpt2.autoregressive_sample(draft, prompt, 17, warp, np.random.default_rng(3))[0]
            for warp in (gpt2.Warp(1.5, 5, 0.9), gpt2.Warp(1.5))}
    assert r["draft_alone"]["token_ids"] == runs[gpt2.Warp(1.5, 5, 0.9)]
    assert runs[gpt2.Warp(1.5, 5, 0.9)] != runs[gpt2.Warp(1.5)]  # the test can tell them apart
