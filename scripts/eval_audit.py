"""How well ``lookalike audit`` finds a catalogue's real and planted faults, on the Magento catalogue.

    python scripts/eval_audit.py [--datasets ../shared/datasets] [--out out/eval-audit] [--model lookalike-base]
                                 [--wrong-categories 20] [--duplicates 20] [--seed 0]

1. Indexes the Magento catalogue (``indexer.magento.build_manifest``) and audits it: how many of
   the known oddities it finds (the bag photos ``wb01-black-0.jpg`` and ``wb04-blue-0.jpg`` that
   also belong to the bras WB01 / WB04, and the 9 stasis-ball products that share 3 photos).
2. Plants faults in a copy of the manifest (:func:`plant_faults`): ``--wrong-categories`` products
   moved to a category with another leaf and top level, and ``--duplicates`` photos of one product
   added to another product (half byte-identical copies, half lightly re-encoded: resized to 90 %
   and saved as JPEG quality 85). Indexes and audits the copy.
3. Prints one JSON object: the known oddities found, precision and recall per audit part, and
   the near-duplicate threshold measured on the model's training products
   (:func:`near_duplicate_calibration`; lookalike-base ships it as
   ``lookalike.calibration.near_duplicate_min_cosine``).

Scoring. Wrong categories: a product flagged by ``category_disagreements`` (or ``outliers``) is a
true positive when it is a planted one. Duplicates: a planted (source, target) product pair is
found when one group of ``exact_duplicates`` (byte-identical plants) or ``near_duplicates``
(re-encoded plants) holds both. Precision counts the findings new in the planted audit (product
pairs, or flagged products, that the clean audit did not report): the clean catalogue's own faults
are real findings, not false positives of the planting, and are reported separately.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import sys
import time
from itertools import combinations
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: The known oddities of the Magento export: photo file name -> the products that must share it.
KNOWN_SHARED_PHOTOS = {"wb01-black-0.jpg": {"24-WB01", "WB01"}, "wb04-blue-0.jpg": {"24-WB04", "WB04"}}
STASIS_BALL_PRODUCTS = 9
STASIS_BALL_PHOTOS = 3


def reencode(src: Path, dst: Path) -> None:
    """A light re-encoding of a photo, as a shop's second upload of it would be: 90 % size, JPEG quality 85."""
    from PIL import Image

    with Image.open(src) as im:
        im = im.convert("RGB")
        im = im.resize((round(im.width * 0.9), round(im.height * 0.9)), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=85)
    dst.write_bytes(buf.getvalue())


def plant_faults(rows: list[dict], out_dir: Path, wrong_categories: int, duplicates: int, seed: int = 0):
    """A copy of manifest ``rows`` with planted faults, and the truth.

    Wrong categories: products (with a category) moved to a category whose leaf and first level
    differ from theirs. Duplicates: a photo of a source product added as an extra photo of another
    product; even-numbered plants are byte-identical copies (written to ``out_dir``), odd ones
    re-encoded (90 % size, JPEG quality 85). Returns (rows, {"wrong_categories": {id: (old, new)},
    "duplicates": [(source id, target id, "exact"|"reencoded")]}).
    """
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [dict(r) for r in rows]
    products: dict[str, list[dict]] = {}
    for r in rows:
        products.setdefault(r["id"], []).append(r)
    categories = sorted({r["category"] for r in rows if r.get("category")})
    ids = sorted(products)
    chosen = rng.sample([p for p in ids if products[p][0].get("category")], wrong_categories)
    moved = {}
    for pid in chosen:
        old = products[pid][0]["category"]
        parts = old.split("/")
        options = [c for c in categories if c.split("/")[-1] != parts[-1] and c.split("/")[0] != parts[0]]
        new = rng.choice(options)
        for r in products[pid]:
            r["category"] = new
        moved[pid] = (old, new)
    planted = []
    others = [p for p in ids if p not in moved]
    for n in range(duplicates):
        source, target = rng.sample(others, 2)
        photo = rng.choice(products[source])
        kind = "exact" if n % 2 == 0 else "reencoded"
        dst = out_dir / f"planted-{n:02d}-{Path(photo['image']).stem}.jpg"
        if kind == "exact":
            shutil.copyfile(photo["image"], dst)
        else:
            reencode(Path(photo["image"]), dst)
        rows.append({**products[target][0], "image": str(dst), "view": "planted"})
        planted.append((source, target, kind))
    return rows, {"wrong_categories": moved, "duplicates": planted}


def index_rows(rows: list[dict], out: Path, model) -> Path:
    """Write ``rows`` as a JSONL manifest beside ``out`` and index it into ``out`` (a fresh index)."""
    from indexer.catalogue import read_catalogue
    from indexer.pipeline import index_catalogue
    from indexer.store import Store

    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest = out.with_suffix(".jsonl")
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with Store.create(out, model.identity) as store:
        index_catalogue(read_catalogue(manifest), store, model, workers=0, progress=False)
    return out


def audit_index(path: Path, model, options=None) -> dict:
    from indexer.audit import run_audit
    from indexer.store import Store

    with Store.open(path) as store:
        return run_audit(store, model, options)


def group_pairs(groups: list[dict]) -> set[frozenset]:
    """Every product pair that a duplicate group puts together."""
    return {frozenset(p) for g in groups for p in combinations(sorted(set(g["products"])), 2)}


def known_oddities(report: dict) -> dict:
    """Which known Magento oddities the (clean) audit's exact-duplicate groups report."""
    found = {}
    for name, owners in KNOWN_SHARED_PHOTOS.items():
        found[name] = any(Path(p["source"]).name == name and owners <= set(g["products"])
                          for g in report["exact_duplicates"] for p in g["photos"])
    balls = [g for g in report["exact_duplicates"] if any("stability-ball" in Path(p["source"]).name
                                                          for p in g["photos"])]
    ball_products = {pid for g in balls for pid in g["products"]}
    return {
        "shared_photos_found": sum(found.values()), "shared_photos_known": len(found), "shared_photos": found,
        "stasis_ball_photos_found": len(balls), "stasis_ball_photos_known": STASIS_BALL_PHOTOS,
        "stasis_ball_products_found": len(ball_products), "stasis_ball_products_known": STASIS_BALL_PRODUCTS,
        "oddities_found": sum(found.values()) + int(len(balls) >= STASIS_BALL_PHOTOS
                                                    and len(ball_products) >= STASIS_BALL_PRODUCTS),
        "oddities_known": len(found) + 1,
    }


def _pr(tp: int, predicted: int, truth: int) -> dict:
    return {"true_positives": tp, "predicted": predicted, "truth": truth,
            "precision": round(tp / predicted, 3) if predicted else None,
            "recall": round(tp / truth, 3) if truth else None}


def _explained(pair: frozenset, groups: list[set], planted: list[tuple[str, str]]) -> bool:
    """Whether a new duplicate pair is a plant's doing: its target joined the group of its source."""
    group = next(g for g in groups if pair <= g)
    return any(t in pair and s in group for s, t in planted)


def score(clean: dict, planted: dict, truth: dict) -> dict:
    """Precision and recall per part (module docstring)."""
    out = {}
    moved = set(truth["wrong_categories"])
    for part in ("category_disagreements", "outliers"):
        before = {f["product_id"] for f in clean[part]}
        flagged = {f["product_id"] for f in planted[part]}
        new = flagged - before
        out[part] = {**_pr(len(new & moved), len(new), len(moved)),
                     "recall_all_flags": round(len(flagged & moved) / len(moved), 3) if moved else None,
                     "clean_catalogue_flags": sorted(before)}
    every = [(s, t) for s, t, _ in truth["duplicates"]]
    for part, kind in (("exact_duplicates", "exact"), ("near_duplicates", "reencoded")):
        want = {frozenset((s, t)) for s, t, k in truth["duplicates"] if k == kind}
        groups = [set(g["products"]) for g in planted[part]]
        pairs = group_pairs(planted[part])
        new = pairs - group_pairs(clean[part])
        found = {w for w in want if w in pairs}
        out[part] = {**_pr(sum(_explained(p, groups, every) for p in new), len(new), len(want)),
                     "recall": round(len(found) / len(want), 3) if want else None, "planted_pairs_found": len(found)}
    return out


def near_duplicate_calibration(index: Path, model, products: set[str], tmp: Path) -> dict:
    """The near-duplicate threshold measured on the photos of ``products`` (the model's training
    products for lookalike-base): halfway between the 99.99th percentile of the cosine of two photos
    of different products (byte-identical files left out) and the 1st percentile of the cosine of a
    photo and its re-encoded copy (:func:`reencode`), rounded to 0.01, as ``recommended_min_score``
    of ``indexer.evaluate_retrieval`` does for ``min_score``."""
    import numpy as np

    from indexer.pipeline import embed_paths
    from indexer.store import Store

    with Store.open(index) as store:
        photos, _ = store.db.audit_rows()
        ids, vecs = zip(*store.db.all_vectors())
    vecs = np.concatenate(vecs)
    keep = np.array([p[1] in products for p in photos])
    photos, vecs = [p for p, k in zip(photos, keep) if k], vecs[keep]
    tmp.mkdir(parents=True, exist_ok=True)
    copies = []
    for n, p in enumerate(photos):
        reencode(Path(p[2]), tmp / f"{n}.jpg")
        copies.append(str(tmp / f"{n}.jpg"))
    _, copy_vecs, _ = embed_paths(model, copies)
    copy_cos = (copy_vecs * vecs).sum(axis=1)
    owner, sha = np.array([p[1] for p in photos]), np.array([p[3] for p in photos])
    other = (owner[:, None] != owner[None, :]) & (sha[:, None] != sha[None, :])
    cross = (vecs @ vecs.T)[np.triu(other, 1)]
    lo, hi = float(np.percentile(cross, 99.99)), float(np.percentile(copy_cos, 1))
    return {"photos": len(photos), "different_products_p99_99": round(lo, 4), "different_products_max":
            round(float(cross.max()), 4), "reencoded_copy_p1": round(hi, 4), "reencoded_copy_min":
            round(float(copy_cos.min()), 4), "recommended": round((lo + hi) / 2, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", type=Path, default=ROOT.parent / "shared" / "datasets")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "eval-audit")
    ap.add_argument("--model", default="lookalike-base")
    ap.add_argument("--wrong-categories", type=int, default=20)
    ap.add_argument("--duplicates", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    # absolute: the manifests written under --out name the planted photos by path, and a catalogue
    # resolves relative paths against the manifest's own folder
    args.out = args.out.resolve()

    from indexer.magento import build_manifest
    from indexer.model import load_model

    t0 = time.perf_counter()
    model = load_model(args.model, None, "cpu")
    rows, _ = build_manifest(args.datasets / "magento")
    clean = audit_index(index_rows(rows, args.out / "clean", model), model)
    split = ROOT / "data" / "models" / args.model / "magento_split.json"
    train = set(json.loads(split.read_text())["train"]) if split.is_file() else {r["id"] for r in rows}
    calibration = near_duplicate_calibration(args.out / "clean", model, train, args.out / "calibration-copies")
    planted_rows, truth = plant_faults(rows, args.out / "planted-photos", args.wrong_categories, args.duplicates,
                                       args.seed)
    planted = audit_index(index_rows(planted_rows, args.out / "planted", model), model)
    summary = {
        "model": args.model, "photos": len(rows), "products": clean["products"],
        "thresholds": planted["thresholds"],
        "clean_counts": clean["counts"], "planted_counts": planted["counts"],
        "near_duplicate_calibration": calibration,
        "known_oddities": known_oddities(clean),
        "planted": {"wrong_categories": len(truth["wrong_categories"]), "duplicates": len(truth["duplicates"])},
        "scores": score(clean, planted, truth),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
