"""Safe image loading for the indexer and the query server.

Every picture that reaches CLIP goes through :func:`open_image`, which turns
"any file a retailer might upload" into a fully decoded, detached
``PIL.Image.Image`` in mode ``"RGB"`` (3 x uint8 per pixel, values 0..255,
size ``(width, height)`` in pixels, upright according to its EXIF
orientation), or raises :class:`ImageError` with a short machine-readable
``reason``.  Nothing here mutates Pillow's global state: neither
``Image.MAX_IMAGE_PIXELS`` nor ``ImageFile.LOAD_TRUNCATED_IMAGES`` is touched.

Reasons (``ImageError.reason``):

``not_found``
    The path does not exist or cannot be opened for reading.
``empty``
    Zero bytes of input.
``not_an_image``
    No Pillow plugin recognises the data (a text file, HTML error page, ...).
``truncated``
    The data ends before the image does (partial download).
``decompression_bomb``
    The decode would produce more than ``2 * max_pixels`` pixels, or Pillow's
    own guard fired (``DecompressionBombError``/``DecompressionBombWarning``).
``too_large``
    The decode would produce more than ``max_pixels`` but at most
    ``2 * max_pixels`` pixels (the same 1x/2x split Pillow uses for its
    warning/error); or decoding it would need more memory than
    ``max_decode_bytes`` or the whole process-wide decode budget; or the
    decoder ran out of memory (``MemoryError``).
``zero_size``
    The header declares a width or height of 0.
``corrupt``
    Recognised format, but the header or the compressed data is broken.
``unsupported``
    A format or pixel mode this Pillow build cannot decode or convert.

Cost bounds.  Whatever a file claims, one call costs memory and CPU in
proportion to the pixels it decodes, and that is bounded before decoding:

* the pixel limit applies to the pixels actually decoded: a JPEG read with
  draft (1/2, 1/4, 1/8 scale) is judged on its reduced size, every other
  format on its full size;
* containers that hold another image (ICO, ICNS) are judged on the headers of
  the embedded images, and WebP on its canvas header, before ``Image.open``
  (Pillow decodes ICO frames, and allocates the WebP canvas, inside it);
* the memory a decode needs is estimated from the decoded size, the pixel
  mode (Pillow stores 1, 2 or 4 bytes per pixel) and the format's own
  buffers, see :func:`estimate_decode_bytes`, and refused above
  ``max_decode_bytes``;
* large decodes (estimate above :data:`SMALL_DECODE_BYTES`) reserve their
  estimate from one process-wide :class:`DecodeMemoryBudget` and wait while
  it is spent, so concurrent hostile uploads cannot add up beyond it;
* the returned image is centre-cropped to an aspect ratio of at most
  :data:`MAX_ASPECT_RATIO`, so resizing its shorter side to a model's input
  (open_clip's ``Resize`` + ``CenterCrop``) cannot blow up its longer side.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import struct
import threading
from collections.abc import Iterator
from typing import IO, Any, NamedTuple, Union

import numpy as np
from PIL import (
    BmpImagePlugin,
    IcnsImagePlugin,
    IcoImagePlugin,
    Image,
    ImageOps,
    Jpeg2KImagePlugin,
    JpegImagePlugin,
    PngImagePlugin,
    UnidentifiedImageError,
)

__all__ = [
    "DECODE_MEMORY_ENV",
    "DEFAULT_MAX_DECODE_BYTES",
    "DEFAULT_MAX_PIXELS",
    "MAX_ASPECT_RATIO",
    "REASONS",
    "SMALL_DECODE_BYTES",
    "DecodeMemoryBudget",
    "ImageError",
    "decode_memory_budget",
    "estimate_decode_bytes",
    "file_sha256",
    "image_from_bytes",
    "open_image",
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

#: Every value ``ImageError.reason`` can take.
REASONS = frozenset(
    {
        "not_found",
        "empty",
        "not_an_image",
        "truncated",
        "decompression_bomb",
        "too_large",
        "zero_size",
        "corrupt",
        "unsupported",
        "unreadable",  # the file exists but cannot be read (permissions, I/O error)
        "download_failed",  # a URL could not be fetched
        "bad_url",  # a URL of another scheme than http/https, or malformed
    }
)

#: Transparent pixels are composited onto this colour (product photos sit on white).
BACKGROUND = (255, 255, 255)

_CHUNK = 1 << 20  # 1 MiB

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, IO[bytes]]


class ImageError(ValueError):
    """An image that cannot be used.

    ``reason`` is a short machine code (one of :data:`REASONS`); ``str(e)`` is a
    human-readable message naming the source and, where there is one, Pillow's
    own message.  The Pillow exception, if any, is chained as ``__cause__``.
    """

    def __init__(self, reason: str, message: str):
        if reason not in REASONS:
            raise ValueError(f"unknown ImageError reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __reduce__(self):  # keep picklable across worker processes
        return (type(self), (self.reason, self.message))


# --------------------------------------------------------------------------- memory budget


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
    """The process-wide :class:`DecodeMemoryBudget` that :func:`open_image` uses by default.

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


# --------------------------------------------------------------------------- public API


def open_image(
    source: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = 448,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
    memory_budget: DecodeMemoryBudget | None = None,
) -> Image.Image:
    """Open, fully decode and normalise one image, at a bounded cost.

    Args:
        source: a filesystem path (``str`` or ``os.PathLike``), the encoded file
            as ``bytes``/``bytearray``/``memoryview``, or a binary file object
            (read from position 0, as Pillow does; left open for the caller).
        max_pixels: upper bound on ``width * height`` of the pixels the decoder
            will produce (after JPEG draft reduction; the full size for every
            other format), checked from the headers before any pixel data is
            decoded.  Above ``max_pixels`` -> ``"too_large"``, above
            ``2 * max_pixels`` -> ``"decompression_bomb"``.  Pillow's own global
            limit (``Image.MAX_IMAGE_PIXELS``, about 179 Mpx by default, on the
            full size) still applies on top and also yields ``"decompression_bomb"``.
        draft_size: for JPEGs whose shorter side exceeds ``2 * draft_size`` px,
            let the decoder downscale by 1/2, 1/4 or 1/8 while decoding, keeping
            both sides >= ``draft_size`` px (fast, and CLIP resizes to 224 or so
            anyway).  ``None`` decodes at full resolution.
        max_decode_bytes: upper bound, bytes, on the memory the decode is
            estimated to need (:func:`estimate_decode_bytes`), checked before
            decoding; above it -> ``"too_large"``.
        memory_budget: the budget large decodes reserve their estimate from
            while they run; ``None`` uses the process-wide
            :func:`decode_memory_budget`.  An estimate above its capacity ->
            ``"too_large"``.

    Returns:
        A new, fully loaded ``PIL.Image.Image`` in mode ``"RGB"`` that holds no
        file handle: first frame of animations, EXIF orientation applied,
        transparency composited on white, 16-bit/32-bit/float greyscale scaled
        to 0..255, longer side centre-cropped to at most
        :data:`MAX_ASPECT_RATIO` times the shorter.  ``size`` is
        ``(width, height)`` in pixels, both >= 1.  ``info["original_size"]``
        is the file's ``(width, height)``, upright, before draft reduction
        and cropping.

    Raises:
        ImageError: with ``reason`` as listed in the module docstring.
        TypeError: ``source`` is none of the accepted types.
        ValueError: ``max_pixels``, ``draft_size`` or ``max_decode_bytes`` < 1
            (a caller bug; plain ``ValueError``, not ``ImageError``).
    """
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    if draft_size is not None and (
        isinstance(draft_size, bool) or not isinstance(draft_size, int) or draft_size < 1
    ):
        raise ValueError(f"draft_size must be a positive int or None, got {draft_size!r}")
    if isinstance(max_decode_bytes, bool) or not isinstance(max_decode_bytes, int) or max_decode_bytes < 1:
        raise ValueError(f"max_decode_bytes must be a positive int, got {max_decode_bytes!r}")
    limits = _Limits(max_pixels, draft_size, max_decode_bytes, memory_budget or decode_memory_budget())

    if isinstance(source, (str, os.PathLike)):
        label = os.fspath(source)
        if isinstance(label, bytes):
            label = os.fsdecode(label)
        try:
            fh = open(source, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError as exc:
            raise ImageError("not_found", f"{label}: no such file") from exc
        except OSError as exc:
            raise ImageError("not_found", f"{label}: cannot open: {exc.strerror or exc}") from exc
        with fh:
            if os.fstat(fh.fileno()).st_size == 0:
                raise ImageError("empty", f"{label}: file is empty (0 bytes)")
            return _decode(fh, label, limits)

    if isinstance(source, (bytes, bytearray, memoryview)):
        try:
            data = bytes(source)
        except MemoryError as exc:
            raise ImageError("too_large", "out of memory while copying the image data") from exc
        label = f"<{len(data)} bytes>"
        if not data:
            raise ImageError("empty", "image data is empty (0 bytes)")
        return _decode(io.BytesIO(data), label, limits)

    if isinstance(source, io.TextIOBase) or not hasattr(source, "read"):
        raise TypeError(
            "source must be a path, bytes or a binary file object, "
            f"not {type(source).__name__}"
        )

    label = str(getattr(source, "name", None) or f"<{type(source).__name__}>")
    fp: IO[bytes] = source
    try:
        fp.seek(0)
        seekable = True
    except (AttributeError, OSError, io.UnsupportedOperation):
        seekable = False
    if seekable:
        first = fp.read(1)
        fp.seek(0)
    else:  # a pipe or socket: Pillow needs random access, so buffer it
        try:
            fp = io.BytesIO(fp.read())
        except MemoryError as exc:
            raise ImageError("too_large", f"{label}: out of memory while reading the stream") from exc
        first = fp.read(1)
        fp.seek(0)
    if not first:
        raise ImageError("empty", f"{label}: image data is empty (0 bytes)")
    return _decode(fp, label, limits)


def image_from_bytes(data: bytes, **kw: Any) -> Image.Image:
    """``open_image`` on an in-memory encoded file (``bytes``-like).

    Same keyword arguments, return value and errors as :func:`open_image`;
    ``b""`` raises ``ImageError("empty")``.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes-like, not {type(data).__name__}")
    return open_image(bytes(data), **kw)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 (64 lowercase hex chars) of the file's bytes, read in 1 MiB chunks.

    Used for change detection.  Raises ``OSError`` (e.g. ``FileNotFoundError``)
    when the file cannot be read.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- decoding


class _Limits(NamedTuple):
    max_pixels: int
    draft_size: int | None
    max_decode_bytes: int
    budget: DecodeMemoryBudget


def _decode(fp: IO[bytes], label: str, limits: _Limits) -> Image.Image:
    """Decode the first frame of the stream ``fp`` into a detached RGB image, within ``limits``."""
    try:
        # No warnings.catch_warnings() here: it swaps process-wide state and is not
        # thread-safe before Python 3.14. Our own checks (_check_size, _admit) refuse
        # images over our limits; Pillow's DecompressionBombWarning (over its global
        # limit) is only a warning, and its DecompressionBombError is caught below.
        with contextlib.ExitStack() as held:
            # Pillow decodes ICO/ICNS frames, and allocates the WebP canvas, inside
            # Image.open; judge those files from their own headers before it runs.
            inner = _inner_frames(fp)
            reserved = None
            if inner is not None:
                reserved = max(_checked_cost(size, mode, False, extra, label, limits)
                               for size, mode, extra in inner)
                held.enter_context(limits.budget.reserve(reserved))
            with Image.open(fp) as im:
                if not isinstance(im, JpegImagePlugin.JpegImageFile):  # cannot be reduced
                    _check_size(im.size, limits.max_pixels, label)
                # Animated GIF/APNG/WebP: use the first frame.  Right after open
                # every plugin already sits on it.  PSD numbers its layers from 1
                # (seek(0) raises EOFError) and shows the merged composite until
                # a seek, so use the plugin's first frame number, as
                # PIL.ImageSequence does.
                first_frame = getattr(im, "_min_frame", 0)
                if im.tell() != first_frame:
                    im.seek(first_frame)
                full_size = im.size
                extra = _decoder_bytes(im, fp)
                if (
                    limits.draft_size is not None
                    and isinstance(im, JpegImagePlugin.JpegImageFile)
                    and min(im.size) > 2 * limits.draft_size
                ):
                    # Decoder-side 1/2, 1/4, 1/8 scaling; Pillow picks the largest
                    # factor that keeps both sides >= draft_size.  Only the tile
                    # changes here: im.size becomes the size the decoder will produce.
                    im.draft("RGB", (limits.draft_size, limits.draft_size))
                checked = im.size
                cost = _checked_cost(checked, im.mode, "transparency" in im.info, extra, label, limits)
                if reserved is None:
                    reserved = cost
                    held.enter_context(limits.budget.reserve(reserved))
                im.load()
                if im.size != checked:  # a header that understated the image
                    grown = _checked_cost(im.size, im.mode, "transparency" in im.info, extra, label, limits)
                    if grown > reserved:
                        raise ImageError(
                            "too_large",
                            f"{label}: decoded to {im.size[0]}x{im.size[1]} pixels, more than its "
                            f"header declared ({checked[0]}x{checked[1]})",
                        )
                upright = _exif_upright(im)
                out = _crop_aspect(_to_rgb(upright))
                if out is im:
                    out = im.copy()
                out.load()
                # The size of the file's image, upright, before any draft-mode reduction.
                turned = (upright.size != im.size) and upright.size == im.size[::-1]
                out.info["original_size"] = full_size[::-1] if turned else full_size
    except ImageError:
        raise
    except MemoryError as exc:
        raise ImageError("too_large", f"{label}: out of memory while decoding") from exc
    except UnidentifiedImageError as exc:
        raise _diagnose_unidentified(fp, label) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("decompression_bomb", f"{label}: {exc}") from exc
    except Exception as exc:  # anything a decoder throws on hostile data
        raise _classify(exc, label) from exc
    return out


def _check_size(size: tuple[int, int], max_pixels: int, label: str) -> None:
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


def _checked_cost(
    size: tuple[int, int], mode: str, transparency: bool, extra: int, label: str, limits: _Limits
) -> int:
    """:func:`_check_size`, then the decode's estimated bytes, refused above the byte limits."""
    _check_size(size, limits.max_pixels, label)
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
    """Upper estimate, in bytes, of the memory :func:`open_image` needs for one decode.

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
        convert, fixed = 6, 4 * 8 * _BAND_PIXELS
    elif transparency or mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        convert, fixed = 16, 0
    else:
        convert, fixed = 4, 0
    return pixels * (2 * stored + convert) + fixed + _DECODE_SLACK_BYTES + extra_bytes


def _crop_aspect(im: Image.Image) -> Image.Image:
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


# --------------------------------------------------------------------------- format headers

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JP2_MAGICS = (b"\xff\x4f\xff\x51", b"\x0d\x0a\x87\x0a", b"\x00\x00\x00\x0cjP  \x0d\x0a\x87\x0a")

#: Bytes per canvas pixel libwebp and Pillow's _webp module hold while decoding
#: a WebP: WebPAnimDecoder's current and previous canvases (RGBA, 4 + 4), the
#: lossless decoder's ARGB buffer (4) and the frame returned to Python as
#: ``bytes`` (4).  libwebp src/demux/anim_decode.c, src/dec/vp8l_dec.c.
_WEBP_DECODER_BYTES_PER_PIXEL = 16

#: Bytes per pixel of an embedded ICO/ICNS frame beyond the frame itself: its
#: conversion to RGBA with the AND mask (IcoImagePlugin.IcoFile.frame).
_CONTAINER_BYTES_PER_PIXEL = 8


def _inner_frames(fp: IO[bytes]) -> list[tuple[tuple[int, int], str, int]] | None:
    """``[(size, mode, extra_bytes), ...]`` for files Pillow decodes or allocates inside ``Image.open``.

    ICO and ICNS: every embedded image as its own header (PNG IHDR, BMP info
    header, JPEG 2000 SIZ) declares it, whatever the container's directory
    says.  WebP: the canvas from the VP8/VP8L/VP8X header.  ``None`` for
    every other format, and where these headers cannot be read (Pillow then
    reports what is wrong).  Leaves ``fp`` at 0, where ``Image.open`` starts.
    """
    try:
        fp.seek(0)
        head = fp.read(32)
        if head[:4] == b"\0\0\1\0":
            frames = _ico_frames(fp)
        elif head[:4] == b"icns":
            frames = _icns_frames(fp)
        elif head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            canvas = _webp_canvas(head)
            frames = None if canvas is None else [
                (canvas, "RGBA", canvas[0] * canvas[1] * _WEBP_DECODER_BYTES_PER_PIXEL)
            ]
        else:
            frames = None
    except MemoryError:
        raise
    except Exception:
        frames = None
    fp.seek(0)
    return frames or None


def _ico_frames(fp: IO[bytes]) -> list[tuple[tuple[int, int], str, int]]:
    """Size and mode of each image in an ICO, read from the embedded PNG or BMP header."""
    fp.seek(0)
    frames = []
    for entry in IcoImagePlugin.IcoFile(fp).entry:
        fp.seek(entry.offset)
        magic = fp.read(8)
        fp.seek(entry.offset)
        try:
            if magic == _PNG_MAGIC:
                frame = PngImagePlugin.PngImageFile(fp)
                size = frame.size
            else:  # a BMP info header; its height counts the AND mask too
                frame = BmpImagePlugin.DibImageFile(fp)
                size = (frame.size[0], (frame.size[1] + 1) // 2)
        except Exception:  # Pillow fails on this frame too, should it pick it
            continue
        frames.append((size, frame.mode, size[0] * size[1] * _CONTAINER_BYTES_PER_PIXEL))
    return frames


def _icns_frames(fp: IO[bytes]) -> list[tuple[tuple[int, int], str, int]]:
    """Size of each PNG or JPEG 2000 image in an ICNS (the other icon types have fixed sizes <= 128 px)."""
    fp.seek(0)
    frames = []
    for start, length in IcnsImagePlugin.IcnsFile(fp).dct.values():
        fp.seek(start)
        magic = fp.read(12)
        fp.seek(start)
        try:
            if magic.startswith(_PNG_MAGIC):
                size = PngImagePlugin.PngImageFile(fp).size
            elif magic.startswith(_JP2_MAGICS):
                size = Jpeg2KImagePlugin.Jpeg2KImageFile(io.BytesIO(fp.read(length))).size
            else:
                continue
        except Exception:
            continue
        frames.append((size, "RGBA", size[0] * size[1] * _CONTAINER_BYTES_PER_PIXEL))
    return frames


def _webp_canvas(head: bytes) -> tuple[int, int] | None:
    """``(width, height)`` of a WebP canvas from the first 30 bytes (RFC 9649, sections 2.5-2.7)."""
    if len(head) < 30:
        return None
    chunk = head[12:16]
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":  # lossy: 14-bit sizes after the start code
        return struct.unpack("<H", head[26:28])[0] & 0x3FFF, struct.unpack("<H", head[28:30])[0] & 0x3FFF
    if chunk == b"VP8L" and head[20] == 0x2F:  # lossless: 14-bit (size - 1) fields
        bits = struct.unpack("<I", head[21:25])[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":  # extended: 24-bit (canvas size - 1) fields
        return (int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1)
    return None


def _decoder_bytes(im: Image.Image, fp: IO[bytes]) -> int:
    """Working memory, bytes, the decoder of ``im`` holds beyond the decoded image.

    A JPEG that libjpeg must buffer (progressive, or a first scan without every
    component) keeps all its DCT coefficients, 2 bytes each, at full
    resolution whatever the draft scale (libjpeg ``jdcoefct.c``).  OpenJPEG
    keeps each decoded sample as an int32 (4 bytes).  Call before ``draft``.
    """
    if isinstance(im, JpegImagePlugin.JpegImageFile):
        if not _jpeg_buffers_coefficients(fp):
            return 0
        width, height = im.size
        layers = getattr(im, "layer", None) or [(None, 1, 1, 0)] * len(im.getbands())
        h_max = max(layer[1] for layer in layers) or 1
        v_max = max(layer[2] for layer in layers) or 1
        total = 0
        for _, h_samp, v_samp, _ in layers:
            blocks_x = -(-width * h_samp // (8 * h_max))
            blocks_y = -(-height * v_samp // (8 * v_max))
            total += blocks_x * blocks_y * 64 * 2
        return total
    if isinstance(im, Jpeg2KImagePlugin.Jpeg2KImageFile):
        return im.size[0] * im.size[1] * 4 * len(im.getbands())
    return 0


#: SOFn markers of progressive or hierarchical JPEG (ITU T.81, table B.1).
_BUFFERED_SOF = frozenset({0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_buffers_coefficients(fp: IO[bytes]) -> bool:
    """Whether libjpeg must hold the whole image's coefficients: a progressive or
    hierarchical frame, or a first scan that lacks some of the frame's components
    (ITU T.81 B.2).  Walks the marker segments up to the first SOS; leaves ``fp``
    where it was.  Unreadable markers count as buffered (the cautious answer)."""
    where = fp.tell()
    try:
        fp.seek(0)
        if fp.read(2) != b"\xff\xd8":
            return True
        components = None
        while True:
            byte = fp.read(1)
            if not byte:
                return True
            if byte != b"\xff":
                continue
            marker = fp.read(1)
            while marker == b"\xff":  # fill bytes
                marker = fp.read(1)
            if not marker:
                return True
            code = marker[0]
            if code == 0x01 or 0xD0 <= code <= 0xD8:  # no length field
                continue
            length_bytes = fp.read(2)
            if len(length_bytes) < 2:
                return True
            length = struct.unpack(">H", length_bytes)[0]
            if code in _SOF:
                if code in _BUFFERED_SOF:
                    return True
                segment = fp.read(length - 2)
                if len(segment) < 6:
                    return True
                components = segment[5]
            elif code == 0xDA:
                in_scan = fp.read(1)
                return components is None or not in_scan or in_scan[0] < components
            else:
                fp.seek(length - 2, io.SEEK_CUR)
    finally:
        fp.seek(where)


def _exif_upright(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag; broken EXIF means "leave as is"."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # unreadable EXIF (bad DPI rationals, bad offsets, ...)
        return im


def _classify(exc: BaseException, label: str) -> ImageError:
    """Map an exception raised while opening/decoding to an :class:`ImageError`."""
    text = str(exc) or type(exc).__name__
    lowered = text.lower()
    message = f"{label}: {text}"
    if "truncated" in lowered or isinstance(exc, (EOFError, struct.error)):
        return ImageError("truncated", message)
    if "decompressed data too large" in lowered:  # PNG text-chunk bombs
        return ImageError("decompression_bomb", message)
    if isinstance(exc, OSError) and "not available" in lowered:  # "decoder jpeg2k not available"
        return ImageError("unsupported", message)
    if isinstance(exc, (ValueError, KeyError)) and (
        "not supported" in lowered
        or "unsupported" in lowered
        or "unrecognized mode" in lowered
        or "unknown raw mode" in lowered
    ):
        return ImageError("unsupported", message)
    if isinstance(exc, MemoryError):
        return ImageError("too_large", f"{label}: out of memory while decoding")
    return ImageError("corrupt", message)


def _diagnose_unidentified(fp: IO[bytes], label: str) -> ImageError:
    """Say why Pillow could not identify ``fp``: not an image, zero size, or broken header.

    ``Image.open`` swallows each plugin's reason (unless the global
    ``WARN_POSSIBLE_FORMATS`` is set), so ask the plugins that accept the
    file's signature directly.
    """
    try:
        fp.seek(0)
        head = fp.read(32)
    except Exception:
        return ImageError("not_an_image", f"{label}: cannot identify image file")

    dims = _header_dims(head)
    if dims is not None and min(dims) == 0:
        return ImageError("zero_size", f"{label}: image header declares size {dims[0]}x{dims[1]}")

    Image.init()
    for fmt in list(Image.ID):
        factory, accept = Image.OPEN[fmt]
        if accept is None:  # such plugins claim everything; not informative
            continue
        try:
            verdict = accept(head[:16])
        except Exception:
            continue
        if isinstance(verdict, str):  # e.g. "... support not installed"
            return ImageError("unsupported", f"{label}: {verdict}")
        if not verdict:
            continue
        try:
            fp.seek(0)
            probe = factory(fp, "")
        except MemoryError:
            return ImageError("too_large", f"{label}: out of memory while reading the {fmt} header")
        except Exception as exc:
            # ImageFile wraps end-of-data errors as SyntaxError(cause).
            root = exc.__cause__ if exc.__cause__ is not None else exc
            if isinstance(root, (EOFError, struct.error)) or "truncated" in str(exc).lower():
                return ImageError(
                    "truncated", f"{label}: {fmt} header ends too early: {exc}"
                )
            return ImageError(
                "corrupt", f"{label}: looks like {fmt} but the header is broken: {exc}"
            )
        probe.close()
    return ImageError("not_an_image", f"{label}: not a recognised image format")


def _header_dims(head: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from a GIF or PNG header, else ``None``.

    Pillow refuses to open zero-sized images at all ("not identified by this
    driver"), so read the two formats where that happens in practice ourselves.
    """
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        return struct.unpack("<HH", head[6:10])
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and len(head) >= 24:
        return struct.unpack(">II", head[16:24])
    return None


# --------------------------------------------------------------------------- modes


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert a loaded image of any Pillow mode to RGB (may return ``im`` itself).

    * ``I;16*``, ``I``, ``F`` (16/32-bit and float greyscale): scaled to 0..255,
      see :func:`_wide_grey_to_l`;
    * anything with alpha or a transparency key (``RGBA``, ``RGBa``, ``LA``,
      ``La``, ``PA``, ``P``/``L``/``RGB`` + ``transparency``): composited over
      :data:`BACKGROUND` (white);
    * everything else (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``,
      ``HSV``, ``RGBX``...): ``Image.convert("RGB")``.
    """
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in ("I", "F") or mode.startswith("I;"):
        return _wide_grey_to_l(im).convert("RGB")
    if im.has_transparency_data:
        if mode == "La":  # premultiplied; Pillow only converts La -> LA
            im = im.convert("LA")
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return im.convert("RGB")


#: Rows of a wide greyscale image converted at a time are chosen so that one
#: band holds at most this many pixels (float64 working copies: 8 bytes each).
_BAND_PIXELS = 1 << 20


def _wide_grey_to_l(im: Image.Image) -> Image.Image:
    """Scale a 16-bit, 32-bit integer or float greyscale image to 8-bit ``L``.

    ``Image.convert("L")`` clips instead of scaling (a 16-bit value of 300
    becomes 255, so most 16-bit pictures turn white).  Instead:

    * integers >= 0: divide by ``2**b - 1`` and multiply by 255, where ``b`` is
      the bit length of the largest value, at least 8.  Full-range 16-bit data
      maps 0..65535 -> 0..255; 10/12-bit sensor data stored in 16-bit
      containers (common in TIFF) uses its own range instead of coming out
      black; data already in 0..255 is unchanged.
    * floats in [0, 1] are multiplied by 255; floats in [0, 255] kept;
    * anything else (negative values, larger floats): min-max stretched.
    NaN/inf become 0/the finite extremes.

    Works in bands of rows (:data:`_BAND_PIXELS`), so beyond ``im`` it needs
    only the 1-byte result and a few MB of float64, not 8 bytes per pixel.
    """
    width, height = im.size
    rows = max(1, _BAND_PIXELS // max(width, 1))
    bands = [(top, min(top + rows, height)) for top in range(0, height, rows)]

    def band(top: int, bottom: int) -> np.ndarray:
        part = im.crop((0, top, width, bottom))
        try:
            arr = np.asarray(part)
        except Exception:
            arr = np.asarray(part.convert("I"))
        return arr.astype(np.float64)

    lo = hi = None
    has_nan = has_posinf = has_neginf = False
    for top, bottom in bands:
        arr = band(top, bottom)
        finite = np.isfinite(arr)
        if not finite.all():
            has_nan |= bool(np.isnan(arr).any())
            has_posinf |= bool(np.isposinf(arr).any())
            has_neginf |= bool(np.isneginf(arr).any())
            arr = arr[finite]
        if arr.size:
            lo = float(arr.min()) if lo is None else min(lo, float(arr.min()))
            hi = float(arr.max()) if hi is None else max(hi, float(arr.max()))
    finite_lo, finite_hi = (lo, hi) if lo is not None else (0.0, 0.0)
    # Extremes after NaN -> 0, +inf -> finite max, -inf -> finite min.
    present = ([finite_lo, finite_hi] if lo is not None else []) + [0.0] * has_nan
    present += [finite_hi] * has_posinf + [finite_lo] * has_neginf
    lo, hi = (min(present), max(present)) if present else (0.0, 0.0)

    if im.mode == "F":
        if lo >= 0.0 and hi <= 1.0:
            scale, offset = 255.0, 0.0
        elif lo >= 0.0 and hi <= 255.0:
            scale, offset = 1.0, 0.0
        else:
            scale, offset = _stretch_factors(lo, hi)
    elif lo >= 0.0:
        bits = max(8, int(hi).bit_length())
        scale, offset = 255.0 / float((1 << bits) - 1), 0.0
    else:
        scale, offset = _stretch_factors(lo, hi)

    out = np.empty((height, width), np.uint8)
    for top, bottom in bands:
        arr = np.nan_to_num(band(top, bottom), nan=0.0, posinf=finite_hi, neginf=finite_lo)
        arr = (arr - offset) * scale
        out[top:bottom] = np.clip(np.rint(arr), 0, 255)
    return Image.fromarray(out)


def _stretch_factors(lo: float, hi: float) -> tuple[float, float]:
    """``(scale, offset)`` that map [lo, hi] onto [0, 255] as ``(x - offset) * scale``
    (a constant image maps to 0)."""
    if hi <= lo:
        return 0.0, lo
    return 255.0 / (hi - lo), lo
