"""Query latency, concurrency and cold start of `lookalike serve` on loopback, with and without
micro-batching, in one run.

    python scripts/bench_query.py [--index DIR] [--model ViT-B-32|lookalike-base] [--device auto|cpu|cuda]
                                  [--quick] [--json]

Without ``--index`` it first indexes the Magento catalogue photos (all 725; 120 with
``--quick``) with ``--model`` (ViT-B-32 with seeded random weights by default: the
architecture of the default model, whose pretrained weights cannot be downloaded here).
Then, for each mode (one forward pass at a time and no batching: ``LOOKALIKE_INFERENCE_STREAMS=1``
and ``LOOKALIKE_BATCH_WINDOW_MS=0``, the server as it was before CPU streams; micro-batching off:
``LOOKALIKE_BATCH_WINDOW_MS=0``; on: the default window, both with the default streams; the first is
skipped where only one pass can run, on CUDA or the torch back-end, and reported as the second), it
starts the real server as a subprocess and measures:

- cold start: seconds from spawning ``lookalike serve`` to the first answered image query;
- latency, one client: p50/p99 of ``--queries`` image searches (Magento photos as uploads,
  k=10) and of text searches, first of distinct texts (not cached) and then repeated ones
  (answered from the text-embedding LRU cache);
- throughput: image searches per second with 1, 4 and 16 concurrent clients, each
  sending its next query as soon as the last is answered, for ``--seconds`` per level.

The client runs on the same machine, so it takes some CPU from the server (on 2 cores,
noticeably). ``--device`` is passed to ``lookalike index`` and to the server
(``LOOKALIKE_DEVICE``); ``auto``, the default, is CUDA where there is a GPU. Photos are read
from ``--datasets`` or ``$LOOKALIKE_DATASETS`` (default ``../shared/datasets``). Where no
``lookalike`` command is installed (a bare checkout on ``PYTHONPATH``), the server is started
through a shim that runs ``python -m indexer.cli``. The last line with ``--json`` is one JSON object: ``image_p50_ms``,
``image_p99_ms``, ``text_p50_ms``, ``text_p99_ms``, ``text_cached_p50_ms``, ``qps``
(``{"1": {"batched": x, "unbatched": y, "ratio": x / y, "one_stream": z, "vs_one_stream": max(x, y) / z}, ...}``), ``cold_start_s``, ``machine``, ``ceiling`` (what bounds
image searches/s on this machine, measured first: :func:`ceiling`), plus per-mode details.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchenv  # noqa: E402

if __name__ == "__main__":  # before numpy loads OpenBLAS; never when imported (tests)
    benchenv.reexec_without_blas_env(__file__)

import httpx  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
import serverproc  # noqa: E402

DATASETS = Path(os.environ.get("LOOKALIKE_DATASETS", ROOT.parent / "shared" / "datasets")).resolve()
TEXTS = ["hoodie", "red running shoes", "black yoga pants", "a leather bag", "a sports watch", "striped tee",
         "rain jacket", "white tank top", "green shorts", "a water bottle", "blue sweatshirt", "gym bag",
         "fitness ball", "grey hoodie with zipper", "purple bra", "running jacket", "a backpack", "yoga mat",
         "men's polo shirt", "women's capri pants"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ensure_cli(work: Path) -> None:
    """Put a ``lookalike`` shim on ``PATH`` when no ``lookalike`` command is installed (serverproc starts
    the server as ``lookalike serve``): it runs this interpreter with ``-m indexer.cli`` and the checkout
    on ``PYTHONPATH``."""
    if shutil.which("lookalike", path=str(Path(sys.executable).parent)) or shutil.which("lookalike"):
        return
    bin_dir = work / "bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "lookalike"
    shim.write_text(f'#!/bin/sh\nPYTHONPATH="{ROOT}${{PYTHONPATH:+:$PYTHONPATH}}" exec "{sys.executable}" -m indexer.cli "$@"\n')
    shim.chmod(0o755)
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    log(f"no lookalike command installed: serving through {shim}")


def machine() -> dict:
    """The machine (scripts/benchenv.py) and, where nvidia-smi answers, the GPU and its driver."""
    info = benchenv.machine(with_model_runtime=True)
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip().splitlines()
        if out:
            info["gpu"], info["driver"] = [x.strip() for x in out[0].split(",", 1)]
    except (OSError, ValueError, subprocess.TimeoutExpired):
        pass
    return info


def ceiling(index: Path, uploads: list[bytes], device: str, max_batch: int = 16, seconds: float = 4.0) -> dict:
    """What bounds image searches/s here, measured in this process before any server runs.

    ``model_images_per_s``: the image tower (the index's model, as the server loads it) on batches of
    1 and of ``max_batch`` (the server's micro-batch limit) preprocessed uploads. ``decode_ms``: decoding
    and preprocessing one upload, one thread. With every core shared by both, a query costs
    ``cores / rate + decode`` core-seconds, so ``bound_qps`` is ``cores / that`` at either batch size, and
    ``max_batching_gain`` = bound at ``max_batch`` / bound at 1: the most micro-batching can give on
    these uploads, whatever the server does (HTTP, threads and the client's own CPU come on top).
    ``streams``: the parallel forward passes the server runs concurrent queries on (OpenVINO CPU streams,
    ``inference_streams`` = 0); when more than one, ``model_images_per_s["1xN"]`` is the tower on batches of
    1 in N threads at once, the unbatched server's tower rate under load."""

    sys.path.insert(0, str(ROOT))
    from indexer.images import image_from_bytes
    from indexer.model import load_model

    spec = json.loads((index / "manifest.json").read_text())["model"]
    model = load_model(spec["name"], spec.get("pretrained"), device)
    t0 = time.perf_counter()
    decoded = [model.preprocess(image_from_bytes(u, draft_size=model.draft_size)) for u in uploads]
    decode_s = (time.perf_counter() - t0) / len(uploads)
    import torch

    warm = torch.stack([decoded[i % len(decoded)] for i in range(max_batch)])
    for _ in range(-(-64 // max_batch) + 1):  # warm up; an uncalibrated int8 tower calibrates here (64 photos)
        model.embed_image_tensors(warm)
    rates = {}
    for bs in (1, max_batch):
        x = torch.stack([decoded[i % len(decoded)] for i in range(bs)])
        model.embed_image_tensors(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model.embed_image_tensors(x)
            n += bs
        rates[bs] = n / (time.perf_counter() - t0)
    # the server's default: concurrent queries as parallel forward passes (CPU streams), batch 1 each
    passes = model.set_streams(0)
    if passes > 1:
        x = torch.stack([decoded[0]])
        n, stop, t0 = [0], time.perf_counter() + seconds, time.perf_counter()

        def one_stream() -> None:
            model.embed_image_tensors(x)
            while time.perf_counter() < stop:
                model.embed_image_tensors(x)
                n[0] += 1

        threads = [threading.Thread(target=one_stream) for _ in range(passes)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rates[f"1x{passes}"] = n[0] / (time.perf_counter() - t0)
    cores = os.cpu_count() or 1
    if model.device.type == "cuda":  # the GPU runs the model; the cores only decode
        bound = {bs: min(r, cores / decode_s) for bs, r in rates.items()}
    else:
        bound = {bs: cores / (cores / r + decode_s) for bs, r in rates.items()}
    return {"model_precision": model.precision, "model_backend": model.backend, "streams": passes,
            "model_images_per_s": {str(bs): round(r, 1) for bs, r in rates.items()},
            "decode_ms": round(decode_s * 1000, 2), "bound_qps": {str(bs): round(b, 1) for bs, b in bound.items()},
            "max_batching_gain": round(bound[max_batch] / bound[1], 2)}


def build_index(work: Path, model: str, photos: list[Path], device: str = "auto") -> Path:
    """Index ``photos`` (one product each) with ``model`` via ``lookalike index``."""
    manifest = work / "catalogue.jsonl"
    with manifest.open("w") as f:
        for i, p in enumerate(photos):
            f.write(json.dumps({"id": f"p{i:05d}", "image": str(p), "title": p.stem}) + "\n")
    args = ["--model", model]
    if model == "ViT-B-32":
        import open_clip
        import torch

        torch.manual_seed(0)
        weights = work / "vit-b-32-random.pt"
        torch.save(open_clip.create_model("ViT-B-32", pretrained=None).state_dict(), weights)
        args += ["--pretrained", str(weights)]
    out = work / "index"
    cmd = [sys.executable, "-m", "indexer.cli", "index", str(manifest), "--out", str(out), "--quiet", "--offline",
           "--device", device, *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if proc.returncode != 0:
        raise SystemExit(f"error: lookalike index failed:\n{proc.stderr[-2000:]}")
    return out


def percentile(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 2) if values else float("nan")


def image_query(client: httpx.Client, data: bytes) -> float:
    t0 = time.perf_counter()
    r = client.post("/v1/search/image", params={"k": 10}, files={"image": ("q.jpg", data, "image/jpeg")})
    if r.status_code != 200:
        raise RuntimeError(f"image search answered {r.status_code}: {r.text[:300]}")
    return (time.perf_counter() - t0) * 1000


def text_query(client: httpx.Client, text: str) -> float:
    t0 = time.perf_counter()
    r = client.post("/v1/search/text", json={"query": text, "k": 10})
    if r.status_code != 200:
        raise RuntimeError(f"text search answered {r.status_code}: {r.text[:300]}")
    return (time.perf_counter() - t0) * 1000


def throughput(base: str, uploads: list[bytes], clients: int, seconds: float) -> dict:
    """Closed loop: ``clients`` threads, each sends its next image query when the last is answered."""
    done: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def worker(n: int) -> None:
        with httpx.Client(base_url=base, timeout=120) as c:
            image_query(c, uploads[n % len(uploads)])  # connection set up outside the timed window
            start.wait()
            i = n
            while time.monotonic() < stop_at[0]:
                try:
                    done[n].append(image_query(c, uploads[i % len(uploads)]))
                except (RuntimeError, httpx.HTTPError) as e:
                    errors.append(str(e))
                i += clients

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.monotonic() + 3600
    start.wait()
    t0 = time.monotonic()
    stop_at[0] = t0 + seconds
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    lat = [x for d in done for x in d]
    return {"clients": clients, "qps": round(len(lat) / elapsed, 2), "p50_ms": percentile(lat, 50),
            "p99_ms": percentile(lat, 99), "errors": len(errors)}


def run_mode(index: Path, work: Path, batched: bool, uploads: list[bytes], args, one_stream: bool = False) -> dict:
    """One server: micro-batching on or off; ``one_stream``: one forward pass at a time
    (``LOOKALIKE_INFERENCE_STREAMS=1``, the server before CPU streams), else the default streams."""
    env = {"LOOKALIKE_ACCESS_LOG": "false", "LOOKALIKE_LOG_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1",
           "LOOKALIKE_DEVICE": args.device}
    if not batched:
        env["LOOKALIKE_BATCH_WINDOW_MS"] = "0"
    if one_stream:
        env["LOOKALIKE_INFERENCE_STREAMS"] = "1"
    mode = ("batched" if batched else "unbatched") + (", one stream" if one_stream else "")
    port = serverproc.free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = work / f"server-{mode.replace(', ', '-').replace(' ', '-')}.log"
    t0 = time.perf_counter()
    proc = serverproc.spawn(index, port, env, log_path)
    try:
        with httpx.Client(base_url=base, timeout=120) as c:
            deadline = time.monotonic() + args.start_timeout
            while True:  # cold start: until the first image query is answered
                if proc.poll() is not None:
                    raise SystemExit(f"error: server exited: {log_path.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise SystemExit(f"error: no answer to an image query in {args.start_timeout:.0f} s: "
                                     f"{log_path.read_text(errors='replace')[-2000:]}")
                try:
                    r = c.post("/v1/search/image", files={"image": ("q.jpg", uploads[0], "image/jpeg")})
                    if r.status_code == 200:
                        break
                    if r.status_code != 503 or "failed to load" in r.text:  # 503: still loading
                        raise SystemExit(f"error: the first image query answered {r.status_code}: {r.text[:500]}")
                except httpx.TransportError:
                    pass
                time.sleep(0.02)
            cold = time.perf_counter() - t0
            image = [image_query(c, uploads[i % len(uploads)]) for i in range(args.queries)]
            texts = [f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(args.queries)]  # distinct: never cached
            text = [text_query(c, t) for t in texts]
            cached = [text_query(c, t) for t in texts]
        levels = [throughput(base, uploads, n, args.seconds) for n in args.clients]
    finally:
        serverproc.stop(proc)
    log(f"{mode}: cold start {cold:.2f} s; image p50/p99 {percentile(image, 50)}/{percentile(image, 99)} ms; "
        f"text p50/p99 {percentile(text, 50)}/{percentile(text, 99)} ms (cached p50 {percentile(cached, 50)} ms); "
        + ", ".join(f"{lv['clients']} clients {lv['qps']} q/s" for lv in levels))
    return {"cold_start_s": round(cold, 2), "image_p50_ms": percentile(image, 50), "image_p99_ms": percentile(image, 99),
            "text_p50_ms": percentile(text, 50), "text_p99_ms": percentile(text, 99),
            "text_cached_p50_ms": percentile(cached, 50), "levels": levels}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", default=None, help="serve this index instead of building one from the Magento photos")
    ap.add_argument("--model", default="ViT-B-32", help="model for the index built here (ViT-B-32 random weights, or a bundled name)")
    ap.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda: for the index built here and the server")
    ap.add_argument("--datasets", default=None, help="datasets folder (default $LOOKALIKE_DATASETS, else ../shared/datasets)")
    ap.add_argument("--quick", action="store_true", help="small index, short levels: under a minute")
    ap.add_argument("--queries", type=int, default=100, help="queries per latency measurement (default 100)")
    ap.add_argument("--seconds", type=float, default=15.0, help="seconds per concurrency level (default 15)")
    ap.add_argument("--clients", default="1,4,16", help="concurrency levels (default 1,4,16)")
    ap.add_argument("--start-timeout", type=float, default=300.0, help="seconds to wait for the server's first answer")
    ap.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    ap.add_argument("--keep-blas-env", action="store_true",
                    help=f"keep {' / '.join(benchenv.BLAS_ENV)} if set (default: re-run without them)")
    args = ap.parse_args(argv)
    info = machine()
    for line in benchenv.describe_machine(info):
        log(line)
    args.clients = [int(x) for x in args.clients.split(",")]
    if args.quick:
        args.queries, args.seconds = min(args.queries, 20), min(args.seconds, 2.0)
    datasets = Path(args.datasets).resolve() if args.datasets else DATASETS
    photos = sorted((datasets / "magento" / "images").rglob("*.jpg"))
    if not photos:
        raise SystemExit(f"error: no photos under {datasets / 'magento' / 'images'} (set LOOKALIKE_DATASETS)")
    with tempfile.TemporaryDirectory(prefix="bench-query-") as tmp:
        work = Path(tmp)
        ensure_cli(work)
        if args.index:
            index = Path(args.index)
        else:
            chosen = photos[:: max(1, len(photos) // 120)] if args.quick else photos
            log(f"indexing {len(chosen)} Magento photos with {args.model} ...")
            index = build_index(work, args.model, chosen, args.device)
        uploads = [p.read_bytes() for p in photos[1::7][:40]]
        limit = ceiling(index, uploads, args.device)
        log(f"ceiling ({limit['model_backend']} {limit['model_precision']}): image tower "
            + ", ".join(f"batch {bs}: {r} images/s" for bs, r in limit["model_images_per_s"].items())
            + f"; decode + preprocess {limit['decode_ms']} ms per upload; bound "
            + ", ".join(f"batch {bs}: {r} q/s" for bs, r in limit["bound_qps"].items())
            + f"; the most micro-batching can give here: {limit['max_batching_gain']}x")
        modes = {"unbatched": run_mode(index, work, False, uploads, args),
                 "batched": run_mode(index, work, True, uploads, args)}
        # with one pass possible (CUDA, the torch back-end) the unbatched server is the one-stream server
        modes["one_stream"] = (run_mode(index, work, False, uploads, args, one_stream=True)
                               if limit["streams"] > 1 else modes["unbatched"])
    o, u, b = modes["one_stream"], modes["unbatched"], modes["batched"]
    qps = {str(lu["clients"]): {"batched": lb["qps"], "unbatched": lu["qps"], "ratio": round(lb["qps"] / lu["qps"], 2),
                                "one_stream": lo["qps"], "vs_one_stream": round(max(lb["qps"], lu["qps"]) / lo["qps"], 2)}
           for lo, lu, lb in zip(o["levels"], u["levels"], b["levels"])}
    result = {"model": args.model, "index": str(args.index or f"{len(chosen)} Magento photos"),
              "device": args.device, "machine": info, "ceiling": limit,
              "image_p50_ms": b["image_p50_ms"], "image_p99_ms": b["image_p99_ms"],
              "text_p50_ms": b["text_p50_ms"], "text_p99_ms": b["text_p99_ms"],
              "text_cached_p50_ms": b["text_cached_p50_ms"], "qps": qps, "cold_start_s": u["cold_start_s"],
              "modes": modes}
    print(f"\nlatency, one client (batching on): image p50 {result['image_p50_ms']} ms, p99 {result['image_p99_ms']} ms; "
          f"text p50 {result['text_p50_ms']} ms, p99 {result['text_p99_ms']} ms, cached p50 {result['text_cached_p50_ms']} ms")
    print(f"cold start (spawn -> first answered image query): {u['cold_start_s']} s, {b['cold_start_s']} s")
    print(f"{'clients':>8}{'q/s 1 stream':>14}{'q/s unbatched':>15}{'q/s batched':>13}{'ratio':>8}{'best/1 str.':>13}"
          f"{'p50 ms unb.':>13}{'p50 ms bat.':>13}")
    for lo, lu, lb in zip(o["levels"], u["levels"], b["levels"]):
        q = qps[str(lu["clients"])]
        print(f"{lu['clients']:>8}{lo['qps']:>14.1f}{lu['qps']:>15.1f}{lb['qps']:>13.1f}{q['ratio']:>8.2f}"
              f"{q['vs_one_stream']:>13.2f}{lu['p50_ms']:>13.1f}{lb['p50_ms']:>13.1f}")
    errors = sum(lv["errors"] for m in modes.values() for lv in m["levels"])
    if errors:
        print(f"{errors} queries failed during the throughput runs")
    if args.json:
        print(json.dumps(result))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
