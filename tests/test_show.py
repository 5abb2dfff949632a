"""--show: colours by token kind, whole characters only while streaming, plain when not a tty."""
import io

import pytest

import main
from gpt2_numpy import show as show_module
from gpt2_numpy.show import Show, legend, strip_ansi
from gpt2_numpy.tokenizer import load_tokenizer
from conftest import FIXTURES
from test_cli import BASE, strict_loads

KINDS = ["accepted", "resampled", "bonus", "target"]
TEXT = "naïve café, 日本語 and 🙂 emoji!\nsecond line"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(FIXTURES / "tiny-4h")  # 307 tokens: most non-ASCII bytes stand alone


def render(tokenizer, ids, colour, per_call=1):
    out = io.StringIO()
    show = Show(tokenizer, out, colour=colour)
    kinds = [KINDS[i % 4] for i in range(len(ids))]
    for i in range(0, len(ids), per_call):
        show(ids[i : i + per_call], kinds[i : i + per_call])
    show.close()
    return out.getvalue()


@pytest.mark.parametrize("per_call", [1, 3])
def test_coloured_output_without_its_colours_is_the_plain_text(tokenizer, per_call):
    ids = tokenizer.encode(TEXT)
    plain, coloured = render(tokenizer, ids, False, per_call), render(tokenizer, ids, True, per_call)
    assert plain == TEXT + "\n"  # the decoded text, in full, nothing added
    assert "\x1b[" not in plain and "\x1b[32m" in coloured and "\x1b[31m" in coloured
    assert strip_ansi(coloured) == plain


def test_streaming_writes_only_whole_characters(tokenizer):
    ids = tokenizer.encode(TEXT)
    assert len(ids) > len(TEXT.encode()) / 2  # multi-byte characters are split over tokens
    out = io.StringIO()
    show = Show(tokenizer, out, colour=False)
    for i, token in enumerate(ids):
        show([token], ["target"])
        # every whole character so far, and not the bytes of one still incomplete
        whole = tokenizer.decode_bytes(ids[: i + 1]).decode("utf-8", errors="ignore")
        assert out.getvalue() == whole and TEXT.startswith(whole)
    show.close()
    assert out.getvalue() == TEXT + "\n"


def test_a_character_takes_the_colour_of_the_token_that_completed_it(tokenizer):
    e_acute = tokenizer.encode("é")
    assert len(e_acute) == 2
    out = io.StringIO()
    show = Show(tokenizer, out, colour=True)
    show(e_acute, ["accepted", "bonus"])
    assert out.getvalue() == "\x1b[36mé\x1b[0m"


def test_a_character_cut_off_at_the_end_becomes_a_replacement_mark(tokenizer):
    out = io.StringIO()
    show = Show(tokenizer, out, colour=False)
    show(tokenizer.encode("日")[:2], ["target", "target"])
    assert out.getvalue() == ""
    show.close()
    assert out.getvalue() == "\ufffd\n"


def test_control_characters_are_shown_not_obeyed(tokenizer):
    ids = tokenizer.encode("a\x1b[2Jb\rc\x7fd\te\n")
    plain, coloured = render(tokenizer, ids, False), render(tokenizer, ids, True)
    assert plain == "a\u241b[2Jb\u240dc\u2421d\te\n\n"  # tab and newline stay as they are
    assert strip_ansi(coloured) == plain


def test_legend_names_every_kind_in_its_colour():
    line = legend()
    assert "\n" not in line and "\x1b[32mdraft accepted" in line and "\x1b[31mresampled" in line
    assert "\x1b[36mbonus" in line and "plain target step" in line
    assert "\x1b" not in legend(colour=False)


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_colour_only_on_a_terminal_without_NO_COLOR(tokenizer, monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert Show(tokenizer, FakeTerminal()).colour and not Show(tokenizer, io.StringIO()).colour
    monkeypatch.setenv("NO_COLOR", "1")
    assert not Show(tokenizer, FakeTerminal()).colour
    monkeypatch.delenv("NO_COLOR")
    monkeypatch.setenv("TERM", "dumb")
    assert not Show(tokenizer, FakeTerminal()).colour


def shown_part(out):
    """What --show streamed: everything before the report's heading."""
    return out.split("\nSpeculative Decoding\n")[0]


def test_cli_show_streams_the_speculative_text(capsys, monkeypatch):
    flags = ["--mode", "speculative", "--K", "3"]
    assert main.main(BASE + flags + ["--json"]) == 0
    text = "the cat sat" + strict_loads(capsys.readouterr().out)["speculative"]["text"]
    assert main.main(BASE + flags + ["--show"]) == 0
    plain = capsys.readouterr().out  # captured: not a terminal, so no colour
    assert "\x1b[" not in plain
    assert shown_part(plain) == text.translate(show_module.PRINTABLE) + "\n"

    monkeypatch.setattr(show_module, "colour_wanted", lambda stream: True)
    assert main.main(BASE + flags + ["--show"]) == 0
    coloured = capsys.readouterr().out
    first_line, rest = coloured.split("\n", 1)
    assert strip_ansi(first_line) == legend(colour=False)
    assert "\x1b[" in rest and strip_ansi(shown_part(rest)) == shown_part(plain)
