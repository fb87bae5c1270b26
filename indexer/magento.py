"""Read the Magento 2 sample catalogue's product export into photo manifest rows.

Reads the product export tables under ``MAGENTO_DIR/fixtures`` and builds one
manifest row per product photo (several rows share one product id), so that the
search engine can be indexed and evaluated on "find the same product from
another photo" (``lookalike eval``; ``scripts/prepare_magento.py`` writes the
rows to a manifest file).

Products:

* every ``configurable`` row of ``configurable_products.csv`` (its variant
  ``simple`` rows are not products of their own; their per-colour images are
  added to the parent's photos);
* any other row of that file that is not a variant of a configurable;
* every row of ``simple_products_gear_*.csv``, with photos taken from
  ``simple_images_gear_*.csv`` (joined by sku).

Image paths such as ``/m/h/mh01-gray_main.jpg`` are relative to
``MAGENTO_DIR/images``.  A referenced file that is absent is returned in the
``missing`` list (:func:`build_manifest`); products left with no photo at all
are skipped.  Only the standard library is used.
"""

from __future__ import annotations

import csv
import html
import json
import logging
import re
from pathlib import Path

from .errors import LookalikeError

log = logging.getLogger(__name__)

FIELDS = ["id", "image", "title", "category", "price", "colors", "color", "view", "sku"]
IMAGE_COLUMNS = ["image", "base_image", "small_image", "thumbnail_image", "additional_images"]
MAIN_ROOTS = ("Men", "Women", "Gear")
CATEGORY_ROOTS = MAIN_ROOTS + ("Collections", "Promotions", "Training", "What's New", "Sale")
ROOT_PREFIX = "Default Category"
VIEW_RE = re.compile(r"_(main|back|alt\d+|alternate|outfit|side_?[ab])$")
GEAR_MAIN_RE = re.compile(r"-0$")


class DatasetError(LookalikeError):
    """The catalogue folder or one of its tables is absent or unreadable."""


# --------------------------------------------------------------------------- reading


def read_csv(path: Path) -> list[dict[str, str]]:
    """Return the rows of a UTF-8 CSV file as dicts (missing cells become '')."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            return [{k: (v or "") for k, v in row.items() if k is not None} for row in csv.DictReader(handle)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc


def check_layout(magento_dir: Path) -> Path:
    """Return the fixtures folder, raising DatasetError when the layout is incomplete."""
    if not magento_dir.is_dir():
        raise DatasetError(f"Magento folder not found: {magento_dir}")
    fixtures = magento_dir / "fixtures"
    for needed in (fixtures / "configurable_products.csv", magento_dir / "images"):
        if not needed.exists():
            raise DatasetError(f"Magento catalogue incomplete, missing: {needed}")
    return fixtures


def split_list(value: str, sep: str = ",") -> list[str]:
    """Split a separated cell into stripped, non-empty parts."""
    return [part.strip() for part in value.split(sep) if part.strip()]


def clean_title(name: str) -> str:
    """Decode HTML entities (``&trade;``) and collapse whitespace in a product name."""
    return " ".join(html.unescape(name).split())


def parse_price(value: str) -> float | None:
    """Return the price as a float, or None when the cell is empty or not a number."""
    try:
        return float(value)
    except ValueError:
        return None


def parse_key_values(value: str) -> dict[str, str]:
    """Parse ``a=1,b=2`` (Magento's additional_attributes / one variation) into a dict."""
    pairs = (part.split("=", 1) for part in split_list(value) if "=" in part)
    return {key.strip(): val.strip() for key, val in pairs}


def parse_variations(value: str) -> list[dict[str, str]]:
    """Parse ``configurable_variations`` (``sku=..,color=..|sku=..``) into dicts."""
    return [parse_key_values(part) for part in value.split("|") if part.strip()]


def unique(items) -> list:
    """Return the items without repeats, keeping the first occurrence's order."""
    return list(dict.fromkeys(item for item in items if item))


def row_images(row: dict[str, str]) -> list[str]:
    """Image paths named by a product row's image columns, base image first."""
    return unique(path for col in IMAGE_COLUMNS for path in split_list(row.get(col, "")))


# --------------------------------------------------------------------------- categories


def choose_category(paths: list[str]) -> str:
    """Pick the deepest path under Men/Women/Gear; otherwise the deepest other path."""
    paths = [p for p in paths if p]
    main = [p for p in paths if p.split("/", 1)[0] in MAIN_ROOTS]
    pool = main or paths
    return max(pool, key=lambda p: p.count("/"), default="")


def configurable_category(value: str) -> str:
    """Leaf category of a configurable_products.csv row (comma-separated full paths)."""
    paths = []
    for path in split_list(value):
        parts = [p.strip() for p in path.split("/") if p.strip()]
        if parts and parts[0] == ROOT_PREFIX:
            parts = parts[1:]
        paths.append("/".join(parts))
    return choose_category(paths)


def gear_category(value: str) -> str:
    """Leaf category of a gear row, whose cell lists path parts one per line.

    ``"Gear\\nBags\\nCollections\\nErin Recommends"`` holds two paths, split where a
    known root name starts: ``Gear/Bags`` and ``Collections/Erin Recommends``.
    Commas are accepted as separators too, and a part holding ``/`` is a full path.
    """
    paths: list[list[str]] = []
    for part in (p.strip() for p in re.split(r"[\n,]", value)):
        if not part or part == ROOT_PREFIX:
            continue
        if "/" in part:
            paths.append([p.strip() for p in part.split("/") if p.strip() and p.strip() != ROOT_PREFIX])
        elif part in CATEGORY_ROOTS or not paths:
            paths.append([part])
        else:
            paths[-1].append(part)
    return choose_category(["/".join(p) for p in paths])


# --------------------------------------------------------------------------- products


def make_product(sku: str, row: dict[str, str], category: str, colors: list[str], refs: list[str]) -> dict:
    """Assemble the product record used to emit manifest rows."""
    return {
        "id": sku,
        "title": clean_title(row.get("name", "")),
        "category": category,
        "price": parse_price(row.get("price", "")),
        "colors": unique(colors),
        "refs": unique(refs),
    }


def configurable_products(fixtures: Path) -> list[dict]:
    """Products of configurable_products.csv: configurables plus non-variant rows."""
    rows = read_csv(fixtures / "configurable_products.csv")
    by_sku = {row["sku"]: row for row in rows if row.get("sku")}
    products, variant_skus = [], set()
    for row in rows:
        if row.get("product_type") != "configurable":
            continue
        variations = parse_variations(row.get("configurable_variations", ""))
        variants = [by_sku[v["sku"]] for v in variations if v.get("sku") in by_sku]
        variant_skus.update(v.get("sku") for v in variations)
        refs = row_images(row) + [ref for variant in variants for ref in row_images(variant)]
        colors = [v.get("color", "") for v in variations]
        products.append(make_product(row["sku"], row, configurable_category(row.get("categories", "")), colors, refs))
    for row in rows:
        if row.get("sku") and row.get("product_type") != "configurable" and row["sku"] not in variant_skus:
            colors = [parse_key_values(row.get("additional_attributes", "")).get("color", "")]
            category = configurable_category(row.get("categories", ""))
            products.append(make_product(row["sku"], row, category, colors, row_images(row)))
    return products


def gear_image_refs(fixtures: Path) -> dict[str, list[str]]:
    """Map gear sku -> image paths from every simple_images_gear_*.csv."""
    refs: dict[str, list[str]] = {}
    for path in sorted(fixtures.glob("simple_images_gear_*.csv")):
        for row in read_csv(path):
            if row.get("sku") and row.get("image"):
                refs.setdefault(row["sku"].strip(), []).append(row["image"].strip())
    return refs


def gear_products(fixtures: Path) -> list[dict]:
    """Products of every simple_products_gear_*.csv, photos joined by sku."""
    refs = gear_image_refs(fixtures)
    products: dict[str, dict] = {}
    for path in sorted(fixtures.glob("simple_products_gear_*.csv")):
        for row in read_csv(path):
            sku = row.get("sku", "").strip()
            if not sku or sku in products:
                continue
            images = row_images(row) + refs.get(sku, [])
            colors = split_list(row.get("color", ""), "\n")
            products[sku] = make_product(sku, row, gear_category(row.get("category", "")), colors, images)
    orphans = sorted(set(refs) - set(products))
    if orphans:
        log.warning("gear images for unknown skus ignored: %s", ", ".join(orphans))
    return list(products.values())


def collect_products(magento_dir: Path) -> list[dict]:
    """All catalogue products (with their image references), sorted by id."""
    fixtures = check_layout(magento_dir)
    products = configurable_products(fixtures) + gear_products(fixtures)
    return sorted(products, key=lambda p: p["id"])


# --------------------------------------------------------------------------- photos


def photo_color(stem: str, colors: list[str]) -> str:
    """The product colour named in a file stem (case-insensitive, whole token), else ''."""
    tokens = set(re.split(r"[-_\s]+", stem.lower()))
    return next((c for c in colors if c.lower().replace(" ", "") in tokens), "")


def photo_view(stem: str) -> str:
    """The view named in a file stem (main, back, alt1, ...); gear ``-0`` is main."""
    match = VIEW_RE.search(stem)
    if match:
        view = match.group(1)
        return re.sub(r"^side_?", "side_", view) if view.startswith("side") else view
    return "main" if GEAR_MAIN_RE.search(stem) else ""


def photo_row(product: dict, image: Path) -> dict:
    """One manifest row for one existing photo of a product."""
    return {
        "id": product["id"],
        "image": str(image),
        "title": product["title"],
        "category": product["category"],
        "price": product["price"],
        "colors": "|".join(product["colors"]),
        "color": photo_color(image.stem, product["colors"]),
        "view": photo_view(image.stem),
        "sku": product["id"],
    }


def manifest_rows(products: list[dict], images_dir: Path) -> tuple[list[dict], list[dict]]:
    """Rows for every existing photo, and the {id, image} list of absent files."""
    rows, missing = [], []
    for product in products:
        for ref in product["refs"]:
            image = images_dir / ref.lstrip("/")
            if image.is_file():
                rows.append(photo_row(product, image))
            else:
                missing.append({"id": product["id"], "image": str(image)})
    return rows, missing


def build_manifest(magento_dir: Path) -> tuple[list[dict], list[dict]]:
    """Return (rows, missing) for the catalogue in magento_dir; see module docstring."""
    magento_dir = Path(magento_dir).resolve()
    return manifest_rows(collect_products(magento_dir), magento_dir / "images")


# --------------------------------------------------------------------------- output


def write_manifest(rows: list[dict], out: Path, fmt: str) -> None:
    """Write rows as JSON lines or as CSV with a header."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as handle:
        if fmt == "csv":
            writer = csv.DictWriter(handle, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        else:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def shared_images(rows: list[dict]) -> list[dict]:
    """Photos that appear under more than one product id."""
    owners: dict[str, list[str]] = {}
    for row in rows:
        owners.setdefault(row["image"], []).append(row["id"])
    return [{"image": img, "ids": ids} for img, ids in sorted(owners.items()) if len(ids) > 1]


def build_report(products: list[dict], rows: list[dict], missing: list[dict]) -> dict:
    """Summary written beside the manifest as ``<manifest>.report.json``."""
    written = {row["id"] for row in rows}
    return {
        "products": len(written),
        "photos": len(rows),
        "missing": missing,
        "skipped_products": [p["id"] for p in products if p["id"] not in written],
        "references": sum(len(p["refs"]) for p in products),
        "shared_images": shared_images(rows),
    }
