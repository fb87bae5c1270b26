"""Catalogue retrieval quality on the Magento photos, and the score thresholds measured from it.

Near-duplicate recall@1 (each photo queried with the copies of :data:`NEAR_DUP_TRANSFORMS`),
same-product recall@5, zero-shot category accuracy and cosine-score percentiles
(:func:`eval_magento`); how often queries unlike anything in the catalogue still get an answer
(:func:`unrelated_queries`); and the model's calibration (:func:`calibrate`), derived from those
same distributions. :mod:`indexer.evaluate` runs these with the zero-shot benchmarks.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from .datasets import category_phrase, iter_cifar10
from .images import open_image
from .labels import LabelSet, ZeroShotClassifier
from .model import ClipModel

MAGENTO_TEMPLATES = ("a photo of {}.", "a product photo of {}.", "{}")


def near_duplicate(image: Image.Image) -> Image.Image:
    """Centre crop to 85 % of each side, resize to 50 %, brightness x1.2, JPEG quality 40."""
    w, h = image.size
    cw, ch = round(w * 0.85), round(h * 0.85)
    left, top = (w - cw) // 2, (h - ch) // 2
    out = image.crop((left, top, left + cw, top + ch))
    out = out.resize((max(1, cw // 2), max(1, ch // 2)), Image.BICUBIC)
    out = ImageEnhance.Brightness(out).enhance(1.2)
    return _jpeg(out, 40)


def exif_rotated(image: Image.Image) -> Image.Image:
    """Store the photo turned 90 degrees with EXIF orientation 6 (rotate 90 CW to view), then reopen it."""
    stored = image.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise; orientation 6 turns it back
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return open_image(buf.getvalue())


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return open_image(buf.getvalue())


def _centre_crop(image: Image.Image, fraction: float) -> Image.Image:
    w, h = image.size
    cw, ch = max(1, round(w * fraction)), max(1, round(h * fraction))
    left, top = (w - cw) // 2, (h - ch) // 2
    return image.crop((left, top, left + cw, top + ch))


# The copies a shopper's or a scraper's photo of a catalogue photo tends to be; each made from the
# full-size photo, one transform at a time (plus the two combined copies of the first release).
NEAR_DUP_TRANSFORMS = {
    "mirror": ImageOps.mirror,
    "squash_to_square": lambda im: im.resize((max(im.size),) * 2, Image.BICUBIC),
    "rotate_30_black": lambda im: im.rotate(30, resample=Image.BICUBIC, expand=True),
    "rotate_30_white": lambda im: im.rotate(30, resample=Image.BICUBIC, expand=True, fillcolor=(255, 255, 255)),
    "greyscale": lambda im: ImageOps.grayscale(im).convert("RGB"),
    "centre_crop_60": lambda im: _centre_crop(im, 0.6),
    "half_size": lambda im: im.resize((max(1, im.width // 2), max(1, im.height // 2)), Image.BICUBIC),
    "jpeg_30": lambda im: _jpeg(im, 30),
    "brighter_30": lambda im: ImageEnhance.Brightness(im).enhance(1.3),
    "darker_30": lambda im: ImageEnhance.Brightness(im).enhance(0.7),
    "crop_scale_bright_jpeg": near_duplicate,
    "exif_rotated": exif_rotated,
}
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


def eval_magento(model: ClipModel, rows: list[dict], held_out: set[str], limit: int | None = None,
                 seed: int = 0) -> dict:
    """Near-duplicate recall@1, same-product recall@5, category accuracy and score percentiles on Magento.

    rows: manifest rows (``id``, ``image``, ``category``), one per photo of a product.
    Near-duplicates: every query photo is copied with each of :data:`NEAR_DUP_TRANSFORMS` and the
    copy searched among all catalogue photos; a hit is the original ranked first.
    Score percentiles (cosine, :data:`PERCENTILES`): near-duplicate pairs (copy, original),
    same-product pairs (two different photos of one product), and 5,000 random pairs of photos of
    products in different categories (seeded).
    """
    files = sorted({r["image"] for r in rows})
    draft = model.draft_size
    gallery = np.concatenate([model.embed_images([open_image(f, draft_size=draft) for f in files[i:i + 64]])
                              for i in range(0, len(files), 64)])
    file_pos = {f: i for i, f in enumerate(files)}

    query_files = files if limit is None else files[:: max(1, len(files) // limit)][:limit]
    held_files = {r["image"] for r in rows if r["id"] in held_out}
    dup_hits: dict[str, dict[str, bool]] = {}
    dup_scores: dict[str, list[float]] = {}
    for i in range(0, len(query_files), 16):
        chunk = query_files[i:i + 16]
        # copies are made from the photo decoded at >= 448 px on its shorter side (JPEG draft mode: 1/2 scale
        # for these 1000x1200 photos), twice what the model sees, and 4x cheaper to transform than full size
        full = [open_image(f, draft_size=448) for f in chunk]
        for name, transform in NEAR_DUP_TRANSFORMS.items():
            q = model.embed_images([transform(im) for im in full])
            sims = q @ gallery.T
            for f, row in zip(chunk, sims):
                dup_hits.setdefault(f, {})[name] = files[int(row.argmax())] == f
                dup_scores.setdefault(f, []).append(float(row[file_pos[f]]))

    products_of_file: dict[str, set[str]] = {}
    category_of_file: dict[str, str] = {}
    for r in rows:
        products_of_file.setdefault(r["image"], set()).add(r["id"])
        category_of_file.setdefault(r["image"], r.get("category") or "")
    photos_of_product: dict[str, set[str]] = {}
    for r in rows:
        photos_of_product.setdefault(r["id"], set()).add(r["image"])
    sims = gallery @ gallery.T
    same_hits: dict[tuple[str, str], bool] = {}
    same_scores: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        others = photos_of_product[r["id"]] - {r["image"]}
        if not others or r["image"] not in query_files:
            continue
        order = np.argsort(-sims[file_pos[r["image"]]], kind="stable")
        top5 = [files[j] for j in order if files[j] != r["image"]][:5]
        same_hits[(r["id"], r["image"])] = any(f in others for f in top5)
        same_scores[(r["id"], r["image"])] = [float(sims[file_pos[r["image"]], file_pos[o]]) for o in others]

    rng = np.random.default_rng(seed)
    random_scores = []
    while len(random_scores) < 5000:
        a, b = rng.integers(len(files), size=2)
        if category_of_file[files[a]] != category_of_file[files[b]]:
            random_scores.append(float(sims[a, b]))

    categories = sorted({r["category"] for r in rows if r.get("category")})
    clf = ZeroShotClassifier(model, LabelSet.from_dict({
        "labels": [{"name": c, "prompts": [category_phrase(c)]} for c in categories],
        "templates": list(MAGENTO_TEMPLATES)}))
    # photo by photo, and as a closed set (the catalogue's own categories): the gallery is the
    # reference of the hubness correction (ZeroShotClassifier.set_reference)
    cat_hits_by_mode = {}
    for mode, reference in (("per_photo", None), ("closed_set", gallery)):
        if not clf.set_reference(reference) and mode == "closed_set":
            cat_hits_by_mode[mode] = {}  # too few photos for the correction: reported as None
            continue
        probs, _ = clf.scores(gallery)
        predicted = {f: categories[int(probs[file_pos[f]].argmax())] for f in files}
        cat_hits_by_mode[mode] = {(r["id"], r["image"]): predicted[r["image"]] == r["category"]
                                  for r in rows if r.get("category") and r["image"] in query_files}

    def summarise(subset_files, subset_ids) -> dict:
        by_transform = {name: mean_or_none([hs[name] for f, hs in dup_hits.items() if f in subset_files])
                        for name in NEAR_DUP_TRANSFORMS}
        d = [h for f, hs in dup_hits.items() if f in subset_files for h in hs.values()]
        s = [h for (pid, _), h in same_hits.items() if pid in subset_ids]
        c = [h for (pid, _), h in cat_hits_by_mode["per_photo"].items() if pid in subset_ids]
        c1 = [h for (pid, _), h in cat_hits_by_mode["closed_set"].items() if pid in subset_ids]
        return {
            "near_dup_recall_at_1": mean_or_none(d), "near_dup_queries": len(d), "near_dup_by_transform": by_transform,
            "same_product_recall_at_5": mean_or_none(s), "same_product_queries": len(s),
            "category_accuracy": mean_or_none(c), "category_photos": len(c),
            "category_accuracy_closed_set": mean_or_none(c1),
        }

    all_ids = {r["id"] for r in rows}
    percentiles = {
        "near_duplicate": _percentiles([x for xs in dup_scores.values() for x in xs]),
        "same_product": _percentiles([x for xs in same_scores.values() for x in xs]),
        "random_different_category": _percentiles(random_scores),
    }
    return {"held_out": summarise(held_files, held_out), "all": summarise(set(files), all_ids),
            "gallery_photos": len(files), "categories": len(categories), "score_percentiles": percentiles,
            "gallery": gallery, "files": files, "held_files": held_files}


def _percentiles(xs) -> dict:
    if not xs:
        return {}
    return {f"p{q}": round(float(np.percentile(xs, q)), 4) for q in PERCENTILES}


def recommended_min_score(percentiles: dict) -> float:
    """The ``min_score`` below which a search answer counts as "no close match".

    Halfway between the 99th percentile of random different-category pairs and the 5th percentile
    of near-duplicate pairs (the two distributions of :func:`eval_magento`), rounded to 0.01.
    """
    lo = percentiles["random_different_category"]["p99"]
    hi = percentiles["near_duplicate"]["p5"]
    return round((lo + hi) / 2, 2)


#: Magento category leaf -> the labels of ``data/labels/retail.yaml`` that name it correctly
RETAIL_LABELS_OF_MAGENTO = {
    "Tees": ("t-shirt",), "Tanks": ("tank top",), "Bras & Tanks": ("tank top",),
    "Hoodies & Sweatshirts": ("hoodie",), "Jackets": ("jacket",), "Pants": ("trousers",), "Shorts": ("shorts",),
    "Bags": ("bag", "backpack"), "Watches": ("watch",), "Fitness Equipment": ("sports equipment",)}


def text_close_match(model: ClipModel, gallery: np.ndarray, categories: list[str],
                     threshold: float | None = None) -> dict:
    """Whether a text query's best cosine tells a product type the catalogue sells from one it does not.

    The queries are the prompts of ``data/labels/retail.yaml`` as a shopper types them ("hoodie",
    "ankle boots"), each embedded alone. A query is *present* when its label names a type of the
    catalogue (``categories``, through :data:`RETAIL_LABELS_OF_MAGENTO`) and *absent* otherwise;
    its score is its best cosine over ``gallery`` (``(n, dim)`` unit rows, the catalogue's photos).
    With ``threshold`` None, the threshold is chosen here: the one with the highest balanced
    accuracy (mean of the rates of present queries at or above it and absent ones below it;
    Youden 1950), at the middle of the best range. Returns {"text_min_score", "balanced_accuracy",
    "present_recall", "absent_rejected", "present_queries", "absent_queries"}.
    """
    present_labels = {lab for c in categories for lab in RETAIL_LABELS_OF_MAGENTO.get(c.split("/")[-1], ())}
    label_set = LabelSet.load()
    prompts = [(p, lab.name in present_labels) for lab in label_set.labels for p in lab.prompts]
    best = (model.embed_texts([p for p, _ in prompts]) @ gallery.T).max(axis=1)
    present = np.array([ok for _, ok in prompts])

    def rates(t: float) -> tuple[float, float]:
        return float((best[present] >= t).mean()), float((best[~present] < t).mean())

    if threshold is None:
        cuts = np.unique(np.round(best, 4))
        candidates = np.concatenate([[cuts[0] - 1e-3], (cuts[:-1] + cuts[1:]) / 2, [cuts[-1] + 1e-3]])
        scores = np.array([sum(rates(t)) / 2 for t in candidates])
        top = candidates[scores >= scores.max() - 1e-9]
        threshold = round(float((top.min() + top.max()) / 2), 3)
    recall, rejected = rates(threshold)
    return {"text_min_score": threshold, "balanced_accuracy": round((recall + rejected) / 2, 4),
            "present_recall": round(recall, 4), "absent_rejected": round(rejected, 4),
            "present_queries": int(present.sum()), "absent_queries": int((~present).sum())}


def unrelated_queries(model: ClipModel, datasets: Path, gallery: np.ndarray, min_score: float,
                      classifier: ZeroShotClassifier | None = None) -> dict:
    """How often a query that matches nothing in the catalogue (:func:`unrelated_images`) still gets an
    answer at or above ``min_score``; and, with ``classifier``, how often the model's calibrated reject
    option (``label_min_cosine``, :meth:`ZeroShotClassifier.none_of_these`) says "none of these" for it.

    Returns {"unrelated_query_hit_rate": fraction of all queries, "by_kind": {kind: fraction},
    "label_reject_rate": fraction or None}.
    """
    by_kind, hits, rejected = {}, [], []
    calibrated = model.calibration.get("label_min_cosine") is not None
    for kind, images in unrelated_images(datasets).items():
        emb = model.embed_images(images)
        top = (emb @ gallery.T).max(axis=1)
        by_kind[kind] = mean_or_none(list(top >= min_score))
        hits.extend(top >= min_score)
        if classifier is not None and calibrated:
            rejected.extend(classifier.none_of_these(emb))
    return {"unrelated_query_hit_rate": mean_or_none(hits), "by_kind": by_kind,
            "label_reject_rate": mean_or_none(rejected)}


def unrelated_images(datasets: Path, n_noise: int = 50, n_cifar: int = 200, seed: int = 0) -> dict[str, list]:
    """Queries a retail catalogue holds nothing like: ``n_noise`` uniform-noise images (224 px, seeded),
    a black and a white square, and ``n_cifar`` CIFAR-10 test photos (animals and vehicles)."""
    rng = np.random.default_rng(seed)
    return {
        "noise": [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(n_noise)],
        "black_square": [Image.new("RGB", (224, 224), (0, 0, 0))],
        "white_square": [Image.new("RGB", (224, 224), (255, 255, 255))],
        "cifar10_photos": [im for im, _, _ in iter_cifar10(datasets / "cifar10" / "test.tar.gz", n_cifar)],
    }


def calibrate(model: ClipModel, datasets: Path, rows: list[dict]) -> dict:
    """The model's thresholds (:attr:`indexer.model.ClipModel.calibration`), measured on ``rows``.

    * ``min_score``: :func:`recommended_min_score` of the score percentiles of :func:`eval_magento`.
    * ``label_min_cosine``: halfway between the 5th percentile of the best label's cosine for the
      catalogue photos (default label set, ``data/labels/retail.yaml``) and the 95th percentile of the
      same for :func:`unrelated_images` (seed 1, so that evaluation's seed-0 queries stay unseen).
    * ``text_min_score``: the text-to-photo cosine that best tells product types the catalogue sells
      from those it does not (:func:`text_close_match`).
    """
    mag = eval_magento(model, rows, {r["id"] for r in rows})
    text = text_close_match(model, mag["gallery"], [r.get("category") or "" for r in rows])
    classifier = ZeroShotClassifier(model, LabelSet.load())
    fits = classifier.best_cosines(mag["gallery"])
    unrelated = np.concatenate([model.embed_images(ims) for ims in unrelated_images(datasets, seed=1).values()])
    misfits = classifier.best_cosines(unrelated)
    return {"min_score": recommended_min_score(mag["score_percentiles"]),
            "label_min_cosine": round(float((np.percentile(fits, 5) + np.percentile(misfits, 95)) / 2), 3),
            "text_min_score": text["text_min_score"], "text_close_match": text,
            "score_percentiles": mag["score_percentiles"],
            "best_label_cosine_catalogue": _percentiles(fits.tolist()),
            "best_label_cosine_unrelated": _percentiles(misfits.tolist()),
            "measured_on": f"{len(mag['gallery'])} photos of the training products"}


def mean_or_none(xs) -> float | None:
    """Mean of ``xs`` rounded to 4 decimals; None for an empty sequence."""
    return round(float(np.mean(xs)), 4) if len(xs) else None
