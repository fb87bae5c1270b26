#!/usr/bin/env python3
"""Build a photo manifest from the Magento 2 sample catalogue.

Writes one manifest row per product photo, read by :mod:`indexer.magento` (which
says which products and photos are taken), and ``<manifest>.report.json`` beside
it. A referenced file that is absent is counted, listed on stderr and in the report;
products left with no photo at all are skipped.

Usage::

    python scripts/prepare_magento.py [MAGENTO_DIR] --out MANIFEST [--format jsonl|csv]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from indexer.magento import (  # noqa: F401  (re-exported: callers that load this script use these names)
    FIELDS,
    DatasetError,
    build_manifest,
    build_report,
    clean_title,
    collect_products,
    configurable_category,
    gear_category,
    manifest_rows,
    photo_color,
    photo_view,
    write_manifest,
)

DEFAULT_MAGENTO_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "magento"


def report_problems(report: dict) -> None:
    """List absent files and skipped products on stderr."""
    for item in report["missing"]:
        print(f"missing file: {item['id']} {item['image']}", file=sys.stderr)
    for sku in report["skipped_products"]:
        print(f"skipped product without photos: {sku}", file=sys.stderr)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line; the format defaults from the --out suffix."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("magento_dir", nargs="?", type=Path, default=DEFAULT_MAGENTO_DIR,
                        help="Magento sample-data folder (default: ../shared/datasets/magento)")
    parser.add_argument("--out", required=True, type=Path, help="manifest file to write (.jsonl or .csv)")
    parser.add_argument("--format", choices=["jsonl", "csv"], help="output format (default: from --out suffix)")
    args = parser.parse_args(argv)
    if args.format is None:
        suffix = args.out.suffix.lower().lstrip(".")
        if suffix not in ("jsonl", "csv"):
            parser.error(f"cannot tell the format from {args.out.name!r}; pass --format jsonl|csv")
        args.format = suffix
    return args


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    magento_dir = args.magento_dir.resolve()
    try:
        products = collect_products(magento_dir)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows, missing = manifest_rows(products, magento_dir / "images")
    report = build_report(products, rows, missing)
    report_problems(report)
    write_manifest(rows, args.out, args.format)
    report_path = args.out.with_name(args.out.name + ".report.json")
    report_path.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {report['photos']} photos of {report['products']} products to {args.out} "
          f"({len(missing)} missing files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
