"""The on-disk index: FAISS vectors, SQLite metadata and a JSON manifest in one directory.

Layout of an index directory::

    catalogue.sqlite        products, photos (with each photo's embedding), meta
    vectors.g<N>.faiss      FAISS snapshot of generation N (Flat, HNSW or IVF-PQ: see indexer.ann)
    manifest.json           format version, model identity, counts, times (a mirror of meta)
    report.json             the last indexing run's report (written by the pipeline)
    uploads/                photos uploaded through the API (sources ``index:uploads/NAME``)

:class:`Store` ties together the jobs, each in its own module: the SQLite layer
(:mod:`indexer.database`), the in-memory FAISS index and its one owner (:mod:`indexer.vectors`),
search (:mod:`indexer.search`) and ``check`` (:mod:`indexer.check`); the records it stores and
returns are in :mod:`indexer.records`. It is longer than our ~400-line guide because it is the one
place where SQLite commits and FAISS index changes meet (transactions, snapshots, type switches, a
read-only store's catch-up, uploads that live and die with their photo rows): spread over several
modules, the rule that makes them atomic would be too.

Atomicity. SQLite is the single source of truth: every change (products, photos
and their vectors) commits in one SQLite transaction that also bumps the
``generation`` counter, and the writer applies the same change to the in-memory FAISS index
in the same step, under the store's write lock. A search never reloads the index. The FAISS
file is a snapshot named after the generation it holds; it is written to a temporary file,
fsynced and renamed, and only then are older snapshots deleted. On open, a snapshot whose
generation is not SQLite's is ignored and the FAISS index is rebuilt from the vectors in
SQLite. So a crash at any moment leaves either the old or the new state, and FAISS can never
drift from the metadata. Photo ids come from ``AUTOINCREMENT`` and are never reused, so a
stale id cannot point at another photo.

Index type. The FAISS index type is chosen by :func:`indexer.ann.choose_index` from the photo
count, a memory budget and the user's request (meta rows ``index_type``, ``index_params``,
``index_choice``): exact Flat for small catalogues, HNSW or IVF-PQ above. :meth:`Store.save`
switches type when the catalogue outgrows its choice, and rebuilds an HNSW graph once deleted
photos, which stay in it as tombstones, pass :data:`MAX_TOMBSTONE_FRACTION` of it. A type change
commits to SQLite with a new generation, so a crash before its snapshot is written rebuilds the
new type from SQLite on the next open.
"""
from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np

from . import ann
from .check import MAX_TOMBSTONE_FRACTION, MIN_RECONSTRUCTION_COSINE, check_index  # noqa: F401 (re-exported)
from .database import DB_NAME, Batch, Database, now, warn_if_slow
from .records import (  # noqa: F401 (re-exported: the store's public names)
    INDEX_SOURCE_PREFIX,
    MANIFEST_NAME,
    REPORT_NAME,
    UPLOADS_DIR,
    Hit,
    IncompleteIndex,
    IndexBusy,
    IndexLocked,
    IndexNotWritable,
    KnownPhoto,
    ModelIdentity,
    ModelMismatch,
    PhotoRecord,
    Product,
    StoreError,
    mismatch_message,
)
from .search import FILTER_EXACT_MAX, SCORE_DECIMALS, Searcher  # noqa: F401 (re-exported)
from .vectors import VectorIndex, saved_generation, snapshot_path

FORMAT_VERSION = 1


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old or the new file: temp file, fsync, rename."""
    t0 = time.perf_counter()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    warn_if_slow(f"writing {path.name} ({len(data)} bytes, with fsync)", t0)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    """An index directory opened for reading, or for writing by one process at a time.

    Use :meth:`create` for a new index and :meth:`open` for an existing one. Writers
    take an exclusive ``flock`` on ``INDEX_DIR/.lock``; a second writer gets IndexLocked.
    Readers need no lock (SQLite in WAL mode) and follow a writer with :meth:`refresh`.
    All methods are thread-safe.
    """

    def __init__(self, path: Path, writable: bool):
        self.path = Path(path)
        self.db = Database(self.path, writable)
        self._lock_fd: int | None = None
        self._write_lock = threading.RLock()  # transactions and index switches: one at a time
        self._refresh_lock = threading.Lock()  # read-only stores: one catch-up at a time
        self.identity: ModelIdentity | None = None
        self.vectors: VectorIndex | None = None  # the one owner of the in-memory FAISS index
        self.searcher: Searcher | None = None
        #: Called between a transaction's SQLite COMMIT and its FAISS update (tests use it to force
        #: interleavings; None in normal use).
        self.after_commit_hook = None

    @property
    def writable(self) -> bool:
        return self.db.writable

    def _attach(self, identity: ModelIdentity) -> None:
        self.identity = identity
        self.vectors = VectorIndex(identity.dim)
        self.searcher = Searcher(self.db, self.vectors, identity.dim)

    # ----------------------------------------------------------------- opening
    @classmethod
    def create(cls, path: str | os.PathLike, identity: ModelIdentity) -> Store:
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
                    raise ModelMismatch(mismatch_message(path, store.identity, identity))
                return store
        path.mkdir(parents=True, exist_ok=True)
        store = cls(path, writable=True)
        store._acquire_lock()
        stamp = now()
        # all meta rows or none: an open never sees half of them
        store.db.create_schema({
            "format_version": str(FORMAT_VERSION),
            "model": json.dumps(identity.to_dict()),
            "created_at": stamp,
            "updated_at": stamp,
            "generation": "0",
            "index_type": ann.FLAT,
            "index_params": "{}",
            "index_choice": json.dumps({"requested": "auto", "memory_budget_bytes": ann.DEFAULT_MEMORY_BUDGET}),
        })
        store._attach(identity)
        store.vectors.replace(ann.new_index(ann.IndexSpec(ann.FLAT), identity.dim), ann.IndexSpec(ann.FLAT), 0,
                              np.zeros(0, np.int64))
        store.save()
        return store

    @classmethod
    def open(cls, path: str | os.PathLike, writable: bool = False) -> Store:
        """Open an existing index. Raises StoreError if ``path`` holds no index, IndexLocked if
        ``writable`` and another process writes it."""
        import sqlite3

        path = Path(path)
        if not (path / DB_NAME).is_file():
            raise StoreError(f"{path} is not a lookalike index (no {DB_NAME}); create one with 'lookalike index'")
        store = cls(path, writable)
        if writable:
            store._acquire_lock()
        try:
            try:
                meta = store.meta()
            except sqlite3.DatabaseError as e:
                if "no such table" in str(e):
                    raise IncompleteIndex(f"{path} was not fully created (interrupted?); "
                                          "run 'lookalike index' again") from None
                raise StoreError(f"{path / DB_NAME} is not a readable SQLite database: {e}") from None
            if "model" not in meta or "format_version" not in meta:
                raise IncompleteIndex(f"{path} was not fully created (interrupted?); run 'lookalike index' again")
            version = int(meta.get("format_version", "0"))
            if version != FORMAT_VERSION:
                raise StoreError(f"{path} has index format {version}; this lookalike reads format {FORMAT_VERSION}")
            store._attach(ModelIdentity.from_dict(json.loads(meta["model"])))
            store._load_index()
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        self.db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _acquire_lock(self) -> None:
        import fcntl

        try:
            fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise IndexNotWritable(f"cannot write in {self.path}: {e.strerror or e}") from None
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
            self.db.make_writable()  # every thread's connection reopens read-write
            self._load_index()
        return True

    def _db(self):
        """This thread's SQLite connection (see :class:`indexer.database.Database`)."""
        return self.db.conn()

    # -------------------------------------------------------------- reading (SQLite)
    def meta(self) -> dict[str, str]:
        return self.db.meta()

    def generation(self) -> int:
        return self.db.generation()

    def count_products(self) -> int:
        return self.db.count_products()

    def count_photos(self) -> int:
        return self.db.count_photos()

    def known_photos(self) -> dict[tuple[str, str], KnownPhoto]:
        """(product_id, source) -> what is stored for that photo, for change detection."""
        return self.db.known_photos()

    def product_ids(self) -> list[str]:
        return self.db.product_ids()

    def first_sources(self, n: int) -> list[str]:
        """The sources of the ``n`` oldest photos, as stored (see :meth:`resolve_source`)."""
        return self.db.first_sources(n)

    def categories(self) -> list[tuple[str, int]]:
        """Every category with its number of products, most common first."""
        return self.db.categories()

    def has_product(self, product_id: str) -> bool:
        return self.db.has_product(product_id)

    def get_product(self, product_id: str) -> dict:
        """The product with its photos. Raises NotFound."""
        return self.db.get_product(product_id)

    def product_vectors(self, product_id: str) -> np.ndarray:
        """float32 ``(n_photos, dim)`` embeddings of a product's photos. Raises NotFound."""
        return self.db.product_vectors(product_id, self.identity.dim)

    def iter_products(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (product_id, photo vectors ``(n, dim)``) for every product with photos."""
        return self.db.iter_products()

    def reference_vectors(self, max_rows: int = 20000, seed: int = 0) -> np.ndarray:
        """float32 ``(m, dim)``: the stored photo embeddings, or a seeded random sample of ``max_rows``
        of them: the reference of zero-shot labels' hubness correction
        (:meth:`indexer.labels.ZeroShotClassifier.set_reference`). Reads ids, then only the sample's vectors."""
        ids = self.db.photo_ids()
        if len(ids) > max_rows:
            ids = np.sort(np.random.default_rng(seed).choice(ids, max_rows, replace=False))
        return self._vectors(ids)[1] if len(ids) else np.zeros((0, self.identity.dim), np.float32)

    def _vectors(self, photo_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.db.vectors(photo_ids, self.identity.dim)

    def saved_generation(self) -> int:
        """The generation of the FAISS snapshot on disk (-1 if none)."""
        return saved_generation(self.path)

    # ------------------------------------------------------------------ search
    def search(self, queries: np.ndarray, k: int = 10, *, category: str | None = None,
               min_score: float | None = None, exclude: Iterable[str] = (), ef_search: int | None = None,
               nprobe: int | None = None) -> list[list[Hit]]:
        """Top-k products for each query vector.

        queries: float32 ``(q, dim)``, unit-norm rows (cosine = inner product).
        Returns, for each query, up to ``k`` hits sorted by score (cosine of the product's best
        photo, clamped to [-1, 1] and rounded to :data:`SCORE_DECIMALS` decimals) descending;
        ties are broken by product id. ``category`` keeps products of that category or below it
        (``Men`` matches ``Men/Tops/Tees``): min(k, matching products) come back, whatever the
        index type; ``min_score`` drops hits under it (compared with the returned score);
        ``exclude`` drops those product ids. ``ef_search`` (HNSW, 1..ann.MAX_EF_SEARCH) and
        ``nprobe`` (IVF-PQ, 1..ann.MAX_NPROBE) trade speed for recall in this call only
        (default: the index's own); an index of another type ignores them. Raises StoreError
        for a bad shape or knob.
        """
        return self.searcher.search(queries, k, category=category, min_score=min_score, exclude=exclude,
                                    ef_search=ef_search, nprobe=nprobe)

    def similar(self, product_id: str, k: int = 10, category: str | None = None, *, min_score: float | None = None,
                ef_search: int | None = None, nprobe: int | None = None,
                query: Callable[[np.ndarray], np.ndarray] | None = None) -> list[Hit]:
        """Products most like ``product_id``: each photo of it is a query, a product scores by its best
        match to any of them; the product itself is left out. ``min_score``, ``ef_search`` and
        ``nprobe`` as in :meth:`search`; ``query`` maps the photos' vectors ``(n, dim)`` to the query
        vectors (a composed query, :func:`indexer.compose.composer`). Raises NotFound."""
        return self.searcher.similar(product_id, k, category, min_score=min_score, ef_search=ef_search, nprobe=nprobe,
                                     query=query)

    # ------------------------------------------------------------------- FAISS
    def _snapshot_path(self, generation: int) -> Path:
        return snapshot_path(self.path, generation)

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
            self.db.set_meta("index_choice", json.dumps(choice))

    def _load_index(self) -> None:
        """Load the snapshot of SQLite's generation, or rebuild the index from SQLite when the
        snapshot is missing or disagrees with it, from one consistent SQLite read; then hand it to
        :attr:`vectors`. A writable store replaces a bad snapshot."""
        with self.db.read_txn():
            gen = self.generation()
            spec = self.index_spec()
            sql_ids = self.db.photo_ids()
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
        # a kill between save()'s snapshot and its manifest leaves a current snapshot and an older
        # manifest: a writable open rewrites the manifest too
        if self.writable and (rebuilt or self._manifest_generation() != gen):
            self.save(replace_snapshot=rebuilt)

    def _manifest_generation(self) -> int | None:
        """The generation manifest.json names, or None when it is missing or unreadable."""
        try:
            return int(json.loads((self.path / MANIFEST_NAME).read_text())["generation"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

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
        training = None
        n_train = ann.training_size(spec, self.count_photos())
        if n_train:
            all_ids = self.db.photo_ids()
            pick = np.sort(np.random.default_rng(0).choice(all_ids, n_train, replace=False))
            training = self._vectors(pick)[1]
        index = ann.new_index(spec, self.identity.dim, training)
        for ids, vecs in self.db.all_vectors():
            index.add_with_ids(vecs, ids)
        return index

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
            with self.db.write_txn():
                self.db.set_meta("index_type", wanted.type)
                self.db.set_meta("index_params", json.dumps(wanted.params))
                self.db.bump_generation()
                sql_ids = self.db.photo_ids()
                gen = self.generation()
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
            with self.db.read_txn():
                gen = self.generation()
                if gen == current.generation:
                    return False
                spec = self._buildable(self.index_spec())
                if spec == current.spec and current.tombstones <= MAX_TOMBSTONE_FRACTION * max(current.ntotal, 1):
                    sql_ids = self.db.photo_ids()
                    live = self.vectors.live_ids()
                    added = np.setdiff1d(sql_ids, live, assume_unique=True)
                    removed = np.setdiff1d(live, sql_ids, assume_unique=True)
                    ids, vecs = self._vectors(added)
                    self.vectors.apply(ids, vecs, removed, gen)
                    return True
            self._load_index()
            return True

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
        another transaction's :meth:`indexer.database.Batch.release_uploads` cannot remove it before the
        photo row commits."""
        self._require_writable()
        folder = self.path / UPLOADS_DIR
        folder.mkdir(exist_ok=True)
        path = folder / name
        if not path.exists():
            atomic_write(path, data)
        return f"{INDEX_SOURCE_PREFIX}{UPLOADS_DIR}/{name}"

    def _remove_unreferenced(self, sources: Iterable[str]) -> int:
        """Delete the uploaded photo files among ``sources`` that no photo row refers to any more (after a
        product was deleted or its photos replaced); returns how many were deleted. Called by
        :meth:`transaction` after its COMMIT, with the write lock held, so that no transaction adds a
        reference meanwhile (:meth:`indexer.database.Batch.release_uploads`)."""
        removed = 0
        for source in set(sources):
            if source.startswith(INDEX_SOURCE_PREFIX) and not self.db.source_referenced(source):
                path = Path(self.resolve_source(source))
                if path.is_file():
                    path.unlink()
                    removed += 1
        return removed

    def _acquire_write_lock(self, deadline: float | None) -> bool:
        """Take the store's write lock, by ``deadline`` (:func:`time.monotonic`) or, with None, whenever
        it comes free; whether it was taken."""
        if deadline is None:
            return self._write_lock.acquire()
        wait = min(max(0.0, deadline - time.monotonic()), threading.TIMEOUT_MAX)
        return self._write_lock.acquire(timeout=wait)

    # ----------------------------------------------------------------- writing
    def _require_writable(self) -> None:
        if not self.writable:
            raise StoreError("index opened read-only")

    @contextmanager
    def transaction(self, deadline: float | None = None) -> Iterator[Batch]:
        """Group changes into one atomic commit; the FAISS index is updated in the same step.

        Usage: ``with store.transaction() as tx: tx.upsert_products(...); tx.add_photos(...)``.
        On an exception nothing is written. The FAISS update happens right after the SQLite
        COMMIT, still under the write lock, and records the committed generation: a search sees
        the change entirely or not at all, and the change is searchable before this returns.

        deadline: a :func:`time.monotonic` time by which the transaction must have its locks, the
        store's write lock and SQLite's (:meth:`indexer.database.Database.write_txn`), or raise
        IndexBusy having written nothing; None (the CLI): wait as long as it takes for the store's
        lock, and :data:`indexer.database.SQLITE_BUSY_TIMEOUT_S` for SQLite's. The server gives each
        update ``write_timeout_s``, so that a write stuck on a stalled disk cannot queue every other
        write behind it without an answer.
        """
        self._require_writable()
        t0 = time.perf_counter()
        if not self._acquire_write_lock(deadline):
            raise IndexBusy(f"the index stayed busy with another write for {time.perf_counter() - t0:.1f} s (a "
                            "snapshot, a rebuild or a slow disk); nothing was written, send the request again later")
        try:
            warn_if_slow("waiting for the store's write lock", t0)
            with self.db.write_txn(deadline) as db:
                batch = Batch(db, self.identity.dim)
                yield batch
                if batch.changed:
                    self.db.bump_generation()
                gen = self.generation()
            if self.after_commit_hook is not None:
                self.after_commit_hook()
            if batch.changed:
                self.vectors.apply(*batch.vector_changes(), gen)
            if batch.release_after_commit:  # still under the write lock: no transaction adds a reference
                self._remove_unreferenced(batch.release_after_commit)
        finally:
            self._write_lock.release()

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
            "index": {"type": spec.type, "metric": "inner_product", "params": spec.params,
                      "choice": self.index_choice()},
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

    def set_labels(self, labels: dict[str, tuple[str | None, float | None]], label_set: dict | None = None) -> None:
        """Store each product's top zero-shot label and its probability ((None, None): no label fits it),
        and, given ``label_set`` (:meth:`indexer.labels.LabelSet.to_dict`), the label set they come from
        (:meth:`label_set`)."""
        with self.transaction() as tx:
            tx.db.executemany(
                "UPDATE products SET label = ?, label_score = ? WHERE id = ?",
                [(lab, None if score is None else float(score), pid) for pid, (lab, score) in labels.items()],
            )
            if label_set is not None:
                self.db.set_meta("label_set", json.dumps(label_set, ensure_ascii=False))
            tx.changed = True

    def label_set(self) -> dict | None:
        """The label set the index was last labelled with (``lookalike label INDEX``), as
        :meth:`indexer.labels.LabelSet.to_dict` gives it; None if it never was."""
        raw = self.meta().get("label_set")
        return json.loads(raw) if raw else None

    def check(self) -> dict:
        """Verify that FAISS, SQLite, the manifest and uploaded files agree: see :func:`indexer.check.check_index`."""
        return check_index(self)


def check_model(store: Store, identity: ModelIdentity) -> None:
    """Raise ModelMismatch unless ``identity`` has the weights the index was built with."""
    if not store.identity.same_weights(identity):
        raise ModelMismatch(mismatch_message(store.path, store.identity, identity))


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest.json of an index directory. Raises StoreError."""
    p = Path(path) / MANIFEST_NAME
    try:
        manifest = json.loads(p.read_text())
    except FileNotFoundError:
        raise StoreError(f"{path} is not a lookalike index (no {MANIFEST_NAME})") from None
    except ValueError as e:
        raise StoreError(f"{p} is not valid JSON: {e}") from e
    except OSError as e:
        raise StoreError(f"cannot read {p}: {e.strerror or e}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("model"), dict):
        raise StoreError(f"{p} is not a lookalike index manifest (no \"model\" object); "
                         "was this folder made by another program?")
    return manifest
