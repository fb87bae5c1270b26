"""Write the training manifest for the bundled offline model (train splits only).

    python scripts/prepare_training_data.py [DATASETS_DIR] --out out/train

Extracts CIFAR-10 ``train.tar.gz`` (50,000 JPEGs) and Fashion-MNIST train (60,000 PNGs)
into OUT, and writes ``OUT/manifest.jsonl`` with one row per image (``id``, ``image``,
``title``, ``category``, ``phrase``, ``source``), plus the Magento photos of the 80 % of
parent products chosen by :func:`indexer.datasets.magento_split`. The split is saved as
``OUT/magento_split.json``; ``lookalike finetune`` copies it into the model folder.
DATASETS_DIR defaults to ``../shared/datasets`` beside the project.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from indexer.datasets import (  # noqa: E402
    CIFAR10_CLASSES,
    FASHION_MNIST_PROMPT_NAMES,
    MAGENTO_SPLIT_SEED,
    MAGENTO_TRAIN_FRACTION,
    category_phrase,
    fashion_mnist,
    magento_split,
)


def _prepare_magento():
    spec = importlib.util.spec_from_file_location("prepare_magento", ROOT / "scripts" / "prepare_magento.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cifar_rows(datasets: Path, out: Path) -> list[dict]:
    dest = out / "cifar10"
    rows = []
    with tarfile.open(datasets / "cifar10" / "train.tar.gz", "r:gz") as tar:
        for m in tar.getmembers():
            if not m.isfile() or not m.name.endswith(".jpg"):
                continue
            cls = m.name.split("/")[-2]
            if cls not in CIFAR10_CLASSES:
                continue
            target = dest / cls / Path(m.name).name
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(m).read())
            rows.append({"id": f"cifar10/{cls}/{target.stem}", "image": str(target), "title": cls,
                         "category": cls, "phrase": cls, "source": "cifar10-train"})
    return rows


def fashion_rows(datasets: Path, out: Path) -> list[dict]:
    from PIL import Image

    images, labels = fashion_mnist(datasets / "fashion-mnist", "train")
    rows = []
    for i, (pixels, label) in enumerate(zip(images, labels)):
        name = FASHION_MNIST_PROMPT_NAMES[label]
        target = out / "fashion-mnist" / name.replace(" ", "-") / f"{i:05d}.png"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels, "L").save(target)
        rows.append({"id": f"fashion-mnist/{i:05d}", "image": str(target), "title": name, "category": name,
                     "phrase": name, "source": "fashion-mnist-train"})
    return rows


def magento_rows(datasets: Path) -> tuple[list[dict], dict]:
    rows, _ = _prepare_magento().build_manifest(datasets / "magento")
    train, held_out = magento_split(r["id"] for r in rows)
    keep = set(train)
    out = [
        {"id": r["id"], "image": r["image"], "title": r["title"], "category": r["category"],
         "phrase": category_phrase(r["category"]), "source": "magento-train"}
        for r in rows if r["id"] in keep
    ]
    split = {"seed": MAGENTO_SPLIT_SEED, "train_fraction": MAGENTO_TRAIN_FRACTION, "train": train, "held_out": held_out}
    return out, split


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("datasets", nargs="?", default=str(ROOT.parent / "shared" / "datasets"))
    ap.add_argument("--out", default="out/train")
    args = ap.parse_args(argv)
    datasets, out = Path(args.datasets), Path(args.out).resolve()
    if not (datasets / "cifar10").is_dir():
        print(f"error: no datasets at {datasets}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    mag, split = magento_rows(datasets)
    rows = cifar_rows(datasets, out) + fashion_rows(datasets, out) + mag
    with open(out / "manifest.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (out / "magento_split.json").write_text(json.dumps(split, indent=1))
    counts = {}
    for r in rows:
        counts[r["source"]] = counts.get(r["source"], 0) + 1
    print(f"wrote {len(rows)} rows to {out / 'manifest.jsonl'}: {counts}; "
          f"Magento products: {len(split['train'])} train, {len(split['held_out'])} held out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
