"""Composed queries on Magento: a product photo + another colour the product exists in.

    python scripts/eval_composed.py [--index out/magento-lookalike-base] [--weights 0 0.1 ... 1] [-k 5]
                                    [--prompt "in {colour}"] [--pool 30]

Each configurable Magento product comes in colours (its photos' ``color`` column, from the
``additional_attributes`` of the export, see :mod:`indexer.magento`). A query is the product's
first photo in colour A (its ``main`` view where there is one) with the words of colour B, another
colour of the same product; it succeeds when a top-k hit is that product *and* the photo it
matched is in colour B (the query photo itself is in the index, so the photo alone finds the product,
in colour A). Compared, on the same queries:

* ``photo_only``: the photo alone (``text_weight`` 0);
* ``text_only``: the colour words alone (``text_weight`` 1);
* ``composed``: :func:`indexer.compose.compose` (normalised weighted sum), for each weight tried;
* ``composed_negative``: the same at the default weight with colour A's words as ``negative_text``;
* ``rerank``: the alternative: the photo's top ``--pool`` products, their photos re-ranked by the
  cosine with the colour words.

Searches go through :meth:`indexer.store.Store.search` as the server's do (min_score 0 for photo
and composed queries, none for text); the re-ranking uses the stored photo vectors. Prints one
JSON object. Build the index first::

    python scripts/prepare_magento.py --out out/magento.jsonl
    lookalike index out/magento.jsonl --out out/magento-lookalike-base --model lookalike-base
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from indexer.compose import DEFAULT_TEXT_WEIGHT, compose  # noqa: E402
from indexer.modelspec import ModelSpec  # noqa: E402
from indexer.search import PHOTO_QUERY_MIN_SCORE  # noqa: E402
from indexer.store import Store  # noqa: E402

WEIGHTS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def catalogue_photos(store: Store):
    """{product_id: [(photo_id, colour, view, vector)]} for every product with a colour column."""
    out = {}
    for pid, vecs in store.iter_products():
        images = store.get_product(pid)["images"]
        photos = [(im["photo_id"], (im["metadata"].get("color") or "").strip(), im["metadata"].get("view") or "",
                   vec) for im, vec in zip(images, vecs)]
        if any(colour for _, colour, _, _ in photos):
            out[pid] = photos
    return out


def make_queries(products) -> list[tuple[str, str, str, np.ndarray]]:
    """(product_id, colour A, colour B, vector of the product's first colour-A photo, main view first)."""
    queries = []
    for pid, photos in sorted(products.items()):
        by_colour = defaultdict(list)
        for _, colour, view, vec in photos:
            if colour:
                by_colour[colour].append((view != "main", vec))
        for a in sorted(by_colour):
            vec = sorted(by_colour[a], key=lambda t: t[0])[0][1]
            queries.extend((pid, a, b, vec) for b in sorted(by_colour) if b != a)
    return queries


def success(hits, pid: str, colour: str, colour_of: dict[int, str]) -> bool:
    return any(h.product_id == pid and colour_of.get(h.photo_id) == colour for h in hits)


def rate(all_hits, queries, colour_of) -> float:
    ok = sum(success(hits, pid, b, colour_of) for hits, (pid, _, b, _) in zip(all_hits, queries))
    return round(ok / len(queries), 4)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", default="out/magento-lookalike-base", help="index of the Magento catalogue")
    ap.add_argument("--weights", type=float, nargs="+", default=WEIGHTS, help="text_weight values to try")
    ap.add_argument("-k", type=int, default=5, help="top-k products a query may find its target in")
    ap.add_argument("--prompt", default="in {colour}", help="the words of a colour; {colour} is replaced")
    ap.add_argument("--pool", type=int, default=30, help="products the re-ranking alternative re-orders")
    args = ap.parse_args(argv)

    with Store.open(args.index) as store:
        model = ModelSpec().load_for(store)
        products = catalogue_photos(store)
        colour_of = {photo_id: colour for photos in products.values() for photo_id, colour, _, _ in photos}
        queries = make_queries(products)
        if not queries:
            raise SystemExit(f"{args.index}: no product with photos in two colours (is it the Magento catalogue?)")
        colours = sorted({q[2] for q in queries})
        text_vec = dict(zip(colours, model.embed_texts([args.prompt.format(colour=c.lower()) for c in colours])))
        photos = np.stack([q[3] for q in queries])
        texts = np.stack([text_vec[q[2]] for q in queries])
        negatives = np.stack([text_vec[q[1]] for q in queries])

        def search(vecs, min_score):
            return store.search(np.ascontiguousarray(vecs, np.float32), args.k, min_score=min_score)

        photo_only = rate(search(photos, PHOTO_QUERY_MIN_SCORE), queries, colour_of)
        text_only = rate(search(texts, None), queries, colour_of)
        composed = {}
        signature_dims = model.photo_only_dims  # left out of the photo in a composed query (compose)
        for w in args.weights:
            vecs = np.concatenate([compose(p[None], t[None], None, w, signature_dims) for p, t in zip(photos, texts)])
            composed[f"{w:g}"] = rate(search(vecs, PHOTO_QUERY_MIN_SCORE), queries, colour_of)
        vecs = np.concatenate([compose(p[None], t[None], n[None], DEFAULT_TEXT_WEIGHT, signature_dims)
                               for p, t, n in zip(photos, texts, negatives)])
        composed_negative = rate(search(vecs, PHOTO_QUERY_MIN_SCORE), queries, colour_of)

        # the alternative: the photo's neighbours, re-ranked by the words
        pool_hits = store.search(photos, args.pool, min_score=PHOTO_QUERY_MIN_SCORE)
        vectors = {pid: [(photo_id, v) for photo_id, _, _, v in ph] for pid, ph in products.items()}
        for pid, vecs_ in store.iter_products():
            if pid not in vectors:
                ids = [im["photo_id"] for im in store.get_product(pid)["images"]]
                vectors[pid] = list(zip(ids, vecs_))
        reranked = 0
        for hits, (pid, _, b, _), t in zip(pool_hits, queries, texts):
            best = sorted(((max(float(v @ t) for _, v in vectors[h.product_id]), h.product_id) for h in hits),
                          reverse=True)[:args.k]
            top = {p for _, p in best}
            if pid in top:
                matched = max(vectors[pid], key=lambda iv: float(iv[1] @ t))[0]
                reranked += colour_of.get(matched) == b
        best_w = max(composed, key=lambda w: (composed[w], -abs(float(w) - DEFAULT_TEXT_WEIGHT)))
        print(json.dumps({
            "index": args.index, "model": model.identity.name, "queries": len(queries),
            "products": len({q[0] for q in queries}), "k": args.k, "prompt": args.prompt,
            "photo_only": photo_only, "text_only": text_only, "composed_by_text_weight": composed,
            "best_text_weight": float(best_w), "default_text_weight": DEFAULT_TEXT_WEIGHT,
            "composed_at_default": composed.get(f"{DEFAULT_TEXT_WEIGHT:g}"),
            "composed_negative_at_default": composed_negative,
            "rerank_photo_neighbours_by_text": round(reranked / len(queries), 4), "rerank_pool": args.pool,
        }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
