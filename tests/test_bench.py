"""bench/: the command dispatcher, the CPU run's sections on a tiny model, the summary and the
figures drawn from what they measured, and a worker in a fresh process."""
import json

import pytest

from bench.__main__ import COMMANDS
from bench.__main__ import main as bench_main
from conftest import tiny_model


def test_every_command_is_listed_and_an_unknown_one_is_a_one_line_error(capsys):
    assert bench_main(["--help"]) == 0
    listing = capsys.readouterr().out
    for name in COMMANDS:  # each command's module imports, and its docstring says what it does
        assert f"  {name} " in listing
    assert bench_main(["nonsense"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown command 'nonsense'") and "\n" not in err
    assert bench_main([]) == 2  # no command: the listing, on stderr


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """r(T), the breakdown and the no-cache table of a tiny model, saved as `bench cpu` saves."""
    from bench.floor import breakdown
    from bench.machine import machine_info
    from bench.no_cache import no_cache
    from bench.report import save
    from bench import timing
    from bench.threads import threads_section
    from bench.verify import r_by_strategy, r_of_T

    timing.TRIES, tries = 1, timing.TRIES  # no retries on a busy machine: only shapes are checked
    from gpt2_numpy.products import Products, planned

    model = tiny_model(seed=0)
    products = Products({1: "one", 2: "rows", 3: "pad8"})  # a plan of its own: what is reported
    model.params = planned(model.params, products)
    rows, t1, t2 = r_of_T(model, "random", 8, [1, 2, 3], reps=1)
    res = {"command": "test", "machine": machine_info(), "total_seconds": 0.0, "r_of_T": rows,
           "c": 1.0, "c2": t2 / t1, "breakdown": breakdown(model, "random", 8, 4, gbps=10.0),
           "no_cache": no_cache(model, "random", [4, 8], reps=1),
           "strategies": r_by_strategy(model, "random", 8, [1, 2, 3], reps=1),
           "threads": threads_section([(model, "random")], 8, 2, 1, min_seconds=0.01),
           "plans": {model.name: {"plan": repr(products), "warm_up_seconds": 0.0}}}
    timing.TRIES = tries
    out = tmp_path_factory.mktemp("bench_out")
    save(res, out)
    return out


def test_the_sections_fill_the_summary_and_the_csvs(measured):
    res = json.loads((measured / "bench.json").read_text())
    assert [r["T"] for r in res["r_of_T"]] == [1, 2, 3] and res["r_of_T"][0]["r"] == 1.0
    parts = {r["part"] for r in res["breakdown"]}
    assert {"matmul c_attn", "layer norms", "total (instrumented)"} <= parts
    assert [r["position"] for r in res["no_cache"]] == [4, 8]
    assert [(r["T"], r["plan"]) for r in res["strategies"]] == [(1, "one"), (2, "rows"), (3, "pad8")]
    assert all(r["r_rows"] > 0 and r["r_padded"] > 0 for r in res["strategies"])
    if isinstance(res["threads"], list):  # threadpoolctl installed
        assert {(r["part"], r["threads"]) for r in res["threads"]} >= {
            ("decoding step", 1), ("decoding step", 2), ("LM head [d, V] (wte.T)", 2),
            ("LM head in two halves on two Python threads, 1 BLAS thread each", 1)}
    summary = (measured / "summary.md").read_text()
    for heading in ("### r(T)", "### Where a decoding step's time goes", "### ms/token without",
                    "### r(T) three ways", "### The products' plans"):
        assert heading in summary
    assert (measured / "r_of_T.csv").read_text().startswith("model,weights,T,")


def test_the_figures_are_drawn_from_the_saved_json(measured, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from bench.__main__ import main

    assert main(["plot", str(measured), "--img", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no_cache.png", "r_of_T.png"]
    assert (tmp_path / "r_of_T.png").read_bytes()[:4] == b"\x89PNG"


def test_nothing_to_plot_is_a_one_line_error(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from bench.plot import main

    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("error: nothing to plot")


def test_a_worker_runs_in_a_fresh_process_and_reports_one_json_line():
    from bench.workers import run_worker

    # Without torch the transformers worker says so (and with it, it measures nothing here).
    out = run_worker("transformers", {"sizes": [], "threads": 1, "prompt": 1, "tokens": 2,
                                      "reps": 1})
    assert "skipped" in out or out.get("rows") == [], out


def test_gpu_check_without_a_gpu_is_a_one_line_error(capsys, monkeypatch):
    import sys

    from bench import gpu_check

    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` now fails, as without CuPy
    assert gpu_check.main(["--out", "unused"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the GPU check needs CuPy") and "\n" not in err


def test_gpu_check_report_states_every_goal_and_each_measured_value(tmp_path):
    """The summary a GPU check writes: the goal table first, every goal with its measurement
    (or '-' where a section did not run), then each section's rows."""
    from bench import gpu_check

    decode = [{"size": s, "forward": "fused, graphs", "dtype": d, "ms_per_token": ms,
               "floor_ms": floor, "ratio_to_floor": ms / floor, "same_tokens_as_unfused_fp32": True}
              for s, d, ms, floor in [("124M", "float32", 0.7, 0.165), ("355M", "float32", 1.4, 0.47),
                                      ("355M", "float16", 1.2, 0.235), ("355M", "bfloat16", 1.1, 0.235)]]
    res = {"command": "test", "gpu": "a GPU", "sections": {"peer": "skipped"}, "decode": decode,
           "speculative": [{"pair": "p", "K": K, "ar_ms_per_token": 4.0, "ms_per_token": 4.0 / x,
                            "speedup": x} for K, x in [(1, 1.4), (7, 2.7), (8, 2.6)]]}
    situation = lambda title, tps: {"title": title, "rows": [  # noqa: E731
        {"K": K, "stake": stake, "tps": t}
        for (K, stake), t in zip([(0, None), (1, None), (2, None), ("adaptive", 1.0),
                                  ("adaptive", 0.5)], tps)]}
    res["adaptive"] = {"situations": [  # rows: autoregressive, K = 1, 2, adaptive, stake 0.5
        situation("draft == target (scripted, acceptance 1)", [700, 800, 900, 880, 870]),
        situation("perturbed target (scripted, 10% of drafts wrong)", [700, 800, 760, 720, 784]),
        situation("unrelated random 124M draft", [700, 400, 300, 672, 665])]}
    gpu_check.write(res, tmp_path)
    md = (tmp_path / "gpu_check.md").read_text()
    table = md.split("## ")[0]
    assert "| 355M fp32 decode ms/token / floor | <= 2.5 | 2.98 (1.400 ms, floor 0.470 ms) |" in table
    assert "| 124M fp32 decode ms/token / floor | <= 3.5 | 4.24" in table
    assert "| ours / transformers static cache, 355M fp32 | <= 0.4 | - |" in table  # not measured
    assert "| 355M bfloat16 decode / its floor | <= 3 | 4.68 |" in table
    assert "2.70x (K=7)" in table
    assert ("| adaptive K, perturbed target (scripted, 10% of drafts wrong) | >= 0.95 of the best "
            "| 1.03x autoregressive, 0.90 of the best |") in table
    assert ("| adaptive K, unrelated random 124M draft | >= 0.95x autoregressive "
            "| 0.96x autoregressive, 0.96 of the best |") in table
    assert ("| adaptive K, perturbed target (scripted, 10% of drafts wrong), stake 0.5 | >= 0.95 "
            "of the best | 1.12x autoregressive, 0.98 of the best |") in table
    assert "draft == target" not in table  # no goal for it
    assert json.loads((tmp_path / "gpu_check.json").read_text())["decode"] == decode


def test_host_times_every_decoder_at_both_temperatures_in_both_malloc_settings(tmp_path, capsys):
    from bench.host import main

    assert main(["--tokens", "12", "--reps", "1", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "host.json").read_text())
    for setting in ("malloc_kept", "glibc_default"):
        rows = res[setting]
        assert [(r["decoder"], r["temperature"]) for r in rows] == [
            (d, t) for t in (0.0, 1.0) for d in ("autoregressive", "plain rounds", "policy", "adaptive")]
        assert all(r["us_per_token"] > 0 for r in rows)
        assert rows[1]["K_per_round"] == [12]  # every round plain
    assert "| plain rounds | 1 |" in capsys.readouterr().out
    assert main(["--tokens", "2000"]) == 2  # past the null model's context: one line
    assert capsys.readouterr().err.startswith("error: --tokens")


def test_gpu_check_runs_the_shape_tests_first_and_reports_them(tmp_path, monkeypatch):
    """python -m bench gpu-check on the fake CuPy, every section skipped but the first: it runs
    tests/test_cupy_shapes.py in a fresh process (no GPU there: all skipped) and the report says
    so. The whole check on the fake is a hand check: `python tests/fake_cupy.py -m bench
    gpu-check ...` (docs/gpu.md)."""
    import fake_cupy

    with fake_cupy.installed():
        from bench import gpu_check

        monkeypatch.setattr(gpu_check, "bandwidth", lambda: {"gemv_GB_per_s": 1.0, "copy_GB_per_s": 1.0})
        rest = "tests,decode,peer,r_of_T,speculative,overhead,kernels,adaptive,anchor,host"
        assert gpu_check.main(["--out", str(tmp_path), "--skip", rest]) == 0
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(res["sections"]) == ["shapes"] + rest.split(",")
    assert res["sections"]["shapes"].startswith("ok")
    assert res["shapes"]["returncode"] == 0 and "skipped" in res["shapes"]["summary"]
    assert "## shapes" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.parametrize("args, message", [(["--reps", "0"], "--reps must be at least 1"),
                                           (["--size", "1B"], "--size must be one of")])
def test_bench_products_bad_input_is_a_one_line_error(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_main(["products", *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1


MEDUSA_TRAINING = {"T = 1": dict(tokens=96, temperature=1.0, length=24, epochs=2, lr=1e-3,
                                 prompts=False),
                   "memorised": dict(temperature=0.0, length=None, epochs=3, lr=1e-2,
                                     prompts=True)}
MEDUSA_SHAPES = [(1, 1), (2, 1)]


@pytest.fixture(scope="module")
def medusa_res():
    """python -m bench medusa's measurement on a tiny configuration: two short trainings (one on
    sampled text, one memorising the prompts' greedy text), two shapes, two prompts, the costs
    from the documents."""
    from bench import medusa

    training = {name: dict(t, length=t["length"] or medusa.PROMPT_LENGTH + 6)
                for name, t in MEDUSA_TRAINING.items()}
    res = medusa.measure(2, 6, 1, lambda *a: None, cpu="performance.md", heads_cost="estimate",
                         shapes=MEDUSA_SHAPES, training=training)
    res.update(command="test", machine={"cpu": "test"})
    return res


def test_bench_medusa_measures_trains_and_tables_on_a_tiny_configuration(medusa_res, tmp_path,
                                                                          capsys, monkeypatch):
    """The JSON holds every drafter at both temperatures with its tau and both predictions,
    greedy text equal to the target's, and the tables come out (the figure: the next test);
    then the heads' timed cost on a tiny shape."""
    from bench import medusa

    assert "medusa" in COMMANDS and bench_main(["--help"]) == 0
    assert "  medusa " in capsys.readouterr().out
    training, shapes, res = MEDUSA_TRAINING, MEDUSA_SHAPES, medusa_res
    drawn = []
    monkeypatch.setattr(medusa, "plot", lambda res, path: drawn.append(path))
    medusa.write(res, tmp_path / "out", tmp_path / "img")
    assert drawn == [tmp_path / "img" / "medusa.png"]
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "medusa.json").read_text())

    assert list(saved["training"]) == ["T = 1", "memorised"]
    for name, record in saved["training"].items():
        assert [s["head"] for s in record["heads"]] == [0, 1, 2, 3, 4]  # the LM head, 4 heads
        assert len(record["epochs_loss"]) == training[name]["epochs"]
        assert record["untrained_training"] > 0 and record["untrained_held_out"] > 0
        for s in record["heads"]:
            for when in ("before", "after"):
                assert s[when]["rows"] > 0 and 0 <= s[when]["top1"] <= s[when]["top"] <= 1
    memorised = saved["training"]["memorised"]
    assert memorised["after_prompts"] and memorised["held_out_also_trained_on"] == \
        memorised["held_out_sequences"]  # greedy text after the same prompts: all seen
    drafters = ["Medusa, untrained", "Medusa, T = 1", "Medusa, memorised",
                "draft model: unrelated (tiny-3h)", "draft model: near (noise 0.01)",
                "draft model: noisier (noise 0.02)", medusa.NGRAM]
    assert [(r["drafter"], r["temperature"], tuple(r["widths"])) for r in saved["rows"]] == [
        (d, T, s) for d in drafters for T in (0.0, 1.0) for s in shapes]
    for r in saved["rows"]:
        assert r["tau"] >= 1 and r["tokens"] == 2 * 6 and r["rounds"] * r["tau"] == r["tokens"]
        assert r["speedup this CPU"] > 0 and r["speedup H100"] > 0  # 3 and 4 rows: both known
        assert r.get("same_as_target", True) is True  # greedy: the target's own text
    heads = saved["costs"]["heads"]
    assert set(heads) == {"this CPU", "H100"} and all(m["h"] > 0 for m in heads.values())
    for heading in ("Training (4 heads", "Held out, per head", "Tokens per target forward, T = 0",
                    "Tokens per target forward, T = 1", "Predicted speedup", "Costs,"):
        assert heading in printed
    assert "| Medusa, memorised | 0 |" in printed and "| 2,1 |" in printed

    # The live path: timed on a tiny shape (one sample each, no waiting for a quiet machine).
    import time

    from conftest import tiny_hparams

    def one_sample(fn, tries):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start, 0.0

    monkeypatch.setattr(medusa, "quiet_sample", one_sample)

    measured = medusa.heads_cost_measured(2, 1, lambda *a: None, n_past=4,
                                          hparams=tiny_hparams())
    assert measured["verify_rows"] == 3 and measured["h"] > 0
    assert {"heads_ms", "target_ms_T1", "verify_plain_ms", "verify_heads_ms",
            "verify_extra"} <= set(measured)


def test_bench_medusa_draws_its_figure(medusa_res, tmp_path):
    pytest.importorskip("matplotlib")
    from bench import medusa

    medusa.plot(medusa_res, tmp_path / "medusa.png")
    assert (tmp_path / "medusa.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_medusa_prices_each_round_by_what_it_drafted():
    """A round's cost in target forwards: a plain round (nothing drafted: Medusa's first, an
    n-gram miss) is one r(1) forward, heads or not; a Medusa round adds h; a draft model's adds
    c times its forwards, one per depth over the nodes above."""
    from bench.medusa import predicted_speedup

    costs = {"r_target": lambda T: {1: 1.0, 3: 1.5, 5: 2.0, 7: 2.5}.get(T), "c": 0.5,
             "r_draft": lambda T: {1: 1.0, 2: 1.2}.get(T), "heads": 0.25}
    run = {"tokens": 9, "nodes_per_round": [0, 4, 4]}  # chain K = 4: a plain round, two drafts
    assert predicted_speedup("medusa", (1, 1, 1, 1), run, costs) == 9 / (1.0 + 2 * (2.0 + 0.25))
    assert predicted_speedup("ngram", (1, 1, 1, 1), run, costs) == 9 / (1.0 + 2 * 2.0)
    assert predicted_speedup("model", (1, 1, 1, 1), run, costs) == 9 / (1.0 + 2 * (2.0 + 0.5 * 4))
    tree = {"tokens": 7, "nodes_per_round": [6, 2]}  # 2,2: 6 nodes; cut near the end to 2
    assert predicted_speedup("model", (2, 2), tree, costs) == \
        7 / ((2.5 + 0.5 * (1.0 + 1.2)) + (1.5 + 0.5 * 1.0))
    assert predicted_speedup("medusa", (2, 2, 2), {"tokens": 5, "nodes_per_round": [14]},
                             costs) is None  # r(15) unknown: no prediction
