"""Read OpenAI's GPT-2 TensorFlow checkpoint with nothing but NumPy.

A TensorFlow "V2" checkpoint is two files sharing the prefix `model.ckpt`:

  model.ckpt.data-00000-of-00001   every tensor's raw bytes, one after another
  model.ckpt.index                 a small table saying where each tensor lives

The index is a LevelDB-style SSTable. We read it from the end:

  footer (last 48 bytes)   = metaindex handle, index handle, zero padding, magic number
  index block              = one entry per data block: key -> handle (offset, size) of that block
  data block               = sorted key/value entries, prefix-compressed, then a restart array
  block trailer (5 bytes)  = compression type (0 = none) + masked CRC-32C of block and type byte

Inside the data blocks the key "" holds a BundleHeaderProto (number of shards, byte order) and
every other key is a tensor name whose value is a BundleEntryProto: dtype, shape, shard, byte
offset and size in the data file, and a masked CRC-32C of the tensor's bytes. Both are protobuf
messages, which we decode by hand: they use only varints, fixed32 and length-delimited fields.

Everything on disk is little-endian. Tensors are stored densely in C order, so each one is a
NumPy view straight into a memory map of the data file: loading 1.4 GB costs no copy and no time
until the forward pass touches the pages.

write_checkpoint() at the end of this file is the mirror image: it writes a params tree back out
in the same format, byte for byte what TensorFlow's Saver writes for the same tensors.
"""

from __future__ import annotations

import functools
import json
import os
import re
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from gpt2_numpy.errors import GPT2Error

INDEX_FILE = "model.ckpt.index"
DATA_FILE = "model.ckpt.data-00000-of-00001"

TABLE_MAGIC = 0xDB4775248B80FB57  # LevelDB's kTableMagicNumber, last 8 bytes of every SSTable
FOOTER_LEN = 48  # two BlockHandles padded to 2 * 20 bytes, then the 8-byte magic
BLOCK_TRAILER_LEN = 5  # 1 byte compression type + 4 bytes masked CRC-32C
NO_COMPRESSION = 0  # TensorFlow writes the .index uncompressed; we support nothing else
DT_FLOAT = 1  # TensorFlow's DataType enum value for float32
LITTLE_ENDIAN = 0  # BundleHeaderProto.Endianness.LITTLE

REDOWNLOAD = "delete it and run again to re-download"


# ---------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli)
#
# This is not zlib.crc32: same algorithm, different polynomial. TensorFlow stores it "masked"
# (rotated and offset) because a CRC of data that itself contains CRCs is weak.
# ---------------------------------------------------------------------------------------------

CRC32C_POLY = 0x82F63B78  # Castagnoli polynomial 0x1EDC6F41, bit-reversed (LSB-first CRC)
CRC_MASK_DELTA = 0xA282EAD8


def mask_crc(crc: int) -> int:
    """TensorFlow's Mask(): rotate right by 15 bits, then add a constant (mod 2**32)."""
    return (((crc >> 15) | (crc << 17)) + CRC_MASK_DELTA) & 0xFFFFFFFF


def unmask_crc(masked: int) -> int:
    """Inverse of mask_crc()."""
    rot = (masked - CRC_MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


@functools.lru_cache(maxsize=None)
def _byte_table() -> tuple[int, ...]:
    """table[b] = CRC register after shifting byte b through 8 steps of polynomial division."""
    table = []
    for b in range(256):
        r = b
        for _ in range(8):
            r = (r >> 1) ^ (CRC32C_POLY if r & 1 else 0)
        table.append(r)
    return tuple(table)


def crc32c_simple(data) -> int:
    """Reference CRC-32C: the textbook one-byte-at-a-time table loop (a few MB/s in Python)."""
    table = _byte_table()
    r = 0xFFFFFFFF
    for b in memoryview(data).cast("B"):
        r = table[(r ^ b) & 0xFF] ^ (r >> 8)
    return r ^ 0xFFFFFFFF


# The fast path. Feeding byte b into the register r is r <- Z(r ^ b), where Z ("one zero byte")
# is linear over GF(2): Z(x ^ y) = Z(x) ^ Z(y). Starting from r = 0, the register after an
# n-byte message m is therefore an XOR of independent contributions,
#
#     raw(m) = XOR over i of Z^(n-i)(m[i])      (byte i is followed by n-i more shifts)
#
# and three consequences make it vectorisable:
#   1. raw(A + B) = Z^len(B)(raw(A)) ^ raw(B): CRCs of neighbouring chunks combine, so we can
#      CRC all 16-byte chunks at once and then merge neighbours pairwise in a tree.
#   2. Leading zero bytes leave raw() unchanged (0 stays 0), so we may zero-pad at the front.
#   3. The real CRC starts from r = 0xFFFFFFFF instead of 0. After four bytes the register
#      depends only on r ^ (first four bytes), so that is the same as starting from 0 with the
#      first four message bytes inverted. The final result is inverted once more.
# A linear map on 32-bit values is stored as two 65536-entry tables (for the low and high 16
# bits of its input), so applying it to a whole array is two NumPy `take`s.

_TREE_LEVELS = 16
_PIECE = 16 << _TREE_LEVELS  # bytes handled by one tree: 65536 chunks of 16 bytes = 1 MiB
_FAST_MIN_LEN = 4096  # below this the plain loop is fast enough and simpler


def _apply(op, x: np.ndarray) -> np.ndarray:
    """Apply a linear map op = (lo_table, hi_table) to every uint32 in x."""
    lo, hi = op
    return lo.take((x & 0xFFFF).astype(np.intp)) ^ hi.take((x >> 16).astype(np.intp))


def _compose(outer, inner):
    """The map `outer after inner`, as tables: apply `outer` to `inner`'s tables."""
    return (_apply(outer, inner[0]), _apply(outer, inner[1]))


@functools.lru_cache(maxsize=None)
def _zero_byte_maps():
    """Return (leaf, tree): leaf[k] = Z^k for k = 1..16; tree[l] = Z^(16 * 2**l) for l = 0..16."""
    table = np.array(_byte_table(), dtype=np.uint32)
    v = np.arange(65536, dtype=np.uint32)

    def one_zero_byte(x):  # Z(x): the register after feeding a 0 byte
        return table[x & 0xFF] ^ (x >> 8)

    z1 = (one_zero_byte(v), one_zero_byte(v << 16))
    leaf = [None, z1]
    for _ in range(15):
        leaf.append(_compose(z1, leaf[-1]))
    tree = [leaf[16]]
    for _ in range(_TREE_LEVELS):
        tree.append(_compose(tree[-1], tree[-1]))  # Z^(2k) = Z^k after Z^k
    return leaf, tree


def _raw_crc_of_piece(piece: np.ndarray) -> int:
    """raw() (register starting at 0, no final inversion) of exactly _PIECE bytes."""
    leaf, tree = _zero_byte_maps()
    # [PIECE] uint8 -> [8, PIECE/16] 16-bit words; row p holds word p of every 16-byte chunk.
    # Transposing once makes every row contiguous, which makes `take` several times faster.
    words = piece.view("<u2").reshape(-1, 8).T.astype(np.intp, order="C")
    # Byte i of a 16-byte chunk is shifted 16 - i times (once as it is fed, once per later
    # byte). Since Z(b << 8) = b, the two bytes of word p together contribute Z^(16-2p)(word),
    # and a 16-bit input needs only the map's low-half table.
    crc = leaf[16][0].take(words[0])
    for p in range(1, 8):
        crc ^= leaf[16 - 2 * p][0].take(words[p])  # [n_chunks] uint32
    # Merge neighbours: level l joins runs of 16 * 2**l bytes. [n] -> [n/2] each level.
    for level in range(_TREE_LEVELS):
        crc = _apply(tree[level], crc[0::2]) ^ crc[1::2]
    return int(crc[0])


def crc32c_fast(data) -> int:
    """CRC-32C of a bytes-like object or uint8 array: crc32c_simple's result, ~70x faster.

    About 300 MB/s on one core (1.4-1.7 s for 500 MB), so checking GPT-2 355M takes ~5 s.
    """
    a = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    a = a.reshape(-1).view(np.uint8)
    n = a.size
    if n < 4:  # the "invert the first four bytes" trick needs four bytes
        return crc32c_simple(a.tobytes())
    piece_map = _zero_byte_maps()[1][_TREE_LEVELS]  # Z^_PIECE
    # The head is copied and zero-padded at the front so that everything after it is made of
    # whole pieces; it is also where the first four bytes get inverted (fact 3 above).
    head_len = n % _PIECE or _PIECE
    if head_len < 4 and n > head_len:
        head_len += _PIECE
    head = np.zeros(-(-head_len // _PIECE) * _PIECE, dtype=np.uint8)
    head[-head_len:] = a[:head_len]
    head[-head_len:][:4] ^= 0xFF
    r = 0
    for start in range(0, head.size, _PIECE):
        r = int(_apply(piece_map, np.uint32(r))) ^ _raw_crc_of_piece(head[start : start + _PIECE])
    for start in range(head_len, n, _PIECE):
        r = int(_apply(piece_map, np.uint32(r))) ^ _raw_crc_of_piece(a[start : start + _PIECE])
    return r ^ 0xFFFFFFFF


def crc32c(data) -> int:
    """CRC-32C (Castagnoli) of bytes, a memoryview or a uint8 NumPy array (e.g. a memmap slice)."""
    if len(memoryview(data).cast("B")) < _FAST_MIN_LEN:
        return crc32c_simple(data)
    return crc32c_fast(data)


# ---------------------------------------------------------------------------------------------
# SSTable: footer -> index block -> data blocks -> (key, value) entries
# ---------------------------------------------------------------------------------------------


class TensorEntry(NamedTuple):
    """One BundleEntryProto: where a tensor's bytes are and what they mean."""

    dtype: int  # TensorFlow DataType enum (1 = float32)
    shape: tuple[int, ...]  # outermost dimension first (C order)
    shard_id: int  # which data file; GPT-2 has one
    offset: int  # byte offset in the data file
    size: int  # number of bytes
    crc32c: int  # masked CRC-32C of those bytes


class _Corrupt(Exception):
    """Internal: a structural problem in the index; read_index() adds the file name."""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a LEB128 varint (7 bits per byte, low group first, high bit = more follows)."""
    value = 0
    for i in range(10):  # a 64-bit value needs at most 10 bytes
        if pos >= len(buf):
            raise _Corrupt("bad varint (runs past the end of its buffer)")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, pos
    raise _Corrupt("bad varint (longer than 10 bytes)")


def _block_handle(buf: bytes, pos: int) -> tuple[tuple[int, int], int]:
    """A BlockHandle is two varints: (offset, size) of a block inside the same file."""
    offset, pos = _varint(buf, pos)
    size, pos = _varint(buf, pos)
    return (offset, size), pos


def _read_footer(raw: bytes) -> tuple[tuple[int, int], tuple[int, int]]:
    """Last 48 bytes: metaindex handle, index handle, zero padding, magic. Return both handles."""
    if len(raw) < FOOTER_LEN:
        raise _Corrupt(f"too short ({len(raw)} bytes) to hold the {FOOTER_LEN}-byte footer")
    footer = raw[-FOOTER_LEN:]
    (magic,) = struct.unpack("<Q", footer[-8:])  # two little-endian fixed32, low word first
    if magic != TABLE_MAGIC:
        raise _Corrupt("bad magic number (not a TensorFlow checkpoint index)")
    metaindex_handle, pos = _block_handle(footer, 0)
    index_handle, _ = _block_handle(footer, pos)
    return metaindex_handle, index_handle


def _read_block(raw: bytes, handle: tuple[int, int]) -> bytes:
    """Return a block's contents after checking its 5-byte trailer (type byte, masked CRC)."""
    offset, size = handle
    end = offset + size + BLOCK_TRAILER_LEN
    if end > len(raw) - FOOTER_LEN:
        raise _Corrupt(f"block at byte {offset} runs past the end of the file")
    contents = raw[offset : offset + size]
    block_type = raw[offset + size]
    (stored_crc,) = struct.unpack("<I", raw[offset + size + 1 : end])
    # The CRC covers the contents *and* the type byte.
    if crc32c(raw[offset : offset + size + 1]) != unmask_crc(stored_crc):
        raise _Corrupt(f"CRC mismatch in block at byte {offset}")
    if block_type != NO_COMPRESSION:
        raise _Corrupt(f"block at byte {offset} is compressed (type {block_type}); unsupported")
    return contents


def _block_entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Yield (key, value) pairs of a block.

    Layout: entries..., restart offsets (fixed32 each), number of restarts (fixed32). Each entry
    is varint `shared`, varint `non_shared`, varint `value_len`, then `non_shared` key bytes and
    the value. Keys are prefix-compressed: key = previous_key[:shared] + new bytes. We read the
    entries front to back, so the restart array (made for binary search) is not needed.
    """
    if len(block) < 4:
        raise _Corrupt("block too short for its restart count")
    (num_restarts,) = struct.unpack("<I", block[-4:])
    entries_end = len(block) - 4 - 4 * num_restarts
    if num_restarts == 0 or entries_end < 0:
        raise _Corrupt(f"impossible restart count {num_restarts} in block")
    pos, key, first = 0, b"", True
    while pos < entries_end:
        shared, pos = _varint(block, pos)
        non_shared, pos = _varint(block, pos)
        value_len, pos = _varint(block, pos)
        if shared > len(key) or pos + non_shared + value_len > entries_end:
            raise _Corrupt("block entry runs past the end of its block")
        new_key = key[:shared] + block[pos : pos + non_shared]
        pos += non_shared
        if not first and new_key <= key:  # SSTable keys are strictly increasing
            raise _Corrupt("keys out of order in block")
        key, first = new_key, False
        yield key, block[pos : pos + value_len]
        pos += value_len


# ---------------------------------------------------------------------------------------------
# Protobuf: just enough of the wire format for BundleHeaderProto and BundleEntryProto
# ---------------------------------------------------------------------------------------------

_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """Yield (field_number, wire_type, value) for each field of a serialized message.

    Every field starts with a varint tag = (field_number << 3) | wire_type. Fields we do not
    know are still yielded, so callers skip them; a proto3 field equal to its default (0, empty)
    is simply absent, so callers start from zeros.
    """
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        field, wire_type = tag >> 3, tag & 7
        if wire_type == _VARINT:
            value, pos = _varint(buf, pos)
        elif wire_type == _FIXED64:
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wire_type == _FIXED32:
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        elif wire_type == _LENGTH_DELIMITED:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        else:  # 3, 4 = deprecated groups, 6, 7 = invalid: none appear in these messages
            raise _Corrupt(f"unsupported protobuf wire type {wire_type}")
        if pos > len(buf):
            raise _Corrupt("protobuf field runs past the end of its message")
        yield field, wire_type, value


def _int64(value: int) -> int:
    """Varints carry int64 as its two's complement in 64 bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _parse_shape(buf: bytes) -> tuple[int, ...]:
    """TensorShapeProto: repeated Dim dim = 2 (Dim: int64 size = 1), bool unknown_rank = 3."""
    dims = []
    for field, wire_type, value in _proto_fields(buf):
        if field == 2 and wire_type == _LENGTH_DELIMITED:
            size = 0
            for dim_field, dim_wire, dim_value in _proto_fields(value):
                if dim_field == 1 and dim_wire == _VARINT:
                    size = _int64(dim_value)
            if size < 0:
                raise _Corrupt(f"tensor has an unknown dimension ({size})")
            dims.append(size)
        elif field == 3 and value:
            raise _Corrupt("tensor has unknown rank")
    return tuple(dims)


def _parse_entry(buf: bytes) -> TensorEntry:
    """BundleEntryProto: dtype=1, shape=2, shard_id=3, offset=4, size=5, crc32c=6, slices=7."""
    fields = {"dtype": 0, "shape": (), "shard_id": 0, "offset": 0, "size": 0, "crc32c": 0}
    for field, wire_type, value in _proto_fields(buf):
        if field == 1 and wire_type == _VARINT:
            fields["dtype"] = value
        elif field == 2 and wire_type == _LENGTH_DELIMITED:
            fields["shape"] = _parse_shape(value)
        elif field == 3 and wire_type == _VARINT:
            fields["shard_id"] = _int64(value)
        elif field == 4 and wire_type == _VARINT:
            fields["offset"] = _int64(value)
        elif field == 5 and wire_type == _VARINT:
            fields["size"] = _int64(value)
        elif field == 6 and wire_type == _FIXED32:
            fields["crc32c"] = value
        elif field == 7:  # a partitioned variable: its bytes live in other entries
            raise _Corrupt("sliced (partitioned) tensors are not supported")
    return TensorEntry(**fields)


def _check_header(buf: bytes) -> None:
    """BundleHeaderProto: num_shards=1, endianness=2 (LITTLE=0), version=3 (ignored)."""
    num_shards, endianness = 0, LITTLE_ENDIAN
    for field, wire_type, value in _proto_fields(buf):
        if field == 1 and wire_type == _VARINT:
            num_shards = _int64(value)
        elif field == 2 and wire_type == _VARINT:
            endianness = value
    if num_shards != 1:
        raise _Corrupt(f"checkpoint has {num_shards} data shards; only 1 is supported")
    if endianness != LITTLE_ENDIAN:
        raise _Corrupt("checkpoint tensors are big-endian; only little-endian is supported")


def read_index(index_path) -> dict[str, TensorEntry]:
    """Parse a model.ckpt.index file into {tensor name: TensorEntry}.

    Every block's CRC is verified (the file is a few kB). Raises GPT2Error on any problem.
    """
    path = Path(index_path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise GPT2Error(f"{path} not found; run again to download the model") from None
    except OSError as e:
        raise GPT2Error(f"cannot read {path}: {e.strerror}") from None
    try:
        metaindex_handle, index_handle = _read_footer(raw)
        # The metaindex block (for filters and stats) is empty in checkpoints; reading it only
        # verifies its CRC, so that every byte outside the footer padding is checked.
        list(_block_entries(_read_block(raw, metaindex_handle)))
        index_block = _read_block(raw, index_handle)
        entries: dict[str, TensorEntry] = {}
        saw_header = False
        for _separator, handle_bytes in _block_entries(index_block):
            data_handle, _ = _block_handle(handle_bytes, 0)
            for key, value in _block_entries(_read_block(raw, data_handle)):
                if key == b"":  # the header sorts first: "" is smaller than every name
                    _check_header(value)
                    saw_header = True
                else:
                    entries[key.decode("utf-8", errors="replace")] = _parse_entry(value)
        if not saw_header:
            raise _Corrupt("no bundle header entry")
    except _Corrupt as e:
        raise GPT2Error(f"{path} is corrupt: {e}; {REDOWNLOAD}") from None
    return entries


# ---------------------------------------------------------------------------------------------
# From index entries to the params tree
# ---------------------------------------------------------------------------------------------

# Per-layer tensors (name under model/h{i}/, shape as a function of n_embd d).
_BLOCK_TENSORS = {
    "ln_1/g": lambda d: (d,),
    "ln_1/b": lambda d: (d,),
    "attn/c_attn/w": lambda d: (1, d, 3 * d),  # "Conv1D" weights: [1, nx, nf], used as x @ w[0]
    "attn/c_attn/b": lambda d: (3 * d,),
    "attn/c_proj/w": lambda d: (1, d, d),
    "attn/c_proj/b": lambda d: (d,),
    "ln_2/g": lambda d: (d,),
    "ln_2/b": lambda d: (d,),
    "mlp/c_fc/w": lambda d: (1, d, 4 * d),
    "mlp/c_fc/b": lambda d: (4 * d,),
    "mlp/c_proj/w": lambda d: (1, 4 * d, d),
    "mlp/c_proj/b": lambda d: (d,),
}
_LAYER_NAME = re.compile(r"model/h(\d+)/(.+)")


def expected_shapes(hparams: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor name OpenAI's GPT-2 checkpoint holds, with the shape hparams imply."""
    d = hparams["n_embd"]
    shapes = {"model/wte": (hparams["n_vocab"], d), "model/wpe": (hparams["n_ctx"], d)}
    for i in range(hparams["n_layer"]):
        for suffix, shape in _BLOCK_TENSORS.items():
            shapes[f"model/h{i}/{suffix}"] = shape(d)
    shapes["model/ln_f/g"] = (d,)
    shapes["model/ln_f/b"] = (d,)
    return shapes


HPARAM_KEYS = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")  # hparams.json's order


def _check_hparams(hparams: dict, where: Path, advice: str = REDOWNLOAD) -> None:
    for key in HPARAM_KEYS:
        value = hparams.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise GPT2Error(f"{where}: {key} must be a positive integer, not {value!r}")
    if hparams["n_embd"] % hparams["n_head"]:
        raise GPT2Error(
            f"{where}: n_embd={hparams['n_embd']} is not divisible by n_head={hparams['n_head']}; "
            f"{advice}"
        )


def _check_entries(entries: dict, shapes: dict, hparams: dict, index_path: Path) -> None:
    """Every expected tensor present as float32 with exactly the expected shape and byte size."""
    hparams_path = index_path.parent / "hparams.json"
    mismatch = (
        f"{index_path} does not match {hparams_path} ({{}}); "
        "delete the model folder and run again to re-download"
    )
    for name, shape in shapes.items():
        if name not in entries:
            raise GPT2Error(mismatch.format(f"tensor {name} is missing"))
        entry = entries[name]
        if entry.shape != shape:
            raise GPT2Error(
                mismatch.format(f"{name} has shape {list(entry.shape)}, expected {list(shape)}")
            )
        if entry.dtype != DT_FLOAT:
            raise GPT2Error(
                f"{index_path}: {name} has dtype code {entry.dtype}, not float32; {REDOWNLOAD}"
            )
        if entry.size != 4 * int(np.prod(shape)) or entry.offset < 0 or entry.shard_id != 0:
            raise GPT2Error(f"{index_path} is corrupt: bad byte range for {name}; {REDOWNLOAD}")
    # Extra tensors (a global step, optimizer slots) are harmless and ignored, except layers
    # beyond n_layer: then hparams.json describes a smaller model than the checkpoint holds.
    for name in entries:
        match = _LAYER_NAME.fullmatch(name)
        if match and int(match[1]) >= hparams["n_layer"] and match[2] in _BLOCK_TENSORS:
            raise GPT2Error(
                mismatch.format(f"it has layer h{match[1]} but n_layer={hparams['n_layer']}")
            )


def load_checkpoint(model_dir, hparams: dict, verify_crc: bool = False) -> dict:
    """Load GPT-2 weights from model_dir as a nested dict of read-only float32 memmap views.

    Shapes (d = n_embd): wte [n_vocab, d], wpe [n_ctx, d], ln_f {g, b} [d], and blocks[i] with
    ln_1, attn.c_attn (w [d, 3d]), attn.c_proj (w [d, d]), ln_2, mlp.c_fc (w [d, 4d]),
    mlp.c_proj (w [4d, d]), each with bias b [nf] and layer norms with gain g and bias b [d].
    With verify_crc=True every tensor's CRC-32C is checked. That reads every page of the file
    (~5 s for 355M), which is why it is off by default: the memory map otherwise costs nothing
    until the forward pass touches the weights. The small index is always fully verified.
    """
    model_dir = Path(model_dir)
    index_path, data_path = model_dir / INDEX_FILE, model_dir / DATA_FILE
    _check_hparams(hparams, model_dir / "hparams.json")
    entries = read_index(index_path)
    shapes = expected_shapes(hparams)
    _check_entries(entries, shapes, hparams, index_path)

    if not data_path.is_file():
        raise GPT2Error(f"{data_path} not found; run again to download the model")
    file_size = data_path.stat().st_size
    needed = max(entries[name].offset + entries[name].size for name in shapes)
    if file_size < needed:
        raise GPT2Error(
            f"{data_path} is truncated ({file_size} bytes, the index needs {needed}); {REDOWNLOAD}"
        )
    # mode="r": the pages are shared with the OS file cache and writing to them is an error.
    data = np.memmap(data_path, dtype=np.uint8, mode="r")

    tensors = {}
    for name, shape in shapes.items():
        entry = entries[name]
        raw = data[entry.offset : entry.offset + entry.size]  # uint8 view, no copy
        if verify_crc and mask_crc(crc32c(raw)) != entry.crc32c:
            raise GPT2Error(f"{data_path}: checksum mismatch in tensor {name}; {REDOWNLOAD}")
        tensors[name] = raw.view("<f4").reshape(shape)  # still a view into the memmap

    def conv(prefix):  # "Conv1D" layer: squeeze [1, nx, nf] -> [nx, nf] (a view, not a copy)
        return {"w": tensors[f"{prefix}/w"][0], "b": tensors[f"{prefix}/b"]}

    def norm(prefix):
        return {"g": tensors[f"{prefix}/g"], "b": tensors[f"{prefix}/b"]}

    blocks = []
    for i in range(hparams["n_layer"]):  # h{i} by number: the index sorts h0, h1, h10, h2, ...
        h = f"model/h{i}"
        blocks.append(
            {
                "ln_1": norm(f"{h}/ln_1"),
                "attn": {"c_attn": conv(f"{h}/attn/c_attn"), "c_proj": conv(f"{h}/attn/c_proj")},
                "ln_2": norm(f"{h}/ln_2"),
                "mlp": {"c_fc": conv(f"{h}/mlp/c_fc"), "c_proj": conv(f"{h}/mlp/c_proj")},
            }
        )
    return {
        "wte": tensors["model/wte"],  # [n_vocab, n_embd]
        "wpe": tensors["model/wpe"],  # [n_ctx, n_embd]
        "blocks": blocks,
        "ln_f": norm("model/ln_f"),
    }


# ---------------------------------------------------------------------------------------------
# Writing: the same format, built front to back
#
# The goal is not just "a file our reader accepts" but the exact bytes TensorFlow's Saver writes
# for the same tensors (tests/test_checkpoint.py checks this against the TF-written fixtures),
# so every choice below copies one in TensorFlow's BundleWriter (tensor_bundle.cc) or its
# LevelDB-derived TableBuilder / BlockBuilder (tensorflow/core/lib/io).
# ---------------------------------------------------------------------------------------------

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
