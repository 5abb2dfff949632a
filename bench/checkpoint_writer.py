"""Write a params tree as OpenAI's GPT-2 checkpoint files, byte for byte as TensorFlow would.

The goal is not just "a file our reader (checkpoint.py) accepts" but the exact bytes
TensorFlow's Saver writes for the same tensors (tests/test_checkpoint.py checks this against
the TF-written fixtures), so every choice below copies one in TensorFlow's BundleWriter
(tensor_bundle.cc) or its LevelDB-derived TableBuilder / BlockBuilder (tensorflow/core/lib/io).
The format itself is described in gpt2_numpy/checkpoint.py, which reads it. The library never
writes checkpoints; the tests and the benchmarks do (bench/workers.py writes random weights in
the official format to time loading from real files).
"""
from __future__ import annotations

import json
import os
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from gpt2_numpy.checkpoint import (DATA_FILE, DT_FLOAT, FOOTER_LEN, HPARAM_KEYS, INDEX_FILE,
                                   LITTLE_ENDIAN, NO_COMPRESSION, TABLE_MAGIC, _check_hparams,
                                   _FIXED32, _LENGTH_DELIMITED, _VARINT, expected_shapes)
from gpt2_numpy.crc32c import crc32c, mask_crc
from gpt2_numpy.errors import GPT2Error

# OpenAI's 77-byte marker file, which tf.train.latest_checkpoint() reads to find the prefix.
CHECKPOINT_MARKER = (
    b'model_checkpoint_path: "model.ckpt"\n'
    b'all_model_checkpoint_paths: "model.ckpt"\n'
)
TABLE_BLOCK_SIZE = 262144  # TableOptions.block_size: start a new data block at 256 KiB
DATA_RESTART_INTERVAL = 16  # a full key every 16 entries in data blocks (for binary search)
INDEX_RESTART_INTERVAL = 1  # every index entry is a restart point, as in TableBuilder
BUNDLE_VERSION = 1  # kTensorBundleVersion, stored as BundleHeaderProto.version.producer


def _put_varint(n: int) -> bytes:
    """Encode a non-negative int as a LEB128 varint (inverse of _varint)."""
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# Protobuf fields. Proto3 leaves a scalar field out entirely when it equals its default (0), so
# the scalar encoders return b"" for 0: that is why the first tensor has no offset on disk.


def _pb_varint(field: int, n: int) -> bytes:
    return _put_varint(field << 3 | _VARINT) + _put_varint(n) if n else b""


def _pb_fixed32(field: int, n: int) -> bytes:
    return _put_varint(field << 3 | _FIXED32) + struct.pack("<I", n) if n else b""


def _pb_message(field: int, body: bytes) -> bytes:
    """A set sub-message is always written, even when empty (unlike an absent one)."""
    return _put_varint(field << 3 | _LENGTH_DELIMITED) + _put_varint(len(body)) + body


def _header_proto() -> bytes:
    """BundleHeaderProto {num_shards: 1, endianness: LITTLE (default, omitted), version {1}}."""
    version = _pb_varint(1, BUNDLE_VERSION)  # VersionDef: producer = 1, min_consumer = 0
    return _pb_varint(1, 1) + _pb_varint(2, LITTLE_ENDIAN) + _pb_message(3, version)


def _entry_proto(shape: tuple[int, ...], offset: int, size: int, masked_crc: int) -> bytes:
    """BundleEntryProto for a float32 tensor in shard 0, fields in field-number order."""
    dims = b"".join(_pb_message(2, _pb_varint(1, n)) for n in shape)  # TensorShapeProto.dim
    return (
        _pb_varint(1, DT_FLOAT)
        + _pb_message(2, dims)
        + _pb_varint(3, 0)  # shard_id: always 0 with one data file, so never on the wire
        + _pb_varint(4, offset)
        + _pb_varint(5, size)
        + _pb_fixed32(6, masked_crc)
    )


# SSTable building blocks, following LevelDB's BlockBuilder and TableBuilder.


class _BlockBuilder:
    """Collects sorted (key, value) entries into one block (the layout _block_entries reads)."""

    def __init__(self, restart_interval: int):
        self.restart_interval = restart_interval
        self.buffer = bytearray()
        self.restarts = [0]  # offsets of entries stored with their full key
        self.counter = 0  # entries since the last restart
        self.last_key = b""

    def add(self, key: bytes, value: bytes) -> None:
        shared = 0
        if self.counter < self.restart_interval:  # share a prefix with the previous key
            limit = min(len(self.last_key), len(key))
            while shared < limit and self.last_key[shared] == key[shared]:
                shared += 1
        else:  # a restart point: full key, so a reader can start decoding here
            self.restarts.append(len(self.buffer))
            self.counter = 0
        self.buffer += _put_varint(shared) + _put_varint(len(key) - shared)
        self.buffer += _put_varint(len(value)) + key[shared:] + value
        self.last_key = key
        self.counter += 1

    def empty(self) -> bool:
        return not self.buffer

    def size_estimate(self) -> int:
        """The finished block's size: entries + restart array + restart count."""
        return len(self.buffer) + 4 * len(self.restarts) + 4

    def finish(self) -> bytes:
        restarts = struct.pack(f"<{len(self.restarts)}I", *self.restarts)
        return bytes(self.buffer) + restarts + struct.pack("<I", len(self.restarts))


def _shortest_separator(start: bytes, limit: bytes) -> bytes:
    """A short key k with start <= k < limit (LevelDB's BytewiseComparator FindShortestSeparator).

    The index only needs *some* key between one block's last key and the next block's first,
    so at the first differing byte it bumps start's byte and cuts the rest off, when that still
    stays below limit; otherwise (or when one key is a prefix of the other) it keeps start.
    """
    n = min(len(start), len(limit))
    i = 0
    while i < n and start[i] == limit[i]:
        i += 1
    if i < n and start[i] < 0xFF and start[i] + 1 < limit[i]:
        return start[:i] + bytes([start[i] + 1])
    return start


def _short_successor(key: bytes) -> bytes:
    """A short key >= key (FindShortSuccessor): bump the first byte that is not 0xff, cut after.

    This is why a GPT-2 index block holds the one-letter key "n": the last key is "model/wte".
    """
    for i, byte in enumerate(key):
        if byte != 0xFF:
            return key[:i] + bytes([byte + 1])
    return key  # all 0xff: nothing shorter is larger


def _sstable(items: list[tuple[bytes, bytes]], block_size: int) -> bytes:
    """Build a whole uncompressed table from strictly increasing (key, value) pairs.

    Data blocks are cut like TableBuilder::Add: after adding an entry, a block whose estimated
    size reached block_size is written out. Its index entry waits for the next key, so that the
    separator can be chosen between the two blocks (or after the last key, in finish).
    """
    out = bytearray()

    def write_block(contents: bytes) -> bytes:
        """Append contents + trailer; return the encoded BlockHandle (offset, size)."""
        handle = _put_varint(len(out)) + _put_varint(len(contents))
        type_byte = bytes([NO_COMPRESSION])
        out.extend(contents + type_byte + struct.pack("<I", mask_crc(crc32c(contents + type_byte))))
        return handle

    data = _BlockBuilder(DATA_RESTART_INTERVAL)
    index = _BlockBuilder(INDEX_RESTART_INTERVAL)
    pending_handle, last_key = None, None
    for key, value in items:
        if last_key is not None and key <= last_key:
            raise ValueError(f"SSTable keys must increase strictly: {key!r} after {last_key!r}")
        if pending_handle is not None:
            index.add(_shortest_separator(last_key, key), pending_handle)
            pending_handle = None
        data.add(key, value)
        last_key = key
        if data.size_estimate() >= block_size:
            pending_handle = write_block(data.finish())
            data = _BlockBuilder(DATA_RESTART_INTERVAL)
    if not data.empty():
        pending_handle = write_block(data.finish())
    metaindex_handle = write_block(_BlockBuilder(DATA_RESTART_INTERVAL).finish())  # empty
    if pending_handle is not None:
        index.add(_short_successor(last_key), pending_handle)
    index_handle = write_block(index.finish())
    # Footer: both handles, zero-padded to 40 bytes, then the magic as two fixed32 (low first).
    footer = (metaindex_handle + index_handle).ljust(FOOTER_LEN - 8, b"\0")
    return bytes(out + footer + struct.pack("<Q", TABLE_MAGIC))


# From the params tree to files.


def _named_tensors(params: dict, hparams: dict) -> dict[str, np.ndarray]:
    """Flatten a params tree to {checkpoint name: array in the checkpoint's shape}.

    The inverse of load_checkpoint's naming: blocks[i]["attn"]["c_attn"]["w"] [d, 3d] becomes
    model/h{i}/attn/c_attn/w [1, d, 3d] (a view with a leading axis of 1). Checks every shape
    and dtype, so that a bad tree is rejected before anything is written.
    """
    n_layer = hparams["n_layer"]
    blocks = params.get("blocks") if isinstance(params, dict) else None
    if not isinstance(blocks, (list, tuple)) or len(blocks) != n_layer:
        count = len(blocks) if isinstance(blocks, (list, tuple)) else "no"
        raise GPT2Error(f"cannot write checkpoint: params has {count} blocks, n_layer={n_layer}")
    tensors = {}
    for name, shape in expected_shapes(hparams).items():
        parts = name.split("/")[1:]  # "model/h3/ln_1/g" -> ["h3", "ln_1", "g"]
        path = ["blocks", int(parts[0][1:]), *parts[1:]] if parts[0][0] == "h" else parts
        label = "params" + "".join(f"[{p!r}]" for p in path)  # params['blocks'][3]['ln_1']['g']
        node = params
        try:
            for p in path:
                node = node[p]
        except (KeyError, IndexError, TypeError):
            raise GPT2Error(f"cannot write {name}: {label} is missing") from None
        arr = np.asarray(node)
        tree_shape = shape[1:] if len(shape) == 3 else shape  # conv weights are squeezed
        if arr.shape != tree_shape:
            raise GPT2Error(
                f"cannot write {name}: {label} has shape {list(arr.shape)}, "
                f"expected {list(tree_shape)} for these hparams"
            )
        if arr.dtype.kind != "f":
            raise GPT2Error(f"cannot write {name}: {label} has dtype {arr.dtype}, not a float")
        tensors[name] = arr[np.newaxis] if len(shape) == 3 else arr
    return tensors


def _write_tensors(f, tensors: dict[str, np.ndarray]) -> list[tuple[bytes, bytes]]:
    """Stream tensors into the data file; return the sorted (name, BundleEntryProto) pairs.

    TensorFlow's Saver adds tensors in name order, so file order = key order and the byte
    ranges tile the file with no padding (data_alignment 1). One tensor at a time is converted
    (if it is not float32 already), so memory stays at the largest tensor, not the whole model.
    """
    items, offset = [], 0
    for key, name in sorted((name.encode(), name) for name in tensors):  # bytewise key order
        arr = np.ascontiguousarray(tensors[name], dtype="<f4")  # no copy if already float32
        raw = arr.reshape(-1).view(np.uint8)
        f.write(memoryview(raw))
        items.append((key, _entry_proto(arr.shape, offset, raw.size, mask_crc(crc32c(raw)))))
        offset += raw.size
    return items


@contextmanager
def _replacing(path: Path) -> Iterator:
    """Yield a file open for writing under a temporary name next to path; on success, move it
    onto path.

    os.replace() within one folder is atomic, so path is always either the old file or the
    complete new one; fsync first, so that also holds after a crash or power cut. On any error
    the temporary file is removed. (A memory map of the old file keeps its old contents, so a
    checkpoint can be loaded from and written back to the same folder.)
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp")
    try:
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_checkpoint(model_dir, hparams: dict, params: dict) -> None:
    """Write params as OpenAI's GPT-2 files in model_dir (created if needed), as TensorFlow would.

    params is a tree as load_checkpoint() returns it (any float arrays; stored as float32), and
    hparams gives the shapes it must have. Writes four files:

      model.ckpt.data-00000-of-00001   every tensor, float32 little-endian, sorted by name
      model.ckpt.index                 the SSTable of BundleEntryProtos (offsets, shapes, CRCs)
      hparams.json                     n_vocab, n_ctx, n_embd, n_head, n_layer, as OpenAI's
      checkpoint                       the 77-byte marker naming the model.ckpt prefix

    For the same tensors, the data, index and marker files are byte-identical to what
    TensorFlow's Saver writes. Tokenizer files (encoder.json, vocab.bpe) are not written.
    Every shape is checked before anything is written (GPT2Error names the first bad tensor).
    Each file is written under a temporary name and renamed into place, the index after the
    data, so an interrupted write never leaves an index pointing into a missing or short file.
    """
    model_dir = Path(model_dir)
    _check_hparams(hparams, model_dir / "hparams.json", advice="nothing was written")
    tensors = _named_tensors(params, hparams)
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        with _replacing(model_dir / DATA_FILE) as f:
            entries = _write_tensors(f, tensors)
        # The header's key "" sorts before every tensor name.
        index = _sstable([(b"", _header_proto()), *entries], TABLE_BLOCK_SIZE)
        with _replacing(model_dir / INDEX_FILE) as f:
            f.write(index)
        # json.dumps(indent=2) plus a newline gives 90 bytes for 124M, the size OpenAI lists
        # for its hparams.json (its exact bytes could not be checked here).
        hparams_json = json.dumps({key: hparams[key] for key in HPARAM_KEYS}, indent=2) + "\n"
        with _replacing(model_dir / "hparams.json") as f:
            f.write(hparams_json.encode())
        with _replacing(model_dir / "checkpoint") as f:  # last, as TensorFlow does
            f.write(CHECKPOINT_MARKER)
    except OSError as e:
        raise GPT2Error(f"cannot write {e.filename or model_dir}: {e.strerror or e}") from None
