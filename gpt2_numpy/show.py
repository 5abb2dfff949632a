"""`--show`: speculative output in colour, streamed as it is committed.

    accepted   green   a draft token the target kept
    resampled  red     drawn from the residual after the target rejected a draft
    bonus      cyan    drawn from p_{K+1} after the target kept every draft of the round
    target     plain   a round without drafts (K = 0), i.e. a plain target step

`Show` is an on_tokens(ids, kinds) callback for the decoders. GPT-2's BPE works on bytes, so one
character (é, 日, an emoji) may be split over several tokens: bytes wait in an incremental UTF-8
decoder until they make whole characters, and a character takes the colour of the token that
completed it. Colour is used only on a terminal, and never when NO_COLOR is set (no-color.org)
or TERM is "dumb"; otherwise the same text is written plain.
"""
import codecs
import os
import re
import sys

COLOURS = {"accepted": "32", "resampled": "31", "bonus": "36", "target": None}  # ANSI SGR codes
LEGEND = {"accepted": "draft accepted", "resampled": "resampled after a rejection",
          "bonus": "bonus (all drafts accepted)", "target": "plain target step"}
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")

# Generated text can contain control characters (random weights produce any byte, ESC among
# them), and a terminal would obey them. Show C0 controls other than tab and newline as their
# Unicode pictures (ESC -> U+241B), DEL as U+2421, and C1 controls as U+FFFD. Characters that
# reorder a line (Unicode's Bidi_Control set: after U+202E the rest of the line reads backwards)
# or end one (the line and paragraph separators) have no picture: show their code point, as
# less(1) does ("<U+202E>"). Every other character, joiners and accents included, stays as it is.
BIDI_CONTROLS = [0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
LINE_SEPARATORS = [0x2028, 0x2029]
PRINTABLE = str.maketrans({**{c: 0x2400 + c for c in range(32) if chr(c) not in "\t\n"},
                           0x7F: 0x2421, **{c: 0xFFFD for c in range(0x80, 0xA0)},
                           **{c: f"<U+{c:04X}>" for c in BIDI_CONTROLS + LINE_SEPARATORS}})


def visible(text: str) -> str:
    """Text as it may be written to a terminal: control characters shown, never obeyed."""
    return text.translate(PRINTABLE)


def colour_wanted(stream) -> bool:
    return (stream.isatty() and not os.environ.get("NO_COLOR")
            and os.environ.get("TERM") != "dumb")


def paint(text: str, kind: str, colour: bool) -> str:
    code = COLOURS[kind]
    return f"\x1b[{code}m{text}\x1b[0m" if colour and code and text else text


def strip_ansi(text: str) -> str:
    return ANSI_ESCAPE.sub("", text)


def legend(colour: bool = True) -> str:
    """One line naming each colour, written in it."""
    return "legend: " + " | ".join(paint(LEGEND[kind], kind, colour) for kind in COLOURS)


class Show:
    """Writes each committed token to `out` as soon as its bytes make whole characters."""

    def __init__(self, tokenizer, out=None, colour: bool = None):
        self.out = out if out is not None else sys.stdout
        self.colour = colour_wanted(self.out) if colour is None else colour
        self.token_bytes = tokenizer.decode_single_token_bytes
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # as decode() does

    def write(self, text: str, kind: str = "target") -> None:
        self.out.write(paint(visible(text), kind, self.colour))

    def __call__(self, ids, kinds) -> None:
        for token, kind in zip(ids, kinds):
            self.write(self.utf8.decode(self.token_bytes(token)), kind)  # "" mid-character
        self.out.flush()

    def close(self) -> None:
        """End the line; bytes of a character that never completed become U+FFFD."""
        self.write(self.utf8.decode(b"", final=True))
        self.out.write("\n")
        self.out.flush()


def show_stream(tokenizer, prompt: str, out=None) -> Show:
    """Start a --show display: the legend (in colour only) and the prompt; returns the callback."""
    show = Show(tokenizer, out)
    if show.colour:
        show.out.write(legend() + "\n")
    show.write(prompt)
    show.out.flush()
    return show
