"""The SQLite layer of an index: schema, per-thread connections, transactions and every query.

SQLite is the index's source of truth: products, photos with their embeddings, and ``meta`` rows
(format, model identity, ``generation``, index type). A write transaction bumps ``generation``;
the FAISS index (:mod:`indexer.vectors`) records the generation it reflects. Nothing here
touches FAISS.

Connections are per thread (``sqlite3`` objects must not be shared across threads while in use)
and in WAL mode, so readers never block the one writer. Transactions are explicit: autocommit
mode, ``BEGIN IMMEDIATE`` for writes (:meth:`Database.write_txn`), ``BEGIN`` for a consistent
read of several queries (:meth:`Database.read_txn`).
"""
from __future__ import annotations

import json
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .errors import NotFound
from .records import IndexBusy, KnownPhoto, PhotoRecord, Product, StoreError, stored_json

DB_NAME = "catalogue.sqlite"
_CATEGORY_SEPARATOR = re.compile(r"\s*[/>]\s*")
#: SQLite limits bound parameters per statement (999 in older builds): queries go in chunks.
CHUNK = 900

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS products (
    id          TEXT PRIMARY KEY,
    title       TEXT,
    category    TEXT,
    metadata    TEXT NOT NULL DEFAULT '{}',  -- JSON object: every other catalogue column
    label       TEXT,                        -- top zero-shot label (lookalike label INDEX)
    label_score REAL,                        -- its probability
    updated_at  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS products_category ON products(category);
CREATE TABLE IF NOT EXISTS photos (
    photo_id   INTEGER PRIMARY KEY AUTOINCREMENT,  -- the FAISS id; never reused
    product_id TEXT NOT NULL REFERENCES products(id) ON DELETE CASCADE,
    source     TEXT NOT NULL,      -- path, URL or shard.tar::member, as the catalogue names it
    sha256     TEXT NOT NULL,      -- of the file's bytes
    size       INTEGER,            -- bytes, for the cheap unchanged check
    mtime_ns   INTEGER,
    width      INTEGER,
    height     INTEGER,
    metadata   TEXT NOT NULL DEFAULT '{}',  -- JSON: the catalogue row's own columns (colour, view, ...)
    vector     BLOB NOT NULL,      -- float32 little-endian, dim values, unit L2 norm
    UNIQUE (product_id, source)
);
CREATE INDEX IF NOT EXISTS photos_product ON photos(product_id);
"""


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def category_parts(path: str) -> tuple[str, ...]:
    """A category path's parts, casefolded: ``Men/Tops``, ``men / tops`` and ``Men > Tops`` are all
    ``("men", "tops")`` (``/`` and ``>`` are the separators retail exports use)."""
    return tuple(p for p in _CATEGORY_SEPARATOR.split(path.strip().casefold()) if p)


def in_category(value: str | None, wanted: str) -> bool:
    """Whether category ``value`` is ``wanted`` or below it (``Men > Tops`` is in ``men``), case-insensitively."""
    if not value:
        return False
    have, want = category_parts(value), category_parts(wanted)
    return bool(want) and have[: len(want)] == want


log = logging.getLogger("lookalike.store")

#: seconds: a store operation that waits on the disk or on the write lock this long or longer is logged
#: (a warning naming it), so that a stalled disk shows in the log rather than as requests that hang
SLOW_IO_S = 1.0


#: seconds SQLite waits for a lock another connection holds (its busy timeout) before it gives up;
#: a write transaction that gives up raises IndexBusy
SQLITE_BUSY_TIMEOUT_S = 30.0


def warn_if_slow(what: str, started: float) -> None:
    """Log a warning when ``time.perf_counter() - started`` >= :data:`SLOW_IO_S`."""
    took = time.perf_counter() - started
    if took >= SLOW_IO_S:
        log.warning("%s took %.1f s", what, took, extra={"seconds": round(took, 3)})


def _chunks(items: Sequence, size: int = CHUNK) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class Database:
    """The SQLite file of an index directory, read-only or read-write. Thread-safe: each thread
    gets its own connection; :meth:`make_writable` reopens them all read-write."""

    def __init__(self, path: Path, writable: bool):
        self.file = Path(path) / DB_NAME
        self.writable = writable
        self._local = threading.local()
        self._epoch = 0  # bumped by make_writable: per-thread connections reopen

    def conn(self) -> sqlite3.Connection:
        """This thread's connection (autocommit mode; ``foreign_keys`` on; WAL when writable)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "epoch", 0) != self._epoch:
            conn.close()
            conn = None
        if conn is None:
            uri = self.file.resolve().as_uri() + ("" if self.writable else "?mode=ro")
            conn = sqlite3.connect(uri, uri=True, timeout=SQLITE_BUSY_TIMEOUT_S, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA foreign_keys = ON")
            if self.writable:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = FULL")
            self._local.conn = conn
            self._local.epoch = self._epoch
        return conn

    def make_writable(self) -> None:
        self.writable = True
        self._epoch += 1

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # ------------------------------------------------------------ transactions
    @contextmanager
    def read_txn(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: every query inside sees the same committed state (WAL snapshot
        isolation), so a generation read inside matches the rows read inside."""
        db = self.conn()
        if db.in_transaction:
            yield db
            return
        db.execute("BEGIN")
        try:
            yield db
        finally:
            db.execute("COMMIT")

    @contextmanager
    def write_txn(self, deadline: float | None = None) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``; ROLLBACK on any exception (re-raised). Raises IndexBusy
        when another connection keeps SQLite's write lock past ``deadline`` (:func:`time.monotonic`; it
        replaces SQLite's busy timeout for this BEGIN, longer or shorter), or with None past
        :data:`SQLITE_BUSY_TIMEOUT_S`: the change is not written."""
        db = self.conn()
        t0 = time.perf_counter()
        if deadline is not None:  # SQLite's busy handler waits this long at most, then SQLITE_BUSY
            wait_ms = max(0, int((deadline - time.monotonic()) * 1000))
            db.execute(f"PRAGMA busy_timeout = {wait_ms}")
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e):
                raise
            raise IndexBusy(f"another connection held the index database's write lock for "
                            f"{time.perf_counter() - t0:.1f} s ({e}); the change was not written, try again "
                            "later") from None
        finally:
            if deadline is not None:
                db.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        warn_if_slow("waiting for SQLite's write lock (BEGIN IMMEDIATE)", t0)
        try:
            yield db
            t0 = time.perf_counter()
            db.execute("COMMIT")
            warn_if_slow("a SQLite COMMIT (its fsync)", t0)
        except BaseException:
            # after some errors (SQLITE_FULL, SQLITE_IOERR) SQLite has already rolled back, and a
            # second ROLLBACK would raise and hide the error that matters
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def create_schema(self, meta: dict[str, str]) -> None:
        """Create the tables (idempotent) and write every ``meta`` row in one transaction."""
        db = self.conn()
        db.executescript(SCHEMA)
        with self.write_txn():
            for key, value in meta.items():
                db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # -------------------------------------------------------------------- meta
    def meta(self) -> dict[str, str]:
        return dict(self.conn().execute("SELECT key, value FROM meta").fetchall())

    def set_meta(self, key: str, value: str) -> None:
        self.conn().execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def generation(self) -> int:
        row = self.conn().execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(row[0])

    def bump_generation(self) -> None:
        """Inside an open write transaction: the next generation, and the time of the change."""
        db = self.conn()
        db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
        db.execute("UPDATE meta SET value = ? WHERE key = 'updated_at'", (now(),))

    # --------------------------------------------------------------- products
    def count_products(self) -> int:
        return self.conn().execute("SELECT COUNT(*) FROM products").fetchone()[0]

    def count_photos(self) -> int:
        return self.conn().execute("SELECT COUNT(*) FROM photos").fetchone()[0]

    def product_ids(self) -> list[str]:
        return [r[0] for r in self.conn().execute("SELECT id FROM products ORDER BY id")]

    def has_product(self, product_id: str) -> bool:
        return self.conn().execute("SELECT 1 FROM products WHERE id = ?", (product_id,)).fetchone() is not None

    def categories(self) -> list[tuple[str, int]]:
        """Every category with its number of products, most common first."""
        rows = self.conn().execute(
            "SELECT category, COUNT(*) FROM products WHERE category IS NOT NULL AND category != '' "
            "GROUP BY category ORDER BY COUNT(*) DESC, category"
        )
        return [(r[0], r[1]) for r in rows]

    def get_product(self, product_id: str) -> dict:
        """The product with its photos. Raises NotFound."""
        db = self.conn()
        row = db.execute(
            "SELECT id, title, category, metadata, label, label_score, updated_at FROM products WHERE id = ?",
            (product_id,),
        ).fetchone()
        if row is None:
            raise NotFound(f"no product with id {product_id!r}")
        photos = db.execute(
            "SELECT photo_id, source, sha256, width, height, metadata FROM photos "
            "WHERE product_id = ? ORDER BY photo_id",
            (product_id,),
        ).fetchall()
        return {
            "id": row[0],
            "title": row[1],
            "category": row[2],
            "metadata": stored_json(row[3]),
            "label": row[4],
            "label_score": row[5],
            "updated_at": row[6],
            "images": [
                {"photo_id": p[0], "image": p[1], "sha256": p[2], "width": p[3], "height": p[4],
                 "metadata": stored_json(p[5])}
                for p in photos
            ],
        }

    def product_rows(self, product_ids: Sequence[str]) -> dict[str, tuple]:
        """product id -> (id, title, category, metadata JSON, label, label_score), for those that exist."""
        rows: dict[str, tuple] = {}
        for chunk in _chunks(list(product_ids)):
            q = ("SELECT id, title, category, metadata, label, label_score FROM products "
                 f"WHERE id IN ({','.join('?' * len(chunk))})")
            rows.update({r[0]: r for r in self.conn().execute(q, chunk)})
        return rows

    def category_photo_ids(self, category: str) -> np.ndarray:
        """int64 ids, ascending, of the photos of products in ``category`` or below it (:func:`in_category`)."""
        cats = [c for (c,) in self.conn().execute("SELECT DISTINCT category FROM products") if in_category(c, category)]
        out: list[int] = []
        for chunk in _chunks(cats):
            q = ("SELECT photos.photo_id FROM photos JOIN products ON products.id = photos.product_id "
                 f"WHERE products.category IN ({','.join('?' * len(chunk))})")
            out.extend(r[0] for r in self.conn().execute(q, chunk))
        return np.array(sorted(out), dtype=np.int64)

    # ----------------------------------------------------------------- photos
    def known_photos(self) -> dict[tuple[str, str], KnownPhoto]:
        """(product_id, source) -> what is stored for that photo, for change detection."""
        rows = self.conn().execute("SELECT product_id, source, photo_id, sha256, size, mtime_ns FROM photos")
        return {(r[0], r[1]): KnownPhoto(r[2], r[3], r[4], r[5]) for r in rows}

    def first_sources(self, n: int) -> list[str]:
        """The sources of the ``n`` oldest photos (lowest photo ids)."""
        rows = self.conn().execute("SELECT source FROM photos ORDER BY photo_id LIMIT ?", (int(n),))
        return [r[0] for r in rows]

    def photo_ids(self) -> np.ndarray:
        """int64 ``(n,)`` ascending: every photo id."""
        cur = self.conn().execute("SELECT photo_id FROM photos ORDER BY photo_id")
        return np.fromiter((r[0] for r in cur), dtype=np.int64)

    def photo_info(self, photo_ids: Sequence[int]) -> dict[int, tuple[str, str, str]]:
        """photo id -> (product id, source, metadata JSON), for those that exist."""
        out: dict[int, tuple[str, str, str]] = {}
        for chunk in _chunks(list(photo_ids)):
            q = ("SELECT photo_id, product_id, source, metadata FROM photos "
                 f"WHERE photo_id IN ({','.join('?' * len(chunk))})")
            out.update({r[0]: (r[1], r[2], r[3]) for r in self.conn().execute(q, chunk)})
        return out

    def vectors(self, photo_ids: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """The stored embeddings of ``photo_ids`` that exist: (ids int64 ``(m,)`` ascending,
        float32 ``(m, dim)``). Deleted photos are left out."""
        found: list[int] = []
        blobs: list[bytes] = []
        wanted = [int(i) for i in np.unique(photo_ids)]
        for chunk in _chunks(wanted):
            q = (f"SELECT photo_id, vector FROM photos WHERE photo_id IN ({','.join('?' * len(chunk))}) "
                 "ORDER BY photo_id")
            for pid, blob in self.conn().execute(q, chunk):
                found.append(pid)
                blobs.append(blob)
        vecs = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), dim)
        return np.array(found, dtype=np.int64), vecs

    def all_vectors(self, batch: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every stored embedding in photo-id order, in batches: (ids int64 ``(b,)``, float32 ``(b, dim)``)."""
        cur = self.conn().execute("SELECT photo_id, vector FROM photos ORDER BY photo_id")
        while rows := cur.fetchmany(batch):
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            yield ids, np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1)

    def product_vectors(self, product_id: str, dim: int) -> np.ndarray:
        """float32 ``(n_photos, dim)`` embeddings of a product's photos. Raises NotFound."""
        rows = self.conn().execute("SELECT vector FROM photos WHERE product_id = ? ORDER BY photo_id", (product_id,))
        blobs = [r[0] for r in rows]
        if not blobs:
            if not self.has_product(product_id):
                raise NotFound(f"no product with id {product_id!r}")
            return np.zeros((0, dim), np.float32)
        return np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), -1).copy()

    def iter_products(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (product_id, photo vectors ``(n, dim)``) for every product with photos."""
        cur = self.conn().execute("SELECT product_id, vector FROM photos ORDER BY product_id, photo_id")
        current, blobs = None, []
        for pid, blob in cur:
            if pid != current and blobs:
                yield current, np.frombuffer(b"".join(blobs), np.float32).reshape(len(blobs), -1)
                blobs = []
            current = pid
            blobs.append(blob)
        if blobs:
            yield current, np.frombuffer(b"".join(blobs), np.float32).reshape(len(blobs), -1)

    def audit_rows(self) -> tuple[list[tuple[int, str, str, str]], dict[str, tuple[str | None, str | None]]]:
        """For :mod:`indexer.audit`, from one consistent read: every photo as (photo id, product id,
        source, sha256) in photo-id order, and product id -> (title, category) of every product."""
        with self.read_txn() as db:
            photos = db.execute("SELECT photo_id, product_id, source, sha256 FROM photos ORDER BY photo_id").fetchall()
            products = {r[0]: (r[1], r[2]) for r in db.execute("SELECT id, title, category FROM products")}
        return photos, products

    def source_referenced(self, source: str) -> bool:
        return self.conn().execute("SELECT 1 FROM photos WHERE source = ? LIMIT 1", (source,)).fetchone() is not None


class Batch:
    """Changes made inside :meth:`indexer.store.Store.transaction`: SQLite statements on the open
    transaction, and the photo ids added (with their vectors) and removed, for the FAISS update."""

    def __init__(self, db: sqlite3.Connection, dim: int):
        self.db = db
        self.dim = dim
        self.changed = False
        self.added_ids: list[int] = []
        self.added_vecs: list[np.ndarray] = []
        self.removed_ids: set[int] = set()
        #: photo sources whose uploaded files :meth:`indexer.store.Store.transaction` deletes after the
        #: COMMIT, still under the write lock, if no photo row refers to them any more
        self.release_after_commit: set[str] = set()

    def release_uploads(self, sources: Iterable[str]) -> None:
        """Delete the uploaded files among ``sources`` once this transaction has committed, unless a photo
        row still refers to them then (photos this transaction replaced or deleted)."""
        self.release_after_commit.update(sources)

    def upsert_products(self, products: Sequence[Product]) -> None:
        """Insert products or replace their title, category and metadata (labels are kept)."""
        stamp = now()
        before = self.db.total_changes
        self.db.executemany(
            "INSERT INTO products(id, title, category, metadata, updated_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET title = excluded.title, category = excluded.category, "
            "metadata = excluded.metadata, updated_at = excluded.updated_at "
            "WHERE products.title IS NOT excluded.title OR products.category IS NOT excluded.category "
            "OR products.metadata != excluded.metadata",
            [(p.id, p.title, p.category, json.dumps(p.metadata, ensure_ascii=False, sort_keys=True), stamp)
             for p in products],
        )
        if self.db.total_changes != before:
            self.changed = True

    def add_photos(self, photos: Sequence[PhotoRecord]) -> None:
        """Insert photos; a photo with the same (product_id, source) is replaced (new photo id)."""
        for p in photos:
            vec = np.ascontiguousarray(p.vector, dtype=np.float32).reshape(-1)
            if vec.shape[0] != self.dim:
                raise StoreError(f"vector for {p.source} has {vec.shape[0]} values, index expects {self.dim}")
            old = self.db.execute(
                "SELECT photo_id FROM photos WHERE product_id = ? AND source = ?", (p.product_id, p.source)
            ).fetchone()
            if old is not None:
                self.db.execute("DELETE FROM photos WHERE photo_id = ?", (old[0],))
                self._removed(old[0])
            cur = self.db.execute(
                "INSERT INTO photos(product_id, source, sha256, size, mtime_ns, width, height, metadata, vector) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (p.product_id, p.source, p.sha256, p.size, p.mtime_ns, p.width, p.height,
                 json.dumps(p.metadata, ensure_ascii=False, sort_keys=True), vec.tobytes()),
            )
            self.added_ids.append(cur.lastrowid)
            self.added_vecs.append(vec)
            self.changed = True

    def _removed(self, photo_id: int) -> None:
        if photo_id in self.added_ids:
            i = self.added_ids.index(photo_id)
            del self.added_ids[i], self.added_vecs[i]
        else:
            self.removed_ids.add(photo_id)

    def touch_photo(self, photo_id: int, size: int | None, mtime_ns: int | None) -> None:
        """Record a new size/mtime for a photo whose content hash did not change."""
        self.db.execute("UPDATE photos SET size = ?, mtime_ns = ? WHERE photo_id = ?", (size, mtime_ns, photo_id))

    def delete_photos(self, photo_ids: Iterable[int]) -> None:
        for pid in photo_ids:
            if self.db.execute("DELETE FROM photos WHERE photo_id = ?", (pid,)).rowcount:
                self._removed(pid)
                self.changed = True

    def delete_products(self, product_ids: Iterable[str]) -> int:
        """Delete products and all their photos; returns how many products existed."""
        n = 0
        for pid in product_ids:
            for (photo_id,) in self.db.execute("SELECT photo_id FROM photos WHERE product_id = ?", (pid,)).fetchall():
                self._removed(photo_id)
            n += self.db.execute("DELETE FROM products WHERE id = ?", (pid,)).rowcount
        if n:
            self.changed = True
        return n

    def vector_changes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(added ids int64 ``(a,)``, their vectors float32 ``(a, dim)``, removed ids int64 ``(r,)``)."""
        vecs = np.stack(self.added_vecs) if self.added_vecs else np.zeros((0, self.dim), np.float32)
        return (np.array(self.added_ids, dtype=np.int64), vecs,
                np.array(sorted(self.removed_ids), dtype=np.int64))
