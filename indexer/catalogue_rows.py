"""What a catalogue reader produces: photo rows, products, the rows refused and why, and the
text rules every reader applies.

The rules are those of :mod:`indexer.catalogue`'s docstring: a value that cannot be stored
faithfully is refused row by row, never cleaned. :func:`image_suffixes` is the other thing the
readers share: which file names count as photos.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import LookalikeError

#: Product ids may not end with these: ``GET /v1/products/{id}/image`` and ``.../similar`` would
#: read another route, and the product could never be read back over HTTP.
RESERVED_ID_SUFFIXES = ("/image", "/similar")
#: Nor be one of these: a browser (and httpx) resolves ``/v1/products/../image`` to ``/v1/image``, even
#: with the dots percent-encoded (WHATWG URL standard, "single-dot / double-dot path segment").
RESERVED_IDS = (".", "..")


def reserved_id_problem(product_id: str) -> str | None:
    """Why ``product_id`` cannot be a product id because of the HTTP routes, or None."""
    pid = product_id.strip()
    if pid.endswith(RESERVED_ID_SUFFIXES):
        return f"product id {printable(pid)!r} may not end with {' or '.join(RESERVED_ID_SUFFIXES)} (those are routes)"
    if pid in RESERVED_IDS:
        return f"product id may not be {pid!r}: browsers resolve it away, it could never be read over HTTP"
    return None

# Pillow registers these extensions for formats it can only write.
_WRITE_ONLY_FORMATS = frozenset({"PDF", "PALM"})
# NUL and lone surrogates (Python's stand-ins for undecodable bytes): no field may hold them.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
# C0 and C1 control characters and DEL: not in ids, image sources or file names.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


class CatalogueError(LookalikeError):
    code = "bad_catalogue"


@dataclass
class ColumnMap:
    """Which manifest columns hold the product id, image, title and category."""

    id: str = "id"
    image: str = "image"
    title: str = "title"
    category: str = "category"


@dataclass
class CatalogueRow:
    """One photo of one product. ``where`` locates the row for reports (``file:line``)."""

    product_id: str
    source: str
    where: str
    metadata: dict = field(default_factory=dict)  # this row's extra columns


@dataclass
class RowProblem:
    where: str
    reason: str
    message: str
    product_id: str | None = None

    def __post_init__(self) -> None:
        # these end up in report.json and on the terminal: keep them printable and encodable
        self.where, self.message = printable(self.where), printable(self.message)
        if self.product_id is not None:
            self.product_id = printable(self.product_id)

    def to_dict(self) -> dict:
        return {"where": self.where, "id": self.product_id, "reason": self.reason, "message": self.message}


@dataclass
class Catalogue:
    rows: list[CatalogueRow] = field(default_factory=list)
    # id -> {"title", "category", "metadata"}; metadata holds the columns all the product's rows share
    products: dict[str, dict] = field(default_factory=dict)
    problems: list[RowProblem] = field(default_factory=list)

    def add(self, product_id: str, source: str, where: str, title=None, category=None, metadata=None,
            reason: str = "bad_text") -> bool:
        """Add a photo row. The first row of a product sets its title, category and metadata; a
        later row with another title or category is reported (the first is kept). Other columns
        may differ between a product's photos (colour, view): each photo keeps its own.

        A row with text that cannot be stored (see the module docstring) is not added but
        reported with ``reason``; returns whether the row was added."""
        problem = _row_text_problem(product_id, source, title, category, metadata)
        if not problem and (routed := reserved_id_problem(product_id)):
            problem, reason = routed, "bad_id"
        if problem:
            self.problems.append(RowProblem(where, reason, problem, product_id))
            return False
        info = {"title": clean_text(title), "category": clean_text(category), "metadata": dict(metadata or {})}
        known = self.products.get(product_id)
        if known is None:
            self.products[product_id] = info
        else:
            # product metadata = the columns all its rows agree on; the rest is per photo
            known["metadata"] = {k: v for k, v in known["metadata"].items() if info["metadata"].get(k) == v}
            diff = [k for k in ("title", "category") if info[k] is not None and info[k] != known[k]]
            if diff:
                self.problems.append(
                    RowProblem(where, "conflicting_metadata",
                               f"product {product_id!r} already has another {' and '.join(diff)} "
                               f"({', '.join(repr(known[k]) for k in diff)}); the first row's is kept", product_id)
                )
        self.rows.append(CatalogueRow(product_id, source, where, metadata or {}))
        return True


def printable(text: str) -> str:
    """``text`` with undecodable bytes shown as ``\\xNN``, other lone surrogates as ``\\uNNNN`` and
    control characters escaped as Python writes them, for reports and terminal output."""
    if not _CONTROL.search(text):
        return text
    out = []
    for ch in text:
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:  # os.fsdecode / surrogateescape stand-in for the byte o - 0xDC00
            out.append(f"\\x{o - 0xDC00:02x}")
        elif 0xD800 <= o <= 0xDFFF:
            out.append(f"\\u{o:04x}")
        elif _CONTROL.match(ch):
            out.append(repr(ch)[1:-1])
        else:
            out.append(ch)
    return "".join(out)


def text_problem(value: str, identifier: bool = False) -> str | None:
    """Why ``value`` cannot be stored as given, or None. ``identifier``: an id, image source or
    file name, which may hold no control character at all; free text may hold tabs and line breaks."""
    bad = (_CONTROL if identifier else _UNSTORABLE).search(value)
    if bad is None:
        return None
    ch = bad.group()
    if "\ud800" <= ch <= "\udfff":
        return f"is not valid UTF-8 text: undecodable bytes or a lone surrogate ('{printable(value)}')"
    if ch == "\x00":
        return f"holds a NUL character ('{printable(value)}')"
    return f"holds a control character ('{printable(value)}')"


def _row_text_problem(product_id, source, title, category, metadata) -> str | None:
    fields = [("id", product_id, True), ("image", source, True), ("title", title, False), ("category", category, False)]
    for key, value in (metadata or {}).items():
        fields += [("a column name", str(key), False), (f"column {str(key)!r}", value, False)]
    for name, value, identifier in fields:
        if isinstance(value, str):
            problem = text_problem(value, identifier)
            if problem:
                return f"{name} {problem}"
    return None


def clean_text(value) -> str | None:
    """``value`` as text without surrounding white space; None for None or blank text."""
    if value is None:
        return None
    value = str(value).strip()
    return value or None


def image_suffixes() -> frozenset[str]:
    """The file name extensions (lower case, with the dot) of every format Pillow can open."""
    from PIL import Image

    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt not in _WRITE_ONLY_FORMATS)
