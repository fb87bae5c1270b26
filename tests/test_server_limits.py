"""Hostile requests against the real server (``lookalike serve`` on a loopback port): every bound
the server sets on what a client can make it spend, each checked from the outside.

The server here runs with small limits so each test is cheap; the defaults are in
server/settings.py and the README's settings table.
"""
from __future__ import annotations

import io
import json
import os
import signal
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import serverproc  # noqa: E402

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
KEY_HEADER = f"Authorization: Bearer {KEY}"
HEADER_TIMEOUT_S = 3
BODY_TIMEOUT_S = 3
MAX_CONNECTIONS = 150
MAX_UPLOAD = 256 * 1024
MAX_JSON = 64 * 1024
ENV = {
    "LOOKALIKE_API_KEYS": KEY,
    "LOOKALIKE_AUTH_READS": "true",
    "LOOKALIKE_BACKEND": "torch",
    "LOOKALIKE_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
    "LOOKALIKE_MAX_JSON_BYTES": str(MAX_JSON),
    "LOOKALIKE_MAX_LABELS": "20",
    "LOOKALIKE_MAX_LABEL_CHARS": "60",
    "LOOKALIKE_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
    "LOOKALIKE_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
    "LOOKALIKE_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
    "LOOKALIKE_ACCESS_LOG": "false",
}


def _photo(seed: int, size: int = 96) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def small_index(tiny_model, tmp_path_factory) -> Path:
    """Six products with one random photo each, indexed with the tiny model."""
    from indexer.catalogue import read_catalogue
    from indexer.pipeline import index_catalogue
    from indexer.store import Store

    tmp = tmp_path_factory.mktemp("limits")
    rows = []
    for i in range(6):
        path = tmp / f"p{i}.jpg"
        path.write_bytes(_photo(i, 320))
        rows.append({"id": f"p{i}", "image": str(path), "title": f"product {i}", "category": "things"})
    manifest = tmp / "catalogue.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp / "index"
    with Store.create(out, tiny_model.identity) as store:
        index_catalogue(read_catalogue(manifest), store, tiny_model, workers=0, progress=False)
    return out


class Server:
    def __init__(self, port: int, log: Path, cache: Path, proc: subprocess.Popen):
        self.port, self.log, self.cache, self.proc = port, log, cache, proc
        self.url = f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def server(small_index, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("served")
    port = serverproc.free_port()
    log = tmp / "server.log"
    cache = tmp / "cache"
    proc = serverproc.spawn(small_index, port, dict(ENV, LOOKALIKE_CACHE_DIR=str(cache)), log)
    try:
        serverproc.wait_ready(proc, port, log, timeout_s=180)
        yield Server(port, log, cache, proc)
    finally:
        serverproc.stop(proc)


def _connect(port: int, timeout: float = 10) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP response up to the end of its body. A server that never answers makes this
    raise socket.timeout (the test fails rather than hangs)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body[:length]


def _closed(sock: socket.socket) -> bool:
    """Whether the server has closed ``sock`` (reading past any response it sent first)."""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return True
    except ConnectionResetError:
        return True
    except (BlockingIOError, socket.timeout):
        return False


def _error(body: bytes) -> dict:
    payload = json.loads(body)
    assert set(payload) == {"error"} and set(payload["error"]) == {"code", "message"}, payload
    return payload["error"]


def _multipart(fields: list[tuple[str, str | tuple[str, bytes]]], boundary: str = "b0undary") -> bytes:
    out = b""
    for name, value in fields:
        if isinstance(value, tuple):
            out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{value[0]}\"\r\n"
                    f"Content-Type: application/octet-stream\r\n\r\n").encode() + value[1] + b"\r\n"
        else:
            out += f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n".encode()
    return out + f"--{boundary}--\r\n".encode()


# ------------------------------------------------------------------------------------- bodies
def test_unauthenticated_gigabyte_upload_is_refused_before_its_body(server):
    """A 1 GiB upload without a key gets its 401 after the headers; the server neither reads nor
    spools the body (before the fix it waited for the whole body, then answered)."""
    with _connect(server.port) as s:
        s.sendall(b"POST /v1/products HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b0undary\r\n"
                  b"Content-Length: 1073741824\r\n\r\n" + b"x" * 4096)
        t0 = time.monotonic()
        status, headers, body = _read_response(s)
        assert time.monotonic() - t0 < 5
        assert _closed(s), "the server should close the connection rather than read the unread body"
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert headers["connection"] == "close"
    assert _error(body)["code"] == "unauthorized"


@pytest.mark.parametrize("method, path, body, content_type", [
    ("PATCH", "/v1/products/p1", b"{not json", "application/json"),
    ("POST", "/v1/products", b"--nope\r\n", "multipart/form-data; boundary=b0undary"),
    ("DELETE", "/v1/products/p1", b"", None),
])
def test_malformed_unauthenticated_writes_get_401_not_422(server, method, path, body, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    r = httpx.request(method, server.url + path, content=body, headers=headers, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = httpx.request(method, server.url + path, content=body, headers={**headers, "Authorization": "Bearer wrong"},
                      timeout=10)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"


@pytest.mark.parametrize("path, length, content_type", [
    ("/v1/search/text", 400 * 1024 * 1024, "application/json"),  # a 400 MB text query
    ("/v1/search/image", MAX_UPLOAD + MAX_JSON + 1, "multipart/form-data; boundary=b0undary"),
    ("/v1/products", 2 * 1024 ** 3, "multipart/form-data; boundary=b0undary"),  # with a valid key
])
def test_declared_length_over_the_route_limit_is_413_before_the_body(server, path, length, content_type):
    with _connect(server.port) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: {content_type}\r\n"
                  f"Content-Length: {length}\r\n\r\n".encode())
        status, headers, body = _read_response(s)
        assert _closed(s)
    assert status == 413 and headers["connection"] == "close"
    assert _error(body)["code"] == "too_large"


@pytest.mark.parametrize("path, limit, content_type", [
    ("/v1/search/text", MAX_JSON, "application/json"),
    ("/v1/labels", MAX_UPLOAD + MAX_JSON, "multipart/form-data; boundary=b0undary"),
])
def test_chunked_body_is_cut_off_at_the_limit(server, path, limit, content_type):
    """A chunked body declares no length: the server counts what arrives and answers 413 as soon as it
    passes the limit, without waiting for the rest (before the fix it read the body to its end)."""
    chunk = b"a" * 8192
    with _connect(server.port) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: {content_type}\r\n"
                  f"Transfer-Encoding: chunked\r\n\r\n".encode())
        start = (b'--b0undary\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
                 b"Content-Type: image/jpeg\r\n\r\n") if path == "/v1/labels" else b'{"query": "'
        s.sendall(b"%x\r\n%s\r\n" % (len(start), start))
        for _ in range(limit // len(chunk) + 1):  # just past the limit, then nothing: the body never ends
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        status, headers, body = _read_response(s)
    assert status == 413 and headers["connection"] == "close"
    assert _error(body)["code"] == "too_large"


def test_bodies_under_the_limits_still_work(server):
    r = httpx.post(server.url + "/v1/search/text", json={"query": "a red shoe " * 80, "k": 3}, headers=AUTH, timeout=30)
    assert r.status_code == 200 and "results" in r.json()
    r = httpx.post(server.url + "/v1/search/image?k=2", files={"image": ("q.jpg", _photo(1, 320), "image/jpeg")},
                   headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.json()["results"][0]["id"] == "p1"
    r = httpx.post(server.url + "/v1/search/image", files={"image": ("q.jpg", b"\xff" * (MAX_UPLOAD + 1), "image/jpeg")},
                   headers=AUTH, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"


# ----------------------------------------------------------------------------- slow clients
def test_half_sent_requests_are_closed_and_healthz_still_answers(server):
    """200 clients that send half a request head and then nothing: past max_connections the
    oldest are closed at once, /healthz answers meanwhile, and the rest are closed (with a 408)
    after header_timeout_s. Before the fix uvicorn kept every one of them open for ever."""
    socks = []
    try:
        for _ in range(200):
            s = _connect(server.port)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            socks.append(s)
        time.sleep(0.5)
        t0 = time.monotonic()
        r = httpx.get(server.url + "/healthz", timeout=5)
        healthz_s = time.monotonic() - t0
        assert r.status_code == 200 and healthz_s < 2.0, healthz_s
        for s in socks:
            s.setblocking(False)
        evicted = sum(_closed(s) for s in socks)
        assert evicted >= 200 - MAX_CONNECTIONS, evicted
        time.sleep(HEADER_TIMEOUT_S + 1.5)
        for s in socks:
            s.settimeout(2)
        assert all(_closed(s) for s in socks)
    finally:
        for s in socks:
            s.close()


def test_a_request_head_that_never_ends_gets_408(server):
    with _connect(server.port) as s:
        s.sendall(b"POST /v1/search/text HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        status, _, body = _read_response(s)
        assert HEADER_TIMEOUT_S - 0.5 < time.monotonic() - t0 < HEADER_TIMEOUT_S + 3
    assert status == 408 and _error(body)["code"] == "request_timeout"


def test_a_stalled_body_is_closed(server):
    with _connect(server.port) as s:
        s.sendall(f"POST /v1/search/text HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"query\": ".encode())
        t0 = time.monotonic()
        s.settimeout(BODY_TIMEOUT_S + 5)
        assert _closed(s)
        assert BODY_TIMEOUT_S - 0.5 < time.monotonic() - t0 < BODY_TIMEOUT_S + 3


def test_oversized_request_head_is_a_json_400(server):
    """A head that grows past max_header_bytes (default 16 KiB) before it ends is refused."""
    with _connect(server.port) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (20 * 1024))
        time.sleep(0.2)
        s.sendall(b"\r\n\r\n")
        status, headers, body = _read_response(s)
    assert status == 400 and headers["content-type"] == "application/json"
    assert _error(body)["code"] == "bad_request"


def test_port_in_use_is_a_one_line_error(server, small_index):
    exe = shutil.which("lookalike", path=str(Path(sys.executable).parent))
    r = subprocess.run([exe, "serve", str(small_index), "--port", str(server.port)], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, **ENV))
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"lookalike: error: port {server.port} is in use" in r.stderr
    assert "Traceback" not in r.stderr


# ------------------------------------------------------------------------------ costly reads
def test_labels_are_capped_in_count_and_length(server):
    photo = ("q.jpg", _photo(2), "image/jpeg")
    t0 = time.monotonic()
    r = httpx.post(server.url + "/v1/labels", files={"image": photo}, data={"labels": ["x" * 12000, "shoe"]},
                   headers=AUTH, timeout=60)
    assert r.status_code == 422 and r.json()["error"]["code"] == "label_too_long"
    assert time.monotonic() - t0 < 5  # embedding such a label took 16 s of CPU in the issue's measurement
    r = httpx.post(server.url + "/v1/labels", files={"image": photo},
                   data={"labels": ",".join(f"label {i}" for i in range(21))}, headers=AUTH, timeout=60)
    assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_labels"
    r = httpx.post(server.url + "/v1/labels", files={"image": photo}, data={"labels": "shoe,bag," + "x" * 60},
                   headers=AUTH, timeout=60)
    assert r.status_code == 200 and len(r.json()["labels"]) == 3


def test_label_sets_sent_by_clients_leave_no_files(server):
    cached = server.cache / "labels"
    before = sorted(cached.glob("*.npy"))
    assert len(before) == 1, "the configured label set is cached at start"
    for i in range(5):
        r = httpx.post(server.url + "/v1/labels", files={"image": ("q.jpg", _photo(3), "image/jpeg")},
                       data={"labels": f"cat {i},dog {i},fish {i}"}, headers=AUTH, timeout=60)
        assert r.status_code == 200
    assert sorted(cached.glob("*.npy")) == before


@pytest.mark.parametrize("path", ["/v1/search/image", "/v1/labels"])
def test_two_image_fields_are_refused(server, path):
    r = httpx.post(server.url + path, files=[("image", ("a.jpg", _photo(4), "image/jpeg")),
                                              ("image", ("b.jpg", _photo(5), "image/jpeg"))], headers=AUTH, timeout=60)
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"
    assert "one 'image'" in r.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json", "/v1/categories"])
def test_api_pages_need_a_key_when_reads_do(server, path):
    r = httpx.get(server.url + path, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert httpx.get(server.url + path, headers=AUTH, timeout=10).status_code == 200
    assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200


# ------------------------------------------------------------------------------------ the log
def _tiff(corrupt: bool) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, "TIFF", compression="tiff_lzw")
    data = bytearray(buf.getvalue())
    if corrupt:  # an LZW stream libtiff cannot decode: it reports "Using code not yet in table."
        data[16:200] = b"\xff" * 184
        return bytes(data)
    return bytes(data[:200])  # truncated: Pillow warns "Corrupt EXIF data" (a Python warning)


def test_every_log_line_is_json(server):
    """Pillow's Python warnings, libtiff's C-level messages and uvicorn's own warnings end up in the
    JSON log or nowhere; before the fix they were plain text on stderr."""
    for data in (_tiff(True), _tiff(False)):
        r = httpx.post(server.url + "/v1/search/image", files={"image": ("q.tif", data, "image/tiff")}, headers=AUTH,
                       timeout=30)
        assert 400 <= r.status_code < 500
    with _connect(server.port) as s:  # uvicorn logs "Invalid HTTP request received."
        s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        _read_response(s)
    time.sleep(0.5)
    lines = [line for line in server.log.read_text(errors="replace").splitlines() if line.strip()]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"a log line is not JSON: {line!r}")
    assert any(r["logger"] == "py.warnings" for r in records), "the Pillow warning should be logged as JSON"
    assert any(r["logger"].startswith("uvicorn") for r in records)


# ------------------------------------------------------------------------- in-process caches
def test_thumbnail_cache_is_bounded_by_bytes(small_index, tiny_model):
    """The thumbnail cache keeps at most thumbnail_cache_bytes of JPEGs, whatever their number (a real
    uvicorn server in a thread, so the cache can be looked at). The tokenizer's word cache is bounded too."""
    from conftest import LiveServer
    from indexer.cache import BoundedWordCache
    from server.app import create_app

    limit = 20_000
    app = create_app(small_index, model=tiny_model, thumbnail_cache_items=1000, thumbnail_cache_bytes=limit)
    with LiveServer(app) as live:
        sizes = []
        for i in range(6):
            for size in (64, 128, 256):
                r = httpx.get(f"{live.url}/v1/products/p{i}/image?size={size}", timeout=30)
                assert r.status_code == 200
                sizes.append(len(r.content))
        cache = app.state.engine._thumbnails
        assert sum(sizes) > 2 * limit
        assert 0 < sum(len(v) for v in cache.values()) <= limit
        assert isinstance(app.state.engine.model.tokenizer.cache, BoundedWordCache)


# ------------------------------------------------------------------------------ operations
def test_sigusr1_dumps_every_threads_stack_and_the_server_goes_on(small_index, tmp_path):
    """``kill -USR1`` on ``lookalike serve`` writes each thread's Python stack to its log (what a server
    that stopped answering is doing; scripts/load_test.py asks for it on a timeout) and stops nothing."""
    port = serverproc.free_port()
    log = tmp_path / "server.log"
    proc = serverproc.spawn(small_index, port, dict(ENV, LOOKALIKE_CACHE_DIR=str(tmp_path / "cache")), log)
    try:
        serverproc.wait_ready(proc, port, log, timeout_s=180)
        before = log.stat().st_size
        os.kill(proc.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while "_next_batch" not in log.read_text(errors="replace")[before:] and time.monotonic() < deadline:
            time.sleep(0.1)
        dump = log.read_text(errors="replace")[before:]
        # the event loop's thread and the micro-batcher's idle worker, each with its Python frames
        assert "Thread 0x" in dump and "_next_batch" in dump and "uvicorn" in dump, dump[-3000:]
        assert proc.poll() is None
        r = httpx.post(f"http://127.0.0.1:{port}/v1/search/image", files={"image": ("q.jpg", _photo(1), "image/jpeg")},
                       headers=AUTH, timeout=30)
        assert r.status_code == 200 and r.json()["results"]
    finally:
        serverproc.stop(proc)


# --------------------------------------------------------------------------- stalled writes


@contextmanager
def _own_server(small_index: Path, tmp_path: Path, **settings) -> Iterator[tuple[str, Path]]:
    """``lookalike serve`` on a copy of the index (for tests that write to it or stall it), with ENV and
    ``settings`` (``write_timeout_s=3`` -> ``LOOKALIKE_WRITE_TIMEOUT_S=3``); yields (base URL, index)."""
    index = tmp_path / "index"
    shutil.copytree(small_index, index)
    env = dict(ENV, LOOKALIKE_CACHE_DIR=str(tmp_path / "cache"),
               **{f"LOOKALIKE_{key.upper()}": str(value) for key, value in settings.items()})
    with serverproc.served(index, env, tmp_path / "server.log") as url:
        yield url, index
def test_writes_stuck_behind_a_stalled_write_get_503_and_reads_go_on(small_index, tmp_path):
    """A write that cannot finish (here: another process holds the index database's write lock, as a
    stalled disk or an operator's ``sqlite3`` session would) must not take the server with it. Every
    update waits at most ``write_timeout_s`` in all, whether for SQLite's lock, the store's write lock
    or one of the ``max_concurrent_writes`` slots, then gets 503 ``index_busy`` with ``Retry-After``
    and has written nothing; reads answer throughout. A stall shorter than that only queues them."""
    import sqlite3
    import threading

    with _own_server(small_index, tmp_path, write_timeout_s=3, max_concurrent_writes=2) as (url, index):
        answers: dict[str, tuple[int, dict, float]] = {}

        def patch(name: str, product: str) -> None:
            t0 = time.monotonic()
            r = httpx.patch(f"{url}/v1/products/{product}", json={"title": f"changed by {name}"}, headers=AUTH,
                            timeout=60)
            answers[name] = (r.status_code, {"retry": r.headers.get("retry-after"), **r.json()},
                             time.monotonic() - t0)

        def start(name: str, product: str) -> threading.Thread:
            t = threading.Thread(target=patch, args=(name, product))
            t.start()
            return t

        # 1. a stall longer than write_timeout_s
        blocker = sqlite3.connect(index / "catalogue.sqlite", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # SQLite's write lock, held by another process's connection
        writers = [start("first", "p1")]  # takes the store's write lock, then waits in BEGIN IMMEDIATE
        time.sleep(0.5)
        writers.append(start("second", "p2"))  # waits for the store's write lock
        time.sleep(0.5)
        writers.append(start("third", "p3"))  # both slots taken: waits for one, on the event loop
        time.sleep(0.5)
        t0 = time.monotonic()
        r = httpx.get(f"{url}/v1/products/p4/similar", headers=AUTH, timeout=30)
        read_s = time.monotonic() - t0
        for t in writers:
            t.join(30)
        assert r.status_code == 200 and r.json()["results"], r.text
        assert read_s < 2.0, f"a search took {read_s:.1f} s while writes were stuck"
        for name in ("first", "second", "third"):
            status, body, took = answers[name]
            assert status == 503 and body["error"]["code"] == "index_busy" and body["retry"] == "5", answers
            assert 2.5 < took < 8, answers  # write_timeout_s, in all
        blocker.execute("ROLLBACK")
        titles = {p: httpx.get(f"{url}/v1/products/{p}", headers=AUTH, timeout=10).json()["title"]
                  for p in ("p1", "p2", "p3")}
        assert titles == {"p1": "product 1", "p2": "product 2", "p3": "product 3"}  # nothing written

        # 2. a stall shorter than write_timeout_s: five updates queue behind two slots, none is refused
        answers.clear()
        blocker.execute("BEGIN IMMEDIATE")
        writers = [start(f"queued {i}", f"p{i}") for i in range(5)]
        time.sleep(1.5)
        blocker.execute("ROLLBACK")
        blocker.close()
        for t in writers:
            t.join(30)
        assert {name: a[0] for name, a in answers.items()} == {f"queued {i}": 200 for i in range(5)}, answers
        assert httpx.get(f"{url}/v1/products/p4", headers=AUTH, timeout=10).json()["title"] == "changed by queued 4"

def test_a_client_that_never_reads_its_answers_holds_no_write_slot(small_index, tmp_path):
    """A write slot is given back when the update's work ends, not once its answer is sent: two keep-alive
    connections that pipeline photo downloads and updates but never read (their answers back up in the
    socket buffers) must not lock every other client's updates out (found by a helper's attack: with the
    slot held until the response was sent, every other update got 503 for as long as they stayed open)."""
    with _own_server(small_index, tmp_path, write_timeout_s=5, max_concurrent_writes=2) as (url, index):
        port = int(url.rsplit(":", 1)[1])
        socks: list[socket.socket] = []
        try:
            body = json.dumps({"title": "pipelined"}).encode()
            pair = (f"GET /v1/products/p0/image HTTP/1.1\r\nHost: x\r\n{KEY_HEADER}\r\n\r\n"
                    f"PATCH /v1/products/p1 HTTP/1.1\r\nHost: x\r\n{KEY_HEADER}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
            for _ in range(2):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
                sock.connect(("127.0.0.1", port))
                sock.sendall(pair * 60)
                socks.append(sock)
            time.sleep(3)
            r = httpx.patch(f"{url}/v1/products/p2", json={"title": "another client"}, headers=AUTH, timeout=30)
            assert r.status_code == 200 and r.json()["title"] == "another client", r.text
        finally:
            for sock in socks:
                sock.close()


def test_healthz_answers_while_every_worker_thread_is_taken(small_index, tmp_path):
    """With ``max_concurrent_writes`` raised out of the way, 45 updates stuck behind another process's
    SQLite write lock hold all 40 worker threads that sync routes share (a text search then waits for
    one: more than 20 s, measured on 2026-12-02). ``/healthz`` runs on the event loop and still
    answers: the process is alive, and a liveness probe must not restart it."""
    import sqlite3
    import threading

    with _own_server(small_index, tmp_path, max_concurrent_writes=1000, write_timeout_s=60) as (url, index):
        blocker = sqlite3.connect(index / "catalogue.sqlite", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        codes: list[int] = []

        def patch(i: int) -> None:
            r = httpx.patch(f"{url}/v1/products/p{i % 6}", json={"title": f"t{i}"}, headers=AUTH, timeout=120)
            codes.append(r.status_code)

        writers = [threading.Thread(target=patch, args=(i,)) for i in range(45)]
        for t in writers:
            t.start()
        time.sleep(3)
        t0 = time.monotonic()
        r = httpx.get(f"{url}/healthz", timeout=10)
        assert r.status_code == 200 and time.monotonic() - t0 < 2
        blocker.execute("ROLLBACK")
        blocker.close()
        for t in writers:
            t.join(120)
        assert len(codes) == 45 and set(codes) <= {200, 503}, codes

# --------------------------------------------------------------------------- stalled photo reads
LEASE_HOLDER = r"""
import fcntl, signal, sys
signal.signal(signal.SIGIO, signal.SIG_IGN)  # the kernel's 'another process wants this file' signal
f = open(sys.argv[1], "rb")
fcntl.fcntl(f, fcntl.F_SETLEASE, fcntl.F_WRLCK)
print("leased", flush=True)
sys.stdin.readline()
fcntl.fcntl(f, fcntl.F_SETLEASE, fcntl.F_UNLCK)
"""


@contextmanager
def _stalled_open(path: Path) -> Iterator[None]:
    """Every other process's ``open`` of ``path`` blocks in the kernel while the block runs, as on a hung
    disk or network mount: another process holds a write lease on the file (fcntl F_SETLEASE; Linux
    makes an open that breaks a lease wait until the holder gives it up, or /proc/sys/fs/lease-break-time
    passes, 45 s by default)."""
    holder = subprocess.Popen([sys.executable, "-c", LEASE_HOLDER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "leased", "could not take a file lease"
        yield
    finally:
        holder.stdin.close()
        holder.wait(10)


def test_photo_reads_stuck_on_the_disk_get_503_and_searches_go_on(small_index, tmp_path):
    """Product photos are read from the catalogue's disk when a thumbnail is asked for. Reads that hang
    there (a stalled disk or network mount) must not take the server with it: at most
    ``max_concurrent_photo_reads`` of them hold a thread, and those are not the worker threads that
    searches run on; each photo request answers 503 ``photo_read_timeout`` with ``Retry-After`` within
    ``photo_read_timeout_s``; cached thumbnails and searches answer throughout; once the disk answers,
    so do photo requests. Before this bound, 45 such requests held all 40 worker threads and a text
    search waited for the whole stall."""
    import threading

    with _own_server(small_index, tmp_path, photo_read_timeout_s=2, max_concurrent_photo_reads=2) as (url, _):
        def get(path: str) -> httpx.Response:
            return httpx.get(f"{url}{path}", headers=AUTH, timeout=60)

        assert get("/v1/products/p1/image?size=64").status_code == 200  # read once, then cached
        answers: list[tuple[int, str | None, str, float]] = []

        def fetch() -> None:
            t0 = time.monotonic()
            r = get("/v1/products/p5/image?size=64")
            code = r.json()["error"]["code"] if r.status_code != 200 else ""
            answers.append((r.status_code, r.headers.get("retry-after"), code, time.monotonic() - t0))

        with _stalled_open(small_index.parent / "p5.jpg"):
            readers = [threading.Thread(target=fetch) for _ in range(45)]
            for t in readers:
                t.start()
            time.sleep(1)
            t0 = time.monotonic()
            search = httpx.post(f"{url}/v1/search/text", json={"query": "product", "k": 3}, headers=AUTH, timeout=60)
            search_s = time.monotonic() - t0
            cached = get("/v1/products/p1/image?size=64")
            for t in readers:
                t.join(30)
        assert search.status_code == 200 and search.json()["results"], search.text
        assert search_s < 2.0, f"a text search took {search_s:.1f} s while photo reads were stuck"
        assert cached.status_code == 200 and cached.headers["content-type"] == "image/jpeg"
        assert len(answers) == 45
        for status, retry, code, took in answers:
            assert (status, retry, code) == (503, "5", "photo_read_timeout"), answers
            assert 1.5 < took < 6, answers  # photo_read_timeout_s, in all
        # the disk answers again: the stuck reads return and give their slots back
        deadline = time.monotonic() + 10
        while (r := get("/v1/products/p5/image?size=64")).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg", r.text
