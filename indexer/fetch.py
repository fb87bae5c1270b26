"""Download a photo named by URL in a catalogue: http/https only, bounded in time, size and retries.

Public addresses only, unless the caller allows private ones: a catalogue is input from
outside, and a URL in it must not make the indexer read from the loopback interface, the
local network or a cloud metadata endpoint (server-side request forgery). The host is
resolved here, every address it resolves to is checked, and the request goes to a checked
address (so a second DNS answer cannot swap in another); redirects are followed here, one
at a time, and each target is checked the same way.
"""
from __future__ import annotations

import contextlib
import ipaddress
import socket
import time
from typing import Iterator

import httpx

from .images import ImageError, PhotoUnavailable

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 15.0
# httpx times each socket read, not a whole download (encode/httpx#1450): a server that
# trickles a byte now and then would hold a run for as long as it likes.
TOTAL_TIMEOUT_S = 60.0
RETRIES = 2
RETRY_BACKOFF_S = 0.5
MAX_REDIRECTS = 5


def fetch_url(url: str, max_bytes: int, retries: int = RETRIES, allow_private: bool = False) -> bytes:
    """GET ``url`` and return its body.

    Refuses other schemes than http/https and URLs without a host, bodies over
    ``max_bytes`` (checked on Content-Length and while streaming), and retries
    connection errors, timeouts and 5xx/429 answers ``retries`` times with
    exponential back-off. Each connect and read waits at most CONNECT_TIMEOUT_S /
    READ_TIMEOUT_S seconds; a body still arriving TOTAL_TIMEOUT_S seconds after the
    first try began is abandoned, and no retry starts after that. Follows at most
    MAX_REDIRECTS redirects. Unless ``allow_private``, refuses a host, or a redirect
    target, that resolves to any address that is not public (private, loopback,
    link-local, multicast, reserved, unspecified; see :func:`_refused_address`).
    Raises ImageError with reason ``download_failed``, ``too_large`` or ``bad_url``.
    """
    _check_url(url)
    timeout = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
    deadline = time.monotonic() + TOTAL_TIMEOUT_S
    last, tries = "", 0
    with httpx.Client(timeout=timeout, follow_redirects=False) as client:
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(RETRY_BACKOFF_S * 2 ** (attempt - 1))
                if time.monotonic() > deadline:
                    break
            tries += 1
            try:
                body = _get(client, url, max_bytes, deadline, allow_private)
            except _Retry as e:
                last = str(e)
                continue
            except httpx.InvalidURL as e:
                raise ImageError("bad_url", f"{url!r}: {e}") from None
            except httpx.TransportError as e:
                last = f"{type(e).__name__}: {e}"
                continue
            return body
    raise PhotoUnavailable("download_failed", f"{url}: {last} (after {tries} tries)")


class _Retry(Exception):
    """An answer worth asking again for (5xx, 429, a name that did not resolve)."""


def _check_url(url: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as e:
        raise ImageError("bad_url", f"{url!r}: {e}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ImageError("bad_url", f"{url!r}: only http and https URLs with a host are read")
    return parsed


def _get(client: httpx.Client, url: str, max_bytes: int, deadline: float, allow_private: bool) -> bytes:
    """One try: the request and its redirects. Raises _Retry, ImageError or httpx.TransportError."""
    current = httpx.URL(url)
    for _ in range(MAX_REDIRECTS + 1):
        with _stream(client, current, allow_private) as r:
            if r.is_redirect:
                location = r.headers.get("location", "")
                target = current.join(location)
                if target.scheme not in ("http", "https") or not target.host:
                    raise PhotoUnavailable("download_failed", f"{url}: redirected to {location!r}; only http and https are followed")
                current = target
                continue
            if r.status_code >= 500 or r.status_code == 429:
                raise _Retry(f"HTTP {r.status_code}")
            if r.status_code >= 400:
                raise PhotoUnavailable("download_failed", f"{url}: HTTP {r.status_code}")
            length = r.headers.get("content-length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise ImageError("too_large", f"{url}: {length} bytes, over the {max_bytes}-byte limit")
            chunks, total = [], 0
            for chunk in r.iter_bytes():
                total += len(chunk)
                if total > max_bytes:
                    raise ImageError("too_large", f"{url}: over the {max_bytes}-byte limit")
                if time.monotonic() > deadline:
                    raise PhotoUnavailable("download_failed", f"{url}: still downloading after {TOTAL_TIMEOUT_S:g} s")
                chunks.append(chunk)
            return b"".join(chunks)
    # a redirect loop answers the same way on every try: not retried
    raise PhotoUnavailable("download_failed", f"{url}: more than {MAX_REDIRECTS} redirects")


@contextlib.contextmanager
def _stream(client: httpx.Client, url: httpx.URL, allow_private: bool) -> Iterator[httpx.Response]:
    """``client.stream("GET", url)``; unless ``allow_private``, sent to an address of the host
    checked by :func:`_refused_address` (the next one if it refuses the connection), with the
    original host in the Host header and, for https, in the TLS server name (so that the
    certificate is checked against the host's name)."""
    if allow_private:
        with client.stream("GET", url) as r:
            yield r
        return
    host = url.host
    try:
        infos = socket.getaddrinfo(host, url.port or (443 if url.scheme == "https" else 80), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise _Retry(f"cannot resolve {host!r}: {e}") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    for address in addresses:
        why = _refused_address(address)
        if why:
            what = f"{host} is" if address == host else f"{host} resolves to {address},"
            raise ImageError("bad_url", f"{url}: {what} a {why} address; only public addresses "
                                        "are fetched (allow private ones with --allow-private-urls)")
    headers, extensions = {"Host": url.netloc.decode("ascii")}, {"sni_hostname": host}
    for i, address in enumerate(addresses):
        with contextlib.ExitStack() as stack:
            try:
                r = stack.enter_context(client.stream("GET", url.copy_with(host=address), headers=headers,
                                                      extensions=extensions))
            except httpx.ConnectError:
                if i == len(addresses) - 1:
                    raise
                continue
            yield r
            return


def _refused_address(address: str) -> str | None:
    """What kind of non-public address ``address`` is, or None for a public one. An IPv6 address
    that embeds an IPv4 one (``::ffff:127.0.0.1``, 6to4, Teredo) is judged by the IPv4 one too."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    candidates = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        candidates += [v4 for v4 in (ip.ipv4_mapped, ip.sixtofour, ip.teredo and ip.teredo[1]) if v4]
    for candidate in candidates:
        for kind in ("loopback", "unspecified", "link_local", "multicast", "private", "reserved"):
            if getattr(candidate, f"is_{kind}"):
                return kind.replace("_", "-")
        if not candidate.is_global:  # shared (100.64/10), documentation and benchmark ranges
            return "non-global"
    return None
