"""Training data for :mod:`indexer.finetune`: photos decoded once into a uint8 array, captions
filled from templates, and batched augmentation on tensors.

Decoding runs in a process pool (``workers``); each photo is resized and centre-cropped (or padded,
for models whose preprocessing pads) to the model's input size, so the whole training set sits in
memory at ``3 * size * size`` bytes a photo.
"""
from __future__ import annotations

import math
import re
from multiprocessing import Pool

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .images import ImageError, open_image

__all__ = ["augment", "caption", "load_pixels"]


def _load_one(args) -> tuple[int, np.ndarray | None, str | None]:
    i, source, size, pad_fill = args
    try:
        im = open_image(source, draft_size=2 * size)
    except ImageError as e:
        return i, None, f"{e.reason}: {e}"
    w, h = im.size
    if pad_fill is not None:  # the model's preprocessing pads to a square (open_clip resize_mode "longest")
        scale = size / max(w, h)
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample=3)  # bicubic
        canvas = Image.new("RGB", (size, size), (pad_fill,) * 3)
        canvas.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
        return i, np.asarray(canvas, dtype=np.uint8).transpose(2, 0, 1).copy(), None
    scale = size / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample=3)  # bicubic
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    im = im.crop((left, top, left + size, top + size))
    return i, np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy(), None


def load_pixels(sources: list[str], size: int, workers: int, progress: bool = True, pad_fill: int | None = None):
    """Decode every photo, resize its shorter side to ``size`` and centre-crop: uint8 ``(n, 3, size, size)``;
    with ``pad_fill`` (0-255), resize its longer side instead and pad to a square with that grey level.

    Returns (pixels, ok mask ``(n,)`` bool, failures {index: reason}).
    """
    pixels = np.zeros((len(sources), 3, size, size), dtype=np.uint8)
    ok = np.zeros(len(sources), dtype=bool)
    failures: dict[int, str] = {}
    jobs = [(i, s, size, pad_fill) for i, s in enumerate(sources)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), unit="img", desc="decoding", dynamic_ncols=True)
    if workers > 1:
        with Pool(workers) as pool:
            results = pool.imap_unordered(_load_one, jobs, chunksize=256)
            for i, arr, err in results:
                _store(pixels, ok, failures, i, arr, err)
                if bar:
                    bar.update()
    else:
        for job in jobs:
            _store(pixels, ok, failures, *_load_one(job))
            if bar:
                bar.update()
    if bar:
        bar.close()
    return pixels, ok, failures


def _store(pixels, ok, failures, i, arr, err):
    if arr is None:
        failures[i] = err
    else:
        pixels[i] = arr
        ok[i] = True


class _Fields(dict):
    def __missing__(self, key):
        return ""


def caption(template: str, row_fields: dict) -> str:
    """Fill ``template`` with a row's columns; missing columns become empty; whitespace is tidied."""
    text = template.format_map(_Fields(row_fields))
    text = re.sub(r"\s+([,.])", r"\1", text)  # "hoodie ," -> "hoodie,"
    text = re.sub(r",+([,.])", r"\1", text)  # "hoodie,." -> "hoodie."
    return re.sub(r"\s+", " ", text).strip(" ,")


def augment(batch_u8: torch.Tensor, gen: torch.Generator, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Random resized crop (area 0.55-1, aspect 3/4-4/3), horizontal flip, brightness and contrast x0.85-1.15,
    batched with ``affine_grid``/``grid_sample``; returns normalised float ``(n, 3, H, W)``."""
    n = batch_u8.shape[0]
    x = batch_u8.float() / 255.0
    area = torch.empty(n).uniform_(0.55, 1.0, generator=gen)
    log_ratio = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
    ratio = log_ratio.exp()
    sx = (area * ratio).sqrt().clamp(max=1.0)
    sy = (area / ratio).sqrt().clamp(max=1.0)
    tx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sx)
    ty = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sy)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = sx * flip
    theta[:, 0, 2] = tx
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    brightness = torch.empty(n, 1, 1, 1).uniform_(0.85, 1.15, generator=gen)
    contrast = torch.empty(n, 1, 1, 1).uniform_(0.85, 1.15, generator=gen)
    grey = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - grey) * contrast + grey) * brightness
    x = x.clamp(0, 1)
    return (x - mean) / std
