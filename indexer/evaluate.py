"""Search-quality evaluation of any model: zero-shot classification and catalogue retrieval.

Metrics (all computed with :class:`indexer.model.ClipModel`, so any open_clip model works):

* ``cifar10_top1``: zero-shot top-1 on CIFAR-10 ``test.tar.gz`` (10,000 images), prompt-template
  ensemble as in Radford et al. 2021 (sec. 3.1.4); no training on the test set.
* ``fashion_mnist_top1``: the same on the Fashion-MNIST test split (10,000 images).
* ``magento_near_dup_recall_at_1``: each Magento photo is queried with transformed copies
  (centre crop to 85 %, resize to 50 %, brightness x1.2, JPEG quality 40; and a copy stored
  rotated with an EXIF orientation tag that turns it upright) against every catalogue photo;
  a hit is the original photo ranked first.
* ``magento_same_product_recall_at_5``: a photo finds another photo of the same product among
  its 5 nearest other photos (itself excluded); over products with at least 2 photos.
* ``magento_category_accuracy``: zero-shot label of each photo among the catalogue's leaf
  categories (prompts from :func:`indexer.datasets.category_phrase`) equals its category.

Magento metrics are given for the products held out of the bundled model's training (the seeded
split of :func:`indexer.datasets.magento_split`, or the split saved in the model folder) and,
with the suffix ``_all``, for the whole catalogue.
"""
from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from .datasets import (
    CIFAR10_CLASSES,
    FASHION_MNIST_PROMPT_NAMES,
    category_phrase,
    fashion_mnist,
    iter_cifar10,
    magento_split,
)
from .images import open_image
from .labels import LabelSet, ZeroShotClassifier
from .model import ClipModel

# Chosen before looking at any test result; the first four follow CLIP's published CIFAR templates.
CIFAR_TEMPLATES = ("a photo of a {}.", "a blurry photo of a {}.", "a photo of the {}.",
                   "a low resolution photo of a {}.", "{}")
FASHION_TEMPLATES = ("a photo of a {}.", "a black and white photo of a {}.", "a photo of the {}.",
                     "a low resolution photo of a {}.", "{}")
MAGENTO_TEMPLATES = ("a photo of {}.", "a product photo of {}.", "{}")
# Classes whose names lookalike-base never saw in training (scripts/train_lookalike_base.py derives its
# HELD_OUT_WORDS from these)
CIFAR10_UNSEEN = ("deer", "truck")
FASHION_MNIST_UNSEEN = ("sandal", "bag")


def _classify(model: ClipModel, images, labels: np.ndarray, names, templates, batch_size: int = 256):
    """Zero-shot top-1 over ``names``: (accuracy, images, {class name: accuracy})."""
    clf = ZeroShotClassifier(model, LabelSet.from_names(list(names), tuple(templates)))
    predicted, truth = [], []
    batch, batch_labels = [], []

    def flush():
        if batch:
            probs, _ = clf.scores(model.embed_images(batch, batch_size))
            predicted.extend(probs.argmax(axis=1).tolist())
            truth.extend(batch_labels)
            batch.clear()
            batch_labels.clear()

    for img, lab in zip(images, labels):
        batch.append(img)
        batch_labels.append(int(lab))
        if len(batch) == batch_size:
            flush()
    flush()
    predicted, truth = np.asarray(predicted), np.asarray(truth)
    per_class = {name: _mean(predicted[truth == i] == i) for i, name in enumerate(names) if (truth == i).any()}
    return float((predicted == truth).mean()) if len(truth) else 0.0, len(truth), per_class


def eval_cifar10(model: ClipModel, datasets: Path, limit: int | None = None):
    """CIFAR-10 test zero-shot: (top-1, images, per-class top-1)."""
    items = list(iter_cifar10(datasets / "cifar10" / "test.tar.gz", limit))
    return _classify(model, (i[0] for i in items), np.array([i[1] for i in items]), CIFAR10_CLASSES, CIFAR_TEMPLATES)


def eval_fashion_mnist(model: ClipModel, datasets: Path, limit: int | None = None):
    """Fashion-MNIST test zero-shot: (top-1, images, per-class top-1 keyed by prompt name)."""
    images, labels = fashion_mnist(datasets / "fashion-mnist", "test", limit)
    pil = (Image.fromarray(x, "L").convert("RGB") for x in images)
    return _classify(model, pil, labels, FASHION_MNIST_PROMPT_NAMES, FASHION_TEMPLATES)


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
    probs, _ = clf.scores(gallery)
    predicted = {f: categories[int(probs[file_pos[f]].argmax())] for f in files}
    cat_hits = {(r["id"], r["image"]): predicted[r["image"]] == r["category"]
                for r in rows if r.get("category") and r["image"] in query_files}

    def summarise(subset_files, subset_ids) -> dict:
        by_transform = {name: _mean([hs[name] for f, hs in dup_hits.items() if f in subset_files])
                        for name in NEAR_DUP_TRANSFORMS}
        d = [h for f, hs in dup_hits.items() if f in subset_files for h in hs.values()]
        s = [h for (pid, _), h in same_hits.items() if pid in subset_ids]
        c = [h for (pid, _), h in cat_hits.items() if pid in subset_ids]
        return {
            "near_dup_recall_at_1": _mean(d), "near_dup_queries": len(d), "near_dup_by_transform": by_transform,
            "same_product_recall_at_5": _mean(s), "same_product_queries": len(s),
            "category_accuracy": _mean(c), "category_photos": len(c),
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
        by_kind[kind] = _mean(list(top >= min_score))
        hits.extend(top >= min_score)
        if classifier is not None and calibrated:
            rejected.extend(classifier.none_of_these(emb))
    return {"unrelated_query_hit_rate": _mean(hits), "by_kind": by_kind, "label_reject_rate": _mean(rejected)}


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
    """
    mag = eval_magento(model, rows, {r["id"] for r in rows})
    classifier = ZeroShotClassifier(model, LabelSet.load())
    fits = classifier.best_cosines(mag["gallery"])
    unrelated = np.concatenate([model.embed_images(ims) for ims in unrelated_images(datasets, seed=1).values()])
    misfits = classifier.best_cosines(unrelated)
    return {"min_score": recommended_min_score(mag["score_percentiles"]),
            "label_min_cosine": round(float((np.percentile(fits, 5) + np.percentile(misfits, 95)) / 2), 3),
            "score_percentiles": mag["score_percentiles"],
            "best_label_cosine_catalogue": _percentiles(fits.tolist()),
            "best_label_cosine_unrelated": _percentiles(misfits.tolist()),
            "measured_on": f"{len(mag['gallery'])} photos of the training products"}


def _mean(xs) -> float | None:
    return round(float(np.mean(xs)), 4) if len(xs) else None


def embedding_speed(model: ClipModel, photos: list[str], batch_size: int = 32, repeat: int = 3) -> float:
    """Images/s of preprocessing + embedding already-decoded 224 px catalogue photos (best of ``repeat``)."""
    images = [open_image(p).resize((224, 224), Image.BICUBIC) for p in photos]
    best = 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        model.embed_images(images, batch_size)
        best = max(best, len(images) / (time.perf_counter() - t0))
    return round(best, 1)


def evaluate(model: ClipModel, datasets: Path, magento_rows: list[dict], split_file: Path | None = None,
             limit: int | None = None, progress=print, speed_baseline: ClipModel | None = None) -> dict:
    """Every metric of the module docstring, as one flat dict (also the ``--json`` output).

    speed_baseline: a second model (ViT-B-32 with random weights in ``lookalike eval``) whose
    embedding speed is measured in the same run, on the same photos, for ``speed_ratio_vs_baseline``.
    """
    result: dict = {"model": model.identity.to_dict()}
    t0 = time.perf_counter()
    acc, n, per_class = eval_cifar10(model, datasets, limit)
    result.update(cifar10_top1=round(acc, 4), cifar10_images=n,
                  cifar10_unseen_top1=_mean([per_class[c] for c in CIFAR10_UNSEEN if per_class.get(c) is not None]),
                  cifar10_per_class=per_class)
    progress(f"cifar10 top-1 {acc:.4f} on {n} images ({time.perf_counter() - t0:.0f} s)")
    t0 = time.perf_counter()
    acc, n, per_class = eval_fashion_mnist(model, datasets, limit)
    result.update(fashion_mnist_top1=round(acc, 4), fashion_mnist_images=n,
                  fashion_mnist_unseen_top1=_mean([per_class[c] for c in FASHION_MNIST_UNSEEN
                                                   if per_class.get(c) is not None]),
                  fashion_mnist_per_class=per_class)
    progress(f"fashion-mnist top-1 {acc:.4f} on {n} images ({time.perf_counter() - t0:.0f} s)")
    if split_file is not None and split_file.is_file():
        held_out = set(json.loads(split_file.read_text())["held_out"])
    else:
        held_out = set(magento_split(r["id"] for r in magento_rows)[1])
    t0 = time.perf_counter()
    mag = eval_magento(model, magento_rows, held_out, limit)
    progress(f"magento done ({time.perf_counter() - t0:.0f} s)")
    for key, value in mag["held_out"].items():
        result[f"magento_{key}"] = value
    for key, value in mag["all"].items():
        result[f"magento_{key}_all"] = value
    result["magento_held_out_products"] = len(held_out)
    result["magento_gallery_photos"] = mag["gallery_photos"]
    result["magento_categories"] = mag["categories"]
    result["score_percentiles"] = mag["score_percentiles"]
    min_score = recommended_min_score(mag["score_percentiles"])
    result["recommended_min_score"] = min_score
    result["random_p95_below_near_dup_p5"] = (mag["score_percentiles"]["random_different_category"]["p95"]
                                              < mag["score_percentiles"]["near_duplicate"]["p5"])
    classifier = ZeroShotClassifier(model, LabelSet.load())
    unrelated = unrelated_queries(model, datasets, mag["gallery"], min_score, classifier)
    result["unrelated_query_hit_rate"] = unrelated["unrelated_query_hit_rate"]
    result["unrelated_query_hit_rate_by_kind"] = unrelated["by_kind"]
    result["model_calibration"] = {k: model.calibration.get(k) for k in ("min_score", "label_min_cosine")}
    result["unrelated_label_reject_rate"] = unrelated["label_reject_rate"]
    if model.calibration.get("label_min_cosine") is not None:
        held = [i for i, f in enumerate(mag["files"]) if f in mag["held_files"]]
        result["catalogue_label_reject_rate"] = _mean(classifier.none_of_these(mag["gallery"][held]))
    sample = sorted({r["image"] for r in magento_rows})[:64]
    result["embed_images_per_s_224px"] = embedding_speed(model, sample)
    if speed_baseline is not None:
        base = embedding_speed(speed_baseline, sample)
        result["baseline_model"] = speed_baseline.identity.name
        result["baseline_backend"] = f"{speed_baseline.backend} {speed_baseline.precision}"
        result["baseline_images_per_s_224px"] = base
        result["speed_ratio_vs_baseline"] = round(result["embed_images_per_s_224px"] / max(base, 1e-9), 2)
    result["backend"] = f"{model.backend} {model.precision}"
    return result


def format_table(result: dict) -> str:
    rows = [
        ("CIFAR-10 zero-shot top-1", "cifar10_top1", "cifar10_images", None),
        ("Fashion-MNIST zero-shot top-1", "fashion_mnist_top1", "fashion_mnist_images", None),
        ("Magento near-duplicate recall@1", "magento_near_dup_recall_at_1", "magento_near_dup_queries",
         "magento_near_dup_recall_at_1_all"),
        ("Magento same-product recall@5", "magento_same_product_recall_at_5", "magento_same_product_queries",
         "magento_same_product_recall_at_5_all"),
        ("Magento category accuracy", "magento_category_accuracy", "magento_category_photos",
         "magento_category_accuracy_all"),
    ]
    lines = [f"model: {result['model']['name']} (pretrained={result['model']['pretrained']})",
             f"{'metric':<34} {'held-out/test':>13} {'n':>7} {'whole catalogue':>16}"]
    for title, key, nkey, allkey in rows:
        all_value = result.get(allkey) if allkey else None
        lines.append(f"{title:<34} {_fmt(result.get(key)):>13} {result.get(nkey, ''):>7} {_fmt(all_value):>16}")
    lines.append(f"{'CIFAR-10 unseen classes top-1':<34} {_fmt(result.get('cifar10_unseen_top1')):>13}  "
                 f"({', '.join(CIFAR10_UNSEEN)})")
    lines.append(f"{'Fashion-MNIST unseen classes top-1':<34} {_fmt(result.get('fashion_mnist_unseen_top1')):>13}  "
                 f"({', '.join(FASHION_MNIST_UNSEEN)})")
    lines.append("near-duplicate recall@1 by copy (held-out photos): " + ", ".join(
        f"{k} {_fmt(v)}" for k, v in (result.get("magento_near_dup_by_transform") or {}).items()))
    for kind, pct in (result.get("score_percentiles") or {}).items():
        lines.append(f"cosine percentiles, {kind}: " + ", ".join(f"{q} {v:.3f}" for q, v in pct.items()))
    lines.append(f"recommended min_score: {result.get('recommended_min_score')}; unrelated queries above it: "
                 f"{_fmt(result.get('unrelated_query_hit_rate'))} {result.get('unrelated_query_hit_rate_by_kind')}")
    speed = f"embedding speed, 224 px photos: {result['embed_images_per_s_224px']} images/s ({result.get('backend')})"
    if "baseline_images_per_s_224px" in result:
        speed += (f"; {result['baseline_model']} ({result['baseline_backend']}) {result['baseline_images_per_s_224px']}"
                  f" images/s; ratio {result['speed_ratio_vs_baseline']}x")
    lines.append(speed)
    return "\n".join(lines)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"
