"""Colour modes: turn a decoded Pillow image of any mode into 8-bit RGB.

Alpha and transparency keys are composited on white, and 16-bit, 32-bit and
float greyscale is scaled (not clipped) to 0..255.  :func:`indexer.images.open_image`
calls :func:`to_rgb` on every image it returns.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["BACKGROUND", "GREY_BAND_PIXELS", "to_rgb"]

#: Transparent pixels are composited onto this colour (product photos sit on white).
BACKGROUND = (255, 255, 255)


def to_rgb(im: Image.Image) -> Image.Image:
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
GREY_BAND_PIXELS = 1 << 20


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

    Works in bands of rows (:data:`GREY_BAND_PIXELS`), so beyond ``im`` it needs
    only the 1-byte result and a few MB of float64, not 8 bytes per pixel.
    """
    width, height = im.size
    rows = max(1, GREY_BAND_PIXELS // max(width, 1))
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
