"""Hostile input against the real query server on loopback: decompression bombs, huge and slow
bodies, slow clients, costly open routes, concurrent writes, malformed metadata.

    python scripts/attack.py [--index INDEX_DIR] [--quick] [--json] [--max-rss-mb 2048] [--log FILE]

Without ``--index`` a 12-product index is built from generated photos with ``--model test-tiny``;
a given index is copied to a temporary folder first (the original is not changed). The server
(``lookalike serve``, a subprocess, see ``scripts/serverproc.py``) runs on a free 127.0.0.1 port
with a temporary API key. Every payload is generated here (Pillow, numpy, hand-built bytes);
nothing is downloaded and nothing leaves loopback.

During each attack a thread samples the server's resident set size (``VmRSS`` of it and its child
processes) every 50 ms and another probes ``GET /healthz`` every 200 ms. Afterwards the server is
stopped and ``lookalike check`` must find the index consistent.

Attack kinds: thin images; small files that decode huge (four at once); a 108 Mpx photo; huge,
lying, streamed and chunked bodies; half-sent request heads held open; costly label and
filter requests, hostile box / text / text_weight values, a box on a bomb and an audit threshold far
too low; writers and searchers at once, then every acknowledged write searched for by its
own photo; malformed multipart, ids and metadata; the OpenAPI pages with ``auth_reads`` (full
mode). ``--quick`` runs a CI-sized subset (fewer slow clients, fewer writes, no second server).

Exit status 0 when the targets are met: no 5xx answer, the server alive throughout, its RSS never
above ``--max-rss-mb`` (sampled peak and the kernel's ``VmHWM``), every ``/healthz`` probe answered
200 within ``--healthz-timeout``, no acknowledged write lost, ``lookalike check`` consistent and
every request answered with one of the statuses the fixed server gives (``expect`` in the table).
"""
from __future__ import annotations

import argparse
import io
import json
import random
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serverproc

KEY = "attack-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}
GIB = 1 << 30
MB = 1 << 20


# ---------------------------------------------------------------- payloads
def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def product_photo(seed: int) -> bytes:
    """A PNG no other seed draws: a background colour and three rectangles, all from ``seed``."""
    rng = random.Random(seed)
    im = Image.new("RGB", (96, 96), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(im)
    for _ in range(3):
        x, y = rng.randrange(80), rng.randrange(80)
        draw.rectangle((x, y, x + rng.randrange(8, 40), y + rng.randrange(8, 40)),
                       fill=tuple(rng.randrange(256) for _ in range(3)))
    return _png(im)


def thin_png(width: int, height: int) -> bytes:
    return _png(Image.new("L", (width, height), 128))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _zlib_zeros(n: int) -> bytes:
    """A zlib stream of ``n`` zero bytes, built without compressing them all: a raw deflate block
    of 4 MiB of zeros ended by a full flush (which resets the compressor, so the block's bytes
    can be repeated), repeated, then the remainder and the adler-32 of n zeros (a=1, b=n)."""
    block = 4 * MB

    def deflate(size: int) -> bytes:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        return c.compress(bytes(size)) + c.flush(zlib.Z_FULL_FLUSH)

    whole, rest = divmod(n, block)
    body = deflate(block) * whole + (deflate(rest) if rest else b"")
    end = zlib.compressobj(9, zlib.DEFLATED, -15).flush(zlib.Z_FINISH)
    return b"\x78\xda" + body + end + struct.pack(">I", ((n % 65521) << 16) | 1)


def zero_png(width: int, height: int, bit_depth: int, colour_type: int) -> bytes:
    """A black PNG of any size, a few hundred KB however large, without allocating its pixels."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    row = 1 + (width * channels * bit_depth + 7) // 8
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", _zlib_zeros(row * height))
            + _chunk(b"IEND", b""))


class _Bits:
    """LSB-first bit writer (the order of the WebP lossless bitstream)."""

    def __init__(self) -> None:
        self.value = self.n = 0

    def put(self, value: int, bits: int) -> None:
        self.value |= value << self.n
        self.n += bits

    def bytes(self) -> bytes:
        return self.value.to_bytes((self.n + 7) // 8, "little")


def solid_webp(width: int, height: int, rgb: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A lossless WebP of one colour, about 30 bytes at any size up to 16384 x 16384.

    Every one of its five prefix codes is a "simple" code of a single symbol, so each pixel takes
    zero bits (WebP lossless bitstream specification, RFC 9649 sections 3.2 and 3.7.2.1.1)."""
    b = _Bits()
    b.put(0x2F, 8)
    b.put(width - 1, 14)
    b.put(height - 1, 14)
    b.put(0, 1)  # alpha_is_used
    b.put(0, 3)  # version
    b.put(0, 1)  # no transform
    b.put(0, 1)  # no colour cache
    b.put(0, 1)  # no meta prefix codes
    for symbol in (rgb[1], rgb[0], rgb[2], 255, 0):  # green, red, blue, alpha, distance
        b.put(1, 1)  # simple code
        b.put(0, 1)  # one symbol
        wide = symbol > 1
        b.put(int(wide), 1)
        b.put(symbol, 8 if wide else 1)
    data = b.bytes()
    chunk = b"VP8L" + struct.pack("<I", len(data)) + data + (b"\0" if len(data) % 2 else b"")
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def ico_lying(png: bytes, claimed: int = 16) -> bytes:
    """An ICO whose directory says ``claimed`` x ``claimed`` but whose one image is ``png``."""
    entry = struct.pack("<BBBBHHII", claimed % 256, claimed % 256, 0, 0, 1, 32, len(png), 6 + 16)
    return struct.pack("<HHH", 0, 1, 1) + entry + png


def gif_huge_screen(width: int = 65535, height: int = 65535) -> bytes:
    """A GIF whose logical screen is ``width`` x ``height`` and whose only frame is one pixel."""
    return (b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
            + b"," + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00" + b";")


def big_jpeg(width: int = 12000, height: int = 9000) -> bytes:
    """A ``width`` x ``height`` colour JPEG (gradients), the size of a 108 Mpx phone photo."""
    g = Image.linear_gradient("L").resize((width, height))
    im = Image.merge("RGB", (g, g.transpose(Image.Transpose.FLIP_TOP_BOTTOM), g.transpose(Image.Transpose.ROTATE_180)))
    del g
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def build_payloads(full: bool) -> dict[str, bytes]:
    p = {
        "thin 1x100000 PNG": thin_png(1, 100_000),
        "thin 1x1000000 PNG": thin_png(1, 1_000_000),
        "WebP 16383x16383 solid": solid_webp(16383, 16383),
        "PNG 16-bit RGBA 6000x6000": zero_png(6000, 6000, 16, 6),
        "PNG 16-bit RGBA 4500x4500": zero_png(4500, 4500, 16, 6),
        "ICO 16x16 holding PNG 13375x13375": ico_lying(zero_png(13375, 13375, 1, 0)),
        "GIF screen 65535x65535": gif_huge_screen(),
        "JPEG 12000x9000": big_jpeg(),
        "small photo": product_photo(-1),
    }
    if full:
        p["thin 100000x1 PNG"] = thin_png(100_000, 1)
        p["PNG 16-bit grey 30000x30000"] = zero_png(30000, 30000, 16, 0)
        p["WebP 11000x11000 solid"] = solid_webp(11000, 11000)  # under Pillow's own bomb limit, over ours
    return p


# ---------------------------------------------------------------- monitors
def _rss_kb(pid: int, field_name: str = "VmRSS:") -> int:
    """``field_name`` of ``pid`` and its descendants, kB (0 once the process is gone)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(field_name):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


@dataclass
class Window:
    """What the monitors saw during one attack."""
    peak_rss_kb: int = 0
    probes: int = 0
    probe_failures: list[str] = field(default_factory=list)
    healthz_max_ms: float = 0.0


class Monitor:
    """An RSS sampler (50 ms) and a ``/healthz`` prober (200 ms), both active while a window is open."""

    def __init__(self, pid: int, port: int, healthz_timeout: float) -> None:
        self.pid, self.port, self.timeout = pid, port, healthz_timeout
        self.current: Window | None = None
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self._sample, daemon=True),
                        threading.Thread(target=self._probe, daemon=True)]
        for t in self.threads:
            t.start()

    def open(self) -> Window:
        w = Window(peak_rss_kb=_rss_kb(self.pid))
        self.current = w
        return w

    def close(self) -> None:
        self.current = None

    def stop(self) -> None:
        self.done.set()
        for t in self.threads:
            t.join()

    def _sample(self) -> None:
        while not self.done.wait(0.05):
            w = self.current
            if w is not None:
                w.peak_rss_kb = max(w.peak_rss_kb, _rss_kb(self.pid))

    def _probe(self) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=self.timeout) as c:
            while not self.done.wait(0.2):
                w = self.current
                if w is None:
                    continue
                t0 = time.perf_counter()
                try:
                    r = c.get("/healthz")
                    failure = None if r.status_code == 200 else f"HTTP {r.status_code}"
                except httpx.HTTPError as e:
                    failure = type(e).__name__
                ms = (time.perf_counter() - t0) * 1000
                w.probes += 1
                w.healthz_max_ms = max(w.healthz_max_ms, ms)
                if failure:
                    w.probe_failures.append(f"{failure} after {ms:.0f} ms")


# ---------------------------------------------------------------- raw HTTP
@dataclass
class RawResult:
    status: int | str
    sent: int
    seconds: float


def _status_of(head: bytes) -> int | None:
    try:
        return int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None


def raw_request(port: int, head: str, body: Iterable[bytes] = (), timeout: float = 60.0) -> RawResult:
    """Send ``head`` and then ``body`` chunk by chunk, stopping as soon as the server answers or
    closes. ``sent`` counts body bytes the kernel accepted (loopback buffers a few MB of them);
    ``status`` is the answer's status code, or ``closed`` / ``reset`` / ``timeout``."""
    t0 = time.perf_counter()
    deadline = time.monotonic() + timeout
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sent, answer, pending, status = 0, b"", b"", "timeout"
    chunks: Iterator[bytes] | None = iter(body)
    try:
        s.sendall(head.encode("latin-1"))
        s.setblocking(False)
        while time.monotonic() < deadline:
            want_write = [s] if (pending or chunks is not None) else []
            readable, writable, _ = select.select([s], want_write, [], 0.2)
            if readable:
                try:
                    data = s.recv(65536)
                except (ConnectionResetError, BrokenPipeError):
                    status = _status_of(answer) or "reset"
                    break
                if not data:
                    status = _status_of(answer) or "closed"
                    break
                answer += data
                if b"\r\n" in answer:
                    status = _status_of(answer) or "garbled"
                    break
            elif writable:
                if not pending:
                    pending = next(chunks, b"")
                    if not pending:
                        chunks = None
                        continue
                try:
                    n = s.send(pending)
                except (ConnectionResetError, BrokenPipeError):
                    status = _late_status(s) or "reset"
                    break
                sent += n
                pending = pending[n:]
    finally:
        s.close()
    return RawResult(status, sent, time.perf_counter() - t0)


def _late_status(s: socket.socket) -> int | None:
    """The status of an answer already received on a socket the server has reset, if any."""
    try:
        s.setblocking(True)
        s.settimeout(0.5)
        return _status_of(s.recv(65536))
    except OSError:
        return None


def filler(total: int, piece: bytes = b"A" * (256 * 1024), prefix: bytes = b"") -> Iterator[bytes]:
    """``total`` bytes: ``prefix`` and then copies of ``piece`` (generated as they are sent)."""
    yield prefix
    left = total - len(prefix)
    while left > 0:
        yield piece[:left]
        left -= len(piece)


def chunked(parts: Iterable[bytes]) -> Iterator[bytes]:
    for p in parts:
        if p:
            yield b"%x\r\n" % len(p) + p + b"\r\n"
    yield b"0\r\n\r\n"


def head(method: str, path: str, headers: dict[str, str]) -> str:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"] + [f"{k}: {v}" for k, v in headers.items()]
    return "\r\n".join(lines) + "\r\n\r\n"


# ---------------------------------------------------------------- attacks
@dataclass
class Outcome:
    """One request (or a group of like requests) of an attack."""
    request: str
    expect: tuple
    statuses: Counter
    seconds: float
    note: str = ""
    problem: str = ""  # set when the answer's status is right but its content is not
    answer: str = ""  # the start of an error answer's body

    @property
    def ok(self) -> bool:
        return not self.problem and all(s in self.expect for s in self.statuses)


def timed(request: str, expect: tuple, call: Callable[[], httpx.Response],
          check: Callable[[httpx.Response], str] | None = None) -> Outcome:
    """Make one request with ``call``; ``check`` looks at the content of an answer whose status is expected
    and says what is wrong with it ("" when nothing)."""
    t0 = time.perf_counter()
    problem = answer = ""
    try:
        r = call()
        status: int | str = r.status_code
        if check is not None and r.status_code in expect:
            problem = check(r)
        if r.status_code >= 400:
            answer = r.text[:300]
    except httpx.TimeoutException:
        status = "timeout"
    except httpx.HTTPError as e:
        status = type(e).__name__
    return Outcome(request, expect, Counter([status]), time.perf_counter() - t0, problem=problem, answer=answer)


class Run:
    """The attacks against the server on ``port``: each method makes its requests and returns their outcomes."""

    def __init__(self, port: int, payloads: dict[str, bytes], quick: bool, header_timeout: float) -> None:
        self.port, self.payloads, self.quick, self.header_timeout = port, payloads, quick, header_timeout
        self.base = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.base, timeout=120)
        self.lost_writes = 0
        self.acked: list[str] = []

    def upload(self, path: str, name: str, data: bytes, auth: bool = False, **params) -> httpx.Response:
        return self.client.post(path, params=params, headers=AUTH if auth else None,
                                files={"image": (name, data, "application/octet-stream")})

    def add(self, pid: str, data: bytes, filename: str = "p.png", client: httpx.Client | None = None,
            **meta) -> httpx.Response:
        return (client or self.client).post(
            "/v1/products", headers=AUTH, data={"metadata": json.dumps({"id": pid, **meta})},
            files=[("images", (filename, data, "image/png"))])

    # 1
    def thin(self) -> list[Outcome]:
        out = []
        names = ["thin 1x100000 PNG", "thin 1x1000000 PNG"] + ([] if self.quick else ["thin 100000x1 PNG"])
        for name in names:
            for route in ("/v1/search/image", "/v1/labels"):
                out.append(timed(f"{name} -> {route}", (200, 413, 422),
                                      lambda route=route, name=name: self.upload(route, "thin.png", self.payloads[name])))
        return out

    # 2
    def bombs(self) -> list[Outcome]:
        plan = [("WebP 16383x16383 solid", (413, 422)), ("PNG 16-bit RGBA 6000x6000", (200, 413)),
                ("ICO 16x16 holding PNG 13375x13375", (413, 422)), ("GIF screen 65535x65535", (413, 422))]
        rounds = [("/v1/search/image", False)] + ([] if self.quick else [("/v1/products", True)])
        out = []
        for route, write in rounds:
            def one(i: int, name: str, expect: tuple, route: str = route, write: bool = write) -> Outcome:
                if write:
                    ok = tuple(201 if s == 200 else s for s in expect)
                    return timed(f"{name} -> {route} (4 at once)", ok,
                                      lambda: self.add(f"ATK-BOMB-{i}", self.payloads[name], "bomb"))
                return timed(f"{name} -> {route} (4 at once)", expect,
                                  lambda: self.upload(route, "bomb", self.payloads[name], labels="false"))
            with ThreadPoolExecutor(4) as pool:
                out += list(pool.map(lambda a: one(*a), [(i, n, e) for i, (n, e) in enumerate(plan)]))
        if not self.quick:
            for name in ("PNG 16-bit grey 30000x30000", "WebP 11000x11000 solid"):
                out.append(timed(f"{name} -> /v1/search/image", (413, 422),
                                      lambda name=name: self.upload("/v1/search/image", "big", self.payloads[name])))
        return out

    def heavy_decodes(self) -> list[Outcome]:
        """Photos under every size limit that each need about 400 MB (quick) or 700 MB to decode,
        four at once: the server must neither need four times that at once nor keep it afterwards."""
        heavy = "PNG 16-bit RGBA 4500x4500" if self.quick else "PNG 16-bit RGBA 6000x6000"
        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(lambda i: timed(f"{heavy} #{i} -> /v1/search/image (4 at once)", (200, 413),
                                                      lambda: self.upload("/v1/search/image", "p.png",
                                                                          self.payloads[heavy], labels="false")),
                                 range(4)))

    # 3
    def big_photo(self) -> list[Outcome]:
        data = self.payloads["JPEG 12000x9000"]
        out = [timed(f"JPEG 12000x9000 ({len(data) / MB:.1f} MB) -> /v1/search/image", (200,),
                          lambda: self.upload("/v1/search/image", "phone.jpg", data))]
        if not self.quick:
            out.append(timed("JPEG 12000x9000 -> /v1/labels", (200,),
                                  lambda: self.upload("/v1/labels", "phone.jpg", data)))
            out.append(timed("JPEG 12000x9000 -> POST /v1/products", (201,),
                                  lambda: self.add("ATK-PHONE", data, "phone.jpg")))
        return out

    # 4
    def bodies(self) -> list[Outcome]:
        multipart = {"Content-Type": "multipart/form-data; boundary=xyz"}
        # a well-formed start, so that only the size (or the key) can be the reason to refuse it
        part = (b'--xyz\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n'
                b"Content-Type: image/png\r\n\r\n")
        json_type = {"Content-Type": "application/json"}
        plans = [
            ("1 GiB upload, no key, chunked generator -> POST /v1/products", (401,),
             head("POST", "/v1/products", {**multipart, "Transfer-Encoding": "chunked"}),
             chunked(filler(GIB, prefix=part))),
            ("1 GiB upload, no key, Content-Length -> POST /v1/products", (401,),
             head("POST", "/v1/products", {**multipart, "Content-Length": str(GIB)}), filler(GIB, prefix=part)),
            ("Content-Length 1 GiB, with key, no body sent -> POST /v1/products", (413,),
             head("POST", "/v1/products", {**multipart, **AUTH, "Content-Length": str(GIB)}), ()),
            ("400 MB JSON (Content-Length) -> /v1/search/text", (413,),
             head("POST", "/v1/search/text", {**json_type, "Content-Length": str(400 * MB)}),
             filler(400 * MB, b" " * (256 * 1024), b'{"query": "')),
            ("400 MB JSON, chunked, no Content-Length -> /v1/search/text", (413,),
             head("POST", "/v1/search/text", {**json_type, "Transfer-Encoding": "chunked"}),
             chunked(filler(400 * MB, b" " * (256 * 1024), b'{"query": "'))),
        ]
        if not self.quick:
            plans.append(("1 GiB upload, with key, chunked -> POST /v1/products", (413,),
                          head("POST", "/v1/products", {**multipart, **AUTH, "Transfer-Encoding": "chunked"}),
                          chunked(filler(GIB, prefix=part))))
        out = []
        for request, expect, h, body in plans:
            r = raw_request(self.port, h, body, timeout=60)
            out.append(Outcome(request, expect, Counter([r.status]), r.seconds,
                               note=f"{r.sent / MB:.1f} MB sent before the answer"))
        return out

    # 5
    def slow_clients(self) -> list[Outcome]:
        n = 100 if self.quick else 500
        t0 = time.perf_counter()
        socks = []
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            s.sendall(b"POST /v1/search/text HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
            s.setblocking(False)
            socks.append(s)
        opened = time.perf_counter() - t0
        during = timed(f"text search while {n} half-sent heads are held", (200,),
                            lambda: self.client.post("/v1/search/text", json={"query": "red shoe", "k": 5}))
        ends: dict[socket.socket, int | str] = {}
        deadline = time.monotonic() + self.header_timeout + 5
        while len(ends) < n and time.monotonic() < deadline:
            live = [s for s in socks if s not in ends]
            readable, _, _ = select.select(live, [], [], 0.2)
            for s in readable:
                try:
                    data = s.recv(4096)
                    ends[s] = (_status_of(data) or "closed") if data else "closed"
                except OSError:
                    ends[s] = "reset"
        seconds = time.perf_counter() - t0
        statuses = Counter(ends.values())
        statuses["still open"] = n - len(ends)
        statuses = +statuses
        for s in socks:
            s.close()
        held = Outcome(f"{n} half-sent request heads held (header timeout {self.header_timeout:g} s)",
                       (408, "closed"), statuses, seconds,
                       note=f"{len(ends)}/{n} closed by the server in {seconds:.1f} s (opened in {opened:.1f} s)")
        return [during, held]

    # 6
    def costly_routes(self) -> list[Outcome]:
        photo = self.payloads["small photo"]

        def labels(values: list[str]) -> httpx.Response:
            return self.client.post("/v1/labels", data={"labels": values},
                                    files={"image": ("p.png", photo, "image/png")})

        def no_results(r: httpx.Response) -> str:
            return "" if r.json().get("results") == [] else f"{len(r.json().get('results', []))} results"

        out = [timed("/v1/labels, one 12,000-letter label", (422,), lambda: labels(["a" * 12_000, "b"])),
               # Starlette's multipart parser refuses over 1,000 fields (400) before the label cap (422)
               timed("/v1/labels, 10,000 labels (repeated field)", (400, 422),
                          lambda: labels([f"label {i}" for i in range(10_000)])),
               timed("/v1/search/text category 'nope'", (200,),
                          lambda: self.client.post("/v1/search/text",
                                                   json={"query": "red shoe", "k": 50, "category": "nope"}),
                          no_results)]
        # composed and region queries: hostile fields answer 422 before any decode; a box does not lift
        # the decode limits; an audit threshold far under the model's scale stops at audit_max_pairs
        bomb = self.payloads["WebP 16383x16383 solid"]
        for name, form in (("box in Arabic-Indic digits", {"box": "\u0660,\u0660,\u0661\u0660\u0660,\u0661\u0660\u0660"}),
                           ("box 'nan,0,inf,1e999'", {"box": "nan,0,inf,1e999"}),
                           ("text with a NUL", {"text": "red\x00bag"}),
                           ("text_weight 'nan'", {"text": "red", "text_weight": "nan"})):
            out.append(timed(f"/v1/search/image, {name}", (422,),
                             lambda form=form: self.client.post("/v1/search/image", data=form,
                                                                files={"image": ("p.png", photo, "image/png")})))
        out.append(timed("/v1/search/image, box on WebP 16383x16383", (413, 422),
                         lambda: self.client.post("/v1/search/image", data={"box": "0,0,100,100"},
                                                  files={"image": ("b.webp", bomb, "image/webp")})))
        out.append(timed("/v1/audit, near_duplicate_min_cosine 0.01", (200, 422),
                         lambda: self.client.get("/v1/audit", params={"near_duplicate_min_cosine": 0.01}, headers=AUTH)))
        if not self.quick:
            out.append(timed("/v1/labels, 10,000 labels (one comma-separated value)", (422,),
                                  lambda: labels([",".join(f"label {i}" for i in range(10_000))])))
            out.append(timed("/v1/search/image category 'nope', k=1000", (200,),
                                  lambda: self.upload("/v1/search/image", "p.png", photo, k=1000, category="nope"),
                                  no_results))
        return out

    # 7
    def integrity(self) -> list[Outcome]:
        per_writer = 6 if self.quick else 40
        writes: Counter = Counter()
        searches: Counter = Counter()
        lock = threading.Lock()
        stop = threading.Event()
        photos: dict[str, bytes] = {}
        t0 = time.perf_counter()

        def writer(w: int) -> None:
            with httpx.Client(base_url=self.base, timeout=120) as c:
                for i in range(per_writer):
                    pid = f"ATK-W{w}-{i}"
                    data = product_photo(w * 100_000 + i)
                    try:
                        status: int | str = self.add(pid, data, client=c, title=f"attack {w} {i}",
                                                     category="attack").status_code
                    except httpx.HTTPError as e:
                        status = type(e).__name__
                    with lock:
                        writes[status] += 1
                        if status in (200, 201):
                            photos[pid] = data

        def searcher(n: int) -> None:
            rng = random.Random(n)
            with httpx.Client(base_url=self.base, timeout=120) as c:
                while not stop.is_set():
                    try:
                        if rng.random() < 0.5:
                            r = c.post("/v1/search/text", json={"query": rng.choice(["shoe", "bag", "red"]), "k": 20})
                        else:
                            r = c.post("/v1/search/image", params={"k": 20, "labels": "false"},
                                       files={"image": ("q.png", product_photo(rng.randrange(4 * per_writer)), "image/png")})
                        status: int | str = r.status_code
                    except httpx.HTTPError as e:
                        status = type(e).__name__
                    with lock:
                        searches[status] += 1

        writers = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
        searchers = [threading.Thread(target=searcher, args=(n,)) for n in range(4)]
        for t in writers + searchers:
            t.start()
        for t in writers:
            t.join()
        stop.set()
        for t in searchers:
            t.join()
        busy = time.perf_counter() - t0

        t1 = time.perf_counter()
        lost = []
        for pid, data in sorted(photos.items()):
            try:
                r = self.client.post("/v1/search/image", params={"k": 50, "labels": "false"},
                                     files={"image": ("q.png", data, "image/png")})
                hits = r.json().get("results", []) if r.status_code == 200 else []
            except (httpx.HTTPError, ValueError):
                hits = []
            if not any(h["id"] == pid and h["score"] >= 0.9999 for h in hits):
                lost.append(pid)
        self.lost_writes = len(lost)
        self.acked = sorted(photos)
        return [Outcome(f"4 writers x {per_writer} POST /v1/products", (201, 200), writes, busy),
                Outcome("4 searchers (text, image) meanwhile", (200,), searches, busy),
                Outcome(f"search k=50 by own photo, {len(photos)} acknowledged writes", (200,),
                        Counter({200: len(photos)}), time.perf_counter() - t1,
                        note=f"{len(lost)} lost", problem=f"lost: {', '.join(lost[:5])}" if lost else "")]

    # 8
    def small_kinds(self) -> list[Outcome]:
        photo = self.payloads["small photo"]
        out = [timed("two 'image' fields -> /v1/search/image", (422,),
                          lambda: self.client.post("/v1/search/image",
                                                   files=[("image", ("a.png", photo, "image/png")),
                                                          ("image", ("b.png", product_photo(7), "image/png"))])),
               timed("product id 'ATK/image'", (422,), lambda: self.add("ATK/image", photo))]
        base = timed("POST product ATK-PATCH", (201, 200),
                          lambda: self.add("ATK-PATCH", product_photo(11), title="patch me", colour="red"))
        out.append(base)
        deep = '{"metadata": {"deep": ' + '{"a": ' * 900 + "1" + "}" * 900 + "}}"
        bodies = [("PATCH 900-deep nested metadata", deep),
                  ("PATCH metadata NaN", '{"metadata": {"x": NaN}}'),
                  ("PATCH metadata 1e999", '{"metadata": {"x": 1e999}}'),
                  ("PATCH metadata lone surrogate", '{"metadata": {"x": "\\ud800"}}')]
        for request, body in bodies:
            out.append(timed(request, (422,), lambda body=body: self.client.patch(
                "/v1/products/ATK-PATCH", content=body.encode(), headers={**AUTH, "content-type": "application/json"})))

        def unchanged(r: httpx.Response) -> str:
            meta = r.json().get("metadata", {})
            return "" if meta.get("colour") == "red" and set(meta) <= {"colour"} else f"metadata now {str(meta)[:80]}"
        out.append(timed("GET /v1/products/ATK-PATCH after the PATCHes", (200,),
                              lambda: self.client.get("/v1/products/ATK-PATCH"), unchanged))
        if not self.quick:
            out.append(timed("POST product, metadata with lone surrogate", (422,), lambda: self.client.post(
                "/v1/products", headers=AUTH, data={"metadata": '{"id": "ATK-SUR", "x": "\\udc80"}'},
                files=[("images", ("p.png", photo, "image/png"))])))
            out.append(timed("POST product, metadata 900-deep", (422,), lambda: self.client.post(
                "/v1/products", headers=AUTH, data={"metadata": '{"id": "ATK-DEEP", "d": ' + "[" * 900 + "]" * 900 + "}"},
                files=[("images", ("p.png", photo, "image/png"))])))
        out.append(timed("upload named x.sh holding a PNG", (201, 200),
                              lambda: self.add("ATK-SH", product_photo(13), filename="x.sh")))

        def no_sh(r: httpx.Response) -> str:
            return "'.sh' in the answer" if ".sh" in r.text else ""
        out.append(timed("GET /v1/products/ATK-SH (no '.sh')", (200,),
                              lambda: self.client.get("/v1/products/ATK-SH"), no_sh))
        out.append(timed("GET /v1/products/ATK-SH/image", (200,),
                              lambda: self.client.get("/v1/products/ATK-SH/image"),
                              lambda r: "" if r.headers.get("content-type", "").startswith("image/")
                              else f"content-type {r.headers.get('content-type')}"))
        return out


def auth_reads_kinds(port: int) -> list[Outcome]:
    """The OpenAPI pages and a read route on a server with ``LOOKALIKE_AUTH_READS=1``."""
    c = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    out = [timed(f"GET {path} without a key (auth_reads)", (401,), lambda path=path: c.get(path))
           for path in ("/docs", "/openapi.json", "/redoc", "/v1/categories")]
    out.append(timed("GET /openapi.json with the key (auth_reads)", (200,), lambda: c.get("/openapi.json", headers=AUTH)))
    out.append(timed("GET /healthz without a key (auth_reads)", (200,), lambda: c.get("/healthz")))
    c.close()
    return out


# ---------------------------------------------------------------- driver
def _lookalike() -> str:
    return shutil.which("lookalike", path=str(Path(sys.executable).parent)) or "lookalike"


def _build_index(folder: Path) -> subprocess.Popen:
    photos = folder / "photos"
    photos.mkdir()
    for i in range(12):
        (photos / f"seed-{i}.png").write_bytes(product_photo(1_000_000 + i))
    return subprocess.Popen([_lookalike(), "index", str(photos), "--out", str(folder / "index"), "--model", "test-tiny",
                             "--workers", "1", "-q"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def run(args) -> dict:
    t_start = time.perf_counter()
    full = not args.quick
    header_timeout = 3.0 if args.quick else 10.0
    with tempfile.TemporaryDirectory(prefix="lookalike-attack-") as tmp:
        tmp = Path(tmp)
        index = tmp / "index"
        builder = None
        if args.index:
            shutil.copytree(args.index, index, ignore=shutil.ignore_patterns(".lock"))
        else:
            builder = _build_index(tmp)
        payloads = build_payloads(full)
        if builder is not None:
            out, _ = builder.communicate(timeout=300)
            if builder.returncode != 0:
                raise RuntimeError(f"lookalike index failed: {out.decode(errors='replace')[-2000:]}")
        log_path = tmp / "server.log"
        port = serverproc.free_port()
        env = {"LOOKALIKE_API_KEYS": KEY, "LOOKALIKE_HEADER_TIMEOUT_S": str(header_timeout),
               "LOOKALIKE_ACCESS_LOG": "false", **dict(kv.split("=", 1) for kv in args.server_env)}
        proc = serverproc.spawn(index, port, env, log_path)
        attacks: dict[str, dict] = {}
        died = None
        try:
            serverproc.wait_ready(proc, port, log_path)
            mon = Monitor(proc.pid, port, args.healthz_timeout)
            r = Run(port, payloads, args.quick, header_timeout)
            plan = [("thin images", r.thin), ("decode-huge files", r.bombs),
                    ("4 heavy decodes at once", r.heavy_decodes), ("108 Mpx photo", r.big_photo),
                    ("request bodies", r.bodies), ("slow clients", r.slow_clients), ("costly open routes", r.costly_routes),
                    ("integrity", r.integrity), ("smaller kinds", r.small_kinds)]
            for name, attack in plan:
                if proc.poll() is not None:
                    died = died or f"server exited ({proc.returncode}) before '{name}'"
                    attacks[name] = _attack_entry([], None, 0)
                    continue
                w = mon.open()
                t0 = time.perf_counter()
                try:
                    outcomes = attack()
                except Exception as e:  # noqa: BLE001 -- a crash of an attack is a finding to report, not a traceback
                    outcomes = [Outcome(f"attack raised {type(e).__name__}: {e}"[:160], (), Counter(["error"]), 0.0)]
                mon.close()
                attacks[name] = _attack_entry(outcomes, w, time.perf_counter() - t0, _rss_kb(proc.pid))
                if proc.poll() is not None:
                    died = died or f"server exited ({proc.returncode}) during '{name}'"
            hwm_kb = _rss_kb(proc.pid, "VmHWM:")
            mon.stop()
            lost, acked = r.lost_writes, len(r.acked)
        finally:
            serverproc.stop(proc)
            server_log = log_path.read_text(errors="replace")
            if args.log:
                shutil.copyfile(log_path, args.log)
        t0 = time.perf_counter()
        check = subprocess.run([_lookalike(), "check", str(index)], capture_output=True, text=True, timeout=300,
                               check=False)
        check_s = time.perf_counter() - t0
        if full:
            proc2 = serverproc.spawn(index, port := serverproc.free_port(),
                                     {"LOOKALIKE_API_KEYS": KEY, "LOOKALIKE_AUTH_READS": "1"}, tmp / "server2.log")
            try:
                serverproc.wait_ready(proc2, port, tmp / "server2.log")
                t0 = time.perf_counter()
                attacks["auth_reads server"] = _attack_entry(auth_reads_kinds(port), None,
                                                             time.perf_counter() - t0, _rss_kb(proc2.pid))
            finally:
                serverproc.stop(proc2)

    statuses = [s for a in attacks.values() for o in a["outcomes"] for s, n in o.statuses.items() for _ in range(n)]
    peak_kb = max([a["peak_rss_kb"] for a in attacks.values()] + [hwm_kb])
    five_xx = sum(1 for s in statuses if isinstance(s, int) and s >= 500)
    unexpected = [f"{name}: {o.request}: {dict(o.statuses)} {o.problem or o.answer}".rstrip()
                  for name, a in attacks.items() for o in a["outcomes"] if not o.ok]
    healthz_ok = all(a["healthz_ok"] for a in attacks.values()) and died is None
    result = {
        "mode": "quick" if args.quick else "full",
        "attacks": {name: _public(a) for name, a in attacks.items()},
        "five_xx": five_xx,
        "max_rss_mb": round(peak_kb / 1024, 1),
        "vm_hwm_mb": round(hwm_kb / 1024, 1),
        "healthz_ok": healthz_ok,
        "healthz_max_ms": round(max([a["healthz_max_ms"] for a in attacks.values()] + [0]), 1),
        "lost_writes": lost,
        "acknowledged_writes": acked,
        "check_ok": check.returncode == 0,
        "check_output": (check.stdout + check.stderr).strip()[-2000:],
        "check_seconds": round(check_s, 2),
        "server_died": died,
        "unexpected": unexpected,
        "server_errors": [line[:300] for line in server_log.splitlines()
                          if '"level": "error"' in line or "Traceback" in line][:10],
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    result["ok"] = (five_xx == 0 and died is None and peak_kb / 1024 <= args.max_rss_mb and healthz_ok
                    and lost == 0 and result["check_ok"] and not unexpected)
    return result


def _attack_entry(outcomes: list[Outcome], w: Window | None, seconds: float, rss_after_kb: int = 0) -> dict:
    return {"outcomes": outcomes, "seconds": seconds, "peak_rss_kb": max(w.peak_rss_kb if w else 0, rss_after_kb),
            "rss_after_kb": rss_after_kb, "healthz_ok": not (w and w.probe_failures),
            "healthz_max_ms": w.healthz_max_ms if w else 0.0, "probes": w.probes if w else 0,
            "probe_failures": w.probe_failures[:5] if w else []}


def _key(status) -> str:
    return str(status)


def _public(a: dict) -> dict:
    return {
        "status_codes": [s for o in a["outcomes"] for s in o.statuses],
        "requests": [{"request": o.request, "statuses": {_key(s): n for s, n in o.statuses.items()},
                      "expect": list(o.expect), "ok": o.ok, "seconds": round(o.seconds, 3),
                      **({"note": o.note} if o.note else {}), **({"problem": o.problem} if o.problem else {}),
                      **({"answer": o.answer} if o.answer else {})}
                     for o in a["outcomes"]],
        "seconds": round(a["seconds"], 2),
        "peak_rss_mb": round(a["peak_rss_kb"] / 1024, 1),
        "rss_after_mb": round(a["rss_after_kb"] / 1024, 1),
        "healthz_ok": a["healthz_ok"],
        "healthz_max_ms": round(a["healthz_max_ms"], 1),
        "healthz_probes": a["probes"],
        **({"healthz_failures": a["probe_failures"]} if a["probe_failures"] else {}),
    }


def print_table(result: dict) -> None:
    rows = [("attack", "request", "status (expect)", "time s", "RSS after/peak MB", "healthz max ms")]
    for name, a in result["attacks"].items():
        first = True
        for req in a["requests"]:
            got = " ".join(f"{s}x{n}" if n > 1 else s for s, n in req["statuses"].items())
            mark = "" if req["ok"] else "  <-- " + (req.get("problem") or "unexpected")
            rows.append((name if first else "", req["request"] + (f" [{req['note']}]" if req.get("note") else ""),
                         f"{got} ({'/'.join(map(str, req['expect']))}){mark}", f"{req['seconds']:.2f}",
                         f"{a['rss_after_mb']:.0f}/{a['peak_rss_mb']:.0f}" if first else "",
                         (f"{a['healthz_max_ms']:.0f}" + ("" if a["healthz_ok"] else " FAILED")) if first else ""))
            first = False
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    widths[1] = min(widths[1], 90)
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print(f"\n5xx answers: {result['five_xx']}; server peak RSS {result['max_rss_mb']} MB (VmHWM {result['vm_hwm_mb']} MB); "
          f"/healthz {'answered throughout' if result['healthz_ok'] else 'FAILED'} (max {result['healthz_max_ms']} ms); "
          f"{result['lost_writes']} of {result['acknowledged_writes']} acknowledged writes lost; "
          f"lookalike check: {'consistent' if result['check_ok'] else 'FAILED'}; {result['seconds']} s")
    if result["server_died"]:
        print(f"SERVER DIED: {result['server_died']}")
    if not result["check_ok"]:
        print(f"lookalike check: {result['check_output']}")
    for u in result["unexpected"]:
        print(f"unexpected: {u}")
    for line in result["server_errors"]:
        print(f"server log: {line}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", type=Path, help="index to attack (copied); default: a generated 12-product index")
    ap.add_argument("--quick", action="store_true", help="the CI-sized subset (well under a minute)")
    ap.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    ap.add_argument("--max-rss-mb", type=float, default=2048.0, help="the server's RSS target (default 2048)")
    ap.add_argument("--healthz-timeout", type=float, default=2.0,
                    help="a /healthz probe slower than this, seconds, counts as not answered (default 2)")
    ap.add_argument("--log", type=Path, help="copy the server's log here")
    ap.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                    help="extra environment for the server, e.g. LOOKALIKE_DECODE_MEMORY_BYTES=800000000 (repeatable)")
    args = ap.parse_args(argv)
    try:
        result = run(args)
    except (RuntimeError, subprocess.TimeoutExpired) as e:  # the index could not be built or the server not started
        print(f"attack: {e}", file=sys.stderr)
        return 1
    print_table(result)
    if args.json:
        print(json.dumps(result, ensure_ascii=True))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
