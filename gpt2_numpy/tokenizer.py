"""GPT-2's byte-level BPE tokenizer, built by tiktoken from the model folder's own files.

OpenAI ships two files next to every checkpoint:
    vocab.bpe     the merges, one "a b" pair per line, in priority order
    encoder.json  token string -> id
Both spell bytes in a printable alphabet: printable Latin-1 bytes stand for themselves, every other
byte b is shown as chr(256 + n), n counting those bytes in order (so the space 0x20 is "Ġ").
tiktoken wants the opposite view, raw bytes -> rank, where a lower rank merges first. For GPT-2 the
rank of a token is simply its id: the 256 single bytes come first, then one token per merge.
"""
import hashlib
import json
from pathlib import Path

import tiktoken

from .errors import DamagedFile, GPT2Error

# GPT-2's pre-tokenizer: contractions, runs of letters, of digits, of other symbols (each with
# an optional leading space), and whitespace. BPE never merges across these pieces.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
END_OF_TEXT = "<|endoftext|>"
OFFICIAL_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
OFFICIAL_N_VOCAB = 50257


def byte_alphabet() -> dict:
    """The printable character GPT-2's files use for each byte value: {char: byte}."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}
    return {c: b for b, c in chars.items()}


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_text(path: Path) -> str:
    """A tokenizer file's text, which must be UTF-8 and not empty."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DamagedFile(f"{path} is not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise DamagedFile(f"{path} is empty")
    return text


def read_encoder(path: Path) -> dict:
    """encoder.json: a JSON object of token string -> id (an integer >= 0)."""
    try:
        encoder = json.loads(read_text(path))
    except (ValueError, RecursionError) as e:  # RecursionError: arrays nested too deep
        raise DamagedFile(f"{path} is not valid JSON ({str(e).splitlines()[0]})") from None
    if not (isinstance(encoder, dict) and all(type(i) is int and i >= 0 for i in encoder.values())):
        raise DamagedFile(f"{path} must hold a JSON object of token -> id (an integer >= 0)")
    return encoder


def read_merges(path: Path) -> list:
    """vocab.bpe: a "#version" line, then one merge "left right" per line, in priority order."""
    lines = read_text(path).split("\n")
    merges = []
    for number, line in enumerate(lines[1:], start=2):
        if line:
            pair = line.split(" ")
            if len(pair) != 2 or not all(pair):
                raise DamagedFile(f"{path} line {number}: a merge is two tokens separated by "
                                  f"one space, got {line[:40]!r}")
            merges.append((number, pair))
    return merges


def load_tokenizer(model_dir, verify_official: bool = None) -> tiktoken.Encoding:
    """A tiktoken Encoding from `model_dir`/encoder.json and vocab.bpe.

    verify_official: check the files' SHA-256 against OpenAI's. By default this is done whenever
    the vocabulary has GPT-2's 50257 tokens, i.e. whenever the files claim to be the official ones.
    """
    model_dir = Path(model_dir)
    paths = {name: model_dir / name for name in ("encoder.json", "vocab.bpe")}
    for path in paths.values():
        if not path.is_file():
            raise GPT2Error(f"missing tokenizer file {path}")
    encoder = read_encoder(paths["encoder.json"])
    if verify_official is None:
        verify_official = len(encoder) == OFFICIAL_N_VOCAB
    if verify_official:
        for name, path in paths.items():
            if sha256_of(path) != OFFICIAL_SHA256[name]:
                raise DamagedFile(f"{path} is not OpenAI's GPT-2 {name} (SHA-256 mismatch)")

    to_byte = byte_alphabet()

    def as_bytes(token: str, where: str) -> bytes:
        if not all(c in to_byte for c in token):
            raise DamagedFile(f"{where}: {token[:40]!r} has a character outside GPT-2's byte "
                              "alphabet")
        return bytes(to_byte[c] for c in token)

    # Ranks from the merges: single bytes in alphabet order, then each merge's result.
    ranks = {bytes([b]): i for i, b in enumerate(to_byte.values())}
    for number, (left, right) in read_merges(paths["vocab.bpe"]):
        where = f"{paths['vocab.bpe']} line {number}"
        ranks[as_bytes(left, where) + as_bytes(right, where)] = len(ranks)
    # ...which must be exactly encoder.json's ids, since tiktoken merges lowest rank first.
    eot = encoder.pop(END_OF_TEXT, None)
    ids = {as_bytes(t, str(paths["encoder.json"])): i for t, i in encoder.items()}
    if eot is None or ids != ranks or eot in ranks.values():
        raise GPT2Error(f"{paths['encoder.json']} does not match {paths['vocab.bpe']}")
    return tiktoken.Encoding(name=f"gpt2:{model_dir.name}", pat_str=GPT2_PATTERN,
                             mergeable_ranks=ranks, special_tokens={END_OF_TEXT: eot})
