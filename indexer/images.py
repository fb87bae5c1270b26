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
    The header declares more than ``2 * max_pixels`` pixels, or Pillow's own
    guard fired (``DecompressionBombError``/``DecompressionBombWarning``).
``too_large``
    The header declares more than ``max_pixels`` but at most
    ``2 * max_pixels`` pixels (the same 1x/2x split Pillow uses for its
    warning/error).
``zero_size``
    The header declares a width or height of 0.
``corrupt``
    Recognised format, but the header or the compressed data is broken.
``unsupported``
    A format or pixel mode this Pillow build cannot decode or convert.
"""
from __future__ import annotations

import hashlib
import io
import os
import struct
from typing import IO, Any, Union

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageError",
    "REASONS",
    "open_image",
    "image_from_bytes",
    "file_sha256",
]

#: Refuse images whose header declares more pixels than this (about 8000 x 8000).
DEFAULT_MAX_PIXELS = 64_000_000

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


# --------------------------------------------------------------------------- public API


def open_image(
    source: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = 448,
) -> Image.Image:
    """Open, fully decode and normalise one image.

    Args:
        source: a filesystem path (``str`` or ``os.PathLike``), the encoded file
            as ``bytes``/``bytearray``/``memoryview``, or a binary file object
            (read from position 0, as Pillow does; left open for the caller).
        max_pixels: upper bound on ``width * height`` as declared by the header,
            checked before any pixel data is decoded.  Above ``max_pixels`` ->
            ``"too_large"``, above ``2 * max_pixels`` -> ``"decompression_bomb"``.
            Pillow's own global limit (``Image.MAX_IMAGE_PIXELS``, about 179 Mpx
            by default) still applies on top and also yields
            ``"decompression_bomb"``.
        draft_size: for JPEGs whose shorter side exceeds ``2 * draft_size`` px,
            let the decoder downscale by 1/2, 1/4 or 1/8 while decoding, keeping
            both sides >= ``draft_size`` px (fast, and CLIP resizes to 224 or so
            anyway).  ``None`` decodes at full resolution.

    Returns:
        A new, fully loaded ``PIL.Image.Image`` in mode ``"RGB"`` that holds no
        file handle: first frame of animations, EXIF orientation applied,
        transparency composited on white, 16-bit/32-bit/float greyscale scaled
        to 0..255.  ``size`` is ``(width, height)`` in pixels, both >= 1.

    Raises:
        ImageError: with ``reason`` as listed in the module docstring.
        TypeError: ``source`` is none of the accepted types.
        ValueError: ``max_pixels`` < 1 or ``draft_size`` < 1 (a caller bug;
            plain ``ValueError``, not ``ImageError``).
    """
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    if draft_size is not None and (
        isinstance(draft_size, bool) or not isinstance(draft_size, int) or draft_size < 1
    ):
        raise ValueError(f"draft_size must be a positive int or None, got {draft_size!r}")

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
            return _decode(fh, label, max_pixels, draft_size)

    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        label = f"<{len(data)} bytes>"
        if not data:
            raise ImageError("empty", "image data is empty (0 bytes)")
        return _decode(io.BytesIO(data), label, max_pixels, draft_size)

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
        fp = io.BytesIO(fp.read())
        first = fp.read(1)
        fp.seek(0)
    if not first:
        raise ImageError("empty", f"{label}: image data is empty (0 bytes)")
    return _decode(fp, label, max_pixels, draft_size)


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


def _decode(fp: IO[bytes], label: str, max_pixels: int, draft_size: int | None) -> Image.Image:
    """Decode the first frame of the stream ``fp`` into a detached RGB image."""
    try:
        # No warnings.catch_warnings() here: it swaps process-wide state and is not
        # thread-safe before Python 3.14. Our own header check (_check_size) refuses
        # images over max_pixels; Pillow's DecompressionBombWarning (over its global
        # limit) is only a warning, and its DecompressionBombError is caught below.
        with Image.open(fp) as im:
            _check_size(im.size, max_pixels, label)
            # Animated GIF/APNG/WebP: use the first frame.  Right after open
            # every plugin already sits on it.  PSD numbers its layers from 1
            # (seek(0) raises EOFError) and shows the merged composite until
            # a seek, so use the plugin's first frame number, as
            # PIL.ImageSequence does.
            first_frame = getattr(im, "_min_frame", 0)
            if im.tell() != first_frame:
                im.seek(first_frame)
                _check_size(im.size, max_pixels, label)
            full_size = im.size
            if (
                draft_size is not None
                and isinstance(im, JpegImagePlugin.JpegImageFile)
                and min(im.size) > 2 * draft_size
            ):
                # Decoder-side 1/2, 1/4, 1/8 scaling; Pillow picks the largest
                # factor that keeps both sides >= draft_size.
                im.draft("RGB", (draft_size, draft_size))
            im.load()
            upright = _exif_upright(im)
            out = _to_rgb(upright)
            if out is im:
                out = im.copy()
            out.load()
            # The size of the file's image, upright, before any draft-mode reduction.
            turned = (upright.size != im.size) and upright.size == im.size[::-1]
            out.info["original_size"] = full_size[::-1] if turned else full_size
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise _diagnose_unidentified(fp, label) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("decompression_bomb", f"{label}: {exc}") from exc
    except Exception as exc:  # anything a decoder throws on hostile data
        raise _classify(exc, label) from exc
    return out


def _check_size(size: tuple[int, int], max_pixels: int, label: str) -> None:
    """Guard on the header's ``(width, height)`` before any pixel is decoded."""
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
    """
    try:
        arr = np.asarray(im)
    except Exception:
        arr = np.asarray(im.convert("I"))
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        finite = arr[np.isfinite(arr)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        arr = np.nan_to_num(arr, nan=0.0, posinf=hi, neginf=lo)
    lo, hi = float(arr.min()), float(arr.max())
    if im.mode == "F":
        if lo >= 0.0 and hi <= 1.0:
            arr = arr * 255.0
        elif not (lo >= 0.0 and hi <= 255.0):
            arr = _stretch(arr, lo, hi)
    elif lo >= 0.0:
        bits = max(8, int(hi).bit_length())
        arr = arr * (255.0 / float((1 << bits) - 1))
    else:
        arr = _stretch(arr, lo, hi)
    out = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(out)


def _stretch(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linearly map [lo, hi] onto [0, 255] (constant images become 0)."""
    if hi <= lo:
        return np.zeros_like(arr)
    return (arr - lo) * (255.0 / (hi - lo))
