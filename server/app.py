"""FastAPI query server: find-similar by photo, text search, zero-shot labels, product lookup.

Thin by design: every route parses its input, calls :mod:`indexer` and shapes the
answer. Errors a client can cause come back as ``{"error": {"code", "message"}}``
with a 4xx status; nothing a client sends can produce a 500.

Where things are: :mod:`server.schemas` (request and response models),
:mod:`server.engine` (the loaded index and model), :mod:`server.deps` (dependencies:
the engine, API keys), :mod:`server.routers` (one module per resource),
:mod:`server.errors` (error answers), :mod:`server.limits` (per-request bounds).
"""
from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from indexer.errors import LookalikeError
from indexer.model import ClipModel

from .engine import load_engine
from .errors import EXCEPTION_HANDLERS
from .limits import RequestLimits
from .observability import Metrics, RequestObserver
from .routers import audit, health, labels, products, search
from .routers.health import STATIC_DIR
from .settings import ServerSettings

log = logging.getLogger("lookalike.server")


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
            app.state.engine = load_engine(cfg, metrics, model)
            metrics.ready.set(1)
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
            # stops the background threads, saves the FAISS snapshot of any live writes, closes the store
            app.state.engine.close()
        log.info("stopped")  # SIGINT and SIGTERM end here (uvicorn then re-raises the signal: exit 130 / 143)

    app = FastAPI(
        title="lookalike",
        version="0.1.0",
        description="Visual similarity search for a product catalogue: find similar products by photo or text, "
        "and zero-shot category labels. Scores are cosine similarities of CLIP embeddings.",
        lifespan=lifespan,
        exception_handlers=EXCEPTION_HANDLERS,
    )
    app.state.engine = None
    app.state.load_error = None
    app.state.settings = cfg
    app.state.metrics = metrics
    # the write slots of server.deps.write_slot: one asyncio semaphore per event loop serving the app
    # (a semaphore binds to the loop of its first wait; tests may serve one app from several loops)
    app.state.write_slots = {}
    app.state.photo_read_slots = {}  # server.deps.read_photo's, likewise
    # the key and body-size checks run before any route reads the body; the observer, outermost,
    # also counts and logs the requests they refuse
    app.add_middleware(RequestLimits, settings=cfg)
    app.add_middleware(RequestObserver, metrics=metrics, access_log=cfg.access_log)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    for router in (health.router, search.router, labels.router, products.router):
        app.include_router(router)
    app.include_router(audit.router)
    return app
