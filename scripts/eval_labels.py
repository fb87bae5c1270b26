"""Zero-shot labels with a label set written for another shop: how a label's prompts should combine.

    python scripts/eval_labels.py [--model lookalike-base] [--datasets ../shared/datasets] [--limit 2000] [--json]

A shop's label set names a product type with several prompts (``data/labels/retail.yaml``:
"trousers: trousers, pants, leggings, jeans"). This script scores the same label sets with both
ways of combining them (:class:`indexer.labels.ZeroShotClassifier`, ``pooling``): ``max`` (a
label's cosine is its best prompt's) and ``mean`` (one embedding per label, the mean of its
prompts'), on three image sets whose own class names the label sets do not use:

* **Magento** photos against ``retail.yaml`` (24 product types). The right label of a photo comes
  from the last part of its product's category (:data:`MAGENTO_TRUTH`: "Men/Bottoms/Pants" ->
  trousers; a bag may also be called a backpack). Reported for the products the bundled model
  never trained on (its ``magento_split.json``, when the model has one) and for all of them.
* **Fashion-MNIST** test images against ``retail.yaml`` (:data:`FASHION_MNIST_TRUTH`: "Pullover"
  -> sweater or hoodie, "Ankle boot" -> boots).
* **CIFAR-10** test images against the 10 class names with everyday synonyms as extra prompts
  (:data:`CIFAR10_SYNONYMS`: "automobile, car, sedan").

Prints top-1 accuracy per set and pooling (and the most frequent confusions of each), and with max
pooling as a closed set (each image set the reference of the hubness correction,
:meth:`indexer.labels.ZeroShotClassifier.set_reference`): only CIFAR-10's set is closed here, so the
other columns show what the correction costs when labels name things the photos do not hold. Then
``retail.yaml`` cut down to the types each set holds (a shop's taxonomy of what it sells, so a
closed set), photo by photo and as a closed set.

Also text search on the Magento photos (``text_search_precision_at_5``): precision@5 of 27
product-type queries (the catalogue's 15 category phrases and 12 everyday words, :data:`TYPE_WORDS`)
and of 16 colour-and-type queries ("red hoodie"; a hit is the type in that colour).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from indexer.evaluate_retrieval import RETAIL_LABELS_OF_MAGENTO as MAGENTO_TRUTH  # noqa: E402

#: Fashion-MNIST class -> the retail.yaml labels that are right for it
FASHION_MNIST_TRUTH = (("t-shirt", "tank top"), ("trousers",), ("sweater", "hoodie"), ("dress",), ("jacket",),
                       ("sandals",), ("shirt", "t-shirt"), ("shoes",), ("bag", "backpack"), ("boots",))
#: everyday words for text search, with the Magento category leaf that answers them
TYPE_WORDS = {"hoodie": "Hoodies & Sweatshirts", "jacket": "Jackets", "t-shirt": "Tees", "tank top": "Tanks",
              "trousers": "Pants", "shorts": "Shorts", "bag": "Bags", "watch": "Watches",
              "sweatshirt": "Hoodies & Sweatshirts", "leggings": "Pants", "backpack": "Bags", "bra": "Bras & Tanks"}
COLOUR_QUERIES = [(f"{c} {w}", c, TYPE_WORDS[w]) for c in ("red", "blue", "black", "green")
                  for w in ("hoodie", "t-shirt", "shorts", "jacket")]
#: CIFAR-10 classes with everyday synonyms as extra prompts
CIFAR10_SYNONYMS = (("airplane", "aeroplane", "plane", "jet"), ("automobile", "car", "sedan"), ("bird",),
                    ("cat", "kitten"), ("deer",), ("dog", "puppy"), ("frog", "toad"), ("horse", "pony"),
                    ("ship", "boat"), ("truck", "lorry"))


def top1(classifier, vecs: np.ndarray, truth: list[tuple[str, ...]]) -> dict:
    """Top-1 accuracy of ``classifier`` on ``vecs`` (``(n, dim)``); ``truth[i]``: the right labels of
    image i, the first one named in the confusions."""
    names = classifier.label_set.names
    pred = [names[i] for i in classifier.label_scores(vecs).argmax(axis=1)]
    ok = [p in t for p, t in zip(pred, truth)]
    confusions = collections.Counter((t[0], p) for p, t, good in zip(pred, truth, ok) if not good)
    return {"top1": round(float(np.mean(ok)), 4), "n": len(ok),
            "confusions": [f"{a} -> {b}: {n}" for (a, b), n in confusions.most_common(4)]}


def text_search(model, rows: list[dict], files: list[str], vecs: np.ndarray) -> dict:
    """Precision@5 of text queries over the Magento photos ``files`` (embeddings ``vecs``)."""
    from indexer.datasets import category_phrase

    category, colour = {}, {}
    for r in rows:
        category.setdefault(r["image"], r.get("category") or "")
        colour.setdefault(r["image"], str(r.get("color") or "").lower())
    cats = sorted({c for c in category.values() if c})
    types = [(category_phrase(c), lambda f, c=c: category[f] == c) for c in cats]
    types += [(w, lambda f, leaf=leaf: category[f].endswith(leaf)) for w, leaf in TYPE_WORDS.items()]
    colours = [(q, lambda f, c=c, leaf=leaf: category[f].endswith(leaf) and c in colour[f])
               for q, c, leaf in COLOUR_QUERIES]

    def p5(queries):
        q = model.embed_texts([text for text, _ in queries])
        top = np.argsort(-(q @ vecs.T), axis=1)[:, :5]
        return float(np.mean([np.mean([ok(files[j]) for j in row]) for (_, ok), row in zip(queries, top)]))

    return {"type_queries": len(types), "type_precision_at_5": round(p5(types), 4),
            "colour_type_queries": len(colours), "colour_type_precision_at_5": round(p5(colours), 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lookalike-base")
    ap.add_argument("--datasets",
                    default=os.environ.get("LOOKALIKE_DATASETS", str(ROOT.parent / "shared" / "datasets")))
    ap.add_argument("--limit", type=int, default=2000, help="test images per set for Fashion-MNIST and CIFAR-10")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from indexer import modelspec as ms
    from indexer.datasets import fashion_mnist, iter_cifar10
    from indexer.images import open_image
    from indexer.labels import LabelSet, ZeroShotClassifier
    from indexer.magento import build_manifest
    from indexer.model import load_model

    datasets = Path(args.datasets)
    model = load_model(args.model, None)
    retail = LabelSet.load()
    cifar = LabelSet.from_dict({"labels": [{"name": s[0], "prompts": list(s)} for s in CIFAR10_SYNONYMS]})

    rows, _ = build_manifest(datasets / "magento")
    all_files = sorted({r["image"] for r in rows})
    photos = {}
    for r in rows:
        leaf = (r.get("category") or "").split("/")[-1]
        if leaf in MAGENTO_TRUTH:
            photos.setdefault(r["image"], (r["id"], MAGENTO_TRUTH[leaf]))
    every = np.concatenate([model.embed_images([open_image(f, draft_size=model.draft_size)
                                                for f in all_files[i:i + 64]]) for i in range(0, len(all_files), 64)])
    files = sorted(photos)
    mag = every[[all_files.index(f) for f in files]]
    folder = ms.local_dir(ms.open_clip_name(args.model)[0])
    split_file = folder / "magento_split.json" if folder is not None else None
    held = set(json.loads(split_file.read_text())["held_out"]) if split_file and split_file.is_file() else None
    f_images, f_labels = fashion_mnist(datasets / "fashion-mnist", "test", args.limit)
    fm = model.embed_images([Image.fromarray(x, "L").convert("RGB") for x in f_images])
    items = list(iter_cifar10(datasets / "cifar10" / "test.tar.gz", args.limit))
    cf = model.embed_images([im for im, _, _ in items])

    result = {"model": args.model}
    truth = [photos[f][1] for f in files]
    fm_truth = [FASHION_MNIST_TRUTH[int(y)] for y in f_labels]
    keep = np.array([photos[f][0] in held for f in files]) if held is not None else None
    # "max+closed-set": max pooling, each set its own hubness reference (ZeroShotClassifier.set_reference,
    # `lookalike label INDEX --closed-set`); retail.yaml is not a closed set on these photos: it shows the cost
    for variant in ("mean", "max", "max+closed-set"):
        pooling = variant.split("+")[0]
        r_clf = ZeroShotClassifier(model, LabelSet(retail.labels, retail.templates, pooling))
        c_clf = ZeroShotClassifier(model, LabelSet(cifar.labels, cifar.templates, pooling))
        as_catalogue = variant.endswith("closed-set")
        r_clf.set_reference(every if as_catalogue else None)
        out = {"magento_all": top1(r_clf, mag, truth)}
        if keep is not None:
            out["magento_held_out"] = top1(r_clf, mag[keep], [t for t, k in zip(truth, keep) if k])
        r_clf.set_reference(fm if as_catalogue else None)
        out["fashion_mnist"] = top1(r_clf, fm, fm_truth)
        c_clf.set_reference(cf if as_catalogue else None)
        out["cifar10_synonyms"] = top1(c_clf, cf, [(CIFAR10_SYNONYMS[y][0],) for _, y, _ in items])
        result[variant] = out
    # a shop's own taxonomy of what it sells: retail.yaml cut down to the labels right for some photo of
    # the set, a closed set; labelled photo by photo and as a closed set
    sets = {"magento_all": (mag, truth, every), "fashion_mnist": (fm, fm_truth, fm)}
    if keep is not None:
        sets["magento_held_out"] = (mag[keep], [t for t, k in zip(truth, keep) if k], every)
    subset = {}
    for key, (vecs, right, reference) in sets.items():
        wanted = {name for t in right for name in t}
        clf = ZeroShotClassifier(model, LabelSet(tuple(lab for lab in retail.labels if lab.name in wanted),
                                                 retail.templates, "max"))
        plain = top1(clf, vecs, right)
        clf.set_reference(reference)
        subset[key] = {"labels": len(clf.label_set.labels), "per_photo": plain, "closed_set": top1(clf, vecs, right)}
    result["retail_closed_subset"] = subset
    result["text_search_precision_at_5"] = text_search(model, rows, all_files, every)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"zero-shot top-1, {args.model}: label set pooling mean -> max -> max as a closed set")
        for key in result["max"]:
            a, b, c = result["mean"][key], result["max"][key], result["max+closed-set"][key]
            print(f"  {key:18s} {a['top1']:.3f} -> {b['top1']:.3f} -> {c['top1']:.3f}  ({b['n']} images; "
                  f"confusions as a closed set: {'; '.join(c['confusions'])})")
        print("retail.yaml cut down to the types each set holds (a closed set): photo by photo -> as a closed set")
        for key, r in result["retail_closed_subset"].items():
            print(f"  {key:18s} {r['per_photo']['top1']:.3f} -> {r['closed_set']['top1']:.3f}  ({r['labels']} labels, "
                  f"{r['per_photo']['n']} images; confusions as a closed set: "
                  f"{'; '.join(r['closed_set']['confusions'])})")
        t = result["text_search_precision_at_5"]
        print(f"text search on the {len(all_files)} Magento photos, precision@5: {t['type_precision_at_5']:.3f} over "
              f"{t['type_queries']} product-type queries, {t['colour_type_precision_at_5']:.3f} over "
              f"{t['colour_type_queries']} colour-and-type queries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
