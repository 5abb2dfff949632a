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


# Characters a terminal obeys beyond the C0 and C1 controls: Unicode's Bidi_Control set, which
# reorders the rest of a line (U+202E shows "abc" as "cba"), and the line and paragraph
# separators, which end one (some terminals start a new line at U+2028).
REORDER_OR_BREAK = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029"


def test_characters_that_reorder_or_break_a_line_are_shown_by_their_code_point():
    shown = show_module.visible("".join(f"{c}x" for c in REORDER_OR_BREAK))
    assert not set(shown) & set(REORDER_OR_BREAK)
    assert shown == "".join(f"<U+{ord(c):04X}>x" for c in REORDER_OR_BREAK)


@pytest.mark.parametrize("text", [
    "\U0001F469\u200d\U0001F4BB and \U0001F468\u200d\U0001F469\u200d\U0001F467",  # joined emoji
    "\U0001F3F4\U000E0067\U000E0062\U000E0073\U000E0063\U000E0074\U000E007F",  # a flag's tags
    "\u2764\ufe0f \U0001F44D\U0001F3FD",  # a variation selector, a skin tone
    "cafe\u0301 na\u00efve \u00c5ngstr\u00f6m",  # a combining accent, precomposed ones
    "\u65e5\u672c\u8a9e \ud55c\uad6d\uc5b4 \u4e2d\u6587",  # CJK, Hangul
    "\u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627 \u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",  # Hebrew, Arabic, a ZWNJ
    "tabs\tand\nnewlines stay",
])
def test_ordinary_text_is_shown_as_it_is(text):
    assert show_module.visible(text) == text


def test_the_report_and_the_stream_show_them_too(capsys):
    """The prompt goes to the terminal in the Text = lines and at the start of --show."""
    prompt = "left \u202eright\u2028next \u2067x\u2069"
    shown = "left <U+202E>right<U+2028>next <U+2067>x<U+2069>"
    flags = ["--mode", "speculative", "--K", "3", "--prompt", prompt]
    assert main.main(BASE + flags) == 0
    out = capsys.readouterr().out
    assert f"Text = {shown}" in out and not set(out) & set(REORDER_OR_BREAK)
    assert main.main(BASE + flags + ["--show"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(shown) and not set(out) & set(REORDER_OR_BREAK)
