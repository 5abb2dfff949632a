"""Fetch OpenAI's GPT-2 checkpoint files into a local cache folder, safely and resumably.

Layout: `<models_dir>/<size>/<file>` for the five files in `MODEL_FILES`, where `models_dir` is
`$GPT2_MODELS_DIR` or the repo's `weights/` folder. Two rules keep the cache trustworthy:

1. A file exists under its final name only once it is complete. Bytes are streamed into
   `<file>.part` and renamed with `os.replace` (atomic) after the size matches what the server
   announced, so an interrupted run never leaves a truncated checkpoint that looks finished.
2. A complete file is never fetched again, and a complete folder causes no network traffic at all;
   a leftover `.part` is resumed with an HTTP `Range` request instead of starting from zero.

Every failure reaches the user as a one-line `GPT2Error` that says which files are still missing,
where they should go, and what to try.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from pathlib import Path

import requests
from tqdm import tqdm

from .errors import GPT2Error

MODEL_SIZES = ("124M", "355M", "774M", "1558M")
# Download order: the small files first, so a wrong mirror fails in milliseconds rather than
# after the big data file. `checkpoint` and `model.ckpt.meta` (the TF graph) are not needed.
MODEL_FILES = ("hparams.json", "encoder.json", "vocab.bpe", "model.ckpt.index",
               "model.ckpt.data-00000-of-00001")
DEFAULT_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"  # + "/{size}/{file}"
MODELS_DIR_ENV = "GPT2_MODELS_DIR"  # overrides the default download folder
BASE_URL_ENV = "GPT2_BASE_URL"  # overrides the base URL (a mirror)
# The tokenizer files are identical for every size, so a hash catches a mirror serving junk.
TOKENIZER_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}

# 1 MiB: few Python-level iterations for a 1.4 GB file, little memory. A body cut short loses at
# most the chunk in flight (urllib3 2 buffers it whole), and the next attempt resumes before it.
CHUNK_BYTES = 1 << 20
BACKOFF_S = 1.0  # wait before the 2nd attempt, doubled for each later one (tests set it to 0)


class DownloadError(GPT2Error):
    """One URL could not be fetched; `reason` is short enough to sit in parentheses."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"could not download {url} ({reason})")
        self.url, self.reason = url, reason


class _Retryable(Exception):
    """A failure worth another attempt: network trouble, a 5xx, a short body."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def default_models_dir() -> Path:
    """`$GPT2_MODELS_DIR` if set, else `weights/` next to the `gpt2_numpy` package."""
    env = os.environ.get(MODELS_DIR_ENV)
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[1] / "weights"


def resolve_model_dir(model: str, models_dir=None, download=True, progress=True) -> Path:
    """Turn a model name (a size like "355M" or a folder path) into a folder with MODEL_FILES."""
    path = Path(model).expanduser()
    if path.is_dir():  # an explicit folder wins, even one named like a size
        _require_files(path, "a model folder needs " + ", ".join(MODEL_FILES))
        return path
    if model not in MODEL_SIZES:
        raise GPT2Error(f"unknown model '{model}': use one of {', '.join(MODEL_SIZES)} "
                        f"or a folder holding {', '.join(MODEL_FILES)}")
    if download:
        return download_model(model, models_dir, progress=progress)
    folder = _size_dir(model, models_dir)
    _require_files(folder, "downloading is turned off; allow it or put the files there by hand")
    return folder


def download_model(size, models_dir=None, base_url=None, progress=True, timeout=30,
                   retries=3) -> Path:
    """Make sure `<models_dir>/<size>/` holds all MODEL_FILES, fetching only the missing ones."""
    if size not in MODEL_SIZES:
        raise GPT2Error(f"unknown model size '{size}': use one of {', '.join(MODEL_SIZES)}")
    folder = _size_dir(size, models_dir)
    missing = _missing_files(folder)
    if not missing:
        return folder  # complete: no request at all, not even a HEAD
    _make_folder(folder)  # before any request: a bad models_dir is not a network problem
    base = (base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")
    for i, name in enumerate(missing):
        url = f"{base}/{size}/{name}"
        try:
            download_file(url, folder / name, progress=progress, timeout=timeout, retries=retries,
                          sha256=TOKENIZER_SHA256.get(name))
        except DownloadError as e:
            _remove_if_empty(folder)  # a folder that holds nothing is not left behind
            raise ModelDownloadError(size, folder, missing[i:], url, e.reason) from e
    return folder


class ModelDownloadError(GPT2Error):
    """A model size could not be fetched: which, where its files go, and why."""

    def __init__(self, size: str, folder: Path, missing: list, url: str, reason: str):
        self.size, self.folder, self.missing, self.url, self.reason = (size, folder, missing,
                                                                        url, reason)
        super().__init__(f"could not download {size}/{missing[0]} from {url} ({reason}); "
                         f"{ModelDownloadError.advice([self])}")

    @staticmethod
    def advice(failures) -> str:
        places = " and ".join(f"{', '.join(f.missing)} into {f.folder}" for f in failures)
        return (f"check your network, set {BASE_URL_ENV} to a mirror, or put the files "
                f"{places}")


def resolve_model_dirs(models, models_dir=None, download=True, progress=True) -> list:
    """resolve_model_dir for each model, downloading every missing size before giving up on any,
    so that one error names all of them: [Path] in the order of `models`."""
    folders, failures = [], []
    for model in models:
        try:
            folders.append(resolve_model_dir(model, models_dir, download, progress))
        except ModelDownloadError as e:
            failures.append(e)
    if len(failures) == 1:
        raise failures[0]
    if failures:
        reasons = "; ".join(f"{f.size} from {f.url} ({f.reason})" for f in failures)
        raise GPT2Error(f"could not download {reasons}; {ModelDownloadError.advice(failures)}")
    return folders


def download_file(url, dest: Path, progress=True, timeout=30, retries=3, sha256=None) -> None:
    """Fetch `url` into `dest` via `dest.part`, resuming a leftover `.part`.

    `retries` is the total number of attempts; network errors, timeouts, 5xx answers and short
    bodies are retried, other 4xx answers are not. With `sha256`, the finished bytes must hash to
    it or the download is deleted. Raises DownloadError; a KeyboardInterrupt leaves the `.part`.
    """
    dest = Path(dest)
    if dest.is_file():
        return  # complete files are never fetched again
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(url, f"cannot create {dest.parent}: {e.strerror or e}") from e
    attempts = max(1, retries)
    for attempt in range(attempts):
        if attempt:
            time.sleep(BACKOFF_S * 2 ** (attempt - 1))
        try:
            _fetch_into(url, part, dest.name, progress, timeout)
            break
        except _Retryable as e:
            reason = e.reason
    else:
        raise DownloadError(url, reason if attempts == 1 else f"{reason}, {attempts} attempts")
    if sha256 is not None:
        _check_sha256(url, part, sha256)
    os.replace(part, dest)  # atomic: the final name only ever holds a complete file


def _fetch_into(url, part: Path, name: str, progress: bool, timeout) -> None:
    """One HTTP attempt that leaves `part` complete, or raises _Retryable / DownloadError."""
    have = part.stat().st_size if part.exists() else 0
    # identity: no gzip, so bytes on disk equal bytes counted by Content-Length and Range offsets
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        with requests.get(url, headers=headers, stream=True, timeout=(timeout, timeout)) as resp:
            plan = _plan_write(url, resp, part, have)
            if plan is None:
                return  # the .part already held the whole file
            start, total = plan
            _stream(resp, part, name, start, total, progress)
    except (requests.ConnectionError, requests.Timeout,
            requests.exceptions.ChunkedEncodingError) as e:
        raise _Retryable(_describe(e)) from e
    except requests.RequestException as e:  # a malformed URL and the like: retrying cannot help
        raise DownloadError(url, _describe(e)) from e
    except OSError as e:
        raise DownloadError(url, f"cannot write {part}: {e.strerror or e}") from e
    size = part.stat().st_size
    if total is not None and size != total:
        raise _Retryable(f"received {size} of {total} bytes")  # the next attempt resumes


def _plan_write(url, resp, part: Path, have: int):
    """Decide from the status line where to write: (start offset, expected total size or None).

    None means the existing `.part` is already complete.
    """
    status = resp.status_code
    if status == 416 and have:  # asked for bytes past the end: is the .part exactly the file?
        total = _content_range(resp.headers.get("Content-Range", ""))[1]
        if total == have:
            return None
        part.unlink()
        raise _Retryable("the partial download did not match the server's file")
    if status == 206:  # resuming: append, but only at the offset we asked for
        first, total = _content_range(resp.headers.get("Content-Range", ""))
        if first != have:
            part.unlink()
            raise _Retryable("the server resumed at the wrong offset")
        return have, total
    if status == 200:  # a full body (the server ignored Range, or none was sent): start over
        length = resp.headers.get("Content-Length")
        return 0, int(length) if length and length.isdigit() else None
    if status >= 500:
        raise _Retryable(f"HTTP {status} {resp.reason}")
    raise DownloadError(url, f"HTTP {status} {resp.reason}")


def _stream(resp, part: Path, name: str, start: int, total, progress: bool) -> None:
    """Write the body to `part` from byte `start` on, with a progress bar on stderr."""
    with open(part, "ab" if start else "wb") as f, tqdm(
            total=total, initial=start, desc=name, unit="B", unit_scale=True,
            unit_divisor=1024, disable=not progress, file=sys.stderr) as bar:
        for chunk in resp.iter_content(CHUNK_BYTES):
            f.write(chunk)
            bar.update(len(chunk))  # the last chunk is usually short: count what arrived


def _content_range(header: str):
    """`bytes 100-199/1000` -> (100, 1000), `bytes */1000` -> (None, 1000); unknown -> None."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", header)
    if not m:
        return None, None
    first, total = m.groups()
    return (int(first) if first else None), (int(total) if total != "*" else None)


def _check_sha256(url, part: Path, expected: str) -> None:
    """Delete `part` and raise unless its SHA-256 is `expected`."""
    digest = hashlib.sha256()
    with open(part, "rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        part.unlink()
        raise DownloadError(url, f"SHA-256 {digest.hexdigest()[:12]}... is not the official "
                                 f"{expected[:12]}..., so the file was deleted")


def _describe(exc: requests.RequestException) -> str:
    """A few words for a requests exception; its own message is a multi-line urllib3 dump."""
    text = str(exc)
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.ConnectionError):
        if "refused" in text.lower():
            return "connection refused"
        if any(s in text for s in ("resolve", "getaddrinfo", "Name or service", "nodename")):
            return "host name lookup failed"
        return "connection failed"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "connection dropped mid-transfer"
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else 'bad request'}"


def _size_dir(size: str, models_dir) -> Path:
    return (Path(models_dir).expanduser() if models_dir else default_models_dir()) / size


def _make_folder(folder: Path) -> None:
    """Create the download folder, or say in one line why it cannot be one."""
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                raise GPT2Error(f"{path} is a file, not a folder: models are downloaded into "
                                f"<models_dir>/<size>/, so models_dir must be a folder")
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GPT2Error(f"cannot create the download folder {folder}: {e.strerror or e}") from None


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()  # only succeeds on an empty folder: a resumable .part keeps it
    except OSError:
        pass


def _missing_files(folder: Path) -> list:
    return [name for name in MODEL_FILES if not (folder / name).is_file()]


def _require_files(folder: Path, hint: str) -> None:
    missing = _missing_files(folder)
    if missing:
        raise GPT2Error(f"{folder} is missing {', '.join(missing)}; {hint}")
