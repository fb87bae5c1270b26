"""Embedding speed of two models side by side on the same decoded 224 px catalogue photos.

    python scripts/bench_embed.py [--model lookalike-base] [--baseline ViT-B-32] [--photos 64] [--json]

Both models embed the same Magento photos, already decoded and resized to 224x224 (so decoding
is not measured; each model's own preprocessing is). The baseline is built with random weights
when its pretrained weights are not available (speed does not depend on the weights). Prints
images/s for each, best of 3 runs, and the ratio.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from indexer.evaluate import embedding_speed  # noqa: E402
from indexer.model import ModelLoadError, load_model  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lookalike-base")
    ap.add_argument("--baseline", default="ViT-B-32")
    ap.add_argument("--baseline-pretrained", default="laion2b_s34b_b79k")
    ap.add_argument("--photos", type=int, default=64)
    ap.add_argument("--magento", default=str(ROOT.parent / "shared" / "datasets" / "magento" / "images"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    photos = sorted(str(p) for p in Path(args.magento).rglob("*.jpg"))[: args.photos]
    if not photos:
        print(f"error: no photos under {args.magento}", file=sys.stderr)
        return 2
    model = load_model(args.model, None, "cpu")
    try:
        baseline = load_model(args.baseline, args.baseline_pretrained, "cpu")
        baseline_weights = args.baseline_pretrained
    except ModelLoadError:
        baseline = load_model(args.baseline, "none", "cpu")
        baseline_weights = "random (pretrained weights not available; speed is the same)"
    result = {
        "model": args.model, "model_images_per_s": embedding_speed(model, photos),
        "baseline": args.baseline, "baseline_weights": baseline_weights,
        "baseline_images_per_s": embedding_speed(baseline, photos), "photos": len(photos),
    }
    result["ratio"] = round(result["model_images_per_s"] / result["baseline_images_per_s"], 2)
    if not args.json:
        print(f"{args.model}: {result['model_images_per_s']} images/s; {args.baseline} ({baseline_weights}): "
              f"{result['baseline_images_per_s']} images/s; ratio {result['ratio']}x on {len(photos)} photos at 224 px")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
