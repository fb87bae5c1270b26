"""Search over an open index: top-k products for query embeddings, grouped by product.

Search is inner product on L2-normalised vectors (= cosine similarity); a product ranks by its
best-matching photo. Candidates come from the FAISS index (:class:`indexer.vectors.VectorIndex`),
their products and metadata from SQLite (:class:`indexer.database.Database`). Nothing here
changes either.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from . import ann
from .database import Database, in_category
from .records import Hit, StoreError, stored_json
from .vectors import VectorIndex

#: The default ``min_score`` of photo queries (a photo, or a product's photos): a photo with a negative
#: cosine is unlike the query, not a lesser match. Text queries have none (their cosines sit on each
#: model's own scale). Used by the server's photo routes and ``lookalike search --image``.
PHOTO_QUERY_MIN_SCORE = 0.0
#: Scores are rounded to this many decimals (float32 cosines are good to about 1e-7).
SCORE_DECIMALS = 6
#: A category filter that matches at most this many photos is searched exactly (all of them
#: scored); a larger one goes through FAISS with an id selector.
FILTER_EXACT_MAX = 50_000


class Searcher:
    """Searches one index: its database and its in-memory FAISS index, of ``dim``-d embeddings."""

    def __init__(self, db: Database, vectors: VectorIndex, dim: int):
        self.db, self.vectors, self.dim = db, vectors, dim

    def search(self, queries: np.ndarray, k: int = 10, *, category: str | None = None,
               min_score: float | None = None, exclude: Iterable[str] = (), ef_search: int | None = None,
               nprobe: int | None = None) -> list[list[Hit]]:
        """Top-k products for each query vector: see :meth:`indexer.store.Store.search`."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise StoreError(f"query vectors must have shape (q, {self.dim}), got {queries.shape}")
        for name, value, top in (("ef_search", ef_search, ann.MAX_EF_SEARCH), ("nprobe", nprobe, ann.MAX_NPROBE)):
            if value is not None and not 1 <= value <= top:
                raise StoreError(f"{name} must be between 1 and {top}, got {value}")
        excluded = set(exclude)
        knobs = {"ef_search": ef_search, "nprobe": nprobe}
        return [self._search_one(q[None, :], k, category, min_score, excluded, knobs) for q in queries]

    def similar(self, product_id: str, k: int = 10, category: str | None = None, *, min_score: float | None = None,
                ef_search: int | None = None, nprobe: int | None = None,
                query: Callable[[np.ndarray], np.ndarray] | None = None) -> list[Hit]:
        """Products most like ``product_id``: see :meth:`indexer.store.Store.similar`."""
        vecs = self.db.product_vectors(product_id, self.dim)
        if query is not None and len(vecs):
            vecs = query(vecs)
        merged: dict[str, Hit] = {}
        for hits in self.search(vecs, k, category=category, min_score=min_score, exclude=[product_id],
                                ef_search=ef_search, nprobe=nprobe):
            for h in hits:
                if h.product_id not in merged or h.score > merged[h.product_id].score:
                    merged[h.product_id] = h
        return sorted(merged.values(), key=lambda h: (-h.score, h.product_id))[:k]

    def _exact_vectors(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.db.vectors(ids, self.dim)

    def _search_one(self, q, k, category, min_score, excluded, knobs) -> list[Hit]:
        state = self.vectors.state()
        ntotal, live = state.ntotal, state.ntotal - state.tombstones
        if ntotal == 0 or k <= 0 or live <= 0:
            return []
        allowed = None
        if category:
            allowed = self.db.category_photo_ids(category)
            if not len(allowed):
                return []
            if len(allowed) <= FILTER_EXACT_MAX:
                # exact search of the filtered photos: an approximate index can miss most of a
                # small subset, and this returns min(k, matching products) by construction
                lookup = self._exact_vectors if state.spec.type == ann.IVFPQ else self.vectors.lookup
                scores, ids = ann.rerank(q, allowed[None, :], len(allowed), lookup)
                return self._collect(scores, ids, category, min_score, excluded)[0][:k]
        # over-fetch photos: several may be of one product, and tombstones are dropped below
        fetch = min(ntotal, max(4 * k + len(excluded), 32) * ntotal // live)
        while True:
            scores, ids = self.vectors.candidates(q, fetch, allowed=allowed, **knobs)
            if state.spec.type == ann.IVFPQ:  # exact re-ranking, outside the lock: it reads SQLite
                scores, ids = ann.rerank(q, ids, fetch, self._exact_vectors)
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
        info = self.db.photo_info([int(i) for i in ids[0] if i >= 0])  # ids missing from SQLite (deleted) are skipped
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

    def _hits(self, best: dict[str, tuple[float, int]], info, category: str | None) -> list[Hit]:
        if not best:
            return []
        rows = self.db.product_rows(list(best))
        hits = []
        for pid, (score, photo_id) in best.items():
            r = rows.get(pid)
            if r is None or (category and not in_category(r[2], category)):
                continue
            _, source, photo_meta = info[photo_id]
            hits.append(Hit(pid, score, photo_id, source, r[1], r[2], stored_json(r[3]), r[4], r[5],
                            stored_json(photo_meta)))
        hits.sort(key=lambda h: (-h.score, h.product_id))
        return hits
