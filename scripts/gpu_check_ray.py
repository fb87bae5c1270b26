"""GPU check of the Ray engine: one actor per GPU (``--gpus-per-worker 1``), images/s per GPU and GPU use.

    python scripts/gpu_check_ray.py [--images 4000] [--ray-address local|HOST:PORT] [--gpus-per-worker 1]
                                    [--cpus-per-worker C] [--json]

Runs as is on a machine with one or more NVIDIA GPUs and the ``ray`` extra installed
(``pip install -e '.[ray]'``): it indexes ``--images`` Magento photos (the catalogue's 725 repeated;
``$LOOKALIKE_DATASETS``, default ``../shared/datasets``) with ViT-B-32 (seeded random weights, as
``scripts/bench_index.py``) through ``lookalike index --engine ray --gpus-per-worker G``: Ray started on
this machine (or the cluster at ``--ray-address``), as many actors as GPUs / G, each holding the model
on its GPU (fp16 autocast, batches of 256) and reading photos with ``--cpus-per-worker`` threads
(default: the host's cores / actors). While it runs, ``nvidia-smi`` samples every GPU's
``utilization.gpu`` every 0.2 s. Prints images/s (the run report's: actors' model loading included),
images/s per GPU, each GPU's mean utilisation over the run and the photos each actor did.

Without a GPU (no ``nvidia-smi``, or it lists none) it stops at once with exit status 2 and says so.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_index import machine, magento_paths, random_weights, write_manifest  # noqa: E402
from bench_ray import index_run  # noqa: E402

SMI = ["nvidia-smi", "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits"]


def gpu_utilisation() -> dict[int, float]:
    """{GPU index: utilisation %} now; empty when there is no NVIDIA GPU or no nvidia-smi."""
    try:
        out = subprocess.run(SMI, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if out.returncode != 0:
        return {}
    got = {}
    for line in out.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit():
            try:
                got[int(parts[0])] = float(parts[1])
            except ValueError:
                pass
    return got


class Sampler(threading.Thread):
    """Every GPU's utilisation every 0.2 s until stopped: ``samples`` {GPU: [percent, ...]}."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: dict[int, list[float]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            for gpu, pct in gpu_utilisation().items():
                self.samples.setdefault(gpu, []).append(pct)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4000, help="photos to index (default 4000)")
    ap.add_argument("--ray-address", default="local", help="Ray cluster (default: start one here for the run)")
    ap.add_argument("--gpus-per-worker", type=float, default=1.0, help="GPUs per actor (default 1)")
    ap.add_argument("--cpus-per-worker", type=float, default=None,
                    help="CPUs (photo-reading threads) per actor (default: this host's cores / actors)")
    ap.add_argument("--work", default=None, help="folder for the manifest and index (default: a temporary one)")
    ap.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    args = ap.parse_args(argv)
    gpus = gpu_utilisation()
    if not gpus:
        print("error: no NVIDIA GPU found (nvidia-smi missing or lists none): run this on a GPU machine with the "
              "ray extra installed (pip install -e '.[ray]'); see docs/PERFORMANCE.md, 'Scaling out'",
              file=sys.stderr)
        return 2
    actors = max(1, int(len(gpus) // args.gpus_per_worker))
    cpus = args.cpus_per_worker or max(1.0, float((os.cpu_count() or 1) // actors))
    tmp = tempfile.TemporaryDirectory(prefix="gpu-check-ray-") if args.work is None else None
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    weights = random_weights(work)
    manifest = work / "photos.jsonl"
    write_manifest(magento_paths(args.images), manifest)
    print(f"{len(gpus)} GPUs; {actors} actors with {args.gpus_per_worker:g} GPU and {cpus:g} CPUs each",
          file=sys.stderr)
    sampler = Sampler()
    sampler.start()
    try:
        report, wall = index_run(manifest, work / "index", weights,
                                 ["--engine", "ray", "--ray-address", args.ray_address, "--device", "cuda",
                                  "--gpus-per-worker", f"{args.gpus_per_worker:g}", "--cpus-per-worker", f"{cpus:g}",
                                  "--ray-workers", str(actors)])
    finally:
        sampler.stop.set()
        sampler.join()
    util = {gpu: round(sum(xs) / len(xs), 1) for gpu, xs in sorted(sampler.samples.items()) if xs}
    res = {"machine": machine(), "gpus": len(gpus), "actors": actors, "cpus_per_worker": cpus,
           "images": report["indexed"], "failed": report["failed"], "images_per_s": report["images_per_s"],
           "images_per_s_per_gpu": round(report["images_per_s"] / len(gpus), 1), "wall_s": round(wall, 1),
           "gpu_util_pct": util, "workers": report["workers"]}
    print(f"images/s: {res['images_per_s']:.1f} over {len(gpus)} GPUs = {res['images_per_s_per_gpu']:.1f} per GPU "
          f"({report['indexed']} photos, {report['failed']} failed; {wall:.0f} s with start-up)")
    for gpu, pct in util.items():
        print(f"GPU {gpu}: {pct:.1f} % busy on average ({len(sampler.samples[gpu])} samples)")
    for w in report["workers"]:
        print(f"actor pid {w['pid']} on {w['host']}: {w['photos']} photos")
    if args.json:
        print(json.dumps(res))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
