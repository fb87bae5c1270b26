"""Readers for the public datasets used to train and evaluate models (never stored in this repository).

* CIFAR-10 as packaged in ``../shared/datasets/cifar10``: ``train.tar.gz`` / ``test.tar.gz``
  with members ``<split>/<class>/NNNN.jpg`` (Krizhevsky 2009).
* Fashion-MNIST IDX files (Xiao, Rasul & Vollgraf 2017): a 16-byte header then uint8
  28x28 images; labels an 8-byte header then uint8 class ids.
* The Magento catalogue manifest read by :mod:`indexer.magento`, with the
  seeded 80/20 split of its parent products that the bundled model was trained on.
"""
from __future__ import annotations

import gzip
import io
import random
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Plain-words class names for prompts (the official names are terse: "T-shirt/top", "Trouser").
FASHION_MNIST_PROMPT_NAMES = (
    "t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
MAGENTO_SPLIT_SEED = 0
MAGENTO_TRAIN_FRACTION = 0.8


def iter_cifar10(tar_gz: str | Path, limit: int | None = None) -> Iterator[tuple[Image.Image, int, str]]:
    """Yield (RGB image 32x32, class index, member name) from a CIFAR-10 ``.tar.gz``, in archive order.

    ``limit`` takes an evenly spread subset: every ``n // limit``-th image (classes stay balanced).
    """
    with tarfile.open(tar_gz, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.lower().endswith((".jpg", ".jpeg", ".png"))]
        members.sort(key=lambda m: m.name)
        if limit is not None and limit < len(members):
            step = len(members) / limit
            members = [members[int(i * step)] for i in range(limit)]
        for m in members:
            cls = m.name.split("/")[-2]
            if cls not in CIFAR10_CLASSES:
                continue
            data = tar.extractfile(m).read()
            with Image.open(io.BytesIO(data)) as im:
                yield im.convert("RGB"), CIFAR10_CLASSES.index(cls), m.name


def read_idx_images(path: str | Path) -> np.ndarray:
    """uint8 ``(n, rows, cols)`` from a gzipped IDX3 file (magic 2051)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, n, rows, cols = np.frombuffer(data[:16], dtype=">i4")
    if magic != 2051:
        raise ValueError(f"{path}: not an IDX3 image file (magic {magic})")
    return np.frombuffer(data[16:], dtype=np.uint8).reshape(n, rows, cols)


def read_idx_labels(path: str | Path) -> np.ndarray:
    """uint8 ``(n,)`` from a gzipped IDX1 file (magic 2049)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, n = np.frombuffer(data[:8], dtype=">i4")
    if magic != 2049:
        raise ValueError(f"{path}: not an IDX1 label file (magic {magic})")
    return np.frombuffer(data[8:], dtype=np.uint8)[:n]


def fashion_mnist(folder: str | Path, split: str = "test", limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 ``(n, 28, 28)``, labels ``(n,)``) of the ``train`` or ``test`` (``t10k``) split."""
    prefix = "train" if split == "train" else "t10k"
    folder = Path(folder)
    images = read_idx_images(folder / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx_labels(folder / f"{prefix}-labels-idx1-ubyte.gz")
    if limit is not None and limit < len(images):
        idx = (np.arange(limit) * (len(images) / limit)).astype(int)
        images, labels = images[idx], labels[idx]
    return images, labels


def magento_split(product_ids, seed: int = MAGENTO_SPLIT_SEED, train_fraction: float = MAGENTO_TRAIN_FRACTION):
    """Seeded split of Magento parent products: (train ids, held-out ids), both sorted.

    The products are sorted, shuffled with ``random.Random(seed)`` and the first
    ``round(train_fraction * n)`` are the training products.
    """
    ids = sorted(set(product_ids))
    random.Random(seed).shuffle(ids)
    n_train = round(train_fraction * len(ids))
    return sorted(ids[:n_train]), sorted(ids[n_train:])


def category_phrase(category: str) -> str:
    """Words for a Magento leaf category: ``Men/Tops/Hoodies & Sweatshirts`` -> ``men's hoodies & sweatshirts``,
    ``Gear/Bags`` -> ``bags``, ``Women/Tops/Bras & Tanks`` -> ``women's bras & tanks``."""
    parts = [p for p in category.split("/") if p]
    if not parts:
        return ""
    leaf = parts[-1].lower()
    if parts[0] in ("Men", "Women"):
        return f"{parts[0].lower()}'s {leaf}"
    return leaf
