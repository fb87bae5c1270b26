"""Zero-shot labels: label sets, prompt templates and scoring.

A label set is a YAML or JSON file::

    templates: ["a photo of a {}.", ...]     # optional; DEFAULT_TEMPLATES otherwise
    pooling: max                             # optional; how a label's prompts combine: max or mean
    labels:
      - name: hoodie
        prompts: [hoodie, hooded sweatshirt]  # optional; [name] otherwise
      - dress                                 # a bare name is fine too

Each prompt's embedding is the mean of its text embeddings through every template,
re-normalised (the prompt ensemble of Radford et al. 2021, "Learning Transferable Visual
Models From Natural Language Supervision", sec. 3.1.4). A label's cosine with an image is
the highest cosine of its prompts: a label's prompts name alternatives ("bag": handbag, tote
bag, duffle bag), and a photo of any one of them is a photo of the label. Averaging them
instead puts the label between its alternatives, close to none. Measured with lookalike-base
(``python scripts/eval_labels.py``, 2026-12-01): top-1 of ``data/labels/retail.yaml`` on the
photos of the held-out Magento products 0.55 -> 0.65 (all products 0.63 -> 0.76), on
Fashion-MNIST test images 0.60 -> 0.68; CIFAR-10 with synonyms as prompts ("car" beside
"automobile") 0.65 -> 0.67. A label with one prompt scores as before. A label set may ask for
the average instead (``pooling: mean``: one embedding per label, the normalised mean of its
prompts' embeddings).
Probabilities are the softmax over the label set of ``logit_scale * score``, with
the model's own learned logit scale. A label's score is its cosine, or, for a **closed label
set** labelled against a reference (:meth:`ZeroShotClassifier.set_reference`: the catalogue
itself, when every label names something the catalogue holds), its cosine minus the mean of its
``k`` highest cosines over the reference photos: the label-side term of CSLS (cross-domain
similarity local scaling; Conneau et al. 2018, "Word Translation Without Parallel Data", eq. 6),
with weight 1, a hubness correction (Radovanovic et al. 2010; for zero-shot labels, Dinu et al.
2015). Words the text tower was trained on sit close to their training photos and win over a
fitting word it never saw; the correction compares each label with the photos it fits best.
It lifts every label the model matches weakly, the right ones and the wrong ones alike, so it is
opt-in (``lookalike label INDEX --closed-set``). Measured with lookalike-base (MODEL_CARD.md):
top-1 on the CIFAR-10 and Fashion-MNIST classes whose names training never saw rose from about 0
to 0.62 / 0.58 (``lookalike eval``, the ``_closed_set`` keys), and ``data/labels/retail.yaml`` cut
down to the types Fashion-MNIST holds rose 0.70 -> 0.76; but cut down to the types Magento sells
it fell 0.83 -> 0.73 (jackets became "tank top", a label the model matches weakly), and the whole
set, which names things Magento does not sell, fell 0.76 -> 0.30 (``python scripts/eval_labels.py``).
The reject option (``none_of_these``) and the ``cosine`` reported beside each label stay the plain
cosine.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import LookalikeError
from .resources import DATA_DIR

if TYPE_CHECKING:  # importing the model module imports torch: reading a label set should not
    from .model import ClipModel

log = logging.getLogger(__name__)

DEFAULT_LABELS_FILE = DATA_DIR / "labels" / "retail.yaml"
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a product photo of a {}.",
    "a close-up photo of a {}.",
    "a photo of the {}.",
)
MAX_LABELS = 1000
#: CSLS neighbourhood: a label's reference term is the mean of its HUBNESS_K best cosines over the
#: reference photos, or of a tenth of them in a smaller reference. 10 is Conneau et al.'s; measured
#: against 1-50 (scripts/eval_labels.py, MODEL_CARD.md), larger k held the unseen CIFAR-10 and
#: Fashion-MNIST classes a little higher but cost a shop's own label words on Magento, whose
#: small classes (watches, bags) fill a large k with other products' photos
HUBNESS_K = 10
#: fewer reference photos than this: no correction (a label's best few photos are too few to say
#: how close it sits to photos in general)
MIN_REFERENCE = 100
#: a larger reference is sampled down to this many photos (seeded), which bounds time and memory
MAX_REFERENCE = 20000
POOLINGS = ("max", "mean")
# open_clip's SimpleTokenizer memoises the BPE split of every word it has seen, without bound


class LabelSetError(LookalikeError):
    code = "bad_labels"


@dataclass(frozen=True)
class Label:
    name: str
    prompts: tuple[str, ...]


@dataclass(frozen=True)
class LabelSet:
    labels: tuple[Label, ...]
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    #: how a label's prompts combine: "max" (the best prompt's cosine) or "mean" (their mean embedding)
    pooling: str = "max"
    # whether ZeroShotClassifier keeps this set's embeddings on disk: only label-set files (the
    # server's configured set, the CLI's --labels), never sets that come with a request
    cache_on_disk: bool = field(default=False, compare=False)

    @property
    def names(self) -> list[str]:
        return [lab.name for lab in self.labels]

    def to_dict(self) -> dict:
        """The structure :meth:`from_dict` reads (an index records the set it was labelled with)."""
        return {"labels": [{"name": lab.name, "prompts": list(lab.prompts)} for lab in self.labels],
                "templates": list(self.templates), "pooling": self.pooling}

    @classmethod
    def from_names(cls, names: list[str], templates: tuple[str, ...] = DEFAULT_TEMPLATES) -> "LabelSet":
        """A label set from plain names (each its own prompt). Raises LabelSetError."""
        return cls.from_dict({"labels": names, "templates": list(templates)})

    @classmethod
    def from_dict(cls, data, cache_on_disk: bool = False) -> "LabelSet":
        """Parse the file structure described in the module docstring. Raises LabelSetError."""
        if isinstance(data, list):
            data = {"labels": data}
        if not isinstance(data, dict) or not isinstance(data.get("labels"), list):
            raise LabelSetError("a label set needs a 'labels' list")
        templates = data.get("templates") or list(DEFAULT_TEMPLATES)
        if not isinstance(templates, list) or not all(isinstance(t, str) and "{}" in t for t in templates):
            raise LabelSetError("'templates' must be a list of strings that each contain '{}'")
        for t in templates:
            try:
                t.format("x")
            except (IndexError, KeyError, ValueError) as e:
                raise LabelSetError(f"template {t!r} must hold one '{{}}' and no other braces "
                                    f"(write a literal brace as '{{{{' or '}}}}'): {type(e).__name__} {e}") from None
        pooling = data.get("pooling", "max")
        if pooling not in POOLINGS:
            raise LabelSetError(f"'pooling' must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        labels, seen = [], set()
        for entry in data["labels"]:
            if isinstance(entry, str):
                name, prompts = entry, [entry]
            elif isinstance(entry, dict) and isinstance(entry.get("name"), str):
                name = entry["name"]
                prompts = entry.get("prompts") or [name]
                if not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts):
                    raise LabelSetError(f"label {name!r}: 'prompts' must be a list of non-empty strings")
            else:
                raise LabelSetError(f"each label must be a string or {{name, prompts}}, got {entry!r}")
            name = name.strip()
            if not name:
                raise LabelSetError("label names must not be empty")
            if name in seen:
                raise LabelSetError(f"label {name!r} appears twice")
            seen.add(name)
            labels.append(Label(name, tuple(p.strip() for p in prompts)))
        if len(labels) < 2:
            raise LabelSetError("a label set needs at least 2 labels")
        if len(labels) > MAX_LABELS:
            raise LabelSetError(f"a label set may hold at most {MAX_LABELS} labels")
        return cls(tuple(labels), tuple(templates), pooling, cache_on_disk)

    @classmethod
    def load(cls, path: str | Path | None = None) -> "LabelSet":
        """Read a ``.yaml``/``.yml``/``.json`` label set (default: ``data/labels/retail.yaml``)."""
        path = Path(path) if path else DEFAULT_LABELS_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise LabelSetError(f"cannot read label set {path}: {e}") from e
        try:
            if path.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as e:  # yaml.YAMLError / ValueError: the file is the user's
            raise LabelSetError(f"{path} is not valid {path.suffix.lstrip('.').upper() or 'YAML'}: {e}") from e
        return cls.from_dict(data, cache_on_disk=True)


class ZeroShotClassifier:
    """Scores image embeddings against a label set: each label by the best of its prompts' embeddings."""

    # bump when what the cached arrays mean changes (v2: one row per prompt, not per label)
    CACHE_VERSION = 2

    def __init__(self, model: ClipModel, label_set: LabelSet):
        self.model = model
        self.label_set = label_set
        self.weights = self._prompt_embeddings()  # (n_prompts, dim), label by label
        counts = [len(lab.prompts) for lab in label_set.labels]
        #: index of each label's first row in ``weights`` (for ``np.maximum.reduceat``)
        self.label_starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.intp)
        #: the label of each row of ``weights``
        self.prompt_label = np.repeat(np.arange(len(counts)), counts)
        if label_set.pooling == "mean":
            sums = np.add.reduceat(self.weights, self.label_starts, axis=0)
            self._label_weights = (sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)).astype(np.float32)
        #: the CSLS reference term of each label ``(n_labels,)``, or None (no reference: scores are
        #: the plain cosines)
        self.reference_term: np.ndarray | None = None
        #: the reference photos used (distinct, finite, non-zero rows, sampled), or found too few
        self.reference_size = 0

    def set_reference(self, reference: np.ndarray | None, k: int = HUBNESS_K, seed: int = 0) -> bool:
        """Label photos relative to a reference set of photos, usually the catalogue they belong to.

        reference: float32 ``(n, dim)`` unit image embeddings of the same model, or None (no
        correction). Rows that are not finite or are zero (a damaged vector) are left out, and so are
        repeats of a row (one photo stored many times would otherwise be every label's neighbourhood).
        Each label gets the mean of its ``min(k, n // 10)`` highest cosines (:meth:`cosines`: its best
        prompt's) over the ``n`` reference photos left, and :meth:`label_scores` subtracts it from the
        label's cosines (see the module docstring). The term is the label's, not each prompt's: a
        label's prompts name alternatives, and a prompt for something the catalogue lacks ("sports
        bra" under "tank top") would otherwise lift its label everywhere. More than
        :data:`MAX_REFERENCE` usable rows: a seeded random sample of that many (before repeats are
        dropped); fewer than :data:`MIN_REFERENCE` left: no correction. Returns whether a correction
        is on. Raises ValueError for an array that is not ``(n, dim)`` with this model's ``dim``.
        """
        if reference is None:
            self.reference_term, self.reference_size = None, 0
            return False
        ref = np.asarray(reference, np.float32)
        if ref.ndim != 2 or ref.shape[1] != self.weights.shape[1]:
            raise ValueError(f"reference photos must be an (n, {self.weights.shape[1]}) array of this model's image "
                             f"embeddings, not shape {ref.shape}")
        ref = ref[np.isfinite(ref).all(axis=1) & (np.abs(ref).sum(axis=1) > 0)]
        if len(ref) > MAX_REFERENCE:  # sampled before the repeats go, which bounds np.unique's sort
            ref = ref[np.sort(np.random.default_rng(seed).choice(len(ref), MAX_REFERENCE, replace=False))]
        if len(ref) >= MIN_REFERENCE:
            _, first = np.unique(ref, axis=0, return_index=True)
            ref = ref[np.sort(first)]
        if len(ref) < MIN_REFERENCE:
            self.reference_term, self.reference_size = None, len(ref)
            return False
        k = max(1, min(k, len(ref) // 10))
        top = np.zeros((0, len(self.label_set.labels)), np.float32)  # each label's k best cosines so far
        for i in range(0, len(ref), 2048):  # blocks of photos bound the memory
            block = np.concatenate([top, self.cosines(ref[i:i + 2048])])
            keep = min(k, len(block))
            top = np.partition(block, len(block) - keep, axis=0)[len(block) - keep:]
        term = top.mean(axis=0).astype(np.float32)
        # the term first: a thread scoring meanwhile uses the old term or the new one, never a mix
        self.reference_term, self.reference_size = term, len(ref)
        return True

    def _prompt_embeddings(self) -> np.ndarray:
        """One unit vector per prompt, label by label: the normalised mean of its template text
        embeddings (prompt ensembling, Radford et al. 2021, sec. 3.1.4). Float32 ``(n_prompts, dim)``.

        A set with ``cache_on_disk`` (one read from a file) is kept on disk under ``cache_dir()/labels``
        (:func:`indexer.backends.cache_dir`), keyed by the model's weights, precision and the prompt
        texts: a server starts without re-embedding its label set (hundreds of prompts, seconds of
        text-tower time on a CPU). Other sets are not: a file per label set a client sends would
        fill the disk."""
        from .backends import cache_dir

        ls = self.label_set
        texts = [t.format(p) for lab in ls.labels for p in lab.prompts for t in ls.templates]
        n_prompts = sum(len(lab.prompts) for lab in ls.labels)
        if not ls.cache_on_disk:
            return self._embed(texts)
        key = hashlib.sha256(json.dumps([self.CACHE_VERSION, self.model.identity.weights_sha256,
                                         self.model.precision, texts]).encode())
        path = cache_dir() / "labels" / f"{key.hexdigest()[:32]}.npy"
        try:
            cached = np.load(path)
            if cached.shape == (n_prompts, self.model.dim) and cached.dtype == np.float32:
                return cached
        except (OSError, ValueError):
            pass  # not cached yet, or a damaged entry: compute it again
        weights = self._embed(texts)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.npy")
            np.save(tmp, weights)
            os.replace(tmp, path)
        except OSError as e:  # a read-only home: compute at every start instead
            log.warning("cannot cache label embeddings in %s: %s", path.parent, e)
        return weights

    def _embed(self, texts: list[str]) -> np.ndarray:
        """The normalised mean of each prompt's template embeddings (``texts`` come prompt by prompt)."""
        n = len(self.label_set.templates)
        emb = self.model.embed_texts(texts)
        means = emb.reshape(-1, n, emb.shape[1]).mean(axis=1)
        return (means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def cosines(self, image_embeddings: np.ndarray) -> np.ndarray:
        """``(n, dim)`` unit rows -> ``(n, n_labels)``: each label's best prompt cosine (``pooling: max``),
        or the cosine with the mean of its prompts' embeddings (``pooling: mean``)."""
        x = image_embeddings.astype(np.float32)
        if self.label_set.pooling == "mean":
            return x @ self._label_weights.T
        return np.maximum.reduceat(x @ self.weights.T, self.label_starts, axis=1)

    def label_scores(self, image_embeddings: np.ndarray) -> np.ndarray:
        """``(n, dim)`` unit rows -> ``(n, n_labels)``: what ranks the labels. The plain cosines
        (:meth:`cosines`) without a reference; with one (:meth:`set_reference`), each label's cosine
        minus its reference term."""
        return self._ranked(self.cosines(image_embeddings))

    def _ranked(self, cos: np.ndarray) -> np.ndarray:
        """:meth:`label_scores` from already computed :meth:`cosines`."""
        term = self.reference_term  # read once: another thread may set a new reference
        return cos if term is None else cos - term

    def scores(self, image_embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """image_embeddings: float32 ``(n, dim)`` unit rows -> (probabilities, cosines), each ``(n, n_labels)``.

        Probabilities are the softmax of ``logit_scale * score`` over the labels (:meth:`label_scores`:
        the cosine, less the reference term when there is a reference); each row sums to 1. The
        cosines are the plain ones, whatever the reference.
        """
        cos = self.cosines(image_embeddings)
        logits = self.model.logit_scale * self._ranked(cos)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        return p, cos

    def none_of_these(self, image_embeddings: np.ndarray) -> list[bool | None]:
        """Per image: True when even the best label's cosine is under the model's calibrated
        ``label_min_cosine`` (no label of the set fits: the reject option), False when one fits,
        None when the model has no calibration (:attr:`indexer.model.ClipModel.calibration`)."""
        threshold = self.model.calibration.get("label_min_cosine")
        if threshold is None:
            return [None] * len(image_embeddings)
        return [bool(b < threshold) for b in self.best_cosines(image_embeddings)]

    def best_cosines(self, image_embeddings: np.ndarray) -> np.ndarray:
        """Per image ``(n,)``: the cosine of its best label."""
        return self.cosines(image_embeddings).max(axis=1)

    def top_k(self, image_embeddings: np.ndarray, k: int = 5) -> list[list[dict]]:
        """For each image, the ``k`` most probable labels: ``{"label", "score", "cosine"}``."""
        probs, cos = self.scores(image_embeddings)
        k = min(k, probs.shape[1])
        out = []
        for p, c in zip(probs, cos):
            order = np.argsort(-p, kind="stable")[:k]
            out.append([
                {"label": self.label_set.labels[j].name, "score": round(float(p[j]), 6), "cosine": round(float(c[j]), 6)}
                for j in order
            ])
        return out
