"""Zero-shot labels: label sets, prompt templates and scoring.

A label set is a YAML or JSON file::

    templates: ["a photo of a {}.", ...]     # optional; DEFAULT_TEMPLATES otherwise
    labels:
      - name: hoodie
        prompts: [hoodie, hooded sweatshirt]  # optional; [name] otherwise
      - dress                                 # a bare name is fine too

Each label's embedding is the mean of the text embeddings of every prompt put
through every template, re-normalised (the prompt ensemble of Radford et al. 2021,
"Learning Transferable Visual Models From Natural Language Supervision", sec. 3.1.4).
Probabilities are the softmax over the label set of ``logit_scale * cosine``, with
the model's own learned logit scale.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .backends import cache_dir
from .errors import LookalikeError
from .model import ClipModel
from .resources import DATA_DIR

log = logging.getLogger(__name__)

DEFAULT_LABELS_FILE = DATA_DIR / "labels" / "retail.yaml"
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a product photo of a {}.",
    "a close-up photo of a {}.",
    "a photo of the {}.",
)
MAX_LABELS = 1000
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
    # whether ZeroShotClassifier keeps this set's embeddings on disk: only label-set files (the
    # server's configured set, the CLI's --labels), never sets that come with a request
    cache_on_disk: bool = field(default=False, compare=False)

    @property
    def names(self) -> list[str]:
        return [lab.name for lab in self.labels]

    def to_dict(self) -> dict:
        """The structure :meth:`from_dict` reads (an index records the set it was labelled with)."""
        return {"labels": [{"name": lab.name, "prompts": list(lab.prompts)} for lab in self.labels],
                "templates": list(self.templates)}

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
        return cls(tuple(labels), tuple(templates), cache_on_disk)

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
    """Scores image embeddings against a label set's averaged prompt embeddings."""

    def __init__(self, model: ClipModel, label_set: LabelSet):
        self.model = model
        self.label_set = label_set
        self.weights = self._label_embeddings()  # (n_labels, dim)

    def _label_embeddings(self) -> np.ndarray:
        """One unit vector per label: the normalised mean of its prompt x template text embeddings
        (prompt ensembling, Radford et al. 2021, sec. 3.1.4). Float32 ``(n_labels, dim)``.

        A set with ``cache_on_disk`` (one read from a file) is kept on disk under ``cache_dir()/labels``
        (:func:`indexer.backends.cache_dir`), keyed by the model's weights, precision and the prompt
        texts: a server starts without re-embedding its label set (hundreds of prompts, seconds of
        text-tower time on a CPU). Other sets are not: a file per label set a client sends would
        fill the disk."""
        ls = self.label_set
        texts = [t.format(p) for lab in ls.labels for p in lab.prompts for t in ls.templates]
        if not ls.cache_on_disk:
            return self._embed(texts)
        key = hashlib.sha256(json.dumps([self.model.identity.weights_sha256, self.model.precision, texts]).encode())
        path = cache_dir() / "labels" / f"{key.hexdigest()[:32]}.npy"
        try:
            cached = np.load(path)
            if cached.shape == (len(ls.labels), self.model.dim) and cached.dtype == np.float32:
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
        """The normalised mean of each label's ``texts`` embeddings (they come label by label)."""
        ls = self.label_set
        emb = self.model.embed_texts(texts)
        out, i = [], 0
        for lab in ls.labels:
            n = len(lab.prompts) * len(ls.templates)
            mean = emb[i : i + n].mean(axis=0)
            out.append(mean / max(np.linalg.norm(mean), 1e-12))
            i += n
        return np.stack(out).astype(np.float32)

    def scores(self, image_embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """image_embeddings: float32 ``(n, dim)`` unit rows -> (probabilities, cosines), each ``(n, n_labels)``.

        Probabilities are the softmax of ``logit_scale * cosine`` over the labels; each row sums to 1.
        """
        cos = image_embeddings.astype(np.float32) @ self.weights.T
        logits = self.model.logit_scale * cos
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
        return (image_embeddings.astype(np.float32) @ self.weights.T).max(axis=1)

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
