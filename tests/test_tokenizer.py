"""The tokenizer built from a folder's encoder.json + vocab.bpe."""
import shutil

import pytest

from gpt2_numpy import GPT2Error
from gpt2_numpy.tokenizer import load_tokenizer
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
