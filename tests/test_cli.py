"""main.py as a user runs it, on the committed official-format fixtures."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import main
from gpt2_numpy import cli, download
import gpt2_numpy as gpt2
from gpt2_numpy.checkpoint import DATA_FILE, INDEX_FILE, read_index
from bench.checkpoint_writer import write_checkpoint
from gpt2_numpy.load import tree_map
from gpt2_numpy.show import PRINTABLE
from conftest import FIXTURES, ROOT

DRAFT, TARGET = str(FIXTURES / "tiny-3h"), str(FIXTURES / "tiny-4h")
BASE = ["--draft_model_size", DRAFT, "--target_model_size", TARGET, "--prompt", "the cat sat",
        "--n_tokens_to_generate", "17", "--no_progress"]


@pytest.fixture
def timing_rule_lifted(monkeypatch):
    """The fixtures decode in milliseconds, so the rule that a ratio of times needs long enough
    runs (cli.MIN_SECONDS, cli.MIN_FORWARDS) reports no speedup for them: tests of how the
    numbers are computed and printed lift it."""
    monkeypatch.setattr(cli, "MIN_SECONDS", 0.0)
    monkeypatch.setattr(cli, "MIN_FORWARDS", 0)


def strict_loads(text):
    """json.loads that, like jq or JavaScript, rejects NaN and Infinity (RFC 8259 has neither)."""
    def reject(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=reject)


def run_json(capsys, *extra):
    assert main.main(BASE + ["--json", *extra]) == 0
    out = capsys.readouterr().out
    return strict_loads(out)  # nothing but one JSON object on stdout


def test_the_strict_parser_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        strict_loads('{"acceptance_rate": NaN}')


@pytest.mark.parametrize("K", [1, 4])
def test_json_greedy_both_modes_give_the_same_tokens(capsys, K, timing_rule_lifted):
    r = run_json(capsys, "--K", str(K), "--temperature", "0")
    ar, sp = r["autoregressive"], r["speculative"]
    assert ar["token_ids"] == sp["token_ids"] and r["same_tokens"] is True
    assert len(ar["token_ids"]) == 17
    for field in ("text", "seconds", "decode_seconds", "prefill_seconds", "tokens_per_second"):
        assert field in ar and field in sp
    for field in ("rounds", "drafted", "accepted", "acceptance_rate", "tokens_per_round",
                  "accepted_histogram", "draft_seconds", "target_seconds", "K_per_round"):
        assert field in sp
    assert sum(sp["accepted_histogram"]) == sp["rounds"]
    assert sp["acceptance_rate"] == sp["accepted"] / sp["drafted"]
    assert r["speedup"] == pytest.approx(ar["decode_seconds"] / sp["decode_seconds"])
    a, c = sp["acceptance_rate"], r["c"]
    tokens = K + 1 if a == 1 else (1 - a ** (K + 1)) / (1 - a)  # the papers' expected tokens
    assert r["predicted_speedup"] == pytest.approx(tokens / (K * c + 1))


def test_sampling_is_reproducible_with_a_seed(capsys):
    flags = ("--temperature", "0.9", "--top_k", "50", "--top_p", "0.95", "--seed", "7")
    a, b = run_json(capsys, *flags), run_json(capsys, *flags)
    assert a["speculative"]["token_ids"] == b["speculative"]["token_ids"]
    assert a["autoregressive"]["token_ids"] == b["autoregressive"]["token_ids"]


def test_single_mode_reports_only_that_mode(capsys):
    r = run_json(capsys, "--mode", "speculative")
    assert "autoregressive" not in r and len(r["speculative"]["token_ids"]) == 17


REPETITIVE = "the cat sat on the mat. the cat sat on the"


@pytest.mark.parametrize("flags", [["--adaptive", "--K", "6"], ["--draft", "ngram", "--K", "5"],
                                   ["--draft", "ngram", "--adaptive", "--K", "8"]])
def test_adaptive_and_ngram_give_the_autoregressive_tokens(capsys, flags):
    r = run_json(capsys, *flags, "--prompt", REPETITIVE, "--temperature", "0")
    sp, K_max = r["speculative"], int(flags[-1])
    assert r["same_tokens"] is True and len(sp["token_ids"]) == 17
    assert r["adaptive"] == ("--adaptive" in flags) and r["K"] == K_max
    assert r["draft"] == ("ngram" if "ngram" in flags else DRAFT)
    assert all(0 <= K <= K_max for K in sp["K_per_round"])
    assert "predicted_speedup" not in r  # K varies: no fixed-K formula
    if "ngram" in flags:
        assert sp["drafted"] > 0


def test_human_readable_report_with_adaptive_ngram(capsys, timing_rule_lifted):
    assert main.main(BASE + ["--draft", "ngram", "--adaptive", "--prompt", REPETITIVE]) == 0
    out = capsys.readouterr().out
    for line in ("Drafts per round (K:rounds) = 0:", "Speedup = ", "Same tokens = yes"):
        assert line in out
    assert "the formula predicts" not in out


def test_human_readable_report(capsys):
    assert main.main(BASE + ["--K", "3"]) == 0
    out = capsys.readouterr().out
    for heading in ("Autoregressive Decoding", "Speculative Decoding", "Speedup", "acceptance rate",
                    "tokens per round", "Same tokens = yes"):
        assert heading in out
    assert out.count("Text = the cat sat") == 2


@pytest.mark.parametrize("flags", [["--n_tokens_to_generate", "1"],
                                   ["--n_tokens_to_generate", "1", "--adaptive"],
                                   ["--n_tokens_to_generate", "1", "--draft", "ngram", "--adaptive"],
                                   ["--n_tokens_to_generate", "1", "--mode", "speculative"]])
def test_json_says_null_for_a_rate_of_nothing(capsys, flags):
    """Nothing drafted: the acceptance rate is undefined, and JSON's word for it is null."""
    r = run_json(capsys, *flags)
    sp = r["speculative"]
    assert sp["drafted"] == 0 and sp["acceptance_rate"] is None
    assert "predicted_speedup" not in r and "c" not in r
    assert main.main(BASE + flags) == 0  # the report says so in words
    out = capsys.readouterr().out
    assert "nothing was drafted" in out and "nan" not in out.lower()


@pytest.mark.parametrize("flags, message", [
    (["--K", "0"], "K (draft tokens per round) must be >= 1"),
    (["--temperature", "-1"], "temperature must be a number >= 0"),
    (["--top_p", "0"], "top_p must be in (0, 1]"),
    (["--top_p", "1.5"], "top_p must be in (0, 1]"),
    (["--top_k", "0"], "top_k must be >= 1"),
    (["--n_tokens_to_generate", "0"], "must be >= 1"),
    (["--n_tokens_to_generate", "60"], "exceeds the target's context of 64 tokens"),
    (["--target_model_size", "42M"], "unknown model '42M'"),
    (["--draft_model_size", str(FIXTURES)], "a model folder needs"),
    (["--show", "--json"], "--show streams text and --json prints nothing but one JSON object"),
    (["--adaptive", "--mode", "autoregressive"], "--adaptive is about speculative decoding"),
    (["--show", "--mode", "autoregressive"], "--show is about speculative decoding"),
    (["--draft", "ngram", "--mode", "autoregressive"], "--draft ngram is about speculative"),
    (["--adaptive", "--K", "0"], "K_max (the most drafts per round) must be >= 1"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--temperature", "1e-320"], "is so small that logits / temperature overflows: use 0 for greedy"),
    (["--temperature", "inf"], "temperature must be a number >= 0"),
    (["--temperature", "nan"], "temperature must be a number >= 0"),
])
def test_bad_flags_exit_2_with_one_line(capsys, flags, message):
    assert main.main(BASE + flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_a_real_process_exits_2_without_a_traceback(tmp_path):
    # the last case asks for 124M with an empty cache and no server: the "no network" error
    env = {**os.environ, "GPT2_MODELS_DIR": str(tmp_path), "GPT2_BASE_URL": "http://127.0.0.1:9"}
    for flags in (["--K", "-3"], ["--temperature", "-0.5"], ["--seed", "-1"],
                  ["--target_model_size", "124M", "--mode", "autoregressive"]):
        proc = subprocess.run([sys.executable, str(ROOT / "main.py"), *BASE, *flags],
                              capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: ")
        assert proc.stdout == ""


def test_cupy_backend_without_cupy_or_gpu_is_a_clear_error(capsys):
    try:
        import cupy  # noqa: F401

        cupy.cuda.runtime.getDeviceCount()
        pytest.skip("a usable GPU is present: tests/test_cupy.py covers --backend cupy")
    except Exception:
        pass
    assert main.main(BASE + ["--backend", "cupy"]) == 2
    err = capsys.readouterr().err
    assert "cupy" in err.lower() and "\n" not in err.strip()


def test_models_dir_that_is_a_file_is_named(capsys, tmp_path):
    not_a_folder = tmp_path / "weights.txt"
    not_a_folder.write_text("")
    assert main.main(BASE + ["--target_model_size", "124M", "--models_dir", str(not_a_folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert f"{not_a_folder} is a file, not a folder" in err and "network" not in err
    assert not_a_folder.read_text() == ""  # left alone


@pytest.mark.parametrize("n_vocab", [300, 400])
def test_n_vocab_that_disagrees_with_the_tokenizer_is_named_at_load(capsys, tmp_path, n_vocab):
    """A checkpoint consistent with its hparams.json, next to a 307-token tokenizer."""
    folder = tmp_path / f"vocab{n_vocab}"
    h = {**gpt2.load_hparams(FIXTURES / "tiny-4h"), "n_vocab": n_vocab}
    write_checkpoint(folder, h, gpt2.random_params(h, scale=0.5))
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(FIXTURES / "tiny-4h" / name, folder)
    with pytest.raises(gpt2.GPT2Error, match=f"n_vocab {n_vocab} but the tokenizer"):
        gpt2.load_model(str(folder), progress=False)
    assert main.main(BASE + ["--target_model_size", str(folder), "--mode", "autoregressive"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "307 tokens" in err


def flip_bytes(folder, tensor, offsets=(1000, 1007, 1014, 1021)):
    """Invert 4 bytes of one tensor in the data file, as a bad disk or mirror might."""
    entry = read_index(folder / INDEX_FILE)[tensor]
    data = bytearray((folder / DATA_FILE).read_bytes())
    for offset in offsets:
        data[entry.offset + offset] ^= 0xFF
    (folder / DATA_FILE).write_bytes(bytes(data))
    return bytes(data)


def damaged_copy(tmp_path, tensor="model/h2/mlp/c_proj/w"):
    folder = tmp_path / "damaged"
    shutil.copytree(FIXTURES / "tiny-4h", folder, ignore=shutil.ignore_patterns("crc32c-*"))
    return folder, flip_bytes(folder, tensor)


def test_flipped_bytes_are_caught_on_first_load_and_named(capsys, tmp_path):
    folder, damaged = damaged_copy(tmp_path)
    assert main.main(BASE + ["--target_model_size", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "model/h2/mlp/c_proj/w" in err and str(folder / DATA_FILE) in err
    assert (folder / DATA_FILE).read_bytes() == damaged  # nothing deleted or changed


def test_verify_checks_again_what_was_recorded(capsys, tmp_path):
    """A record keyed by size and mtime is trusted (a later load reads nothing): damage that
    keeps both slips past it, and --verify, which ignores the record, catches it."""
    folder = tmp_path / "model"
    shutil.copytree(FIXTURES / "tiny-4h", folder, ignore=shutil.ignore_patterns("crc32c-*"))
    assert main.main(BASE + ["--target_model_size", str(folder), "--json"]) == 0
    capsys.readouterr()
    stat = (folder / DATA_FILE).stat()
    flip_bytes(folder, "model/wte")
    os.utime(folder / DATA_FILE, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the same mtime again
    assert main.main(BASE + ["--target_model_size", str(folder), "--json"]) == 0
    capsys.readouterr()
    assert main.main(BASE + ["--target_model_size", str(folder), "--verify"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "model/wte" in err and "\n" not in err


def test_text_lines_show_control_characters_instead_of_sending_them(capsys):
    """Random weights at a high temperature write ESC, BEL and other controls. --json keeps
    the exact text (JSON escapes it); the report's Text = lines show every control character
    but newline and tab as a symbol."""
    for seed in range(40):
        flags = ["--temperature", "3", "--seed", str(seed), "--mode", "autoregressive"]
        text = run_json(capsys, *flags)["autoregressive"]["text"]
        if any(ord(c) < 32 and c not in "\t\n" or 0x7F <= ord(c) < 0xA0 for c in text):
            break
    else:
        pytest.fail("no seed in 40 gave a control character: choose another prompt")
    assert main.main(BASE + flags) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.split("\n") if line.startswith("Text = "))
    assert line.startswith("Text = the cat sat")
    assert not any(ord(c) < 32 and c != "\t" or 0x7F <= ord(c) < 0xA0 for c in line)
    assert ("the cat sat" + text).translate(PRINTABLE).split("\n")[0] in line


def test_print_report_shows_every_control_character():
    r = {"prompt": "p", "adaptive": False, "draft": None, "temperature": 1.0,
         "autoregressive": {"decode_seconds": 1.0, "tokens_per_second": 1.0, "n_generated": 1,
                            "prefill_seconds": 0.0, "stopped_at_context": False,
                            "text": "".join(map(chr, range(0xA0))) + "\x1b]0;title\x07"}}
    out = io_of(cli.print_report, r)
    text = out.split("Text = ", 1)[1].split("\n\n")[0]
    assert not any(ord(c) < 32 and c not in "\t\n" or 0x7F <= ord(c) < 0xA0 for c in text)
    assert "\t" in text and "\u241b]0;title\u2407" in text


def io_of(fn, *args):
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        fn(*args)
    return buffer.getvalue()


@pytest.mark.parametrize("flags", [["--K", "1.5"], ["--temprature", "1"], ["--mode", "fast"]])
def test_a_flag_argparse_rejects_is_one_line_too(capsys, flags):
    with pytest.raises(SystemExit) as exit_:
        main.main(BASE + flags)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--help" in err


@pytest.mark.parametrize("flags", [["--show"], ["--json"], []])
def test_a_closed_pipe_ends_quietly(flags):
    """`python main.py ... | head -c 1`: the reader is gone before the output is written."""
    read, write = os.pipe()
    os.close(read)  # every write to the pipe now fails with EPIPE
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), *BASE, *flags],
                          stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write)
    assert proc.returncode in (0, 141) and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr == ""


def test_repair_advice_fits_where_the_folder_came_from(capsys, tmp_path):
    folder, _ = damaged_copy(tmp_path)  # a folder the user names: nothing would re-download it
    assert main.main(BASE + ["--target_model_size", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "replace it with an intact copy" in err and "run again" not in err
    cache = tmp_path / "cache"  # the same damage in a size's download folder
    shutil.copytree(folder, cache / "124M")
    assert main.main(BASE + ["--target_model_size", "124M", "--models_dir", str(cache)]) == 2
    err = capsys.readouterr().err
    assert "delete it and run again to re-download" in err and "replace it" not in err


def test_an_invalid_utf8_prompt_is_shown_as_it_was_fed():
    """The shell hands over bytes; \\xff is not UTF-8, is tokenized as U+FFFD, and is shown so."""
    argv = [sys.executable.encode(), str(ROOT / "main.py").encode(),
            *[a.encode() for a in BASE if a != "the cat sat"]]
    argv[argv.index(b"--prompt") + 1 : argv.index(b"--prompt") + 1] = [b"the c\xffat"]
    proc = subprocess.run(argv, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode("utf-8")  # valid UTF-8: no raw byte echoed back
    texts = [line for line in out.split("\n") if line.startswith("Text = ")]
    assert len(texts) == 2 and all(line.startswith("Text = the c\ufffdat") for line in texts)
    r = strict_loads(subprocess.run(argv + [b"--json"], capture_output=True, timeout=120).stdout)
    tokenizer = gpt2.load_model(TARGET, progress=False).tokenizer
    assert r["prompt"] == "the c\ufffdat" == tokenizer.decode(r["prompt_token_ids"])


def test_c_is_the_cost_ratio_of_one_forward(capsys, timing_rule_lifted):
    """c compares one draft forward with one target forward: a round makes K draft forwards and
    one target forward, so the ratio of the two totals would be K times too large."""
    r = run_json(capsys, "--K", "4")
    ar, sp = r["autoregressive"], r["speculative"]
    assert r["c"] == pytest.approx((sp["draft_seconds"] / sp["draft_calls"])
                                   / (ar["target_seconds"] / ar["target_calls"]))
    assert sp["draft_calls"] >= 2 * ar["target_calls"]  # the fixtures' draft is rarely right,
    totals = sp["draft_seconds"] / ar["target_seconds"]  # so the ratio of the totals differs
    assert abs(r["c"] - totals) > 0.2 * r["c"]


# --- bad input: one line, and before anything is loaded -------------------------------------------

@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("flags", [[], ["--json"], ["--show"]])
def test_a_full_disk_is_one_line_without_a_traceback(flags):
    """`python main.py ... > /dev/full`: every write to stdout fails with ENOSPC."""
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, str(ROOT / "main.py"), *BASE, *flags],
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: cannot write the output: No space left on device")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def write_model(folder, source, **hparams):
    """A copy of the fixture `source` with other hparams (a shorter context: wpe's first rows)."""
    h = {**gpt2.load_hparams(source), **hparams}
    params = gpt2.load_model(str(source), progress=False).params
    write_checkpoint(folder, h, {**params, "wpe": params["wpe"][: h["n_ctx"]]})
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(source / name, folder)
    return str(folder)


@pytest.fixture(scope="module")
def short_draft(tmp_path_factory):
    """tiny-3h with a context of 32 tokens, half the target's."""
    return write_model(tmp_path_factory.mktemp("short") / "draft32", FIXTURES / "tiny-3h", n_ctx=32)


@pytest.mark.parametrize("flags", [[], ["--mode", "all"], ["--tree", "2,2"], ["--adaptive"]])
def test_a_draft_with_a_shorter_context_is_named(capsys, short_draft, flags):
    argv = BASE + ["--draft_model_size", short_draft, "--n_tokens_to_generate", "40", *flags]
    assert main.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "the draft's context of 32 tokens" in err and f"--draft_model_size {short_draft}" in err


def test_a_tree_that_would_overrun_a_shorter_draft_context_is_named(capsys, short_draft):
    """The prompt (6 tokens) and 26 new ones fit in the draft's 32 positions, but a tree is
    drafted beyond the committed tokens."""
    argv = BASE + ["--draft_model_size", short_draft, "--n_tokens_to_generate", "26"]
    assert main.main(argv + ["--json", "--mode", "speculative"]) == 0  # a chain fits
    capsys.readouterr()
    assert main.main(argv + ["--tree", "2,2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: a tree of widths [2, 2]") and "\n" not in err
    assert "the draft's context of 32 tokens" in err


@pytest.mark.parametrize("flag", ["--target_model_size", "--draft_model_size"])
@pytest.mark.parametrize("name", ["", " "])
def test_an_empty_model_name_names_the_flag(capsys, flag, name):
    assert main.main(BASE + [flag, name]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {flag}") and "a size (124M, 355M" in err and "\n" not in err
    assert "missing" not in err  # not read as the current folder


NEED_NO_MODEL = [  # flags and the words of their error, which needs no model to find
    (["--prompt", ""], "--prompt is empty"),
    (["--K", "3", "--tree", "2,2"], "--K is a chain's drafts per round"),
    (["--K", "3", "--mode", "autoregressive"], "--K is about speculative decoding"),
    (["--tree", "2,2", "--mode", "autoregressive"], "--tree is about speculative decoding"),
    (["--top_k", "5"], "--top_k filters what is sampled, but --temperature 0"),
    (["--top_p", "0.9", "--temperature", "0"], "--top_p filters what is sampled"),
    (["--tree", "2,x"], "--tree takes integers"),
    (["--tree", "2,2", "--adaptive"], "--tree and --adaptive do not go together"),
    (["--n_tokens_to_generate", "1024"], "leaves no room for the prompt in the context of 1024"),
    (["--draft_model_size", ""], "--draft_model_size is empty"),
    (["--draft_model_size", "42M"], "--draft_model_size: unknown model '42M'"),
    (["--K", "0"], "K (draft tokens per round) must be >= 1"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--show", "--json"], "--show streams text"),
    (["--mode", "all", "--draft", "ngram"], "--mode all also runs the draft model alone"),
]


@pytest.mark.parametrize("flags, message", NEED_NO_MODEL)
def test_what_needs_no_model_is_refused_before_anything_is_downloaded(capsys, monkeypatch, tmp_path,
                                                                      flags, message):
    """The target is 124M in an empty cache, and the server is unreachable: a check made after
    the download would say 'could not download' instead, and a check made after loading would
    never be reached."""
    monkeypatch.setenv("GPT2_BASE_URL", "http://127.0.0.1:9")
    argv = BASE + ["--target_model_size", "124M", "--models_dir", str(tmp_path), *flags]
    assert main.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert list(tmp_path.iterdir()) == []  # nothing was downloaded, nor a folder made for it


def test_the_download_check_above_sees_a_late_check(capsys, monkeypatch, tmp_path):
    """The control: a mistake only a loaded model shows (the prompt is too long for its
    context) is reported as the download's failure."""
    monkeypatch.setenv("GPT2_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setattr(download, "BACKOFF_S", 0.0)  # no waiting between the refused attempts
    argv = BASE + ["--target_model_size", "124M", "--models_dir", str(tmp_path),
                   "--prompt", "word " * 1020]
    assert main.main(argv) == 2
    assert "could not download" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--K", "5"], ["--K", "5", "--adaptive"], ["--top_k", "5",
                                   "--temperature", "1"], ["--top_p", "0.5", "--temperature", "1"],
                                   ["--tree", "2,2", "--mode", "all"]])
def test_the_flags_refused_elsewhere_are_accepted_where_they_count(capsys, flags):
    assert main.main(BASE + ["--json", *flags]) == 0
    r = strict_loads(capsys.readouterr().out)
    assert r["K"] == (None if "--tree" in flags else 5 if "--K" in flags else 4)


# --- numbers a user can trust ------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["both", "all"])
def test_runs_too_short_to_measure_report_no_ratio_of_times(capsys, mode):
    """8 tokens: fewer than 10 forwards in every run, however slow the machine: no speedup, c,
    prediction or position, and the report says why, in the text and in the JSON."""
    flags = ["--mode", mode, "--K", "3", "--n_tokens_to_generate", "8"]
    r = run_json(capsys, *flags)
    measured = ["speedup", "c", "predicted_speedup"] + (["speculative_position"] if mode == "all" else [])
    for name in measured:
        assert r[name] is None and r["why_null"][name].startswith(("too short", "c is too short"))
    assert "0.05 s and 10 forwards" in r["why_null"]["speedup"]
    assert "the target alone: " in r["why_null"]["speedup"] and ", 8 forwards" in r["why_null"]["speedup"]
    assert main.main(BASE + flags) == 0
    out = capsys.readouterr().out
    assert "Speedup: none to report, too short to measure (the target alone: " in out
    assert "Prediction: none, c is too short to measure" in out
    assert "Speedup = " not in out and "predicts" not in out
    if mode == "all":
        assert "Between the bounds: none to report, too short to measure" in out


def sides(seconds, forwards):
    return {"the target alone": (seconds, forwards), "speculative decoding": (1.0, 50)}


@pytest.mark.parametrize("seconds, forwards, short", [
    (1.0, 50, False), (0.05, 10, False), (0.049, 50, True), (1.0, 9, True), (0.0, 0, True),
    (float("nan"), 50, True)])
def test_the_rule_for_a_time_long_enough_to_measure(seconds, forwards, short):
    why = cli.too_short(sides(seconds, forwards))
    assert (why is not None) == short
    if short:
        assert why.startswith("too short to measure (the target alone: ")
        assert "speculative decoding" not in why  # only the short side is named


def test_the_prediction_uses_the_K_the_rounds_used(capsys, timing_rule_lifted):
    """--K 100000 for 5 tokens: no round drafts more than the 4 tokens left after its bonus."""
    flags = ["--K", "100000", "--n_tokens_to_generate", "5"]
    r = run_json(capsys, *flags)
    sp, K = r["speculative"], max(r["speculative"]["K_per_round"])
    assert K == 4 and r["K"] == 100000  # the flag, as given; the rounds used 4 at most
    a = sp["acceptance_rate"]
    assert r["predicted_speedup"] == pytest.approx((1 - a ** (K + 1)) / (1 - a) / (K * r["c"] + 1))
    assert main.main(BASE + flags) == 0
    out = capsys.readouterr().out
    assert f", K={K}, c=" in out and "K=100000" not in out


@pytest.fixture(scope="module")
def near_draft(tmp_path_factory):
    """tiny-4h with its weights moved by 1% of their scale: a draft the target often accepts."""
    rng = np.random.default_rng(1)
    target = gpt2.load_model(TARGET, progress=False)
    params = tree_map(lambda a: a + np.float32(0.01) * rng.standard_normal(a.shape, dtype=np.float32),
                      target.params)
    folder = tmp_path_factory.mktemp("near") / "near"
    write_checkpoint(folder, target.hparams, params)
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(FIXTURES / "tiny-4h" / name, folder)
    return str(folder)


ROUNDS_LINE = re.compile(r"Rounds = (\d+), drafted (\d+), accepted (\d+) \(acceptance rate "
                         r"([0-9.]+)\), ([0-9.]+) tokens per round")


@pytest.mark.parametrize("draft, temperature", [(TARGET, "0"), ("near", "1")])
def test_the_printed_acceptance_rate_is_accepted_per_drafted_token(capsys, near_draft, draft,
                                                                     temperature):
    """The target as its own draft (every draft accepted) and a near copy at T = 1 (some)."""
    flags = ["--draft_model_size", near_draft if draft == "near" else draft, "--K", "4",
             "--temperature", temperature, "--n_tokens_to_generate", "40", "--mode", "speculative"]
    sp = run_json(capsys, *flags)["speculative"]
    assert sp["accepted"] / sp["drafted"] != pytest.approx(sp["accepted"] / sp["rounds"], abs=0.01)
    if draft == TARGET:
        assert sp["accepted"] == sp["drafted"]
    else:
        assert 0.2 < sp["acceptance_rate"] < 0.8
    assert main.main(BASE + flags) == 0
    rounds, drafted, accepted, rate, per_round = ROUNDS_LINE.search(capsys.readouterr().out).groups()
    assert (int(rounds), int(drafted), int(accepted)) == (sp["rounds"], sp["drafted"], sp["accepted"])
    assert rate == f"{int(accepted) / int(drafted):.2f}"
    assert per_round == f"{40 / int(rounds):.2f}"


@pytest.mark.parametrize("flags", [["--n_tokens_to_generate", "1"],
                                   ["--n_tokens_to_generate", "1", "--draft", "ngram", "--adaptive"]])
def test_a_run_that_drafted_nothing_prints_no_speedup(capsys, timing_rule_lifted, flags):
    """With every time measurable, the text report still has no speedup to give."""
    r = run_json(capsys, *flags)
    assert r["speculative"]["drafted"] == 0 and r["speedup"] is None
    assert r["why_null"] == {"speedup": "nothing was drafted (every round was a plain target step)"}
    assert main.main(BASE + flags) == 0
    out = capsys.readouterr().out
    assert "Speedup: none to report, nothing was drafted" in out and "Speedup = " not in out


# --- --help -------------------------------------------------------------------------------------------

def test_every_flag_has_a_help_text_that_gives_its_default(capsys):
    with pytest.raises(SystemExit) as exit_:
        main.main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    actions = [a for a in cli.make_parser()._actions if a.dest != "help"]
    assert len(actions) == 21
    for action in actions:
        assert action.help and "(default: " in action.help, action.option_strings
        assert action.option_strings[0] in text
    assert text.count("(default: ") == len(actions)
    assert ("a node at depth d - 1 gets up to W_d children, the root (the newest committed "
            "token) being depth 0") in text
    for default in ("(default: 4)", "(default: 60)", "(default: 355M)", "(default: 124M)",
                    "(default: model)", "(default: both)", "(default: 'Alan Turing"):
        assert default in text


def test_main_py_is_the_comparison_a_learner_reads():
    """main.py: load, decode from one seed, report, in at most 150 lines; what a user can get
    wrong and the report's wording live in gpt2_numpy/cli.py."""
    source = (ROOT / "main.py").read_text()
    assert len(source.splitlines()) <= 150
    for step in ("tune_process()", "cli.check(args)", "load_models", "default_rng(args.seed)",
                 "autoregressive_sample(target", "speculative_sample(target", "make_report"):
        assert step in source
