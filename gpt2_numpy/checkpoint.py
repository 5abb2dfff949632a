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

bench/checkpoint_writer.py (the tests' and benchmarks', not the library's) is the mirror image:
it writes a params tree back out in the same format, byte for byte what TensorFlow's Saver writes
for the same tensors. The CRC-32C is crc32c.py.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from .crc32c import crc32c, mask_crc, unmask_crc
from .errors import DamagedFile, GPT2Error

INDEX_FILE = "model.ckpt.index"
DATA_FILE = "model.ckpt.data-00000-of-00001"

TABLE_MAGIC = 0xDB4775248B80FB57  # LevelDB's kTableMagicNumber, last 8 bytes of every SSTable
FOOTER_LEN = 48  # two BlockHandles padded to 2 * 20 bytes, then the 8-byte magic
BLOCK_TRAILER_LEN = 5  # 1 byte compression type + 4 bytes masked CRC-32C
NO_COMPRESSION = 0  # TensorFlow writes the .index uncompressed; we support nothing else
DT_FLOAT = 1  # TensorFlow's DataType enum value for float32
LITTLE_ENDIAN = 0  # BundleHeaderProto.Endianness.LITTLE



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
        raise DamagedFile(f"{path} is corrupt: {e}") from None
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


def _check_hparams(hparams: dict, where: Path, advice=DamagedFile.REDOWNLOAD) -> None:
    for key in HPARAM_KEYS:
        value = hparams.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise GPT2Error(f"{where}: {key} must be a positive integer, not {value!r}")
    if hparams["n_embd"] % hparams["n_head"]:
        raise DamagedFile(
            f"{where}: n_embd={hparams['n_embd']} is not divisible by n_head={hparams['n_head']}",
            advice)


def _check_entries(entries: dict, shapes: dict, hparams: dict, index_path: Path) -> None:
    """Every expected tensor present as float32 with exactly the expected shape and byte size."""
    hparams_path = index_path.parent / "hparams.json"
    mismatch = f"{index_path} does not match {hparams_path} ({{}})"
    folder_advice = "delete the model folder and run again to re-download"
    for name, shape in shapes.items():
        if name not in entries:
            raise DamagedFile(mismatch.format(f"tensor {name} is missing"), folder_advice)
        entry = entries[name]
        if entry.shape != shape:
            raise DamagedFile(
                mismatch.format(f"{name} has shape {list(entry.shape)}, expected {list(shape)}"),
                folder_advice)
        if entry.dtype != DT_FLOAT:
            raise DamagedFile(f"{index_path}: {name} has dtype code {entry.dtype}, not float32")
        if entry.size != 4 * int(np.prod(shape)) or entry.offset < 0 or entry.shard_id != 0:
            raise DamagedFile(f"{index_path} is corrupt: bad byte range for {name}")
    # Extra tensors (a global step, optimizer slots) are harmless and ignored, except layers
    # beyond n_layer: then hparams.json describes a smaller model than the checkpoint holds.
    for name in entries:
        match = _LAYER_NAME.fullmatch(name)
        if match and int(match[1]) >= hparams["n_layer"] and match[2] in _BLOCK_TENSORS:
            raise DamagedFile(
                mismatch.format(f"it has layer h{match[1]} but n_layer={hparams['n_layer']}"),
                folder_advice)


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
    last = f"model/h{hparams['n_layer'] - 1}/ln_1/g"  # before listing n_layer layers' tensors
    if last not in entries:
        raise DamagedFile(f"{index_path} does not match {model_dir / 'hparams.json'} (tensor "
                          f"{last} is missing)", "delete the model folder and run again to "
                          "re-download")
    shapes = expected_shapes(hparams)
    _check_entries(entries, shapes, hparams, index_path)

    if not data_path.is_file():
        raise GPT2Error(f"{data_path} not found; run again to download the model")
    file_size = data_path.stat().st_size
    needed = max(entries[name].offset + entries[name].size for name in shapes)
    if file_size < needed:
        raise DamagedFile(f"{data_path} is truncated ({file_size} bytes, the index needs {needed})")
    # mode="r": the pages are shared with the OS file cache and writing to them is an error.
    data = np.memmap(data_path, dtype=np.uint8, mode="r")

    tensors = {}
    for name, shape in shapes.items():
        entry = entries[name]
        raw = data[entry.offset : entry.offset + entry.size]  # uint8 view, no copy
        if verify_crc and mask_crc(crc32c(raw)) != entry.crc32c:
            raise DamagedFile(f"{data_path}: checksum mismatch in tensor {name}")
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
