"""Evaluation building blocks: dataset readers, the Magento split, query transforms, metrics."""
import json

import numpy as np
import pytest
from PIL import Image

from indexer.datasets import (
    CIFAR10_CLASSES, category_phrase, fashion_mnist, iter_cifar10, magento_split,
)
from indexer.evaluate import NEAR_DUP_TRANSFORMS, eval_magento, exif_rotated, near_duplicate

pytestmark = pytest.mark.integration  # the last test embeds with the tiny model; the others are unit tests


def test_dataset_readers(datasets_dir):
    images, labels = fashion_mnist(datasets_dir / "fashion-mnist", "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10
    sub, sub_labels = fashion_mnist(datasets_dir / "fashion-mnist", "test", limit=100)
    assert sub.shape == (100, 28, 28) and len(set(sub_labels.tolist())) == 10
    items = list(iter_cifar10(datasets_dir / "cifar10" / "test.tar.gz", limit=50))
    assert len(items) == 50
    img, label, name = items[0]
    assert img.size == (32, 32) and img.mode == "RGB"
    assert CIFAR10_CLASSES[label] in name
    assert len({i[1] for i in items}) >= 5


def test_magento_split_is_seeded_80_20():
    ids = [f"P{i:03d}" for i in range(191)]
    train, held = magento_split(reversed(ids))
    assert (len(train), len(held)) == (153, 38)
    assert not set(train) & set(held) and set(train) | set(held) == set(ids)
    assert magento_split(ids) == (train, held)
    assert magento_split(ids, seed=1) != (train, held)


def test_category_phrase():
    assert category_phrase("Men/Tops/Hoodies & Sweatshirts") == "men's hoodies & sweatshirts"
    assert category_phrase("Women/Bottoms/Pants") == "women's pants"
    assert category_phrase("Gear/Bags") == "bags"
    assert category_phrase("") == ""


def test_query_transforms():
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (1200, 1000, 3), dtype=np.uint8))
    nd = near_duplicate(photo)
    assert nd.size == (425, 510)  # 85 % crop, then half size
    assert nd.mode == "RGB"
    rot = exif_rotated(Image.new("RGB", (100, 60), (250, 10, 10)))
    assert rot.size == (100, 60)  # stored 60x100, turned upright by its EXIF tag when opened
    stored = np.zeros((60, 100, 3), np.uint8)
    stored[:, :50] = 255
    back = np.asarray(exif_rotated(Image.fromarray(stored)))
    assert back[:, :40].mean() > 200 and back[:, 60:].mean() < 50  # the same way up as the original


def test_near_duplicate_copies():
    photo = Image.new("RGB", (300, 400), (200, 30, 30))
    sizes = {name: t(photo).size for name, t in NEAR_DUP_TRANSFORMS.items()}
    assert sizes["mirror"] == (300, 400) and sizes["squash_to_square"] == (400, 400)
    assert sizes["centre_crop_60"] == (180, 240) and sizes["half_size"] == (150, 200)
    assert sizes["rotate_30_white"][0] > 300  # expanded to hold the turned photo
    grey = np.asarray(NEAR_DUP_TRANSFORMS["greyscale"](photo))
    assert grey.shape == (400, 300, 3) and (grey[..., 0] == grey[..., 2]).all()
    corner = NEAR_DUP_TRANSFORMS["rotate_30_white"](photo).getpixel((0, 0))
    assert corner == (255, 255, 255) and NEAR_DUP_TRANSFORMS["rotate_30_black"](photo).getpixel((0, 0)) == (0, 0, 0)
    assert np.asarray(NEAR_DUP_TRANSFORMS["darker_30"](photo)).mean() < np.asarray(photo).mean()


def test_eval_magento_on_the_fixture_catalogue(fixture_catalogue, tiny_model):
    rows = [json.loads(x) for x in fixture_catalogue.read_text().splitlines()]
    ids = sorted({r["id"] for r in rows})
    held = set(ids[::5])
    result = eval_magento(tiny_model, rows, held, limit=24)
    for part in ("held_out", "all"):
        r = result[part]
        for key in ("near_dup_recall_at_1", "same_product_recall_at_5", "category_accuracy"):
            assert r[key] is not None and 0 <= r[key] <= 1
    assert result["all"]["near_dup_queries"] == len(NEAR_DUP_TRANSFORMS) * 24
    assert set(result["all"]["near_dup_by_transform"]) == set(NEAR_DUP_TRANSFORMS)
    pct = result["score_percentiles"]
    assert set(pct) == {"near_duplicate", "same_product", "random_different_category"}
    for dist in pct.values():
        values = list(dist.values())
        assert values == sorted(values) and -1 <= values[0] and values[-1] <= 1.0001
    # near-duplicate copies score above random pairs of different categories, even for random weights
    assert pct["near_duplicate"]["p50"] > pct["random_different_category"]["p50"]
    assert result["gallery_photos"] == len({r["image"] for r in rows})
    # the tiny random model still finds most transformed copies of a photo among the 75 photos
    assert result["all"]["near_dup_recall_at_1"] >= 0.3


def test_closed_set_figures_are_none_when_too_few_images_were_labelled(tiny_model, datasets_dir):
    """`lookalike eval --limit N` under indexer.labels.MIN_REFERENCE images cannot label as a closed
    set: its _closed_set figures are None rather than a copy of the per-photo ones."""
    from indexer.evaluate import eval_cifar10

    modes, n = eval_cifar10(tiny_model, datasets_dir, limit=50)
    assert n == 50 and modes["closed_set"] is None and 0 <= modes["per_photo"][0] <= 1
    modes, n = eval_cifar10(tiny_model, datasets_dir, limit=200)
    acc, per_class = modes["closed_set"]
    assert n == 200 and 0 <= acc <= 1 and set(per_class) == set(modes["per_photo"][1])
