"""Why an image cannot be used: :class:`ImageError`, its reasons, and the mapping of
decoder exceptions onto them.

:mod:`indexer.images` lists what each reason means; the decode-cost checks
(:mod:`indexer.decode_limits`) raise the same error, so it lives apart from both.
"""
from __future__ import annotations

import stat
import struct
from typing import IO

from PIL import Image

__all__ = ["REASONS", "SOURCE_REASONS", "ImageError", "PhotoUnavailable", "check_not_special_file", "classify_error",
           "diagnose_unidentified"]

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


#: The reasons that say where the photo lives failed, not the image: :class:`PhotoUnavailable`.
SOURCE_REASONS = frozenset({"not_found", "unreadable", "download_failed"})


class PhotoUnavailable(ImageError):
    """The photo's bytes could not be read: a missing file, a permission or I/O error, a failed
    download (``reason`` in :data:`SOURCE_REASONS`). A problem of where the photo lives, not of the
    image, which may be fine: a retry, a mount or a fixed path can bring it back. Still an
    :class:`ImageError`, so code that handles every unusable photo alike needs no change."""

    def __init__(self, reason: str, message: str):
        if reason not in SOURCE_REASONS:
            raise ValueError(f"PhotoUnavailable is for {sorted(SOURCE_REASONS)}, not {reason!r}")
        super().__init__(reason, message)


def check_not_special_file(mode: int, label: str) -> None:
    """Raise ImageError (``not_an_image``) for an ``os.stat`` mode that is neither a regular file nor a
    folder: opening a FIFO waits for a writer, and reading a device never ends."""
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise ImageError("not_an_image", f"{label} is not a regular file (a FIFO, socket or device)")


def classify_error(exc: BaseException, label: str) -> ImageError:
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


def diagnose_unidentified(fp: IO[bytes], label: str) -> ImageError:
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
