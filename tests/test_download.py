"""Tests for gpt2_numpy.download against a tiny HTTP server on 127.0.0.1 (no internet needed).

The server holds a fake 124M model in memory and can misbehave on demand: cut a body short once,
answer 500 a number of times, ignore `Range`, or 404. It records every request, so the tests can
check what went over the wire (or that nothing did).
"""

import hashlib
import json
import random
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gpt2_numpy import download as dl
from gpt2_numpy.errors import GPT2Error

SIZE = "124M"
DATA = "model.ckpt.data-00000-of-00001"
DATA_PATH = f"/{SIZE}/{DATA}"
INDEX_PATH = f"/{SIZE}/model.ckpt.index"


def fake_model() -> dict:
    """{file name: bytes}; the data file spans a few 1 MiB chunks so a cut lands mid-stream."""
    rng = random.Random(0)
    return {
        "hparams.json": json.dumps({"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768,
                                    "n_head": 12, "n_layer": 12}).encode(),
        "encoder.json": json.dumps({"!": 0, "\"": 1, "hello": 2}).encode(),
        "vocab.bpe": b"#version: 0.2\nh e\nhe llo\n",
        "model.ckpt.index": rng.randbytes(5000),
        DATA: rng.randbytes(2 * dl.CHUNK_BYTES + 12345),
    }


class FakeBucket:
    """Server state shared with the handler threads; tests poke the knobs directly."""

    def __init__(self, files: dict):
        self.files = {f"/{SIZE}/{name}": body for name, body in files.items()}
        self.requests = []  # (method, path, Range header or None)
        self.cut_once = {}  # path -> send only this many body bytes, once, then hang up
        self.fail_500 = {}  # path -> answer 500 this many more times
        self.ignore_range = False
        self.lock = threading.Lock()
        self.url = ""

    def requests_for(self, path: str) -> list:
        return [r for r in self.requests if r[1] == path]


class Handler(BaseHTTPRequestHandler):
    def do_HEAD(self):  # the client must never send one; record it so a test would notice
        self._record()
        self.send_error(405)

    def do_GET(self):
        bucket = self.server.bucket
        with bucket.lock:
            self._record()
            if bucket.fail_500.get(self.path, 0) > 0:
                bucket.fail_500[self.path] -= 1
                return self.send_error(500)
            body = bucket.files.get(self.path)
            cut = bucket.cut_once.pop(self.path, None)
        if body is None:
            return self.send_error(404)
        start, status, extra = 0, 200, {}
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if m and not bucket.ignore_range:
            start = int(m.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                return self.end_headers()
            status, extra = 206, {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"}
        payload = body[start:]
        self.send_response(status)
        for key, value in extra.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload if cut is None else payload[:cut])
        # HTTP/1.0 handler: returning closes the socket, so a cut body arrives short

    def _record(self):
        self.server.bucket.requests.append((self.command, self.path, self.headers.get("Range")))

    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def bucket():
    state = FakeBucket(fake_model())
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.bucket = state
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture(autouse=True)
def fast_and_isolated(monkeypatch):
    """No backoff sleeps, hashes of the fake tokenizer files, and no env vars from the user."""
    monkeypatch.setattr(dl, "BACKOFF_S", 0.0)
    fakes = fake_model()
    monkeypatch.setattr(dl, "TOKENIZER_SHA256", {
        name: hashlib.sha256(fakes[name]).hexdigest() for name in ("encoder.json", "vocab.bpe")})
    monkeypatch.delenv(dl.MODELS_DIR_ENV, raising=False)
    monkeypatch.delenv(dl.BASE_URL_ENV, raising=False)


def fetch(bucket, models_dir, **kw):
    kw.setdefault("progress", False)
    return dl.download_model(SIZE, models_dir, base_url=bucket.url, **kw)


def assert_complete(folder):
    expected = fake_model()
    for name in dl.MODEL_FILES:
        assert (folder / name).read_bytes() == expected[name], name
    assert not list(folder.glob("*.part"))


def write_model(folder):
    folder.mkdir(parents=True)
    for name, body in fake_model().items():
        (folder / name).write_bytes(body)


def test_fresh_download_fetches_all_files_small_first(bucket, tmp_path):
    folder = fetch(bucket, tmp_path)
    assert folder == tmp_path / SIZE
    assert_complete(folder)
    assert bucket.requests == [("GET", f"/{SIZE}/{name}", None) for name in dl.MODEL_FILES]


# urllib3 2.x drops the unfinished chunk when a body ends early, so a cut inside the second
# chunk keeps somewhere between one chunk (urllib3 2) and every byte received (urllib3 1.26).
CUT = dl.CHUNK_BYTES + 777


def test_cut_body_leaves_part_and_next_run_resumes(bucket, tmp_path):
    bucket.cut_once[DATA_PATH] = CUT
    with pytest.raises(GPT2Error, match=DATA):
        fetch(bucket, tmp_path, retries=1)
    part = tmp_path / SIZE / (DATA + ".part")
    kept = part.stat().st_size
    assert dl.CHUNK_BYTES <= kept <= CUT  # what arrived is kept...
    assert not (tmp_path / SIZE / DATA).exists()  # ...but never under the final name
    fetch(bucket, tmp_path)
    assert bucket.requests_for(DATA_PATH) == [("GET", DATA_PATH, None),
                                              ("GET", DATA_PATH, f"bytes={kept}-")]
    assert_complete(tmp_path / SIZE)


def test_cut_body_is_resumed_within_one_call(bucket, tmp_path):
    bucket.cut_once[DATA_PATH] = CUT
    fetch(bucket, tmp_path, retries=2)
    first, second = bucket.requests_for(DATA_PATH)
    assert first[2] is None
    assert dl.CHUNK_BYTES <= int(re.fullmatch(r"bytes=(\d+)-", second[2]).group(1)) <= CUT
    assert_complete(tmp_path / SIZE)


def test_stale_part_and_server_ignoring_range_restarts_cleanly(bucket, tmp_path):
    (tmp_path / SIZE).mkdir()
    (tmp_path / SIZE / (DATA + ".part")).write_bytes(b"stale" * 1000)
    bucket.ignore_range = True
    fetch(bucket, tmp_path)
    assert bucket.requests_for(DATA_PATH) == [("GET", DATA_PATH, "bytes=5000-")]
    assert_complete(tmp_path / SIZE)


@pytest.mark.parametrize("extra", [0, 10])
def test_part_at_or_past_the_end_gets_416(bucket, tmp_path, extra):
    """416 + `bytes */TOTAL`: a full-size .part is accepted, an oversized one is re-fetched."""
    (tmp_path / SIZE).mkdir()
    (tmp_path / SIZE / (DATA + ".part")).write_bytes(fake_model()[DATA] + b"x" * extra)
    fetch(bucket, tmp_path)
    assert len(bucket.requests_for(DATA_PATH)) == (1 if extra == 0 else 2)
    assert_complete(tmp_path / SIZE)


def test_server_errors_are_retried(bucket, tmp_path):
    bucket.fail_500[INDEX_PATH] = 2
    fetch(bucket, tmp_path, retries=3)
    assert len(bucket.requests_for(INDEX_PATH)) == 3
    assert_complete(tmp_path / SIZE)


def test_persistent_server_error_names_missing_files_and_keeps_done_ones(bucket, tmp_path):
    bucket.fail_500[INDEX_PATH] = 10**6
    with pytest.raises(GPT2Error) as err:
        fetch(bucket, tmp_path, retries=3)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"{SIZE}/model.ckpt.index" in msg and "500" in msg and DATA in msg
    assert str(tmp_path / SIZE) in msg and dl.BASE_URL_ENV in msg
    assert len(bucket.requests_for(INDEX_PATH)) == 3
    assert not bucket.requests_for(DATA_PATH)  # stopped at the first failing file
    folder, expected = tmp_path / SIZE, fake_model()
    for name in ("hparams.json", "encoder.json", "vocab.bpe"):
        assert (folder / name).read_bytes() == expected[name]
    assert not (folder / "model.ckpt.index").exists()


def test_404_is_not_retried(bucket, tmp_path):
    del bucket.files[INDEX_PATH]
    with pytest.raises(GPT2Error, match="404") as err:
        fetch(bucket, tmp_path, retries=3)
    assert "model.ckpt.index" in str(err.value)
    assert len(bucket.requests_for(INDEX_PATH)) == 1


def test_nothing_listening_fails_fast_with_one_line(tmp_path):
    with socket.socket() as s:  # grab a free port, then close it so connecting is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(GPT2Error) as err:
        dl.download_model(SIZE, tmp_path, base_url=f"http://127.0.0.1:{port}", progress=False,
                          timeout=1, retries=2)
    assert time.monotonic() - t0 < 5
    msg = str(err.value)
    assert "\n" not in msg and "connection refused" in msg
    assert all(name in msg for name in dl.MODEL_FILES)
    assert not (tmp_path / SIZE).exists()  # nothing half-written, and no empty folder left


def test_every_size_that_fails_is_named_in_one_error(tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(dl.BASE_URL_ENV, f"http://127.0.0.1:{port}")
    with pytest.raises(GPT2Error) as err:
        dl.resolve_model_dirs(["355M", "124M"], tmp_path, progress=False)
    msg = str(err.value)
    assert "\n" not in msg and msg.count("connection refused") == 2
    assert str(tmp_path / "355M") in msg and str(tmp_path / "124M") in msg
    assert not (tmp_path / "355M").exists() and not (tmp_path / "124M").exists()


def test_a_failed_download_keeps_what_was_downloaded(bucket, tmp_path):
    data = "model.ckpt.data-00000-of-00001"
    (tmp_path / SIZE).mkdir()
    (tmp_path / SIZE / (data + ".part")).write_bytes(fake_model()[data][:100])  # an earlier run's
    bucket.fail_500[f"/{SIZE}/{data}"] = 10  # the server fails every attempt
    with pytest.raises(GPT2Error):
        fetch(bucket, tmp_path, retries=2)
    assert (tmp_path / SIZE / (data + ".part")).read_bytes() == fake_model()[data][:100]


def test_complete_folder_makes_no_request(bucket, tmp_path):
    write_model(tmp_path / SIZE)
    assert fetch(bucket, tmp_path) == tmp_path / SIZE
    assert dl.resolve_model_dir(SIZE, tmp_path, progress=False) == tmp_path / SIZE
    assert bucket.requests == []


def test_only_missing_files_are_fetched(bucket, tmp_path):
    write_model(tmp_path / SIZE)
    (tmp_path / SIZE / "vocab.bpe").unlink()
    fetch(bucket, tmp_path)
    assert bucket.requests == [("GET", f"/{SIZE}/vocab.bpe", None)]


def test_progress_bar_counts_received_bytes(bucket, tmp_path, monkeypatch):
    bars = []

    class RecordingBar:
        def __init__(self, **kw):
            self.kw, self.n = kw, kw.get("initial", 0)
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            self.n += n

    monkeypatch.setattr(dl, "tqdm", RecordingBar)
    bucket.cut_once[DATA_PATH] = CUT
    fetch(bucket, tmp_path, progress=True)
    size = len(fake_model()[DATA])
    first, second = [b for b in bars if b.kw["desc"] == DATA]
    assert (first.kw["initial"], first.kw["total"]) == (0, size) and 0 < first.n <= CUT
    # the resumed bar starts where the first stopped and ends exactly at the file size
    assert (second.kw["initial"], second.kw["total"], second.n) == (first.n, size, size)
    assert first.kw["unit"] == "B" and not first.kw["disable"]


def test_ctrl_c_leaves_a_resumable_part(bucket, tmp_path, monkeypatch):
    real_tqdm = dl.tqdm

    def interrupting_tqdm(**kw):
        bar = real_tqdm(**kw)
        if kw["desc"] == DATA:
            def update(n):
                raise KeyboardInterrupt
            bar.update = update
        return bar

    monkeypatch.setattr(dl, "tqdm", interrupting_tqdm)
    with pytest.raises(KeyboardInterrupt):
        fetch(bucket, tmp_path)
    part = tmp_path / SIZE / (DATA + ".part")
    kept = part.stat().st_size
    assert kept > 0 and not (tmp_path / SIZE / DATA).exists()
    monkeypatch.setattr(dl, "tqdm", real_tqdm)
    fetch(bucket, tmp_path)
    assert bucket.requests_for(DATA_PATH)[-1][2] == f"bytes={kept}-"
    assert_complete(tmp_path / SIZE)


def test_tokenizer_hash_mismatch_deletes_the_file(bucket, tmp_path, monkeypatch):
    monkeypatch.setitem(dl.TOKENIZER_SHA256, "encoder.json", "0" * 64)
    with pytest.raises(GPT2Error, match="SHA-256") as err:
        fetch(bucket, tmp_path)
    assert "encoder.json" in str(err.value) and "\n" not in str(err.value)
    folder = tmp_path / SIZE
    assert not (folder / "encoder.json").exists()
    assert not (folder / "encoder.json.part").exists()
    assert (folder / "hparams.json").exists()


def test_resolve_unknown_model(tmp_path):
    with pytest.raises(GPT2Error, match=r"unknown model '125M': use one of 124M, 355M"):
        dl.resolve_model_dir("125M", tmp_path)


def test_resolve_folder_path_uses_it_without_network(bucket, tmp_path, monkeypatch):
    monkeypatch.setenv(dl.BASE_URL_ENV, bucket.url)
    write_model(tmp_path / "my-model")
    assert dl.resolve_model_dir(str(tmp_path / "my-model")) == tmp_path / "my-model"
    assert bucket.requests == []


def test_resolve_folder_missing_files_names_them(tmp_path):
    folder = tmp_path / "partial"
    folder.mkdir()
    (folder / "hparams.json").write_text("{}")
    with pytest.raises(GPT2Error) as err:
        dl.resolve_model_dir(str(folder))
    msg = str(err.value)
    assert str(folder) in msg
    assert all(name in msg for name in dl.MODEL_FILES[1:])


def test_resolve_size_without_download_does_not_fetch(bucket, tmp_path):
    with pytest.raises(GPT2Error, match="missing hparams.json"):
        dl.resolve_model_dir(SIZE, tmp_path, download=False)
    assert bucket.requests == []


def test_env_vars_choose_folder_and_mirror(bucket, tmp_path, monkeypatch):
    assert dl.default_models_dir() == dl.Path(dl.__file__).resolve().parents[1] / "weights"
    monkeypatch.setenv(dl.MODELS_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(dl.BASE_URL_ENV, bucket.url + "/")
    assert dl.default_models_dir() == tmp_path / "cache"
    folder = dl.resolve_model_dir(SIZE, progress=False)
    assert folder == tmp_path / "cache" / SIZE
    assert_complete(folder)
    assert len(bucket.requests) == len(dl.MODEL_FILES)
