"""The on-disk index: FAISS vectors, SQLite metadata and a JSON manifest in one directory.

Layout of an index directory::

    catalogue.sqlite        products, photos (with each photo's embedding), meta
    vectors.g<N>.faiss      FAISS snapshot of generation N (Flat, HNSW or IVF-PQ: see indexer.ann)
    manifest.json           format version, model identity, counts, times (a mirror of meta)
    report.json             the last indexing run's report (written by the pipeline)

Atomicity. SQLite is the single source of truth: every change (products, photos
and their vectors) commits in one SQLite transaction that also bumps the
``generation`` counter. The FAISS file is a snapshot named after the generation it
holds; it is written to a temporary file, fsynced and renamed, and only then are
older snapshots deleted. On open, a snapshot whose generation is not SQLite's is
ignored and the FAISS index is rebuilt from the vectors in SQLite. So a crash at
any moment leaves either the old or the new state, and FAISS can never drift from
the metadata. Photo ids come from ``AUTOINCREMENT`` and are never reused, so a
stale id cannot point at another photo.

Search is inner product on L2-normalised vectors (= cosine similarity), with photos
grouped by product: a product ranks by its best-matching photo. The FAISS index type is
chosen by :func:`indexer.ann.choose_index` from the photo count, a memory budget and the
user's request (meta rows ``index_type``, ``index_params``, ``index_choice``): exact Flat
for small catalogues, HNSW or IVF-PQ above. :meth:`Store.save` switches type when the
catalogue outgrows its choice, and rebuilds an HNSW graph once deleted photos, which stay
in it as tombstones, pass :data:`MAX_TOMBSTONE_FRACTION` of it. A type change commits to
SQLite with a new generation, so a crash before its snapshot is written rebuilds the new
type from SQLite on the next open.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import faiss
import numpy as np

from . import ann
from .errors import LookalikeError, NotFound
from .model import ModelIdentity
from .vectors import VectorIndex

FORMAT_VERSION = 1
DB_NAME = "catalogue.sqlite"
MANIFEST_NAME = "manifest.json"
REPORT_NAME = "report.json"
#: An HNSW graph is rebuilt from SQLite at the next save once tombstones (deleted photos it
#: cannot drop) exceed this fraction of it: they cost memory and over-fetching on every search.
MAX_TOMBSTONE_FRACTION = 0.2
#: Photos uploaded through the API live in ``INDEX_DIR/uploads/``; their source is this prefix and
#: the path under the index directory, so the index can move and the server start from anywhere.
INDEX_SOURCE_PREFIX = "index:"
UPLOADS_DIR = "uploads"
#: Stored JSON (metadata) read back deeper than this is not returned (written data is capped lower,
#: see indexer.updates.MAX_METADATA_DEPTH; this guards indexes written before that check).
MAX_READ_DEPTH = 32
#: Scores are rounded to this many decimals (float32 cosines are good to about 1e-7).
SCORE_DECIMALS = 6
#: A category filter that matches at most this many photos is searched exactly (all of them
#: scored); a larger one goes through FAISS with an id selector.
FILTER_EXACT_MAX = 50_000
#: check(): an IVF-PQ code whose reconstruction has a lower cosine with its photo's stored
#: embedding is reported (PQ error gives ~0.8-0.95; an unrelated vector ~0).
MIN_RECONSTRUCTION_COSINE = 0.5

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


class StoreError(LookalikeError):
    code = "index_error"


class IndexLocked(StoreError):
    """Another process (``lookalike index``, a server) holds the index's write lock."""

    code = "index_locked"
    http_status = 409


class IncompleteIndex(StoreError):
    """The index directory's database exists but its creation never committed."""


class ModelMismatch(LookalikeError):
    code = "model_mismatch"
    http_status = 409


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
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "replace").decode("utf-8")
    return value


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old or the new file: temp file, fsync, rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    """An index directory opened for reading, or for writing by one process at a time.

    Use :meth:`create` for a new index and :meth:`open` for an existing one. Writers
    take an exclusive ``flock`` on ``INDEX_DIR/.lock``; a second writer gets a
    StoreError. Readers need no lock (SQLite in WAL mode). All methods are
    thread-safe: SQLite connections are per thread and FAISS is guarded by a lock
    (FAISS indexes are not safe for concurrent mutation and search).
    """

    def __init__(self, path: Path, writable: bool):
        self.path = Path(path)
        self.writable = writable
        self._local = threading.local()
        self._epoch = 0  # bumped when the store becomes writable: per-thread connections reopen
        self._lock_fd: int | None = None
        self._write_lock = threading.RLock()  # transactions and index switches: one at a time
        self._refresh_lock = threading.Lock()  # read-only stores: one catch-up at a time
        self.identity: ModelIdentity | None = None
        self.vectors: VectorIndex | None = None  # the one owner of the in-memory FAISS index
        #: Called between a transaction's SQLite COMMIT and its FAISS update (tests use it to force
        #: interleavings; None in normal use).
        self.after_commit_hook = None

    # ----------------------------------------------------------------- opening
    @classmethod
    def create(cls, path: str | os.PathLike, identity: ModelIdentity) -> "Store":
        """Create (or open, if it exists and matches ``identity``) an index for writing.

        Raises ModelMismatch when the directory holds an index made with other weights.
        """
        path = Path(path)
        if (path / DB_NAME).exists():
            try:
                store = cls.open(path, writable=True)
            except IncompleteIndex:
                pass  # a run killed while creating it: create it again below
            else:
                if not store.identity.same_weights(identity):
                    store.close()
                    raise ModelMismatch(_mismatch_message(path, store.identity, identity))
                return store
        path.mkdir(parents=True, exist_ok=True)
        store = cls(path, writable=True)
        store._acquire_lock()
        db = store._db()
        db.executescript(SCHEMA)  # CREATE ... IF NOT EXISTS: idempotent
        now = _now()
        db.execute("BEGIN IMMEDIATE")  # all meta rows or none: an open never sees half of them
        for key, value in (
            ("format_version", str(FORMAT_VERSION)),
            ("model", json.dumps(identity.to_dict())),
            ("created_at", now),
            ("updated_at", now),
            ("generation", "0"),
            ("index_type", ann.FLAT),
            ("index_params", "{}"),
            ("index_choice", json.dumps({"requested": "auto", "memory_budget_bytes": ann.DEFAULT_MEMORY_BUDGET})),
        ):
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))
        db.execute("COMMIT")
        store.identity = identity
        store.vectors = VectorIndex(identity.dim)
        store.vectors.replace(store._new_index(), ann.IndexSpec(ann.FLAT), 0, np.zeros(0, np.int64))
        store.save()
        return store

    @classmethod
    def open(cls, path: str | os.PathLike, writable: bool = False) -> "Store":
        """Open an existing index. Raises StoreError if ``path`` holds no index."""
        path = Path(path)
        if not (path / DB_NAME).is_file():
            raise StoreError(f"{path} is not a lookalike index (no {DB_NAME}); create one with 'lookalike index'")
        store = cls(path, writable)
        if writable:
            store._acquire_lock()
        try:
            meta = store.meta()
        except sqlite3.DatabaseError as e:
            store.close()
            if "no such table" in str(e):
                raise IncompleteIndex(f"{path} was not fully created (interrupted?); run 'lookalike index' again") from None
            raise StoreError(f"{path / DB_NAME} is not a readable SQLite database: {e}") from None
        if "model" not in meta or "format_version" not in meta:
            store.close()
            raise IncompleteIndex(f"{path} was not fully created (interrupted?); run 'lookalike index' again")
        version = int(meta.get("format_version", "0"))
        if version != FORMAT_VERSION:
            store.close()
            raise StoreError(f"{path} has index format {version}; this lookalike reads format {FORMAT_VERSION}")
        try:
            store.identity = ModelIdentity.from_dict(json.loads(meta["model"]))
            store.vectors = VectorIndex(store.identity.dim)
            store._load_index()
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _acquire_lock(self) -> None:
        import fcntl

        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise IndexLocked(f"{self.path} is being written by another process; wait for it to finish") from None
        self._lock_fd = fd

    def try_become_writable(self) -> bool:
        """Take the write lock of a store opened read-only, if no other process holds it now.

        On success the store catches up with SQLite (one consistent read), accepts writes from then
        on and returns True; else it stays read-only and returns False. A server that started while
        ``lookalike index`` ran calls this until the indexer is done.
        """
        if self.writable:
            return True
        try:
            self._acquire_lock()
        except IndexLocked:
            return False
        with self._write_lock, self._refresh_lock:
            self.writable = True
            self._epoch += 1  # this thread's and every other thread's connection reopens read-write
            self._load_index()
        return True

    @contextmanager
    def _read_txn(self) -> Iterator[sqlite3.Connection]:
        """One SQLite read transaction: every query inside sees the same committed state (WAL
        snapshot isolation), so a generation read inside matches the rows read inside."""
        db = self._db()
        if db.in_transaction:
            yield db
            return
        db.execute("BEGIN")
        try:
            yield db
        finally:
            db.execute("COMMIT")

    def _db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "epoch", 0) != self._epoch:
            conn.close()
            conn = None
        if conn is None:
            uri = (self.path / DB_NAME).resolve().as_uri() + ("" if self.writable else "?mode=ro")
            # autocommit mode: transactions are explicit (BEGIN IMMEDIATE in Store.transaction)
            conn = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA foreign_keys = ON")
            if self.writable:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = FULL")
            self._local.conn = conn
            self._local.epoch = self._epoch
        return conn

    def meta(self) -> dict[str, str]:
        return dict(self._db().execute("SELECT key, value FROM meta").fetchall())

    def generation(self) -> int:
        row = self._db().execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(row[0])

    # ------------------------------------------------------------------- FAISS
    def _new_index(self) -> faiss.Index:
        return ann.new_index(ann.IndexSpec(ann.FLAT), self.identity.dim)

    def _snapshot_path(self, generation: int) -> Path:
        return self.path / f"vectors.g{generation}.faiss"

    def index_spec(self) -> ann.IndexSpec:
        """The index type and parameters SQLite records (what a rebuild builds)."""
        meta = self.meta()
        return ann.IndexSpec(meta.get("index_type", ann.FLAT), json.loads(meta.get("index_params", "{}")))

    def index_choice(self) -> dict:
        """How the index type is chosen: ``{"requested": "auto"|"flat"|"hnsw"|"ivfpq", "memory_budget_bytes": int}``."""
        default = {"requested": "auto", "memory_budget_bytes": ann.DEFAULT_MEMORY_BUDGET}
        return {**default, **json.loads(self.meta().get("index_choice", "{}"))}

    def set_index_choice(self, requested: str | None = None, memory_budget_bytes: int | None = None) -> None:
        """Record how to choose the index type; the next :meth:`save` builds what it chooses.

        requested: "auto", "flat", "hnsw" or "ivfpq"; memory_budget_bytes: > 0, for auto.
        None keeps the recorded value. Raises StoreError for other values.
        """
        self._require_writable()
        choice = self.index_choice()
        if requested is not None:
            if requested.lower() not in ann.REQUESTABLE:
                raise StoreError(f"unknown index type {requested!r}; use one of {', '.join(ann.REQUESTABLE)}")
            choice["requested"] = requested.lower()
        if memory_budget_bytes is not None:
            if memory_budget_bytes <= 0:
                raise StoreError(f"memory budget must be positive, got {memory_budget_bytes}")
            choice["memory_budget_bytes"] = int(memory_budget_bytes)
        with self._write_lock:
            self._db().execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('index_choice', ?)", (json.dumps(choice),))

    def _photo_ids(self) -> np.ndarray:
        """int64 ``(n,)`` ascending: every photo id in SQLite."""
        cur = self._db().execute("SELECT photo_id FROM photos ORDER BY photo_id")
        return np.fromiter((r[0] for r in cur), dtype=np.int64)

    def _load_index(self) -> None:
        """Load the snapshot of SQLite's generation, or rebuild the index from SQLite when the
        snapshot is missing or disagrees with it, from one consistent SQLite read; then hand it to
        :attr:`vectors`. A writable store replaces a bad snapshot."""
        with self._read_txn():
            gen = self.generation()
            spec = self.index_spec()
            sql_ids = self._photo_ids()
            snap = self._snapshot_path(gen)
            index = None
            if snap.is_file():
                try:
                    index = faiss.read_index(str(snap))
                except RuntimeError:
                    index = None
                if index is not None and not self._same_ids(index, spec, sql_ids):
                    index = None
            rebuilt = index is None
            if rebuilt:
                spec = self._buildable(spec)
                index = self._rebuild_index(spec)
        self.vectors.replace(index, spec, gen, sql_ids)
        if self.writable and rebuilt:
            self.save(replace_snapshot=True)

    def _same_ids(self, index, spec: ann.IndexSpec, sql_ids: np.ndarray) -> bool:
        """Whether a snapshot has ``spec``'s type and layout and holds each of SQLite's photo ids
        (``sql_ids``) once: exactly those, or, for HNSW, those and tombstones."""
        described = ann.describe(index)
        if described is None or described.type != spec.type or described.params != spec.structure():
            return False
        if index.d != self.identity.dim:
            return False
        ids = np.sort(ann.held_ids(index))
        if spec.removes:
            return np.array_equal(ids, sql_ids)
        return bool(np.all(ids[1:] != ids[:-1])) and bool(np.isin(sql_ids, ids, assume_unique=True).all())

    def _buildable(self, spec: ann.IndexSpec) -> ann.IndexSpec:
        """``spec``, or Flat when it is IVF-PQ and the store has too few photos left to train it."""
        if spec.type == ann.IVFPQ and self.count_photos() < ann.IVFPQ_MIN_VECTORS:
            return ann.IndexSpec(ann.FLAT)
        return spec

    def _rebuild_index(self, spec: ann.IndexSpec | None = None) -> faiss.Index:
        """Build the FAISS index (``spec``, default the current one) from the vectors stored in SQLite.

        IVF-PQ first trains on a seeded random sample of them (:func:`indexer.ann.training_size`).
        """
        spec = spec or self.vectors.spec
        db = self._db()
        training = None
        n_train = ann.training_size(spec, self.count_photos())
        if n_train:
            all_ids = np.fromiter((r[0] for r in db.execute("SELECT photo_id FROM photos")), dtype=np.int64)
            pick = np.sort(np.random.default_rng(0).choice(all_ids, n_train, replace=False))
            training = self._vectors(pick)[1]
        index = ann.new_index(spec, self.identity.dim, training)
        cur = db.execute("SELECT photo_id, vector FROM photos ORDER BY photo_id")
        while True:
            rows = cur.fetchmany(65536)
            if not rows:
                break
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1)
            index.add_with_ids(vecs, ids)
        return index

    def _vectors(self, photo_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The stored embeddings of ``photo_ids`` that exist: (ids int64 ``(m,)`` ascending,
        float32 ``(m, dim)``). Deleted photos are left out."""
        found: list[int] = []
        blobs: list[bytes] = []
        db = self._db()
        wanted = [int(i) for i in np.unique(photo_ids)]
        for i in range(0, len(wanted), 900):
            chunk = wanted[i : i + 900]
            q = f"SELECT photo_id, vector FROM photos WHERE photo_id IN ({','.join('?' * len(chunk))}) ORDER BY photo_id"
            for pid, blob in db.execute(q, chunk):
                found.append(pid)
                blobs.append(blob)
        vecs = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), self.identity.dim)
        return np.array(found, dtype=np.int64), vecs

    def rebuild_index(self) -> None:
        """Rebuild the FAISS index from SQLite as :meth:`index_choice` now chooses it, with parameters
        for the current photo count (IVF-PQ is trained again; HNSW tombstones are dropped), and save."""
        self._require_writable()
        self._maybe_switch_index(force=True)
        self.save(replace_snapshot=True)

    def _maybe_switch_index(self, force: bool = False) -> None:
        """Build the index the choice now asks for, or drop an HNSW graph's tombstones, if due (or ``force``).

        Runs under the write lock: searches keep using the old index while the new one is
        built from SQLite, and no transaction can commit in between. The new type and
        parameters commit with a new generation (the old snapshot is then stale).
        """
        with self._write_lock:
            current = self.vectors.state()
            choice = self.index_choice()
            n = self.count_photos()
            wanted = ann.choose_index(n, self.identity.dim, choice["memory_budget_bytes"], choice["requested"])
            if wanted.type == current.spec.type and not force:
                wanted = current.spec  # keep the parameters it was built with (IVF-PQ's training)
            too_many_tombstones = current.tombstones > MAX_TOMBSTONE_FRACTION * max(current.ntotal, 1)
            if wanted != current.spec or too_many_tombstones or force:
                index = self._rebuild_index(wanted)
            elif current.spec != self.index_spec():
                index = current.index  # built as Flat because an IVF-PQ lost its training data: record it
            else:
                return
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                for key, value in (("index_type", wanted.type), ("index_params", json.dumps(wanted.params))):
                    db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))
                _bump_generation(db)
                sql_ids = self._photo_ids()
                gen = self.generation()
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self.vectors.replace(index, wanted, gen, sql_ids)

    def refresh(self) -> bool:
        """Catch up with commits another process made since the index was loaded; True if there were.

        Only a read-only store has anything to catch up with: a writable one holds the write lock,
        so its own transactions are the only commits, and they update the index as they commit
        (a writable store returns False at once). The catch-up reads SQLite once, consistently:
        photos added and removed since the index's generation are applied to it (photo ids are
        never reused, so the id sets say exactly what changed); a changed index type, or HNSW
        tombstones past :data:`MAX_TOMBSTONE_FRACTION`, loads the whole index instead. Costs one
        scan of the photo ids plus reading the new vectors: run it off the request path (the
        server runs it in a background thread).
        """
        if self.writable:
            return False
        with self._refresh_lock:
            current = self.vectors.state()
            with self._read_txn():
                gen = self.generation()
                if gen == current.generation:
                    return False
                spec = self._buildable(self.index_spec())
                if spec == current.spec and current.tombstones <= MAX_TOMBSTONE_FRACTION * max(current.ntotal, 1):
                    sql_ids = self._photo_ids()
                    live = self.vectors.live_ids()
                    added = np.setdiff1d(sql_ids, live, assume_unique=True)
                    removed = np.setdiff1d(live, sql_ids, assume_unique=True)
                    ids, vecs = self._vectors(added)
                    self.vectors.apply(ids, vecs, removed, gen)
                    return True
            self._load_index()
            return True

    # ----------------------------------------------------------------- reading
    def count_products(self) -> int:
        return self._db().execute("SELECT COUNT(*) FROM products").fetchone()[0]

    def count_photos(self) -> int:
        return self._db().execute("SELECT COUNT(*) FROM photos").fetchone()[0]

    def known_photos(self) -> dict[tuple[str, str], KnownPhoto]:
        """(product_id, source) -> what is stored for that photo, for change detection."""
        rows = self._db().execute("SELECT product_id, source, photo_id, sha256, size, mtime_ns FROM photos")
        return {(r[0], r[1]): KnownPhoto(r[2], r[3], r[4], r[5]) for r in rows}

    def product_ids(self) -> list[str]:
        return [r[0] for r in self._db().execute("SELECT id FROM products ORDER BY id")]

    def categories(self) -> list[tuple[str, int]]:
        """Every category with its number of products, most common first."""
        rows = self._db().execute(
            "SELECT category, COUNT(*) FROM products WHERE category IS NOT NULL AND category != '' "
            "GROUP BY category ORDER BY COUNT(*) DESC, category"
        )
        return [(r[0], r[1]) for r in rows]

    def has_product(self, product_id: str) -> bool:
        return self._db().execute("SELECT 1 FROM products WHERE id = ?", (product_id,)).fetchone() is not None

    def saved_generation(self) -> int:
        """The generation of the FAISS snapshot on disk (-1 if none)."""
        gens = [int(p.name[len("vectors.g"):-len(".faiss")]) for p in self.path.glob("vectors.g*.faiss")]
        return max(gens, default=-1)

    def get_product(self, product_id: str) -> dict:
        """The product with its photos. Raises NotFound."""
        db = self._db()
        row = db.execute(
            "SELECT id, title, category, metadata, label, label_score, updated_at FROM products WHERE id = ?",
            (product_id,),
        ).fetchone()
        if row is None:
            raise NotFound(f"no product with id {product_id!r}")
        photos = db.execute(
            "SELECT photo_id, source, sha256, width, height, metadata FROM photos WHERE product_id = ? ORDER BY photo_id",
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

    def product_vectors(self, product_id: str) -> np.ndarray:
        """float32 ``(n_photos, dim)`` embeddings of a product's photos. Raises NotFound."""
        rows = self._db().execute("SELECT vector FROM photos WHERE product_id = ? ORDER BY photo_id", (product_id,))
        blobs = [r[0] for r in rows]
        if not blobs:
            if self._db().execute("SELECT 1 FROM products WHERE id = ?", (product_id,)).fetchone() is None:
                raise NotFound(f"no product with id {product_id!r}")
            return np.zeros((0, self.identity.dim), np.float32)
        return np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), -1).copy()

    def iter_products(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (product_id, photo vectors ``(n, dim)``) for every product with photos."""
        cur = self._db().execute("SELECT product_id, vector FROM photos ORDER BY product_id, photo_id")
        current, blobs = None, []
        for pid, blob in cur:
            if pid != current and blobs:
                yield current, np.frombuffer(b"".join(blobs), np.float32).reshape(len(blobs), -1)
                blobs = []
            current = pid
            blobs.append(blob)
        if blobs:
            yield current, np.frombuffer(b"".join(blobs), np.float32).reshape(len(blobs), -1)

    # ------------------------------------------------------------------ search
    def search(
        self,
        queries: np.ndarray,
        k: int = 10,
        *,
        category: str | None = None,
        min_score: float | None = None,
        exclude: Iterable[str] = (),
        ef_search: int | None = None,
        nprobe: int | None = None,
    ) -> list[list[Hit]]:
        """Top-k products for each query vector.

        queries: float32 ``(q, dim)``, unit-norm rows (cosine = inner product).
        Returns, for each query, up to ``k`` hits sorted by score (cosine of the
        product's best photo, in [-1, 1]) descending; ties are broken by product id.
        ``category`` keeps products of that category or below it (``Men`` matches
        ``Men/Tops/Tees``); ``exclude`` drops those product ids.
        ``ef_search`` (HNSW, 1..ann.MAX_EF_SEARCH) and ``nprobe`` (IVF-PQ, 1..ann.MAX_NPROBE)
        trade speed for recall in this call only (default: the index's own); an index of
        another type ignores them. Raises StoreError for a bad shape or knob.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.identity.dim:
            raise StoreError(f"query vectors must have shape (q, {self.identity.dim}), got {queries.shape}")
        for name, value, top in (("ef_search", ef_search, ann.MAX_EF_SEARCH), ("nprobe", nprobe, ann.MAX_NPROBE)):
            if value is not None and not 1 <= value <= top:
                raise StoreError(f"{name} must be between 1 and {top}, got {value}")
        excluded = set(exclude)
        knobs = {"ef_search": ef_search, "nprobe": nprobe}
        return [self._search_one(q[None, :], k, category, min_score, excluded, knobs) for q in queries]

    def similar(self, product_id: str, k: int = 10, category: str | None = None, *,
                ef_search: int | None = None, nprobe: int | None = None) -> list[Hit]:
        """Products most like ``product_id``: each photo of it is a query, a product scores by its best
        match to any of them; the product itself is left out. ``ef_search`` and ``nprobe`` as in
        :meth:`search`. Raises NotFound."""
        vecs = self.product_vectors(product_id)
        merged: dict[str, Hit] = {}
        for hits in self.search(vecs, k, category=category, exclude=[product_id], ef_search=ef_search, nprobe=nprobe):
            for h in hits:
                if h.product_id not in merged or h.score > merged[h.product_id].score:
                    merged[h.product_id] = h
        return sorted(merged.values(), key=lambda h: (-h.score, h.product_id))[:k]

    def _search_one(self, q, k, category, min_score, excluded, knobs) -> list[Hit]:
        state = self.vectors.state()
        ntotal, live = state.ntotal, state.ntotal - state.tombstones
        if ntotal == 0 or k <= 0 or live <= 0:
            return []
        allowed = None
        if category:
            allowed = self._category_photo_ids(category)
            if not len(allowed):
                return []
            if len(allowed) <= FILTER_EXACT_MAX:
                # exact search of the filtered photos: an approximate index can miss most of a
                # small subset, and this returns min(k, matching products) by construction
                lookup = self._vectors if state.spec.type == ann.IVFPQ else self.vectors.lookup
                scores, ids = ann.rerank(q, allowed[None, :], len(allowed), lookup)
                return self._collect(scores, ids, category, min_score, excluded)[0][:k]
        # over-fetch photos: several may be of one product, and tombstones are dropped below
        fetch = min(ntotal, max(4 * k + len(excluded), 32) * ntotal // live)
        while True:
            scores, ids = self.vectors.candidates(q, fetch, allowed=allowed, **knobs)
            if state.spec.type == ann.IVFPQ:  # exact re-ranking, outside the lock: it reads SQLite
                scores, ids = ann.rerank(q, ids, fetch, self._vectors)
            hits, below_min = self._collect(scores, ids, category, min_score, excluded)
            if len(hits) >= k or fetch >= ntotal or below_min:
                return hits[:k]
            fetch = min(ntotal, fetch * 4)

    def _collect(self, scores, ids, category, min_score, excluded) -> tuple[list[Hit], bool]:
        """Hits from FAISS candidates (scores, ids: ``(1, c)``, best first): each product once, by its
        best photo, those under ``min_score`` dropped. Scores are clamped to [-1, 1] and rounded to
        :data:`SCORE_DECIMALS` (float32 sums give 0.99999994 or 1.0000001 for an exact copy): the
        value compared with ``min_score`` is the value returned. Returns (hits, whether the
        candidates reached under min_score)."""
        scores = np.round(np.clip(scores[0].astype(np.float64), -1.0, 1.0), SCORE_DECIMALS)
        best: dict[str, tuple[float, int]] = {}
        info = self._photo_info([int(i) for i in ids[0] if i >= 0])  # ids missing from SQLite (deleted) are skipped
        for score, pid in zip(scores, ids[0]):
            if pid < 0 or int(pid) not in info:
                continue
            if min_score is not None and score < min_score:
                break
            product_id = info[int(pid)][0]
            if product_id in excluded or product_id in best:
                continue
            best[product_id] = (float(score), int(pid))
        below_min = min_score is not None and len(scores) > 0 and scores[-1] < min_score
        return self._hits(best, info, category), bool(below_min)

    def _category_photo_ids(self, category: str) -> np.ndarray:
        """int64 ids of the photos of products in ``category`` or below it (as :func:`_in_category`)."""
        cats = [c for (c,) in self._db().execute("SELECT DISTINCT category FROM products") if _in_category(c, category)]
        out: list[int] = []
        for i in range(0, len(cats), 900):
            chunk = cats[i : i + 900]
            q = ("SELECT photos.photo_id FROM photos JOIN products ON products.id = photos.product_id "
                 f"WHERE products.category IN ({','.join('?' * len(chunk))})")
            out.extend(r[0] for r in self._db().execute(q, chunk))
        return np.array(sorted(out), dtype=np.int64)

    def _photo_info(self, photo_ids: list[int]) -> dict[int, tuple[str, str, str]]:
        """photo id -> (product id, source, metadata JSON)."""
        if not photo_ids:
            return {}
        out: dict[int, tuple[str, str, str]] = {}
        db = self._db()
        for i in range(0, len(photo_ids), 900):
            chunk = photo_ids[i : i + 900]
            q = f"SELECT photo_id, product_id, source, metadata FROM photos WHERE photo_id IN ({','.join('?' * len(chunk))})"
            out.update({r[0]: (r[1], r[2], r[3]) for r in db.execute(q, chunk)})
        return out

    def _hits(self, best: dict[str, tuple[float, int]], info, category: str | None) -> list[Hit]:
        if not best:
            return []
        db = self._db()
        ids = list(best)
        rows = {}
        for i in range(0, len(ids), 900):
            chunk = ids[i : i + 900]
            q = (
                "SELECT id, title, category, metadata, label, label_score FROM products "
                f"WHERE id IN ({','.join('?' * len(chunk))})"
            )
            rows.update({r[0]: r for r in db.execute(q, chunk)})
        hits = []
        for pid, (score, photo_id) in best.items():
            r = rows.get(pid)
            if r is None or (category and not _in_category(r[2], category)):
                continue
            _, source, photo_meta = info[photo_id]
            hits.append(Hit(pid, score, photo_id, source, r[1], r[2], stored_json(r[3]), r[4], r[5], stored_json(photo_meta)))
        hits.sort(key=lambda h: (-h.score, h.product_id))
        return hits

    # ------------------------------------------------------------------ photos
    def resolve_source(self, source: str) -> str:
        """Where a photo's bytes are: an uploaded photo's ``index:uploads/NAME`` becomes a path under
        this index directory; any other source (a catalogue path, URL or tar member) is returned as is."""
        if source.startswith(INDEX_SOURCE_PREFIX):
            return str(self.path / source[len(INDEX_SOURCE_PREFIX):])
        return source

    def keep_upload(self, data: bytes, name: str) -> str:
        """Store an uploaded photo as ``INDEX_DIR/uploads/NAME`` (written atomically, once) and return
        its source, ``index:uploads/NAME``. Call inside :meth:`transaction` so that
        :meth:`remove_unreferenced_uploads` cannot remove it before the photo row commits."""
        self._require_writable()
        folder = self.path / UPLOADS_DIR
        folder.mkdir(exist_ok=True)
        path = folder / name
        if not path.exists():
            atomic_write(path, data)
        return f"{INDEX_SOURCE_PREFIX}{UPLOADS_DIR}/{name}"

    def remove_unreferenced_uploads(self, sources: Iterable[str]) -> int:
        """Delete the uploaded photo files among ``sources`` that no photo row refers to any more
        (after a product was deleted or its photos replaced); returns how many were deleted."""
        self._require_writable()
        removed = 0
        with self._write_lock:  # no transaction can add a reference meanwhile
            db = self._db()
            for source in set(sources):
                if not source.startswith(INDEX_SOURCE_PREFIX):
                    continue
                if db.execute("SELECT 1 FROM photos WHERE source = ? LIMIT 1", (source,)).fetchone() is None:
                    path = Path(self.resolve_source(source))
                    if path.is_file():
                        path.unlink()
                        removed += 1
        return removed

    # ----------------------------------------------------------------- writing
    def _require_writable(self) -> None:
        if not self.writable:
            raise StoreError("index opened read-only")

    @contextmanager
    def transaction(self) -> Iterator["Batch"]:
        """Group changes into one atomic commit; FAISS is updated after SQLite commits.

        Usage: ``with store.transaction() as tx: tx.upsert_products(...); tx.add_photos(...)``.
        On an exception nothing is written.
        """
        self._require_writable()
        with self._write_lock:
            db = self._db()
            batch = Batch(self, db)
            db.execute("BEGIN IMMEDIATE")
            try:
                yield batch
                if batch.changed:
                    _bump_generation(db)
                gen = self.generation()
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            if self.after_commit_hook is not None:
                self.after_commit_hook()
            if batch.changed:
                # the same writer, still under the write lock: the index reflects exactly this commit
                vecs = np.stack(batch.added_vecs) if batch.added_vecs else np.zeros((0, self.identity.dim), np.float32)
                self.vectors.apply(np.array(batch.added_ids, dtype=np.int64), vecs,
                                   np.array(sorted(batch.removed_ids), dtype=np.int64), gen)

    def save(self, replace_snapshot: bool = False) -> None:
        """Write the FAISS snapshot for the current generation and the manifest, atomically.

        First switches the index type if the catalogue has outgrown its choice, or rebuilds an
        HNSW graph whose tombstones exceed :data:`MAX_TOMBSTONE_FRACTION` (from SQLite; for a
        large catalogue this takes minutes, during which searches use the old index and
        transactions wait). An existing snapshot of this generation is kept unless
        ``replace_snapshot`` (a bad one found on open is replaced).
        """
        self._require_writable()
        self._maybe_switch_index()
        gen, data = self.vectors.serialize()
        snap = self._snapshot_path(gen)
        if replace_snapshot or not snap.exists():
            atomic_write(snap, data.tobytes())
        atomic_write(self.path / MANIFEST_NAME, json.dumps(self.manifest(), indent=2).encode())
        for old in self.path.glob("vectors.g*.faiss"):
            if old != snap:
                old.unlink(missing_ok=True)

    def manifest(self) -> dict:
        """The index's manifest: format, model identity, counts, index type and parameters, times.

        ``index``: ``{"type": "Flat"|"HNSW"|"IVFPQ", "metric": "inner_product", "params": {...},
        "choice": {"requested": ..., "memory_budget_bytes": ...}}`` (see :class:`indexer.ann.IndexSpec`).
        """
        meta = self.meta()
        spec = self.index_spec()
        return {
            "format_version": int(meta["format_version"]),
            "model": json.loads(meta["model"]),
            "index": {"type": spec.type, "metric": "inner_product", "params": spec.params, "choice": self.index_choice()},
            "products": self.count_products(),
            "photos": self.count_photos(),
            "generation": int(meta["generation"]),
            "created_at": meta["created_at"],
            "updated_at": meta["updated_at"],
        }

    def write_report(self, report: dict) -> Path:
        path = self.path / REPORT_NAME
        atomic_write(path, json.dumps(report, indent=2, ensure_ascii=False).encode())
        return path

    def set_labels(self, labels: dict[str, tuple[str, float]]) -> None:
        """Store each product's top zero-shot label and its probability."""
        with self.transaction() as tx:
            tx.db.executemany(
                "UPDATE products SET label = ?, label_score = ? WHERE id = ?",
                [(lab, float(score), pid) for pid, (lab, score) in labels.items()],
            )
            tx.changed = True

    # ------------------------------------------------------------------- check
    def check(self) -> dict:
        """Verify that FAISS, SQLite and the manifest agree.

        Returns ``{"ok": bool, "problems": [str], "notes": [str], "products": n, "photos": n, ...}``.
        Checks: SQLite integrity; the snapshot for the committed generation is of the recorded
        index type and layout and holds the photo ids of SQLite, without duplicates, with the
        same vectors (Flat, HNSW) or codes that decode near them (IVF-PQ, cosine >=
        :data:`MIN_RECONSTRUCTION_COSINE`); every photo's product exists; vectors have unit
        norm; the manifest counts match. An HNSW graph's tombstones (ids of deleted photos)
        are a note with their count, not a problem. A snapshot or manifest that lags behind
        SQLite after an interrupted run is a note too: SQLite holds every commit, and the next
        writable open rebuilds both.
        """
        problems: list[str] = []
        db = self._db()
        integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
        if integrity != "ok":
            problems.append(f"sqlite integrity check: {integrity}")
        gen = self.generation()
        n_products, n_photos = self.count_products(), self.count_photos()
        orphans = db.execute(
            "SELECT COUNT(*) FROM photos WHERE product_id NOT IN (SELECT id FROM products)"
        ).fetchone()[0]
        if orphans:
            problems.append(f"{orphans} photos belong to no product")
        snap = self._snapshot_path(gen)
        spec = self.index_spec()
        index, faiss_ids = None, None
        notes: list[str] = []
        if not snap.is_file():
            # A run stopped between commits (kill, Ctrl-C): SQLite holds every committed photo; the
            # snapshot and manifest lag behind and are rebuilt from SQLite on the next open.
            saved = self.saved_generation()
            notes.append(f"the FAISS snapshot is of generation {saved}, the store of {gen} (a run was interrupted); "
                         "it is rebuilt from SQLite when the index is next opened for writing")
            spec = self._buildable(spec)
            index = self._rebuild_index(spec)
        else:
            try:
                index = faiss.read_index(str(snap))
            except RuntimeError as e:
                problems.append(f"FAISS snapshot {snap.name} is unreadable: {str(e).splitlines()[0] if str(e) else e}")
        if index is not None:
            described = ann.describe(index)
            if described is None or described.type != spec.type or described.params != spec.structure():
                kind = f"{described.type} {described.params}" if described else "an unknown type of"
                problems.append(f"FAISS snapshot {snap.name} is {kind} index; the store records {spec.type} {spec.structure()}")
            else:
                faiss_ids = ann.held_ids(index)
        if faiss_ids is not None:
            if len(np.unique(faiss_ids)) != len(faiss_ids):
                problems.append(f"FAISS holds {len(faiss_ids) - len(np.unique(faiss_ids))} duplicate ids")
            sql_ids = np.array([r[0] for r in db.execute("SELECT photo_id FROM photos")], dtype=np.int64)
            missing = np.setdiff1d(sql_ids, faiss_ids)
            extra = np.setdiff1d(faiss_ids, sql_ids)
            if len(missing):
                problems.append(f"{len(missing)} photos have no FAISS vector (e.g. id {missing[0]})")
            if len(extra) and spec.removes:
                problems.append(f"{len(extra)} FAISS vectors have no photo row (e.g. id {extra[0]})")
            elif len(extra):
                notes.append(f"{len(extra)} deleted photos remain in the HNSW graph as tombstones "
                             f"({len(extra) / len(faiss_ids):.0%} of it); they never appear in results, and the "
                             f"graph is rebuilt without them at a save once they pass {MAX_TOMBSTONE_FRACTION:.0%}")
            if len(sql_ids) and not len(missing) and not (len(extra) and spec.removes):
                bad = self._differing_vectors(index, faiss_ids)
                if bad and spec.type == ann.IVFPQ:
                    problems.append(f"{bad} IVF-PQ codes do not decode near their stored embeddings "
                                    f"(cosine < {MIN_RECONSTRUCTION_COSINE})")
                elif bad:
                    problems.append(f"{bad} FAISS vectors differ from the stored embeddings")
        norms_bad = 0
        for (blob,) in db.execute("SELECT vector FROM photos"):
            v = np.frombuffer(blob, np.float32)
            if v.shape[0] != self.identity.dim or abs(float(np.dot(v, v)) - 1.0) > 1e-3:
                norms_bad += 1
        if norms_bad:
            problems.append(f"{norms_bad} stored vectors have the wrong size or are not unit-norm")
        self._check_photo_files(problems, notes)
        manifest_path = self.path / MANIFEST_NAME
        try:
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("generation") == gen and (
                manifest.get("products") != n_products or manifest.get("photos") != n_photos
            ):
                problems.append(
                    f"manifest counts ({manifest.get('products')} products, {manifest.get('photos')} photos) "
                    f"differ from the store ({n_products}, {n_photos})"
                )
            elif manifest.get("generation") != gen:
                notes.append(f"manifest.json is of generation {manifest.get('generation')}, the store of {gen}; "
                             "it is rewritten when the index is next saved")
        except (OSError, ValueError) as e:
            problems.append(f"manifest unreadable: {e}")
        return {
            "ok": not problems,
            "problems": problems,
            "notes": notes,
            "products": n_products,
            "photos": n_photos,
            "generation": gen,
            "path": str(self.path),
        }


    def _check_photo_files(self, problems: list[str], notes: list[str]) -> None:
        """Uploaded photos (kept in the index directory) must exist: a missing one is a problem.
        Catalogue photos that are gone from disk are a note (the catalogue owns them: search still
        finds them, their images cannot be served). Upload files no photo refers to are a note."""
        missing_uploads, missing_local = [], []
        referenced: set[str] = set()
        for (source,) in self._db().execute("SELECT DISTINCT source FROM photos"):
            if source.startswith(INDEX_SOURCE_PREFIX):
                referenced.add(source)
                if not Path(self.resolve_source(source)).is_file():
                    missing_uploads.append(source)
            elif "://" not in source and not Path(source.split("::")[0]).exists():
                missing_local.append(source)
        if missing_uploads:
            problems.append(f"{len(missing_uploads)} uploaded photos are missing from {self.path / UPLOADS_DIR} "
                            f"(e.g. {missing_uploads[0]}): upload them again")
        if missing_local:
            notes.append(f"{len(missing_local)} catalogue photos are no longer on disk (e.g. {missing_local[0]}): "
                         "search still finds them but cannot show them; 'lookalike index CATALOGUE --prune' drops "
                         "the photos a catalogue no longer lists")
        folder = self.path / UPLOADS_DIR
        if folder.is_dir():
            stray = [p.name for p in folder.iterdir()
                     if p.is_file() and f"{INDEX_SOURCE_PREFIX}{UPLOADS_DIR}/{p.name}" not in referenced]
            if stray:
                notes.append(f"{len(stray)} files in {folder} belong to no photo (e.g. {stray[0]}); they can be deleted")

    def _differing_vectors(self, index, faiss_ids: np.ndarray) -> int:
        """How many photos' vectors in ``index`` (holding ``faiss_ids``, in storage order) differ from
        their stored embeddings: exactly for Flat and HNSW; for IVF-PQ, by a reconstruction cosine
        under :data:`MIN_RECONSTRUCTION_COSINE`."""
        stored = ann.stored_vectors(index)
        pos = {int(i): n for n, i in enumerate(faiss_ids)}
        bad = 0
        cur = self._db().execute("SELECT photo_id, vector FROM photos")
        while rows := cur.fetchmany(65536):
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1)
            if stored is not None:
                theirs = stored[[pos[int(i)] for i in ids]]
                bad += int((~np.isclose(vecs, theirs, rtol=1e-5, atol=1e-6).all(axis=1)).sum())
            else:
                decoded = ann.reconstruct(index, ids)
                cosine = (decoded * vecs).sum(axis=1) / np.maximum(np.linalg.norm(decoded, axis=1), 1e-12)
                bad += int((cosine < MIN_RECONSTRUCTION_COSINE).sum())
        return bad


class Batch:
    """Changes made inside :meth:`Store.transaction`."""

    def __init__(self, store: Store, db: sqlite3.Connection):
        self.store = store
        self.db = db
        self.changed = False
        self.added_ids: list[int] = []
        self.added_vecs: list[np.ndarray] = []
        self.removed_ids: set[int] = set()

    def upsert_products(self, products: Sequence[Product]) -> None:
        """Insert products or replace their title, category and metadata (labels are kept)."""
        now = _now()
        before = self.db.total_changes
        self.db.executemany(
            "INSERT INTO products(id, title, category, metadata, updated_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET title = excluded.title, category = excluded.category, "
            "metadata = excluded.metadata, updated_at = excluded.updated_at "
            "WHERE products.title IS NOT excluded.title OR products.category IS NOT excluded.category "
            "OR products.metadata != excluded.metadata",
            [(p.id, p.title, p.category, json.dumps(p.metadata, ensure_ascii=False, sort_keys=True), now) for p in products],
        )
        if self.db.total_changes != before:
            self.changed = True

    def add_photos(self, photos: Sequence[PhotoRecord]) -> None:
        """Insert photos; a photo with the same (product_id, source) is replaced (new photo id)."""
        dim = self.store.identity.dim
        for p in photos:
            vec = np.ascontiguousarray(p.vector, dtype=np.float32).reshape(-1)
            if vec.shape[0] != dim:
                raise StoreError(f"vector for {p.source} has {vec.shape[0]} values, index expects {dim}")
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


def _bump_generation(db: sqlite3.Connection) -> None:
    """Inside an open transaction: the next generation, and the time of the change."""
    db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
    db.execute("UPDATE meta SET value = ? WHERE key = 'updated_at'", (_now(),))


def _in_category(value: str | None, wanted: str) -> bool:
    if not value:
        return False
    value, wanted = value.casefold(), wanted.strip("/").casefold()
    return value == wanted or value.startswith(wanted + "/")


def _mismatch_message(path: Path, stored: ModelIdentity, given: ModelIdentity) -> str:
    return (
        f"{path} was built with model {stored.name} (pretrained={stored.pretrained}, dim {stored.dim}, "
        f"weights {stored.weights_sha256[:12]}), not {given.name} (pretrained={given.pretrained}, dim {given.dim}, "
        f"weights {given.weights_sha256[:12]}). Use the same --model/--pretrained, or index into a new directory."
    )


def check_model(store: Store, identity: ModelIdentity) -> None:
    """Raise ModelMismatch unless ``identity`` has the weights the index was built with."""
    if not store.identity.same_weights(identity):
        raise ModelMismatch(_mismatch_message(store.path, store.identity, identity))


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest.json of an index directory. Raises StoreError."""
    p = Path(path) / MANIFEST_NAME
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise StoreError(f"{path} is not a lookalike index (no {MANIFEST_NAME})") from None
    except ValueError as e:
        raise StoreError(f"{p} is not valid JSON: {e}") from e
