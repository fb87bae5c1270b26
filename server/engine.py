"""What the routes share: the :class:`Engine` (store, model, zero-shot classifiers, thumbnails,
micro-batcher, and the background threads that follow or snapshot the index) and
:func:`load_engine`, which builds it from the settings."""
from __future__ import annotations

import io
import logging
import os
import threading
import time

import torch
from PIL import Image

from indexer.batching import MicroBatcher
from indexer.cache import LRUCache
from indexer.catalogue import read_source_bytes
from indexer.compose import Box, crop_box
from indexer.errors import LookalikeError
from indexer.images import image_from_bytes
from indexer.labels import LabelSet, ZeroShotClassifier
from indexer.model import ClipModel
from indexer.store import IndexLocked, Store, check_model
from indexer.updates import decode_upload

from .observability import Metrics
from .settings import ServerSettings

log = logging.getLogger("lookalike.server")

REFRESH_INTERVAL_S = 2.0
CLASSIFIER_CACHE_ITEMS = 64  # per-request label sets kept with their prompt embeddings
# how often, at most, the catalogue is sampled again for closed-set labels' reference photos
# (indexer.labels.ZeroShotClassifier.set_reference) once it has changed (its generation moved)
LABEL_REFERENCE_REFRESH_S = 10.0


class Engine:
    """What the routes share: the store, the model, zero-shot classifiers and metrics."""

    def __init__(self, store: Store, model: ClipModel, label_set: LabelSet, settings: ServerSettings,
                 metrics: Metrics):
        self.store = store
        self.model = model
        self.settings = settings
        self.metrics = metrics
        self.default_labels = ZeroShotClassifier(model, label_set)
        self.max_upload_bytes = settings.max_upload_bytes
        self.max_pixels = settings.max_pixels
        self._classifiers: LRUCache[tuple, ZeroShotClassifier] = LRUCache(CLASSIFIER_CACHE_ITEMS)
        # closed-set labels: sampled catalogue photos, when they were sampled, and a version for cache keys
        self._label_reference = None
        self._label_reference_at: float | None = None
        self._label_reference_generation: int | None = None
        self._label_reference_version = 0
        self._label_reference_lock = threading.Lock()
        self._thumbnails: LRUCache[tuple[str, int | None], bytes] = LRUCache(
            settings.thumbnail_cache_items, max_size=settings.thumbnail_cache_bytes, size=len)
        self.write_block: LookalikeError | None = None
        if settings.read_only:
            self.write_block = LookalikeError("this server is read-only (read_only = true)", code="read_only",
                                              http_status=403)
        elif not settings.keys():
            self.write_block = LookalikeError(
                "writes are disabled on this server: configure api_keys (LOOKALIKE_API_KEYS)",
                code="writes_disabled", http_status=403)
        elif not store.writable and not os.access(store.path, os.W_OK):
            self.write_block = LookalikeError(f"the index folder cannot be written ({store.path} is read-only)",
                                              code="index_not_writable", http_status=403)
        elif not store.writable:
            self.write_block = LookalikeError("the index is being written by another process (lookalike index?); "
                                              "retry when it is done", code="index_locked", http_status=409)
        self.batcher = None
        if settings.batch_window_ms > 0 and settings.max_batch > 1:
            self.batcher = MicroBatcher(model.embed_image_tensors, settings.max_batch, settings.batch_window_ms,
                                        on_batch=metrics.batch_size.labels("image").observe,
                                        workers=getattr(model.image_encoder, "parallel_passes", 1),
                                        on_rescue=metrics.batcher_rescues.inc)
        self._stop = threading.Event()
        self._saver = None
        self._follower = None
        if store.writable:
            self._start_saver()
        else:
            self._follower = threading.Thread(target=self._follow_loop, name="lookalike-follow", daemon=True)
            self._follower.start()
        self.update_gauges()

    def _start_saver(self) -> None:
        self._saver = threading.Thread(target=self._save_loop, name="lookalike-snapshot", daemon=True)
        self._saver.start()

    def _follow_loop(self) -> None:
        """A read-only store, in the background: every REFRESH_INTERVAL_S, pick up commits made by
        another process (``lookalike index``) without ever making a request wait for it, and, on a
        server that accepts writes, take the write lock as soon as that process lets it go (the
        409 ``index_locked`` says "retry": this is what makes the retry work)."""
        wants_writes = self.write_block is not None and self.write_block.code == "index_locked"
        while not self._stop.wait(REFRESH_INTERVAL_S):
            try:
                if wants_writes and self.store.try_become_writable():
                    self.write_block = None
                    log.info("the index's write lock is free: writes are accepted now")
                    self.update_gauges()
                    self._start_saver()
                    return
                if self.store.refresh():
                    self.update_gauges()
            except Exception:  # the next round tries again
                log.exception("following the index's changes failed")

    def _save_loop(self) -> None:
        """Write the FAISS snapshot after live writes, at most every snapshot_interval_s. SQLite already
        holds every acknowledged write durably; the snapshot only saves a rebuild at the next start."""
        while not self._stop.wait(self.settings.snapshot_interval_s):
            self.save_snapshot()

    def save_snapshot(self) -> None:
        try:
            if self.store.generation() != self.store.saved_generation():
                self.store.save()
        except Exception:  # the next round or the next start repairs it
            log.exception("saving the FAISS snapshot failed")

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        self._stop.set()
        if self._follower is not None:
            self._follower.join(timeout=10)
        if self._saver is not None:
            self._saver.join(timeout=10)
            self.save_snapshot()
        self.store.close()

    def update_gauges(self) -> None:
        self.metrics.products.set(self.store.count_products())
        self.metrics.photos.set(self.store.count_photos())

    def label_reference(self):
        """(version, float32 ``(m, dim)``): a sample of the catalogue's photos
        (:meth:`indexer.store.Store.reference_vectors`), the reference of closed-set labels. Sampled
        again when the catalogue has changed (its generation moved, by this server's writes or
        another process's), at most every ``LABEL_REFERENCE_REFRESH_S``: a sample costs about 0.25 s
        on 500,000 photos."""
        with self._label_reference_lock:
            now = time.monotonic()
            if self._label_reference_at is None or now - self._label_reference_at >= LABEL_REFERENCE_REFRESH_S:
                generation = self.store.generation()  # read before sampling: a write meanwhile re-samples
            else:
                generation = self._label_reference_generation
            if self._label_reference_at is None or generation != self._label_reference_generation:
                self._label_reference_generation = generation
                self._label_reference = self.store.reference_vectors()
                self._label_reference_at = now
                self._label_reference_version += 1
            return self._label_reference_version, self._label_reference

    def classifier(self, names: list[str] | None, closed_set: bool = False) -> ZeroShotClassifier:
        """The classifier of the default label set (``names`` empty) or of ``names``; with ``closed_set``,
        labels are ranked against the catalogue's photos (:meth:`ZeroShotClassifier.set_reference`)."""
        if not names and not closed_set:
            return self.default_labels
        key: tuple = tuple(names or ())
        if closed_set:
            version, reference = self.label_reference()
            key = ("closed-set", version, *key)
        clf = self._classifiers.get(key)
        if clf is None:
            label_set = LabelSet.from_names(list(names)) if names else self.default_labels.label_set
            clf = ZeroShotClassifier(self.model, label_set)
            if closed_set:
                clf.set_reference(reference)
            self._classifiers.put(key, clf)
        return clf

    def embed_upload(self, data: bytes, box: Box | None = None):
        """Decode an uploaded photo and embed it (only ``box`` of it, when given: region search):
        float32 ``(1, dim)``. Raises a 400/413 LookalikeError, a 422 QueryError for a box that does not
        fit the photo. The decode limits apply to the whole photo, before the box is cut out.

        With micro-batching on (``batch_window_ms`` > 0), concurrent uploads share a forward pass.
        """
        t0 = time.perf_counter()

        def prepare():
            image = decode_upload(data, self.model, self.max_pixels, "cannot use the uploaded image")
            if box is not None:
                image = crop_box(image, box)
            return self.model.preprocess(image)

        if self.batcher is not None:
            vec = self.batcher.embed(prepare)[None, :]
        else:
            vec = self.model.embed_image_tensors(prepare()[None])
            self.metrics.batch_size.labels("image").observe(1)
        self.metrics.embed_seconds.labels("image").observe(time.perf_counter() - t0)
        return vec

    def embed_text(self, text: str):
        t0 = time.perf_counter()
        vec = self.model.embed_texts([text])
        self.metrics.embed_seconds.labels("text").observe(time.perf_counter() - t0)
        self.metrics.batch_size.labels("text").observe(1)
        return vec

    def search(self, vec, k: int, category: str | None, min_score: float | None,
               ef_search: int | None = None, nprobe: int | None = None):
        t0 = time.perf_counter()
        hits = self.store.search(vec, k, category=category, min_score=min_score, ef_search=ef_search, nprobe=nprobe)[0]
        self.metrics.search_seconds.observe(time.perf_counter() - t0)
        return hits

    def close_match(self, hits, query: str) -> bool | None:
        """Whether the best hit reaches the model's calibrated threshold for a ``query`` of kind
        ``"image"`` (image-image cosine, ``min_score``) or ``"text"`` (text-image, ``text_min_score``);
        None when the model has no such calibration."""
        threshold = self.model.calibration.get("min_score" if query == "image" else "text_min_score")
        if threshold is None:
            return None
        return bool(hits) and hits[0].score >= threshold

    def cached_thumbnail(self, photo: dict, size: int | None) -> bytes | None:
        """:meth:`thumbnail` from the LRU cache, or None when it is not there (reads nothing)."""
        return self._thumbnails.get((photo["sha256"], size))

    def thumbnail(self, photo: dict, size: int | None) -> bytes:
        """The photo as JPEG, its longest side at most ``size`` px; kept in an LRU cache by content hash.
        Reads the photo's file when it is not cached: the server runs this through
        :func:`server.deps.read_photo`, which bounds how many such reads run at once and how long each
        request waits for one."""
        key = (photo["sha256"], size)
        data = self._thumbnails.get(key)
        if data is not None:
            return data
        raw = read_source_bytes(self.store.resolve_source(photo["image"]), 64 * 1024 * 1024)
        im = image_from_bytes(raw, max_pixels=self.max_pixels, draft_size=size)
        if size:
            im.thumbnail((size, size), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=85)
        data = buf.getvalue()
        self._thumbnails.put(key, data)
        return data


def calibrate_from_index(model: ClipModel, store: Store, max_pixels: int) -> str:
    """Calibrate an int8 image tower (:mod:`indexer.quantize`) on photos of the index being served,
    before the first query, so all answers come from one tower. The photos are read as indexing reads
    them (:class:`indexer.pipeline.PhotoReader`, its file-size limit, ``max_pixels``); those that cannot
    be read are skipped, and photo URLs are (no downloads while the server starts). With too few (an
    empty index, photos moved, a catalogue of URLs) the tower stays fp32. Returns the precision in use."""
    from indexer.photo_sources import is_url
    from indexer.pipeline import DEFAULT_MAX_FILE_BYTES, PhotoReader
    from indexer.quantize import CALIBRATION_PHOTOS

    reader = PhotoReader(model.preprocess, max_pixels, DEFAULT_MAX_FILE_BYTES, model.draft_size)
    pixels = []
    for source in store.first_sources(4 * CALIBRATION_PHOTOS):
        if is_url(source):
            continue
        item = reader.read(store.resolve_source(source), None)
        if item.pixels is None:
            log.debug("calibration skips %s: %s", source, item.message)
            continue
        pixels.append(item.pixels)
        if len(pixels) >= CALIBRATION_PHOTOS:
            break
    return model.calibrate(torch.stack(pixels)) if pixels else model.precision


class NotReady(LookalikeError):
    code = "not_ready"
    http_status = 503


def default_label_set(cfg: ServerSettings, store: Store) -> LabelSet:
    """The labels the server gives photos: ``cfg.labels_file`` (``serve --labels``) if set, else the set
    the index was last labelled with (``lookalike label INDEX --labels FILE`` records it), else the
    bundled retail set."""
    if cfg.labels_file is not None:
        return LabelSet.load(cfg.labels_file)
    recorded = store.label_set()
    if recorded is not None:
        return LabelSet.from_dict(recorded, cache_on_disk=True)
    return LabelSet.load(None)


def load_engine(cfg: ServerSettings, metrics: Metrics, model: ClipModel | None = None) -> Engine:
    """Open the index at ``cfg.index`` and load its model (``cfg.model_spec()``, or ``model``, already
    loaded), checked against the index; sets the ``model`` metric (the caller sets ``ready`` once it serves the
    engine). Raises LookalikeError (unknown index, wrong model for the index, missing weights)."""
    try:
        # Only a server that accepts writes takes the index's write lock.
        store = Store.open(cfg.index, writable=bool(cfg.keys()) and not cfg.read_only)
    except IndexLocked:
        store = Store.open(cfg.index)  # an indexer holds the write lock: serve, refuse writes until it is done
    try:
        if model is None:
            model = cfg.model_spec().load_for(store)  # the CLI's rule for which model serves an index
        else:
            check_model(store, model.identity)
        if model.needs_calibration:
            calibrate_from_index(model, store, cfg.max_pixels)
        model.set_streams(cfg.inference_streams)  # after calibration: the streams run the precision it chose
        engine = Engine(store, model, default_label_set(cfg, store), cfg, metrics)
    except BaseException:
        store.close()  # and its write lock: a server that failed to load must not block 'lookalike index'
        raise
    metrics.model.info({k: str(v) for k, v in model.identity.to_dict().items()})
    log.info("ready", extra={"index": str(cfg.index), "products": store.count_products(), "model": model.identity.name})
    return engine
