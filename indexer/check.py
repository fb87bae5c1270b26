"""``lookalike check``: verify that an index's FAISS snapshot, SQLite database, manifest and
uploaded photo files agree, without changing anything.
"""
from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np

from . import ann
from .photo_sources import tar_member
from .records import INDEX_SOURCE_PREFIX, MANIFEST_NAME, UPLOADS_DIR
from .vectors import saved_generation, snapshot_path

#: An IVF-PQ code whose reconstruction has a lower cosine with its photo's stored embedding is
#: reported (PQ error gives ~0.8-0.95; an unrelated vector ~0).
MIN_RECONSTRUCTION_COSINE = 0.5
#: An HNSW graph is rebuilt from SQLite at the next save once tombstones (deleted photos it
#: cannot drop) exceed this fraction of it: they cost memory and over-fetching on every search.
MAX_TOMBSTONE_FRACTION = 0.2


def check_index(store) -> dict:
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
    with store.db.read_txn():  # one consistent view, also while a server writes
        return _check(store)


def _check(store) -> dict:
    problems: list[str] = []
    db = store.db.conn()
    integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
    if integrity != "ok":
        problems.append(f"sqlite integrity check: {integrity}")
    gen = store.generation()
    n_products, n_photos = store.count_products(), store.count_photos()
    orphans = db.execute(
        "SELECT COUNT(*) FROM photos WHERE product_id NOT IN (SELECT id FROM products)"
    ).fetchone()[0]
    if orphans:
        problems.append(f"{orphans} photos belong to no product")
    snap = snapshot_path(store.path, gen)
    spec = store.index_spec()
    index, faiss_ids = None, None
    notes: list[str] = []
    if not snap.is_file():
        # A run stopped between commits (kill, Ctrl-C): SQLite holds every committed photo; the
        # snapshot and manifest lag behind and are rebuilt from SQLite on the next open.
        saved = saved_generation(store.path)
        notes.append(f"the FAISS snapshot is of generation {saved}, the store of {gen} (a run was interrupted); "
                     "it is rebuilt from SQLite when the index is next opened for writing")
        spec = store._buildable(spec)
        index = store._rebuild_index(spec)
    else:
        try:
            index = faiss.read_index(str(snap))
        except RuntimeError as e:
            problems.append(f"FAISS snapshot {snap.name} is unreadable: {str(e).splitlines()[0] if str(e) else e}")
    if index is not None:
        described = ann.describe(index)
        if described is None or described.type != spec.type or described.params != spec.structure():
            kind = f"{described.type} {described.params}" if described else "an unknown type of"
            problems.append(f"FAISS snapshot {snap.name} is {kind} index; "
                            f"the store records {spec.type} {spec.structure()}")
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
            bad = _differing_vectors(store, index, faiss_ids)
            if bad and spec.type == ann.IVFPQ:
                problems.append(f"{bad} IVF-PQ codes do not decode near their stored embeddings "
                                f"(cosine < {MIN_RECONSTRUCTION_COSINE})")
            elif bad:
                problems.append(f"{bad} FAISS vectors differ from the stored embeddings")
    norms_bad = 0
    for (blob,) in db.execute("SELECT vector FROM photos"):
        v = np.frombuffer(blob, np.float32)
        if v.shape[0] != store.identity.dim or abs(float(np.dot(v, v)) - 1.0) > 1e-3:
            norms_bad += 1
    if norms_bad:
        problems.append(f"{norms_bad} stored vectors have the wrong size or are not unit-norm")
    _check_photo_files(store, problems, notes)
    manifest_path = store.path / MANIFEST_NAME
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
        "path": str(store.path),
    }


def _check_photo_files(store, problems: list[str], notes: list[str]) -> None:
    """Uploaded photos (kept in the index directory) must exist: a missing one is a problem.
    Catalogue photos that are gone from disk are a note (the catalogue owns them: search still
    finds them, their images cannot be served). Upload files no photo refers to are a note."""
    missing_uploads, missing_local = [], []
    referenced: set[str] = set()
    for (source,) in store.db.conn().execute("SELECT DISTINCT source FROM photos"):
        if source.startswith(INDEX_SOURCE_PREFIX):
            referenced.add(source)
            if not Path(store.resolve_source(source)).is_file():
                missing_uploads.append(source)
        elif "://" not in source and not Path((tar_member(source) or (source,))[0]).exists():
            missing_local.append(source)
    if missing_uploads:
        problems.append(f"{len(missing_uploads)} uploaded photos are missing from {store.path / UPLOADS_DIR} "
                        f"(e.g. {missing_uploads[0]}): upload them again")
    if missing_local:
        notes.append(f"{len(missing_local)} catalogue photos are no longer on disk (e.g. {missing_local[0]}): "
                     "search still finds them but cannot show them; 'lookalike index CATALOGUE --prune' drops "
                     "the photos a catalogue no longer lists")
    folder = store.path / UPLOADS_DIR
    if folder.is_dir():
        stray = [p.name for p in folder.iterdir()
                 if p.is_file() and f"{INDEX_SOURCE_PREFIX}{UPLOADS_DIR}/{p.name}" not in referenced]
        if stray:
            notes.append(f"{len(stray)} files in {folder} belong to no photo (e.g. {stray[0]}); they can be deleted")

def _differing_vectors(store, index, faiss_ids: np.ndarray) -> int:
    """How many photos' vectors in ``index`` (holding ``faiss_ids``, in storage order) differ from
    their stored embeddings: exactly for Flat and HNSW; for IVF-PQ, by a reconstruction cosine
    under :data:`MIN_RECONSTRUCTION_COSINE`."""
    stored = ann.stored_vectors(index)
    pos = {int(i): n for n, i in enumerate(faiss_ids)}
    bad = 0
    cur = store.db.conn().execute("SELECT photo_id, vector FROM photos")
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


