"""Run the app under uvicorn with bounds on slow and idle clients.

uvicorn bounds idle keep-alive connections (``timeout_keep_alive``), header size
(``h11_max_incomplete_event_size``) and, as a backstop, concurrent connections
(``limit_concurrency``: a 503 above it), but it has no timeout for a request that is still
arriving: a client that sends half a request line, or stops halfway through a body, holds a
connection and a file descriptor for ever. 20,000 such clients used every descriptor of the
process and ``/healthz`` stopped answering. :class:`GuardedH11Protocol` adds those timeouts and
a connection cap that closes the stalest half-sent request first, so the cap itself cannot be
used to lock healthy clients out.
"""
from __future__ import annotations

import errno
import faulthandler
import logging
import resource
import signal
import socket
import sys

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from indexer.errors import LookalikeError

from .settings import ServerSettings

log = logging.getLogger("lookalike.server")

# descriptors kept free for what the process opens besides client sockets: the index and its
# SQLite files, model files, the log, thumbnails read from disk, spooled uploads
RESERVED_FDS = 256
TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                    b"content-length: %d\r\n\r\n%s")


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-head timeout, a body-stall timeout and a connection cap.

    Use :meth:`configured` to get a subclass with the limits set. A request "head" is the request
    line and headers: its timer starts when the connection opens (or, on a kept-alive connection,
    at the first byte of the next request) and stops when h11 has parsed the whole head. The body
    timer restarts at every body chunk and only closes the connection when reading is not paused
    by the server itself (flow control pauses it while the app is busy with what it has).
    """

    header_timeout_s = 10.0
    body_timeout_s = 30.0
    max_connections = 2048
    # connections waiting for a request head, oldest first (a dict keeps insertion order)
    awaiting_head: dict[GuardedH11Protocol, None] = {}

    @classmethod
    def configured(cls, settings: ServerSettings, max_connections: int) -> type[GuardedH11Protocol]:
        return type(cls.__name__, (cls,), {"header_timeout_s": settings.header_timeout_s,
                                           "body_timeout_s": settings.body_timeout_s,
                                           "max_connections": max_connections, "awaiting_head": {}})

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._head_timer = self._body_timer = None
        super().connection_made(transport)
        self._await_head()
        if len(self.connections) > self.max_connections:
            victim = next(iter(self.awaiting_head))  # at worst this new connection itself
            log.warning("connection limit reached: closing a connection that sent no complete request",
                        extra={"max_connections": self.max_connections})
            victim._close()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self._head_timer is None:
            self._await_head()  # the first byte of the next request on a kept-alive connection
        super().data_received(data)
        state = self.conn.their_state
        if state is not h11.IDLE:
            self._head_done()
        if state is h11.SEND_BODY:
            self._arm_body_timer()
        elif self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_done()
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """A malformed request or a head over ``max_header_bytes``: answered in the API's JSON error shape."""
        body = b'{"error": {"code": "bad_request", "message": "%s"}}' % msg.encode("ascii", "replace")
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(body), body))
        self._close()

    def _await_head(self) -> None:
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timeout)
        self.awaiting_head[self] = None

    def _head_done(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self.awaiting_head.pop(self, None)

    def _head_timeout(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            body = (b'{"error": {"code": "request_timeout", "message": "the request line and headers did not '
                    b'arrive within %g s"}}' % self.header_timeout_s)
            self.transport.write(TIMEOUT_RESPONSE % (len(body), body))
        self._close()

    def _arm_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
        self._body_timer = self.loop.call_later(self.body_timeout_s, self._body_timeout)

    def _body_timeout(self) -> None:
        self._body_timer = None
        if self.flow.read_paused:  # our own back-pressure, not the client's stall
            self._arm_body_timer()
            return
        log.warning("closing a connection whose request body stalled", extra={"body_timeout_s": self.body_timeout_s})
        self._close()

    def _close(self) -> None:
        self._head_done()
        self.connections.discard(self)  # at once, so the cap counts it out before the loop reaps it
        self.transport.close()


def raise_fd_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; return the soft limit now.

    Each connection holds one descriptor; the default soft limit (often 1,024) is far below what
    the kernel allows the process (the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, e)
    return soft


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on ``host:port``. Raises a LookalikeError (exit status 2 from the
    CLI) when the port is taken or the address cannot be used."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise LookalikeError(f"cannot listen on {host}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise LookalikeError(f"port {port} is in use (another server is listening on {host}:{port}); stop it "
                                 "or choose another port with --port") from None
        raise LookalikeError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def return_freed_memory(threshold_bytes: int = 1 << 20) -> bool:
    """Make glibc's malloc serve blocks of ``threshold_bytes`` and more with mmap, so that a large
    decode's buffers go back to the system when freed. By default glibc raises this threshold as
    large blocks are freed (up to 32 MiB) and keeps freed memory in per-thread arenas: four 700 MB
    decodes left the server at 3.6 GB for minutes (``mallopt(M_MMAP_THRESHOLD)``, man 3 mallopt;
    setting it also stops the raising). Returns False where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_mmap_threshold = -3  # <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, threshold_bytes))
    except (OSError, AttributeError):
        return False


def dump_stacks_on_sigusr1() -> bool:
    """``kill -USR1 PID`` then writes the Python stack of every thread of this process to stderr
    (the server's log), without stopping it: what a server that stopped answering is doing
    (:func:`faulthandler.register`; the dump is written by C code, so it works even when no Python
    thread can run). Returns False where there is no SIGUSR1 (Windows)."""
    if not hasattr(signal, "SIGUSR1"):
        return False
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    return True


def run(app, settings: ServerSettings, host: str, port: int) -> None:
    """Serve ``app`` on ``host:port`` until interrupted, with the limits of ``settings``."""
    import uvicorn

    from indexer.images import set_decode_memory_budget

    set_decode_memory_budget(settings.decode_memory_bytes)
    return_freed_memory()
    dump_stacks_on_sigusr1()
    sock = bind(host, port)
    fd_limit = raise_fd_limit()
    max_connections = min(settings.max_connections, max(16, fd_limit - RESERVED_FDS))
    if max_connections < settings.max_connections:
        log.warning("max_connections lowered to fit the open-file limit",
                    extra={"max_connections": max_connections, "open_file_limit": fd_limit})
    config = uvicorn.Config(
        app, http=GuardedH11Protocol.configured(settings, max_connections), ws="none", lifespan="on",
        log_config=None, access_log=False,
        timeout_keep_alive=settings.keep_alive_timeout_s,
        h11_max_incomplete_event_size=settings.max_header_bytes,
        # never reached while the protocol keeps connections under max_connections; a backstop
        limit_concurrency=max_connections + 1,
        backlog=settings.backlog,
    )
    uvicorn.Server(config).run(sockets=[sock])
