"""Composed queries ("like this, but in red") and region search ("find the bag in this photo").

A composed query is one point of the joint image-text space: the normalised weighted sum of the
photo's unit embedding and the text's, minus the negative text's (the "text arithmetic" of
composed image retrieval's zero-shot baselines, e.g. Baldrati et al. 2022, "Effective conditioned
and composed image retrieval combining CLIP-based features", sec. 3):

    q = normalise((1 - w) * photo + w * text - w * negative)

``w`` (``text_weight``) is in [0, 1]: 0 is the photo alone, 1 the text alone. The default,
:data:`DEFAULT_TEXT_WEIGHT`, and the alternative we measured against it (re-ranking the photo's
neighbours by the text) are in ``scripts/eval_composed.py`` and the README.

A region query embeds only a box of the photo: :func:`parse_box` reads ``x0,y0,x1,y1`` in pixels
of the upright photo (after EXIF orientation) or, when all four values are in [0, 1], in
fractions of its width and height; :func:`crop_box` checks it against the photo and crops the
decoded image (which may be draft-reduced, see :func:`indexer.images.open_image`). The CLI and the
server both go through these functions.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .errors import LookalikeError

#: The default ``text_weight``: measured by ``scripts/eval_composed.py`` on Magento with
#: lookalike-base (README, "Composed queries").
DEFAULT_TEXT_WEIGHT = 0.7
#: Longest ``text`` / ``negative_text`` of a composed query, in characters (the text search's own cap).
MAX_QUERY_TEXT_CHARS = 1000
#: A box must be at least this many pixels wide and high in the photo: smaller ones hold too little
#: for the model (it resizes the box to its input, 224 px for lookalike-base).
MIN_BOX_SIDE = 8
#: A box's value at most this long, in characters ("x0,y0,x1,y1").
MAX_BOX_CHARS = 200
#: One box value: an ASCII decimal number, optionally with an exponent and surrounding spaces. Python's
#: float() alone would also take "nan", "inf", "1_000" and non-ASCII digits
#: ("١٠٠", "１００"), which a client almost certainly did not mean.
_BOX_NUMBER = re.compile(r"\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\s*", re.ASCII)
#: Characters no query text may hold: C0/C1 controls except tab and line breaks, lone surrogates (undecodable
#: bytes on a command line) and U+FFFD (bytes that were not UTF-8, replaced by the server's form decoder).
_UNUSABLE_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufffd]")


class QueryError(LookalikeError):
    """A composed or region query the client got wrong (HTTP 422)."""

    code = "bad_query"
    http_status = 422


# ------------------------------------------------------------------ composed queries
def check_text_weight(weight: float) -> float:
    """``weight`` as a float in [0, 1]. Raises QueryError otherwise (NaN too)."""
    try:
        w = float(weight)
    except (TypeError, ValueError):
        raise QueryError(f"text_weight must be a number between 0 and 1, got {weight!r}") from None
    if not 0.0 <= w <= 1.0:  # False for NaN
        raise QueryError(f"text_weight must be between 0 and 1, got {weight!r}")
    return w


def query_text(text: str | None, name: str = "text") -> str | None:
    """``text`` stripped, or None when it was not given. Raises QueryError when it is given but empty
    (or only spaces), longer than :data:`MAX_QUERY_TEXT_CHARS`, or holds a control character, a NUL or
    bytes that were not UTF-8; ``name`` names the field."""
    if text is None:
        return None
    bad = _UNUSABLE_TEXT.search(text)
    if bad:
        ch = bad.group()
        what = "bytes that are not UTF-8" if ch >= "\ud800" else f"the control character U+{ord(ch):04X}"
        raise QueryError(f"{name} holds {what} at character {bad.start() + 1}; send plain UTF-8 words")
    stripped = text.strip()
    if not stripped:
        raise QueryError(f"{name} is empty: give some words, or leave {name} out")
    if len(stripped) > MAX_QUERY_TEXT_CHARS:
        raise QueryError(f"{name} is {len(stripped)} characters long; at most {MAX_QUERY_TEXT_CHARS} are allowed")
    return stripped


def embed_query_text(model, text: str, name: str = "text") -> np.ndarray:
    """The unit embedding ``(1, dim)`` float32 of ``text`` (checked by :func:`query_text`). Raises QueryError
    when the model knows none of its words (its text tower returns the zero vector, as lookalike-base does
    for words outside its GloVe vocabulary): such a text would silently weigh nothing."""
    checked = query_text(text, name)
    vec = model.embed_texts([checked])
    if not np.linalg.norm(vec[0]) > 0.5:
        raise QueryError(f"{name} {checked[:80]!r} has no word the model knows; try other words")
    return vec


def compose(photos: np.ndarray, text: np.ndarray | None = None, negative: np.ndarray | None = None,
            text_weight: float = DEFAULT_TEXT_WEIGHT, photo_only: slice | None = None) -> np.ndarray:
    """Composed query vectors: ``normalise((1 - w) * photos + w * text - w * negative)``.

    photos: float32 ``(n, dim)`` unit rows (one query per row; a product's photos for similar);
    text, negative: float32 ``(1, dim)`` unit rows or None (left out of the sum);
    text_weight: ``w`` in [0, 1] (QueryError otherwise);
    photo_only: the dimensions no text uses (:attr:`indexer.model.ClipModel.photo_only_dims`, e.g.
    lookalike-base's luma signature) or None. With a text, they are zeroed in the photos and the
    rows renormalised first: the words ask for another look ("in red"), and a part that only photos
    carry would pin the query to the photo's own colours, which no words can move (on Magento colour
    queries, ``scripts/eval_composed.py``: 0.57 with them, 0.70 without, 2026-12-02).
    Returns float32 ``(n, dim)`` unit rows; a row that sums to (almost) zero falls back to the
    photo's own vector.
    """
    w = check_text_weight(text_weight)
    photos = np.asarray(photos, dtype=np.float32)
    base = photos
    if photo_only is not None and (text is not None or negative is not None):
        base = photos.copy()
        base[:, photo_only] = 0
        norms = np.linalg.norm(base, axis=1, keepdims=True)
        base = np.where(norms > 1e-6, base / np.maximum(norms, 1e-12), photos)
    q = (1.0 - w) * base
    if text is not None:
        q = q + w * np.asarray(text, np.float32)
    if negative is not None:
        q = q - w * np.asarray(negative, np.float32)
    norms = np.linalg.norm(q, axis=1, keepdims=True)
    out = np.where(norms > 1e-6, q / np.maximum(norms, 1e-12), photos)
    return np.ascontiguousarray(out, dtype=np.float32)


def composer(model, text: str | None, negative_text: str | None,
             text_weight: float | None = None) -> Callable[[np.ndarray], np.ndarray] | None:
    """A function that turns photo vectors ``(n, dim)`` into composed queries with ``text`` and
    ``negative_text`` (embedded and checked once, here), or None when neither is given (plain photo
    search). ``text_weight`` None means :data:`DEFAULT_TEXT_WEIGHT`. Raises QueryError for a bad
    weight or text, and for a weight given with neither text (it would weigh nothing), before any
    search runs."""
    w = check_text_weight(DEFAULT_TEXT_WEIGHT if text_weight is None else text_weight)
    if text is None and negative_text is None:
        if text_weight is not None:
            raise QueryError("text_weight weighs text and negative_text: give one of them too, "
                             "or leave text_weight out")
        return None
    pos = embed_query_text(model, text, "text") if text is not None else None
    neg = embed_query_text(model, negative_text, "negative_text") if negative_text is not None else None
    photo_only = getattr(model, "photo_only_dims", None)
    return lambda photos: compose(photos, pos, neg, w, photo_only)


# ------------------------------------------------------------------ region search
@dataclass(frozen=True)
class Box:
    """A box ``x0, y0, x1, y1`` (left, top, right, bottom; right and bottom exclusive) on the upright
    photo, in pixels or, when ``fractions``, in fractions of its width and height."""

    x0: float
    y0: float
    x1: float
    y1: float
    fractions: bool

    def pixels(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The box in pixels of a ``width`` x ``height`` photo."""
        if self.fractions:
            return self.x0 * width, self.y0 * height, self.x1 * width, self.y1 * height
        return self.x0, self.y0, self.x1, self.y1


def parse_box(value: str) -> Box:
    """Read ``"x0,y0,x1,y1"``: four finite ASCII decimal numbers (``12``, ``0.5``, ``1e3``; spaces around
    them allowed; no NaN, infinity, hex, ``_`` or non-ASCII digits), ``x0 < x1`` and ``y0 < y1``, none
    negative. All four in [0, 1]: fractions of the photo's width and height (``0,0,1,1`` is the whole
    photo); otherwise pixels (a pixel box within [0, 1] would be under :data:`MIN_BOX_SIDE` anyway).
    Raises QueryError."""
    if not isinstance(value, str) or len(value) > MAX_BOX_CHARS:
        raise QueryError(f"box must be 'x0,y0,x1,y1' (at most {MAX_BOX_CHARS} characters)")
    parts = value.split(",")
    if len(parts) != 4:
        raise QueryError(f"box must be four numbers 'x0,y0,x1,y1', got {value[:80]!r}")
    if not all(_BOX_NUMBER.fullmatch(p) for p in parts):
        raise QueryError("box must be four numbers 'x0,y0,x1,y1', each a finite plain ASCII decimal (no NaN, "
                         f"infinity, hex, '_' or non-ASCII digits), got {value[:80]!r}")
    x0, y0, x1, y1 = (float(p) for p in parts)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise QueryError("box values must be finite numbers (no NaN or infinity)")
    if min(x0, y0, x1, y1) < 0:
        raise QueryError(f"box values must not be negative, got {value[:80]!r}")
    if x1 <= x0 or y1 <= y0:
        raise QueryError(f"box must have x0 < x1 and y0 < y1 (left, top, right, bottom), got {value[:80]!r}")
    return Box(x0, y0, x1, y1, fractions=max(x0, y0, x1, y1) <= 1.0)


def crop_box(image: Image.Image, box: Box) -> Image.Image:
    """The part of ``image`` inside ``box``, as a new RGB image.

    image: decoded by :func:`indexer.images.open_image`; its ``info["original_size"]`` (the file's upright
    size) is the frame a pixel box is measured in, and the decoded image may be smaller (JPEG draft
    decoding) or centre-cropped (aspect ratio past :data:`indexer.images.MAX_ASPECT_RATIO`): the box is
    mapped onto it. Raises QueryError when the box reaches past the photo's edges, is under
    :data:`MIN_BOX_SIDE` pixels on a side, or lies outside the part of the photo that was decoded.
    """
    width, height = image.info.get("original_size", image.size)
    x0, y0, x1, y1 = box.pixels(width, height)
    if x1 > width + 1e-6 or y1 > height + 1e-6:
        raise QueryError(f"box {_fmt(x0, y0, x1, y1)} reaches past the photo, which is {width}x{height} pixels")
    if x1 - x0 < MIN_BOX_SIDE or y1 - y0 < MIN_BOX_SIDE:
        raise QueryError(f"box {_fmt(x0, y0, x1, y1)} is too small: give at least {MIN_BOX_SIDE}x{MIN_BOX_SIDE} "
                         "pixels of the photo")
    dw, dh = image.size
    scale = max(dw / width, dh / height)  # the draft factor; the cropped side has the smaller ratio
    off_x, off_y = (width * scale - dw) / 2, (height * scale - dh) / 2
    left, right = max(0, math.floor(x0 * scale - off_x)), min(dw, math.ceil(x1 * scale - off_x))
    top, bottom = max(0, math.floor(y0 * scale - off_y)), min(dh, math.ceil(y1 * scale - off_y))
    if right - left < 1 or bottom - top < 1:
        raise QueryError(f"box {_fmt(x0, y0, x1, y1)} lies in the part of this very long photo that is cut off "
                         "before search; choose a box nearer its middle")
    return image.crop((left, top, right, bottom))


def _fmt(*values: float) -> str:
    return ",".join(f"{v:g}" for v in values)
