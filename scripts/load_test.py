"""Bounded load test of the query server on loopback: concurrent image search, text search,
product writes and deletes; checks errors, lost writes and memory growth; prints latencies.

    python scripts/load_test.py INDEX_DIR [--seconds 120] [--clients 8] [--timeout 60] [--quick] [--json]

INDEX_DIR is copied to a temporary folder and served by ``lookalike serve`` (the real
server, a subprocess) on a free 127.0.0.1 port with a temporary API key. Each client loops
for ``--seconds``: 50 % image searches, 25 % text searches, 15 % product adds, 10 % deletes
of its own earlier adds. Afterwards, on the same running server (no restart), every
acknowledged (and not deleted) product must be readable and found by an image search with
its own photo (among the top 50, score >= 0.9999: its vector is in the live FAISS index),
and every acknowledged delete must be gone; after the server stops, ``check`` of the index
must find no problem (no FAISS id missing or held twice). Memory: the server's resident set size
(VmRSS) after a warm-up of a fifth of the run, and at the end; growth must stay under 10 %.
A request that times out (``--timeout``, 60 s) makes the server dump every thread's stack once
(``kill -USR1``, see ``server.serving.dump_stacks_on_sigusr1``; the dump is ``stall_stacks`` in the
result), and probes which kinds of request (health, SQLite read, text search, image search, write)
still answer within 5 s (``stall_probes``). The result also has the micro-batcher's rescues of
stranded queries (``batcher_rescues``, from ``/metrics``).
Exit status 0 when there were no errors, no lost writes, a clean check and growth < 10 %, else 1.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serverproc  # noqa: E402

KEY = "load-test-key"


def _photo(rng: random.Random) -> bytes:
    im = Image.new("RGB", (320, 400), (255, 255, 255))
    colour = tuple(rng.randrange(256) for _ in range(3))
    w, h = rng.randrange(60, 240), rng.randrange(80, 320)
    im.paste(Image.new("RGB", (w, h), colour), (rng.randrange(0, 320 - w), rng.randrange(0, 400 - h)))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def run(index_dir: Path, seconds: float, clients: int, query_photos: list[Path], seed: int = 0,
        timeout_s: float = 60.0) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        index = Path(tmp) / "index"
        shutil.copytree(index_dir, index, ignore=shutil.ignore_patterns(".lock"))
        port = serverproc.free_port()
        log_path = Path(tmp) / "server.log"
        proc = serverproc.spawn(index, port, {"LOOKALIKE_API_KEYS": KEY, "LOOKALIKE_ACCESS_LOG": "false",
                                              "LOOKALIKE_SNAPSHOT_INTERVAL_S": "5"}, log_path)
        try:
            serverproc.wait_ready(proc, port, log_path)
            base = f"http://127.0.0.1:{port}"
            latencies: dict[str, list[float]] = {"image": [], "text": [], "add": [], "delete": []}
            errors: list[str] = []
            added: dict[str, bytes] = {}
            deleted: set[str] = set()
            lock = threading.Lock()
            photos = [p.read_bytes() for p in query_photos]
            words = ["hoodie", "red running shoes", "bag", "watch", "yoga pants", "striped tee", "jacket"]
            t_end = time.monotonic() + seconds
            warm_rss: list[int] = []
            dump_at: list[int] = []  # where the server's log stood when it was asked for its stacks
            probes: dict[str, str] = {}

            def on_timeout() -> None:
                """Once: the server's thread stacks (SIGUSR1), then which kinds of request still get an answer
                within 5 s on a new connection (so which one is stalled)."""
                with lock:
                    if dump_at or proc.poll() is not None:
                        return
                    dump_at.append(log_path.stat().st_size)
                os.kill(proc.pid, signal.SIGUSR1)
                with httpx.Client(base_url=base, timeout=5) as c:
                    for name, send in (
                            ("healthz", lambda: c.get("/healthz")),
                            ("read", lambda: c.get("/v1/products/LOAD-PROBE")),  # 404: SQLite read
                            ("text", lambda: c.post("/v1/search/text", json={"query": "bag", "k": 3})),
                            ("image", lambda: c.post("/v1/search/image?k=3&labels=false",
                                                     files={"image": ("q.jpg", photos[0], "image/jpeg")})),
                            # 404 from inside a write transaction: the write lock and SQLite's
                            ("write", lambda: c.patch("/v1/products/LOAD-PROBE", json={"title": "x"},
                                                      headers={"authorization": f"Bearer {KEY}"}))):
                        t0 = time.perf_counter()
                        try:
                            r = send()
                            probes[name] = f"HTTP {r.status_code} in {1000 * (time.perf_counter() - t0):.0f} ms"
                        except httpx.HTTPError as e:
                            probes[name] = f"{e!r} after {time.perf_counter() - t0:.1f} s"

            def client(n: int) -> None:
                rng = random.Random(seed * 1000 + n)
                mine: list[str] = []
                with httpx.Client(base_url=base, timeout=timeout_s) as c:
                    i = 0
                    while time.monotonic() < t_end:
                        i += 1
                        roll = rng.random()
                        t0 = time.perf_counter()
                        try:
                            if roll < 0.5:
                                kind = "image"
                                r = c.post("/v1/search/image?k=10", files={"image": ("q.jpg", rng.choice(photos), "image/jpeg")})
                                ok = r.status_code == 200
                            elif roll < 0.75:
                                kind = "text"
                                r = c.post("/v1/search/text", json={"query": rng.choice(words), "k": 10})
                                ok = r.status_code == 200
                            elif roll < 0.9 or not mine:
                                kind = "add"
                                pid = f"LOAD-{n}-{i}"
                                photo = _photo(rng)
                                r = c.post("/v1/products", headers={"authorization": f"Bearer {KEY}"},
                                           data={"metadata": json.dumps({"id": pid, "title": f"load {n} {i}"})},
                                           files=[("images", ("p.jpg", photo, "image/jpeg"))])
                                ok = r.status_code == 201
                                if ok:
                                    mine.append(pid)
                                    with lock:
                                        added[pid] = photo
                            else:
                                kind = "delete"
                                pid = mine.pop(rng.randrange(len(mine)))
                                r = c.delete(f"/v1/products/{pid}", headers={"authorization": f"Bearer {KEY}"})
                                ok = r.status_code == 204
                                if ok:
                                    with lock:
                                        deleted.add(pid)
                            if not ok:
                                errors.append(f"{kind}: HTTP {r.status_code} {r.text[:200]}")
                        except httpx.HTTPError as e:
                            errors.append(f"{kind}: transport error {e!r} after {time.perf_counter() - t0:.1f} s")
                            if isinstance(e, httpx.TimeoutException):
                                on_timeout()  # what the stalled server is doing, while it still is
                            continue
                        with lock:
                            latencies[kind].append((time.perf_counter() - t0) * 1000)

            def sample_warm() -> None:
                time.sleep(seconds / 5)
                warm_rss.append(_rss_kb(proc.pid))

            threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
            sampler = threading.Thread(target=sample_warm)
            sampler.start()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            sampler.join()
            end_rss = _rss_kb(proc.pid)

            lost, unsearchable, resurrected = [], [], []
            rescues = 0
            with httpx.Client(base_url=base, timeout=60) as c:
                try:
                    # image queries the micro-batcher found stranded (lost wake-ups) and woke again
                    rescues = sum(float(line.split()[-1]) for line in c.get("/metrics").text.splitlines()
                                  if line.startswith("lookalike_batcher_rescues_total"))
                    for pid in sorted(set(added) - deleted):
                        if c.get(f"/v1/products/{pid}").status_code != 200:
                            lost.append(pid)
                        r = c.post("/v1/search/image?k=50&labels=false",
                                   files={"image": ("q.jpg", added[pid], "image/jpeg")})
                        if r.status_code != 200 or not any(x["id"] == pid and x["score"] >= 0.9999
                                                           for x in r.json()["results"]):
                            unsearchable.append(pid)
                    for pid in sorted(deleted):
                        if c.get(f"/v1/products/{pid}").status_code != 404:
                            resurrected.append(pid)
                except httpx.HTTPError as e:  # the checks are incomplete: an error, with what the server was doing
                    errors.append(f"checks after the run: transport error {e!r} ({e.request.url.path})")
                    if isinstance(e, httpx.TimeoutException):
                        on_timeout()
        finally:  # whatever happened: no server is left running
            serverproc.stop(proc)
        stall_stacks = None
        if dump_at:
            with open(log_path, "rb") as f:
                f.seek(dump_at[0])
                stall_stacks = f.read().decode(errors="replace")[:30000]
        from indexer.store import Store

        with Store.open(index) as store:
            check = store.check()

    def pct(values, q):
        return round(float(np.percentile(values, q)), 2) if values else None

    total = sum(len(v) for v in latencies.values())
    result = {
        "seconds": seconds, "clients": clients, "requests": total, "requests_per_s": round(total / seconds, 2),
        "errors": len(errors), "error_examples": errors[:5],
        "writes_acknowledged": len(added), "deletes_acknowledged": len(deleted),
        "lost_writes": len(lost), "unsearchable_writes": len(unsearchable), "unsearchable_examples": unsearchable[:5],
        "resurrected_deletes": len(resurrected), "check_problems": check["problems"],
        "rss_warm_mb": round(warm_rss[0] / 1024, 1) if warm_rss else None, "rss_end_mb": round(end_rss / 1024, 1),
        "stall_stacks": stall_stacks, "stall_probes": probes or None, "batcher_rescues": int(rescues),
    }
    result["rss_growth"] = round(end_rss / warm_rss[0] - 1, 4) if warm_rss and warm_rss[0] else None
    for kind, values in latencies.items():
        result[f"{kind}_count"] = len(values)
        result[f"{kind}_p50_ms"] = pct(values, 50)
        result[f"{kind}_p99_ms"] = pct(values, 99)
    result["ok"] = (result["errors"] == 0 and not lost and not unsearchable and not resurrected and check["ok"]
                    and result["rss_growth"] is not None and result["rss_growth"] < 0.10)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("index", help="index directory (copied; the original is not changed)")
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds a client waits for a response")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--photos", nargs="*", default=None, help="query photos (default: 8 photos of the index)")
    ap.add_argument("--quick", action="store_true", help="20 s with 4 clients")
    ap.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.clients = 20.0, 4
    photos = [Path(p) for p in args.photos] if args.photos else _index_photos(Path(args.index))
    result = run(Path(args.index), args.seconds, args.clients, photos, timeout_s=args.timeout)
    if not args.json:
        print(f"{result['requests']} requests in {result['seconds']:.0f} s with {result['clients']} clients "
              f"({result['requests_per_s']}/s): {result['errors']} errors, {result['lost_writes']} lost writes, "
              f"{result['unsearchable_writes']} acknowledged writes not found by their own photo, "
              f"{result['resurrected_deletes']} deleted products found again")
        print(f"  check after shutdown: {'clean' if not result['check_problems'] else result['check_problems']}")
        for kind in ("image", "text", "add", "delete"):
            print(f"  {kind:<6} n={result[f'{kind}_count']:<6} p50 {result[f'{kind}_p50_ms']} ms  "
                  f"p99 {result[f'{kind}_p99_ms']} ms")
        if result["stall_probes"]:
            print(f"  a request timed out; then, on a new connection: {result['stall_probes']}")
        if result["stall_stacks"]:
            print("  a request timed out; the server's threads were then at:\n" + result["stall_stacks"])
        print(f"  server RSS {result['rss_warm_mb']} MB after warm-up, {result['rss_end_mb']} MB at the end "
              f"(growth {100 * (result['rss_growth'] or 0):.1f} %)")
    print(json.dumps(result))
    return 0 if result["ok"] else 1


def _index_photos(index: Path) -> list[Path]:
    import sqlite3

    db = sqlite3.connect(f"file:{(index / 'catalogue.sqlite').resolve()}?mode=ro", uri=True)
    rows = db.execute("SELECT source FROM photos WHERE source NOT LIKE 'http%' AND source NOT LIKE '%::%' "
                      "ORDER BY photo_id LIMIT 8").fetchall()
    return [Path(r[0]) for r in rows]


if __name__ == "__main__":
    sys.exit(main())
