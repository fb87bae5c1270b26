"""Tests for photos named by URL: indexer.fetch against a real HTTP server on 127.0.0.1.

The server (http.server in a thread, loopback only) serves JPEGs of the generated fixture catalogue and
the ways a shop's image host goes wrong: 404, 5xx/429 that recover, a reply slower
than the read timeout, a body that trickles in forever, bodies over the size limit
(announced by Content-Length, or chunked with no length), redirects and a redirect
loop. The timeouts are shrunk with monkeypatch so the whole file runs in seconds.
The last test indexes a manifest that mixes local files and such URLs.
"""
from __future__ import annotations

import hashlib
import io
import json
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from PIL import Image

from indexer import fetch
from indexer.catalogue import read_catalogue
from indexer.fetch import fetch_url
from indexer.images import ImageError, open_image
from indexer.pipeline import index_catalogue
from indexer.store import Store

pytestmark = pytest.mark.integration

SLOW_S = 2.0  # the slow endpoint waits this long before answering
DRIP_INTERVAL_S = 0.1  # the trickling endpoint sends one byte this often ...
DRIP_FOR_S = 15.0  # ... for this long, then ends its body normally


class PhotoHost(ThreadingHTTPServer):
    """A loopback image host: ``photos`` maps a name to JPEG bytes; ``hits`` counts requests per path."""

    daemon_threads = True
    block_on_close = False  # handlers of the slow endpoints may still be sleeping at shutdown

    def __init__(self, photos: dict[str, bytes]):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.photos = photos
        self.hits: Counter[str] = Counter()
        self.hosts: list[str | None] = []  # the Host header of each request
        self.lock = threading.Lock()

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # clients hang up on purpose here
            super().handle_error(request, client_address)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: PhotoHost

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        with self.server.lock:
            self.server.hits[self.path] += 1
            self.server.hosts.append(self.headers.get("Host"))
            hits = self.server.hits[self.path]
        parts = self.path.strip("/").split("/")
        try:
            self._route(parts, hits)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up: that is what several endpoints are for

    def _route(self, parts: list[str], hits: int) -> None:
        kind = parts[0]
        if kind == "photo" and parts[1] in self.server.photos:
            self._send(200, self.server.photos[parts[1]])
        elif kind == "flaky":  # /flaky/STATUS/PHOTO/TOKEN: STATUS on the first request, then the photo
            if hits == 1:
                self._send(int(parts[1]), b"try again later", "text/plain")
            else:
                self._send(200, self.server.photos[parts[2]])
        elif kind == "status":  # /status/CODE: always CODE
            self._send(int(parts[1]), b"no", "text/plain")
        elif kind == "slow":
            time.sleep(SLOW_S)
            self._send(200, next(iter(self.server.photos.values())))
        elif kind == "drip":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            end = time.monotonic() + DRIP_FOR_S
            while time.monotonic() < end:
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(DRIP_INTERVAL_S)
        elif kind == "claims-huge":  # announces 60 MiB, sends 1 KiB
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(60 * 1024 * 1024))
            self.end_headers()
            self.wfile.write(b"\xff" * 1024)
            self.close_connection = True
        elif kind == "chunked":  # /chunked/N: N chunks of 1000 bytes, no Content-Length
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(int(parts[1])):
                self.wfile.write(b"3e8\r\n" + b"\xab" * 1000 + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif kind == "loop":
            self._redirect(self.path)
        elif kind == "redirect":  # /redirect/PHOTO
            self._redirect(f"/photo/{parts[1]}")
        elif kind == "redirect-abs":  # /redirect-abs/PHOTO: to the photo on 127.0.0.1, by absolute URL
            self._redirect(f"http://127.0.0.1:{self.server.server_address[1]}/photo/{parts[1]}?hop=2")
        elif kind == "to-ftp":
            self._redirect("ftp://127.0.0.1/photo.jpg")
        else:
            self._send(404, b"not found", "text/plain")

    def _send(self, status: int, body: bytes, content_type: str = "image/jpeg") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture(scope="module")
def photo_files(fixture_catalogue: Path) -> list[Path]:
    """Ten JPEGs of the generated fixture catalogue, each of another product."""
    rows = [json.loads(line) for line in fixture_catalogue.read_text().splitlines()]
    seen, files = set(), []
    for r in rows:
        if r["id"] not in seen and r["image"].endswith(".jpg"):
            seen.add(r["id"])
            files.append(Path(r["image"]))
    assert len(files) >= 10
    return files[:10]


@pytest.fixture(scope="module")
def host(photo_files):
    """The photo host, serving photo_files[5:] as /photo/u0.jpg, /photo/u1.jpg, ..."""
    photos = {f"u{i}.jpg": p.read_bytes() for i, p in enumerate(photo_files[5:])}
    server = PhotoHost(photos)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def fast_network(monkeypatch):
    """Short timeouts and back-off, and no proxy: every request goes straight to 127.0.0.1."""
    monkeypatch.setattr(fetch, "READ_TIMEOUT_S", 0.5)
    monkeypatch.setattr(fetch, "CONNECT_TIMEOUT_S", 0.5)
    monkeypatch.setattr(fetch, "TOTAL_TIMEOUT_S", 1.5)
    monkeypatch.setattr(fetch, "RETRY_BACKOFF_S", 0.05)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


def _fails(url: str, reason: str, **kw) -> tuple[ImageError, float]:
    kw.setdefault("allow_private", True)  # the photo host listens on 127.0.0.1
    t0 = time.monotonic()
    with pytest.raises(ImageError) as e:
        fetch_url(url, **kw)
    assert e.value.reason == reason, str(e.value)
    return e.value, time.monotonic() - t0


# --------------------------------------------------------------------------- fetch_url


def test_fetches_a_real_jpeg(host):
    data = fetch_url(host.url("/photo/u0.jpg"), max_bytes=50 * 1024 * 1024, allow_private=True)
    assert data == host.photos["u0.jpg"]
    image = open_image(data)
    assert image.mode == "RGB" and min(image.size) > 100


def test_a_body_of_exactly_max_bytes_is_accepted(host):
    photo = host.photos["u1.jpg"]
    assert fetch_url(host.url("/photo/u1.jpg"), max_bytes=len(photo), allow_private=True) == photo


def test_404_fails_at_once(host):
    err, _ = _fails(host.url("/status/404/unit"), "download_failed", max_bytes=10**6)
    assert "HTTP 404" in str(err)
    assert host.hits["/status/404/unit"] == 1  # a client error is not retried


@pytest.mark.parametrize("status", [500, 503, 429])
def test_a_server_error_is_retried_and_then_succeeds(host, status):
    path = f"/flaky/{status}/u2.jpg/retried"
    assert fetch_url(host.url(path), max_bytes=10**7, allow_private=True) == host.photos["u2.jpg"]
    assert host.hits[path] == 2


def test_a_persistent_server_error_gives_up_after_the_retries(host):
    err, _ = _fails(host.url("/status/502/unit"), "download_failed", max_bytes=10**6, retries=2)
    assert "HTTP 502" in str(err) and "after 3 tries" in str(err)
    assert host.hits["/status/502/unit"] == 3


def test_a_reply_slower_than_the_read_timeout_fails(host):
    before = host.hits["/slow"]
    err, took = _fails(host.url("/slow"), "download_failed", max_bytes=10**7, retries=1)
    assert "ReadTimeout" in str(err) and "after 2 tries" in str(err)
    assert host.hits["/slow"] - before == 2
    assert took < 2 * SLOW_S  # it did not wait for the answer


def test_a_trickling_body_is_abandoned_after_the_total_timeout(host):
    # each byte comes well within the read timeout, so only a total deadline ends this
    err, took = _fails(host.url("/drip"), "download_failed", max_bytes=10**7, retries=2)
    assert "still downloading" in str(err)
    assert took < fetch.TOTAL_TIMEOUT_S + 2.0 < DRIP_FOR_S
    assert host.hits["/drip"] == 1  # no retry starts after the deadline


def test_too_large_by_content_length(host):
    photo = host.photos["u0.jpg"]
    err, _ = _fails(host.url("/photo/u0.jpg"), "too_large", max_bytes=len(photo) - 1)
    assert str(len(photo)) in str(err)
    # the header alone decides: the 60 MiB announced are never read
    err, took = _fails(host.url("/claims-huge"), "too_large", max_bytes=50 * 1024 * 1024)
    assert str(60 * 1024 * 1024) in str(err) and took < 1.0


def test_too_large_chunked_without_length(host):
    with httpx.stream("GET", host.url("/chunked/3")) as r:  # the endpoint really sends no length
        assert "content-length" not in r.headers and r.headers["transfer-encoding"] == "chunked"
        assert len(r.read()) == 3000
    assert fetch_url(host.url("/chunked/5"), max_bytes=5000, allow_private=True) == b"\xab" * 5000
    err, _ = _fails(host.url("/chunked/20"), "too_large", max_bytes=5000)
    assert "5000-byte limit" in str(err)


def test_redirects_are_followed(host):
    assert fetch_url(host.url("/redirect/u3.jpg"), max_bytes=10**7, allow_private=True) == host.photos["u3.jpg"]


def test_a_redirect_loop_fails_without_retrying(host):
    err, _ = _fails(host.url("/loop/unit"), "download_failed", max_bytes=10**6, retries=2)
    assert "redirect" in str(err).lower()
    # at most MAX_REDIRECTS redirects are followed; the same loop is not walked again on a retry
    assert host.hits["/loop/unit"] == fetch.MAX_REDIRECTS + 1


def test_a_redirect_to_another_scheme_fails(host):
    err, _ = _fails(host.url("/to-ftp"), "download_failed", max_bytes=10**6, retries=0)
    assert "ftp" in str(err).lower()


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/photo.jpg", "file:///etc/passwd", "http://", "http:///photo.jpg",
                                 "http://[::1/photo.jpg", "127.0.0.1/photo.jpg"])
def test_bad_urls_are_refused_without_a_request(host, url):
    before = sum(host.hits.values())
    err, took = _fails(url, "bad_url", max_bytes=10**6)
    assert took < 0.2  # no try, no back-off
    assert sum(host.hits.values()) == before


def test_a_closed_port_fails_after_the_retries(host):
    import socket

    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err, _ = _fails(f"http://127.0.0.1:{port}/photo.jpg", "download_failed", max_bytes=10**6, retries=1)
    assert "ConnectError" in str(err) and "after 2 tries" in str(err)


# --------------------------------------------------------------------------- addresses that are not public


@pytest.mark.parametrize("where", ["127.0.0.1", "localhost", "[::1]", "2130706433", "0x7f.1", "127.1",
                                   "[::ffff:127.0.0.1]", "0.0.0.0"])
def test_loopback_is_refused_by_default_in_any_spelling(host, where):
    """The photo host answers on 127.0.0.1; none of these spellings of it is fetched."""
    port = host.server_address[1]
    path = f"/photo/u0.jpg?spelling={where}"
    url = f"http://{where}:{port}{path}"
    with pytest.raises(ImageError) as e:
        fetch_url(url, max_bytes=10**7)
    assert e.value.reason in ("bad_url", "download_failed"), str(e.value)
    if e.value.reason == "bad_url":
        assert "--allow-private-urls" in str(e.value)
    assert host.hits[path] == 0


@pytest.mark.parametrize("address", ["10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "224.0.0.1",
                                     "240.0.0.1", "100.64.0.1", "[fe80::1]", "[fc00::1]", "[ff02::1]", "[::]"])
def test_private_link_local_multicast_reserved_unspecified_are_refused_without_a_connection(address, monkeypatch):
    import socket

    attempts = []

    def no_connect(*args, **kwargs):
        attempts.append(args)
        raise AssertionError("a connection was attempted")

    monkeypatch.setattr(socket, "create_connection", no_connect)
    monkeypatch.setattr(socket.socket, "connect", no_connect)
    with pytest.raises(ImageError) as e:
        fetch_url(f"http://{address}/photo.jpg", max_bytes=10**6)
    assert e.value.reason == "bad_url" and "--allow-private-urls" in str(e.value)
    assert attempts == []  # refused before any connect


def test_a_name_that_resolves_to_loopback_is_refused(host, monkeypatch):
    """The check runs on what DNS answers, not on the spelling of the host."""
    import socket

    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda h, *a, **kw: real("127.0.0.1" if h == "photos.example" else h, *a, **kw))
    path = "/photo/u0.jpg?via=dns"
    with pytest.raises(ImageError) as e:
        fetch_url(f"http://photos.example:{host.server_address[1]}{path}", max_bytes=10**7)
    assert e.value.reason == "bad_url" and "127.0.0.1" in str(e.value)
    assert host.hits[path] == 0


def test_a_redirect_into_loopback_is_refused(host, monkeypatch):
    """The target of every redirect is checked, not only the first host: the first hop's address
    passes the check here (it stands for a public host), and its redirect to 127.0.0.1 is refused."""
    from indexer import fetch as fetch_module

    real_refused, checks = fetch_module._refused_address, []

    def first_hop_is_public(address):
        checks.append(address)
        return None if len(checks) == 1 else real_refused(address)

    monkeypatch.setattr(fetch_module, "_refused_address", first_hop_is_public)
    path = "/redirect-abs/u1.jpg"
    with pytest.raises(ImageError) as e:
        fetch_url(host.url(path), max_bytes=10**7, retries=0)
    assert e.value.reason == "bad_url" and "127.0.0.1" in str(e.value)
    assert checks == ["127.0.0.1", "127.0.0.1"]
    assert host.hits[path] == 1 and host.hits["/photo/u1.jpg?hop=2"] == 0


def test_a_pinned_request_keeps_the_host_name(host, monkeypatch):
    """Refusals aside, a checked request goes to the resolved address with the URL's Host header."""
    from indexer import fetch as fetch_module

    monkeypatch.setattr(fetch_module, "_refused_address", lambda a: None)
    data = fetch_url(f"http://localhost:{host.server_address[1]}/photo/u2.jpg", max_bytes=10**7)
    assert data == host.photos["u2.jpg"]
    assert host.hosts[-1] == f"localhost:{host.server_address[1]}"


def test_private_urls_on_request(host):
    assert fetch_url(host.url("/photo/u0.jpg"), max_bytes=10**7, allow_private=True) == host.photos["u0.jpg"]
    port = host.server_address[1]
    assert fetch_url(f"http://2130706433:{port}/photo/u0.jpg", max_bytes=10**7, allow_private=True) == host.photos["u0.jpg"]


# --------------------------------------------------------------------------- a manifest with URLs


def test_index_a_manifest_mixing_files_and_urls(host, photo_files, tiny_model, tmp_path):
    local = photo_files[:5]
    good = {  # product id -> URL that answers (the last one after a 500)
        "URL-0": host.url("/photo/u0.jpg"),
        "URL-1": host.url("/redirect/u1.jpg"),
        "URL-2": host.url("/flaky/500/u2.jpg/manifest"),
    }
    bad = {  # product id -> (URL, the reason it fails)
        "URL-404": (host.url("/status/404/e2e"), "download_failed"),
        "URL-SLOW": (host.url("/slow"), "download_failed"),
        "URL-HUGE": (host.url("/claims-huge"), "too_large"),
        "URL-LOOP": (host.url("/loop/e2e"), "download_failed"),
    }
    rows = [{"id": f"LOCAL-{i}", "image": str(p), "title": f"local {i}"} for i, p in enumerate(local)]
    # one product with a local photo and a URL photo
    rows.append({"id": "LOCAL-0", "image": host.url("/photo/u3.jpg"), "title": "local 0", "view": "back"})
    rows += [{"id": pid, "image": url, "title": pid} for pid, url in good.items()]
    rows += [{"id": pid, "image": url, "title": pid} for pid, (url, _) in bad.items()]
    rows.append({"id": "FTP", "image": "ftp://127.0.0.1/photo.jpg", "title": "ftp"})
    manifest = tmp_path / "mixed.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))

    catalogue = read_catalogue(manifest)
    assert [(p.reason, p.product_id) for p in catalogue.problems] == [("bad_url", "FTP")]
    with Store.create(tmp_path / "idx", tiny_model.identity) as store:
        report = index_catalogue(catalogue, store, tiny_model, batch_size=4, workers=2, progress=False,
                                 allow_private_urls=True)
        n_ok = len(local) + 1 + len(good)
        assert (report.indexed, report.failed, report.unchanged) == (n_ok, len(bad), 0)
        assert {f["image"]: f["reason"] for f in report.failures} == {url: r for url, r in bad.values()}
        assert {f["id"] for f in report.failures} == set(bad)
        assert [p["reason"] for p in report.row_problems] == ["bad_url"]
        check = store.check()
        assert check["ok"], check["problems"]
        assert (check["products"], check["photos"]) == (len(local) + len(good), n_ok)
        saved = json.loads((tmp_path / "idx" / "report.json").read_text())
        assert {f["reason"] for f in saved["failures"]} == {"download_failed", "too_large"}

        served = {**{pid: (url, host.photos[f"u{i}.jpg"]) for i, (pid, url) in enumerate(good.items())},
                  "LOCAL-0": (host.url("/photo/u3.jpg"), host.photos["u3.jpg"])}
        for pid, (url, data) in served.items():
            stored = {im["image"]: im for im in store.get_product(pid)["images"]}
            assert stored[url]["sha256"] == hashlib.sha256(data).hexdigest()
            with Image.open(io.BytesIO(data)) as pil:  # the original size, not the decoded draft
                assert (stored[url]["width"], stored[url]["height"]) == pil.size
            # the URL photo is searchable: the same bytes find it first, at cosine 1
            query = tiny_model.embed_images([open_image(data)])
            hit = store.search(query, k=3)[0][0]
            assert (hit.product_id, hit.source) == (pid, url) and hit.score > 0.9999
        assert [im["image"] for im in store.get_product("LOCAL-0")["images"]] == [str(local[0]), host.url("/photo/u3.jpg")]
        assert store.get_product("LOCAL-0")["images"][1]["metadata"] == {"view": "back"}

        # a re-run fetches the URLs again but embeds nothing: their content hash is unchanged
        fetched = host.hits["/photo/u0.jpg"]
        again = index_catalogue(catalogue, store, tiny_model, batch_size=4, workers=0, progress=False,
                                allow_private_urls=True)
        assert (again.indexed, again.unchanged, again.failed) == (0, n_ok, len(bad))
        assert host.hits["/photo/u0.jpg"] == fetched + 1
        assert store.check()["ok"]
