"""Tests for scripts/prepare_magento.py against the real Magento sample catalogue."""
from __future__ import annotations

import csv
import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "prepare_magento.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("prepare_magento", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pm = _load_script()


@pytest.fixture(scope="module")
def magento_dir(datasets_dir: Path) -> Path:
    return (datasets_dir / "magento").resolve()


@pytest.fixture(scope="module")
def manifest(magento_dir: Path):
    return pm.build_manifest(magento_dir)


@pytest.fixture(scope="module")
def products(manifest) -> dict[str, list[dict]]:
    rows, _ = manifest
    by_id: dict[str, list[dict]] = {}
    for row in rows:
        by_id.setdefault(row["id"], []).append(row)
    return by_id


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _expected_references(magento_dir: Path) -> set[tuple[str, str]]:
    """(product id, image path) pairs named by the CSVs, derived independently of the script."""
    fixtures = magento_dir / "fixtures"
    rows = _read(fixtures / "configurable_products.csv")
    by_sku = {r["sku"]: r for r in rows}
    cols = ("base_image", "small_image", "thumbnail_image", "additional_images")
    refs = set()
    for row in rows:
        if row["product_type"] != "configurable":
            continue
        skus = [part.split(",")[0].removeprefix("sku=") for part in row["configurable_variations"].split("|")]
        for member in [row] + [by_sku[s] for s in skus]:
            for col in cols:
                refs.update((row["sku"], p) for p in member[col].split(",") if p)
    gear_skus = {r["sku"] for f in fixtures.glob("simple_products_gear_*.csv") for r in _read(f)}
    for f in fixtures.glob("simple_images_gear_*.csv"):
        refs.update((r["sku"], r["image"]) for r in _read(f) if r["sku"] in gear_skus)
    return {(sku, str(magento_dir / "images" / p.lstrip("/"))) for sku, p in refs}


# --------------------------------------------------------------------------- real catalogue


def test_product_counts(products):
    # 147 configurables (72 Men, 75 Women) + 44 gear simple products; no stand-alone simples.
    assert len(products) == 191
    tops = Counter(rows[0]["category"].split("/")[0] for rows in products.values())
    assert tops == {"Men": 72, "Women": 75, "Gear": 44}


def test_variants_are_not_products(products):
    assert "MH01" in products
    assert not any(pid.startswith("MH01-") for pid in products)


def test_mh01(products):
    rows = products["MH01"]
    names = [Path(r["image"]).name for r in rows]
    assert names[0] == "mh01-gray_main.jpg"  # parent's base image first
    assert {r["title"] for r in rows} == {"Chaz Kangeroo Hoodie"}
    assert {r["category"] for r in rows} == {"Men/Tops/Hoodies & Sweatshirts"}
    assert {r["colors"] for r in rows} == {"Black|Gray|Orange"}
    assert {r["color"] for r in rows} == {"Black", "Gray", "Orange"}
    assert {r["price"] for r in rows} == {52.0}
    first = rows[0]
    assert (first["color"], first["view"], first["sku"]) == ("Gray", "main", "MH01")
    assert {"mh01-black_main.jpg", "mh01-orange_main.jpg", "mh01-gray_back.jpg"} <= set(names)


def test_gear_categories(products):
    assert products["24-MB01"][0]["category"] == "Gear/Bags"
    assert products["24-MB01"][0]["title"] == "Joust Duffle Bag"
    assert products["24-MB04"][0]["category"] == "Gear/Bags"  # also in Collections/Erin Recommends
    assert products["24-UG05"][0]["category"] == "Gear/Fitness Equipment"
    assert products["24-MG01"][0]["category"] == "Gear/Watches"
    assert products["24-UG02"][0]["title"] == "Pursuit Lumaflex\u2122 Tone Band"  # &trade; decoded
    assert [Path(r["image"]).name for r in products["24-MB04"]] == ["mb04-black-0.jpg", "mb04-black-0_alt1.jpg"]
    assert [r["view"] for r in products["24-MB04"]] == ["main", "alt1"]


def test_category_values(products):
    cats = {rows[0]["category"] for rows in products.values()}
    assert all(c.split("/")[0] in ("Men", "Women", "Gear") for c in cats)
    assert not any(c.startswith("Default Category") for c in cats)
    assert len(cats) == 15


def test_rows_are_complete(manifest):
    rows, _ = manifest
    for row in rows:
        assert list(row) == pm.FIELDS
        assert row["sku"] == row["id"]
        assert row["title"] and row["category"]
        assert isinstance(row["price"], float)
        assert row["color"] == "" or row["color"] in row["colors"].split("|")


def test_every_image_exists(manifest):
    rows, _ = manifest
    assert rows
    for row in rows:
        path = Path(row["image"])
        assert path.is_absolute() and path.is_file(), row


def test_no_duplicate_rows(manifest):
    rows, _ = manifest
    keys = [(r["id"], r["image"]) for r in rows]
    assert len(keys) == len(set(keys))


def test_photos_plus_missing_equal_references(manifest, magento_dir):
    rows, missing = manifest
    expected = _expected_references(magento_dir)
    got = {(r["id"], r["image"]) for r in rows} | {(m["id"], m["image"]) for m in missing}
    assert len(rows) + len(missing) == len(expected)
    assert got == expected


def test_order_is_deterministic(manifest, magento_dir):
    rows, _ = manifest
    ids = [r["id"] for r in rows]
    assert ids == sorted(ids)
    assert pm.build_manifest(magento_dir)[0] == rows


# --------------------------------------------------------------------------- command line


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_cli_round_trip(suffix, manifest, magento_dir, tmp_path, capsys):
    rows, missing = manifest
    out = tmp_path / "sub" / f"manifest.{suffix}"
    assert pm.main([str(magento_dir), "--out", str(out)]) == 0
    summary = capsys.readouterr().out.strip()
    assert summary == f"wrote {len(rows)} photos of 191 products to {out} ({len(missing)} missing files)"
    if suffix == "jsonl":
        back = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    else:
        back = _read(out)
        for row in back:
            row["price"] = float(row["price"])
    assert back == rows
    report = json.loads((tmp_path / "sub" / f"manifest.{suffix}.report.json").read_text(encoding="utf-8"))
    assert report["products"] == 191
    assert report["photos"] == len(rows)
    assert report["missing"] == missing
    assert report["skipped_products"] == []


def test_cli_explicit_format(magento_dir, tmp_path):
    out = tmp_path / "manifest.txt"
    assert pm.main([str(magento_dir), "--out", str(out), "--format", "csv"]) == 0
    assert out.read_text(encoding="utf-8").splitlines()[0] == ",".join(pm.FIELDS)


def test_cli_unknown_suffix_needs_format(magento_dir, tmp_path):
    with pytest.raises(SystemExit) as exc:
        pm.main([str(magento_dir), "--out", str(tmp_path / "manifest.txt")])
    assert exc.value.code == 2


def test_cli_missing_dir_exits_2(tmp_path, capsys):
    out = tmp_path / "m.jsonl"
    assert pm.main([str(tmp_path / "nope"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "nope" in err and "\n" not in err
    assert not out.exists()


def test_cli_missing_fixtures_exits_2(tmp_path, capsys):
    (tmp_path / "magento" / "images").mkdir(parents=True)
    assert pm.main([str(tmp_path / "magento"), "--out", str(tmp_path / "m.csv")]) == 2
    assert "configurable_products.csv" in capsys.readouterr().err


# --------------------------------------------------------------------------- missing files (synthetic)


def _tiny_catalogue(root: Path) -> Path:
    """A two-product catalogue: one photo present, two absent (not dataset copies)."""
    (root / "fixtures").mkdir(parents=True)
    (root / "images" / "a" / "b").mkdir(parents=True)
    (root / "images" / "a" / "b" / "ab01-red_main.jpg").write_bytes(b"not really a jpeg")
    header = ["sku", "product_type", "categories", "name", "price", "base_image", "small_image",
              "thumbnail_image", "additional_images", "additional_attributes", "configurable_variations"]
    rows = [
        ["AB01-S-Red", "simple", "", "AB01-S-Red", "10", "/a/b/ab01-red_back.jpg", "", "", "", "color=Red", ""],
        ["AB01", "configurable", "Default Category/Women/Tops/Tees,Default Category", "Tee", "10",
         "/a/b/ab01-red_main.jpg", "", "", "", "", "sku=AB01-S-Red,size=S,color=Red"],
        ["ZZ09", "simple", "Default Category/Collections/Eco Friendly", "Lost", "5", "/z/z/zz09.jpg", "", "", "", "", ""],
    ]
    with (root / "fixtures" / "configurable_products.csv").open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([header] + rows)
    return root


def test_missing_files_are_counted(tmp_path, capsys):
    root = _tiny_catalogue(tmp_path / "magento")
    rows, missing = pm.build_manifest(root)
    assert [(r["id"], Path(r["image"]).name, r["color"], r["view"]) for r in rows] == [("AB01", "ab01-red_main.jpg", "Red", "main")]
    assert [(m["id"], Path(m["image"]).name) for m in missing] == [("AB01", "ab01-red_back.jpg"), ("ZZ09", "zz09.jpg")]

    out = tmp_path / "out" / "m.jsonl"
    assert pm.main([str(root), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == f"wrote 1 photos of 1 products to {out} (2 missing files)"
    assert "ab01-red_back.jpg" in captured.err and "ZZ09" in captured.err
    report = json.loads(out.with_name("m.jsonl.report.json").read_text(encoding="utf-8"))
    assert report["products"] == 1 and report["photos"] == 1
    assert report["missing"] == missing
    assert report["skipped_products"] == ["ZZ09"]


# --------------------------------------------------------------------------- helpers


def test_gear_category_parsing():
    value = "Gear\nFitness Equipment\nPromotions\nErin Recommends New\nCollections\nNew Luma Yoga Collection"
    assert pm.gear_category(value) == "Gear/Fitness Equipment"
    assert pm.gear_category("Gear,Fitness Equipment") == "Gear/Fitness Equipment"
    assert pm.gear_category("Collections\nErin Recommends") == "Collections/Erin Recommends"


def test_configurable_category_parsing():
    value = "Default Category/Collections/Eco Friendly,Default Category/Men/Tops/Tees,Default Category"
    assert pm.configurable_category(value) == "Men/Tops/Tees"
    assert pm.configurable_category("Default Category") == ""


def test_photo_view_and_color():
    assert pm.photo_view("mh01-gray_main") == "main"
    assert pm.photo_view("mt02-white_sideb") == "side_b"
    assert pm.photo_view("mb04-black-0_alt1") == "alt1"
    assert pm.photo_view("mb01-blue-0") == "main"
    assert pm.photo_view("luma-foam-roller") == ""
    assert pm.photo_color("mh01-gray_main", ["Black", "Gray"]) == "Gray"
    assert pm.photo_color("ms03-black_main", ["Gray", "Green"]) == ""
