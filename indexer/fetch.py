"""Download a photo named by URL in a catalogue: http/https only, bounded in time, size and retries."""
from __future__ import annotations

import time

import httpx

from .images import ImageError

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 15.0
# httpx times each socket read, not a whole download (encode/httpx#1450): a server that
# trickles a byte now and then would hold a run for as long as it likes.
TOTAL_TIMEOUT_S = 60.0
RETRIES = 2
RETRY_BACKOFF_S = 0.5


def fetch_url(url: str, max_bytes: int, retries: int = RETRIES) -> bytes:
    """GET ``url`` and return its body.

    Refuses other schemes than http/https and URLs without a host, bodies over
    ``max_bytes`` (checked on Content-Length and while streaming), and retries
    connection errors, timeouts and 5xx/429 answers ``retries`` times with
    exponential back-off. Each connect and read waits at most CONNECT_TIMEOUT_S /
    READ_TIMEOUT_S seconds; a body still arriving TOTAL_TIMEOUT_S seconds after the
    first try began is abandoned, and no retry starts after that. Raises ImageError
    with reason ``download_failed``, ``too_large`` or ``bad_url``.
    """
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as e:
        raise ImageError("bad_url", f"{url!r}: {e}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ImageError("bad_url", f"{url!r}: only http and https URLs with a host are read")
    timeout = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
    deadline = time.monotonic() + TOTAL_TIMEOUT_S
    last, tries = "", 0
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(RETRY_BACKOFF_S * 2 ** (attempt - 1))
            if time.monotonic() > deadline:
                break
        tries += 1
        try:
            with httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as r:
                if r.status_code >= 500 or r.status_code == 429:
                    last = f"HTTP {r.status_code}"
                    continue
                if r.status_code >= 400:
                    raise ImageError("download_failed", f"{url}: HTTP {r.status_code}")
                length = r.headers.get("content-length")
                if length and length.isdigit() and int(length) > max_bytes:
                    raise ImageError("too_large", f"{url}: {length} bytes, over the {max_bytes}-byte limit")
                chunks, total = [], 0
                for chunk in r.iter_bytes():
                    total += len(chunk)
                    if total > max_bytes:
                        raise ImageError("too_large", f"{url}: over the {max_bytes}-byte limit")
                    if time.monotonic() > deadline:
                        raise ImageError("download_failed", f"{url}: still downloading after {TOTAL_TIMEOUT_S:g} s")
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.InvalidURL as e:
            raise ImageError("bad_url", f"{url!r}: {e}") from None
        except httpx.TooManyRedirects as e:  # a redirect loop answers the same way on every try
            raise ImageError("download_failed", f"{url}: {e}") from None
        except httpx.TransportError as e:
            last = f"{type(e).__name__}: {e}"
    raise ImageError("download_failed", f"{url}: {last} (after {tries} tries)")
