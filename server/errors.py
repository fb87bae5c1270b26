"""Every error answer has one shape, ``{"error": {"code", "message"}}``: :func:`error_response` builds
it, and :data:`EXCEPTION_HANDLERS` turns each kind of exception into it. Errors a client can cause
are 4xx; anything else is a 500 that says to look in the log, never a traceback."""
from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from indexer.errors import LookalikeError

log = logging.getLogger("lookalike.server")


def error_response(status: int, code: str, message: str, retry_after_s: int | None = None) -> JSONResponse:
    """The JSON error answer; a 401 also carries ``WWW-Authenticate: Bearer`` (RFC 6750, sec. 3), and
    ``retry_after_s`` becomes ``Retry-After`` (RFC 9110, sec. 10.2.3: seconds)."""
    response = JSONResponse({"error": {"code": code, "message": message}}, status_code=status)
    if status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    if retry_after_s is not None:
        response.headers["Retry-After"] = str(int(retry_after_s))
    return response


def lookalike_error_response(exc: LookalikeError) -> JSONResponse:
    """:func:`error_response` of a LookalikeError (its ``retry_after_s``, if it has one, included)."""
    return error_response(exc.http_status, exc.code, str(exc), getattr(exc, "retry_after_s", None))


async def _lookalike_error(request: Request, exc: LookalikeError) -> JSONResponse:
    return lookalike_error_response(exc)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path"))
        parts.append(f"{loc or 'request'}: {err.get('msg')}")
    return error_response(422, "validation_error", "; ".join(parts) or "invalid request")


async def _out_of_memory(request: Request, exc: MemoryError) -> JSONResponse:
    # a request the process cannot afford (a decode past every check, say) is the client's
    # oversized input, not a server fault: the same 413 the size checks give
    log.warning("out of memory on %s", request.url.path)
    return error_response(413, "too_large",
                          "the request needs more memory than this server allows; send a smaller image")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s", request.url.path)
    return error_response(500, "internal_error", "internal error; the server log has details")


EXCEPTION_HANDLERS = {
    LookalikeError: _lookalike_error,
    StarletteHTTPException: _http_error,
    RequestValidationError: _validation_error,
    MemoryError: _out_of_memory,
    Exception: _unexpected,
}
