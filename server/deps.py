"""FastAPI dependencies the routers share: the loaded :class:`~server.engine.Engine` and the API
key checks. :class:`server.limits.RequestLimits` runs the same key checks before a body is read;
the routes keep them as dependencies, so a route the middleware does not classify is still
protected."""
from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, TypeVar

from fastapi import Depends, Request, UploadFile

from indexer.errors import LookalikeError
from indexer.records import IndexBusy

from .engine import Engine, NotReady

log = logging.getLogger("lookalike.server")
T = TypeVar("T")


def get_engine(request: Request) -> Engine:
    """The app's engine; 503 ``not_ready`` while it loads or after it failed to load."""
    engine = request.app.state.engine
    if engine is None:
        error = request.app.state.load_error
        raise NotReady(f"the server failed to load: {error}" if error else "the model and index are still loading")
    return engine


EngineDep = Annotated[Engine, Depends(get_engine)]


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


def require_key_if_configured(request: Request) -> None:
    """Routes that read the whole catalogue at once (the audit) need a key whenever keys are configured,
    whatever ``auth_reads`` says."""
    if request.app.state.settings.keys():
        _check_key(request)


def _loop_slots(slots_by_loop: dict, n: int) -> asyncio.Semaphore:
    """The ``n``-permit semaphore of ``slots_by_loop`` for the running event loop, made on first use (a
    semaphore binds to the loop of its first wait; tests may serve one app from several loops)."""
    loop = asyncio.get_running_loop()
    slots = slots_by_loop.get(loop)
    if slots is None:
        slots = slots_by_loop[loop] = asyncio.Semaphore(n)
    return slots


async def write_slot(request: Request) -> AsyncIterator[float]:
    """Hold one of the server's ``max_concurrent_writes`` catalogue-update slots while the route function
    runs, and give the update its deadline (:func:`time.monotonic`): ``write_timeout_s`` from now, for
    the slot, the index's write lock and SQLite's together (:meth:`indexer.store.Store.transaction`).
    Raises IndexBusy (503 ``index_busy``, ``Retry-After``) when no slot comes free in time.

    FastAPI solves dependencies once the body has been read, so a slot counts the updates that are
    doing work: embedding their photos or waiting for the index's write lock. Each holds one of the
    worker threads (anyio's 40) that sync routes, searches among them, run on; without the bound,
    updates stuck behind a stalled disk took them all and every search waited (measured: 45 stuck
    updates, a text search and ``/healthz`` both timed out at 20 s). An update waiting for a slot
    waits on the event loop and holds no thread. Used with ``scope="function"``: the slot is given
    back when the route function returns, not once the response is sent, which a client that does
    not read its responses could hold up for ever."""
    state = request.app.state
    timeout = state.settings.write_timeout_s
    deadline = time.monotonic() + timeout
    slots = _loop_slots(state.write_slots, state.settings.max_concurrent_writes)
    try:
        await asyncio.wait_for(slots.acquire(), timeout)
    except TimeoutError:
        log.warning("catalogue update refused: no write slot came free in %g s (max_concurrent_writes %d)",
                    timeout, state.settings.max_concurrent_writes)
        raise IndexBusy(f"every one of this server's {state.settings.max_concurrent_writes} write slots "
                        f"(max_concurrent_writes) stayed taken for {timeout:g} s; nothing was written, send "
                        "this update again later") from None
    try:
        yield deadline
    finally:
        slots.release()


WriteDeadline = Annotated[float, Depends(write_slot, scope="function")]


class PhotoReadTimeout(LookalikeError):
    """A product photo could not be served within ``photo_read_timeout_s``: its file's read was stuck or
    slow (a stalled disk or network mount), or so were the reads holding every photo read slot. Nothing
    is wrong with the request; it may be sent again later (``retry_after_s``: the ``Retry-After``)."""

    code = "photo_read_timeout"
    http_status = 503
    retry_after_s = 5


async def read_photo(request: Request, read: Callable[[], T], what: str) -> T:
    """``read()`` (a product photo's file read and resized) on a thread of its own, as one of the server's
    ``max_concurrent_photo_reads``, within ``photo_read_timeout_s`` from now for the slot and the read
    together. Returns what ``read`` returns and raises what it raises; raises PhotoReadTimeout (503
    ``photo_read_timeout``, ``Retry-After``) past the deadline. ``what`` names the photo in that message.

    A read hung on a stalled disk or network mount cannot be interrupted: the request that gave up on it
    answers 503 but the read keeps its slot until it returns, so at most ``max_concurrent_photo_reads``
    threads are ever stuck, and they are not the worker threads (anyio's 40) that searches run on. The
    threads are daemons, so a hung read does not keep a stopping server alive. Without the bound,
    45 requests for a photo whose file could not be opened took every worker thread (a file lease held
    by another process stalls ``open``: measured in ``tests/test_server_limits.py``), and searches
    waited as long as the stall."""
    state = request.app.state
    timeout = state.settings.photo_read_timeout_s
    limit = state.settings.max_concurrent_photo_reads
    deadline = time.monotonic() + timeout
    slots = _loop_slots(state.photo_read_slots, limit)
    try:
        await asyncio.wait_for(slots.acquire(), timeout)
    except TimeoutError:
        log.warning("photo request refused: no photo read slot came free in %g s (max_concurrent_photo_reads %d)",
                    timeout, limit)
        raise PhotoReadTimeout(f"every one of this server's {limit} photo read slots (max_concurrent_photo_reads) "
                               f"stayed taken for {timeout:g} s: reads of product photos are stuck or slow (a "
                               "stalled disk or network mount?); try again later") from None
    loop = asyncio.get_running_loop()
    answer: asyncio.Future = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:  # on the event loop, once the read has returned
        slots.release()
        if not answer.done():  # not abandoned at the deadline
            outcome()

    def run() -> None:
        try:
            result = read()
            outcome = functools.partial(answer.set_result, result)
        except BaseException as e:  # handed to the awaiting request, which raises it
            outcome = functools.partial(answer.set_exception, e)
        try:
            loop.call_soon_threadsafe(settle, outcome)
        except RuntimeError:  # the event loop has closed: the server stopped while this read hung
            pass

    try:
        threading.Thread(target=run, name="lookalike-photo-read", daemon=True).start()
    except BaseException:
        slots.release()
        raise
    try:
        return await asyncio.wait_for(answer, max(deadline - time.monotonic(), 0.0))
    except TimeoutError:
        log.warning("photo request gave up: reading %s took more than %g s (photo_read_timeout_s)", what, timeout)
        raise PhotoReadTimeout(f"reading {what} took more than {timeout:g} s (photo_read_timeout_s): the disk or "
                               "network mount it is on is stuck or slow; try again later") from None


READ_AUTH = [Depends(require_read)]
WRITE_AUTH = [Depends(require_write)]
KEY_IF_CONFIGURED = [Depends(require_key_if_configured)]


def writable(engine: Engine) -> Engine:
    """``engine``, or its ``write_block`` raised (403 read-only / writes disabled, 409 index locked)."""
    if engine.write_block is not None:
        raise engine.write_block
    return engine


async def read_upload(upload: UploadFile, limit: int) -> bytes:
    """The uploaded file's bytes; 413 ``too_large`` past ``limit`` bytes (reads at most ``limit + 1``)."""
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise LookalikeError(f"upload is over the {limit}-byte limit", code="too_large", http_status=413)
    return data
