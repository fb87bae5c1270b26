"""Where lookalike-base's zero-shot accuracy is lost: two diagnostics on the shipped model.

    python scripts/probe_lookalike_base.py [--limit 2000] [--datasets ../shared/datasets]

1. **Ceiling of the frozen trunk.** A linear probe (multinomial logistic regression, Adam, 300
   full-batch steps, seeded) on the cached training descriptors of CIFAR-10 and Fashion-MNIST
   (``out/base-train/descriptors.npz``, written by ``scripts/train_lookalike_base.py``), 80/20
   split of the clean (untransformed) photos. Zero-shot through any head on these descriptors can
   hardly beat a supervised linear probe on the same descriptors.
2. **Unseen words.** Zero-shot top-1 on the first ``--limit`` test images of each set, split into
   the classes whose names training saw and the held-out ones (deer, truck; sandal, bag), for the
   learned part alone and with the untrained ConSE part added at weight ``w`` (score =
   ``cos_learned + w * cos_conse``), with image embeddings as they are or centred (the mean image
   embedding subtracted, either of the training views or of the test images themselves; centring
   reduces hubness, Suzuki et al. 2013). Templates as in ``lookalike eval``.

3. **Seen-class bias.** Calibrated stacking (Chao et al. 2016, "An Empirical Study and Analysis
   of Generalized Zero-Shot Learning"): ``gamma`` subtracted from the cosine of every label whose
   name training saw, which shows how far the held-out classes can rise once the bias toward the
   trained names is removed.
4. **The word vectors themselves.** The nearest GloVe words to each held-out class name among the
   words training saw (``training_words.txt``), with their cosines: a held-out name can only land
   where its GloVe neighbours were trained to be.

Prints one line per setting; the descriptors of the test images are cached in
``out/probe-base-cache.pt``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from indexer import base_model as bm  # noqa: E402
from indexer.datasets import CIFAR10_CLASSES, FASHION_MNIST_PROMPT_NAMES, fashion_mnist, iter_cifar10  # noqa: E402
from indexer.evaluate import CIFAR10_UNSEEN, CIFAR_TEMPLATES, FASHION_MNIST_UNSEEN, FASHION_TEMPLATES  # noqa: E402
from indexer.resources import DATA_DIR  # noqa: E402


def linear_probe(feats: np.ndarray, labels: np.ndarray, seed: int = 0) -> float:
    """Top-1 of a linear softmax classifier trained on 80 % of ``feats`` (n, D), tested on the rest."""
    x = torch.from_numpy(feats.astype(np.float32))
    x = (x - x.mean(0)) / x.std(0).clamp(min=1e-4)
    y = torch.from_numpy(labels.astype(np.int64))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[: int(0.8 * len(x))], perm[int(0.8 * len(x)):]
    w = torch.zeros(x.shape[1], int(y.max()) + 1, requires_grad=True)
    b = torch.zeros(w.shape[1], requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-3, weight_decay=1e-4)
    for _ in range(300):
        loss = F.cross_entropy(x[tr] @ w + b, y[tr])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(((x[te] @ w + b).argmax(1) == y[te]).float().mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default=str(ROOT.parent / "shared" / "datasets"))
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--train-cache", default=str(ROOT / "out" / "base-train" / "descriptors.npz"))
    args = ap.parse_args(argv)
    ds = Path(args.datasets)
    train_file = Path(args.train_cache)
    if not train_file.is_file():
        raise SystemExit(f"{train_file} not found: run scripts/train_lookalike_base.py first "
                         "(it caches the descriptors)")
    model, preprocess, tokenizer = bm.load_base_model(DATA_DIR / "models" / "lookalike-base")
    d = np.load(train_file)
    feats, owner, is_copy = d["feats"], d["owner"], d["is_copy"]
    # training items are CIFAR-10 (1,500 per class, by class), then Fashion-MNIST (1,000 per class)
    for name, lo, per in (("cifar10", 0, 1500), ("fashion-mnist", 15000, 1000)):
        m = ~is_copy & (owner >= lo) & (owner < lo + 10 * per)
        print(f"linear probe {name}: top-1 {linear_probe(feats[m], (owner[m] - lo) // per):.3f}")

    cache = ROOT / "out" / "probe-base-cache.pt"
    cached = torch.load(cache) if cache.is_file() else None
    stale = cached is not None and cached["cifar10"].shape[1] != model.visual.descriptor_dim  # another descriptor
    if cached is None or cached["limit"] != args.limit or stale:
        t0 = time.time()

        def descriptors(images):
            with torch.no_grad():
                return torch.cat([model.visual.descriptor(torch.stack([preprocess(im) for im in images[i:i + 64]]))
                                  for i in range(0, len(images), 64)])

        items = list(iter_cifar10(ds / "cifar10" / "test.tar.gz", args.limit))
        f_images, f_labels = fashion_mnist(ds / "fashion-mnist", "test", args.limit)
        cached = {"limit": args.limit, "cifar10": descriptors([i[0] for i in items]),
                  "cifar10_labels": torch.tensor([i[1] for i in items]),
                  "fashion-mnist": descriptors([Image.fromarray(x, "L").convert("RGB") for x in f_images]),
                  "fashion-mnist_labels": torch.as_tensor(np.asarray(f_labels), dtype=torch.long)}
        cache.parent.mkdir(exist_ok=True)
        torch.save(cached, cache)
        print(f"test descriptors: {time.time() - t0:.0f} s")

    def image_parts(desc):
        with torch.no_grad():
            return F.normalize(model.visual.project(desc), dim=-1), model.visual.conse(desc)

    def text_parts(names, templates):
        learned, glove = [], []
        with torch.no_grad():
            for n in names:
                _, pooled, lt = model.text._pool(tokenizer([t.format(n) for t in templates]))
                learned.append(F.normalize(F.normalize(lt, dim=-1).mean(0), dim=0))
                glove.append(F.normalize(F.normalize(pooled, dim=-1).mean(0), dim=0))
        return torch.stack(learned), torch.stack(glove)

    train_l, train_c = (p.mean(0) for p in image_parts(torch.from_numpy(feats[::5].astype(np.float32))))
    for name, names, templates, unseen in (("cifar10", CIFAR10_CLASSES, CIFAR_TEMPLATES, CIFAR10_UNSEEN),
                                           ("fashion-mnist", FASHION_MNIST_PROMPT_NAMES, FASHION_TEMPLATES,
                                            FASHION_MNIST_UNSEEN)):
        il, ic = image_parts(cached[name])
        tl, tg = text_parts(names, templates)
        y = cached[f"{name}_labels"]
        held = torch.isin(y, torch.tensor([list(names).index(u) for u in unseen]))
        for centre, (ml, mc) in (("none", (0.0, 0.0)), ("train-mean", (train_l, train_c)),
                                 ("test-mean", (il.mean(0), ic.mean(0)))):
            for w in (0.0, 0.25, 0.5, 1.0):
                p = ((il - ml) @ tl.t() + w * ((ic - mc) @ tg.t())).argmax(1)
                seen, new = (p[~held] == y[~held]).float().mean(), (p[held] == y[held]).float().mean()
                print(f"{name} centre={centre:10s} conse_w={w:4}: all {(p == y).float().mean():.3f} "
                      f"seen {seen:.3f} unseen {new:.3f}")
        seen_label = torch.tensor([n not in unseen for n in names], dtype=torch.float32)
        for gamma in (0.05, 0.1, 0.15, 0.2):
            p = (il @ tl.t() - gamma * seen_label).argmax(1)
            seen, new = (p[~held] == y[~held]).float().mean(), (p[held] == y[held]).float().mean()
            print(f"{name} calibrated stacking gamma={gamma}: all {(p == y).float().mean():.3f} "
                  f"seen {seen:.3f} unseen {new:.3f}")
    trained = set((DATA_DIR / "models" / "lookalike-base" / "training_words.txt").read_text().split())
    table = F.normalize(model.text.word_vectors(torch.arange(1, len(tokenizer.vocab) + 1)), dim=-1)
    trained_ids = torch.tensor([tokenizer.index[w] - 1 for w in sorted(trained) if w in tokenizer.index])
    for word in CIFAR10_UNSEEN + FASHION_MNIST_UNSEEN:
        sims = table[trained_ids] @ table[tokenizer.index[word] - 1]
        top = sims.topk(8)
        near = ", ".join(f"{tokenizer.vocab[int(trained_ids[i])]} {v:.2f}" for v, i in zip(top.values, top.indices))
        print(f"GloVe neighbours of '{word}' among the trained words: {near}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
