"""FastAPI query server: find-similar by photo, text search, zero-shot labels, product lookup.

Thin by design: every route parses its input, calls :mod:`indexer` and shapes the
answer. Errors a client can cause come back as ``{"error": {"code", "message"}}``
with a 4xx status; nothing a client sends can produce a 500.
"""
from __future__ import annotations

import hmac
import io
import json
import logging
import threading
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from indexer.ann import MAX_EF_SEARCH, MAX_NPROBE
from indexer.batching import MicroBatcher
from indexer.catalogue import read_source_bytes
from indexer.errors import LookalikeError, NotFound
from indexer.images import ImageError, image_from_bytes
from indexer.labels import LabelSet, ZeroShotClassifier
from indexer.model import ClipModel, load_model
from indexer.store import IndexLocked, Product, Store, check_model
from indexer.updates import PhotoUpload, decode_upload, delete_product, patch_product, upsert_product

from .limits import RequestLimits, check_labels, one_file, trim_lru
from .observability import Metrics, RequestObserver
from .settings import ServerSettings

log = logging.getLogger("lookalike.server")

REFRESH_INTERVAL_S = 2.0
STATIC_DIR = Path(__file__).resolve().parent / "static"


# ------------------------------------------------------------------ schemas
class ErrorBody(BaseModel):
    code: str = Field(description="short machine-readable reason, e.g. not_an_image, not_found, validation_error")
    message: str = Field(description="what went wrong, in plain words")


class ErrorResponse(BaseModel):
    error: ErrorBody


class LabelScore(BaseModel):
    label: str
    score: float = Field(description="probability: softmax over the label set of logit_scale * cosine; sums to 1")
    cosine: float = Field(description="cosine similarity between the image and the label's prompt-ensemble embedding")


class Result(BaseModel):
    id: str = Field(description="product id")
    score: float = Field(description="cosine similarity of the product's best-matching photo, in [-1, 1]")
    title: str | None = None
    category: str | None = None
    image: str = Field(description="URL of the product photo that matched, on this server "
                       "(`/v1/products/{id}/image?photo_id=N`; add `&size=256` for a thumbnail)")
    photo_id: int = Field(description="id of the matched photo")
    image_metadata: dict = Field(default_factory=dict, description="catalogue columns of the matched photo's row")
    metadata: dict = Field(default_factory=dict, description="the product's other catalogue columns")
    label: str | None = Field(None, description="stored zero-shot label (after 'lookalike label INDEX')")
    label_score: float | None = None


CLOSE_MATCH_DOC = ("whether the best result reaches the model's calibrated threshold for a close match "
                   "(its calibration's `min_score` for photo queries, `label_min_cosine` for text queries; README, "
                   "\"Scores and thresholds\"); false means the catalogue holds nothing close to the query, "
                   "null that the model has no calibration")
NONE_OF_THESE_DOC = ("true when even the best label's cosine is under the model's calibrated `label_min_cosine`: "
                     "none of the labels fits the photo; null when the model has no calibration")


class SearchResponse(BaseModel):
    results: list[Result]
    close_match: bool | None = Field(None, description=CLOSE_MATCH_DOC)
    labels: list[LabelScore] = Field(default_factory=list, description="zero-shot labels of the query photo")
    none_of_these: bool | None = Field(None, description=NONE_OF_THESE_DOC)
    took_ms: float


EF_SEARCH_DOC = ("HNSW index only: candidates explored per query; more gives better recall, slower "
                 "(default: the index's, see `lookalike info`)")
NPROBE_DOC = ("IVF-PQ index only: inverted lists visited per query; more gives better recall, slower "
              "(default: the index's, see `lookalike info`)")
EfSearch = Annotated[int | None, Query(ge=1, le=MAX_EF_SEARCH, description=EF_SEARCH_DOC)]
NProbe = Annotated[int | None, Query(ge=1, le=MAX_NPROBE, description=NPROBE_DOC)]


class TextQuery(BaseModel):
    query: str = Field(min_length=1, max_length=1000, description="words to search for, e.g. 'red running shoes'")
    k: int = Field(10, ge=1, le=1000, description="number of products")
    category: str | None = Field(None, max_length=500, description="only this category or below it")
    min_score: float | None = Field(None, ge=-1, le=1)
    ef_search: int | None = Field(None, ge=1, le=MAX_EF_SEARCH, description=EF_SEARCH_DOC)
    nprobe: int | None = Field(None, ge=1, le=MAX_NPROBE, description=NPROBE_DOC)


class LabelsResponse(BaseModel):
    labels: list[LabelScore]
    none_of_these: bool | None = Field(None, description=NONE_OF_THESE_DOC)
    took_ms: float


class ProductImage(BaseModel):
    photo_id: int
    image: str = Field(description="URL of the photo on this server (`/v1/products/{id}/image?photo_id=N`)")
    sha256: str
    width: int | None = None
    height: int | None = None
    metadata: dict = Field(default_factory=dict)


class ProductResponse(BaseModel):
    id: str
    title: str | None = None
    category: str | None = None
    metadata: dict
    label: str | None = None
    label_score: float | None = None
    updated_at: str
    images: list[ProductImage]


class Health(BaseModel):
    status: str
    products: int
    photos: int
    model: str


class ProductPatch(BaseModel):
    title: str | None = Field(None, max_length=2000)
    category: str | None = Field(None, max_length=2000)
    metadata: dict | None = Field(None, description="keys to set; a key set to null is removed")


class CategoryCount(BaseModel):
    category: str
    products: int


# ------------------------------------------------------------------- state
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
        self._classifiers: OrderedDict[tuple[str, ...], ZeroShotClassifier] = OrderedDict()
        self._thumbnails: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.write_block: LookalikeError | None = None
        if settings.read_only:
            self.write_block = LookalikeError("this server is read-only (read_only = true)", code="read_only", http_status=403)
        elif not settings.keys():
            self.write_block = LookalikeError("writes are disabled on this server: configure api_keys (LOOKALIKE_API_KEYS)",
                                              code="writes_disabled", http_status=403)
        elif not store.writable:
            self.write_block = LookalikeError("the index is being written by another process (lookalike index?); "
                                              "retry when it is done", code="index_locked", http_status=409)
        self.batcher = None
        if settings.batch_window_ms > 0 and settings.max_batch > 1:
            self.batcher = MicroBatcher(model.embed_image_tensors, settings.max_batch, settings.batch_window_ms,
                                        on_batch=metrics.batch_size.labels("image").observe)
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

    def classifier(self, names: list[str] | None) -> ZeroShotClassifier:
        if not names:
            return self.default_labels
        key = tuple(names)
        with self._lock:
            clf = self._classifiers.get(key)
            if clf is not None:
                self._classifiers.move_to_end(key)
                return clf
        clf = ZeroShotClassifier(self.model, LabelSet.from_names(list(names)))
        with self._lock:
            self._classifiers[key] = clf
            while len(self._classifiers) > 64:
                self._classifiers.popitem(last=False)
        return clf

    def embed_upload(self, data: bytes):
        """Decode an uploaded photo and embed it: float32 ``(1, dim)``. Raises a 400/413 LookalikeError.

        With micro-batching on (``batch_window_ms`` > 0), concurrent uploads share a forward pass.
        """
        t0 = time.perf_counter()

        def prepare():
            image = decode_upload(data, self.model, self.max_pixels, "cannot use the uploaded image")
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
        ``"image"`` (image-image cosine, ``min_score``) or ``"text"`` (text-image, ``label_min_cosine``);
        None when the model has no calibration."""
        threshold = self.model.calibration.get("min_score" if query == "image" else "label_min_cosine")
        if threshold is None:
            return None
        return bool(hits) and hits[0].score >= threshold

    def thumbnail(self, photo: dict, size: int | None) -> bytes:
        """The photo as JPEG, its longest side at most ``size`` px; kept in an LRU cache by content hash."""
        key = (photo["sha256"], size)
        with self._lock:
            data = self._thumbnails.get(key)
            if data is not None:
                self._thumbnails.move_to_end(key)
                return data
        raw = read_source_bytes(self.store.resolve_source(photo["image"]), 64 * 1024 * 1024)
        im = image_from_bytes(raw, max_pixels=self.max_pixels, draft_size=size)
        if size:
            im.thumbnail((size, size), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=85)
        data = buf.getvalue()
        if self.settings.thumbnail_cache_items and len(data) <= self.settings.thumbnail_cache_bytes:
            with self._lock:
                self._thumbnails[key] = data
                trim_lru(self._thumbnails, self.settings.thumbnail_cache_items, self.settings.thumbnail_cache_bytes)
        return data


class NotReady(LookalikeError):
    code = "not_ready"
    http_status = 503


def _engine(request: Request) -> Engine:
    engine = request.app.state.engine
    if engine is None:
        error = request.app.state.load_error
        raise NotReady(f"the server failed to load: {error}" if error else "the model and index are still loading")
    return engine


EngineDep = Annotated[Engine, Depends(_engine)]


def _check_key(request: Request) -> None:
    """Bearer API key check, compared in constant time (hmac.compare_digest) against every configured key."""
    keys = request.app.state.settings.keys()
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise LookalikeError("this route needs an API key: send 'Authorization: Bearer KEY'", code="unauthorized",
                             http_status=401)
    token_b = token.strip().encode()
    valid = False
    for key in keys:
        valid |= hmac.compare_digest(token_b, key.encode())
    if not valid:
        raise LookalikeError("the API key is not valid", code="forbidden", http_status=403)


def require_read(request: Request) -> None:
    if request.app.state.settings.auth_reads:
        _check_key(request)


def require_write(request: Request) -> None:
    if not request.app.state.settings.keys():
        raise LookalikeError("writes are disabled on this server: configure api_keys (LOOKALIKE_API_KEYS)",
                             code="writes_disabled", http_status=403)
    _check_key(request)


def _writable(engine: Engine) -> Engine:
    if engine.write_block is not None:
        raise engine.write_block
    return engine


async def _read_upload(upload: UploadFile, limit: int) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise LookalikeError(f"upload is over the {limit}-byte limit", code="too_large", http_status=413)
    return data


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


ERRORS = {
    400: {"model": ErrorResponse, "description": "bad input (not an image, empty upload, bad label list)"},
    404: {"model": ErrorResponse, "description": "unknown product"},
    413: {"model": ErrorResponse, "description": "upload or image too large"},
    422: {"model": ErrorResponse, "description": "invalid parameters"},
    503: {"model": ErrorResponse, "description": "the model and index are still loading"},
}


# --------------------------------------------------------------------- app
def create_app(
    index_dir: str | Path | None = None,
    *,
    settings: ServerSettings | None = None,
    model: ClipModel | None = None,
    background_load: bool = False,
    **overrides,
) -> FastAPI:
    """Build the app for one index directory.

    settings: a :class:`ServerSettings` (default: read from the environment / config file);
    ``overrides`` set single fields of it (``max_upload_bytes=...``, ``model=...``) and
    ``index_dir`` sets ``index``. ``model`` passes an already loaded ClipModel.

    The model is the one the index records (or ``settings.model``/``pretrained`` with the same
    weights). With ``background_load`` the server answers at once: ``/healthz`` is 200,
    ``/readyz`` and the query routes are 503 until loading finishes; a failure to load is
    logged and reported by ``/readyz``. Otherwise loading happens before the first request.
    """
    base = settings or ServerSettings()
    if "model_name" in overrides:
        overrides["model"] = overrides.pop("model_name")
    unknown = set(overrides) - set(ServerSettings.model_fields)
    if unknown:
        raise TypeError(f"create_app got unknown settings: {', '.join(sorted(unknown))}")
    updates = {k: v for k, v in overrides.items() if v is not None}
    if index_dir is not None:
        updates["index"] = Path(index_dir)
    cfg = base.model_copy(update=updates)
    if cfg.index is None:
        raise LookalikeError("no index to serve: give INDEX_DIR or set LOOKALIKE_INDEX")
    metrics = Metrics()

    def load(app: FastAPI) -> None:
        try:
            try:
                # Only a server that accepts writes takes the index's write lock.
                store = Store.open(cfg.index, writable=bool(cfg.keys()) and not cfg.read_only)
            except IndexLocked:
                store = Store.open(cfg.index)  # an indexer holds the write lock: serve, refuse writes until it is done
            ident = store.identity
            m = model
            if m is None:
                m = load_model(cfg.model or ident.name,
                               cfg.pretrained or (ident.pretrained if cfg.model is None else None), cfg.device,
                               cfg.precision, cfg.backend)
            check_model(store, m.identity)
            app.state.engine = Engine(store, m, LabelSet.load(cfg.labels_file), cfg, metrics)
            metrics.model.info({k: str(v) for k, v in m.identity.to_dict().items()})
            metrics.ready.set(1)
            log.info("ready", extra={"index": str(cfg.index), "products": store.count_products(),
                                     "model": m.identity.name})
        except Exception as e:  # reported by /readyz and the log; the process keeps serving /healthz
            app.state.load_error = str(e)
            log.error("failed to load the model or index: %s", e)
            if not background_load:
                raise

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.engine = None
        app.state.load_error = None
        if background_load:
            threading.Thread(target=load, args=(app,), name="lookalike-load", daemon=True).start()
        else:
            load(app)
        yield
        if app.state.engine is not None:
            app.state.engine.close()

    read_auth = [Depends(require_read)]
    write_auth = [Depends(require_write)]
    app = FastAPI(
        title="lookalike",
        version="0.1.0",
        description="Visual similarity search for a product catalogue: find similar products by photo or text, "
        "and zero-shot category labels. Scores are cosine similarities of CLIP embeddings.",
        lifespan=lifespan,
    )
    app.state.engine = None
    app.state.load_error = None
    app.state.settings = cfg
    app.state.metrics = metrics
    # the key and body-size checks run before any route reads the body; the observer, outermost,
    # also counts and logs the requests they refuse
    app.add_middleware(RequestLimits, settings=cfg, require_read=require_read, require_write=require_write)
    app.add_middleware(RequestObserver, metrics=metrics, access_log=cfg.access_log)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.exception_handler(LookalikeError)
    async def _lookalike_error(request: Request, exc: LookalikeError):
        response = _error(exc.http_status, exc.code, str(exc))
        if exc.http_status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path"))
            parts.append(f"{loc or 'request'}: {err.get('msg')}")
        return _error(422, "validation_error", "; ".join(parts) or "invalid request")

    @app.exception_handler(MemoryError)
    async def _out_of_memory(request: Request, exc: MemoryError):
        # a request the process cannot afford (a decode past every check, say) is the client's
        # oversized input, not a server fault: the same 413 the size checks give
        log.warning("out of memory on %s", request.url.path)
        return _error(413, "too_large", "the request needs more memory than this server allows; send a smaller image")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return _error(500, "internal_error", "internal error; the server log has details")

    @app.get("/", include_in_schema=False)
    def index_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/healthz", tags=["operations"], summary="The process is alive")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", response_model=Health, responses={503: {"model": ErrorResponse}}, tags=["operations"],
             summary="Model and index loaded (503 until then)")
    def readyz(engine: EngineDep) -> Health:
        return Health(status="ready", products=engine.store.count_products(), photos=engine.store.count_photos(),
                      model=engine.model.identity.name)

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics",
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    def metrics_route() -> Response:
        engine = app.state.engine
        if engine is not None:
            engine.update_gauges()
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/categories", dependencies=read_auth, response_model=list[CategoryCount], responses=ERRORS, tags=["products"],
             summary="Every product category with its number of products")
    def categories(engine: EngineDep) -> list[CategoryCount]:
        return [CategoryCount(category=c, products=n) for c, n in engine.store.categories()]

    @app.post("/v1/search/image", dependencies=read_auth, response_model=SearchResponse, responses=ERRORS, tags=["search"],
              summary="Find products that look like an uploaded photo")
    async def search_image(
        request: Request,
        engine: EngineDep,
        image: Annotated[UploadFile, File(description="the query photo (JPEG, PNG, WebP, ...)")],
        k: Annotated[int, Query(ge=1, le=1000, description="number of products")] = 10,
        category: Annotated[str | None, Query(max_length=500, description="only this category or below it")] = None,
        min_score: Annotated[float | None, Query(ge=-1, le=1, description="drop results under this cosine")] = None,
        labels: Annotated[bool, Query(description="also return zero-shot labels of the photo")] = True,
        ef_search: EfSearch = None,
        nprobe: NProbe = None,
    ) -> SearchResponse:
        await one_file(request, "image")
        data = await _read_upload(image, engine.max_upload_bytes)
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(_search_image_sync, engine, data, k, category, min_score, labels, ef_search, nprobe)

    def _search_image_sync(engine: Engine, data: bytes, k, category, min_score, labels, ef_search, nprobe) -> SearchResponse:
        t0 = time.perf_counter()
        vec = engine.embed_upload(data)
        hits = engine.search(vec, k, category, min_score, ef_search, nprobe)
        labs = engine.default_labels.top_k(vec, 5)[0] if labels else []
        rejected = engine.default_labels.none_of_these(vec)[0] if labels else None
        return SearchResponse(results=_public_hits(hits), close_match=engine.close_match(hits, "image"),
                              labels=labs, none_of_these=rejected, took_ms=_ms(t0))

    @app.post("/v1/search/text", dependencies=read_auth, response_model=SearchResponse, responses=ERRORS, tags=["search"],
              summary="Find products that match a text, e.g. 'red running shoes'")
    def search_text(engine: EngineDep, body: TextQuery) -> SearchResponse:
        t0 = time.perf_counter()
        vec = engine.embed_text(body.query)
        hits = engine.search(vec, body.k, body.category, body.min_score, body.ef_search, body.nprobe)
        return SearchResponse(results=_public_hits(hits), close_match=engine.close_match(hits, "text"),
                              took_ms=_ms(t0))

    @app.post("/v1/labels", dependencies=read_auth, response_model=LabelsResponse, responses=ERRORS, tags=["labels"],
              summary="Zero-shot labels for a photo")
    async def labels_route(
        request: Request,
        engine: EngineDep,
        image: Annotated[UploadFile, File(description="the photo to label")],
        labels: Annotated[list[str] | None, Form(description="labels to choose from instead of the default set; "
                                                 "repeat the field or give one comma-separated value")] = None,
        k: Annotated[int, Query(ge=1, le=1000, description="number of labels returned")] = 5,
    ) -> LabelsResponse:
        await one_file(request, "image")
        names = [n.strip() for value in labels or [] for n in value.split(",") if n.strip()]
        check_labels(names, request.app.state.settings)
        data = await _read_upload(image, engine.max_upload_bytes)
        from starlette.concurrency import run_in_threadpool

        def run() -> LabelsResponse:
            t0 = time.perf_counter()
            clf = engine.classifier(names)
            vec = engine.embed_upload(data)
            return LabelsResponse(labels=clf.top_k(vec, k)[0], none_of_these=clf.none_of_these(vec)[0], took_ms=_ms(t0))

        return await run_in_threadpool(run)

    @app.get("/v1/products/{product_id:path}/similar", dependencies=read_auth, response_model=SearchResponse, responses=ERRORS,
             tags=["products"], summary="Products that look like a catalogue product")
    def similar(
        engine: EngineDep,
        product_id: str,
        k: Annotated[int, Query(ge=1, le=1000)] = 10,
        category: Annotated[str | None, Query(max_length=500)] = None,
        ef_search: EfSearch = None,
        nprobe: NProbe = None,
    ) -> SearchResponse:
        t0 = time.perf_counter()
        hits = engine.store.similar(product_id, k, category=category, ef_search=ef_search, nprobe=nprobe)
        return SearchResponse(results=_public_hits(hits), close_match=engine.close_match(hits, "image"),
                              took_ms=_ms(t0))

    @app.get("/v1/products/{product_id:path}/image", dependencies=read_auth, responses={**ERRORS, 200: {"content": {"image/jpeg": {}}}},
             tags=["products"], summary="A product photo (only photos of catalogue products are served)")
    def product_image(
        request: Request,
        engine: EngineDep,
        product_id: str,
        photo_id: Annotated[int | None, Query(description="which photo (default: the product's first)")] = None,
        size: Annotated[int | None, Query(ge=16, le=2048, description="longest side of a thumbnail, in pixels")] = None,
    ):
        product = engine.store.get_product(product_id)
        photos = product["images"]
        if photo_id is not None:
            photos = [p for p in photos if p["photo_id"] == photo_id]
        if not photos:
            raise NotFound(f"product {product_id!r} has no photo {photo_id}")
        photo = photos[0]
        if photo["image"].lower().startswith(("http://", "https://")):
            return RedirectResponse(photo["image"])
        etag = f'"{photo["sha256"][:32]}-{size or 0}"'
        headers = {"Cache-Control": "public, max-age=86400", "ETag": etag}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        try:
            data = engine.thumbnail(photo, size)
        except ImageError as e:
            raise NotFound(f"photo of {product_id!r} is no longer readable: {e}") from None
        return Response(data, media_type="image/jpeg", headers=headers)

    @app.get("/v1/products/{product_id:path}", dependencies=read_auth, response_model=ProductResponse, responses=ERRORS, tags=["products"],
             summary="A product with its photos and metadata")
    def product(engine: EngineDep, product_id: str) -> ProductResponse:
        return _public_product(engine.store.get_product(product_id))

    @app.post("/v1/products", response_model=ProductResponse, status_code=201, dependencies=write_auth,
              responses={**ERRORS, 200: {"model": ProductResponse, "description": "an existing product was replaced"},
                         401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}, 409: {"model": ErrorResponse}},
              tags=["catalogue updates"], summary="Add or replace a product (upsert by id) with its photos")
    async def add_product(
        engine: EngineDep,
        metadata: Annotated[str, Form(description='JSON object: {"id": ..., "title"?, "category"?, any other keys}')],
        images: Annotated[list[UploadFile] | None, File(description="the product's photos; they replace its current "
                                                        "photos (none: only the metadata changes)")] = None,
    ):
        engine = _writable(engine)
        try:
            meta = json.loads(metadata)
        except ValueError as e:
            raise LookalikeError(f"metadata is not valid JSON: {e}", code="bad_product", http_status=422) from None
        if not isinstance(meta, dict):
            raise LookalikeError("metadata must be a JSON object", code="bad_product", http_status=422)
        uploads = [PhotoUpload(await _read_upload(f, engine.max_upload_bytes), None, f.filename or "")
                   for f in images or []]
        pid = meta.pop("id", None)
        title, category = meta.pop("title", None), meta.pop("category", None)
        for name, value in (("title", title), ("category", category)):
            if value is not None and not isinstance(value, str):
                raise LookalikeError(f"{name} must be a string", code="bad_product", http_status=422)
        from starlette.concurrency import run_in_threadpool

        product, created = await run_in_threadpool(
            upsert_product, engine.store, engine.model, Product(pid, title, category, meta), uploads, engine.max_pixels)
        engine.update_gauges()
        return JSONResponse(ProductResponse(**_public_product(product)).model_dump(), status_code=201 if created else 200)

    @app.patch("/v1/products/{product_id:path}", response_model=ProductResponse, dependencies=write_auth,
               responses={**ERRORS, 401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}},
               tags=["catalogue updates"], summary="Change a product's title, category or metadata")
    def change_product(engine: EngineDep, product_id: str, body: ProductPatch) -> ProductResponse:
        engine = _writable(engine)
        return _public_product(patch_product(engine.store, product_id, body.title, body.category, body.metadata))

    @app.delete("/v1/products/{product_id:path}", status_code=204, dependencies=write_auth,
                responses={**ERRORS, 401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}},
                tags=["catalogue updates"], summary="Delete a product and its photos")
    def remove_product(engine: EngineDep, product_id: str) -> Response:
        engine = _writable(engine)
        delete_product(engine.store, product_id)
        engine.update_gauges()
        return Response(status_code=204)

    return app


def _photo_url(product_id: str, photo_id: int) -> str:
    return f"/v1/products/{quote(product_id, safe='')}/image?photo_id={photo_id}"


def _public_hits(hits) -> list[dict]:
    """Search hits as the API returns them: the photo as a URL of this server, never a server path."""
    return [{**h.to_dict(), "image": _photo_url(h.product_id, h.photo_id)} for h in hits]


def _public_product(product: dict) -> dict:
    return {**product, "images": [{**p, "image": _photo_url(product["id"], p["photo_id"])} for p in product["images"]]}


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 2)
