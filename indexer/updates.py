"""Live catalogue updates: add or replace one product with its photos, change its metadata, delete it.

Each call is one atomic store transaction (see :mod:`indexer.store`): a concurrent search
sees the product entirely before or entirely after the change, never half-written.
Used by the server's ``/v1/products`` routes and by ``lookalike add`` / ``lookalike delete``.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass

from PIL import Image

from .catalogue import reserved_id_problem, text_problem
from .errors import LookalikeError, NotFound
from .images import DEFAULT_MAX_PIXELS, ImageError, image_from_bytes
from .model import ClipModel
from .store import PhotoRecord, Product, Store

MAX_PHOTOS_PER_PRODUCT = 64
MAX_ID_LENGTH = 512
#: Limits on a product's metadata, checked before anything is written (a JSON object).
MAX_METADATA_BYTES = 64 * 1024  # as UTF-8 JSON
MAX_METADATA_DEPTH = 8  # {"a": {"b": [1]}} has depth 3
MAX_TEXT_LENGTH = 2000  # title and category, in characters


@dataclass
class PhotoUpload:
    """A photo to store: its bytes, and where it lives (``source``; None = keep a copy in the index)."""

    data: bytes
    source: str | None = None
    filename: str = ""


def decode_upload(data: bytes, model: ClipModel, max_pixels: int, what: str):
    """Decode uploaded image bytes for ``model``: an RGB PIL image. Errors a client caused become a
    LookalikeError: 400 (empty, not an image, broken), 413 (too many pixels); ``what`` names the upload."""
    if not data:
        raise LookalikeError(f"{what}: the file is empty", code="empty", http_status=400)
    try:
        return image_from_bytes(data, max_pixels=max_pixels, draft_size=model.draft_size)
    except ImageError as e:
        status = 413 if e.reason in ("too_large", "decompression_bomb") else 400
        raise LookalikeError(f"{what}: {e}", code=e.reason, http_status=status) from None


def _bad(message: str) -> LookalikeError:
    return LookalikeError(message, code="bad_product", http_status=422)


def _check_text(name: str, value: str, identifier: bool = False) -> None:
    """Raise a 422 unless SQLite and JSON can store and return ``value``: the catalogue's own rule
    (:func:`indexer.catalogue.text_problem`), so a row and an upload are judged alike."""
    problem = text_problem(value, identifier)
    if problem:
        raise _bad(f"{name} {problem}")


def validate_product_id(product_id) -> str:
    """The id, stripped. Raises LookalikeError (422) for an empty or overlong id, control
    characters, invalid text, or an id the HTTP routes cannot address
    (:func:`indexer.catalogue_rows.reserved_id_problem`)."""
    if not isinstance(product_id, str) or not product_id.strip():
        raise _bad("a product needs a non-empty string 'id'")
    _check_text("product id", product_id, identifier=True)
    if len(product_id) > MAX_ID_LENGTH:
        raise _bad(f"product id must be at most {MAX_ID_LENGTH} characters")
    product_id = product_id.strip()
    routed = reserved_id_problem(product_id)
    if routed:
        raise _bad(routed)
    return product_id


def validate_product(product: Product) -> Product:
    """Check everything about a product before it is written, so that what commits can always be
    read back: the id (:func:`validate_product_id`), title and category (strings of at most
    :data:`MAX_TEXT_LENGTH` characters), and metadata: a JSON object of finite numbers, strings,
    booleans, nulls, lists and objects, at most :data:`MAX_METADATA_DEPTH` deep and
    :data:`MAX_METADATA_BYTES` as JSON. Returns the product with its id stripped; raises
    LookalikeError (422, ``bad_product``) naming the first problem."""
    pid = validate_product_id(product.id)
    for name, value in (("title", product.title), ("category", product.category)):
        if value is None:
            continue
        if not isinstance(value, str):
            raise _bad(f"{name} must be a string")
        if len(value) > MAX_TEXT_LENGTH:
            raise _bad(f"{name} is longer than {MAX_TEXT_LENGTH} characters")
        _check_text(name, value)
    if not isinstance(product.metadata, dict):
        raise _bad("metadata must be a JSON object")
    _check_value(product.metadata, "metadata", 1)
    size = len(json.dumps(product.metadata, ensure_ascii=False).encode("utf-8"))
    if size > MAX_METADATA_BYTES:
        raise _bad(f"metadata is {size} bytes as JSON; the limit is {MAX_METADATA_BYTES}")
    return Product(pid, product.title, product.category, product.metadata)


def _check_value(value, where: str, depth: int) -> None:
    if depth > MAX_METADATA_DEPTH:
        raise _bad(f"metadata is nested more than {MAX_METADATA_DEPTH} levels deep (at {where})")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise _bad(f"metadata keys must be strings (at {where})")
            _check_text(f"{where} key", key)
            _check_value(item, f"{where}.{key}", depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_value(item, f"{where}[{i}]", depth + 1)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise _bad(f"{where} is {value}: numbers must be finite")
    elif isinstance(value, str):
        _check_text(where, value)
    elif not (value is None or isinstance(value, (bool, int))):
        raise _bad(f"{where} has a value of type {type(value).__name__}, which JSON cannot hold")


def _upload_name(data: bytes, sha: str) -> str:
    """File name for an uploaded photo: its content hash and the extension of its detected format
    (never the client's file name: a PNG sent as ``x.sh`` is stored as ``SHA.png``)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = (im.format or "").upper()
    except Exception:  # decoded fine earlier; only the name is at stake
        fmt = ""
    ext = {"JPEG": "jpg", "MPO": "jpg", "TIFF": "tif", "JPEG2000": "jp2"}.get(fmt, fmt.lower())
    return f"{sha}.{ext if ext.isalnum() and ext else 'img'}"


def upsert_product(store: Store, model: ClipModel, product: Product, photos: list[PhotoUpload],
                   max_pixels: int = DEFAULT_MAX_PIXELS, deadline: float | None = None) -> tuple[dict, bool]:
    """Create or replace a product. With photos, they replace all of the product's photos;
    without, only its title, category and metadata change (a new product needs photos).

    Every photo is decoded and embedded before anything is written: one bad photo refuses
    the whole request (LookalikeError with the photo's reason). ``deadline``: see
    :meth:`indexer.store.Store.transaction` (IndexBusy past it). Returns (product, created).
    """
    product = validate_product(product)
    pid = product.id
    if len(photos) > MAX_PHOTOS_PER_PRODUCT:
        raise LookalikeError(f"at most {MAX_PHOTOS_PER_PRODUCT} photos per product", code="too_many_photos")
    exists = store.has_product(pid)
    if not exists and not photos:
        raise LookalikeError(f"product {pid!r} is new: give at least one photo", code="bad_product")
    records = []
    for n, photo in enumerate(photos):
        image = decode_upload(photo.data, model, max_pixels, f"cannot use photo {n + 1} ({photo.filename or 'upload'})")
        sha = hashlib.sha256(photo.data).hexdigest()
        vec = model.embed_images([image])[0]
        w, h = image.info.get("original_size", image.size)
        records.append((photo, sha, vec, w, h))
    with store.transaction(deadline) as tx:
        created = not store.has_product(pid)
        if created and not records:
            raise NotFound(f"product {pid!r} was deleted meanwhile")
        tx.upsert_products([product])
        if records:
            # uploads are written inside the transaction: a concurrent delete's clean-up waits for it
            rows = [PhotoRecord(pid, photo.source or store.keep_upload(photo.data, _upload_name(photo.data, sha)),
                                sha, vec, len(photo.data), None, w, h, {})
                    for photo, sha, vec, w, h in records]
            old = store.get_product(pid)["images"] if not created else []
            tx.delete_photos([p["photo_id"] for p in old])
            tx.add_photos(rows)
            tx.release_uploads(p["image"] for p in old)
    return store.get_product(pid), created


def patch_product(store: Store, product_id: str, title=None, category=None, metadata: dict | None = None,
                  deadline: float | None = None) -> dict:
    """Change a product's title, category, or metadata keys (a key set to None is removed). Raises NotFound,
    or IndexBusy past ``deadline`` (:meth:`indexer.store.Store.transaction`)."""
    with store.transaction(deadline) as tx:  # read inside the write transaction: no lost update
        current = store.get_product(product_id)
        merged = dict(current["metadata"])
        for key, value in (metadata or {}).items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
        tx.upsert_products([validate_product(Product(product_id, current["title"] if title is None else title,
                                                     current["category"] if category is None else category, merged))])
    return store.get_product(product_id)


def delete_product(store: Store, product_id: str, deadline: float | None = None) -> None:
    """Delete a product and its photos' vectors. Raises NotFound, or IndexBusy past ``deadline``
    (:meth:`indexer.store.Store.transaction`)."""
    with store.transaction(deadline) as tx:
        sources = [p[0] for p in tx.db.execute("SELECT source FROM photos WHERE product_id = ?", (product_id,))]
        if not tx.delete_products([product_id]):
            raise NotFound(f"no product with id {product_id!r}")
        tx.release_uploads(sources)
