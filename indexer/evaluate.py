"""Search-quality evaluation of any model: zero-shot classification and catalogue retrieval.

Metrics (all computed with :class:`indexer.model.ClipModel`, so any open_clip model works):

* ``cifar10_top1``: zero-shot top-1 on CIFAR-10 ``test.tar.gz`` (10,000 images), prompt-template
  ensemble as in Radford et al. 2021 (sec. 3.1.4); no training on the test set; each photo on its
  own. ``cifar10_top1_closed_set``: the test images labelled together as a closed set (every
  label names a class the set holds), the set being the reference of the hubness correction
  (:meth:`indexer.labels.ZeroShotClassifier.set_reference`; no label is used), as
  ``lookalike label INDEX --closed-set`` labels a catalogue.
* ``fashion_mnist_top1``: the same on the Fashion-MNIST test split (10,000 images).
* ``cifar10_unseen_top1``, ``fashion_mnist_unseen_top1`` (and ``_closed_set``): top-1 over all ten
  labels on the test images of the classes whose names lookalike-base never saw in training.
* ``magento_near_dup_recall_at_1``: each Magento photo is queried with each transformed copy of
  :data:`indexer.evaluate_retrieval.NEAR_DUP_TRANSFORMS` (mirrored, rotated, cropped, resized,
  recompressed, re-lit, stored rotated with an EXIF orientation tag...) against every catalogue
  photo; a hit is the original photo ranked first.
* ``magento_same_product_recall_at_5``: a photo finds another photo of the same product among
  its 5 nearest other photos (itself excluded); over products with at least 2 photos.
* ``magento_category_accuracy``: zero-shot label of each photo among the catalogue's leaf
  categories (prompts from :func:`indexer.datasets.category_phrase`) equals its category;
  ``magento_category_accuracy_closed_set``: the same with the catalogue as the hubness reference
  (its own categories are a closed set).

Magento metrics are given for the products held out of the bundled model's training (the seeded
split of :func:`indexer.datasets.magento_split`, or the split saved in the model folder) and,
with the suffix ``_all``, for the whole catalogue.

The Magento metrics and the calibration measured from them are computed in
:mod:`indexer.evaluate_retrieval`; this module runs the zero-shot benchmarks, times embedding,
gathers every metric into one result (:func:`evaluate`) and re-exports the retrieval names.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .datasets import (
    CIFAR10_CLASSES,
    FASHION_MNIST_PROMPT_NAMES,
    fashion_mnist,
    iter_cifar10,
    magento_split,
)
from .evaluate_retrieval import (
    MAGENTO_TEMPLATES,
    NEAR_DUP_TRANSFORMS,
    PERCENTILES,
    calibrate,
    eval_magento,
    exif_rotated,
    mean_or_none,
    near_duplicate,
    recommended_min_score,
    text_close_match,
    unrelated_images,
    unrelated_queries,
)
from .images import open_image
from .labels import LabelSet, ZeroShotClassifier
from .model import ClipModel

__all__ = [
    "CIFAR10_UNSEEN",
    "CIFAR_TEMPLATES",
    "FASHION_MNIST_UNSEEN",
    "FASHION_TEMPLATES",
    "MAGENTO_TEMPLATES",
    "NEAR_DUP_TRANSFORMS",
    "PERCENTILES",
    "calibrate",
    "embedding_speed",
    "eval_cifar10",
    "eval_fashion_mnist",
    "eval_magento",
    "evaluate",
    "exif_rotated",
    "format_table",
    "near_duplicate",
    "recommended_min_score",
    "unrelated_images",
    "unrelated_queries",
]

# Chosen before looking at any test result; the first four follow CLIP's published CIFAR templates.
CIFAR_TEMPLATES = ("a photo of a {}.", "a blurry photo of a {}.", "a photo of the {}.",
                   "a low resolution photo of a {}.", "{}")
FASHION_TEMPLATES = ("a photo of a {}.", "a black and white photo of a {}.", "a photo of the {}.",
                     "a low resolution photo of a {}.", "{}")
# Classes whose names lookalike-base never saw in training (scripts/train_lookalike_base.py derives its
# HELD_OUT_WORDS from these)
CIFAR10_UNSEEN = ("deer", "truck")
FASHION_MNIST_UNSEEN = ("sandal", "bag")


def _classify(model: ClipModel, images, labels: np.ndarray, names, templates, batch_size: int = 256):
    """Zero-shot top-1 over ``names``, photo by photo and as a closed set (the images are the
    reference of the hubness correction, :meth:`ZeroShotClassifier.set_reference`, as
    ``lookalike label INDEX --closed-set`` does): ``{"per_photo": (accuracy, {class: accuracy}),
    "closed_set": ... or None under indexer.labels.MIN_REFERENCE images}`` and the number of images."""
    clf = ZeroShotClassifier(model, LabelSet.from_names(list(names), tuple(templates)))
    vecs, truth, batch = [], [], []
    for img, lab in zip(images, labels):
        batch.append(img)
        truth.append(int(lab))
        if len(batch) == batch_size:
            vecs.append(model.embed_images(batch, batch_size))
            batch.clear()
    if batch:
        vecs.append(model.embed_images(batch, batch_size))
    truth = np.asarray(truth)
    x = np.concatenate(vecs) if vecs else np.zeros((0, model.dim), np.float32)
    out = {}
    for mode, reference in (("per_photo", None), ("closed_set", x)):
        if not clf.set_reference(reference) and mode == "closed_set":
            out[mode] = None  # too few images for the correction (--limit): nothing to report
            continue
        predicted = clf.scores(x)[0].argmax(axis=1) if len(x) else np.zeros(0, np.intp)
        per_class = {name: mean_or_none(predicted[truth == i] == i)
                     for i, name in enumerate(names) if (truth == i).any()}
        out[mode] = (float((predicted == truth).mean()) if len(truth) else 0.0, per_class)
    return out, len(truth)


def eval_cifar10(model: ClipModel, datasets: Path, limit: int | None = None):
    """CIFAR-10 test zero-shot: see :func:`_classify`."""
    items = list(iter_cifar10(datasets / "cifar10" / "test.tar.gz", limit))
    return _classify(model, (i[0] for i in items), np.array([i[1] for i in items]), CIFAR10_CLASSES, CIFAR_TEMPLATES)


def eval_fashion_mnist(model: ClipModel, datasets: Path, limit: int | None = None):
    """Fashion-MNIST test zero-shot (classes keyed by prompt name): see :func:`_classify`."""
    images, labels = fashion_mnist(datasets / "fashion-mnist", "test", limit)
    pil = (Image.fromarray(x, "L").convert("RGB") for x in images)
    return _classify(model, pil, labels, FASHION_MNIST_PROMPT_NAMES, FASHION_TEMPLATES)


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
    for key, run, unseen in (("cifar10", eval_cifar10, CIFAR10_UNSEEN),
                             ("fashion_mnist", eval_fashion_mnist, FASHION_MNIST_UNSEEN)):
        t0 = time.perf_counter()
        modes, n = run(model, datasets, limit)
        for mode, suffix in (("per_photo", ""), ("closed_set", "_closed_set")):
            acc, per_class = modes[mode] or (None, None)
            result[f"{key}_top1{suffix}"] = None if acc is None else round(acc, 4)
            result[f"{key}_unseen_top1{suffix}"] = None if per_class is None else mean_or_none(
                [per_class[c] for c in unseen if per_class.get(c) is not None])
            result[f"{key}_per_class{suffix}"] = per_class
        result[f"{key}_images"] = n
        progress(f"{key} top-1 {_fmt(result[key + '_top1'])} photo by photo, {_fmt(result[key + '_top1_closed_set'])} "
                 f"as a closed set, on {n} images ({time.perf_counter() - t0:.0f} s)")
    if split_file is not None and split_file.is_file():
        held_out = set(json.loads(split_file.read_text())["held_out"])
    else:
        held_out = set(magento_split(r["id"] for r in magento_rows)[1])
    t0 = time.perf_counter()
    n_photos = len({r["image"] for r in magento_rows})
    progress(f"magento: embedding the {n_photos} catalogue photos and {len(NEAR_DUP_TRANSFORMS)} copies of each of "
             f"{min(n_photos, limit or n_photos)} query photos (a few minutes on a 2-core CPU)")
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
    result["model_calibration"] = {k: model.calibration.get(k)
                                   for k in ("min_score", "label_min_cosine", "text_min_score")}
    result["unrelated_label_reject_rate"] = unrelated["label_reject_rate"]
    held = [i for i, f in enumerate(mag["files"]) if f in mag["held_files"]]
    if model.calibration.get("label_min_cosine") is not None:
        result["catalogue_label_reject_rate"] = mean_or_none(classifier.none_of_these(mag["gallery"][held]))
    if model.calibration.get("text_min_score") is not None:
        # the held-out products alone stand for a catalogue the threshold was not measured on
        held_categories = [r.get("category") or "" for r in magento_rows if r["id"] in held_out]
        result["text_close_match"] = text_close_match(model, mag["gallery"][held], held_categories,
                                                      model.calibration["text_min_score"])
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
    lines.append("as a closed set (lookalike label --closed-set): CIFAR-10 top-1 "
                 f"{_fmt(result.get('cifar10_top1_closed_set'))}, unseen "
                 f"{_fmt(result.get('cifar10_unseen_top1_closed_set'))}; "
                 f"Fashion-MNIST {_fmt(result.get('fashion_mnist_top1_closed_set'))}, unseen "
                 f"{_fmt(result.get('fashion_mnist_unseen_top1_closed_set'))}; Magento category accuracy "
                 f"{_fmt(result.get('magento_category_accuracy_closed_set'))}")
    lines.append("near-duplicate recall@1 by copy (held-out photos): " + ", ".join(
        f"{k} {_fmt(v)}" for k, v in (result.get("magento_near_dup_by_transform") or {}).items()))
    for kind, pct in (result.get("score_percentiles") or {}).items():
        lines.append(f"cosine percentiles, {kind}: " + ", ".join(f"{q} {v:.3f}" for q, v in pct.items()))
    lines.append(f"recommended min_score: {result.get('recommended_min_score')}; unrelated queries above it: "
                 f"{_fmt(result.get('unrelated_query_hit_rate'))} {result.get('unrelated_query_hit_rate_by_kind')}")
    if result.get("text_close_match"):
        t = result["text_close_match"]
        lines.append(f"text close_match at text_min_score {t['text_min_score']} (held-out products, retail.yaml "
                     f"prompts): "
                     f"balanced accuracy {_fmt(t['balanced_accuracy'])}, types sold found {_fmt(t['present_recall'])} "
                     f"of {t['present_queries']}, types not sold rejected {_fmt(t['absent_rejected'])} of "
                     f"{t['absent_queries']}")
    speed = f"embedding speed, 224 px photos: {result['embed_images_per_s_224px']} images/s ({result.get('backend')})"
    if "baseline_images_per_s_224px" in result:
        speed += (f"; {result['baseline_model']} ({result['baseline_backend']}) {result['baseline_images_per_s_224px']}"
                  f" images/s; ratio {result['speed_ratio_vs_baseline']}x")
    lines.append(speed)
    return "\n".join(lines)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"
