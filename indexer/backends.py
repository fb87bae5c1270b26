"""Runtime back-ends for the image tower: the model code stays in open_clip, this module only runs it.

``torch`` runs the open_clip module as loaded (fp32, bf16 weights on CPU, autocast on CUDA).
``openvino`` converts the image tower once to an OpenVINO model (traced with TorchScript,
``openvino.convert_model``) and runs it with OpenVINO's CPU plugin, which fuses the ViT's
layer norms, GELUs and attention and runs matrix products on AMX in bf16 where the CPU has
it (``INFERENCE_PRECISION_HINT``; OpenVINO docs, "CPU device: precision control"). For
ViT-B-32 on this project's 2-core Xeon its bf16 image tower ran 3.1x faster than PyTorch fp32
on an idle machine (PyTorch bf16: 4.7x), level with PyTorch bf16 in the indexing pipeline,
and well ahead of it whenever other work shared the cores; embeddings agree with fp32 to a
cosine of 0.9999 (docs/PERFORMANCE.md; scripts/bench_backends.py, bench_index.py --levers).

The converted model is cached as OpenVINO IR under ``$LOOKALIKE_CACHE_DIR`` (default
``~/.cache/lookalike``), keyed by the weights' SHA-256 and input size, so later starts
read it instead of converting again.
"""
from __future__ import annotations

import logging
import os
import queue
import warnings
from pathlib import Path

import numpy as np
import torch

from .modelspec import BACKENDS  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """``$LOOKALIKE_CACHE_DIR``, else ``$XDG_CACHE_HOME/lookalike``, else ``~/.cache/lookalike``."""
    env = os.environ.get("LOOKALIKE_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lookalike"


def openvino_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


class OpenVINOImageEncoder:
    """An open_clip image tower compiled by OpenVINO for the CPU.

    Call it with float pixels ``(n, 3, S, S)`` (``S`` = the model's input size); it returns the
    unnormalised image features, float32 ``(n, dim)``, like ``model.encode_image``. Thread-safe:
    each call takes an idle infer request or makes one (OpenVINO's compiled model is shared, a
    request is not), and inference releases the GIL.
    """

    def __init__(self, visual: torch.nn.Module, image_size: int, precision: str, cache_key: str):
        import openvino as ov

        core = ov.Core()
        path = cache_dir() / "openvino" / f"{cache_key}-{image_size}.xml"
        model = None
        if path.is_file():
            try:
                model = core.read_model(str(path))
            except RuntimeError as e:  # a damaged cache entry: convert again
                log.warning("ignoring the OpenVINO cache %s: %s", path, e)
        if model is None:
            model = _convert(visual, image_size)
            _save(ov, model, path)
        hint = "bf16" if precision == "bf16" else "f32"
        # Idle infer requests, owned by this object and set before the compiled model, so they are
        # released before it (not in thread-local storage, which could outlive the compiled model
        # and free its requests from whichever thread happens to run the garbage collector).
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        self.compiled = core.compile_model(model, "CPU",
                                           {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"})

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        try:
            request = self._idle.get_nowait()
        except queue.Empty:
            request = self.compiled.create_infer_request()
        try:
            out = request.infer({0: np.ascontiguousarray(pixels.detach().to("cpu", torch.float32).numpy())})[0]
            return torch.from_numpy(np.array(out, dtype=np.float32, copy=True))
        finally:
            self._idle.put(request)


def _convert(visual: torch.nn.Module, image_size: int):
    import openvino as ov

    example = torch.zeros(2, 3, image_size, image_size)
    # TorchScript tracing is what OpenVINO's PyTorch frontend takes most reliably; torch 2.14 marks it
    # deprecated and warns about shape-dependent Python branches, which a fixed input size makes moot.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(visual, example, check_trace=False)
    return ov.convert_model(traced, input=[(-1, 3, image_size, image_size)])


def _save(ov, model, path: Path) -> None:
    """Write the IR (xml + bin) next to its final name, then rename: a crash never leaves half a cache entry."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.xml")
        ov.save_model(model, str(tmp), compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(tmp, path)
    except OSError as e:  # a read-only home: convert on every start instead
        log.warning("cannot cache the OpenVINO model in %s: %s", path.parent, e)
