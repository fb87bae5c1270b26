"""Bulk indexing throughput: a plain open_clip loop against `lookalike index`, on the same photos.

    python scripts/bench_index.py [--quick] [--json] [--device cpu|cuda] [--levers]

For each image set (Magento catalogue photos, and CIFAR-10 test images; each at least
``--images`` images, the Magento photos repeated to get there), two runs with the same
ViT-B-32 weights (random, seeded: speed does not depend on the weights, and pretrained
weights cannot be downloaded here):

(a) baseline: open_clip's model and preprocessing called in a plain Python loop, batch by
    batch, fp32: ``Image.open(path).convert("RGB")`` -> ``preprocess`` -> ``encode_image``
    -> normalise, the way simple tools do it;
(b) ours: the ``lookalike index`` command on a JSONL manifest of the same files, in a
    subprocess, with its defaults (decode workers, JPEG draft mode, the image tower run by
    OpenVINO in bf16 on CPUs with AMX; fp16 autocast with torch on CUDA).

Images/s excludes model loading in both (ours is the ``images_per_s`` of the run's
report: catalogue scan, change detection, decode, embed and SQLite/FAISS commits).
Agreement: the mean cosine between the two embeddings of each photo, and the mean overlap
of the top-10 neighbours (among the distinct photos, the query itself left out) of 100
fixed query photos under either set of embeddings.

``--levers`` also times each lever alone on the Magento photos, in this process (see
docs/PERFORMANCE.md): decode workers, JPEG draft mode, bf16, OpenVINO, batch size.
``--device cuda`` runs both on the GPU (fp32 baseline; ours with fp16 autocast, pinned
memory, non-blocking copies) and samples GPU utilisation (``nvidia-smi``, else NVML through
``pynvml``) every 0.2 s: ``gpu_util_pct`` is the mean over the indexing itself (the last
``seconds`` of the run's report), ``gpu_util_run_pct`` over the whole subprocess (start-up
and model loading included). The decode rate (``decode_images_per_s``) is the pipeline's
decoding alone: the same DataLoader, decode workers, JPEG draft mode, preprocessing and
batch size as ``lookalike index`` on that device, with no model; our images/s near it
means decoding is the limit, not the GPU. It is measured by default on CUDA, with
``--decode`` on CPU. Photos are read from ``$LOOKALIKE_DATASETS`` (default
``../shared/datasets``): ``magento/images/**/*.jpg`` and ``cifar10/test.tar.gz``.

The last line with ``--json`` is one JSON object: ``baseline_images_per_s``,
``images_per_s``, ``ratio``, ``top10_overlap``, ``mean_cosine`` (over all image sets:
total images / total seconds; agreement averaged), ``gpu_util_pct`` and
``decode_images_per_s`` (likewise, when measured), plus ``sets`` with each set's figures.
"""
from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchenv  # noqa: E402

if __name__ == "__main__":  # before numpy loads OpenBLAS; never when imported (bench_ray, tests)
    benchenv.reexec_without_blas_env(__file__)

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATASETS = Path(os.environ.get("LOOKALIKE_DATASETS", ROOT.parent / "shared" / "datasets")).resolve()
ARCH = "ViT-B-32"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- data
def magento_paths(n: int) -> list[str]:
    """The catalogue's photos, sorted, repeated until there are ``n``."""
    photos = sorted(str(p) for p in (DATASETS / "magento" / "images").rglob("*.jpg"))
    if not photos:
        raise SystemExit(f"error: no photos under {DATASETS / 'magento' / 'images'} (set LOOKALIKE_DATASETS)")
    return [photos[i % len(photos)] for i in range(n)]


def cifar_paths(n: int, work: Path) -> list[str]:
    """The first ``n`` CIFAR-10 test images (32x32 JPEG), extracted to ``work/cifar``."""
    out = work / "cifar"
    out.mkdir(exist_ok=True)
    paths: list[str] = []
    with tarfile.open(DATASETS / "cifar10" / "test.tar.gz") as tar:
        for member in tar:
            if len(paths) >= n:
                break
            if member.isfile() and member.name.endswith(".jpg"):
                dest = out / member.name.replace("/", "_")
                dest.write_bytes(tar.extractfile(member).read())
                paths.append(str(dest))
    while len(paths) < n:  # fewer images than asked: repeat them
        paths.append(paths[len(paths) % max(1, len(paths))])
    return paths


def write_manifest(paths: list[str], path: Path) -> None:
    with path.open("w") as f:
        for i, p in enumerate(paths):
            f.write(json.dumps({"id": f"p{i:06d}", "image": p, "title": f"photo {i}"}) + "\n")


# ------------------------------------------------------------------------ baseline
def random_weights(work: Path) -> Path:
    """ViT-B-32 with seeded random weights, saved as a checkpoint both runs load."""
    import open_clip
    import torch

    path = work / "vit-b-32-random.pt"
    if not path.exists():
        torch.manual_seed(0)
        model = open_clip.create_model(ARCH, pretrained=None)
        torch.save(model.state_dict(), path)
    return path


def baseline(paths: list[str], weights: Path, device: str, batch_size: int,
             model_name: str = ARCH) -> tuple[np.ndarray, float, float | None]:
    """The plain loop: returns (embeddings float32 (n, dim), images/s, mean GPU % during the loop on CUDA).

    ViT-B-32: open_clip's own ``create_model_and_transforms``. A bundled model (``lookalike-base``, which
    open_clip cannot build by name): its torch module and preprocessing as ``load_model`` builds them,
    fp32, torch back-end, called in the same plain loop."""
    import open_clip
    import torch
    from PIL import Image

    if model_name == ARCH:
        model, _, preprocess = open_clip.create_model_and_transforms(ARCH, pretrained=str(weights))
    else:
        from indexer.model import load_model

        loaded = load_model(model_name, None, device, precision="fp32", backend="torch")
        model, preprocess = loaded.model, loaded.preprocess
    model.eval().to(device)
    out = []
    with GpuSampler() if device.startswith("cuda") else _Null() as sampler:
        t0 = time.perf_counter()
        for i in range(0, len(paths), batch_size):
            batch = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths[i : i + batch_size]])
            with torch.no_grad():
                feats = model.encode_image(batch.to(device)).float()
            out.append(torch.nn.functional.normalize(feats, dim=-1).cpu().numpy())
        seconds = time.perf_counter() - t0
    return np.concatenate(out), len(paths) / seconds, getattr(sampler, "mean", None)


# ----------------------------------------------------------------------------- ours
class GpuSampler:
    """GPU utilisation (%) every 0.2 s while running: ``nvidia-smi``, else NVML (``pynvml``).

    ``samples`` holds ``(time.monotonic(), percent)`` pairs; ``mean`` is over all of them,
    ``mean_since(t)`` over those taken at or after ``t``.
    """

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self.source: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._read = self._reader()

    def _reader(self):
        def smi() -> float:
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5).stdout
            return float(out.split()[0])

        try:
            smi()
            self.source = "nvidia-smi"
            return smi
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            pass
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.source = "nvml"
            return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:  # no NVML library, no GPU: no samples
            return None

    def _run(self) -> None:
        while self._read is not None and not self._stop.wait(0.2):
            try:
                self.samples.append((time.monotonic(), self._read()))
            except Exception:
                return

    def __enter__(self) -> "GpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def mean_since(self, t: float = float("-inf")) -> float | None:
        xs = [u for ts, u in self.samples if ts >= t]
        return round(float(np.mean(xs)), 1) if xs else None

    @property
    def mean(self) -> float | None:
        return self.mean_since()


def ours(paths: list[str], weights: Path, device: str, work: Path, name: str, extra: list[str],
         model_name: str = ARCH) -> tuple[np.ndarray, float, dict]:
    """`lookalike index` in a subprocess: returns (embeddings in ``paths`` order, images/s, GPU figures).

    GPU figures (on CUDA): ``gpu_util_pct`` over the indexing (the report's last ``seconds``),
    ``gpu_util_run_pct`` over the whole subprocess, ``gpu_samples`` taken during the indexing."""
    manifest = work / f"{name}.jsonl"
    write_manifest(paths, manifest)
    out = work / f"index-{name}"
    model_args = ["--model", ARCH, "--pretrained", str(weights)] if model_name == ARCH else ["--model", model_name]
    cmd = [sys.executable, "-m", "indexer.cli", "index", str(manifest), "--out", str(out), *model_args,
           "--device", device, "--offline", "--quiet", "--json", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with GpuSampler() if device.startswith("cuda") else _Null() as sampler:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        ended = time.monotonic()
    if proc.returncode != 0:
        raise SystemExit(f"error: lookalike index failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    if report["indexed"] != len(paths):
        raise SystemExit(f"error: lookalike index embedded {report['indexed']} of {len(paths)} photos: {report['failures'][:3]}")
    db = sqlite3.connect(out / "catalogue.sqlite")
    vecs = {pid: np.frombuffer(blob, np.float32) for pid, blob in db.execute("SELECT product_id, vector FROM photos")}
    db.close()
    emb = np.stack([vecs[f"p{i:06d}"] for i in range(len(paths))])
    gpu: dict = {}
    if isinstance(sampler, GpuSampler) and sampler.samples:
        since = ended - float(report["seconds"])
        gpu = {"gpu_util_pct": sampler.mean_since(since), "gpu_util_run_pct": sampler.mean,
               "gpu_samples": sum(1 for ts, _ in sampler.samples if ts >= since), "gpu_util_source": sampler.source}
    return emb, float(report["images_per_s"]), gpu


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


# --------------------------------------------------------------------------- decode
def decode_rate(paths: list[str], device: str, work: Path, name: str) -> dict:
    """The pipeline's decoding alone, no model: ``lookalike index``'s DataLoader over the same photos with
    its defaults on ``device`` (decode workers = cores up to 32, batch 256 on CUDA and 64 on CPU, JPEG
    draft mode, open_clip's preprocessing, batches stacked in the workers; pinned on CUDA).
    Returns ``{"decode_images_per_s", "decode_workers", "decode_batch_size"}`` (worker start-up included,
    as in the indexing run)."""
    import open_clip
    from torch.utils.data import DataLoader

    from indexer.catalogue import read_catalogue
    from indexer.images import DEFAULT_MAX_PIXELS
    from indexer.pipeline import DEFAULT_MAX_FILE_BYTES, _Batch, _PhotoDataset, _Task

    manifest = work / f"decode-{name}.jsonl"
    write_manifest(paths, manifest)
    tasks = [_Task(row, None, None, None) for row in read_catalogue(manifest).rows]
    model, _, preprocess = open_clip.create_model_and_transforms(ARCH, pretrained=None)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    del model
    cuda = device.startswith("cuda")
    workers = min(32, os.cpu_count() or 1)  # indexer.pipeline.index_catalogue's defaults
    batch_size = 256 if cuda else 64
    parallel = workers if len(tasks) > batch_size else 0
    dataset = _PhotoDataset(tasks, preprocess, DEFAULT_MAX_PIXELS, DEFAULT_MAX_FILE_BYTES, draft_size=max(2 * size, 224))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=parallel, collate_fn=_Batch, pin_memory=cuda,
                        prefetch_factor=4 if parallel else None)
    t0 = time.perf_counter()
    decoded = sum(len(batch.ok) for batch in loader)
    seconds = time.perf_counter() - t0
    if decoded != len(paths):
        raise SystemExit(f"error: decoding alone decoded {decoded} of {len(paths)} photos")
    return {"decode_images_per_s": round(decoded / seconds, 2), "decode_workers": parallel,
            "decode_batch_size": batch_size}


# ------------------------------------------------------------------------ agreement
def agreement(paths: list[str], a: np.ndarray, b: np.ndarray, queries: int = 100, k: int = 10) -> tuple[float, float]:
    """(mean top-k overlap of ``queries`` fixed query photos among the distinct photos, mean cosine a.b per photo)."""
    mean_cos = float(np.mean(np.sum(a * b, axis=1)))
    first = {}
    for i, p in enumerate(paths):
        first.setdefault(p, i)
    distinct = np.array(sorted(first.values()))
    a, b = a[distinct], b[distinct]
    q = np.linspace(0, len(distinct) - 1, min(queries, len(distinct))).astype(int)
    overlaps = []
    for x in (a, b):
        s = x[q] @ x.T
        s[np.arange(len(q)), q] = -np.inf
        overlaps.append(np.argsort(-s, axis=1)[:, :k])
    top10 = float(np.mean([len(set(u) & set(v)) / k for u, v in zip(*overlaps)]))
    return top10, mean_cos


# --------------------------------------------------------------------------- levers
def levers(paths: list[str], weights: Path, work: Path) -> list[dict]:
    """Each lever alone and stacked, in this process, on ``paths`` (decode+embed+store, images/s)."""
    from indexer.catalogue import read_catalogue
    from indexer.model import ClipModel, load_model
    from indexer.pipeline import index_catalogue
    from indexer.store import Store

    manifest = work / "levers.jsonl"
    write_manifest(paths, manifest)
    catalogue = read_catalogue(manifest)

    class NoDraft(ClipModel):
        draft_size = None  # decode every JPEG at full size

    def run(label: str, backend: str, precision: str, workers: int, draft: bool, batch_size: int = 64) -> dict:
        model = load_model(ARCH, str(weights), "cpu", precision, backend)
        if not draft:
            model.__class__ = NoDraft
        out = work / f"levers-{len(rows)}"
        with Store.create(out, model.identity) as store:
            report = index_catalogue(catalogue, store, model, batch_size=batch_size, workers=workers, progress=False)
        row = {"lever": label, "backend": backend, "precision": precision, "workers": workers, "draft": draft,
               "batch_size": batch_size, "images_per_s": report.images_per_s}
        log(f"  {label:<48} {report.images_per_s:7.1f} images/s")
        rows.append(row)
        return row

    rows: list[dict] = []
    cores = os.cpu_count() or 1
    run("torch fp32, decode in the main process, no draft", "torch", "fp32", 0, False)
    run("torch fp32, decode workers, no draft", "torch", "fp32", cores, False)
    run("torch fp32, decode workers, JPEG draft", "torch", "fp32", cores, True)
    run("torch bf16, decode workers, JPEG draft", "torch", "bf16", cores, True)
    run("openvino fp32, decode workers, JPEG draft", "openvino", "fp32", cores, True)
    run("openvino bf16, decode in the main process, no draft", "openvino", "bf16", 0, False)
    run("openvino bf16, decode workers, JPEG draft (default)", "openvino", "bf16", cores, True)
    run("openvino bf16, 1 decode worker, JPEG draft", "openvino", "bf16", 1, True)
    for bs in (16, 32, 128):
        run(f"openvino bf16, workers, draft, batch {bs}", "openvino", "bf16", cores, True, batch_size=bs)
    return rows


def machine() -> dict:
    """The machine (scripts/benchenv.py: CPU flags, BLAS kernels, OpenBLAS variables, oneDNN cap, the
    precision ``auto`` picks) and, where CUDA is available, the GPU and its driver."""
    import torch

    info = benchenv.machine(with_model_runtime=True)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            pass
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000, help="images per set (default 2000)")
    ap.add_argument("--sets", default="magento,cifar10", help="comma-separated: magento, cifar10")
    ap.add_argument("--quick", action="store_true", help="96 images per set: under a minute")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--batch-size", type=int, default=64, help="baseline batch size (ours: lookalike index's default)")
    ap.add_argument("--decode", action="store_true", help="also time the pipeline's decoding alone (default on CUDA)")
    ap.add_argument("--datasets", default=None, help="datasets folder (default $LOOKALIKE_DATASETS, else ../shared/datasets)")
    ap.add_argument("--levers", action="store_true", help="also time each lever alone on the Magento photos")
    ap.add_argument("--lever-images", type=int, default=725, help="Magento photos per lever run (default 725, all once)")
    ap.add_argument("--work", default=None, help="folder for the manifests and indexes (default: a temporary one)")
    ap.add_argument("--model", default=ARCH,
                    help=f"{ARCH} (seeded random weights, the default) or a bundled model such as lookalike-base")
    ap.add_argument("--keep-blas-env", action="store_true",
                    help=f"keep {' / '.join(benchenv.BLAS_ENV)} if set (default: re-run without them)")
    ap.add_argument("--index-args", default="", help="extra arguments for lookalike index, e.g. '--precision fp32'")
    ap.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    args = ap.parse_args(argv)
    global DATASETS
    if args.datasets:
        DATASETS = Path(args.datasets).resolve()
    cuda = args.device.startswith("cuda")
    n = 96 if args.quick else args.images
    tmp = tempfile.TemporaryDirectory(prefix="bench-index-") if args.work is None else None
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    weights = random_weights(work)
    info = machine()
    for line in benchenv.describe_machine(info):
        log(line)
    model_label = f"{ARCH} (random weights)" if args.model == ARCH else args.model
    results: dict = {"model": model_label, "device": args.device, "machine": info, "sets": {}}
    total_base = total_ours = 0.0
    for name in [s.strip() for s in args.sets.split(",") if s.strip()]:
        paths = magento_paths(n) if name == "magento" else cifar_paths(n, work) if name == "cifar10" else None
        if paths is None:
            raise SystemExit(f"error: unknown set {name!r}: use magento, cifar10")
        log(f"{name}: {len(paths)} images ({len(set(paths))} distinct)")
        base_emb, base_ips, base_gpu = baseline(paths, weights, args.device, args.batch_size, args.model)
        log(f"  baseline (plain open_clip loop, fp32): {base_ips:.1f} images/s"
            + (f", GPU {base_gpu}% busy" if base_gpu is not None else ""))
        our_emb, our_ips, gpu = ours(paths, weights, args.device, work, name, args.index_args.split(), args.model)
        log(f"  lookalike index:                       {our_ips:.1f} images/s"
            + (f", GPU {gpu['gpu_util_pct']}% busy while indexing ({gpu['gpu_samples']} samples; "
               f"{gpu['gpu_util_run_pct']}% over the whole run)" if gpu else ""))
        decode = decode_rate(paths, args.device, work, name) if args.decode or cuda else {}
        if decode:
            log(f"  decoding alone ({decode['decode_workers']} workers, batch {decode['decode_batch_size']}): "
                f"{decode['decode_images_per_s']:.1f} images/s")
        top10, cos = agreement(paths, base_emb, our_emb)
        results["sets"][name] = {"images": len(paths), "distinct_images": len(set(paths)),
                                 "baseline_images_per_s": round(base_ips, 2),
                                 "images_per_s": round(our_ips, 2), "ratio": round(our_ips / base_ips, 2),
                                 "top10_overlap": round(top10, 4), "mean_cosine": round(cos, 5),
                                 "gpu_util_pct": gpu.get("gpu_util_pct"), "baseline_gpu_util_pct": base_gpu,
                                 **{k: v for k, v in gpu.items() if k != "gpu_util_pct"}, **decode}
        total_base += len(paths) / base_ips
        total_ours += len(paths) / our_ips
    total = sum(s["images"] for s in results["sets"].values())
    sets = results["sets"].values()
    results.update({
        "baseline_images_per_s": round(total / total_base, 2),
        "images_per_s": round(total / total_ours, 2),
        "ratio": round(total_base / total_ours, 2),
        "top10_overlap": round(float(np.mean([s["top10_overlap"] for s in sets])), 4),
        "mean_cosine": round(float(np.mean([s["mean_cosine"] for s in sets])), 5),
    })
    timed = [(s["images"] / s["images_per_s"], s["gpu_util_pct"]) for s in sets if s["gpu_util_pct"] is not None]
    if timed:  # weighted by each set's indexing time
        results["gpu_util_pct"] = round(sum(t * u for t, u in timed) / sum(t for t, _ in timed), 1)
    if all("decode_images_per_s" in s for s in sets):
        results["decode_images_per_s"] = round(total / sum(s["images"] / s["decode_images_per_s"] for s in sets), 2)
    if args.levers:
        log("levers (Magento photos, in-process pipeline, CPU):")
        results["levers"] = levers(magento_paths(min(n, args.lever_images)), weights, work)

    def extra(s: dict) -> str:
        gpu, dec = s.get("gpu_util_pct"), s.get("decode_images_per_s")
        return ((f"{gpu:>8.1f}" if gpu is not None else f"{'-':>8}") if "gpu_util_pct" in results else "") + \
               ((f"{dec:>14.1f}" if dec is not None else f"{'-':>14}") if "decode_images_per_s" in results else "")

    print(f"\n{'set':<10}{'images':>8}{'baseline img/s':>16}{'ours img/s':>12}{'ratio':>8}{'top-10 overlap':>16}{'mean cos':>10}"
          + (f"{'GPU %':>8}" if "gpu_util_pct" in results else "")
          + (f"{'decode img/s':>14}" if "decode_images_per_s" in results else ""))
    for name, s in results["sets"].items():
        print(f"{name:<10}{s['images']:>8}{s['baseline_images_per_s']:>16.1f}{s['images_per_s']:>12.1f}"
              f"{s['ratio']:>8.2f}{s['top10_overlap']:>16.3f}{s['mean_cosine']:>10.4f}" + extra(s))
    print(f"{'all':<10}{total:>8}{results['baseline_images_per_s']:>16.1f}{results['images_per_s']:>12.1f}"
          f"{results['ratio']:>8.2f}{results['top10_overlap']:>16.3f}{results['mean_cosine']:>10.4f}" + extra(results))
    if args.json:
        print(json.dumps(results))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
