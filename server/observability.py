"""Prometheus metrics and structured (JSON) request logs for the query server."""
from __future__ import annotations

import json
import logging
import time
import uuid
from datetime import datetime, timezone

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The server's metrics, in a registry of their own (so several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lookalike_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("lookalike_http_request_duration_seconds", "HTTP request latency by route",
                                 ["route", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.embed_seconds = Histogram("lookalike_embed_seconds", "Time to embed a query (decode + model)",
                                       ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.search_seconds = Histogram("lookalike_search_seconds", "Time to search the index for one query",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("lookalike_embed_batch_size", "Images or texts embedded per forward pass",
                                    ["kind"], buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.batcher_rescues = Counter("lookalike_batcher_rescues", "Image queries found stranded in the micro-batcher "
                                       "(a lost wake-up) and woken again by their own request", registry=r)
        self.products = Gauge("lookalike_index_products", "Products in the served index", registry=r)
        self.photos = Gauge("lookalike_index_photos", "Photos (vectors) in the served index", registry=r)
        self.ready = Gauge("lookalike_ready", "1 when the model and index are loaded", registry=r)
        self.model = Info("lookalike_model", "The model serving queries", registry=r)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any ``extra`` fields."""

    RESERVED = set(vars(logging.makeLogRecord({})))

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in self.RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str, fmt: str) -> None:
    """Send the ``lookalike`` loggers to stderr in ``fmt`` (json|text) at ``level``, and with them
    what else the server process prints: Python warnings (Pillow's "Corrupt EXIF data", ...) and
    uvicorn's own messages (at WARNING and above). libtiff's C-level error messages, which would
    bypass both, are switched off (:func:`silence_libtiff`)."""
    handler = logging.StreamHandler()
    text = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    handler.setFormatter(JsonFormatter() if fmt == "json" else text)
    logging.captureWarnings(True)
    for name, logger_level in (("lookalike", level), ("py.warnings", level), ("uvicorn", "WARNING")):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logger_level)
        logger.propagate = False
    for name in ("uvicorn.error", "uvicorn.access"):  # handlers uvicorn's own log config may have added
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    silence_libtiff()


def silence_libtiff() -> bool:
    """Turn off libtiff's library-wide error handler, which writes plain text to stderr
    ("tempfile.tif: Using code not yet in table.") outside any logger. Pillow already turns off its
    warning handler (TiffDecode.c: ``TIFFSetWarningHandler(NULL)``); the error still reaches Python
    as a decoder error, which the server answers as a 400, so only the stray text is lost. A NULL
    handler is libtiff's documented way to suppress messages (TIFFError(3tiff)).

    Finds the libtiff that Pillow's ``_imaging`` loaded in ``/proc/self/maps`` (Linux); returns
    whether it did."""
    import ctypes

    from PIL import Image  # noqa: F401  (loads _imaging, and with it libtiff)

    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = {line.split()[-1] for line in maps if "/libtiff" in line}
    except OSError:
        return False
    done = False
    for path in paths:
        try:
            lib = ctypes.CDLL(path)  # the library already mapped: dlopen returns the same instance
            for setter in (lib.TIFFSetErrorHandler, lib.TIFFSetErrorHandlerExt):
                setter.restype = ctypes.c_void_p
                setter.argtypes = [ctypes.c_void_p]
                setter(None)
            done = True
        except (OSError, AttributeError):
            continue
    return done


class RequestObserver:
    """ASGI middleware: a request id, per-route metrics and one log line per request.

    The route label is the route's path template (``/v1/products/{product_id}``), never the
    raw path, so metric cardinality stays bounded; unmatched paths count as ``unmatched``.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, access_log: bool = True) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log
        self.log = logging.getLogger("lookalike.access")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex
        status = 500
        t0 = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            duration = time.perf_counter() - t0
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(template, method, str(status)).inc()
            self.metrics.latency.labels(template, method).observe(duration)
            if self.access_log:
                self.log.info("request", extra={"request_id": request_id, "method": method, "route": template,
                                                "path": scope.get("path"), "status": status,
                                                "duration_ms": round(duration * 1000, 2)})
