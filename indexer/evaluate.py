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
from PIL import Image, ImageEnhance

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


def _classify(model: ClipModel, images, labels: np.ndarray, names, templates, batch_size: int = 256) -> float:
    clf = ZeroShotClassifier(model, LabelSet.from_names(list(names), tuple(templates)))
    correct, n = 0, 0
    batch, batch_labels = [], []

    def flush():
        nonlocal correct, n
        if batch:
            probs, _ = clf.scores(model.embed_images(batch, batch_size))
            correct += int((probs.argmax(axis=1) == np.asarray(batch_labels)).sum())
            n += len(batch)
            batch.clear()
            batch_labels.clear()

    for img, lab in zip(images, labels):
        batch.append(img)
        batch_labels.append(int(lab))
        if len(batch) == batch_size:
            flush()
    flush()
    return correct / max(n, 1), n


def eval_cifar10(model: ClipModel, datasets: Path, limit: int | None = None) -> tuple[float, int]:
    items = list(iter_cifar10(datasets / "cifar10" / "test.tar.gz", limit))
    return _classify(model, (i[0] for i in items), np.array([i[1] for i in items]), CIFAR10_CLASSES, CIFAR_TEMPLATES)


def eval_fashion_mnist(model: ClipModel, datasets: Path, limit: int | None = None) -> tuple[float, int]:
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
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=40)
    return open_image(buf.getvalue())


def exif_rotated(image: Image.Image) -> Image.Image:
    """Store the photo turned 90 degrees with EXIF orientation 6 (rotate 90 CW to view), then reopen it."""
    stored = image.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise; orientation 6 turns it back
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return open_image(buf.getvalue())


def eval_magento(model: ClipModel, rows: list[dict], held_out: set[str], limit: int | None = None) -> dict:
    """Near-duplicate recall@1, same-product recall@5 and category accuracy on the Magento catalogue.

    rows: manifest rows (``id``, ``image``, ``category``), one per photo of a product.
    """
    files = sorted({r["image"] for r in rows})
    draft = model.draft_size
    gallery = np.concatenate([model.embed_images([open_image(f, draft_size=draft) for f in files[i:i + 64]])
                              for i in range(0, len(files), 64)])
    file_pos = {f: i for i, f in enumerate(files)}

    query_files = files if limit is None else files[:: max(1, len(files) // limit)][:limit]
    held_files = {r["image"] for r in rows if r["id"] in held_out}
    dup_hits: dict[str, list[bool]] = {}
    for i in range(0, len(query_files), 32):
        chunk = query_files[i:i + 32]
        full = [open_image(f, draft_size=None) for f in chunk]  # transforms start from the full-size photo
        for transform in (near_duplicate, exif_rotated):
            q = model.embed_images([transform(im) for im in full])
            top = (q @ gallery.T).argmax(axis=1)
            for f, t in zip(chunk, top):
                dup_hits.setdefault(f, []).append(files[t] == f)

    products_of_file: dict[str, set[str]] = {}
    for r in rows:
        products_of_file.setdefault(r["image"], set()).add(r["id"])
    photos_of_product: dict[str, set[str]] = {}
    for r in rows:
        photos_of_product.setdefault(r["id"], set()).add(r["image"])
    sims = gallery @ gallery.T
    same_hits: dict[tuple[str, str], bool] = {}
    for r in rows:
        others = photos_of_product[r["id"]] - {r["image"]}
        if not others or r["image"] not in query_files:
            continue
        order = np.argsort(-sims[file_pos[r["image"]]], kind="stable")
        top5 = [files[j] for j in order if files[j] != r["image"]][:5]
        same_hits[(r["id"], r["image"])] = any(f in others for f in top5)

    categories = sorted({r["category"] for r in rows if r.get("category")})
    clf = ZeroShotClassifier(model, LabelSet.from_dict({
        "labels": [{"name": c, "prompts": [category_phrase(c)]} for c in categories],
        "templates": list(MAGENTO_TEMPLATES)}))
    probs, _ = clf.scores(gallery)
    predicted = {f: categories[int(probs[file_pos[f]].argmax())] for f in files}
    cat_hits = {(r["id"], r["image"]): predicted[r["image"]] == r["category"]
                for r in rows if r.get("category") and r["image"] in query_files}

    def summarise(subset_files, subset_ids) -> dict:
        d = [h for f, hs in dup_hits.items() if f in subset_files for h in hs]
        s = [h for (pid, _), h in same_hits.items() if pid in subset_ids]
        c = [h for (pid, _), h in cat_hits.items() if pid in subset_ids]
        return {
            "near_dup_recall_at_1": _mean(d), "near_dup_queries": len(d),
            "same_product_recall_at_5": _mean(s), "same_product_queries": len(s),
            "category_accuracy": _mean(c), "category_photos": len(c),
        }

    all_ids = {r["id"] for r in rows}
    return {"held_out": summarise(held_files, held_out), "all": summarise(set(files), all_ids),
            "gallery_photos": len(files), "categories": len(categories)}


def _mean(xs) -> float | None:
    return round(float(np.mean(xs)), 4) if xs else None


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
             limit: int | None = None, progress=print) -> dict:
    """Every metric of the module docstring, as one flat dict (also the ``--json`` output)."""
    result: dict = {"model": model.identity.to_dict()}
    t0 = time.perf_counter()
    acc, n = eval_cifar10(model, datasets, limit)
    result.update(cifar10_top1=round(acc, 4), cifar10_images=n)
    progress(f"cifar10 top-1 {acc:.4f} on {n} images ({time.perf_counter() - t0:.0f} s)")
    t0 = time.perf_counter()
    acc, n = eval_fashion_mnist(model, datasets, limit)
    result.update(fashion_mnist_top1=round(acc, 4), fashion_mnist_images=n)
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
    sample = sorted({r["image"] for r in magento_rows})[:64]
    result["embed_images_per_s_224px"] = embedding_speed(model, sample)
    return result


def format_table(result: dict) -> str:
    rows = [
        ("CIFAR-10 zero-shot top-1", "cifar10_top1", "cifar10_images", None),
        ("Fashion-MNIST zero-shot top-1", "fashion_mnist_top1", "fashion_mnist_images", None),
        ("Magento near-duplicate recall@1", "magento_near_dup_recall_at_1", "magento_near_dup_queries", "magento_near_dup_recall_at_1_all"),
        ("Magento same-product recall@5", "magento_same_product_recall_at_5", "magento_same_product_queries", "magento_same_product_recall_at_5_all"),
        ("Magento category accuracy", "magento_category_accuracy", "magento_category_photos", "magento_category_accuracy_all"),
    ]
    lines = [f"model: {result['model']['name']} (pretrained={result['model']['pretrained']})",
             f"{'metric':<34} {'held-out/test':>13} {'n':>7} {'whole catalogue':>16}"]
    for title, key, nkey, allkey in rows:
        all_value = result.get(allkey) if allkey else None
        lines.append(f"{title:<34} {_fmt(result.get(key)):>13} {result.get(nkey, ''):>7} {_fmt(all_value):>16}")
    lines.append(f"embedding speed, 224 px photos: {result['embed_images_per_s_224px']} images/s")
    return "\n".join(lines)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"
