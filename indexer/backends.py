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
read it instead of converting again. ``int8`` quantises the converted tower with NNCF on
photos it is given (:meth:`OpenVINOImageEncoder.calibrate`) and keeps it only if it agrees with
fp32 (:mod:`indexer.quantize`); the int8 model and the check's verdict are cached beside the
float one.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
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

    precision: ``fp32``, ``bf16`` (OpenVINO's ``INFERENCE_PRECISION_HINT``) or ``int8``. An int8
    tower is read from the cache when one was calibrated for these weights; otherwise it runs fp32
    until :meth:`calibrate` is called with photos (the indexing pipeline and the server call it before
    they embed anything, so one run never mixes precisions), and for good if the check against fp32
    fails. ``self.precision`` is the precision in use.
    """

    def __init__(self, visual: torch.nn.Module, image_size: int, precision: str, cache_key: str,
                 choose_fastest: bool = False):
        import openvino as ov

        self._core = core = ov.Core()
        self._image_size = image_size
        path = cache_dir() / "openvino" / f"{cache_key}-{image_size}.xml"
        model = _read(core, path)
        if model is None:
            model = _convert(visual, image_size)
            _save(ov, model, path)
        self._float_model = model
        self._int8_path = path.with_name(f"{cache_key}-{image_size}-int8.xml")
        self._verdict_path = path.with_name(f"{cache_key}-{image_size}-int8.json")
        # ViTs get NNCF's transformer recipe (SmoothQuant); convolutional towers the default one
        self._transformer = any("attention" in type(m).__name__.lower() for m in visual.modules())
        self._lock = threading.Lock()
        self._pending = False
        # precision "auto" chose int8: calibration also times fp32, bf16 and int8 on its photos and keeps
        # the fastest that passed the check (on CPUs without AMX, which of them wins differs by CPU)
        self._choose_fastest = choose_fastest
        # Idle infer requests, each with the compiled model it belongs to, owned by this object and
        # set before the compiled model, so they are released before it (not in thread-local
        # storage, which could outlive the compiled model and free its requests from whichever
        # thread happens to run the garbage collector).
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        # Concurrent forward passes (set_streams): a second compiled model with several CPU streams, used
        # while more than one call is in flight; a lone call keeps the one-stream model and every core.
        self._streams = 1
        self.parallel = None
        self._idle_parallel: queue.SimpleQueue = queue.SimpleQueue()
        self._in_flight = 0
        self._count_lock = threading.Lock()
        self.precision = precision
        if precision != "int8":
            self._use(model, "bf16" if precision == "bf16" else "f32")
            return
        int8 = _read(core, self._int8_path)
        verdict = _read_verdict(self._verdict_path)
        # which precision is fastest was measured on one CPU: a cache shared with another CPU re-decides
        same_cpu = verdict.get("cpu") == _cpu_model()
        chosen = verdict.get("fastest", "int8") if choose_fastest and same_cpu else "int8"
        if int8 is not None and verdict.get("accepted") and chosen == "int8":
            self._use(int8, _int8_hint())
            return
        if "accepted" in verdict and choose_fastest and same_cpu and chosen in ("bf16", "fp32"):
            self.precision = chosen
            self._use(model, "bf16" if chosen == "bf16" else "f32")
            return
        self.precision = "fp32"
        self._use(model, "f32")
        if verdict.get("accepted") is False:
            log.info("int8 image tower rejected earlier for this model (%s); running fp32", verdict.get("reason"))
        else:
            self._pending = True  # until calibrate() is called

    def _compile(self, model, hint: str, streams: int = 1):
        """``model`` compiled for the CPU: one stream on every core (``PERFORMANCE_HINT`` LATENCY), or with
        ``streams`` > 1 (0: OpenVINO's own choice, ``PERFORMANCE_HINT`` THROUGHPUT) that many streams, each
        running its own infer requests on its share of the cores (OpenVINO docs, "CPU device: multi-stream
        execution")."""
        config = {"INFERENCE_PRECISION_HINT": hint}
        if streams == 1:
            config["PERFORMANCE_HINT"] = "LATENCY"
        else:
            config["PERFORMANCE_HINT"] = "THROUGHPUT"
            if streams > 1:
                config["NUM_STREAMS"] = str(streams)
        return self._core.compile_model(model, "CPU", config)

    def _use(self, model, hint: str, compiled=None) -> None:
        """Run ``model`` (already ``compiled`` with one stream, or compiled here) from now on, and its
        multi-stream twin when :meth:`set_streams` asked for one."""
        self.parallel = None  # until the twin of the new model is ready, concurrent calls share the one below
        if compiled is None:
            compiled = self._compile(model, hint)
            self._warm_up(compiled, self._idle)
        self.compiled = compiled
        self._source = (model, hint)
        if self._streams != 1:
            parallel = self._compile(model, hint, self._streams)
            self._warm_up(parallel, self._idle_parallel)
            self.parallel = parallel

    def _warm_up(self, compiled, idle: queue.SimpleQueue) -> None:
        """One inference on a newly compiled model, from this thread, before any caller can reach it; its
        request then waits in ``idle`` for the first call.

        OpenVINO's Python bindings build function-local statics that hold Python objects the first time
        they are used (the numpy dtype of an element type, ``Type.to_dtype``, in every ``infer``). Two
        threads making a process's first inferences at once can deadlock there: one holds the GIL and
        waits for the static's initialisation guard, the other holds the guard and waits for the GIL
        (pybind11's documented hazard, which ``gil_safe_call_once_and_store`` exists for). A server's first
        image search and first product add did that, and every request of the process stalled for good
        (6 of 26 processes on our 2-core Xeon when 4 threads made their first calls together; none of
        26 after one inference first). The inference also takes the compiled model's first-call cost out
        of the first query."""
        request = compiled.create_infer_request()
        _infer(request, np.zeros((1, 3, self._image_size, self._image_size), np.float32))
        idle.put((compiled, request))

    def set_streams(self, streams: int) -> int:
        """Let concurrent calls run as parallel forward passes: ``streams`` CPU streams (0: as many as
        OpenVINO's THROUGHPUT hint picks for this model and CPU; 1: one pass at a time on every core, the
        default). While a single call is in flight it still runs on the one-stream model and all the
        cores; from the second concurrent call on, calls go to the multi-stream model, one stream each.
        On our 2-core EPYC, 16 threads decoding and embedding uploads with ViT-B-32's int8 tower ran
        87 queries/s with 2 streams against 62 with one (docs/PERFORMANCE.md).

        Returns the number of forward passes that can run at once (OpenVINO's
        ``OPTIMAL_NUMBER_OF_INFER_REQUESTS``; 1 when ``streams`` is 1). Raises ValueError for ``streams`` < 0.
        """
        if isinstance(streams, bool) or not isinstance(streams, int) or streams < 0:
            raise ValueError(f"streams must be an int >= 0, got {streams!r}")
        with self._lock:
            self._streams = streams
            self._use(*self._source, compiled=self.compiled)
            return self.parallel_passes

    @property
    def parallel_passes(self) -> int:
        """How many forward passes can usefully run at once (1 without :meth:`set_streams`)."""
        parallel = self.parallel
        if parallel is None:
            return 1
        return max(1, int(parallel.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))

    @property
    def needs_calibration(self) -> bool:
        """Whether this is an int8 tower waiting for :meth:`calibrate` (running fp32 meanwhile)."""
        return self._pending

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(pixels.detach().to("cpu", torch.float32).numpy())
        with self._count_lock:
            self._in_flight += 1
            # another call in flight, or a micro-batch of several queries: the server is under load
            concurrent = self._in_flight > 1 or len(x) > 1
        parallel = self.parallel
        compiled, idle = (parallel, self._idle_parallel) if concurrent and parallel is not None else (
            self.compiled, self._idle)
        try:
            try:
                owner, request = idle.get_nowait()
                if owner is not compiled:  # made for the float model before int8 took over
                    request = compiled.create_infer_request()
            except queue.Empty:
                request = compiled.create_infer_request()
            try:
                return torch.from_numpy(_infer(request, x))
            finally:
                idle.put((compiled, request))
        finally:
            with self._count_lock:
                self._in_flight -= 1

    def calibrate(self, pixels: torch.Tensor) -> str:
        """Quantise the tower on these photos, check it against fp32 on them, and switch to it (or reject it).

        pixels: float ``(n, 3, S, S)``, preprocessed photos; the first
        :data:`~indexer.quantize.CALIBRATION_PHOTOS` are used, and fewer than
        :data:`~indexer.quantize.MIN_CALIBRATION_PHOTOS` leave the tower in fp32 for now. Does nothing
        unless :attr:`needs_calibration`. Returns the precision in use afterwards.
        """
        from . import quantize as q

        with self._lock:
            if not self._pending or len(pixels) < q.MIN_CALIBRATION_PHOTOS:
                return self.precision
            samples = np.ascontiguousarray(pixels[: q.CALIBRATION_PHOTOS].detach().to("cpu", torch.float32).numpy())
            self._pending = False
            log.info("calibrating the int8 image tower on %d photos (once per model on this machine)", len(samples))
            try:
                int8 = q.quantize(self._float_model, samples, self._transformer)
                int8_hint = _int8_hint()
                compiled = self._compile(int8, int8_hint)
                mean_cos, min_cos = q.agreement(self.compiled(samples)[0], compiled(samples)[0])
            except Exception as e:  # NNCF missing or unable to quantise this graph: stay in fp32
                log.warning("int8 quantisation failed (%s); the image tower runs in fp32", e)
                if not isinstance(e, ImportError):  # a missing NNCF can be installed: try again next start
                    _write_verdict(self._verdict_path, {"accepted": False, "reason": f"quantisation failed: {e}"})
                return self.precision
            verdict = {"accepted": q.acceptable(mean_cos, min_cos), "mean_cosine": round(mean_cos, 5),
                       "min_cosine": round(min_cos, 5), "photos": len(samples), "cpu": _cpu_model()}
            # name -> (one-stream compiled model, model, precision hint)
            candidates = {"fp32": (self.compiled, self._float_model, "f32")}
            if verdict["accepted"]:
                candidates["int8"] = (compiled, int8, int8_hint)
            if self._choose_fastest:
                from .model import cpu_has_fast_bf16

                if cpu_has_fast_bf16():
                    candidates["bf16"] = (self._compile(self._float_model, "bf16"), self._float_model, "bf16")
                timed = samples[:32]
                speeds = {name: _images_per_s(c[0], timed) for name, c in candidates.items()}
                verdict["images_per_s"] = {k: round(v, 1) for k, v in speeds.items()}
                verdict["fastest"] = max(speeds, key=speeds.get)
                log.info("image tower images/s on %d photos: %s", len(timed), verdict["images_per_s"])
            if not verdict["accepted"]:
                verdict["reason"] = (f"mean cosine {mean_cos:.4f} / lowest {min_cos:.4f} to fp32, needs "
                                     f">= {q.MIN_MEAN_COSINE} / {q.MIN_COSINE}")
                log.warning("int8 image tower rejected: %s; running %s", verdict["reason"],
                            verdict.get("fastest", "fp32"))
                _write_verdict(self._verdict_path, verdict)
                self.precision = verdict.get("fastest", "fp32")
                compiled, model, hint = candidates[self.precision]
                self._use(model, hint, compiled)
                return self.precision
            import openvino as ov

            _save(ov, int8, self._int8_path)
            _write_verdict(self._verdict_path, verdict)
            self.precision = verdict.get("fastest", "int8")
            compiled, model, hint = candidates[self.precision]
            self._use(model, hint, compiled)
            log.info("int8 image tower passed (mean cosine %.4f, lowest %.4f to fp32); running %s",
                     mean_cos, min_cos, self.precision)
            return self.precision


def _infer(request, x: np.ndarray) -> np.ndarray:
    """One forward pass of an OpenVINO infer request on ``x`` (float32 ``(n, 3, S, S)``, read in place):
    its embeddings, float32 ``(n, dim)``, copied out of the request's output buffer (reused by its next
    call). Every call and the warm-up go through here, so the warm-up touches what callers will."""
    return np.array(request.infer({0: x}, share_inputs=True)[0], dtype=np.float32, copy=True)


def _images_per_s(compiled, samples: np.ndarray, runs: int = 1) -> float:
    """Best of ``runs`` timed passes of ``compiled`` over ``samples`` (after one warm-up), images/s. One pass
    of 32 photos is enough to rank the candidates (2.5x apart or more in our runs) and keeps the one-off
    cost of calibrating low."""
    import time

    compiled(samples)
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        compiled(samples)
        best = min(best, time.perf_counter() - t0)
    return len(samples) / best


def _cpu_model() -> str:
    """The CPU (``model name``) and the oneDNN ISA cap: what decides which precision is fastest."""
    from .model import cpu_model

    return f"{cpu_model()}; ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '')}"


def _int8_hint() -> str:
    """Precision of the layers an int8 model leaves in float: bf16 where AMX runs it, else f32
    (without AMX, OpenVINO's bf16 was slower than f32 in our runs; docs/PERFORMANCE.md)."""
    from .model import cpu_has_amx

    return "bf16" if cpu_has_amx() else "f32"


def _read(core, path: Path):
    if not path.is_file():
        return None
    try:
        return core.read_model(str(path))
    except RuntimeError as e:  # a damaged cache entry: convert again
        log.warning("ignoring the OpenVINO cache %s: %s", path, e)
        return None


def _read_verdict(path: Path) -> dict:
    try:
        verdict = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return verdict if isinstance(verdict, dict) else {}


def _write_verdict(path: Path, verdict: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(verdict))
        os.replace(tmp, path)
    except OSError as e:
        log.warning("cannot cache the int8 verdict in %s: %s", path.parent, e)


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
