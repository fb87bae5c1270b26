"""What an index stores and returns, with no storage code: the model identity, products, photos,
search hits, and the store's errors. Importing it costs no torch, FAISS or SQLite, so tools
that only read an index's records (``lookalike info``) stay light.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import LookalikeError

#: Stored JSON (metadata) read back deeper than this is not returned (written data is capped lower,
#: see indexer.updates.MAX_METADATA_DEPTH; this guards indexes written before that check).
MAX_READ_DEPTH = 32


class StoreError(LookalikeError):
    code = "index_error"


class IndexLocked(StoreError):
    """Another process (``lookalike index``, a server) holds the index's write lock."""

    code = "index_locked"
    http_status = 409


class IndexNotWritable(IndexLocked):
    """The index folder cannot be written at all (a read-only file system or folder): its write
    lock cannot even be created. A server serves such an index read-only, as a locked one."""

    code = "index_not_writable"
    http_status = 403


class IndexBusy(StoreError):
    """A write waited longer than it may for its turn (a server's write slot, the index's write lock,
    SQLite's): another write, a snapshot, an index rebuild or another process holds it, or the disk
    under it has stalled. Nothing was written; the same request may be sent again later
    (``retry_after_s``: the server's ``Retry-After``)."""

    code = "index_busy"
    http_status = 503
    retry_after_s = 5


class IncompleteIndex(StoreError):
    """The index directory's database exists but its creation never committed."""


class ModelMismatch(LookalikeError):
    code = "model_mismatch"
    http_status = 409


@dataclass(frozen=True)
class ModelIdentity:
    """What an index records about the model that made its vectors.

    ``weights_sha256`` is the SHA-256 of every parameter and buffer tensor of the
    loaded model, in state-dict key order, as float32 bytes: it identifies the
    weights whatever file format or source they came from.
    """

    name: str
    pretrained: str | None
    weights_sha256: str
    dim: int
    image_size: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelIdentity:
        return cls(**{k: d.get(k) for k in ("name", "pretrained", "weights_sha256", "dim", "image_size")})

    def same_weights(self, other: ModelIdentity) -> bool:
        return self.weights_sha256 == other.weights_sha256 and self.dim == other.dim


@dataclass
class Product:
    """A catalogue product: ``id`` plus optional title, category and free metadata."""

    id: str
    title: str | None = None
    category: str | None = None
    metadata: dict = field(default_factory=dict)


@dataclass
class PhotoRecord:
    """A photo of a product ready to store; ``vector`` is float32 ``(dim,)`` with unit norm."""

    product_id: str
    source: str
    sha256: str
    vector: np.ndarray
    size: int | None = None
    mtime_ns: int | None = None
    width: int | None = None
    height: int | None = None
    metadata: dict = field(default_factory=dict)


@dataclass
class KnownPhoto:
    photo_id: int
    sha256: str
    size: int | None
    mtime_ns: int | None


@dataclass
class Hit:
    """One search result: a product, its score (cosine of its best photo) and that photo."""

    product_id: str
    score: float
    photo_id: int
    source: str
    title: str | None
    category: str | None
    metadata: dict
    label: str | None = None
    label_score: float | None = None
    photo_metadata: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "id": self.product_id,
            "score": self.score,
            "title": self.title,
            "category": self.category,
            "image": self.source,
            "photo_id": self.photo_id,
            "image_metadata": self.photo_metadata,
            "metadata": self.metadata,
            "label": self.label,
            "label_score": self.label_score,
        }


def stored_json(text: str | None) -> dict:
    """A stored JSON object made safe to return whatever was stored: non-finite numbers become
    None, strings with lone surrogates have them replaced, and a value nested deeper than
    :data:`MAX_READ_DEPTH`, unparsable or not an object gives ``{}``."""
    try:
        value = json.loads(text or "{}", parse_constant=lambda _: None)
    except (ValueError, RecursionError):
        return {}
    try:
        value = _safe_value(value, 0)
    except RecursionError:
        return {}
    return value if isinstance(value, dict) else {}


def _safe_value(value, depth: int):
    if depth > MAX_READ_DEPTH:
        raise RecursionError
    if isinstance(value, dict):
        return {_safe_value(str(k), depth + 1): _safe_value(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_safe_value(v, depth + 1) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "replace").decode("utf-8")
    return value


def mismatch_message(path, stored: ModelIdentity, given: ModelIdentity) -> str:
    return (
        f"{path} was built with model {stored.name} (pretrained={stored.pretrained}, dim {stored.dim}, "
        f"weights {stored.weights_sha256[:12]}), not {given.name} (pretrained={given.pretrained}, dim {given.dim}, "
        f"weights {given.weights_sha256[:12]}). Use the same --model/--pretrained, or index into a new directory."
    )


# the files of an index directory besides the database (indexer.database.DB_NAME) and the FAISS
# snapshots (indexer.vectors.snapshot_path)
MANIFEST_NAME = "manifest.json"
REPORT_NAME = "report.json"
#: Photos uploaded through the API live in ``INDEX_DIR/uploads/``; their source is this prefix and
#: the path under the index directory, so the index can move and the server start from anywhere.
INDEX_SOURCE_PREFIX = "index:"
UPLOADS_DIR = "uploads"
