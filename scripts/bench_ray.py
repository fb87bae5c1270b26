"""Bulk indexing on Ray against the local engine on the same photos, and the Ray driver's commit rate alone.

    python scripts/bench_ray.py [--images 725] [--ray-workers N] [--commit-vectors 200000] [--json]

1. The same Magento photos (``--images``, the catalogue's 725 photos repeated to get there) are
   indexed twice, each by ``lookalike index`` in a subprocess with ViT-B-32 (seeded random weights:
   speed does not depend on the weights): the local engine (its defaults: decode workers, OpenVINO
   bf16 on AMX CPUs), then ``--engine ray --ray-address local`` (Ray started on this machine for the
   run, ``--ray-workers`` actors, default one per core). images/s is each run report's
   ``images_per_s``: from the catalogue scan to the last commit, model loading excluded for the local
   engine but included for Ray (its actors load the model after the run starts). The mean cosine
   between the two runs' vectors of each photo checks that both embed alike.
2. The driver's commit rate: the Ray driver's own work with the workers' output made up (random unit
   vectors of dim 512, batches of 64 as :class:`indexer.pipeline_ray.EmbedWorker` returns them), fed
   through the same code as a run (:class:`indexer.pipeline_ray.ResultTaker`, then
   :class:`indexer.pipeline._Run`: SQLite transactions of 1024 photos with the FAISS index updated in
   the same step), ``--commit-vectors`` vectors into a new store; then the run's last step
   (:meth:`indexer.pipeline._Run.finish`: products, FAISS snapshot, report) timed apart.
3. The driver's first step alone: reading a ``--catalogue-rows`` JSONL manifest (made-up paths) and
   planning the run (one stat per photo), with the memory the catalogue holds per row.
4. A table of N nodes computed from these: ``min(N x per-node rate, commit rate)`` and the hours for
   100M photos (the formulas are in docs/PERFORMANCE.md, "Scaling out").

Photos are read from ``$LOOKALIKE_DATASETS`` (default ``../shared/datasets``).
"""
from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_index import ARCH, ROOT, machine, magento_paths, random_weights, write_manifest  # noqa: E402

NODES = (1, 2, 4, 8, 16, 32, 64)
TARGET = 100_000_000


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def index_run(manifest: Path, out: Path, weights: Path, extra: list[str]) -> tuple[dict, float]:
    """``lookalike index`` in a subprocess: (its report, wall seconds of the whole command)."""
    cmd = [sys.executable, "-m", "indexer.cli", "index", str(manifest), "--out", str(out), "--model", ARCH,
           "--pretrained", str(weights), "--offline", "--quiet", "--json", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall


def vectors(out: Path) -> dict[str, np.ndarray]:
    db = sqlite3.connect(out / "catalogue.sqlite")
    got = {pid: np.frombuffer(v, np.float32) for pid, v in db.execute("SELECT product_id, vector FROM photos")}
    db.close()
    return got


def commit_rate(n: int, work: Path, dim: int = 512, batch: int = 64) -> dict:
    """The Ray driver's work alone on ``n`` made-up results: vectors/s through ResultTaker + _Run.add
    (commits included), and the seconds of _Run.finish."""
    from indexer.catalogue import Catalogue
    from indexer.pipeline import _Run
    from indexer.pipeline_ray import ResultTaker
    from indexer.records import ModelIdentity
    from indexer.store import Store

    catalogue = Catalogue()
    for i in range(n):
        catalogue.add(f"p{i // 4:08d}", f"/bench/photo-{i:09d}.jpg", f"bench:{i}", title=f"product {i // 4}",
                      category="bench/photos")
    identity = ModelIdentity(name="bench", pretrained=None, weights_sha256="0" * 64, dim=dim, image_size=224)
    rng = np.random.default_rng(0)
    with Store.create(work / "commit-bench", identity) as store:
        run = _Run(catalogue, store, identity, "bench", commit_every=1024, engine="ray")
        taker = ResultTaker(run.tasks)
        outs = []
        for start in range(0, n, batch):
            k = min(batch, n - start)
            v = rng.standard_normal((k, dim)).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            outs.append({"task": np.arange(start, start + k), "status": np.array(["embedded"] * k, dtype=object),
                         "sha256": np.array([f"{start + j:064x}" for j in range(k)], dtype=object),
                         "reason": np.array([""] * k, dtype=object), "message": np.array([""] * k, dtype=object),
                         "width": np.full(k, 1000), "height": np.full(k, 1200), "vector": v,
                         "node_id": np.array(["n"] * k, dtype=object), "host": np.array(["h"] * k, dtype=object),
                         "pid": np.full(k, 1)})
        t0 = time.perf_counter()
        for out in outs:
            run.add(*taker.take(out))
        run.flush()
        streaming = time.perf_counter() - t0
        t1 = time.perf_counter()
        report = run.finish(prune=False)
        finish = time.perf_counter() - t1
        index_type = store.index_spec().type
    assert report.indexed == n and report.index_photos == n
    return {"commit_vectors": n, "commit_vectors_per_s": round(n / streaming, 1),
            "finish_seconds": round(finish, 2), "index_type": index_type,
            "db_bytes": (work / "commit-bench" / "catalogue.sqlite").stat().st_size}


def catalogue_rate(n: int, work: Path) -> dict:
    """The driver's first step alone: reading an ``n``-row JSONL manifest (4 photos per product, paths that
    do not exist) into a Catalogue, then planning the run (a stat per photo): rows/s and the Python
    memory the catalogue holds per row (tracemalloc)."""
    import tracemalloc

    from indexer.catalogue import read_catalogue
    from indexer.pipeline import _stat

    manifest = work / "rows.jsonl"
    with manifest.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"p{i // 4:08d}", "image": f"/data/images/{i % 1000:03d}/photo-{i:09d}.jpg",
                                "title": f"product {i // 4}", "category": "Women/Tops/Tees", "price": 19.99}) + "\n")
    t0 = time.perf_counter()
    catalogue = read_catalogue(manifest)
    read = time.perf_counter() - t0
    assert len(catalogue.rows) == n
    t1 = time.perf_counter()
    for row in catalogue.rows:
        _stat(row.source)
    stat = time.perf_counter() - t1
    del catalogue
    sample = work / "rows-sample.jsonl"  # tracemalloc slows reading ~8x: memory is measured on a sample
    m = min(n, 20_000)
    sample.write_text("".join(manifest.read_text().splitlines(keepends=True)[:m]))
    tracemalloc.start()
    held = read_catalogue(sample)
    per_row = tracemalloc.get_traced_memory()[0] / m
    tracemalloc.stop()
    del held
    return {"catalogue_rows": n, "catalogue_rows_per_s": round(n / read, 1), "catalogue_bytes_per_row": round(per_row),
            "stat_per_s": round(n / stat, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=725, help="Magento photos per run (default 725: each once)")
    ap.add_argument("--ray-workers", type=int, default=None, help="Ray actors (default: one per core)")
    ap.add_argument("--commit-vectors", type=int, default=200_000, help="vectors for the commit rate (default 200000)")
    ap.add_argument("--catalogue-rows", type=int, default=100_000,
                    help="manifest rows for the catalogue read rate (default 100000)")
    ap.add_argument("--skip-index", action="store_true", help="only the driver's rates")
    ap.add_argument("--work", default=None, help="folder for manifests and indexes (default: a temporary one)")
    ap.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    args = ap.parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="bench-ray-") if args.work is None else None
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"model": f"{ARCH} (random weights)", "machine": machine()}
    if not args.skip_index:
        weights = random_weights(work)
        paths = magento_paths(args.images)
        manifest = work / "photos.jsonl"
        write_manifest(paths, manifest)
        log(f"{len(paths)} Magento photos ({len(set(paths))} distinct), {ARCH}")
        local, local_wall = index_run(manifest, work / "local", weights, [])
        log(f"  local engine:  {local['images_per_s']:.1f} images/s ({local_wall:.0f} s with start-up)")
        extra = ["--engine", "ray", "--ray-address", "local"]
        if args.ray_workers:
            extra += ["--ray-workers", str(args.ray_workers)]
        ray, ray_wall = index_run(manifest, work / "ray", weights, extra)
        workers = len(ray["workers"])
        log(f"  Ray engine:    {ray['images_per_s']:.1f} images/s with {workers} actors ({ray_wall:.0f} s with "
            "start-up)")
        a, b = vectors(work / "local"), vectors(work / "ray")
        cos = float(np.mean([a[k] @ b[k] for k in a]))
        res.update({"images": len(paths), "local_images_per_s": local["images_per_s"],
                    "ray_images_per_s": ray["images_per_s"], "ray_over_local": round(ray["images_per_s"] /
                                                                                      local["images_per_s"], 2),
                    "ray_workers": workers, "ray_workers_detail": ray["workers"], "local_wall_s": round(local_wall, 1),
                    "ray_wall_s": round(ray_wall, 1), "mean_cosine": round(cos, 5)})
    log(f"driver commit rate: {args.commit_vectors} made-up results, dim 512")
    res.update(commit_rate(args.commit_vectors, work))
    log(f"  {res['commit_vectors_per_s']:.0f} vectors/s committed; the last step (products, FAISS index "
        f"{res['index_type']} chosen and built, snapshot, report) {res['finish_seconds']:.1f} s")
    log(f"driver catalogue read: {args.catalogue_rows} manifest rows")
    res.update(catalogue_rate(args.catalogue_rows, work))
    log(f"  {res['catalogue_rows_per_s']:.0f} rows/s read, {res['catalogue_bytes_per_row']} bytes/row held, "
        f"{res['stat_per_s']:.0f} stat/s")
    print(f"\n{'':<34}{'images/s':>10}")
    if "ray_images_per_s" in res:
        print(f"{'local engine, 1 node':<34}{res['local_images_per_s']:>10.1f}")
        print(f"{'Ray engine, 1 node, ' + str(res['ray_workers']) + ' actors':<34}{res['ray_images_per_s']:>10.1f}"
              f"   ({res['ray_over_local']:.2f}x local; mean cosine {res['mean_cosine']:.4f})")
    print(f"{'driver commit rate (vectors/s)':<34}{res['commit_vectors_per_s']:>10.0f}")
    print(f"{'driver catalogue read (rows/s)':<34}{res['catalogue_rows_per_s']:>10.0f}"
          f"   ({res['catalogue_bytes_per_row']} bytes/row in memory)")
    if "ray_images_per_s" in res:
        node = res["ray_images_per_s"]
        commit = res["commit_vectors_per_s"]
        print(f"\nN nodes like this one: min(N x {node:.1f}, {commit:.0f}) images/s; 100M photos:")
        print(f"{'nodes':>6}{'images/s':>12}{'100M hours':>12}  limit")
        rows = []
        for n in NODES:
            rate = min(n * node, commit)
            rows.append({"nodes": n, "images_per_s": round(rate, 1), "hours_100m": round(TARGET / rate / 3600, 1)})
            limit = "driver commits" if rate == commit else "workers"
            print(f"{n:>6}{rate:>12.1f}{TARGET / rate / 3600:>12.1f}  {limit}")
        res["scaling"] = rows
    if args.json:
        print(json.dumps(res))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
