"""Image sizes and decoder buffers read from file headers, before Pillow decodes anything.

Pillow decodes ICO and ICNS frames, and allocates the WebP canvas, inside
``Image.open``; :func:`inner_frames` reads those sizes from the embedded
images' own headers first.  :func:`decoder_bytes` estimates the working
memory a JPEG or JPEG 2000 decoder holds beyond the decoded image.  Both feed
the cost checks in :mod:`indexer.decode_limits`.
"""
from __future__ import annotations

import io
import struct
from typing import IO

from PIL import (
    BmpImagePlugin,
    IcnsImagePlugin,
    IcoImagePlugin,
    Image,
    Jpeg2KImagePlugin,
    JpegImagePlugin,
    PngImagePlugin,
)

__all__ = ["MAX_JPEG_SCANS", "decoder_bytes", "inner_frames", "jpeg_scans"]

#: A JPEG with more scans (SOS markers) than this is refused before decoding. A progressive JPEG's
#: decoder runs over all of its coefficients once per scan, so a small file of thousands of tiny
#: scans costs minutes of CPU at any pixel count (the crafted-JPEG denial of service of the Cure53
#: audit of libjpeg-turbo, 2019; NVIDIA's nvImageCodec refuses more than 256 scans by default,
#: NVIMGCODEC_MAX_JPEG_SCANS). Encoders write 1 to 3 scans for a baseline JPEG, about 10 for a
#: progressive one (libjpeg's default script) and at most a few dozen (mozjpeg's optimised scans).
MAX_JPEG_SCANS = 100

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


def inner_frames(fp: IO[bytes]) -> list[tuple[tuple[int, int], str, int]] | None:
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


def decoder_bytes(im: Image.Image, fp: IO[bytes]) -> int:
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


def jpeg_scans(fp: IO[bytes], stop_after: int = MAX_JPEG_SCANS) -> int:
    """The number of SOS markers (``FF DA``) in a JPEG stream, counting stops past ``stop_after``.

    Entropy-coded data never holds ``FF DA`` (a coded ``FF`` byte is followed by ``00``; restart
    markers are ``FF D0``-``FF D7``), so every match is a scan header, or one of an embedded EXIF
    thumbnail's few. Reads the stream in 1 MiB chunks from its start and restores its position.
    """
    pos = fp.tell()
    fp.seek(0)
    count, tail = 0, b""
    try:
        while count <= stop_after:
            chunk = fp.read(1 << 20)
            if not chunk:
                break
            count += (tail + chunk).count(b"\xff\xda")
            tail = chunk[-1:] if chunk[-1:] == b"\xff" else b""
    finally:
        fp.seek(pos)
    return count
