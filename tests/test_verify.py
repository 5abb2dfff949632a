"""gpt2_numpy/verify.py: the data file checked against the index's CRC-32Cs once per version."""
import json
import os
import shutil
import sys
import types

import numpy as np
import pytest

import gpt2_numpy as gpt2
from gpt2_numpy import verify
from gpt2_numpy.checkpoint import DATA_FILE, INDEX_FILE, crc32c, mask_crc, read_index
from conftest import FIXTURES


@pytest.fixture
def folder(tmp_path):
    """A copy of a fixture model folder without any record of a check."""
    dst = tmp_path / "tiny-4h"
    shutil.copytree(FIXTURES / "tiny-4h", dst, ignore=shutil.ignore_patterns(verify.RECORD_FILE))
    return dst


@pytest.fixture
def counted(monkeypatch):
    """Count the bytes that go through the CRC (the NumPy one, whatever is installed)."""
    seen = []

    def crc(data):
        seen.append(len(data))
        return crc32c(data)

    monkeypatch.setattr(verify, "crc32c_function", lambda: ("counted", crc))
    return seen


def flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x20
    path.write_bytes(bytes(data))


def test_the_first_load_checks_every_byte_and_later_loads_none(folder, counted):
    gpt2.load_model(str(folder), progress=False)
    assert sum(counted) == (folder / DATA_FILE).stat().st_size
    record = json.loads((folder / verify.RECORD_FILE).read_text())
    assert record["files"] == verify.file_versions(folder)
    counted.clear()
    gpt2.load_model(str(folder), progress=False)
    assert counted == []
    gpt2.load_model(str(folder), progress=False, verify=True)  # forced: checked again
    assert sum(counted) == (folder / DATA_FILE).stat().st_size
    counted.clear()
    gpt2.load_model(str(folder), progress=False, verify=False)
    (folder / verify.RECORD_FILE).unlink()
    gpt2.load_model(str(folder), progress=False, verify=False)  # skipped, even without a record
    assert counted == [] and not (folder / verify.RECORD_FILE).exists()


@pytest.mark.parametrize("change", ["mtime", "size", "index"])
def test_a_changed_file_is_checked_again(folder, counted, change):
    verify.ensure_verified(folder)
    counted.clear()
    if change == "mtime":
        os.utime(folder / DATA_FILE, ns=(0, 10**18))
    elif change == "size":
        with open(folder / DATA_FILE, "ab") as f:
            f.write(b"\0")  # bytes after the last tensor: harmless, but a different file
    else:
        os.utime(folder / INDEX_FILE, ns=(0, 10**18))
    assert not verify.is_recorded(folder)
    verify.ensure_verified(folder)
    assert counted and verify.is_recorded(folder)


def test_a_flipped_byte_names_the_tensor_and_file_and_deletes_nothing(folder):
    entry = read_index(folder / INDEX_FILE)["model/h1/attn/c_attn/b"]
    flip(folder / DATA_FILE, entry.offset + 5)
    damaged = (folder / DATA_FILE).read_bytes()
    with pytest.raises(gpt2.GPT2Error) as excinfo:
        gpt2.load_model(str(folder), progress=False)
    message = str(excinfo.value)
    assert "\n" not in message
    assert "tensor model/h1/attn/c_attn/b" in message and str(folder / DATA_FILE) in message
    assert "left as it is" in message
    assert (folder / DATA_FILE).read_bytes() == damaged
    assert not (folder / verify.RECORD_FILE).exists()


def test_a_record_that_does_not_parse_or_match_is_no_record(folder):
    for text in ("not json", "[]", json.dumps({"files": {DATA_FILE: {"size": 1}}})):
        (folder / verify.RECORD_FILE).write_text(text)
        assert not verify.is_recorded(folder)
    verify.ensure_verified(folder)
    assert verify.is_recorded(folder)


def test_a_folder_that_cannot_hold_the_record_is_checked_each_time(folder, counted, monkeypatch):
    def refuse(*args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(verify.os, "replace", refuse)
    verify.ensure_verified(folder)
    verify.ensure_verified(folder)
    assert sum(counted) == 2 * (folder / DATA_FILE).stat().st_size
    assert [p.name for p in folder.iterdir() if "crc32c" in p.name] == []  # no temporary left


def test_an_index_entry_past_the_end_of_the_data_is_truncation(folder):
    size = (folder / DATA_FILE).stat().st_size
    with open(folder / DATA_FILE, "r+b") as f:
        f.truncate(size - 3)
    with pytest.raises(gpt2.GPT2Error, match="is truncated"):
        verify.verify_checkpoint(folder)


class FakeGoogleCrc32c(types.ModuleType):
    """Stands in for the google-crc32c package: `implementation` and `value`."""

    def __init__(self, implementation):
        super().__init__("google_crc32c")
        self.implementation, self.calls = implementation, 0

    def value(self, data):
        self.calls += 1
        return crc32c(np.asarray(data))


@pytest.mark.parametrize("installed, expected", [("c", "google-crc32c"), ("python", "numpy"),
                                                 (None, "numpy")])
def test_google_crc32c_is_used_only_with_its_c_code(folder, monkeypatch, installed, expected):
    fake = FakeGoogleCrc32c(installed) if installed else None  # None: the import fails
    monkeypatch.setitem(sys.modules, "google_crc32c", fake)
    name, _ = verify.crc32c_function()
    assert name == expected
    verify.verify_checkpoint(folder)
    if fake is not None:
        assert fake.calls == (len(read_index(folder / INDEX_FILE)) if installed == "c" else 0)


def test_the_real_google_crc32c_agrees_with_ours():
    google_crc32c = pytest.importorskip(
        "google_crc32c", reason="google-crc32c is not installed (the test extra installs it)")
    entries = read_index(FIXTURES / "tiny-3h" / INDEX_FILE)
    data = np.memmap(FIXTURES / "tiny-3h" / DATA_FILE, dtype=np.uint8, mode="r")
    for entry in entries.values():
        raw = data[entry.offset : entry.offset + entry.size]  # a memmap slice, as verify passes
        assert mask_crc(google_crc32c.value(raw)) == entry.crc32c == mask_crc(crc32c(raw))


def test_python_m_gpt2_numpy_verify_checks_and_reports(folder, capsys):
    assert verify.main([str(folder)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{folder}: all tensors match {INDEX_FILE}") and " s)" in out
    flip(folder / DATA_FILE, 10)
    assert verify.main([str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "model/" in err
