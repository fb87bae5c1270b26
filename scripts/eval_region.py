"""Region search on Magento: find a product pasted into a larger scene-like canvas.

    python scripts/eval_region.py [--index out/magento-lookalike-base] [--canvases 200] [--seed 0] [-k 5]
                                  [--held-out out/magento.jsonl]

Each canvas (:func:`make_canvas`, seeded) is a 1200 x 900 px textured background with a grid of
catalogue photos of different products pasted on it at random sizes and offsets; one of them, the
target, is the photo of a product drawn at random. Its product is searched for twice, as the server
and the CLI do it (the canvas encoded as JPEG, decoded by :func:`indexer.images.image_from_bytes`,
searched with min_score 0): with ``box`` = the target's rectangle (:func:`indexer.compose.crop_box`)
and with the whole canvas. Prints one JSON object with recall@k of the target product for both.
By default the target photo is itself in the index, so the box figure is an upper bound; with
``--held-out out/magento.jsonl`` the catalogue is indexed again (into ``INDEX-held-out/``) without
one photo, drawn at random, of every product that has several, and the held-out photos are the
targets: a new photo of a catalogue product (another view or colour of it), as a shopper's would
be. The whole-canvas figure is what a user gets without drawing a box. Build the index first::

    python scripts/prepare_magento.py --out out/magento.jsonl
    lookalike index out/magento.jsonl --out out/magento-lookalike-base --model lookalike-base
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from indexer.compose import crop_box, parse_box  # noqa: E402
from indexer.images import image_from_bytes, open_image  # noqa: E402
from indexer.modelspec import ModelSpec  # noqa: E402
from indexer.search import PHOTO_QUERY_MIN_SCORE  # noqa: E402
from indexer.store import Store  # noqa: E402

CANVAS_SIZE = (1200, 900)
GRID = (3, 2)  # columns, rows of pasted photos


def make_canvas(target: Image.Image, others: list[Image.Image], rng: np.random.Generator,
                size: tuple[int, int] = CANVAS_SIZE, grid: tuple[int, int] = GRID
                ) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """A scene-like canvas: a blurred noise texture in a random colour, ``target`` and ``others``
    (``grid`` columns x rows - 1 photos) each pasted into one cell at 55-95 % of the cell's size and a
    random offset in it; the target's cell is drawn at random. Returns (RGB canvas of ``size``,
    the target's box ``(x0, y0, x1, y1)`` in pixels)."""
    width, height = size
    base = rng.integers(60, 200, 3)
    noise = rng.normal(0, 35, (height // 8, width // 8, 3))
    texture = np.clip(base + noise, 0, 255).astype(np.uint8)
    canvas = Image.fromarray(texture).resize(size, Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(3))
    cols, rows = grid
    cw, ch = width // cols, height // rows
    cells = [(c, r) for r in range(rows) for c in range(cols)]
    where = int(rng.integers(len(cells)))
    photos = list(others[: len(cells) - 1])
    photos.insert(where, target)
    box = (0, 0, 0, 0)
    for (c, r), photo in zip(cells, photos):
        scale = float(rng.uniform(0.55, 0.95))
        fit = min(cw * scale / photo.width, ch * scale / photo.height)
        pw, ph = max(1, round(photo.width * fit)), max(1, round(photo.height * fit))
        x = c * cw + int(rng.integers(0, cw - pw + 1))
        y = r * ch + int(rng.integers(0, ch - ph + 1))
        canvas.paste(photo.resize((pw, ph), Image.Resampling.LANCZOS), (x, y))
        if photo is target:
            box = (x, y, x + pw, y + ph)
    return canvas, box


def jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def region_vectors(model, data: bytes, box: str | None) -> np.ndarray:
    """``(1, dim)`` embedding of the encoded photo ``data``, or of ``box`` of it, decoded as the server does."""
    image = image_from_bytes(data, draft_size=model.draft_size)
    if box is not None:
        image = crop_box(image, parse_box(box))
    return model.embed_images([image])


def held_out_index(manifest: Path, model, out: Path, rng: np.random.Generator) -> tuple[Path, list[tuple[str, str]]]:
    """Index ``manifest`` (the Magento rows) into ``out`` without one photo, drawn at random, of every
    product with two or more photos; returns (the index, [(product id, held-out photo path)])."""
    from indexer.catalogue import read_catalogue
    from indexer.pipeline import index_catalogue

    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    by_product: dict[str, list[dict]] = {}
    for r in rows:
        by_product.setdefault(r["id"], []).append(r)
    held = {id(group[int(rng.integers(len(group)))]) for group in by_product.values() if len(group) >= 2}
    out.mkdir(parents=True, exist_ok=True)
    kept = out / "catalogue.jsonl"
    kept.write_text("".join(json.dumps(r) + "\n" for r in rows if id(r) not in held))
    index = out / "index"
    with Store.create(index, model.identity) as store:
        index_catalogue(read_catalogue(kept), store, model, workers=0, progress=False, prune=True)
    return index, [(r["id"], r["image"]) for r in rows if id(r) in held]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", default="out/magento-lookalike-base", help="index of the Magento catalogue")
    ap.add_argument("--canvases", type=int, default=200, help="canvases (queries) to make")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--held-out", metavar="MANIFEST", default=None,
                    help="the Magento manifest (prepare_magento.py): index it again without one photo of every "
                         "product that has several, and paste those photos (a new photo of a catalogue product)")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    with Store.open(args.index) as full:
        model = ModelSpec().load_for(full)
    index, targets = Path(args.index), None
    if args.held_out:
        index, targets = held_out_index(Path(args.held_out), model, Path(args.index + "-held-out"), rng)
    with Store.open(index) as store:
        photos = [(pid, im["image"]) for pid in store.product_ids() for im in store.get_product(pid)["images"][:1]]
        targets = targets or photos
        found = {"box": 0, "whole": 0}
        load = lambda src: open_image(store.resolve_source(src), draft_size=model.draft_size)  # noqa: E731
        for _ in range(args.canvases):
            target_id, target_src = targets[int(rng.integers(len(targets)))]
            others = [photos[i] for i in rng.permutation(len(photos)) if photos[i][0] != target_id]
            others = others[: GRID[0] * GRID[1] - 1]
            canvas, box = make_canvas(load(target_src), [load(src) for _, src in others], rng)
            data = jpeg(canvas)
            for name, region in (("box", ",".join(map(str, box))), ("whole", None)):
                hits = store.search(region_vectors(model, data, region), args.k, min_score=PHOTO_QUERY_MIN_SCORE)[0]
                found[name] += any(h.product_id == target_id for h in hits)
        print(json.dumps({
            "index": str(index), "model": model.identity.name, "held_out": bool(args.held_out),
            "canvases": args.canvases, "seed": args.seed, "k": args.k, "canvas_size": list(CANVAS_SIZE),
            "photos_per_canvas": GRID[0] * GRID[1],
            f"recall_at_{args.k}_box": round(found["box"] / args.canvases, 4),
            f"recall_at_{args.k}_whole_canvas": round(found["whole"] / args.canvases, 4),
        }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
