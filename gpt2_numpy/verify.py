"""Checking a checkpoint's data file against the CRC-32C its index holds for every tensor, once.

A damaged download (a broken mirror, a bad disk) would otherwise load without complaint and give
wrong text, since the memory map never reads a byte until the forward pass does. Checking means
reading every byte, so it is done once per file version: the first load of a folder checks it
and, if every tensor matches, writes RECORD_FILE next to the files, noting the size and
modification time of the data and index files it checked. A later load whose files still have
that size and mtime trusts the record and costs nothing; any change (a new download, a file
written over) makes the record stale and the next load checks again.

`python -m gpt2_numpy.verify FOLDER` checks a folder on demand and says how long it took.

The CRC-32C comes from the `google-crc32c` package when it is installed with its C code (which
uses the CPU's CRC32 instruction where there is one); otherwise from checkpoint.py's NumPy
implementation, which is slower but needs nothing beyond NumPy.
"""
import json
import os
from pathlib import Path

import numpy as np

from .checkpoint import DATA_FILE, INDEX_FILE, crc32c, mask_crc, read_index
from .errors import DamagedFile, GPT2Error

RECORD_FILE = "crc32c-verified.json"
CHECKED_FILES = (DATA_FILE, INDEX_FILE)


def crc32c_function():
    """(name, fn): google_crc32c.value if its C implementation is installed, else ours."""
    try:
        import google_crc32c
    except ImportError:
        return "numpy", crc32c
    if getattr(google_crc32c, "implementation", None) != "c":  # its pure-Python one is slow
        return "numpy", crc32c
    return "google-crc32c", google_crc32c.value


def file_versions(model_dir: Path) -> dict:
    """{file name: {size, mtime_ns}} of the files a check depends on."""
    versions = {}
    for name in CHECKED_FILES:
        st = (model_dir / name).stat()
        versions[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return versions


def is_recorded(model_dir) -> bool:
    """True if RECORD_FILE says the files, as they are now, were checked."""
    model_dir = Path(model_dir)
    try:
        record = json.loads((model_dir / RECORD_FILE).read_text())
        return record.get("files") == file_versions(model_dir)
    except (OSError, ValueError, AttributeError):
        return False


def verify_checkpoint(model_dir, progress: bool = False) -> None:
    """Check every tensor of model_dir's data file against the index; record success.

    Raises GPT2Error naming the first tensor whose bytes do not match. Nothing is deleted.
    """
    from tqdm import tqdm

    model_dir = Path(model_dir)
    index_path, data_path = model_dir / INDEX_FILE, model_dir / DATA_FILE
    entries = read_index(index_path)  # checks the index's own block CRCs
    try:
        before = file_versions(model_dir)
    except OSError as e:
        raise GPT2Error(f"cannot read {e.filename}: {e.strerror}") from None
    file_size = before[DATA_FILE]["size"]
    _, crc = crc32c_function()
    data = np.memmap(data_path, dtype=np.uint8, mode="r") if file_size else np.zeros(0, np.uint8)
    total = sum(entry.size for entry in entries.values())
    with tqdm(total=total, desc=f"checking {DATA_FILE}", unit="B", unit_scale=True,
              unit_divisor=1024, disable=not progress, leave=False) as bar:
        for name, entry in sorted(entries.items(), key=lambda item: item[1].offset):
            if entry.offset + entry.size > file_size:
                raise DamagedFile(f"{data_path} is truncated ({file_size} bytes, tensor {name} "
                                  f"ends at byte {entry.offset + entry.size})")
            if mask_crc(crc(data[entry.offset : entry.offset + entry.size])) != entry.crc32c:
                raise DamagedFile(f"{data_path}: tensor {name} does not match its CRC-32C in "
                                  f"{INDEX_FILE}, so the file is damaged (it was left as it is)")
            bar.update(entry.size)
    del data  # unmap before anything else reads the file
    if file_versions(model_dir) == before:  # unchanged while it was read: worth remembering
        _write_record(model_dir, {"checked": "CRC-32C of every tensor", "files": before})


def _write_record(model_dir: Path, record: dict) -> None:
    """Write RECORD_FILE atomically; a folder we may not write to is simply checked next time."""
    path = model_dir / RECORD_FILE
    tmp = path.with_name(f".{RECORD_FILE}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def ensure_verified(model_dir, force: bool = False, progress: bool = False) -> None:
    """Check model_dir's data file unless a check of the files as they are was recorded."""
    if force or not is_recorded(model_dir):
        verify_checkpoint(model_dir, progress)


def main(argv=None) -> int:
    """python -m gpt2_numpy.verify FOLDER...: check each model folder now; say what it cost."""
    import argparse
    import sys
    import time

    p = argparse.ArgumentParser(prog="python -m gpt2_numpy.verify",
                                description=main.__doc__.split(": ", 1)[1])
    p.add_argument("folders", nargs="+")
    args = p.parse_args(argv)
    name, _ = crc32c_function()
    for folder in args.folders:
        start = time.perf_counter()
        try:
            verify_checkpoint(folder, progress=sys.stderr.isatty())
        except GPT2Error as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        size = (Path(folder) / DATA_FILE).stat().st_size
        print(f"{folder}: all tensors match {INDEX_FILE} ({size / 1e6:.1f} MB, CRC-32C from "
              f"{name}, {time.perf_counter() - start:.2f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
