"""Bounds on what one request may cost, applied before the app reads a byte of its body.

:class:`RequestLimits` is a pure ASGI middleware (no ``BaseHTTPMiddleware``, which would wrap
the body in a task of its own). For each request, in this order:

1. the API key, for write routes and (with ``auth_reads``) for every read route and the
   OpenAPI pages: a client without a key is answered 401 before its body is read, so an
   unauthenticated 1 GiB upload costs the server a few header bytes, not a spool file;
2. a write route on a server that cannot write (read-only, writes disabled, index locked):
   403/409, also before the body;
3. the declared ``Content-Length`` against the route's body limit: 413 at once;
4. the bytes actually received (chunked bodies declare no length): past the limit the read
   fails with 413 and the rest is never read.

A response sent while part of the body is still unread carries ``Connection: close``, so the
server does not keep reading (and discarding) the rest of a large upload.

Body limits per route (all :class:`~server.settings.ServerSettings` fields):
``POST /v1/products`` ``max_product_upload_bytes``; ``POST /v1/search/image`` and
``POST /v1/labels`` ``max_upload_bytes + max_json_bytes`` (one photo plus the form's other
fields); everything else ``max_json_bytes``.
"""
from __future__ import annotations

import logging

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from indexer.errors import LookalikeError

from .deps import require_read, require_write
from .errors import error_response, lookalike_error_response
from .settings import ServerSettings

log = logging.getLogger("lookalike.server")

PHOTO_ROUTES = ("/v1/search/image", "/v1/labels")
PRODUCTS_ROUTE = "/v1/products"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a body passes its limit; the app's HTTPException handler
    answers it as ``{"error": {"code": "too_large", ...}}`` with status 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over this route's {limit}-byte limit")


def is_write(method: str, path: str) -> bool:
    """Whether ``method path`` is one of the catalogue-update routes (they need an API key)."""
    return method not in SAFE_METHODS and (path == PRODUCTS_ROUTE or path.startswith(PRODUCTS_ROUTE + "/"))


def body_limit(settings: ServerSettings, method: str, path: str) -> int:
    """The most body bytes ``method path`` may send (see the module docstring)."""
    if method == "POST" and path == PRODUCTS_ROUTE:
        return settings.max_product_upload_bytes
    if method == "POST" and path in PHOTO_ROUTES:
        return settings.max_upload_bytes + settings.max_json_bytes
    return settings.max_json_bytes


class RequestLimits:
    """ASGI middleware: key check, then body-size limits, before the app reads the body.

    The key checks are the routes' own dependencies (:func:`server.deps.require_read`,
    :func:`server.deps.require_write`), called here before the body is read.
    """

    def __init__(self, app: ASGIApp, settings: ServerSettings) -> None:
        self.app = app
        self.settings = settings

    def _read_protected(self, scope: Scope, path: str) -> bool:
        if not self.settings.auth_reads:
            return False
        app = scope.get("app")
        docs = {getattr(app, name, None) for name in ("openapi_url", "docs_url", "redoc_url",
                                                      "swagger_ui_oauth2_redirect_url")} - {None}
        return path.startswith("/v1/") or path in docs

    def _refuse(self, scope: Scope) -> LookalikeError | None:
        """The error that answers this request before its body is read, if any."""
        method, path = scope["method"], scope["path"]
        request = Request(scope)
        try:
            if is_write(method, path):
                require_write(request)
                engine = getattr(request.app.state, "engine", None)
                block = getattr(engine, "write_block", None)
                if block is not None:
                    return block
            elif self._read_protected(scope, path):
                require_read(request)
        except LookalikeError as e:
            return e
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        body_done = not chunked and declared in (None, "0")

        async def respond(response: Response) -> None:
            if not body_done:
                response.headers["Connection"] = "close"
            await response(scope, receive, send)

        error = self._refuse(scope)
        if error is not None:
            await respond(lookalike_error_response(error))
            return
        limit = body_limit(self.settings, scope["method"], scope["path"])
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await respond(error_response(413, "too_large", str(BodyTooLarge(limit).detail)))
            return

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received, body_done
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
                if not message.get("more_body", False):
                    body_done = True
            return message

        async def send_closing(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if not body_done:
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, limited_receive, send_closing)
        except BodyTooLarge as e:  # raised where no exception handler of the app could answer it
            if started:
                raise
            await respond(error_response(413, "too_large", str(e.detail)))


async def one_file(request: Request, field: str) -> None:
    """Refuse (422) a multipart form that sends ``field`` more than once: FastAPI would silently keep
    the last one, and the client would get an answer about a photo it may not have meant."""
    form = await request.form()  # already parsed for the route's parameters: Starlette caches it
    if len(form.getlist(field)) > 1:
        raise LookalikeError(f"send one '{field}' field, not {len(form.getlist(field))}", code="validation_error",
                             http_status=422)


def check_labels(names: list[str], settings: ServerSettings) -> None:
    """Refuse (422) a per-request label set over ``max_labels`` labels or with a label over
    ``max_label_chars`` characters: every label costs tokenizer and text-tower time (one
    12,000-letter label was measured at 16 s of CPU) and a place in the classifier cache."""
    if len(names) > settings.max_labels:
        raise LookalikeError(f"at most {settings.max_labels} labels per request (got {len(names)})",
                             code="too_many_labels", http_status=422)
    for name in names:
        if len(name) > settings.max_label_chars:
            raise LookalikeError(f"label {name[:40]!r}... is longer than {settings.max_label_chars} characters",
                                 code="label_too_long", http_status=422)
