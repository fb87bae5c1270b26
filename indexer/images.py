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

This module opens and decodes; the pieces it calls live beside it, each
re-exported here so callers import everything from ``indexer.images``:
:mod:`indexer.image_errors` (:class:`ImageError`, the reasons, classifying
decoder failures), :mod:`indexer.decode_limits` (the limits, the estimate, the
memory budget), :mod:`indexer.image_headers` (sizes read from ICO, ICNS, WebP
and JPEG headers) and :mod:`indexer.image_colour` (conversion to RGB).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
from typing import IO, Any, Union

from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from .decode_limits import (
    DECODE_MEMORY_ENV,
    DEFAULT_MAX_DECODE_BYTES,
    DEFAULT_MAX_PIXELS,
    MAX_ASPECT_RATIO,
    SMALL_DECODE_BYTES,
    DecodeLimits,
    DecodeMemoryBudget,
    check_size,
    checked_cost,
    crop_aspect,
    decode_memory_budget,
    estimate_decode_bytes,
    set_decode_memory_budget,
)
from .image_colour import BACKGROUND, to_rgb
from .image_errors import (
    REASONS,
    SOURCE_REASONS,
    ImageError,
    PhotoUnavailable,
    check_not_special_file,
    classify_error,
    diagnose_unidentified,
)
from .image_headers import MAX_JPEG_SCANS, decoder_bytes, inner_frames, jpeg_scans

__all__ = [
    "BACKGROUND",
    "DECODE_MEMORY_ENV",
    "DEFAULT_MAX_DECODE_BYTES",
    "DEFAULT_MAX_PIXELS",
    "MAX_ASPECT_RATIO",
    "REASONS",
    "SMALL_DECODE_BYTES",
    "DecodeMemoryBudget",
    "ImageError",
    "PhotoUnavailable",
    "SOURCE_REASONS",
    "decode_memory_budget",
    "estimate_decode_bytes",
    "file_sha256",
    "image_from_bytes",
    "open_image",
    "set_decode_memory_budget",
]

_CHUNK = 1 << 20  # 1 MiB

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, IO[bytes]]

# The private names these helpers had before they moved out of this module; tests call them here.
_classify, _decoder_bytes, _to_rgb = classify_error, decoder_bytes, to_rgb


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
    limits = DecodeLimits(max_pixels, draft_size, max_decode_bytes, memory_budget or decode_memory_budget())

    if isinstance(source, (str, os.PathLike)):
        label = os.fspath(source)
        if isinstance(label, bytes):
            label = os.fsdecode(label)
        try:
            check_not_special_file(os.stat(source).st_mode, label)
            fh = open(source, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError as exc:
            raise PhotoUnavailable("not_found", f"{label}: no such file") from exc
        except OSError as exc:
            raise PhotoUnavailable("not_found", f"{label}: cannot open: {exc.strerror or exc}") from exc
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


def _decode(fp: IO[bytes], label: str, limits: DecodeLimits) -> Image.Image:
    """Decode the first frame of the stream ``fp`` into a detached RGB image, within ``limits``."""
    try:
        # No warnings.catch_warnings() here: it swaps process-wide state and is not
        # thread-safe before Python 3.14. Our own checks (check_size, checked_cost) refuse
        # images over our limits; Pillow's DecompressionBombWarning (over its global
        # limit) is only a warning, and its DecompressionBombError is caught below.
        with contextlib.ExitStack() as held:
            # Pillow decodes ICO/ICNS frames, and allocates the WebP canvas, inside
            # Image.open; judge those files from their own headers before it runs.
            inner = inner_frames(fp)
            reserved = None
            if inner is not None:
                reserved = max(checked_cost(size, mode, False, extra, label, limits)
                               for size, mode, extra in inner)
                held.enter_context(limits.budget.reserve(reserved))
            with Image.open(fp) as im:
                if not isinstance(im, JpegImagePlugin.JpegImageFile):  # cannot be reduced
                    check_size(im.size, limits.max_pixels, label)
                elif (scans := jpeg_scans(fp)) > MAX_JPEG_SCANS:
                    raise ImageError("decompression_bomb", f"{label}: a JPEG of more than {MAX_JPEG_SCANS} scans "
                                                           f"({scans} counted so far): decoding it would take minutes")
                # Animated GIF/APNG/WebP: use the first frame.  Right after open
                # every plugin already sits on it.  PSD numbers its layers from 1
                # (seek(0) raises EOFError) and shows the merged composite until
                # a seek, so use the plugin's first frame number, as
                # PIL.ImageSequence does.
                first_frame = getattr(im, "_min_frame", 0)
                if im.tell() != first_frame:
                    im.seek(first_frame)
                full_size = im.size
                extra = decoder_bytes(im, fp)
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
                cost = checked_cost(checked, im.mode, "transparency" in im.info, extra, label, limits)
                if reserved is None:
                    reserved = cost
                    held.enter_context(limits.budget.reserve(reserved))
                im.load()
                if im.size != checked:  # a header that understated the image
                    grown = checked_cost(im.size, im.mode, "transparency" in im.info, extra, label, limits)
                    if grown > reserved:
                        raise ImageError(
                            "too_large",
                            f"{label}: decoded to {im.size[0]}x{im.size[1]} pixels, more than its "
                            f"header declared ({checked[0]}x{checked[1]})",
                        )
                upright = _exif_upright(im)
                out = crop_aspect(to_rgb(upright))
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
        raise diagnose_unidentified(fp, label) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("decompression_bomb", f"{label}: {exc}") from exc
    except Exception as exc:  # anything a decoder throws on hostile data
        raise classify_error(exc, label) from exc
    return out


def _exif_upright(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag; broken EXIF means "leave as is"."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # unreadable EXIF (bad DPI rationals, bad offsets, ...)
        return im
