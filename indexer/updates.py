"""Live catalogue updates: add or replace one product with its photos, change its metadata, delete it.

Each call is one atomic store transaction (see :mod:`indexer.store`): a concurrent search
sees the product entirely before or entirely after the change, never half-written.
Used by the server's ``/v1/products`` routes and by ``lookalike add`` / ``lookalike delete``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .errors import LookalikeError, NotFound
from .images import DEFAULT_MAX_PIXELS, ImageError, image_from_bytes
from .model import ClipModel
from .store import PhotoRecord, Product, Store, atomic_write

MAX_PHOTOS_PER_PRODUCT = 64
MAX_ID_LENGTH = 512


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


def validate_product_id(product_id) -> str:
    if not isinstance(product_id, str) or not product_id.strip():
        raise LookalikeError("a product needs a non-empty string 'id'", code="bad_product")
    if len(product_id) > MAX_ID_LENGTH or any(ord(c) < 32 for c in product_id):
        raise LookalikeError(f"product id must be at most {MAX_ID_LENGTH} printable characters", code="bad_product")
    return product_id.strip()


def _keep_copy(store: Store, data: bytes, sha: str, filename: str) -> str:
    """Write an uploaded photo under ``INDEX_DIR/uploads/`` (named by content hash) and return its path."""
    folder = store.path / "uploads"
    folder.mkdir(exist_ok=True)
    ext = Path(filename).suffix.lower()
    if not ext or len(ext) > 6 or not ext[1:].isalnum():
        ext = ".img"
    path = folder / f"{sha}{ext}"
    if not path.exists():
        atomic_write(path, data)
    return str(path)


def upsert_product(store: Store, model: ClipModel, product: Product, photos: list[PhotoUpload],
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[dict, bool]:
    """Create or replace a product. With photos, they replace all of the product's photos;
    without, only its title, category and metadata change (a new product needs photos).

    Every photo is decoded and embedded before anything is written: one bad photo refuses
    the whole request (LookalikeError with the photo's reason). Returns (product, created).
    """
    pid = validate_product_id(product.id)
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
    rows = []
    for photo, sha, vec, w, h in records:
        source = photo.source or _keep_copy(store, photo.data, sha, photo.filename)
        rows.append(PhotoRecord(pid, source, sha, vec, len(photo.data), None, w, h, {}))
    product = Product(pid, product.title, product.category, product.metadata)
    with store.transaction() as tx:
        created = not store.has_product(pid)
        if created and not rows:
            raise NotFound(f"product {pid!r} was deleted meanwhile")
        tx.upsert_products([product])
        if rows:
            old = [p["photo_id"] for p in store.get_product(pid)["images"]]
            tx.delete_photos(old)
            tx.add_photos(rows)
    return store.get_product(pid), created


def patch_product(store: Store, product_id: str, title=None, category=None, metadata: dict | None = None) -> dict:
    """Change a product's title, category, or metadata keys (a key set to None is removed). Raises NotFound."""
    with store.transaction() as tx:  # read inside the write transaction: no lost update
        current = store.get_product(product_id)
        merged = dict(current["metadata"])
        for key, value in (metadata or {}).items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
        tx.upsert_products([Product(product_id, current["title"] if title is None else title,
                                    current["category"] if category is None else category, merged)])
    return store.get_product(product_id)


def delete_product(store: Store, product_id: str) -> None:
    """Delete a product and its photos' vectors. Raises NotFound."""
    with store.transaction() as tx:
        if not tx.delete_products([product_id]):
            raise NotFound(f"no product with id {product_id!r}")
