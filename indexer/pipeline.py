"""Bulk indexing: catalogue -> decoded photos -> embeddings -> index store.

Decoding, hashing and preprocessing run in DataLoader worker processes while the
main process embeds batches, so the model never waits on JPEG decoding for long.

Change detection: a stored photo whose file has the same size and mtime is taken
as unchanged without being read; otherwise its bytes are hashed (SHA-256) in the
worker and a photo whose hash is unchanged is not decoded or embedded again.

Crash safety: photos are committed to the store every ``commit_every`` photos
(one SQLite transaction each, see :mod:`indexer.store`); a killed run loses at
most the photos embedded since the last commit, and the next run skips
everything committed. The environment variable ``LOOKALIKE_COMMIT_EVERY``
overrides the default of 1024 (the crash tests commit every few photos, so that
a kill lands between commits).
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .catalogue import Catalogue, CatalogueRow, printable, read_source_bytes, tar_member
from .errors import LookalikeError
from .images import DEFAULT_MAX_PIXELS, ImageError, open_image
from .model import ClipModel
from .store import KnownPhoto, PhotoRecord, Product, Store

log = logging.getLogger(__name__)

DEFAULT_MAX_FILE_BYTES = 50 * 1024 * 1024
DEFAULT_COMMIT_EVERY = 1024
COMMIT_EVERY_ENV = "LOOKALIKE_COMMIT_EVERY"


@dataclass
class _Task:
    row: CatalogueRow
    known: KnownPhoto | None
    size: int | None
    mtime_ns: int | None


@dataclass
class _Item:
    """One photo after reading: unchanged (same SHA-256 as stored), decoded (``pixels``), or failed
    (``reason``, ``message``). ``task`` is None where the reader ran without one (a Ray worker)."""

    task: _Task | None = None
    sha256: str | None = None
    pixels: torch.Tensor | None = None
    width: int | None = None
    height: int | None = None
    unchanged: bool = False
    reason: str | None = None
    message: str | None = None

    @property
    def embeddable(self) -> bool:
        """Read, changed and decoded: the photo gets a vector."""
        return not self.unchanged and self.reason is None


class PhotoReader:
    """Reads, hashes, decodes and preprocesses one photo source; never raises. The one reading rule of
    the local DataLoader workers and the Ray workers (:mod:`indexer.pipeline_ray`).

    preprocess: the model's image transform (PIL image -> float tensor ``(3, H, W)``); max_pixels,
    max_file_bytes, draft_size: the limits of :func:`indexer.images.open_image` and
    :func:`indexer.photo_sources.read_source_bytes`. Open tar shards are kept for the next member.
    """

    def __init__(self, preprocess, max_pixels: int, max_file_bytes: int, draft_size: int,
                 allow_private_urls: bool = False):
        self.allow_private_urls = allow_private_urls
        self.preprocess = preprocess
        self.max_pixels = max_pixels
        self.max_file_bytes = max_file_bytes
        self.draft_size = draft_size
        self._tar_cache: dict = {}

    def read(self, source: str, known_sha256: str | None) -> _Item:
        """The photo at ``source``: unchanged when its SHA-256 is ``known_sha256`` (not decoded), else
        decoded and preprocessed, or failed with the reason (:class:`indexer.images.ImageError`)."""
        item = _Item()
        try:
            data = read_source_bytes(source, self.max_file_bytes, self._tar_cache, self.allow_private_urls)
            item.sha256 = hashlib.sha256(data).hexdigest()
            if known_sha256 is not None and known_sha256 == item.sha256:
                item.unchanged = True
                return item
            image = open_image(data, max_pixels=self.max_pixels, draft_size=self.draft_size)
            item.width, item.height = image.info.get("original_size", image.size)
            item.pixels = self.preprocess(image)
        except ImageError as e:
            item.reason, item.message = e.reason, str(e)
        except MemoryError:
            item.reason, item.message = "too_large", "out of memory while decoding"
        except Exception as e:  # a decoder bug must cost one photo, not the run
            item.reason, item.message = "corrupt", f"{type(e).__name__}: {e}"
        return item


class _PhotoDataset(Dataset):
    """Reads, hashes, decodes and preprocesses one photo per item (:class:`PhotoReader`); never raises."""

    def __init__(self, tasks: list[_Task], preprocess, max_pixels: int, max_file_bytes: int, draft_size: int,
                 allow_private_urls: bool = False):
        self.tasks = tasks
        self.reader = PhotoReader(preprocess, max_pixels, max_file_bytes, draft_size, allow_private_urls)

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, i: int) -> _Item:
        task = self.tasks[i]
        item = self.reader.read(task.row.source, task.known.sha256 if task.known is not None else None)
        item.task = task
        return item


class _Batch:
    """The items of one batch, with the decoded photos' pixels stacked (in the worker process, so the
    main process receives one tensor) into ``pixels`` ``(len(ok), 3, H, W)``."""

    def __init__(self, items: list[_Item]):
        self.items = items
        self.ok = [it for it in items if it.pixels is not None]
        self.pixels = torch.stack([it.pixels for it in self.ok]) if self.ok else None
        for it in self.ok:
            it.pixels = None

    def pin_memory(self) -> "_Batch":
        """Called by the DataLoader's pinning thread on CUDA: page-locked memory makes the copy to
        the GPU asynchronous (``non_blocking=True`` in ``ClipModel.embed_image_tensors``)."""
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


@dataclass
class IndexReport:
    """What one indexing run did; saved as ``report.json`` in the index directory.

    engine: ``local`` or ``ray``. workers (Ray only): one entry per worker process that embedded photos,
    ``{"node_id", "host", "pid", "batches", "photos"}`` (photos read, whatever their outcome).
    """

    catalogue: str
    model: dict
    started_at: str
    rows: int = 0
    products: int = 0
    indexed: int = 0
    unchanged: int = 0
    failed: int = 0
    pruned_products: int = 0
    pruned_photos: int = 0
    seconds: float = 0.0
    images_per_s: float = 0.0
    failures: list[dict] = field(default_factory=list)
    row_problems: list[dict] = field(default_factory=list)
    index_products: int = 0
    index_photos: int = 0
    engine: str = "local"
    workers: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def summary(self) -> str:
        lines = [
            f"indexed {self.indexed} photos, {self.unchanged} unchanged, {self.failed} failed, "
            f"{len(self.row_problems)} catalogue rows or files skipped"
            + (f", pruned {self.pruned_products} products / {self.pruned_photos} photos" if self.pruned_products or self.pruned_photos else ""),
            f"index now holds {self.index_products} products, {self.index_photos} photos "
            f"({self.images_per_s:.1f} images/s over {self.seconds:.1f} s)",
        ]
        for f in self.failures[:20]:
            lines.append(f"  failed  {f['image']}: {f['reason']}: {f['message']}")
        if len(self.failures) > 20:
            lines.append(f"  ... and {len(self.failures) - 20} more failures (see report.json)")
        for p in self.row_problems[:20]:
            lines.append(f"  skipped {p['where']}: {p['reason']}: {p['message']}")
        if len(self.row_problems) > 20:
            lines.append(f"  ... and {len(self.row_problems) - 20} more skipped (see report.json)")
        return "\n".join(lines)


    def failure(self, max_failed_fraction: float, relative_root: Path | None = None) -> str | None:
        """Why this run counts as failed, in one line, or None when it does not.

        Failed: no photo is in the index for the catalogue (none indexed, none unchanged) while some failed,
        or more than ``max_failed_fraction`` (0..1) of the catalogue's photos (indexed + unchanged + failed)
        failed. ``relative_root``: the folder a manifest's relative image paths were resolved against by
        default (no ``--image-root``); photos not found under it add a hint to pass ``--image-root``.
        """
        total = self.indexed + self.unchanged + self.failed
        if not self.failed:
            return None
        if self.indexed + self.unchanged == 0:
            why = f"nothing was indexed: all {self.failed} photos failed"
        elif self.failed / total > max_failed_fraction:
            why = (f"{self.failed} of {total} photos failed, more than --max-failed-fraction "
                   f"{max_failed_fraction:g}")
        else:
            return None
        counts: dict[str, int] = {}
        for f in self.failures:
            counts[f["reason"]] = counts.get(f["reason"], 0) + 1
        why += " (" + ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1])) + ")"
        if relative_root is not None:
            unseen = sum(1 for f in self.failures if f["reason"] == "not_found" and "://" not in f["image"]
                         and Path(f["image"]).is_relative_to(relative_root))
            if unseen:
                why += (f"; {unseen} were looked for under {relative_root} (the manifest's folder, where relative "
                        "image paths start): if the paths are relative to another folder, pass --image-root DIR")
        return why + "; see report.json"


def _commit_every_from_env() -> int:
    value = os.environ.get(COMMIT_EVERY_ENV, "").strip()
    if not value:
        return DEFAULT_COMMIT_EVERY
    if not value.isdigit() or int(value) < 1:
        raise LookalikeError(f"{COMMIT_EVERY_ENV}={value!r}: give a whole number of photos, 1 or more (default {DEFAULT_COMMIT_EVERY})")
    return int(value)


def _stat(source: str) -> tuple[int | None, int | None]:
    if "://" in source or tar_member(source):
        return None, None
    try:
        st = os.stat(source)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return None, None


class _Run:
    """What the local and the Ray engine share around the embedding itself: the report, the tasks (photos
    whose size and mtime changed or are unknown; the rest count as unchanged without being read), and the
    commits, every ``commit_every`` photos embedded or found unchanged, one store transaction each.

    The engines feed it batches of read photos with :meth:`add` and close it with :meth:`finish`.
    """

    def __init__(self, catalogue: Catalogue, store: Store, model_identity, catalogue_name: str, commit_every: int | None,
                 engine: str = "local"):
        self.t0 = time.perf_counter()
        self.catalogue, self.store = catalogue, store
        self.commit_every = _commit_every_from_env() if commit_every is None else commit_every
        self.report = IndexReport(
            catalogue=catalogue_name,
            model=model_identity.to_dict(),
            started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            rows=len(catalogue.rows),
            products=len(catalogue.products),
            row_problems=[p.to_dict() for p in catalogue.problems],
            engine=engine,
        )
        known = store.known_photos()
        self.tasks: list[_Task] = []
        seen: set[tuple[str, str]] = set()
        for row in catalogue.rows:
            key = (row.product_id, row.source)
            if key in seen:
                continue
            seen.add(key)
            size, mtime = _stat(row.source)
            k = known.get(key)
            if k is not None and size is not None and k.size == size and k.mtime_ns == mtime:
                self.report.unchanged += 1
                continue
            self.tasks.append(_Task(row, k, size, mtime))
        self.stored_products = {pid for pid, _ in known}
        self.pending: list[PhotoRecord] = []
        self.touched: list[tuple[int, int | None, int | None]] = []

    def add(self, items: list[_Item], vectors) -> None:
        """One batch of read photos (each with its ``task``); ``vectors`` float32 ``(k, dim)``, unit rows,
        of its :attr:`_Item.embeddable` items in order. Commits when ``commit_every`` photos are pending."""
        report = self.report
        for it, vec in zip([it for it in items if it.embeddable], vectors):
            self.pending.append(PhotoRecord(it.task.row.product_id, it.task.row.source, it.sha256, vec,
                                            it.task.size, it.task.mtime_ns, it.width, it.height,
                                            it.task.row.metadata))
            report.indexed += 1
        for it in items:
            if it.unchanged:
                report.unchanged += 1
                self.touched.append((it.task.known.photo_id, it.task.size, it.task.mtime_ns))
            elif it.reason is not None:
                report.failed += 1
                report.failures.append({"id": it.task.row.product_id, "image": it.task.row.source,
                                        "where": it.task.row.where, "reason": it.reason,
                                        "message": printable(it.message)})
        if len(self.pending) + len(self.touched) >= self.commit_every:
            self.flush()

    def flush(self) -> None:
        """Commit the pending photos (new products first) and the unchanged photos' new size and mtime."""
        if not self.pending and not self.touched:
            return
        with self.store.transaction() as tx:
            new_products = {p.product_id for p in self.pending} - self.stored_products
            tx.upsert_products([_product(self.catalogue, pid) for pid in sorted(new_products)])
            tx.add_photos(self.pending)
            for photo_id, size, mtime in self.touched:
                tx.touch_photo(photo_id, size, mtime)
        self.stored_products.update(p.product_id for p in self.pending)
        self.pending, self.touched = [], []

    def finish(self, prune: bool) -> IndexReport:
        """The last commit, the products' metadata, pruning, the snapshot and ``report.json``."""
        self.flush()
        catalogue, store, report = self.catalogue, self.store, self.report
        with store.transaction() as tx:
            tx.upsert_products([_product(catalogue, pid)
                                for pid in sorted(self.stored_products & catalogue.products.keys())])
            if prune:
                gone = set(self.stored_products - catalogue.products.keys())
                wanted = {(r.product_id, r.source) for r in catalogue.rows}
                stale = [k.photo_id for key, k in store.known_photos().items() if key not in wanted]
                report.pruned_products = tx.delete_products(sorted(gone))
                tx.delete_photos(stale)
                report.pruned_photos = len(stale)
        store.save()

        report.seconds = round(time.perf_counter() - self.t0, 3)
        report.images_per_s = round((report.indexed + report.failed) / report.seconds, 2) if report.seconds else 0.0
        report.index_products = store.count_products()
        report.index_photos = store.count_photos()
        store.write_report(report.to_dict())
        return report


def index_catalogue(
    catalogue: Catalogue,
    store: Store,
    model: ClipModel,
    *,
    catalogue_name: str = "",
    batch_size: int | None = None,
    workers: int | None = None,
    prune: bool = False,
    commit_every: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    progress: bool = True,
    allow_private_urls: bool = False,
) -> IndexReport:
    """Embed every new or changed photo of ``catalogue`` into ``store``.

    batch_size: photos per forward pass (default 64 on CPU, 256 on CUDA). workers: decoding
    processes (default: the number of CPU cores, at most 32; 0 decodes in this process).
    prune: delete products, and photos of products, that are no longer in the catalogue.
    commit_every: photos (embedded or found unchanged) per store commit; default
    ``$LOOKALIKE_COMMIT_EVERY`` if set, else 1024. Raises LookalikeError if that
    variable is not a whole number of 1 or more. allow_private_urls: fetch photo URLs whose
    host is a private, loopback or other non-public address (refused by default).
    Returns the run's report, which is also written to ``INDEX_DIR/report.json``.
    """
    run = _Run(catalogue, store, model.identity, catalogue_name, commit_every)
    tasks = run.tasks
    if workers is None:
        workers = min(32, os.cpu_count() or 1)
    if batch_size is None:
        batch_size = 256 if model.device.type == "cuda" else 64
    dataset = _PhotoDataset(tasks, model.preprocess, max_pixels, max_file_bytes, draft_size=model.draft_size,
                            allow_private_urls=allow_private_urls)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers if len(tasks) > batch_size else 0,
        collate_fn=_Batch,
        pin_memory=model.device.type == "cuda",
        prefetch_factor=4 if workers and len(tasks) > batch_size else None,
    )
    bar = progress_bar(len(tasks)) if progress else None
    batches = _calibrating(model, iter(loader)) if model.needs_calibration else loader
    for batch in batches:
        run.add(batch.items, model.embed_image_tensors(batch.pixels) if batch.ok else [])
        if bar is not None:
            bar.update(len(batch.items))
            bar.set_postfix(failed=run.report.failed, refresh=False)
    if bar is not None:
        bar.close()
    return run.finish(prune)


def _calibrating(model: ClipModel, batches):
    """The batches, after an int8 image tower is calibrated on the first
    :data:`~indexer.quantize.CALIBRATION_PHOTOS` decoded photos (the batches that hold them are decoded
    first and kept), so every photo of the run is embedded by the same tower."""
    from .quantize import CALIBRATION_PHOTOS

    held, decoded = [], 0
    for batch in batches:
        held.append(batch)
        decoded += len(batch.ok)
        if decoded >= CALIBRATION_PHOTOS:
            break
    if decoded:
        model.calibrate(torch.cat([b.pixels for b in held if b.ok]))
    yield from held
    yield from batches


def progress_bar(total: int):
    """A tqdm progress bar over ``total`` photos, or None when there are none."""
    if not total:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="indexing", dynamic_ncols=True)


def _product(catalogue: Catalogue, pid: str) -> Product:
    info = catalogue.products[pid]
    return Product(pid, info["title"], info["category"], info["metadata"])


def embed_paths(model: ClipModel, paths: list[str | Path], max_pixels: int = DEFAULT_MAX_PIXELS):
    """Open and embed image files.

    Returns (paths that opened, their vectors float32 ``(n, dim)`` with unit rows, errors {path: message}).
    """
    images, ok, errors = [], [], {}
    for p in paths:
        try:
            images.append(open_image(p, max_pixels=max_pixels, draft_size=model.draft_size))
            ok.append(str(p))
        except ImageError as e:
            errors[str(p)] = f"{e.reason}: {e}"
    vecs = model.embed_images(images) if images else np.zeros((0, model.dim), np.float32)
    return ok, vecs, errors
