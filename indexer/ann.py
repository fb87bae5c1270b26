"""Choosing, building and searching the FAISS index types: exact Flat, HNSW graph, IVF-PQ.

(Slightly over our ~400-line guide: the three types' build, describe, remove and search
functions, and the workarounds for FAISS fast-scan bugs, are one job: what a FAISS index can do.)

All three use inner product on L2-normalised float32 vectors (= cosine) and hold
caller-chosen int64 ids (photo ids in the store):

* ``Flat``  — ``IndexIDMap2(IndexFlatIP)``: exact, ``4*d`` bytes per vector, search time
  linear in the catalogue size.
* ``HNSW``  — ``IndexIDMap(IndexHNSWFlat)``: a graph over the full vectors (Malkov & Yashunin,
  2018, arXiv:1603.09320). Scores are exact cosines of the photos it finds. FAISS cannot remove
  a vector from the graph, so deleted ids stay in it as tombstones (:func:`remove_ids`).
* ``IVFPQ`` — an inverted-file index with product-quantised codes and its own ids: a k-means
  coarse quantiser (``nlist`` lists) and ``pq_m`` sub-quantiser codes per vector (Jégou et al.,
  2011, "Product quantization for nearest neighbor search"). It keeps only the codes in memory;
  the ``rerank * k`` best PQ candidates are re-scored with their exact vectors, supplied by the
  caller (the store reads them from SQLite), so returned scores are exact cosines. Two layouts,
  told apart by the ``fast_scan`` parameter:

  - ``fast_scan=True`` (built from now on): ``IndexIVFPQFastScan``, 4-bit codes (16 centroids per
    sub-quantiser) stored in blocks of 32 vectors, so that a search scores them with SIMD shuffles
    from a look-up table held in registers (André et al., 2015, "Cache locality is not enough";
    FAISS wiki, "Fast accumulation of PQ and AQ codes (FastScan)"). Twice as many sub-quantisers
    as the plain layout (2 dimensions each) give the same code size: ``dim/4`` bytes.
  - ``fast_scan=False``: ``IndexIVFPQ``, 8-bit codes scored one table look-up at a time: the
    layout of indexes built before fast-scan, which still open and search as before.

Per-request knobs (``ef_search`` for HNSW, ``nprobe`` for IVF-PQ) go to FAISS as a
``SearchParameters`` object on each call and never change the index's stored defaults, so
concurrent searches with different knobs do not interfere. ``IndexIDMap`` passes the parameters
through to the HNSW index it wraps (FAISS >= 1.7.3, ``IndexIDMapTemplate::search``).
IVF-PQ does not go through an id map: ``IndexIDMap.remove_ids`` compacts its id table by
position, which is wrong for an IVF index (whose lists keep the positions they were given), so
the IVF index stores the photo ids itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import faiss
import numpy as np

FLAT, HNSW, IVFPQ = "Flat", "HNSW", "IVFPQ"
#: ``--index-type`` names and the index type each selects ("auto" chooses by size and budget).
REQUESTABLE = {"auto": None, "flat": FLAT, "hnsw": HNSW, "ivfpq": IVFPQ}

#: Auto choice keeps exact search below this many vectors. The store searches one query at a
#: time, and a single exact query over 512-d vectors took 23 ms at 100,000, 46 ms at 200,000 and
#: 78 ms at 400,000 on one core of the 2-core bench machine: past 200,000 search time alone
#: nears 50 ms a query and keeps growing linearly, while HNSW answers in under a millisecond
#: with recall@10 >= 0.95 (scripts/bench_search.py) and builds in under a minute at that size,
#: so the approximate index starts to pay for its build time and recall loss.
EXACT_UP_TO = 200_000
#: Default memory budget for the in-memory index (``--memory-budget``).
DEFAULT_MEMORY_BUDGET = 4 * 2**30

#: HNSW neighbours per node (2*M on the bottom layer). The FAISS wiki suggests 4 to 64, more for
#: higher recall on high-dimensional data; each unit of M costs 8 bytes per vector.
HNSW_M = 32
#: Candidate list size while building (FAISS's default, 40): build time grows about linearly with it.
HNSW_EF_CONSTRUCTION = 40
#: Default candidate list size while searching: recall@10 0.969 at 1M on the bench data (0.934
#: with 48), at 122x the queries/s of Flat.
HNSW_EF_SEARCH = 96
#: Bits per PQ sub-quantiser code in the plain layout (256 centroids each), the standard setting.
IVFPQ_NBITS = 8
#: Bits per code in the fast-scan layout: FastScan supports only 4 (16 centroids, so a sub-quantiser's
#: look-up table fits one SIMD register; FAISS wiki, "Fast accumulation of PQ and AQ codes").
FASTSCAN_NBITS = 4
#: Plain-layout PQ candidates re-scored with exact vectors per result wanted (recall@10 at 1M on the bench
#: data, 32 of 1024 lists: 0.964 with 4, 0.970 with 8 and 16: the lists probed limit it, not PQ).
IVFPQ_RERANK = 4
#: Candidates re-scored per result wanted for FastScan's 4-bit codes: twice the plain layout's,
#: because 16 centroids per pair of dimensions rank candidates more coarsely than 256 per four.
#: Where every list is visited (20,000 64-d vectors, 16 lists) recall@10 is 0.915 with 4 and 0.982
#: with 8 (plain: 0.953 with 4); on 512-d bench data the lists visited limit it (300,000 vectors,
#: 32 of 256 lists: 0.959 with 4, 0.964 with 8). The store reads 8 exact vectors per result
#: from SQLite instead of 4.
FASTSCAN_RERANK = 8
#: Fewest lists an IVF-PQ search visits by default: with fewer, the true top 10 of the bench's
#: clustered data often lie in lists not visited (recall@10 0.89 with 16 of 128 lists at 100k,
#: 0.94 with 16 of 1024 at 1M; 0.96 with 32 at both).
IVFPQ_MIN_NPROBE = 32
#: IVF-PQ needs this many vectors to train its 256-centroid PQ codebooks (FAISS warns below 39
#: training points per centroid); smaller catalogues stay exact.
IVFPQ_MIN_VECTORS = 39 * 2**IVFPQ_NBITS
#: k-means iterations for the coarse quantiser and the PQ codebooks: 10 instead of FAISS's 25
#: trains 2.5x faster; the recall that scripts/bench_search.py reports is with 10.
IVF_KMEANS_ITERATIONS = 10
#: PQ codebook training uses at most this many vectors per centroid (FAISS: 256). Each of the
#: ``pq_m`` low-dimensional k-means is slow in FAISS (BLAS on 4-d slices), and 64 points per
#: centroid suffice for 4 dimensions.
PQ_TRAIN_PER_CENTROID = 64
#: Training vectors per IVF list (FAISS warns under 39; k-means subsamples above 256).
IVF_TRAIN_PER_LIST = 40
#: Vectors per FastScan block (FAISS's ``bbs``, its default): codes are stored and scored 32 at a time.
FASTSCAN_BLOCK = 32

#: Largest ``ef_search`` / ``nprobe`` accepted per request.
MAX_EF_SEARCH = 4096
MAX_NPROBE = 65536

_STRUCTURAL = {FLAT: (), HNSW: ("M",), IVFPQ: ("nlist", "pq_m", "nbits", "fast_scan")}
#: Layout parameters that manifests written before they existed lack, and the value such an index has.
_STRUCTURAL_DEFAULTS = {"fast_scan": False}


@dataclass(frozen=True)
class IndexSpec:
    """An index type and its parameters.

    ``params`` for HNSW: ``M``, ``ef_construction``, ``ef_search`` (default per query).
    For IVFPQ: ``nlist`` (inverted lists), ``pq_m`` (sub-quantisers), ``nbits`` (bits per
    sub-quantiser code), ``fast_scan`` (the FastScan layout; absent, i.e. False, in indexes built
    before it), ``nprobe`` (default lists visited per query), ``rerank`` (exactly re-scored
    candidates per result). Flat has none.
    """

    type: str
    params: dict = field(default_factory=dict)

    @property
    def removes(self) -> bool:
        """Whether deleted ids leave the index (False for HNSW: they stay as tombstones)."""
        return self.type != HNSW

    def structure(self) -> dict:
        """The parameters that fix the index's layout (a snapshot must match them)."""
        return {k: self.params[k] if k in self.params else _STRUCTURAL_DEFAULTS[k] for k in _STRUCTURAL[self.type]}

    @property
    def fast_scan(self) -> bool:
        """Whether this is an IVF-PQ index in the FastScan layout."""
        return self.type == IVFPQ and bool(self.params.get("fast_scan", False))


def hnsw_spec(M: int = HNSW_M, ef_construction: int = HNSW_EF_CONSTRUCTION, ef_search: int = HNSW_EF_SEARCH) -> IndexSpec:
    return IndexSpec(HNSW, {"M": M, "ef_construction": ef_construction, "ef_search": ef_search})


def ivfpq_spec(n: int, dim: int, rerank: int | None = None, fast_scan: bool = True) -> IndexSpec:
    """IVF-PQ parameters for ``n`` vectors of ``dim`` values, in the FastScan layout unless
    ``fast_scan`` is False (the plain layout of indexes built before it).

    ``nlist`` is the power of two nearest ``n/1000`` up to a million vectors and ``sqrt(n)``
    beyond (pgvector's starting point, "Choose an appropriate number of lists", pgvector README):
    it keeps k-means training affordable on a few cores, where the FAISS wiki's ``4*sqrt(n)``
    (4096 lists at 1M) did not finish training within 10 minutes on the 2-core bench machine.
    ``nprobe`` is ``sqrt(nlist)`` (pgvector's starting point too) but at least
    :data:`IVFPQ_MIN_NPROBE`. Plain layout: ``pq_m`` is the largest divisor of ``dim`` not
    above ``dim/4`` (128 one-byte codes for 512-d, 4 dimensions per sub-quantiser): with 64 codes,
    recall@10 at 1M stayed at ~0.94 even re-ranking 8 candidates per result and probing 256 lists.
    FastScan: the largest divisor not above ``dim/2`` (256 half-byte codes for 512-d, 2 dimensions
    per sub-quantiser), the same ``dim/4`` bytes per vector. ``rerank`` defaults to
    :data:`FASTSCAN_RERANK` or :data:`IVFPQ_RERANK`.
    """
    target = n / 1000 if n <= 1_000_000 else math.sqrt(n)
    nlist = 2 ** max(0, round(math.log2(max(target, 1))))
    nlist = max(1, min(nlist, n // IVF_TRAIN_PER_LIST or 1))
    per_code = 2 if fast_scan else 4
    pq_m = max(m for m in range(1, max(1, dim // per_code) + 1) if dim % m == 0)
    nprobe = min(nlist, max(IVFPQ_MIN_NPROBE, round(math.sqrt(nlist))))
    nbits = FASTSCAN_NBITS if fast_scan else IVFPQ_NBITS
    rerank = rerank or (FASTSCAN_RERANK if fast_scan else IVFPQ_RERANK)
    return IndexSpec(IVFPQ, {"nlist": nlist, "pq_m": pq_m, "nbits": nbits, "fast_scan": fast_scan, "nprobe": nprobe,
                             "rerank": rerank})


def bytes_per_vector(spec: IndexSpec, dim: int, n: int) -> float:
    """Estimated in-memory bytes per vector of an index of ``n`` vectors.

    From the FAISS wiki, "Guidelines to choose an index": Flat stores ``4*d`` bytes; HNSW ``4*d +
    2*M*4`` (its bottom layer's links; upper layers add ``M*4/(M-1)`` on average, each vector
    also has a level and an offset, 12 bytes); IVF-PQ stores ``pq_m*nbits/8`` bytes of code plus
    its 8-byte id in the inverted list, and shares the ``nlist*d*4`` centroids and ``d*2**nbits*4``
    codebook bytes; FastScan lists are stored in whole blocks of 32 codes (``bbs``), half a block
    of padding per list on average. Flat and HNSW add the 8-byte id map. The hash table of
    ``IndexIDMap2`` (Flat) is not serialised and not counted.
    """
    d = dim
    if spec.type == FLAT:
        return 4 * d + 8
    if spec.type == HNSW:
        M = spec.params["M"]
        return 4 * d + 8 * M + 4 * M / (M - 1) + 12 + 8
    p = spec.params
    code = p["pq_m"] * p["nbits"] / 8
    shared = p["nlist"] * d * 4 + d * 2 ** p["nbits"] * 4
    if spec.fast_scan:
        shared += p["nlist"] * (FASTSCAN_BLOCK / 2) * math.ceil(p["pq_m"] / 2) * 2 * p["nbits"] / 8
    return code + 8 + shared / max(n, 1)


def choose_index(n: int, dim: int, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET, requested: str = "auto") -> IndexSpec:
    """The index to build for ``n`` vectors of ``dim`` values.

    ``requested``: "auto", "flat", "hnsw" or "ivfpq" (case-insensitive). Auto keeps Flat below
    :data:`EXACT_UP_TO` vectors; above, HNSW when ``n * bytes_per_vector`` fits
    ``memory_budget_bytes``, else IVF-PQ (whose re-ranking vectors stay on disk). IVF-PQ, asked
    for or chosen, falls back to Flat below :data:`IVFPQ_MIN_VECTORS` (too few to train on).
    An explicit type is built even when it exceeds the budget. Raises ValueError for an unknown
    ``requested``.
    """
    key = requested.lower()
    if key not in REQUESTABLE:
        raise ValueError(f"unknown index type {requested!r}; use one of {', '.join(REQUESTABLE)}")
    wanted = REQUESTABLE[key]
    if wanted is None:
        if n < EXACT_UP_TO:
            wanted = FLAT
        elif n * bytes_per_vector(hnsw_spec(), dim, n) <= memory_budget_bytes:
            wanted = HNSW
        else:
            wanted = IVFPQ
    if wanted == HNSW:
        return hnsw_spec()
    if wanted == IVFPQ and n >= IVFPQ_MIN_VECTORS:
        return ivfpq_spec(n, dim)
    return IndexSpec(FLAT)


def training_size(spec: IndexSpec, n: int) -> int:
    """How many of ``n`` vectors :func:`new_index` needs to train ``spec`` (0: no training)."""
    if spec.type != IVFPQ:
        return 0
    return min(n, max(IVF_TRAIN_PER_LIST * spec.params["nlist"], IVFPQ_MIN_VECTORS))


def new_index(spec: IndexSpec, dim: int, training: np.ndarray | None = None) -> faiss.Index:
    """An empty index of type ``spec`` for ``dim``-d vectors, trained on ``training`` if it needs it.

    training: float32 ``(t, dim)`` unit vectors, ``t >= training_size(spec, n)``; IVF-PQ only.
    Raises ValueError when IVF-PQ gets fewer than ``nlist`` or 256 training vectors.
    """
    if spec.type == FLAT:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    p = spec.params
    if spec.type == HNSW:
        graph = faiss.IndexHNSWFlat(dim, p["M"], faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = p["ef_construction"]
        graph.hnsw.efSearch = p["ef_search"]
        return faiss.IndexIDMap(graph)
    training = np.ascontiguousarray(training, dtype=np.float32) if training is not None else np.zeros((0, dim), np.float32)
    if len(training) < max(p["nlist"], 2 ** p["nbits"]):
        raise ValueError(f"IVF-PQ with {p['nlist']} lists needs at least {max(p['nlist'], 2 ** p['nbits'])} "
                         f"training vectors, got {len(training)}")
    if spec.fast_scan:
        index = faiss.IndexIVFPQFastScan(faiss.IndexFlatIP(dim), dim, p["nlist"], p["pq_m"], p["nbits"],
                                         faiss.METRIC_INNER_PRODUCT, FASTSCAN_BLOCK)
        # codes of the vectors themselves, not of their residuals (FAISS's default for FastScan): one
        # look-up table per query instead of one per list visited, and 3x faster training; the exact
        # re-ranking makes up the coarser codes (same recall@10 as residuals on the bench data)
        index.by_residual = False
    else:
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, p["nlist"], p["pq_m"], p["nbits"],
                                 faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = IVF_KMEANS_ITERATIONS
    index.cp.spherical = True  # unit-norm centroids: the right k-means for inner product on the sphere
    index.pq.cp.niter = IVF_KMEANS_ITERATIONS
    index.pq.cp.max_points_per_centroid = PQ_TRAIN_PER_CENTROID
    index.nprobe = p["nprobe"]
    index.train(training)
    return index


def build_index(spec: IndexSpec, vectors: np.ndarray, ids: np.ndarray) -> faiss.Index:
    """An index of type ``spec`` holding ``vectors`` (float32 ``(n, dim)``, unit rows) under ``ids``
    (int64 ``(n,)``, unique). IVF-PQ trains on a seeded random sample of ``vectors``."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    training = None
    if spec.type == IVFPQ:
        pick = np.random.default_rng(0).choice(len(vectors), training_size(spec, len(vectors)), replace=False)
        training = vectors[np.sort(pick)]
    index = new_index(spec, vectors.shape[1], training)
    index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
    return index


def describe(index: faiss.Index) -> IndexSpec | None:
    """The type and layout parameters of a loaded index, or None if it is none of ours."""
    if isinstance(index, (faiss.IndexIVFPQ, faiss.IndexIVFPQFastScan)) and index.metric_type == faiss.METRIC_INNER_PRODUCT:
        return IndexSpec(IVFPQ, {"nlist": index.nlist, "pq_m": index.pq.M, "nbits": index.pq.nbits,
                                 "fast_scan": isinstance(index, faiss.IndexIVFPQFastScan)})
    inner = faiss.downcast_index(index.index) if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)) else None
    if isinstance(inner, faiss.IndexFlatIP):
        return IndexSpec(FLAT)
    if isinstance(inner, faiss.IndexHNSWFlat) and inner.metric_type == faiss.METRIC_INNER_PRODUCT:
        return IndexSpec(HNSW, {"M": inner.hnsw.nb_neighbors(1)})
    return None


def held_ids(index: faiss.Index) -> np.ndarray:
    """int64 ``(ntotal,)``: every id the index holds, tombstones included, in storage order."""
    if isinstance(index, faiss.IndexIVF):
        lists = index.invlists
        parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
                 for i in range(index.nlist) if lists.list_size(i)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    return faiss.vector_to_array(index.id_map).astype(np.int64)


def remove_ids(index: faiss.Index, spec: IndexSpec, ids: np.ndarray) -> None:
    """Remove ``ids`` from the index; for HNSW, which cannot, leave them as tombstones.

    Callers must drop tombstone ids from results (the store drops every id not in SQLite).
    """
    if not spec.removes:
        return
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    lists = faiss.downcast_InvertedLists(index.invlists) if isinstance(index, faiss.IndexIVFFastScan) else None
    if not isinstance(lists, faiss.BlockInvertedLists):
        index.remove_ids(ids)
        return
    # FastScan keeps each list's codes in blocks of 32. Its remove_ids moves a list's last codes
    # into the freed slots but leaves their old bits in the slots vacated at the end of the last
    # block, and add_with_ids later packs new codes into those slots as if they were zero: the
    # new codes come out corrupt (faiss 1.15.1: re-added vectors decoded to cosine ~0.3 with
    # themselves and search missed them). Zeroing the vacated slots keeps adds exact.
    before = [lists.list_size(i) for i in range(index.nlist)]
    index.remove_ids(ids)
    zero = np.zeros(lists.packer.code_size, np.uint8)
    per_block = lists.n_per_block
    for list_no, size in enumerate(before):
        now = lists.list_size(list_no)
        if now < size:
            codes = lists.get_codes(list_no)
            for offset in range(now, min(size, -(-now // per_block) * per_block)):
                lists.packer.pack_1_c(faiss.swig_ptr(zero), offset, codes)


def stored_vectors(index: faiss.Index) -> np.ndarray | None:
    """float32 ``(ntotal, d)`` vectors of a Flat or HNSW index in :func:`held_ids` order (a view),
    or None for IVF-PQ, which keeps only codes (see :func:`reconstruct`)."""
    if isinstance(index, faiss.IndexIVF):
        return None
    inner = faiss.downcast_index(index.index)
    flat = faiss.downcast_index(inner.storage) if isinstance(inner, faiss.IndexHNSW) else inner
    return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)


def reconstruct(index: faiss.IndexIVF, ids: np.ndarray) -> np.ndarray:
    """float32 ``(len(ids), d)`` PQ reconstructions of ``ids`` from an IVF-PQ index of either layout
    (plain: centroid + decoded residual; FastScan: the decoded code, unpacked from its block by
    ``IndexIVFFastScan::reconstruct_from_offset``).

    Builds a hash-table direct map on ``index`` (extra memory: use on a copy, e.g. one read for
    a check). Raises RuntimeError for an id the index does not hold.
    """
    if isinstance(index, faiss.IndexIVFFastScan) and getattr(index, "fine_quantizer", True) is None:
        # faiss 1.15's read_index leaves a FastScan index's decoder unset (its constructor points it
        # at the index's own PQ); decoding would then dereference a null pointer and crash
        index.fine_quantizer = index.pq
    index.set_direct_map_type(faiss.DirectMap.Hashtable)
    return index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))


VectorLookup = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def candidates(
    index: faiss.Index,
    spec: IndexSpec,
    queries: np.ndarray,
    k: int,
    *,
    ef_search: int | None = None,
    nprobe: int | None = None,
    allowed: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The raw FAISS search: for Flat and HNSW the top-``k``; for IVF-PQ the ``k * rerank`` best
    by PQ-approximate score, to pass to :func:`rerank`.

    queries: float32 ``(q, d)`` unit rows. ``ef_search`` (HNSW) and ``nprobe`` (IVF-PQ) override
    the spec's defaults for this call only; each is ignored by the other types and by Flat.
    ``allowed``: int64 ids; when given, only they can be returned (FAISS ``IDSelectorBatch`` in the
    search parameters: exact for Flat; HNSW and IVF-PQ may find fewer than ``k`` of a small set).
    Returns (scores float32 ``(q, c)``, ids int64 ``(q, c)``), best first, id -1 where FAISS found
    fewer.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    # the selector must outlive the search call: FAISS keeps only a raw pointer to it
    sel = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64)) if allowed is not None else None
    if spec.type == FLAT:
        return index.search(queries, k, params=faiss.SearchParameters(sel=sel) if sel is not None else None)
    if spec.type == HNSW:
        params = faiss.SearchParametersHNSW(efSearch=ef_search or spec.params["ef_search"])
    else:
        params = faiss.SearchParametersIVF(nprobe=nprobe or spec.params["nprobe"])
        k = k * spec.params["rerank"]
    if sel is not None:
        params.sel = sel
    return index.search(queries, k, params=params)


def search(
    index: faiss.Index,
    spec: IndexSpec,
    queries: np.ndarray,
    k: int,
    *,
    ef_search: int | None = None,
    nprobe: int | None = None,
    lookup: VectorLookup | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` ids by inner product for each query: :func:`candidates`, re-ranked for IVF-PQ.

    lookup: required for IVF-PQ, see :func:`rerank`. Returns (scores float32 ``(q, k)``, ids int64
    ``(q, k)``), best first, id -1 where fewer were found. Scores are exact cosines for every type.
    Raises ValueError for IVF-PQ without ``lookup``.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if spec.type == IVFPQ and lookup is None:
        raise ValueError("IVF-PQ search needs a lookup of exact vectors to re-rank its candidates")
    scores, ids = candidates(index, spec, queries, k, ef_search=ef_search, nprobe=nprobe)
    if spec.type == IVFPQ:
        return rerank(queries, ids, k, lookup)
    return scores, ids


def rerank(queries: np.ndarray, cand: np.ndarray, k: int, lookup: VectorLookup) -> tuple[np.ndarray, np.ndarray]:
    """Re-score candidate ids ``cand`` (int64 ``(q, c)``, -1 = none) with exact vectors; keep the best ``k``.

    queries: float32 ``(q, d)``. lookup: ``ids -> (found_ids, vectors)``, the exact float32
    ``(m, d)`` vectors of the ids it knows with ``found_ids`` ascending; ids it does not know
    (deleted photos) are dropped. Returns (scores float32 ``(q, k)``, ids int64 ``(q, k)``),
    best first, padded with -inf / -1.
    """
    found, vecs = lookup(np.unique(cand[cand >= 0]))
    found = np.asarray(found, dtype=np.int64)
    pos = np.clip(np.searchsorted(found, cand), 0, max(len(found) - 1, 0))
    known = (cand >= 0) & (found[pos] == cand) if len(found) else np.zeros(cand.shape, bool)
    scores = np.full(cand.shape, -np.inf, np.float32)
    if known.any():
        # one gather of the candidates' vectors, (q, c, d), and a batched matrix-vector product:
        # re-ranking thousands of queries' candidates moves each vector through memory once
        exact = np.matmul(vecs[np.where(known, pos, 0)], queries[:, :, None])[..., 0]
        scores = np.where(known, exact, scores).astype(np.float32, copy=False)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top_scores = np.take_along_axis(scores, order, axis=1)
    top_ids = np.where(np.isfinite(top_scores), np.take_along_axis(cand, order, axis=1), -1)
    if top_scores.shape[1] < k:
        pad = k - top_scores.shape[1]
        top_scores = np.pad(top_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        top_ids = np.pad(top_ids, ((0, 0), (0, pad)), constant_values=-1)
    return top_scores, top_ids
