"""The in-memory FAISS index of an open store, and its one owner.

:class:`VectorIndex` holds the FAISS index, its type (:class:`indexer.ann.IndexSpec`), the
SQLite generation it reflects and the photo ids it holds. Every change goes through it, under
one lock, together with the generation it brings the index to:

- :meth:`VectorIndex.apply` by the store's writer, in the same step as the SQLite transaction
  it reflects (see :meth:`indexer.store.Store.transaction`), or by a read-only store catching up
  with another process's commits from one consistent SQLite read;
- :meth:`VectorIndex.replace` when a whole index is loaded or rebuilt.

Searches read it through :meth:`VectorIndex.candidates` and never change it, so a search can
never reload the index from an older view of the database (the fault behind acknowledged
writes that search could not find, and duplicate ids).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from . import ann


@dataclass(frozen=True)
class IndexState:
    """What a search needs, read at one instant: the index, its spec, how many of its ids are
    tombstones (deleted photos an HNSW graph cannot drop), and the generation it reflects."""

    index: faiss.Index
    spec: ann.IndexSpec
    tombstones: int
    generation: int

    @property
    def ntotal(self) -> int:
        return self.index.ntotal


class VectorIndex:
    """One FAISS index with its generation and the photo ids it holds; thread-safe.

    FAISS indexes are not safe for concurrent mutation and search: every call into the index
    runs under ``self._lock``.
    """

    def __init__(self, dim: int):
        self.dim = dim
        self._lock = threading.Lock()
        self._index = ann.new_index(ann.IndexSpec(ann.FLAT), dim)
        self._spec = ann.IndexSpec(ann.FLAT)
        self._tombstones = 0
        self._generation = -1
        self._live = np.zeros(0, np.int64)  # sorted ids of the photos it holds (tombstones left out)

    # ---------------------------------------------------------------- reading
    def state(self) -> IndexState:
        with self._lock:
            return IndexState(self._index, self._spec, self._tombstones, self._generation)

    @property
    def generation(self) -> int:
        """The SQLite generation this index reflects (-1 before the first load)."""
        with self._lock:
            return self._generation

    @property
    def spec(self) -> ann.IndexSpec:
        with self._lock:
            return self._spec

    def live_ids(self) -> np.ndarray:
        """int64 ``(n,)`` ascending: the ids of the photos it holds, tombstones left out."""
        with self._lock:
            return self._live.copy()

    def held_ids(self) -> np.ndarray:
        """int64 ``(ntotal,)``: every id in the FAISS index, tombstones included, in storage order."""
        with self._lock:
            return ann.held_ids(self._index)

    def candidates(self, queries: np.ndarray, k: int, **knobs) -> tuple[np.ndarray, np.ndarray]:
        """:func:`indexer.ann.candidates` on the current index, under the lock."""
        with self._lock:
            return ann.candidates(self._index, self._spec, queries, k, **knobs)

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The vectors of ``ids`` that the index holds in full (Flat, HNSW): (found ids int64
        ``(m,)`` ascending, float32 ``(m, dim)`` copies). Returns no rows for IVF-PQ, which keeps
        only codes. The :data:`indexer.ann.VectorLookup` for :func:`indexer.ann.rerank`."""
        wanted = np.unique(np.asarray(ids, dtype=np.int64))
        with self._lock:
            stored = ann.stored_vectors(self._index)
            if stored is None or not len(wanted):
                return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
            held = ann.held_ids(self._index)
            if not len(held):
                return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
            # ids are added in ascending order (AUTOINCREMENT, rebuilds ORDER BY photo_id): no sort needed then
            order = None if bool(np.all(held[1:] > held[:-1])) else np.argsort(held, kind="stable")
            pos = np.clip(np.searchsorted(held, wanted, sorter=order), 0, len(held) - 1)
            rows = pos if order is None else order[pos]
            found = held[rows] == wanted
            return wanted[found], stored[rows[found]].copy()

    def serialize(self) -> tuple[int, np.ndarray]:
        """(generation, the index as FAISS bytes ``uint8 (n,)``), read at one instant."""
        with self._lock:
            return self._generation, faiss.serialize_index(self._index)

    # --------------------------------------------------------------- changing
    def replace(self, index: faiss.Index, spec: ann.IndexSpec, generation: int, live_ids: np.ndarray) -> None:
        """Swap in a whole index that holds ``live_ids`` (int64, any order; ids it holds beyond
        them are tombstones) and reflects SQLite's ``generation``."""
        live = np.unique(np.asarray(live_ids, dtype=np.int64))
        tombstones = 0 if spec.removes else max(0, index.ntotal - len(live))
        with self._lock:
            self._index, self._spec, self._tombstones = index, spec, tombstones
            self._generation, self._live = generation, live

    def apply(self, added_ids: np.ndarray, added_vecs: np.ndarray, removed_ids: np.ndarray, generation: int) -> None:
        """Remove ``removed_ids`` and add ``added_vecs`` (float32 ``(a, dim)``, unit rows) under
        ``added_ids`` (int64 ``(a,)``), and record that the index now reflects ``generation``.

        Removed ids that the index does not hold are ignored; an added id it already holds is
        an error (ValueError), never a duplicate: photo ids are never reused.
        """
        added_ids = np.asarray(added_ids, dtype=np.int64).reshape(-1)
        removed_ids = np.unique(np.asarray(removed_ids, dtype=np.int64).reshape(-1))
        with self._lock:
            removed = removed_ids[np.isin(removed_ids, self._live, assume_unique=True)]
            live = np.setdiff1d(self._live, removed, assume_unique=True)
            if len(added_ids):
                if len(np.unique(added_ids)) != len(added_ids) or np.isin(added_ids, live).any():
                    raise ValueError("photo ids to add are already in the FAISS index")
            if len(removed):
                ann.remove_ids(self._index, self._spec, removed)
                if not self._spec.removes:
                    self._tombstones += len(removed)
            if len(added_ids):
                vecs = np.ascontiguousarray(added_vecs, dtype=np.float32).reshape(len(added_ids), self.dim)
                self._index.add_with_ids(vecs, added_ids)
                live = np.union1d(live, added_ids)
            self._live = live
            self._generation = generation


def snapshot_path(index_dir: Path, generation: int) -> Path:
    """The FAISS snapshot file of ``generation``: ``INDEX_DIR/vectors.g<N>.faiss``."""
    return Path(index_dir) / f"vectors.g{generation}.faiss"


def saved_generation(index_dir: Path) -> int:
    """The newest generation with a snapshot file in ``index_dir`` (-1 if none)."""
    gens = [int(p.name[len("vectors.g"):-len(".faiss")]) for p in Path(index_dir).glob("vectors.g*.faiss")]
    return max(gens, default=-1)
