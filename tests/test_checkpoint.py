"""Tests for the TensorFlow checkpoint reader (gpt2_numpy/checkpoint.py), its writer
(bench/checkpoint_writer.py) and CRC-32C (crc32c.py).

The fixtures in tests/fixtures/<name>/ were written by real TensorFlow (see make_fixtures.py);
a few edge cases TensorFlow would not produce for us (more than 10 layers, several data blocks,
unknown proto fields, sliced tensors) use a small SSTable writer near the bottom of this file,
independent of write_checkpoint (whose own tests come last). Only NumPy and pytest are needed.
"""

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from bench import checkpoint_writer
from gpt2_numpy import checkpoint, random_params
from gpt2_numpy.checkpoint import DATA_FILE, INDEX_FILE, expected_shapes, load_checkpoint, read_index
from bench.checkpoint_writer import write_checkpoint
from gpt2_numpy.crc32c import crc32c, crc32c_fast, crc32c_simple, mask_crc, unmask_crc
from gpt2_numpy.errors import GPT2Error
from gpt2_numpy.load import load_hparams, load_model

FIXTURES = Path(__file__).parent / "fixtures"
MODELS = ["tiny-3h", "tiny-4h"]


def hparams_of(folder):
    return json.loads((folder / "hparams.json").read_text())


@pytest.fixture
def model_copy(tmp_path):
    """A writable copy of a fixture folder, for tests that damage files."""

    def copy(name="tiny-4h"):
        dst = tmp_path / name
        shutil.copytree(FIXTURES / name, dst)
        return dst

    return copy


def leaves(params):
    """Flatten the params tree back to checkpoint names (conv weights stay squeezed)."""
    out = {"model/wte": params["wte"], "model/wpe": params["wpe"]}
    for i, block in enumerate(params["blocks"]):
        for group, sub in block.items():  # ln_1, attn, ln_2, mlp
            for key, value in sub.items():
                if isinstance(value, dict):  # attn/c_attn/{w,b} ...
                    for leaf, arr in value.items():
                        out[f"model/h{i}/{group}/{key}/{leaf}"] = arr
                else:  # ln_1/{g,b}
                    out[f"model/h{i}/{group}/{key}"] = value
    out["model/ln_f/g"] = params["ln_f"]["g"]
    out["model/ln_f/b"] = params["ln_f"]["b"]
    return out


def root_memmap(arr):
    """Follow .base to the array that owns the mapping (the one np.memmap created)."""
    while isinstance(arr.base, np.ndarray):
        arr = arr.base
    return arr


def assert_one_line_error(excinfo, *words):
    message = str(excinfo.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


# ---------------------------------------------------------------------------------------------
# Reading the genuine TensorFlow fixtures
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_index_lists_exactly_the_gpt2_tensors(name):
    folder = FIXTURES / name
    entries = read_index(folder / INDEX_FILE)
    shapes = expected_shapes(hparams_of(folder))
    assert set(entries) == set(shapes)
    data_size = (folder / DATA_FILE).stat().st_size
    for tensor, entry in entries.items():
        assert entry.shape == shapes[tensor]
        assert entry.dtype == 1  # DT_FLOAT
        assert entry.shard_id == 0
        assert entry.size == 4 * int(np.prod(entry.shape))
        assert 0 <= entry.offset and entry.offset + entry.size <= data_size
    # TensorFlow packs tensors densely: the byte ranges tile the data file exactly.
    assert sum(e.size for e in entries.values()) == data_size


@pytest.mark.parametrize("name", MODELS)
def test_our_crc32c_matches_the_checksums_tensorflow_wrote(name):
    folder = FIXTURES / name
    data = (folder / DATA_FILE).read_bytes()
    for entry in read_index(folder / INDEX_FILE).values():
        tensor_bytes = data[entry.offset : entry.offset + entry.size]
        assert mask_crc(crc32c(tensor_bytes)) == entry.crc32c
        assert mask_crc(crc32c_fast(tensor_bytes)) == entry.crc32c


@pytest.mark.parametrize("name", MODELS)
def test_params_tree_layout_shapes_and_dtypes(name):
    folder = FIXTURES / name
    hp = hparams_of(folder)
    d, n_layer = hp["n_embd"], hp["n_layer"]
    params = load_checkpoint(folder, hp)
    assert set(params) == {"wte", "wpe", "blocks", "ln_f"}
    assert params["wte"].shape == (hp["n_vocab"], d)
    assert params["wpe"].shape == (hp["n_ctx"], d)
    assert len(params["blocks"]) == n_layer
    for block in params["blocks"]:
        assert set(block) == {"ln_1", "attn", "ln_2", "mlp"}
        assert block["attn"]["c_attn"]["w"].shape == (d, 3 * d)
        assert block["attn"]["c_attn"]["b"].shape == (3 * d,)
        assert block["attn"]["c_proj"]["w"].shape == (d, d)
        assert block["attn"]["c_proj"]["b"].shape == (d,)
        assert block["mlp"]["c_fc"]["w"].shape == (d, 4 * d)
        assert block["mlp"]["c_fc"]["b"].shape == (4 * d,)
        assert block["mlp"]["c_proj"]["w"].shape == (4 * d, d)
        assert block["mlp"]["c_proj"]["b"].shape == (d,)
        for ln in ("ln_1", "ln_2"):
            assert block[ln]["g"].shape == block[ln]["b"].shape == (d,)
    assert params["ln_f"]["g"].shape == params["ln_f"]["b"].shape == (d,)
    assert all(arr.dtype == np.float32 for arr in leaves(params).values())


@pytest.mark.parametrize("name", MODELS)
def test_params_are_read_only_views_into_one_memmap(name):
    folder = FIXTURES / name
    params = load_checkpoint(folder, hparams_of(folder))
    root = root_memmap(params["wte"])
    assert isinstance(root, np.memmap)
    assert Path(root.filename).resolve() == (folder / DATA_FILE).resolve()
    assert root.nbytes == (folder / DATA_FILE).stat().st_size
    for tensor, arr in leaves(params).items():
        assert isinstance(arr, np.memmap), tensor
        assert root_memmap(arr) is root, tensor
        assert np.shares_memory(arr, root), tensor
        assert not arr.flags.writeable, tensor


@pytest.mark.parametrize("name", MODELS)
def test_values_equal_what_the_generator_wrote(name):
    folder = FIXTURES / name
    params = load_checkpoint(folder, hparams_of(folder))
    ref = np.load(folder / "reference.npz")
    np.testing.assert_array_equal(params["wte"], ref["wte"])
    flat = leaves(params)
    assert set(flat) == set(ref["param_names"])
    for tensor, (total, weighted) in zip(ref["param_names"], ref["param_checksums"]):
        x = np.asarray(flat[tensor], dtype=np.float64).ravel()
        np.testing.assert_allclose(x.sum(), total, rtol=1e-12, atol=1e-12, err_msg=tensor)
        np.testing.assert_allclose(
            (x * np.cos(np.arange(x.size))).sum(), weighted, rtol=1e-12, atol=1e-12, err_msg=tensor
        )


@pytest.mark.parametrize("name", MODELS)
def test_verify_crc_passes_on_intact_fixtures(name):
    folder = FIXTURES / name
    load_checkpoint(folder, hparams_of(folder), verify_crc=True)


# ---------------------------------------------------------------------------------------------
# Damaged data files
# ---------------------------------------------------------------------------------------------


def test_verify_crc_names_the_tensor_with_a_flipped_byte(model_copy):
    folder = model_copy()
    hp = hparams_of(folder)
    victim = "model/h1/mlp/c_fc/w"
    entry = read_index(folder / INDEX_FILE)[victim]
    data = bytearray((folder / DATA_FILE).read_bytes())
    data[entry.offset + 123] ^= 0x04
    (folder / DATA_FILE).write_bytes(bytes(data))
    load_checkpoint(folder, hp)  # without verification the flip goes unnoticed
    with pytest.raises(GPT2Error) as excinfo:
        load_checkpoint(folder, hp, verify_crc=True)
    assert_one_line_error(excinfo, victim, "checksum", DATA_FILE, "re-download")


@pytest.mark.parametrize("keep", [0, 1, 1000, -4, -1])
def test_truncated_data_file(model_copy, keep):
    folder = model_copy()
    data = (folder / DATA_FILE).read_bytes()
    (folder / DATA_FILE).write_bytes(data[:keep])
    with pytest.raises(GPT2Error) as excinfo:
        load_checkpoint(folder, hparams_of(folder))
    assert_one_line_error(excinfo, "truncated", DATA_FILE, "re-download")


@pytest.mark.parametrize("missing", [INDEX_FILE, DATA_FILE])
def test_missing_file(model_copy, missing):
    folder = model_copy()
    (folder / missing).unlink()
    with pytest.raises(GPT2Error) as excinfo:
        load_checkpoint(folder, hparams_of(folder))
    assert_one_line_error(excinfo, missing)


def test_missing_folder(tmp_path):
    with pytest.raises(GPT2Error):
        load_checkpoint(tmp_path / "nowhere", hparams_of(FIXTURES / "tiny-3h"))
    with pytest.raises(GPT2Error):
        read_index(tmp_path / "nowhere" / INDEX_FILE)


@pytest.mark.parametrize("content, words", [
    (b"[]", "JSON object"),
    (b"[1, 2, 3, 4, 5]", "JSON object"),
    (b"12", "JSON object"),
    (b"", "cannot read"),
    (b"\xff\xfe{}", "cannot read"),
    (b"[" * 100_000 + b"]" * 100_000, "cannot read"),
    (b'{"n_vocab": 307, "n_ctx": true, "n_embd": 32, "n_head": 4, "n_layer": 3}', "n_ctx"),
    (b'{"n_vocab": 307, "n_ctx": 64, "n_embd": 32, "n_head": 4, "n_layer": "3"}', "n_layer"),
])
def test_an_unreadable_hparams_json_is_a_one_line_error(model_copy, content, words):
    folder = model_copy()
    (folder / "hparams.json").write_bytes(content)
    for load in (load_hparams, lambda folder: load_model(str(folder), progress=False)):
        with pytest.raises(GPT2Error) as excinfo:
            load(folder)
        assert_one_line_error(excinfo, str(folder / "hparams.json"), words)


def test_a_huge_n_layer_is_refused_before_the_tensors_are_listed(model_copy):
    """hparams.json's n_layer drives a loop over the expected tensors: 10^12 layers must be
    caught by the index, not by the memory running out."""
    folder = model_copy()
    hp = {**hparams_of(folder), "n_layer": 10**12}
    (folder / "hparams.json").write_text(json.dumps(hp))
    with pytest.raises(GPT2Error) as excinfo:
        load_model(str(folder), progress=False)
    assert_one_line_error(excinfo, "model/h999999999999", "missing")


# ---------------------------------------------------------------------------------------------
# hparams.json that disagrees with the checkpoint
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"n_layer": +1},  # a tensor is missing
        {"n_layer": -1},  # the checkpoint has a layer too many
        {"n_embd": +4},  # every shape is off (and 36 is still divisible by n_head = 4)
        {"n_vocab": -1},
        {"n_ctx": +1},
        {"n_head": +1},  # 32 % 5 != 0
    ],
)
def test_hparams_that_disagree_with_the_index(change):
    folder = FIXTURES / "tiny-4h"
    hp = hparams_of(folder)
    for key, delta in change.items():
        hp[key] += delta
    with pytest.raises(GPT2Error) as excinfo:
        load_checkpoint(folder, hp)
    assert_one_line_error(excinfo)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "12", None, True])
def test_hparams_values_must_be_positive_ints(bad):
    hp = hparams_of(FIXTURES / "tiny-3h")
    hp["n_layer"] = bad
    with pytest.raises(GPT2Error):
        load_checkpoint(FIXTURES / "tiny-3h", hp)


# ---------------------------------------------------------------------------------------------
# Corrupted index files
# ---------------------------------------------------------------------------------------------


def damaged_index(folder, damage):
    raw = bytearray((folder / INDEX_FILE).read_bytes())
    raw = damage(raw)
    (folder / INDEX_FILE).write_bytes(bytes(raw))
    return folder


def flip(pos):
    def damage(raw):
        raw[pos] ^= 0x20
        return raw

    return damage


@pytest.mark.parametrize(
    "damage, words",
    [
        (flip(20), ["CRC"]),  # inside the first data block
        (flip(-1), ["magic"]),
        (flip(-8), ["magic"]),
        (lambda raw: raw[:-10], ["magic"]),  # cut short: the footer is no longer at the end
        (lambda raw: raw[:30], ["short"]),
        (lambda raw: b"", ["short"]),
        (lambda raw: raw + b"\0", ["magic"]),
    ],
)
def test_corrupt_index(model_copy, damage, words):
    folder = damaged_index(model_copy(), damage)
    with pytest.raises(GPT2Error) as excinfo:
        load_checkpoint(folder, hparams_of(folder))
    assert_one_line_error(excinfo, INDEX_FILE, "corrupt", "re-download", *words)


def test_every_single_byte_flip_in_the_index_is_caught_or_harmless(model_copy):
    """Flip each byte in turn: either a clear GPT2Error or (footer padding) the same entries."""
    folder = model_copy("tiny-3h")
    path = folder / INDEX_FILE
    original = path.read_bytes()
    good = read_index(path)
    harmless = []
    for pos in range(len(original)):
        raw = bytearray(original)
        raw[pos] ^= 0x01
        path.write_bytes(bytes(raw))
        try:
            entries = read_index(path)
        except GPT2Error as e:
            assert "\n" not in str(e)
            continue
        assert entries == good, f"flip at byte {pos} silently changed the index"
        harmless.append(pos)
    # Only the zero padding of the footer (after the two block handles) is never looked at.
    assert harmless and min(harmless) > len(original) - 48 and max(harmless) < len(original) - 8


def test_every_truncation_of_the_index_is_caught(model_copy):
    folder = model_copy("tiny-3h")
    path = folder / INDEX_FILE
    original = path.read_bytes()
    for n in range(len(original)):
        path.write_bytes(original[:n])
        with pytest.raises(GPT2Error):
            read_index(path)


# ---------------------------------------------------------------------------------------------
# CRC-32C
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("crc", [crc32c, crc32c_simple, crc32c_fast])
def test_crc32c_known_vectors(crc):
    assert crc(b"123456789") == 0xE3069283
    assert crc(bytes(32)) == 0x8A9136AA
    # RFC 3720 (iSCSI) B.4 test vectors.
    assert crc(b"\xff" * 32) == 0x62A8AB43
    assert crc(bytes(range(32))) == 0x46DD794E
    assert crc(bytes(range(31, -1, -1))) == 0x113FDB5C
    assert crc(b"") == 0
    assert crc(b"a") == 0xC1D04330


def test_crc32c_accepts_bytes_memoryview_and_arrays():
    data = bytes(range(256)) * 40  # 10240 bytes: above the fast-path threshold
    expected = crc32c_simple(data)
    assert crc32c(data) == expected
    assert crc32c(memoryview(data)) == expected
    assert crc32c(bytearray(data)) == expected
    assert crc32c(np.frombuffer(data, dtype=np.uint8)) == expected
    assert crc32c_fast(np.frombuffer(data, dtype=np.uint8)[5:]) == crc32c_simple(data[5:])


PIECE = 1 << 20  # the fast path's piece size; lengths around its multiples are the awkward ones


@pytest.mark.parametrize(
    "n",
    [4, 5, 7, 15, 16, 17, 31, 33, 1000, 4095, 4096, 4097, 65537, PIECE - 1, PIECE, PIECE + 1,
     PIECE + 2, PIECE + 3, PIECE + 4, 2 * PIECE + 3, 2 * PIECE + 12345],
)
def test_fast_crc32c_equals_simple(n):
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    assert crc32c_fast(data) == crc32c_simple(data.tobytes())


def test_fast_crc32c_on_a_memmap_slice(tmp_path):
    data = np.random.default_rng(7).integers(0, 256, 3 * PIECE + 99, dtype=np.uint8)
    path = tmp_path / "blob"
    data.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    assert crc32c(mm[17 : 2 * PIECE + 50]) == crc32c_simple(data[17 : 2 * PIECE + 50].tobytes())


def test_mask_roundtrip():
    rng = np.random.default_rng(0)
    for value in [0, 1, 0xFFFFFFFF, 0xE3069283, *rng.integers(0, 2**32, 100).tolist()]:
        assert unmask_crc(mask_crc(value)) == value
        assert 0 <= mask_crc(value) < 2**32
    assert mask_crc(0) == 0xA282EAD8


# ---------------------------------------------------------------------------------------------
# Hand-built SSTables for what TensorFlow did not write for us
# ---------------------------------------------------------------------------------------------


def varint(n):
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def field_varint(field, n):
    return varint(field << 3) + varint(n)


def field_bytes(field, data):
    return varint(field << 3 | 2) + varint(len(data)) + data


def entry_proto(shape, offset, size, crc, dtype=1, extra=b""):
    dims = b"".join(field_bytes(2, field_varint(1, d)) for d in shape)
    return (
        field_varint(1, dtype)
        + field_bytes(2, dims)
        + (field_varint(4, offset) if offset else b"")  # proto3 omits zeros
        + field_varint(5, size)
        + varint(6 << 3 | 5) + struct.pack("<I", crc)
        + extra
    )


def header_proto(num_shards=1, endianness=0):
    version = field_varint(1, 1)  # VersionDef.producer = 1
    endian = field_varint(2, endianness) if endianness else b""  # proto3 omits LITTLE = 0
    return field_varint(1, num_shards) + endian + field_bytes(3, version)


def block(items, restart_interval):
    """Prefix-compressed entries, restart array, restart count."""
    out, restarts, prev = bytearray(), [], b""
    for i, (key, value) in enumerate(items):
        shared = 0
        if i % restart_interval == 0:
            restarts.append(len(out))
        else:
            while shared < min(len(prev), len(key)) and prev[shared] == key[shared]:
                shared += 1
        out += varint(shared) + varint(len(key) - shared) + varint(len(value))
        out += key[shared:] + value
        prev = key
    restart_array = b"".join(struct.pack("<I", r) for r in restarts)
    return bytes(out) + restart_array + struct.pack("<I", len(restarts))


def sstable(items, block_entries=7, compression=0):
    """items: sorted (key, value) pairs. Several data blocks, then index block, then footer."""
    out, index_items = bytearray(), []

    def write_block(contents):
        trailer_type = bytes([compression])
        crc = mask_crc(crc32c(contents + trailer_type))
        handle = varint(len(out)) + varint(len(contents))
        out.extend(contents + trailer_type + struct.pack("<I", crc))
        return handle

    for start in range(0, len(items), block_entries):
        chunk = items[start : start + block_entries]
        index_items.append((chunk[-1][0], write_block(block(chunk, restart_interval=4))))
    metaindex = write_block(struct.pack("<II", 0, 1))  # empty block: one restart at 0
    index = write_block(block(index_items, restart_interval=1))
    footer = (metaindex + index).ljust(40, b"\0") + struct.pack("<Q", 0xDB4775248B80FB57)
    return bytes(out + footer)


def write_synthetic_model(folder, hp, header=None, extra_items=(), entry_extra=b"", compression=0):
    """A model whose every tensor is filled with a number identifying it (layer i -> i + 0.25)."""
    folder.mkdir(parents=True, exist_ok=True)
    data, items = bytearray(), []
    for name, shape in sorted(expected_shapes(hp).items(), reverse=True):  # file order != key order
        layer = float(name.split("/")[1][1:]) if name.startswith("model/h") else -1.0
        raw = np.full(shape, layer + 0.25, dtype="<f4").tobytes()
        proto = entry_proto(shape, len(data), len(raw), mask_crc(crc32c(raw)), extra=entry_extra)
        items.append((name.encode(), proto))
        data += raw
    items += list(extra_items)
    items.append((b"", header if header is not None else header_proto()))
    items.sort()
    (folder / INDEX_FILE).write_bytes(sstable(items, compression=compression))
    (folder / DATA_FILE).write_bytes(bytes(data))
    return folder


SMALL = {"n_vocab": 5, "n_ctx": 3, "n_embd": 4, "n_head": 2, "n_layer": 12}


def test_layers_are_ordered_by_number_not_by_key(tmp_path):
    """Keys sort h0, h1, h10, h11, h2, ...; blocks[i] must still be layer i."""
    folder = write_synthetic_model(tmp_path / "m", SMALL)
    params = load_checkpoint(folder, SMALL, verify_crc=True)
    for i, block in enumerate(params["blocks"]):
        assert np.all(block["mlp"]["c_fc"]["w"] == i + 0.25)
        assert np.all(block["ln_1"]["g"] == i + 0.25)
    assert np.all(params["wte"] == -0.75)


def test_unknown_proto_fields_and_harmless_extra_tensors_are_skipped(tmp_path):
    unknown = (
        field_varint(15, 7)  # varint
        + field_bytes(14, b"xyz")  # length-delimited
        + varint(13 << 3 | 1) + bytes(8)  # fixed64
        + varint(12 << 3 | 5) + bytes(4)  # fixed32
    )
    extras = [
        (b"global_step", entry_proto((), 0, 8, 0, dtype=9)),  # int64 scalar
        (b"model/wte/Adam", entry_proto((5, 4), 0, 80, 0)),  # an optimizer slot
    ]
    folder = write_synthetic_model(tmp_path / "m", SMALL, entry_extra=unknown, extra_items=extras)
    load_checkpoint(folder, SMALL, verify_crc=True)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"header": header_proto(num_shards=2)}, ["shards"]),
        ({"header": header_proto(endianness=1)}, ["big-endian"]),
        ({"entry_extra": field_bytes(7, b"")}, ["sliced"]),
        ({"compression": 1}, ["compressed"]),
    ],
)
def test_unsupported_checkpoints_are_rejected(tmp_path, kwargs, words):
    folder = write_synthetic_model(tmp_path / "m", SMALL, **kwargs)
    with pytest.raises(GPT2Error) as excinfo:
        load_checkpoint(folder, SMALL)
    assert_one_line_error(excinfo, *words)


def test_wrong_dtype_is_rejected(tmp_path):
    folder = write_synthetic_model(tmp_path / "m", SMALL)
    entries = read_index(folder / INDEX_FILE)
    # Re-write the index with wte claiming to be float64 (DT_DOUBLE = 2).
    items = [(b"", header_proto())]
    for name, e in entries.items():
        dtype = 2 if name == "model/wte" else 1
        items.append((name.encode(), entry_proto(e.shape, e.offset, e.size, e.crc32c, dtype=dtype)))
    (folder / INDEX_FILE).write_bytes(sstable(sorted(items)))
    with pytest.raises(GPT2Error) as excinfo:
        load_checkpoint(folder, SMALL)
    assert_one_line_error(excinfo, "model/wte", "float32")


# ---------------------------------------------------------------------------------------------
# Writing checkpoints
# ---------------------------------------------------------------------------------------------

WRITTEN_FILES = {INDEX_FILE, DATA_FILE, "hparams.json", "checkpoint"}


def data_blocks(index_path):
    """[(separator key, [keys of that data block])] straight from the SSTable's index block."""
    raw = index_path.read_bytes()
    _, index_handle = checkpoint._read_footer(raw)
    blocks = []
    entries, read_block = checkpoint._block_entries, checkpoint._read_block
    for separator, handle_bytes in entries(read_block(raw, index_handle)):
        handle, _ = checkpoint._block_handle(handle_bytes, 0)
        keys = [key for key, _ in entries(read_block(raw, handle))]
        blocks.append((separator, keys))
    return blocks


def assert_same_params(actual, expected):
    flat_actual, flat_expected = leaves(actual), leaves(expected)
    assert flat_actual.keys() == flat_expected.keys()
    for tensor, arr in flat_expected.items():
        assert flat_actual[tensor].dtype == np.float32, tensor
        np.testing.assert_array_equal(flat_actual[tensor], arr, err_msg=tensor)


@pytest.mark.parametrize("name", MODELS)
def test_written_checkpoint_is_byte_identical_to_tensorflows(tmp_path, name):
    """Same tensors in, same bytes out: header and entry protos, prefix compression, restart
    arrays, the index block's separator key "n", block CRCs, footer and data layout all match."""
    folder = FIXTURES / name
    hp = hparams_of(folder)
    write_checkpoint(tmp_path / "out", hp, load_checkpoint(folder, hp))
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == WRITTEN_FILES  # no tokenizer, no temporary files
    for file in (INDEX_FILE, DATA_FILE, "checkpoint"):
        assert (out / file).read_bytes() == (folder / file).read_bytes(), file
    assert len((out / "checkpoint").read_bytes()) == 77
    # hparams.json: same values, in OpenAI's layout (the fixtures' copy lacks the final newline).
    assert json.loads((out / "hparams.json").read_text()) == hp
    assert (out / "hparams.json").read_text() == json.dumps(hp, indent=2) + "\n"


TWELVE = {"n_vocab": 13, "n_ctx": 7, "n_embd": 8, "n_head": 2, "n_layer": 12}


def test_round_trip_of_random_params_with_two_digit_layers(tmp_path):
    params = random_params(TWELVE, seed=3)
    write_checkpoint(tmp_path / "m", TWELVE, params)
    loaded = load_checkpoint(tmp_path / "m", TWELVE, verify_crc=True)
    assert_same_params(loaded, params)
    assert json.loads((tmp_path / "m" / "hparams.json").read_text()) == TWELVE
    # The data file is in bytewise key order (h10 and h11 before h2), like TensorFlow's.
    entries = read_index(tmp_path / "m" / INDEX_FILE)
    by_offset = sorted(entries, key=lambda tensor: entries[tensor].offset)
    assert by_offset == sorted(entries) and by_offset.index("model/h11/ln_2/g") < by_offset.index(
        "model/h2/attn/c_attn/b"
    )


def test_rewriting_a_loaded_checkpoint_in_place(tmp_path):
    """The old data file is memory-mapped while its replacement is written: os.replace leaves
    the mapping on the old file, so the loaded arrays stay valid and the output is intact."""
    folder = tmp_path / "m"
    write_checkpoint(folder, TWELVE, random_params(TWELVE, seed=1))
    before = load_checkpoint(folder, TWELVE)
    copy = {tensor: np.array(arr) for tensor, arr in leaves(before).items()}
    write_checkpoint(folder, TWELVE, before)  # same folder, from its own memmap
    after = load_checkpoint(folder, TWELVE, verify_crc=True)
    for tensor, arr in leaves(after).items():
        np.testing.assert_array_equal(arr, copy[tensor], err_msg=tensor)
    assert {p.name for p in folder.iterdir()} == WRITTEN_FILES


def test_float64_params_are_stored_as_float32(tmp_path):
    params = random_params(TWELVE, seed=2)
    as64 = {tensor: arr.astype(np.float64) * 1.1 for tensor, arr in leaves(params).items()}
    tree64 = {
        "wte": as64["model/wte"],
        "wpe": as64["model/wpe"],
        "ln_f": {"g": as64["model/ln_f/g"], "b": as64["model/ln_f/b"]},
        "blocks": [
            {
                group: {
                    key: {leaf: as64[f"model/h{i}/{group}/{key}/{leaf}"] for leaf in value}
                    if isinstance(value, dict)
                    else as64[f"model/h{i}/{group}/{key}"]
                    for key, value in sub.items()
                }
                for group, sub in block.items()
            }
            for i, block in enumerate(params["blocks"])
        ],
    }
    write_checkpoint(tmp_path / "m", TWELVE, tree64)
    loaded = leaves(load_checkpoint(tmp_path / "m", TWELVE, verify_crc=True))
    for tensor, arr in as64.items():
        np.testing.assert_array_equal(loaded[tensor], arr.astype(np.float32), err_msg=tensor)


def test_small_blocks_split_the_index_into_many_data_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_writer, "TABLE_BLOCK_SIZE", 64)  # ~1 entry per block instead of 256 kB
    params = random_params(TWELVE, seed=4)
    write_checkpoint(tmp_path / "m", TWELVE, params)
    blocks = data_blocks(tmp_path / "m" / INDEX_FILE)
    assert len(blocks) > 50
    keys = [key for _, block_keys in blocks for key in block_keys]
    assert keys == sorted(keys) and keys[0] == b"" and len(keys) == 1 + len(expected_shapes(TWELVE))
    # Each separator lies between its block's last key and the next block's first key.
    for (separator, block_keys), (_, next_keys) in zip(blocks, blocks[1:] + [(None, [None])]):
        assert block_keys[-1] <= separator
        assert next_keys[0] is None or separator < next_keys[0]
    assert_same_params(load_checkpoint(tmp_path / "m", TWELVE, verify_crc=True), params)


def test_separator_keys_follow_leveldb():
    sep, succ = checkpoint_writer._shortest_separator, checkpoint_writer._short_successor
    assert sep(b"model/h1/mlp", b"model/h3") == b"model/h2"  # bump the first differing byte
    assert sep(b"model/h1/mlp", b"model/h2") == b"model/h1/mlp"  # h2 would not be < limit
    assert sep(b"model/h1", b"model/h1/b") == b"model/h1"  # a prefix: kept as it is
    assert sep(b"a\xff\xff", b"b") == b"a\xff\xff"
    assert succ(b"model/wte") == b"n"  # the key in every GPT-2 index block
    assert succ(b"\xff\xffa") == b"\xff\xffb"
    assert succ(b"\xff\xff") == b"\xff\xff"


def set_leaf(params, path, value):
    node = params
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


@pytest.mark.parametrize(
    "path, value, tensor",
    [
        (["blocks", 1, "attn", "c_attn", "w"], np.zeros((24, 8)), "model/h1/attn/c_attn/w"),
        (["blocks", 2, "mlp", "c_proj", "w"], np.zeros((1, 32, 8)), "model/h2/mlp/c_proj/w"),
        (["wte"], np.zeros((12, 8), np.float32), "model/wte"),
        (["ln_f", "b"], np.zeros(8, np.int64), "model/ln_f/b"),
        (["blocks", 0, "ln_2"], {"g": np.ones(8, np.float32)}, "model/h0/ln_2/b"),
    ],
)
def test_bad_params_are_rejected_before_anything_is_written(tmp_path, path, value, tensor):
    hp = dict(TWELVE, n_layer=3)
    params = random_params(hp, seed=0)
    set_leaf(params, path, value)
    with pytest.raises(GPT2Error) as excinfo:
        write_checkpoint(tmp_path / "new", hp, params)
    assert_one_line_error(excinfo, tensor)
    assert not (tmp_path / "new").exists()


def test_wrong_layer_count_and_hparams_are_rejected(tmp_path):
    params = random_params(TWELVE, seed=0)
    with pytest.raises(GPT2Error) as excinfo:
        write_checkpoint(tmp_path / "new", dict(TWELVE, n_layer=11), params)
    assert_one_line_error(excinfo, "12 blocks", "n_layer=11")
    with pytest.raises(GPT2Error) as excinfo:
        write_checkpoint(tmp_path / "new", dict(TWELVE, n_head=3), params)
    assert_one_line_error(excinfo, "n_head=3")
    assert not (tmp_path / "new").exists()


def test_bad_params_leave_an_existing_checkpoint_untouched(tmp_path):
    folder = tmp_path / "m"
    write_checkpoint(folder, TWELVE, random_params(TWELVE, seed=5))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    params = random_params(TWELVE, seed=6)
    params["blocks"][11]["ln_1"]["g"] = np.zeros(9, np.float32)
    with pytest.raises(GPT2Error) as excinfo:
        write_checkpoint(folder, TWELVE, params)
    assert_one_line_error(excinfo, "model/h11/ln_1/g", "[9]", "[8]")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_failure_mid_write_leaves_old_files_and_no_temporary_ones(tmp_path, monkeypatch):
    """Disk full halfway through the data file: GPT2Error, and the folder is exactly as before."""
    folder = tmp_path / "m"
    write_checkpoint(folder, TWELVE, random_params(TWELVE, seed=7))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    real_crc32c, calls = checkpoint_writer.crc32c, []

    def failing_crc32c(data):
        calls.append(1)
        if len(calls) == 40:  # well into the data file: 40th of 148 tensors
            raise OSError(28, "No space left on device")
        return real_crc32c(data)

    monkeypatch.setattr(checkpoint_writer, "crc32c", failing_crc32c)
    with pytest.raises(GPT2Error) as excinfo:
        write_checkpoint(folder, TWELVE, random_params(TWELVE, seed=8))
    assert_one_line_error(excinfo, "No space left on device")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
