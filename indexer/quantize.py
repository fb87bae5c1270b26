"""int8 post-training quantisation of the image tower for OpenVINO, with NNCF, checked against fp32.

``--precision int8`` (and ``auto`` on CPUs with VNNI but no AMX, see
:func:`indexer.model.resolve_precision`) runs the image tower as an int8 OpenVINO model.
The quantisation is NNCF's post-training recipe (``nncf.quantize``: min-max statistics of
the activations on calibration photos, fast bias correction, and SmoothQuant for
transformers; NNCF docs, "Post-training Quantization"); its calibration photos are the first
:data:`CALIBRATION_PHOTOS` photos of the catalogue being indexed (``indexer.pipeline`` decodes
them before embedding anything) or, in the server, of the index being served, so every vector of a
run comes from one tower.

Quantising changes the embeddings, so every quantised model is checked against the float
model on its own calibration photos before it is used: the mean cosine between the two
embeddings of each photo must reach :data:`MIN_MEAN_COSINE` and the lowest
:data:`MIN_COSINE`; otherwise the model is rejected, a warning is logged, and the tower runs
in fp32. Either outcome is cached next to the OpenVINO model (``indexer.backends``), so the
calibration (10-30 s for ViT-B-32 on 2 cores) happens once per model and machine.

Measured on a 2-core Xeon (docs/PERFORMANCE.md, "Per CPU kind"; ``scripts/bench_backends.py``):
with oneDNN capped to AVX512-BF16/VNNI (``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16``, no AMX),
ViT-B-32's int8 tower ran 91.0 images/s against 27.7 for torch fp32 and 17.0 for OpenVINO bf16,
lowest cosine 0.99983 to fp32 (random weights); with AMX, 195.7 against 143.9 for bf16.
lookalike-base's int8 tower reached a mean cosine of only 0.977 and is rejected by the check.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import logging

import numpy as np

log = logging.getLogger(__name__)

#: photos the int8 model is calibrated on; NNCF's default subset is 300, 64 keeps the one-off
#: calibration short and was enough for ViT-B-32 (mean cosine 0.9998 to fp32)
CALIBRATION_PHOTOS = 64
#: with fewer photos than this (a tiny catalogue) the tower stays fp32 and is calibrated another time
MIN_CALIBRATION_PHOTOS = 16
#: a quantised tower is used only if, on its calibration photos, its embeddings' mean cosine to the
#: float tower's reaches this (the issue's agreement bar for fast paths: 0.995)...
MIN_MEAN_COSINE = 0.995
#: ... and the lowest cosine reaches this (one photo's embedding must not move far)
MIN_COSINE = 0.98


def nncf_available() -> bool:
    """Whether NNCF (``pip install 'lookalike[int8]'``) is installed."""
    return importlib.util.find_spec("nncf") is not None


def quantize(model, samples: np.ndarray, transformer: bool):
    """An int8 copy of an OpenVINO model, by NNCF post-training quantisation.

    model: an ``openvino.Model`` taking float pixels ``(n, 3, S, S)``.
    samples: float32 ``(m, 3, S, S)`` calibration pixels, preprocessed like the model's input.
    transformer: use NNCF's transformer recipe (SmoothQuant; ``nncf.ModelType.TRANSFORMER``), for ViTs.
    Raises ImportError when NNCF is missing.
    """
    # importing NNCF imports torch.utils.cpp_extension, which warns on machines without CUDA
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import nncf

    nncf.set_log_level(logging.ERROR)
    batches = [samples[i:i + 1] for i in range(len(samples))]
    kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
    # NNCF draws progress bars on stdout whatever its log level; they would break through ours
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches), **kwargs)


def agreement(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """(mean, min) cosine between matching rows of two ``(n, dim)`` feature arrays."""
    a = reference / np.maximum(np.linalg.norm(reference, axis=1, keepdims=True), 1e-12)
    b = candidate / np.maximum(np.linalg.norm(candidate, axis=1, keepdims=True), 1e-12)
    cos = (a * b).sum(axis=1)
    return float(cos.mean()), float(cos.min())


def acceptable(mean_cos: float, min_cos: float) -> bool:
    """Whether a quantised tower agrees well enough with the float one (:data:`MIN_MEAN_COSINE`, :data:`MIN_COSINE`)."""
    return mean_cos >= MIN_MEAN_COSINE and min_cos >= MIN_COSINE
