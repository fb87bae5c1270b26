"""Decode-cost bounds: what one image may cost to decode, checked before it is decoded.

The pixel limit (:data:`DEFAULT_MAX_PIXELS`), the estimate of a decode's
memory (:func:`estimate_decode_bytes`) and its limit, the process-wide
:class:`DecodeMemoryBudget` that concurrent large decodes share, and the
aspect-ratio crop that bounds what resizing a returned image costs.
:func:`indexer.images.open_image` applies them; :mod:`indexer.image_headers`
reads the sizes they judge for formats Pillow decodes inside ``Image.open``.
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import NamedTuple

from PIL import Image

from .image_colour import GREY_BAND_PIXELS
from .image_errors import ImageError

__all__ = [
    "DECODE_MEMORY_ENV",
    "DEFAULT_MAX_DECODE_BYTES",
    "DEFAULT_MAX_PIXELS",
    "MAX_ASPECT_RATIO",
    "SMALL_DECODE_BYTES",
    "DecodeLimits",
    "DecodeMemoryBudget",
    "check_size",
    "checked_cost",
    "crop_aspect",
    "decode_memory_budget",
    "estimate_decode_bytes",
    "set_decode_memory_budget",
]

#: Refuse images that would decode to more pixels than this (about 8000 x 8000),
#: counted after JPEG draft reduction.
DEFAULT_MAX_PIXELS = 64_000_000

#: Refuse images whose decode is estimated (:func:`estimate_decode_bytes`) to need
#: more bytes than this.  1 GiB admits an 8-bit RGB image of DEFAULT_MAX_PIXELS
#: (estimated 12 bytes/pixel, 768 MB; measured 7.6) but not a WebP or 16-bit RGBA
#: PNG of that size, whose decoders need two to three times as much.
DEFAULT_MAX_DECODE_BYTES = 1 << 30

#: Decodes estimated at or below this many bytes never wait for the process-wide
#: budget (an 8-bit RGB photo of up to about 5.6 Mpx, e.g. 2700 x 2000).
SMALL_DECODE_BYTES = 64 << 20

#: Environment variable: the process-wide decode-memory budget in bytes
#: (default: a quarter of physical memory, or of the cgroup's memory limit
#: where that is lower).
DECODE_MEMORY_ENV = "LOOKALIKE_DECODE_MEMORY_BYTES"

#: Longest side / shortest side of a returned image; beyond it the longer side
#: is centre-cropped.  Wider than panoramas and banner photos (about 10:1) and
#: than the 256 x 10 px strips in Pillow's test images; resizing the shorter
#: side to a 224 px model input then gives at most 224 x 7168 px (6.4 MB)
#: whatever the file, where an uncropped 1 x 100000 px PNG became
#: 224 x 22.4 M px (20 GB measured).
MAX_ASPECT_RATIO = 32


class DecodeMemoryBudget:
    """A byte-counting semaphore that bounds the memory of concurrent large decodes.

    Each decode whose estimate exceeds :data:`SMALL_DECODE_BYTES` reserves its
    estimate (bytes) for as long as it runs and waits while the reservations in
    flight would exceed ``capacity_bytes``; smaller decodes never wait and are
    not counted.  A decode whose estimate exceeds ``capacity_bytes`` on its own
    is refused (``ImageError("too_large")``) instead of waiting for ever.

    The budget counts the decoder's working memory, not the returned image
    once the caller holds it.  It is per process: each DataLoader worker of a
    bulk run has its own.  Thread-safe.

    Attributes:
        capacity_bytes: the bound, bytes (>= 1).
        in_use_bytes: bytes reserved right now.
        peak_bytes: the highest ``in_use_bytes`` so far.
    """

    def __init__(self, capacity_bytes: int):
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or capacity_bytes < 1:
            raise ValueError(f"capacity_bytes must be a positive int, got {capacity_bytes!r}")
        self.capacity_bytes = capacity_bytes
        self.in_use_bytes = 0
        self.peak_bytes = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        """Hold ``nbytes`` of the budget for the ``with`` block, waiting until they fit.

        ``nbytes`` <= :data:`SMALL_DECODE_BYTES` returns at once without counting.
        Raises ``ValueError`` when ``nbytes`` > ``capacity_bytes`` (it would never fit).
        """
        if nbytes <= SMALL_DECODE_BYTES:
            yield
            return
        if nbytes > self.capacity_bytes:
            raise ValueError(f"{nbytes} bytes exceed the decode budget of {self.capacity_bytes} bytes")
        with self._cond:
            while self.in_use_bytes + nbytes > self.capacity_bytes:
                self._cond.wait()
            self.in_use_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.in_use_bytes)
        try:
            yield
        finally:
            with self._cond:
                self.in_use_bytes -= nbytes
                self._cond.notify_all()


_budget: DecodeMemoryBudget | None = None
_budget_lock = threading.Lock()


def decode_memory_budget() -> DecodeMemoryBudget:
    """The process-wide :class:`DecodeMemoryBudget` that :func:`indexer.images.open_image` uses by default.

    Built on first use with a capacity of ``$LOOKALIKE_DECODE_MEMORY_BYTES``
    bytes (:data:`DECODE_MEMORY_ENV`, a positive integer) or, without it, a
    quarter of the memory this process may use: physical memory
    (``os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")``), or the
    cgroup memory limit where that is lower (containers).  The quarter leaves
    the rest to the model, the index and the caller's use of the decoded images.

    Raises:
        ValueError: the environment variable is set but not a positive integer.
    """
    global _budget
    with _budget_lock:
        if _budget is None:
            raw = os.environ.get(DECODE_MEMORY_ENV, "").strip()
            if raw:
                try:
                    capacity = int(raw)
                except ValueError:
                    capacity = 0
                if capacity < 1:
                    raise ValueError(f"{DECODE_MEMORY_ENV} must be a positive number of bytes, got {raw!r}")
            else:
                capacity = max(_usable_memory() // 4, SMALL_DECODE_BYTES + 1)
            _budget = DecodeMemoryBudget(capacity)
        return _budget


def set_decode_memory_budget(capacity_bytes: int) -> DecodeMemoryBudget:
    """Replace the process-wide decode budget with one of ``capacity_bytes`` (a server sets it from
    its ``decode_memory_bytes`` setting at start, before any request). Returns it."""
    global _budget
    with _budget_lock:
        _budget = DecodeMemoryBudget(capacity_bytes)
        return _budget


def _forget_budget_in_child() -> None:
    # A forked worker must not inherit reservations (or a held lock) of threads
    # that do not exist in it.
    global _budget, _budget_lock
    _budget = None
    _budget_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_budget_in_child)


def _usable_memory() -> int:
    """Bytes of memory this process may use: physical memory, capped by a cgroup v2/v1 limit."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30  # a platform without sysconf: assume a small server
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_file) as fh:
                text = fh.read().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            total = int(text)
    return total


class DecodeLimits(NamedTuple):
    """The bounds of one :func:`indexer.images.open_image` call (its arguments, checked)."""

    max_pixels: int
    draft_size: int | None
    max_decode_bytes: int
    budget: DecodeMemoryBudget


def check_size(size: tuple[int, int], max_pixels: int, label: str) -> None:
    """Guard on the ``(width, height)`` a decoder will produce, before any pixel is decoded."""
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError("zero_size", f"{label}: image has zero size {width}x{height}")
    pixels = width * height
    if pixels > 2 * max_pixels:
        raise ImageError(
            "decompression_bomb",
            f"{label}: {width}x{height} = {pixels} pixels is more than twice the limit "
            f"of {max_pixels} pixels (possible decompression bomb)",
        )
    if pixels > max_pixels:
        raise ImageError(
            "too_large",
            f"{label}: {width}x{height} = {pixels} pixels exceeds the limit of {max_pixels}",
        )


def checked_cost(
    size: tuple[int, int], mode: str, transparency: bool, extra: int, label: str, limits: DecodeLimits
) -> int:
    """:func:`check_size`, then the decode's estimated bytes, refused above the byte limits."""
    check_size(size, limits.max_pixels, label)
    cost = estimate_decode_bytes(size, mode, transparency=transparency, extra_bytes=extra)
    limit = min(limits.max_decode_bytes, limits.budget.capacity_bytes)
    if cost > limit:
        raise ImageError(
            "too_large",
            f"{label}: decoding {size[0]}x{size[1]} {mode} pixels needs about {cost >> 20} MiB, "
            f"more than the limit of {limit >> 20} MiB",
        )
    return cost


#: Fixed allowance in every estimate for decoder state and allocator slack
#: (measured peaks of 1-byte-mode and CMYK decodes exceed p and c by < 1%).
_DECODE_SLACK_BYTES = 16 << 20

#: Bytes Pillow stores per pixel (libImaging/Storage.c): 1 for these modes,
#: 2 for "I;16*", 4 for every other mode (RGB is stored as RGBX).
_ONE_BYTE_MODES = frozenset({"1", "L", "P"})


def estimate_decode_bytes(
    size: tuple[int, int], mode: str, *, transparency: bool = False, extra_bytes: int = 0
) -> int:
    """Upper estimate, in bytes, of the memory :func:`indexer.images.open_image` needs for one decode.

    ``pixels * (2 * p + c) + extra_bytes``, where ``pixels`` is the decoded
    ``width * height``; ``p`` the bytes Pillow stores per pixel of ``mode``
    (1 for ``"1"``/``"L"``/``"P"``, 2 for ``"I;16*"``, 4 otherwise; Pillow's
    ``libImaging/Storage.c``), for the decoded image and the copy
    ``ImageOps.exif_transpose`` returns; ``c`` the bytes per pixel of the
    conversion to RGB: 4 (the RGB result), 16 with alpha or a transparency
    key (an RGBA copy, the white canvas, the composite, the RGB result), 6
    for 16/32-bit and float greyscale (8-bit array, grey image, RGB) plus
    32 MiB of float64 bands; ``extra_bytes`` the decoder's own buffers (WebP
    canvases, JPEG coefficients...); plus 16 MiB of decoder state and
    allocator slack.  Measured peak RSS of 4000 x 4000 px
    PNG, TIFF, JPEG, WebP, GIF, BMP and JPEG 2000 files of every mode
    conversion above was 0.5 to 0.85 of it (``tests/test_images_limits.py``
    checks some).

    Args:
        size: ``(width, height)`` in pixels as decoded.
        mode: Pillow mode of the decoded image.
        transparency: the image carries a ``transparency`` key (palette or
            colour-key transparency).
        extra_bytes: decoder working memory beyond the image itself, bytes.
    """
    pixels = size[0] * size[1]
    if mode in _ONE_BYTE_MODES:
        stored = 1
    elif mode.startswith("I;16"):
        stored = 2
    else:
        stored = 4
    if mode in ("I", "F") or mode.startswith("I;"):
        convert, fixed = 6, 4 * 8 * GREY_BAND_PIXELS
    elif transparency or mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        convert, fixed = 16, 0
    else:
        convert, fixed = 4, 0
    return pixels * (2 * stored + convert) + fixed + _DECODE_SLACK_BYTES + extra_bytes


def crop_aspect(im: Image.Image) -> Image.Image:
    """Centre-crop the longer side to :data:`MAX_ASPECT_RATIO` times the shorter (may return ``im``)."""
    width, height = im.size
    if width > MAX_ASPECT_RATIO * height:
        keep = MAX_ASPECT_RATIO * height
        left = (width - keep) // 2
        return im.crop((left, 0, left + keep, height))
    if height > MAX_ASPECT_RATIO * width:
        keep = MAX_ASPECT_RATIO * width
        top = (height - keep) // 2
        return im.crop((0, top, width, top + keep))
    return im
