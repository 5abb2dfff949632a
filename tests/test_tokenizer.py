"""The tokenizer built from a folder's encoder.json + vocab.bpe."""
import shutil

import pytest

from gpt2_numpy import GPT2Error
from gpt2_numpy.tokenizer import byte_alphabet, load_tokenizer
from conftest import FIXTURES, SHARED_TOKENIZER

needs_shared = pytest.mark.skipif(not SHARED_TOKENIZER.is_dir(),
                                  reason="../shared/gpt2-tokenizer (the official files) is absent")


def test_round_trip_on_the_fixture_vocabulary():
    enc = load_tokenizer(FIXTURES / "tiny-3h")
    assert enc.n_vocab == 307 and enc.eot_token == 306
    for text in ["the model is learning", "Ünïcödé and emoji 🙂, tabs\tand\nnewlines", ""]:
        assert enc.decode(enc.encode(text)) == text
    assert len(enc.encode(" the the the")) == 3  # " the" is one of the learned merges
    assert enc.encode("<|endoftext|>", allowed_special="all") == [306]


def test_encoder_that_disagrees_with_the_merges_is_refused(tmp_path):
    for f in ("encoder.json", "vocab.bpe"):
        shutil.copy(FIXTURES / "tiny-3h" / f, tmp_path / f)
    lines = (tmp_path / "vocab.bpe").read_text().split("\n")
    lines[1], lines[2] = lines[2], lines[1]  # two merges in the wrong priority order
    (tmp_path / "vocab.bpe").write_text("\n".join(lines))
    with pytest.raises(GPT2Error, match="does not match"):
        load_tokenizer(tmp_path)


def test_missing_file_is_a_clear_error(tmp_path):
    shutil.copy(FIXTURES / "tiny-3h" / "encoder.json", tmp_path / "encoder.json")
    with pytest.raises(GPT2Error, match="vocab.bpe"):
        load_tokenizer(tmp_path)


@needs_shared
def test_official_vocabulary_known_encodings():
    enc = load_tokenizer(SHARED_TOKENIZER)
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode("Alan Turing theorized that computers would one day become") == [
        36235, 39141, 18765, 1143, 326, 9061, 561, 530, 1110, 1716]


@needs_shared
def test_official_vocabulary_with_a_wrong_hash_is_refused(tmp_path):
    shutil.copy(SHARED_TOKENIZER / "encoder.json", tmp_path / "encoder.json")
    (tmp_path / "vocab.bpe").write_bytes((SHARED_TOKENIZER / "vocab.bpe").read_bytes() + b"\n")
    with pytest.raises(GPT2Error, match="SHA-256"):
        load_tokenizer(tmp_path)


def reference_encode(text: str, folder) -> list:
    """GPT-2's encoding as OpenAI's encoder.py defines it, written out plainly: split the text
    with the pre-tokenizer pattern, spell each piece's bytes in the files' alphabet, then merge
    the adjacent pair with the lowest rank in vocab.bpe until none is left."""
    import json

    import regex

    pattern = regex.compile(
        r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    encoder = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
    merges = (folder / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
    rank = {tuple(line.split()): i for i, line in enumerate(merges) if line}
    char_of = {b: c for c, b in byte_alphabet().items()}
    ids = []
    for piece in pattern.findall(text):
        word = [char_of[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            pairs = [(rank.get(pair, float("inf")), i) for i, pair in enumerate(zip(word, word[1:]))]
            best, i = min(pairs)
            if best == float("inf"):
                break
            word[i : i + 2] = [word[i] + word[i + 1]]
        ids += [encoder[token] for token in word]
    return ids


@needs_shared
@pytest.mark.parametrize("text", [
    "in 1999 there were 42 cats",
    "I'm sure they'll say it's 3.14, isn't it? We've 100s of 'em, and you'd agree.",
    "1,000,000 and 0.5%: 2024-12-03 at 10:30am",
    "  two leading spaces,  double  spaces\n\nand a blank line\t tab",
    "naïve café 日本語 🙂",
])
def test_official_vocabulary_matches_the_reference_bpe(text):
    """Digits, contractions and whitespace: where a pre-tokenizer that differs from GPT-2's (one
    that drops the optional space before numbers, say) shows."""
    assert load_tokenizer(SHARED_TOKENIZER).encode(text) == reference_encode(text, SHARED_TOKENIZER)


def damaged(tmp_path, name, content: bytes):
    """A copy of the fixture's tokenizer files with `name` replaced by `content`."""
    for f in ("encoder.json", "vocab.bpe"):
        shutil.copy(FIXTURES / "tiny-3h" / f, tmp_path / f)
    (tmp_path / name).write_bytes(content)
    return tmp_path


def merges_with(*lines: str) -> bytes:
    """The fixture's vocab.bpe with `lines` in place of its first merges."""
    original = (FIXTURES / "tiny-3h" / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    return "\n".join(original[:1] + list(lines) + original[1 + len(lines):]).encode("utf-8")


@pytest.mark.parametrize("name, content, words", [
    ("encoder.json", b"\xff\xfe{}", "not UTF-8"),
    ("encoder.json", b"", "is empty"),
    ("encoder.json", b"   \n", "is empty"),
    ("encoder.json", b"[]", "JSON object"),
    ("encoder.json", b'"the"', "JSON object"),
    ("encoder.json", b"{not json", "not valid JSON"),
    ("encoder.json", b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    ("encoder.json", b'{"a": "0", "<|endoftext|>": 1}', "JSON object"),
    ("encoder.json", b'{"a": true, "<|endoftext|>": 1}', "JSON object"),
    ("encoder.json", b'{"a": -1, "<|endoftext|>": 1}', "JSON object"),
    ("encoder.json", '{"\u4e00": 0, "<|endoftext|>": 1}'.encode(), "byte alphabet"),
    ("vocab.bpe", b"", "is empty"),
    ("vocab.bpe", b"\xff\xfe\x00garbage", "not UTF-8"),
    ("vocab.bpe", merges_with("abc"), "line 2"),
    ("vocab.bpe", merges_with("a b c"), "line 2"),
    ("vocab.bpe", merges_with("\u4e00 b"), "byte alphabet"),
])
def test_damaged_tokenizer_files_are_one_line_errors(tmp_path, name, content, words):
    folder = damaged(tmp_path, name, content)
    with pytest.raises(GPT2Error) as excinfo:
        load_tokenizer(folder)
    message = str(excinfo.value)
    assert "\n" not in message and str(folder / name) in message and words in message, message
