"""Tests for indexer.pipeline: bulk indexing of real photos with the tiny random-weight model.

The catalogue is a subset of the generated fixture catalogue (tests/fixtures/make_catalogue.py),
read from a JSONL manifest written to tmp_path; tests that change files work on copies in
tmp_path. Its broken files, and the awkward files of shared/datasets/messy-images (the test
marked ``datasets``), check that a bad photo costs one photo, never the run.
"""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.catalogue import read_catalogue
from indexer.images import REASONS
from indexer.model import load_model
from indexer.pipeline import embed_paths, index_catalogue
from indexer.store import Store

pytestmark = pytest.mark.integration

# messy-images files that cannot be used, with the reason (the other image files open).
UNREADABLE = {
    "00r1_graya_la.jp2": "corrupt",
    "broken.png": "corrupt",
    "broken_data_stream.png": "corrupt",
    "decompression_bomb.gif": "decompression_bomb",
    "truncated_image.png": "truncated",
    "truncated_jpeg.jpg": "truncated",
    "zero_width.gif": "zero_size",
}


@pytest.fixture(scope="module")
def model():
    return load_model("test-tiny", None, "cpu")


@pytest.fixture(scope="module")
def catalogue_rows(fixture_data) -> dict[str, list[dict]]:
    """Product id -> its manifest rows (every photo of the fixture belongs to one product)."""
    rows = fixture_data.rows()
    assert all(n == 1 for n in Counter(r["image"] for r in rows).values())
    by_id: dict[str, list[dict]] = {}
    for r in rows:
        by_id.setdefault(r["id"], []).append(r)
    return by_id


@pytest.fixture(scope="module")
def subset(catalogue_rows) -> list[dict]:
    """About 40 photos of 10 products from every department: two products of each category, one
    photographed in two colours (6 photos) and one in one (3)."""
    chosen = [pid for pid in sorted(catalogue_rows) if pid.endswith(("-01", "-02"))]
    rows = [r for pid in chosen for r in catalogue_rows[pid]]
    assert len({r["id"] for r in rows}) == 10 and 35 <= len(rows) <= 50
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def photo_vectors(store: Store) -> dict[tuple[str, str], np.ndarray]:
    out = {}
    for pid in store.product_ids():
        images = store.get_product(pid)["images"]
        for im, vec in zip(images, store.product_vectors(pid)):
            out[(pid, im["image"])] = vec
    return out


def run(catalogue, index_dir: Path, model, **kw):
    kw.setdefault("workers", 0)
    kw.setdefault("progress", False)
    with Store.create(index_dir, model.identity) as store:
        report = index_catalogue(catalogue, store, model, **kw)
        return report, store.generation(), store.check()


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, subset, model):
    """The subset indexed once with workers=0: (index dir, catalogue, report)."""
    tmp = tmp_path_factory.mktemp("pipeline")
    catalogue = read_catalogue(write_jsonl(tmp / "subset.jsonl", subset))
    report, _, check = run(catalogue, tmp / "idx", model, catalogue_name="subset.jsonl", batch_size=16)
    assert check["ok"], check["problems"]
    return tmp / "idx", catalogue, report


# --------------------------------------------------------------------------- a real subset


def test_report_counts(indexed, subset):
    index_dir, catalogue, report = indexed
    assert catalogue.problems == []
    n = len(subset)
    assert (report.rows, report.products, report.indexed, report.unchanged, report.failed) == (n, 10, n, 0, 0)
    assert (report.index_products, report.index_photos) == (10, n)
    assert report.failures == [] and report.row_problems == []
    assert report.catalogue == "subset.jsonl" and report.model["name"] == "test-tiny"
    assert report.seconds > 0 and report.images_per_s > 0
    assert json.loads((index_dir / "report.json").read_text()) == json.loads(json.dumps(report.to_dict()))
    assert f"indexed {n} photos, 0 unchanged, 0 failed" in report.summary()


def test_products_and_photo_metadata_are_stored(indexed, subset):
    index_dir, catalogue, _ = indexed
    with Store.open(index_dir) as store:
        assert sorted(store.product_ids()) == sorted({r["id"] for r in subset})
        for pid in store.product_ids():
            rows = [r for r in subset if r["id"] == pid]
            p = store.get_product(pid)
            assert p["title"] == rows[0]["title"] and p["category"] == rows[0]["category"]
            assert [im["image"] for im in p["images"]] == [r["image"] for r in rows]
            for im, r in zip(p["images"], rows):
                assert im["metadata"]["view"] == r["view"]
                with Image.open(r["image"]) as pil:
                    assert (im["width"], im["height"]) == pil.size
            # product metadata is what all its rows agree on
            assert p["metadata"]["sku"] == rows[0]["sku"]
            assert ("view" in p["metadata"]) == (len({r["view"] for r in rows}) == 1)


def test_workers_give_the_same_vectors(indexed, tmp_path, model):
    index_dir, catalogue, _ = indexed
    report, _, check = run(catalogue, tmp_path / "idx2", model, workers=2, batch_size=8)
    assert check["ok"], check["problems"]
    assert report.indexed == len(catalogue.rows) and report.failed == 0
    with Store.open(index_dir) as a, Store.open(tmp_path / "idx2") as b:
        va, vb = photo_vectors(a), photo_vectors(b)
    assert va.keys() == vb.keys() and len(va) == len(catalogue.rows)
    for key in va:
        np.testing.assert_allclose(va[key], vb[key], atol=1e-5, err_msg=str(key))
        assert abs(float(np.linalg.norm(va[key])) - 1.0) < 1e-5


def test_every_photo_finds_its_product(indexed, subset, model):
    index_dir, _, _ = indexed
    paths = [r["image"] for r in subset]
    ok, vecs, errors = embed_paths(model, paths)
    assert errors == {} and ok == paths and vecs.shape == (len(paths), model.dim)
    with Store.open(index_dir) as store:
        for row, hits in zip(subset, store.search(vecs, k=3)):
            assert hits[0].product_id == row["id"], row["image"]
            assert hits[0].source == row["image"]
            assert hits[0].score >= 0.9999


def test_rerun_is_a_no_op(indexed, tmp_path, model, subset):
    index_dir, catalogue, _ = indexed
    shutil.copytree(index_dir, tmp_path / "idx")
    with Store.open(tmp_path / "idx") as s:
        gen = s.generation()
        before = photo_vectors(s)
        ids_before = {k: v.photo_id for k, v in s.known_photos().items()}
    report, gen_after, check = run(catalogue, tmp_path / "idx", model)
    assert (report.indexed, report.unchanged, report.failed) == (0, len(subset), 0)
    assert gen_after == gen
    assert check["ok"], check["problems"]
    with Store.open(tmp_path / "idx") as s:
        assert {k: v.photo_id for k, v in s.known_photos().items()} == ids_before
        assert photo_vectors(s).keys() == before.keys()
    # a metadata-only change re-embeds nothing and commits once
    changed = [dict(r, title="Renamed") if r["id"] == subset[0]["id"] else r for r in subset]
    cat2 = read_catalogue(write_jsonl(tmp_path / "renamed.jsonl", changed))
    report, gen_after, check = run(cat2, tmp_path / "idx", model)
    assert (report.indexed, report.unchanged) == (0, len(subset))
    assert gen_after == gen + 1
    with Store.open(tmp_path / "idx") as s:
        assert s.get_product(subset[0]["id"])["title"] == "Renamed"


# --------------------------------------------------------------------------- changes to files


@pytest.fixture
def local_shop(tmp_path: Path, catalogue_rows):
    """4 products with their photos copied into tmp_path/shop, and a JSONL manifest there."""
    shop = tmp_path / "shop"
    shop.mkdir()
    rows = []
    for pid in sorted(catalogue_rows)[::5]:
        for r in catalogue_rows[pid]:
            dest = shop / Path(r["image"]).name
            shutil.copyfile(r["image"], dest)
            rows.append(dict(r, image=dest.name))
    write_jsonl(shop / "cat.jsonl", rows)
    return shop, rows


def test_touched_file_is_unchanged_and_changed_file_is_reembedded(local_shop, tmp_path, model, catalogue_rows):
    shop, rows = local_shop
    n = len(rows)
    manifest = shop / "cat.jsonl"
    report, gen0, _ = run(read_catalogue(manifest), tmp_path / "idx", model)
    assert report.indexed == n

    touched = shop / rows[0]["image"]
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    report, gen1, check = run(read_catalogue(manifest), tmp_path / "idx", model)
    assert (report.indexed, report.unchanged, report.failed) == (0, n, 0)
    assert gen1 == gen0 and check["ok"]
    key = (rows[0]["id"], str(touched))
    with Store.open(tmp_path / "idx") as s:
        assert s.known_photos()[key].mtime_ns == touched.stat().st_mtime_ns  # the next run need not hash it

    # another product's photo copied over one of ours: new content, same name
    victim = shop / rows[1]["image"]
    other = Path(catalogue_rows["FX-WAT-01"][0]["image"])  # a product not in the shop
    assert "FX-WAT-01" not in {r["id"] for r in rows}
    assert other.read_bytes() != victim.read_bytes()
    old_vec = embed_paths(model, [victim])[1]
    with Store.open(tmp_path / "idx") as s:
        old_id = s.known_photos()[(rows[1]["id"], str(victim))].photo_id
    shutil.copyfile(other, victim)
    report, gen2, check = run(read_catalogue(manifest), tmp_path / "idx", model)
    assert (report.indexed, report.unchanged, report.failed) == (1, n - 1, 0)
    assert gen2 > gen1
    assert check["ok"], check["problems"]
    new_vec = embed_paths(model, [victim])[1]
    with Store.open(tmp_path / "idx") as s:
        assert s.count_photos() == n
        known = s.known_photos()[(rows[1]["id"], str(victim))]
        assert known.photo_id > old_id
        hit = s.search(new_vec, k=1)[0][0]
        assert (hit.product_id, hit.photo_id) == (rows[1]["id"], known.photo_id)
        assert hit.score >= 0.9999
        # the old vector left FAISS with the old photo id
        for h in s.search(old_vec, k=100)[0]:
            assert h.photo_id != old_id
        assert s.search(old_vec, k=1)[0][0].score < 0.9999


def test_prune_removes_products_and_photos(local_shop, tmp_path, model):
    shop, rows = local_shop
    manifest = shop / "cat.jsonl"
    run(read_catalogue(manifest), tmp_path / "idx", model)
    ids = sorted({r["id"] for r in rows})
    gone = ids[0]
    gone_vecs = embed_paths(model, [shop / r["image"] for r in rows if r["id"] == gone])[1]
    kept = [r for r in rows if r["id"] != gone]
    write_jsonl(manifest, kept)

    report, _, _ = run(read_catalogue(manifest), tmp_path / "idx", model)  # without prune: kept
    assert report.pruned_products == 0
    with Store.open(tmp_path / "idx") as s:
        assert gone in s.product_ids()

    report, _, check = run(read_catalogue(manifest), tmp_path / "idx", model, prune=True)
    assert report.pruned_products == 1
    assert check["ok"], check["problems"]
    assert (report.index_products, report.index_photos) == (len(ids) - 1, len(kept))
    with Store.open(tmp_path / "idx") as s:
        assert gone not in s.product_ids()
        for hits in s.search(gone_vecs, k=100):
            assert gone not in {h.product_id for h in hits}

    # a photo row dropped from a product that stays
    dropped = kept.pop()
    write_jsonl(manifest, kept)
    report, _, check = run(read_catalogue(manifest), tmp_path / "idx", model, prune=True)
    assert (report.pruned_products, report.pruned_photos) == (0, 1)
    assert check["ok"], check["problems"]
    with Store.open(tmp_path / "idx") as s:
        assert s.count_photos() == len(kept)
        assert str(shop / dropped["image"]) not in [im["image"] for im in s.get_product(dropped["id"])["images"]]


def test_missing_file_is_a_failure_not_a_crash(local_shop, tmp_path, model):
    shop, rows = local_shop
    rows = rows + [dict(rows[0], id="ghost", image="no-such-file.jpg")]
    report, _, check = run(read_catalogue(write_jsonl(shop / "cat.jsonl", rows)), tmp_path / "idx", model)
    assert report.failed == 1 and report.indexed == len(rows) - 1
    assert report.failures[0]["reason"] == "not_found" and report.failures[0]["id"] == "ghost"
    assert report.failures[0]["where"] == f"cat.jsonl:{len(rows)}"
    with Store.open(tmp_path / "idx") as s:
        assert "ghost" not in s.product_ids()


def test_commit_every_makes_several_consistent_commits(indexed, subset, tmp_path, model):
    _, catalogue, _ = indexed
    report, gen, check = run(catalogue, tmp_path / "idx", model, batch_size=8, commit_every=8)
    assert report.indexed == len(subset)
    assert gen == math.ceil(len(subset) / 8)  # one commit per flushed batch, none for unchanged metadata
    assert check["ok"], check["problems"]
    assert [p.name for p in (tmp_path / "idx").glob("vectors.g*.faiss")] == [f"vectors.g{gen}.faiss"]


class _Crash(Exception):
    pass


class _CrashingModel:
    """The test model, dying on its n-th forward pass, like a run killed half way."""

    def __init__(self, model, fail_on: int):
        self._model, self._left = model, fail_on

    def __getattr__(self, name):
        return getattr(self._model, name)

    def embed_image_tensors(self, pixels):
        self._left -= 1
        if self._left == 0:
            raise _Crash
        return self._model.embed_image_tensors(pixels)


def test_interrupted_run_resumes(indexed, subset, tmp_path, model):
    _, catalogue, _ = indexed
    with Store.create(tmp_path / "idx", model.identity) as store:
        with pytest.raises(_Crash):
            index_catalogue(catalogue, store, _CrashingModel(model, 4), workers=0, batch_size=8,
                            commit_every=8, progress=False)
    with Store.open(tmp_path / "idx", writable=True) as store:  # the snapshot was never saved
        assert store.count_photos() == 24
        assert store.check()["ok"], store.check()["problems"]
    report, _, check = run(catalogue, tmp_path / "idx", model, batch_size=8)
    assert (report.indexed, report.unchanged) == (len(subset) - 24, 24)
    assert check["ok"] and check["photos"] == len(subset)


# --------------------------------------------------------------------------- tar shards


def test_tar_shard_catalogue(tmp_path, subset, model):
    shard = tmp_path / "shard-0.tar"
    rows = subset[:6]
    with tarfile.open(shard, "w") as tar:
        for i, r in enumerate(rows):
            tar.add(r["image"], arcname=f"{i:04d}.jpg")
            meta = json.dumps({"id": r["id"], "title": r["title"]}).encode()
            info = tarfile.TarInfo(f"{i:04d}.json")
            info.size = len(meta)
            tar.addfile(info, io.BytesIO(meta))
    catalogue = read_catalogue(shard)
    report, _, check = run(catalogue, tmp_path / "idx", model)
    assert (report.indexed, report.failed) == (6, 0) and check["ok"]
    report, _, _ = run(catalogue, tmp_path / "idx", model)  # no size/mtime for members: hashed, unchanged
    assert (report.indexed, report.unchanged) == (0, 6)
    vecs = embed_paths(model, [r["image"] for r in rows])[1]
    with Store.open(tmp_path / "idx") as s:
        for r, hits in zip(rows, s.search(vecs, k=1)):
            assert hits[0].product_id == r["id"] and hits[0].score >= 0.9999


# --------------------------------------------------------------------------- broken and awkward files


def test_folder_with_broken_files(fixture_data, tmp_path, model):
    """The fixture's photos (JPEG, RGBA/LA/palette PNG, GIF, WebP, EXIF-turned JPEG) and its broken
    files (truncated JPEG and PNG, zero bytes, HTML under .jpg) in one folder: each broken file
    fails with its reason, every photo is indexed."""
    shop = tmp_path / "shop"
    shutil.copytree(fixture_data.root / "images", shop)
    shutil.copytree(fixture_data.root / "broken", shop / "broken")
    catalogue = read_catalogue(shop)
    # under an image extension a broken file is a photo row: the pipeline says what is wrong with it
    assert catalogue.problems == []
    assert len(catalogue.rows) == len(fixture_data.photos) + len(fixture_data.broken)
    report, _, check = run(catalogue, tmp_path / "idx", model, catalogue_name=str(shop))
    assert check["ok"], check["problems"]
    assert {Path(f["image"]).name: f["reason"] for f in report.failures} == {
        p.name: reason for p, reason in fixture_data.broken.items()}
    assert all(f["reason"] in REASONS and f["message"] for f in report.failures)
    assert report.indexed == len(fixture_data.photos) == report.index_photos
    with Store.open(tmp_path / "idx") as s:
        assert {src for (_, src) in s.known_photos()} == {str(shop / p.path.relative_to(fixture_data.root / "images"))
                                                         for p in fixture_data.photos}
        # product id = path without extension, category = its folder
        assert s.get_product("bags/fx-bag-02-green-back")["category"] == "bags"
    report2, _, _ = run(catalogue, tmp_path / "idx", model)  # the failures are retried, the rest unchanged
    assert (report2.indexed, report2.unchanged, report2.failed) == (0, report.indexed, len(fixture_data.broken))



def test_messy_images_folder(datasets_dir, tmp_path, model):
    messy = datasets_dir / "messy-images"
    catalogue = read_catalogue(messy)
    image_files = sorted(p.name for p in messy.iterdir() if p.suffix.lower() != ".txt")
    assert len(catalogue.rows) == len(image_files) == 38
    report, _, check = run(catalogue, tmp_path / "idx", model, catalogue_name=str(messy))
    assert check["ok"], check["problems"]
    assert report.failed == len(UNREADABLE)
    assert {Path(f["image"]).name: f["reason"] for f in report.failures} == UNREADABLE
    assert all(f["reason"] in REASONS and f["message"] for f in report.failures)
    assert report.indexed == len(image_files) - len(UNREADABLE) == report.index_photos
    with Store.open(tmp_path / "idx") as s:
        stored = {Path(src).name for (_, src) in s.known_photos()}
        assert stored == set(image_files) - set(UNREADABLE)
        # product id = file name without extension: hopper.jpg, hopper.png, ... are one product
        assert len(s.get_product("hopper")["images"]) == 7
    saved = json.loads((tmp_path / "idx" / "report.json").read_text())
    assert (saved["indexed"], saved["failed"], saved["unchanged"]) == (report.indexed, report.failed, 0)
    assert saved["failures"] == report.failures
    # a second run retries the failures and finds the rest unchanged
    report2, _, _ = run(catalogue, tmp_path / "idx", model)
    assert (report2.indexed, report2.unchanged, report2.failed) == (0, report.indexed, len(UNREADABLE))


def test_exif_orientation_is_applied(fixture_data, model):
    turned = fixture_data.orientation
    ok, vecs, errors = embed_paths(model, [turned / "card.jpg", turned / "card_orientation_6.jpg",
                                           turned / "card_orientation_3.jpg", turned / "card_orientation_8.jpg"])
    assert errors == {} and len(ok) == 4
    assert np.all(vecs[1:] @ vecs[0] >= 0.995)
    # the same file with its EXIF orientation ignored is clearly further away: the check can fail
    with Image.open(turned / "card_orientation_6.jpg") as im:
        sideways = model.embed_images([im.convert("RGB")])[0]
    assert float(sideways @ vecs[0]) < 0.99


def test_embed_paths_reports_unreadable_files(fixture_data, model):
    png, webp = (p.path for p in fixture_data.photos if p.saved_as in ("rgba_png", "rgba_webp"))
    broken = fixture_data.root / "broken"
    paths = [png, broken / "truncated.jpg", broken / "nope.jpg", webp]
    ok, vecs, errors = embed_paths(model, paths)
    assert ok == [str(paths[0]), str(paths[3])] and vecs.shape == (2, model.dim)
    assert errors[str(paths[1])].startswith("truncated:")
    assert errors[str(paths[2])].startswith("not_found:")
