"""Catalogue audit: photos reused across products, near-duplicate listings, products filed under
the wrong category, and products far from the rest of their category.

:func:`run_audit` reads an open :class:`indexer.store.Store` and returns one JSON-ready report
(:mod:`indexer.audit_report` writes it as JSON, CSV and a self-contained HTML page). Four parts,
each finding with its evidence (scores, product ids, photo ids and sources):

* ``exact_duplicates``: photos of different products with the same content hash (the ``sha256``
  of the file's bytes the index stores per photo): one group per hash.
* ``near_duplicates``: photos of different products whose cosine is at least
  ``near_duplicate_min_cosine``, grouped by product (one group per connected component of the
  products those photo pairs link, with every pair as evidence). The pairs come from the
  index's own FAISS index (:class:`indexer.vectors.VectorIndex`): each photo's ``neighbours``
  nearest photos, fetched again with 4x as many for the photos whose last neighbour still passes the
  threshold, so every pair above it is found (exactly for Flat; as well as the index finds
  neighbours for HNSW and IVF-PQ, whose candidates are re-scored with exact vectors). Cost:
  one k-NN query per photo, never all pairs (:func:`near_duplicate_pairs`); a large Flat index is
  queried through a temporary HNSW graph (:func:`audit_index`).
* ``category_disagreements``: products whose zero-shot label disagrees with their catalogue
  category with a probability margin of at least ``category_min_margin``, ranked by margin. The
  label set is the catalogue's own categories (:func:`category_label_set`), scored by
  :class:`indexer.labels.ZeroShotClassifier` (a leaf's parts are alternative prompts; its best one
  counts); a product is its photos' normalised mean embedding.
* ``outliers``: products far from the rest of their category. Per category of at least
  :data:`OUTLIER_MIN_CATEGORY_PRODUCTS` products: the cosine distance of each product to the
  category centroid, and its robust z-score ``0.6745 * (d - median) / MAD`` (Iglewicz & Hoaglin,
  1993, "How to Detect and Handle Outliers"); a product is an outlier at ``outlier_min_z`` (3.5,
  their recommendation) or above. Why this and not "best cosine to any other product of the
  category under a threshold": the z-score is relative to each category's own spread, so it needs
  no threshold on a model's cosine scale (which differs between models and between tight and
  varied categories), and it costs O(products) instead of a neighbour search per category. The
  best same-category cosine is reported as evidence.

Thresholds: ``near_duplicate_min_cosine`` is the model's calibrated value
(``lookalike.calibration.near_duplicate_min_cosine`` in its ``open_clip_config.json``) where it has
one, else :data:`DEFAULT_NEAR_DUPLICATE_MIN_COSINE`; every threshold can be given in
:class:`AuditOptions`.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from . import ann
from .errors import LookalikeError

PARTS = ("exact_duplicates", "near_duplicates", "category_disagreements", "outliers")
#: The calibration key (``lookalike.calibration`` of a model folder) the near-duplicate threshold is read from.
CALIBRATION_KEY = "near_duplicate_min_cosine"
#: Near-duplicate threshold for a model without calibration. 0.95 is a conservative cosine for
#: "the same picture": re-encoded or resized copies of a photo score 0.97 to 1.0 with CLIP-style
#: models, while photos of two different products, even of one model in two colours, rarely pass it.
DEFAULT_NEAR_DUPLICATE_MIN_COSINE = 0.95
#: Nearest photos fetched per photo in the first round of the near-duplicate search.
DEFAULT_NEIGHBOURS = 16
#: Zero-shot probability margin (predicted label's minus the catalogue category's) that counts as
#: a confident disagreement.
DEFAULT_CATEGORY_MIN_MARGIN = 0.5
#: Robust z-score from which a product is an outlier of its category (Iglewicz & Hoaglin, 1993).
DEFAULT_OUTLIER_MIN_Z = 3.5
#: Categories with fewer products are not searched for outliers: a median and MAD of fewer
#: distances say little.
OUTLIER_MIN_CATEGORY_PRODUCTS = 5
#: Most near-duplicate pairs an audit collects (:class:`AuditOptions` ``max_pairs``). A threshold far
#: under the model's near-duplicate scale (``near_duplicate_min_cosine=0.01``) makes nearly every
#: pair of photos pass: photos squared / 2 pairs, each fetched, kept and written to the report
#: (25,000 photos have 312 million pairs; each is 20 bytes in the arrays and a JSON object of 44 to
#: 56 bytes in the report). Past this many the audit stops with :class:`AuditTooManyPairs` instead.
DEFAULT_MAX_PAIRS = 100_000
#: Photos listed per product in a finding's evidence.
PHOTOS_PER_PRODUCT = 3
#: Photos embedded per query batch in the near-duplicate search.
QUERY_BATCH = 4096
#: An exact (Flat) index of more photos than this is audited through a temporary HNSW graph of its
#: vectors (:func:`audit_index`): one k-NN query per photo on a Flat index costs photos squared
#: (714 s at 100,000 on the 2-core bench machine, scripts/bench_audit.py), the graph's build and
#: queries 35 s + 41 s, and it found every planted pair there.
EXACT_AUDIT_UP_TO = 20_000
_LEAF_SPLIT = re.compile(r"\s*[/>]\s*")
_PROMPT_SPLIT = re.compile(r"\s*(?:&|,|\band\b)\s*", re.IGNORECASE)


class AuditTooLarge(LookalikeError):
    """The index holds more photos than the audit may read (``AuditOptions.max_photos``)."""

    code = "audit_too_large"
    http_status = 413


class AuditTooManyPairs(LookalikeError):
    """More photo pairs pass the near-duplicate threshold than the audit may collect
    (``AuditOptions.max_pairs``): the threshold is too low for this model."""

    code = "audit_too_many_pairs"
    http_status = 422


def parse_parts(text: str) -> tuple[str, ...]:
    """The audit parts named in a comma-separated ``text`` (``--parts``, ``?parts=``), blanks dropped;
    :class:`AuditOptions` checks them against :data:`PARTS`."""
    return tuple(p.strip() for p in text.split(",") if p.strip())


@dataclass(frozen=True)
class AuditOptions:
    """What to audit and the thresholds; None thresholds take the defaults described in the module docstring.

    near_duplicate_min_cosine: cosine in (0, 1]; neighbours: >= 1; category_min_margin: probability
    margin in [0, 1]; outlier_min_z: > 0; max_photos: refuse (:class:`AuditTooLarge`) an index with
    more photos; parts: a subset of :data:`PARTS`; max_pairs: stop (:class:`AuditTooManyPairs`) past this
    many near-duplicate pairs (None: no limit). Raises LookalikeError for a value out of range.
    """

    near_duplicate_min_cosine: float | None = None
    neighbours: int = DEFAULT_NEIGHBOURS
    category_min_margin: float = DEFAULT_CATEGORY_MIN_MARGIN
    outlier_min_z: float = DEFAULT_OUTLIER_MIN_Z
    max_photos: int | None = None
    parts: tuple[str, ...] = PARTS
    max_pairs: int | None = DEFAULT_MAX_PAIRS

    def __post_init__(self):
        t = self.near_duplicate_min_cosine
        if t is not None and not 0 < t <= 1:
            raise LookalikeError(f"near_duplicate_min_cosine must be in (0, 1], got {t}", code="bad_audit")
        if self.neighbours < 1:
            raise LookalikeError(f"neighbours must be at least 1, got {self.neighbours}", code="bad_audit")
        if not 0 <= self.category_min_margin <= 1:
            raise LookalikeError(f"category_min_margin must be in [0, 1], got {self.category_min_margin}",
                                 code="bad_audit")
        if not self.outlier_min_z > 0:
            raise LookalikeError(f"outlier_min_z must be positive, got {self.outlier_min_z}", code="bad_audit")
        if self.max_pairs is not None and self.max_pairs < 1:
            raise LookalikeError(f"max_pairs must be at least 1, got {self.max_pairs}", code="bad_audit")
        if not self.parts:
            raise LookalikeError(f"no audit part given; choose from {', '.join(PARTS)}", code="bad_audit")
        unknown = set(self.parts) - set(PARTS)
        if unknown:
            raise LookalikeError(f"unknown audit parts {sorted(unknown)}; choose from {', '.join(PARTS)}",
                                 code="bad_audit")


def near_duplicate_threshold(calibration: dict | None, option: float | None) -> tuple[float, str]:
    """(threshold, where it comes from: ``"option"``, ``"calibration"`` or ``"default"``)."""
    if option is not None:
        return float(option), "option"
    value = (calibration or {}).get(CALIBRATION_KEY)
    if value is not None:
        return float(value), "calibration"
    return DEFAULT_NEAR_DUPLICATE_MIN_COSINE, "default"


# ------------------------------------------------------------------------ near-duplicates
def knn(vectors, queries: np.ndarray, k: int, lookup: ann.VectorLookup | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` photos of ``vectors`` (a :class:`indexer.vectors.VectorIndex`) for each query.

    queries: float32 ``(q, d)`` unit rows. lookup: exact vectors by id, needed to re-score an IVF-PQ
    index's candidates (:func:`indexer.ann.rerank`). Returns (cosines float32 ``(q, k')``, ids int64
    ``(q, k')``), best first, id -1 where fewer were found.
    """
    scores, ids = vectors.candidates(queries, k)
    if vectors.spec.type == ann.IVFPQ:
        if lookup is None:
            raise ValueError("an IVF-PQ index needs a lookup of exact vectors to re-rank its candidates")
        scores, ids = ann.rerank(queries, ids, k, lookup)
    return scores, ids


def audit_index(vectors):
    """The index the near-duplicate search queries: ``vectors`` (a :class:`indexer.vectors.VectorIndex`)
    itself, or, for a Flat index of more than :data:`EXACT_AUDIT_UP_TO` photos, a temporary HNSW
    index (:func:`indexer.ann.hnsw_spec`) built over a copy of its vectors (4 bytes x dim per photo,
    plus the graph)."""
    from .vectors import VectorIndex

    ids = vectors.live_ids()
    if vectors.spec.type != ann.FLAT or len(ids) <= EXACT_AUDIT_UP_TO:
        return vectors
    found, vecs = vectors.lookup(ids)
    spec = ann.hnsw_spec()
    graph = VectorIndex(vectors.dim)
    graph.replace(ann.build_index(spec, vecs, found), spec, vectors.generation, found)
    return graph


def near_duplicate_pairs(vectors, batches, owner_of: Callable[[np.ndarray], np.ndarray], threshold: float,
                         neighbours: int = DEFAULT_NEIGHBOURS, lookup: ann.VectorLookup | None = None,
                         on_batch: Callable[[np.ndarray, np.ndarray], None] | None = None,
                         max_pairs: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of photos of different owners whose cosine is at least ``threshold``.

    vectors: the :class:`indexer.vectors.VectorIndex` holding the photos. batches: iterable of
    (ids int64 ``(b,)``, float32 ``(b, d)`` unit rows), every photo once (e.g.
    :meth:`indexer.database.Database.all_vectors`). owner_of: photo ids -> int64 owner (product)
    numbers, -1 for an id to ignore (a photo deleted since). Each photo's ``neighbours`` nearest
    are fetched; rows whose last neighbour still passes ``threshold`` are fetched again with 4x as
    many, until it does not or every photo is fetched. on_batch(ids, vecs) sees each batch (the
    audit sums product embeddings in the same pass). Returns (a ids, b ids, cosines), a < b, each
    pair once, ``(p,)`` each. Raises :class:`AuditTooManyPairs` as soon as more than ``max_pairs``
    pairs may pass (photos of one product included; each pair is found from both ends, so past
    ``2 * max_pairs`` finds): that also bounds each later k-NN round to ``8 * max_pairs`` neighbours.
    """
    found_a, found_b, found_s = [], [], []
    finds = 0
    for ids, vecs in batches:
        ids = np.asarray(ids, dtype=np.int64)
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)
        if on_batch is not None:
            on_batch(ids, vecs)
        ntotal = vectors.state().ntotal
        if not len(ids) or ntotal == 0:
            continue
        rows = np.arange(len(ids))
        k = min(neighbours + 1, ntotal)  # + 1: a photo finds itself first
        while len(rows):
            scores, nbrs = knn(vectors, vecs[rows], k, lookup)
            hit = (scores >= threshold) & (nbrs >= 0)
            r, c = np.nonzero(hit)
            a, b = ids[rows[r]], nbrs[r, c]
            keep = a != b  # not the photo itself; pairs found from both ends are merged below
            a, b, s = a[keep], b[keep], scores[r, c][keep]
            oa, ob = owner_of(a), owner_of(b)
            cross = (oa >= 0) & (ob >= 0) & (oa != ob)
            found_a.append(np.minimum(a, b)[cross])
            found_b.append(np.maximum(a, b)[cross])
            found_s.append(s[cross])
            finds += len(a)  # every pair that passes, of one product too: it bounds the next round's rows * k
            if max_pairs is not None and finds > 2 * max_pairs:
                raise AuditTooManyPairs(
                    f"more than {max_pairs:,} pairs of photos pass the near-duplicate cosine {threshold:g}: it is "
                    "too low for this model's scale; raise near_duplicate_min_cosine (or the pair limit)")
            if k >= ntotal:
                break
            more = hit[:, -1]  # the k-th neighbour still passes: there may be more
            rows = rows[more]
            k = min(4 * k, ntotal)
    if not found_a:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0, np.float32)
    a, b, s = np.concatenate(found_a), np.concatenate(found_b), np.concatenate(found_s)
    # a pair found from both ends, or in two rounds, once; its score is the same cosine either way
    key = np.stack([a, b], axis=1)
    _, first = np.unique(key, axis=0, return_index=True)
    return a[first], b[first], s[first].astype(np.float32)


def connected_components(a: np.ndarray, b: np.ndarray) -> dict[int, list[int]]:
    """Group the nodes of edges (a[i], b[i]) into connected components (union-find with path
    halving, O(edges * alpha)). Returns root -> sorted member ids, for components of 2 or more."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for x, y in zip(a.tolist(), b.tolist()):
        rx, ry = find(x), find(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    groups: dict[int, list[int]] = {}
    for x in parent:
        groups.setdefault(find(x), []).append(x)
    return {r: sorted(m) for r, m in groups.items() if len(m) > 1}


# ------------------------------------------------------------------------ categories
def category_leaf(category: str) -> str:
    """The last part of a category path: ``Men/Tops/Hoodies & Sweatshirts`` -> ``Hoodies & Sweatshirts``."""
    parts = [p for p in _LEAF_SPLIT.split(category.strip()) if p]
    return parts[-1] if parts else category.strip()


def category_label_set(categories: list[str]):
    """The zero-shot label set made of the catalogue's own categories, and category -> label name.

    Each distinct category leaf (case-insensitive) is a label; categories that share a leaf
    (``Men/Tops/Jackets``, ``Women/Tops/Jackets``) share it, since words alone cannot tell them
    apart. A leaf's prompts are its parts (``Hoodies & Sweatshirts`` -> ``hoodies``,
    ``sweatshirts``), each put through every prompt template (prompt ensembling,
    :class:`indexer.labels.LabelSet`); the label scores its best prompt. Returns (LabelSet,
    {category: label name}); raises
    :class:`indexer.labels.LabelSetError` for fewer than 2 or more than
    :data:`indexer.labels.MAX_LABELS` leaves.
    """
    from .labels import LabelSet

    names: dict[str, str] = {}
    label_of: dict[str, str] = {}
    for cat in categories:
        leaf = category_leaf(cat)
        name = names.setdefault(leaf.casefold(), leaf)
        label_of[cat] = name
    labels = []
    for name in names.values():
        prompts = [p for p in _PROMPT_SPLIT.split(name.lower()) if p]
        labels.append({"name": name, "prompts": prompts or [name.lower()]})
    return LabelSet.from_dict({"labels": labels}), label_of


def category_disagreements(classifier, product_vecs: np.ndarray, categories: list[str], label_of: dict[str, str],
                           min_margin: float) -> list[dict]:
    """Products whose top zero-shot label is not their category's, by at least ``min_margin``.

    classifier: a :class:`indexer.labels.ZeroShotClassifier` over :func:`category_label_set`'s set.
    product_vecs: float32 ``(p, d)`` unit rows; categories: each product's catalogue category.
    Returns one dict per flagged product (index ``row``, labels, probabilities, margin), by margin
    descending.
    """
    names = classifier.label_set.names
    column = {n: j for j, n in enumerate(names)}
    probs, cos = classifier.scores(product_vecs)
    assigned = np.array([column[label_of[c]] for c in categories], dtype=np.int64)
    rows = np.arange(len(categories))
    predicted = probs.argmax(axis=1)
    margin = probs[rows, predicted] - probs[rows, assigned]
    flagged = np.nonzero((predicted != assigned) & (margin >= min_margin))[0]
    out = []
    for i in flagged[np.argsort(-margin[flagged], kind="stable")]:
        top = np.argsort(-probs[i], kind="stable")[:3]
        out.append({
            "row": int(i),
            "catalogue_label": names[assigned[i]],
            "predicted_label": names[predicted[i]],
            "margin": round(float(margin[i]), 4),
            "p_predicted": round(float(probs[i, predicted[i]]), 4),
            "p_catalogue": round(float(probs[i, assigned[i]]), 4),
            "cosine_predicted": round(float(cos[i, predicted[i]]), 4),
            "cosine_catalogue": round(float(cos[i, assigned[i]]), 4),
            "top_labels": [{"label": names[j], "score": round(float(probs[i, j]), 4)} for j in top],
        })
    return out


def category_outliers(product_vecs: np.ndarray, categories: list[str], min_z: float,
                      min_products: int = OUTLIER_MIN_CATEGORY_PRODUCTS) -> list[dict]:
    """Products far from their category's centroid by a robust z-score (module docstring).

    product_vecs: float32 ``(p, d)`` unit rows; categories: each product's category (None or ""
    is no category). Returns one dict per outlier (index ``row``, distance, z-score, the category's
    median distance and size, the most similar other product of the category ``nearest_row`` and
    its cosine), by z-score descending.
    """
    by_cat: dict[str, list[int]] = {}
    for i, c in enumerate(categories):
        if c:
            by_cat.setdefault(c, []).append(i)
    out = []
    for cat, members in by_cat.items():
        if len(members) < min_products:
            continue
        idx = np.array(members)
        x = product_vecs[idx]
        centroid = x.mean(axis=0)
        centroid /= max(float(np.linalg.norm(centroid)), 1e-12)
        dist = 1.0 - x @ centroid
        med = float(np.median(dist))
        mad = float(np.median(np.abs(dist - med)))
        if mad <= 1e-9:
            continue
        z = 0.6745 * (dist - med) / mad
        for j in np.nonzero(z >= min_z)[0]:
            sims = x @ x[j]
            sims[j] = -np.inf
            nearest = int(np.argmax(sims))
            out.append({"row": int(idx[j]), "category": cat, "distance": round(float(dist[j]), 4),
                        "robust_z": round(float(z[j]), 2), "category_median_distance": round(med, 4),
                        "category_products": len(members), "nearest_row": int(idx[nearest]),
                        "nearest_cosine": round(float(sims[nearest]), 4)})
    return sorted(out, key=lambda f: -f["robust_z"])


# ------------------------------------------------------------------------ the audit
@dataclass
class _Catalogue:
    """The photos and products an audit reads, with numbers for the vector arithmetic."""

    photo_ids: np.ndarray  # int64 (n,) ascending
    product_of_photo: np.ndarray  # int64 (n,): row in product_ids
    sources: list[str]
    sha256: list[str]
    product_ids: list[str]
    titles: list[str | None]
    categories: list[str | None]
    photos_of: dict[int, list[int]] = field(default_factory=dict)  # product row -> photo rows

    def owner_of(self, ids: np.ndarray) -> np.ndarray:
        """Photo ids -> product rows; -1 for ids this read does not know."""
        if not len(self.photo_ids):
            return np.full(len(ids), -1, np.int64)
        pos = np.clip(np.searchsorted(self.photo_ids, ids), 0, len(self.photo_ids) - 1)
        return np.where(self.photo_ids[pos] == ids, self.product_of_photo[pos], -1)

    def photo(self, row: int) -> dict:
        return {"photo_id": int(self.photo_ids[row]), "product_id": self.product_ids[self.product_of_photo[row]],
                "source": self.sources[row]}

    def product(self, prow: int, photos: int = PHOTOS_PER_PRODUCT) -> dict:
        return {"product_id": self.product_ids[prow], "title": self.titles[prow], "category": self.categories[prow],
                "photos": [self.photo(r) for r in self.photos_of.get(prow, [])[:photos]]}


def _read_catalogue(store) -> _Catalogue:
    photos, products = store.db.audit_rows()
    product_ids = sorted({p[1] for p in photos})
    row_of = {pid: i for i, pid in enumerate(product_ids)}
    cat = _Catalogue(
        photo_ids=np.array([p[0] for p in photos], dtype=np.int64),
        product_of_photo=np.array([row_of[p[1]] for p in photos], dtype=np.int64),
        sources=[p[2] for p in photos], sha256=[p[3] for p in photos], product_ids=product_ids,
        titles=[products.get(pid, (None, None))[0] for pid in product_ids],
        categories=[products.get(pid, (None, None))[1] for pid in product_ids],
    )
    for r, prow in enumerate(cat.product_of_photo.tolist()):
        cat.photos_of.setdefault(prow, []).append(r)
    return cat


def _exact_duplicates(cat: _Catalogue) -> list[dict]:
    by_hash: dict[str, list[int]] = {}
    for r, h in enumerate(cat.sha256):
        by_hash.setdefault(h, []).append(r)
    groups = []
    for h, rows in by_hash.items():
        owners = sorted({cat.product_ids[cat.product_of_photo[r]] for r in rows})
        if len(owners) > 1:
            groups.append({"sha256": h, "products": owners, "cosine": 1.0, "photos": [cat.photo(r) for r in rows]})
    return sorted(groups, key=lambda g: (-len(g["products"]), g["products"]))


def _near_duplicate_groups(cat: _Catalogue, a, b, s) -> list[dict]:
    """The pairs (a, b, cosine) of photo ids grouped by product: one group per connected component of
    the products they link, so two products with four near-identical photo pairs make one group with
    four pairs. Pairs of byte-identical photos are left out (the exact duplicates part reports those)."""
    rows_of = {int(i): r for r, i in enumerate(cat.photo_ids.tolist())}
    differ = np.array([cat.sha256[rows_of[x]] != cat.sha256[rows_of[y]] for x, y in zip(a.tolist(), b.tolist())],
                      dtype=bool)
    a, b, s = a[differ], b[differ], s[differ]
    owner_a = np.array([cat.product_of_photo[rows_of[x]] for x in a.tolist()], dtype=np.int64)
    owner_b = np.array([cat.product_of_photo[rows_of[y]] for y in b.tolist()], dtype=np.int64)
    components = list(connected_components(owner_a, owner_b).values())
    group_of = {m: g for g, members in enumerate(components) for m in members}
    edges: list[list[tuple[int, int, float]]] = [[] for _ in components]
    for x, y, c, pa in zip(a.tolist(), b.tolist(), s.tolist(), owner_a.tolist()):
        edges[group_of[pa]].append((x, y, c))
    groups = []
    for members, pairs in zip(components, edges):
        pairs.sort(key=lambda p: -p[2])
        photo_ids = sorted({x for x, _, _ in pairs} | {y for _, y, _ in pairs})
        groups.append({
            "products": sorted(cat.product_ids[m] for m in members),
            "max_cosine": round(pairs[0][2], 4), "min_cosine": round(pairs[-1][2], 4),
            "photos": [cat.photo(rows_of[m]) for m in photo_ids],
            "pairs": [{"a": x, "b": y, "cosine": round(c, 4)} for x, y, c in pairs],
        })
    return sorted(groups, key=lambda g: (-len(g["products"]), -g["max_cosine"], g["products"]))


def run_audit(store, model=None, options: AuditOptions | None = None,
              progress: Callable[[str], None] | None = None) -> dict:
    """Audit the catalogue of an open :class:`indexer.store.Store`; returns the report (module docstring).

    model: the index's :class:`indexer.model.ClipModel`, for the zero-shot category part and the
    calibrated near-duplicate threshold; None skips the category part (a note says so) and uses
    :data:`DEFAULT_NEAR_DUPLICATE_MIN_COSINE` unless ``options`` gives one. Raises
    :class:`AuditTooLarge` when the index holds more than ``options.max_photos`` photos.
    """
    options = options or AuditOptions()
    say = progress or (lambda msg: None)
    n_photos = store.count_photos()
    if options.max_photos is not None and n_photos > options.max_photos:
        raise AuditTooLarge(f"the index holds {n_photos} photos; this audit may read at most {options.max_photos} "
                            "(raise the limit, e.g. audit_max_photos, or run 'lookalike audit INDEX_DIR')")
    calibration = getattr(model, "calibration", None)
    threshold, source = near_duplicate_threshold(calibration, options.near_duplicate_min_cosine)
    cat = _read_catalogue(store)
    dim = store.identity.dim
    sums = np.zeros((len(cat.product_ids), dim), np.float64)

    def add_to_products(ids: np.ndarray, vecs: np.ndarray) -> None:
        rows = cat.owner_of(ids)
        known = rows >= 0
        np.add.at(sums, rows[known], vecs[known])

    notes: list[str] = []
    report: dict = {part: [] for part in options.parts}
    batches = store.db.all_vectors(QUERY_BATCH)
    if "near_duplicates" in options.parts:
        say(f"near-duplicates: {n_photos} photos, cosine >= {threshold}")
        a, b, s = near_duplicate_pairs(audit_index(store.vectors), batches, cat.owner_of, threshold, options.neighbours,
                                       lookup=store._vectors, on_batch=add_to_products, max_pairs=options.max_pairs)
        report["near_duplicates"] = _near_duplicate_groups(cat, a, b, s)
    else:
        for ids, vecs in batches:
            add_to_products(ids, vecs)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    product_vecs = (sums / np.maximum(norms, 1e-12)).astype(np.float32)
    if "exact_duplicates" in options.parts:
        report["exact_duplicates"] = _exact_duplicates(cat)
    cats = cat.categories
    if "category_disagreements" in options.parts:
        report["category_disagreements"] = _category_part(model, product_vecs, cat, options, notes, say)
    if "outliers" in options.parts:
        say("outliers")
        found = category_outliers(product_vecs, cats, options.outlier_min_z)
        report["outliers"] = [{**cat.product(f.pop("row")), **f,
                               "nearest_product": cat.product_ids[f.pop("nearest_row")]} for f in found]
    identity = store.identity
    return {
        "index": str(store.path),
        "model": identity.name,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "products": len(cat.product_ids),
        "photos": len(cat.photo_ids),
        "thresholds": {"near_duplicate_min_cosine": threshold, "near_duplicate_threshold_source": source,
                       "neighbours": options.neighbours, "category_min_margin": options.category_min_margin,
                       "outlier_min_z": options.outlier_min_z},
        "counts": {part: len(report[part]) for part in options.parts},
        **report,
        "notes": notes,
    }


def _category_part(model, product_vecs, cat: _Catalogue, options: AuditOptions, notes: list[str], say) -> list[dict]:
    from .labels import LabelSetError, ZeroShotClassifier

    if model is None:
        notes.append("category_disagreements skipped: no model to embed the category names")
        return []
    rows = [i for i, c in enumerate(cat.categories) if c]
    try:
        label_set, label_of = category_label_set(sorted({cat.categories[i] for i in rows}))
    except LabelSetError as e:
        notes.append(f"category_disagreements skipped: {e}")
        return []
    say(f"category disagreements: {len(rows)} products, {len(label_set.labels)} category labels")
    clf = ZeroShotClassifier(model, label_set)
    found = category_disagreements(clf, product_vecs[rows], [cat.categories[i] for i in rows], label_of,
                                   options.category_min_margin)
    return [{**cat.product(rows[f.pop("row")]), **f} for f in found]
