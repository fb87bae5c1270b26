"""Contrastive fine-tuning (or training from scratch) of an open_clip model on catalogue photos.

Data: one or more catalogues (any format :func:`indexer.catalogue.read_catalogue`
reads). Each photo gets a caption from a template filled with its row's columns
(``{title}``, ``{category}``, any metadata column). All photos are decoded once,
resized to the model's input size and kept in memory as uint8; augmentation
(random resized crop, horizontal flip, brightness/contrast) runs batched on tensors
(:mod:`indexer.finetune_data`).

Loss: the symmetric CLIP loss (Radford et al. 2021, eq. in Fig. 3), with one change:
every batch uses one template, and pairs whose captions are equal are positives,
not negatives. The targets of each row are spread evenly over its positives
(multi-positive contrastive loss, as in SupCon, Khosla et al. 2020). Without this,
two photos of the same category captioned "a photo of a dress." would be pushed apart.

Output: an open_clip model folder (``open_clip_config.json``, ``open_clip_model.safetensors``
in float16, ``MODEL_CARD.md``, ``training.json``) that ``--model PATH`` loads everywhere.
Resumable: ``checkpoint.pt`` in the output folder is written atomically every
``checkpoint_every`` steps and at each epoch end.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .base_model import LookalikeBase, save_base_model
from .catalogue import Catalogue, read_catalogue
from .errors import LookalikeError
from .finetune_data import augment, caption, load_pixels
from .modelspec import TRAIN_PRECISIONS

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ("a photo of a {title}.", "{title}", "a photo of {category}.", "{title}, {category}.")


class FinetuneError(LookalikeError):
    code = "finetune_error"


@dataclass
class FinetuneConfig:
    catalogues: list[str]
    out: str
    model: str = "ViT-B-32"
    pretrained: str | None = None
    from_scratch: bool = False
    epochs: float = 1.0
    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_steps: int = 200
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    seed: int = 0
    weights: dict[str, float] = field(default_factory=dict)  # "column=value" -> repeat factor
    max_minutes: float | None = None
    precision: str = "auto"  # auto | bf16 | fp32
    checkpoint_every: int = 500
    split_file: str | None = None
    workers: int = 2
    name: str | None = None


def multi_positive_clip_loss(image_features, text_features, caption_ids, logit_scale) -> torch.Tensor:
    """Symmetric CLIP loss where captions that are equal are positives.

    image_features: ``(n, d)`` unit rows; text_features: ``(u, d)`` unit rows, one per
    distinct caption; caption_ids: ``(n,)`` long, the distinct caption of each image.
    Image->text: cross-entropy over the distinct captions (exactly one is right).
    Text->image: each caption against every image, targets spread evenly over the
    images that carry it.
    """
    logits = logit_scale * image_features @ text_features.t()  # (n, u)
    loss_i2t = F.cross_entropy(logits, caption_ids)
    positives = F.one_hot(caption_ids, text_features.shape[0]).t().float()  # (u, n)
    targets = positives / positives.sum(dim=1, keepdim=True)
    loss_t2i = -(targets * F.log_softmax(logits.t(), dim=1)).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


# ----------------------------------------------------------------- model
def _build_model(cfg: FinetuneConfig):
    """(model, preprocess_cfg, model_cfg, tokenizer) for training; tokenizer is the loaded model's own for a
    lookalike-base folder (a word tokenizer over its vocabulary), else None (open_clip's tokenizer)."""
    import open_clip

    from .model import load_model
    from .modelspec import local_dir, open_clip_name

    config_path = Path(cfg.model)
    if config_path.suffix == ".json" and config_path.is_file():
        data = json.loads(config_path.read_text())
        model_cfg = data.get("model_cfg", data)
        preprocess_cfg = data.get("preprocess_cfg", {})
        if not cfg.from_scratch and cfg.pretrained is None:
            raise FinetuneError(f"{cfg.model} is an architecture config: give --pretrained FILE or --from-scratch")
        model = open_clip.model.CLIP(**model_cfg)
        if cfg.pretrained:
            open_clip.load_checkpoint(model, cfg.pretrained)
        return model, _preprocess_cfg(preprocess_cfg), model_cfg, None
    ident, _ = open_clip_name(cfg.model)
    folder = local_dir(ident)
    if cfg.from_scratch:
        model_cfg = open_clip.get_model_config(ident) if folder is None else json.loads(
            (folder / "open_clip_config.json").read_text())["model_cfg"]
        if model_cfg is None:
            raise FinetuneError(f"unknown architecture {cfg.model!r}")
        return open_clip.model.CLIP(**model_cfg), _preprocess_cfg({}), model_cfg, None
    loaded = load_model(cfg.model, cfg.pretrained, "cpu", precision="fp32", backend="torch")  # bf16 autocast
    model = loaded.model
    if folder is not None:
        data = json.loads((folder / "open_clip_config.json").read_text())
        model_cfg, pre = data["model_cfg"], data.get("preprocess_cfg", {})
    else:
        model_cfg, pre = open_clip.get_model_config(ident), {}
    return model, _preprocess_cfg(pre), model_cfg, loaded.tokenizer if isinstance(model, LookalikeBase) else None


def _preprocess_cfg(pre: dict) -> dict:
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    out = {"mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD), "interpolation": "bicubic",
           "resize_mode": "shortest"}
    out.update(pre)
    return out


def _image_size(model_cfg: dict) -> int:
    if "vision_cfg" not in model_cfg:  # lookalike-base's flat config
        return int(model_cfg.get("image_size", 224))
    size = model_cfg["vision_cfg"].get("image_size", 224)
    return size[0] if isinstance(size, (list, tuple)) else int(size)


def _use_bf16(precision: str) -> bool:
    """Whether to train under bf16 autocast: ``auto`` resolves as for inference on the CPU
    (:func:`indexer.model.resolve_precision`)."""
    from .model import resolve_precision

    if precision not in TRAIN_PRECISIONS:
        raise FinetuneError(f"unknown training precision {precision!r}: use {', '.join(TRAIN_PRECISIONS)}")
    return resolve_precision(precision, torch.device("cpu")) == "bf16"


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_scale" in name or "bn" in name or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ------------------------------------------------------------------ main
def finetune(cfg: FinetuneConfig, progress: bool = True) -> dict:
    """Train and write the model folder ``cfg.out``; returns the training summary (also ``training.json``)."""
    t_start = time.time()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    rows_fields, sources, repeats = _read_rows(cfg)
    model, preprocess_cfg, model_cfg, own_tokenizer = _build_model(cfg)
    size = _image_size(model_cfg)
    import open_clip

    if own_tokenizer is not None:  # lookalike-base: a word tokenizer over its GloVe vocabulary
        tokenizer = own_tokenizer
        context_length = model.context_length
    else:
        tokenizer = open_clip.tokenize if "hf_tokenizer_name" not in model_cfg.get("text_cfg", {}) else None
        if tokenizer is None:
            raise FinetuneError("models with Hugging Face text towers are not supported by finetune yet")
        context_length = model_cfg["text_cfg"].get("context_length", 77)

    t_decode = time.time()
    pad_fill = int(preprocess_cfg.get("fill_color", 0)) if preprocess_cfg.get("resize_mode") == "longest" else None
    pixels, ok, failures = load_pixels(sources, size, cfg.workers, progress, pad_fill)
    decode_s = time.time() - t_decode
    keep = np.flatnonzero(ok)
    if len(keep) < 2:
        raise FinetuneError("fewer than 2 readable photos: nothing to train on")
    order_pool = np.repeat(keep, np.asarray(repeats)[keep])
    steps_per_epoch = max(1, len(order_pool) // cfg.batch_size)
    total_steps = max(1, int(round(cfg.epochs * steps_per_epoch)))

    mean = torch.tensor(preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(preprocess_cfg["std"]).view(1, 3, 1, 1)
    model.train()
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)

    deadline = t_start + cfg.max_minutes * 60 if cfg.max_minutes else None

    def schedule_progress(step: int) -> float:
        """Fraction of the cosine schedule done: by steps, or by wall time when --max-minutes would
        cut the run short (so the learning rate still anneals to 0 by the deadline)."""
        by_steps = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        if deadline is None:
            return by_steps
        by_time = (time.time() - t_warm_end) / max(1e-9, deadline - t_warm_end) if t_warm_end else 0.0
        return max(by_steps, by_time)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, schedule_progress(step))))

    step, history = 0, []
    ckpt_path = out / "checkpoint.pt"
    gen = torch.Generator().manual_seed(cfg.seed)
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ckpt.get("config_key") != _config_key(cfg):
            raise FinetuneError(f"{ckpt_path} belongs to a run with other settings; remove it or use another --out")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, history = ckpt["step"], ckpt["history"]
        gen.set_state(ckpt["generator"])
        log.info("resumed from step %d", step)
    bf16 = _use_bf16(cfg.precision)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, unit="step", desc="training", dynamic_ncols=True)
    epoch_order = None
    t_warm_end = None
    t_train = time.time()
    images_seen = 0
    stopped_early = False

    while step < total_steps:
        epoch, pos = divmod(step, steps_per_epoch)
        if pos == 0 or epoch_order is None:
            perm_gen = torch.Generator().manual_seed(cfg.seed * 1000003 + epoch)
            epoch_order = order_pool[torch.randperm(len(order_pool), generator=perm_gen).numpy()]
        idx = epoch_order[pos * cfg.batch_size : (pos + 1) * cfg.batch_size]
        template = cfg.templates[int(torch.randint(len(cfg.templates), (1,), generator=gen))]
        captions = [caption(template, rows_fields[i]) for i in idx]
        distinct = list(dict.fromkeys(captions))
        caption_ids = torch.tensor([distinct.index(c) for c in captions])
        images = augment(torch.from_numpy(pixels[idx]), gen, mean, std)
        tokens = tokenizer(distinct, context_length=context_length)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            img = F.normalize(model.encode_image(images).float(), dim=-1)
            txt = F.normalize(model.encode_text(tokens).float(), dim=-1)
            loss = multi_positive_clip_loss(img, txt, caption_ids, model.logit_scale.exp().clamp(max=100))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        images_seen += len(idx)
        if step == cfg.warmup_steps or (t_warm_end is None and step > cfg.warmup_steps):
            t_warm_end = time.time()
        history.append(round(loss.item(), 4))
        if bar:
            rate = images_seen / max(1e-9, time.time() - t_train)
            bar.set_postfix(loss=f"{np.mean(history[-50:]):.3f}", img_s=f"{rate:.0f}", refresh=False)
            bar.update()
        if step % cfg.checkpoint_every == 0 or step % steps_per_epoch == 0:
            _atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                                "history": history, "generator": gen.get_state(), "config_key": _config_key(cfg)},
                               ckpt_path)
        if step > cfg.warmup_steps and schedule_progress(step) >= 1.0 and step < total_steps:
            stopped_early = True
            break
    if bar:
        bar.close()

    train_s = time.time() - t_train
    model.eval()
    summary = {
        "name": cfg.name or out.name,
        "config": asdict(cfg),
        "model_cfg": model_cfg,
        "parameters": sum(p.numel() for p in model.parameters()),
        "photos": int(len(sources)),
        "photos_failed": {sources[i]: reason for i, reason in list(failures.items())[:100]},
        "photos_failed_count": len(failures),
        "samples_per_epoch": int(len(order_pool)),
        "steps": step,
        "total_steps_planned": total_steps,
        "epochs_done": round(step / steps_per_epoch, 3),
        "stopped_at_time_limit": stopped_early,
        "decode_seconds": round(decode_s, 1),
        "train_seconds": round(train_s, 1),
        "wall_seconds": round(time.time() - t_start, 1),
        "images_per_s": round(images_seen / max(train_s, 1e-9), 1),
        "final_loss": round(float(np.mean(history[-100:])), 4) if history else None,
        "loss_every_100_steps": history[::100],
        "precision": "bf16" if bf16 else "fp32",
        "logit_scale": round(model.logit_scale.detach().exp().item(), 3),
    }
    if isinstance(model, LookalikeBase):
        # the base model's calibration was measured for its own weights: a fine-tuned copy has none
        save_base_model(model, tokenizer.vocab, out, preprocess_cfg,
                        {"trained_by": "lookalike finetune", "templates": cfg.templates, "from": cfg.model})
        _write_model_folder(out, model, model_cfg, preprocess_cfg, summary, cfg, weights=False)
    else:
        _write_model_folder(out, model, model_cfg, preprocess_cfg, summary, cfg)
    ckpt_path.unlink(missing_ok=True)
    return summary


def _config_key(cfg: FinetuneConfig) -> str:
    d = asdict(cfg)
    for k in ("max_minutes", "workers", "checkpoint_every"):
        d.pop(k)
    return json.dumps(d, sort_keys=True)


def _read_rows(cfg: FinetuneConfig):
    """(fields per photo, sources, repeat factor per photo) from every catalogue."""
    fields, sources, repeats = [], [], []
    for path in cfg.catalogues:
        cat: Catalogue = read_catalogue(path)
        for row in cat.rows:
            info = cat.products[row.product_id]
            f = {**info["metadata"], **row.metadata, "id": row.product_id,
                 "title": info["title"] or "", "category": info["category"] or ""}
            factor = 1.0
            for key, w in cfg.weights.items():
                col, _, value = key.partition("=")
                if str(f.get(col, "")) == value:
                    factor *= w
            fields.append(f)
            sources.append(row.source)
            repeats.append(max(0, int(round(factor))))
    if not sources:
        raise FinetuneError("the catalogues hold no photos")
    return fields, sources, repeats


def _write_model_folder(out: Path, model, model_cfg, preprocess_cfg, summary, cfg: FinetuneConfig,
                        weights: bool = True) -> None:
    """Weights and config of an open_clip model (``weights=False``: already written), training log, card."""
    from safetensors.torch import save_file

    if weights:
        state = {k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous()
                 for k, v in model.state_dict().items()}
        save_file(state, str(out / "open_clip_model.safetensors.tmp"))
        os.replace(out / "open_clip_model.safetensors.tmp", out / "open_clip_model.safetensors")
        config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg,
                  "lookalike": {"trained_by": "lookalike finetune", "templates": cfg.templates}}
        (out / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    (out / "training.json").write_text(json.dumps(summary, indent=2, default=str))
    if cfg.split_file:
        shutil.copyfile(cfg.split_file, out / "magento_split.json")
    card = out / "MODEL_CARD.md"
    if not card.exists():
        card.write_text(
            f"# {summary['name']}\n\nTrained with `lookalike finetune` "
            f"({summary['steps']} steps, {summary['epochs_done']} epochs, {summary['wall_seconds']:.0f} s wall time, "
            f"{summary['parameters'] / 1e6:.1f} M parameters). See training.json for the full settings.\n"
        )
