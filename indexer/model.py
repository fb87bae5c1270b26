"""Load a CLIP model with open_clip and embed images and texts.

One entry point, :func:`load_model`, builds the model, its preprocessing and its
tokenizer from a name and a ``pretrained`` source, the way open_clip's own
``create_model_and_transforms`` does (we call it; we do not re-implement
checkpoint loading, preprocessing or tokenisation):

* ``ViT-B-32`` + ``laion2b_s34b_b79k``: an open_clip architecture and a pretrained tag
  (downloaded to, or found in, the Hugging Face cache);
* ``ViT-B-32`` + ``/path/to/weights.pt``: an architecture and a local checkpoint file;
* ``hf-hub:org/repo``: a model repository on the Hugging Face hub;
* ``/path/to/model_dir`` or ``local-dir:/path``: a folder holding ``open_clip_config.json``
  and weights (what ``lookalike finetune`` writes);
* a name bundled under ``data/models/`` (``test-tiny``, and the project's own models).

Every embedding returned is an L2-normalised float32 numpy array of shape ``(n, dim)``.

Precision (``precision=``): ``fp32``; ``bf16`` (on CPU the weights are converted to
bfloat16, which Intel AMX runs 4.7x faster than fp32 for ViT-B-32's image tower on an idle
2-core Xeon, scripts/bench_backends.py;
on CUDA, bf16 autocast); ``fp16`` (CUDA autocast only); ``int8`` (the image tower only,
OpenVINO + NNCF post-training quantisation, checked against fp32: :mod:`indexer.quantize`);
``auto`` (the default) picks fp16 autocast on CUDA, bf16 on CPUs with AMX, int8 on CPUs with
VNNI but no AMX (when NNCF is installed), bf16 with AVX512-BF16, fp32 elsewhere
(:func:`resolve_precision`).
bf16 embeddings agree with fp32 ones to a cosine of about 0.9999 (tests/test_model.py
checks >= 0.999); an index made in one precision can be queried in another.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .cache import LRUCache, bound_tokenizer_cache
from .modelspec import (  # noqa: F401  (re-exported: the model specification's names)
    BACKENDS,
    BUNDLED_MODELS_DIR,
    DEFAULT_MODEL,
    DEFAULT_PRETRAINED,
    PRECISIONS,
    ModelLoadError,
    bundled_models,
    check_hub_weights,
    local_dir,
    missing_weights_message,
    open_clip_name,
)
from .records import ModelIdentity  # noqa: F401  (re-exported: the identity of a loaded model)

TEXT_CACHE_ITEMS = 10_000
BASE_ARCHITECTURE = "glove-efficientnet-lite"  # indexer.base_model.ARCHITECTURE, without importing timm here

log = logging.getLogger(__name__)


def resolve_device(device: str | None) -> torch.device:
    """``"auto"``/None -> CUDA when available, else CPU; otherwise ``torch.device(device)``."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ModelLoadError(f"unknown device {device!r}: use auto, cpu or cuda[:N]") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but CUDA is not available on this machine")
    return dev


@functools.cache
def _cpuinfo(field: str) -> str:
    """The value of the first ``field`` line of ``/proc/cpuinfo`` (``""`` where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.split(":", 1)[0].strip() == field), "")
    except OSError:
        return ""


def _cpu_flags() -> set[str]:
    """The ``flags`` of ``/proc/cpuinfo`` (empty where there is none)."""
    return set(_cpuinfo("flags").split())


def cpu_model() -> str:
    """The CPU's ``model name`` from ``/proc/cpuinfo`` (``""`` where there is none)."""
    return _cpuinfo("model name")


def _onednn_isa_cap() -> str:
    """``ONEDNN_MAX_CPU_ISA`` (upper case), the ISA cap oneDNN (PyTorch's and OpenVINO's CPU kernels)
    honours; ``""`` when unset or ``ALL``. oneDNN docs, "CPU dispatcher control"."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).strip().upper()
    return "" if cap in ("", "ALL", "DEFAULT") else cap


def cpu_has_amx() -> bool:
    """Whether the CPU has Intel AMX-BF16 tiles and oneDNN may use them (not capped below AMX by
    ``ONEDNN_MAX_CPU_ISA``, which is how we measure the no-AMX path on an AMX machine)."""
    cap = _onednn_isa_cap()
    if cap and "AMX" not in cap:
        return False
    return _cpu_feature("_is_amx_tile_supported", "amx_bf16")


def cpu_has_vnni() -> bool:
    """Whether the CPU has int8 dot-product instructions (AVX512-VNNI or AVX-VNNI), allowed by the oneDNN cap."""
    cap = _onednn_isa_cap()
    if cap and not any(k in cap for k in ("VNNI", "BF16", "AMX", "FP16")):  # AVX2, AVX512_CORE: below VNNI
        return False
    return bool({"avx512_vnni", "avx_vnni"} & _cpu_flags())


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (Intel AMX-BF16 or AVX512-BF16).

    Read from torch's CPU feature probe, or else from the ``flags`` of ``/proc/cpuinfo``.
    """
    if cpu_has_amx():
        return True
    cap = _onednn_isa_cap()
    if cap and "BF16" not in cap and "FP16" not in cap:
        return False
    return _cpu_feature("_is_avx512_bf16_supported", "avx512_bf16")


def _cpu_feature(probe: str, flag: str) -> bool:
    """torch's CPU feature probe ``torch.cpu.<probe>()``, else ``flag`` among ``/proc/cpuinfo``'s flags."""
    fn = getattr(torch.cpu, probe, None)
    try:
        if fn is not None and fn():
            return True
    except RuntimeError:
        pass
    return flag in _cpu_flags()


def int8_available() -> bool:
    """Whether the int8 image tower can run here: OpenVINO and NNCF installed."""
    from .backends import openvino_available
    from .quantize import nncf_available

    return openvino_available() and nncf_available()


def resolve_precision(precision: str | None, device: torch.device, backend: str | None = "torch") -> str:
    """The precision to run in: ``auto``/None picks per device and CPU.

    * CUDA: fp16 (autocast).
    * CPU with AMX: bf16 (AMX tiles; ViT-B-32's tower 4.7x fp32 in torch, 3.1x in OpenVINO).
    * CPU with VNNI but no AMX, an OpenVINO back-end (``backend`` ``auto`` or ``openvino``) and NNCF
      installed: int8 (:mod:`indexer.quantize`; with oneDNN capped to AVX512-BF16/VNNI, ViT-B-32's int8
      tower ran 3.3x torch fp32, where bf16 ran 0.6x without AMX; docs/PERFORMANCE.md). Chosen this
      way, the calibration also times fp32, bf16 and int8 on its photos and keeps the fastest that
      passed the check against fp32 (remembered with the calibration), because without AMX which
      one wins depends on the CPU.
    * other CPUs with AVX512-BF16: bf16; else fp32.

    Raises ModelLoadError for an unknown name, fp16 on CPU (PyTorch's CPU fp16 kernels are slow), or
    int8 on CUDA or the torch back-end.
    """
    precision = (precision or "auto").lower()
    if precision not in PRECISIONS:
        raise ModelLoadError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
    backend = (backend or "auto").lower()
    if precision == "auto":
        if device.type == "cuda":
            return "fp16"
        if device.type != "cpu":
            return "fp32"
        if cpu_has_amx():
            return "bf16"
        if backend in ("auto", "openvino") and cpu_has_vnni() and int8_available():
            return "int8"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ModelLoadError("precision fp16 needs a CUDA device; on CPU use bf16 or fp32")
    if precision == "int8":
        if device.type != "cpu" or backend == "torch":
            raise ModelLoadError("precision int8 runs on the CPU with the openvino back-end: use --device cpu "
                                 "and --backend auto or openvino, or another precision")
        if not int8_available():
            raise ModelLoadError("precision int8 needs OpenVINO and NNCF: pip install 'lookalike[int8]'")
    return precision


def _weights_sha256(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        h.update(key.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


class ClipModel:
    """A loaded open_clip model with its preprocessing and tokenizer.

    Thread safety: forward passes run under ``torch.inference_mode`` and the model
    is never mutated after loading, so several threads may embed concurrently.
    """

    def __init__(self, model, preprocess: Callable, tokenizer, identity: ModelIdentity, device: torch.device,
                 precision: str = "fp32", image_encoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 calibration: dict | None = None):
        self.model = model
        # thresholds measured for this model's weights (a model folder's "lookalike.calibration"):
        # "min_score" (image-image cosine below which nothing is a close match) and
        # "label_min_cosine" (image-label cosine below which no label fits); {} when unknown
        self.calibration = dict(calibration or {})
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.identity = identity
        self.device = device
        self._precision = precision
        self.dim = identity.dim
        # CPU bf16 runs on converted weights (autocast on CPU was slower than fp32 in our measurements);
        # CUDA keeps fp32 weights under autocast.
        self._input_dtype = torch.bfloat16 if device.type == "cpu" and precision == "bf16" else None
        # a runtime back-end for the image tower (indexer.backends); None: the torch module itself
        self.image_encoder = image_encoder
        self.backend = ("torch" if image_encoder is None
                        else type(image_encoder).__name__.replace("ImageEncoder", "").lower())
        self._text_cache: LRUCache[str, np.ndarray] = LRUCache(TEXT_CACHE_ITEMS)

    @property
    def precision(self) -> str:
        """The image tower's precision in use: an ``int8`` tower runs ``fp32`` until it is calibrated,
        and for good when its check against fp32 fails (:mod:`indexer.quantize`)."""
        return getattr(self.image_encoder, "precision", None) or self._precision

    @property
    def needs_calibration(self) -> bool:
        """Whether the image tower is an int8 one waiting for :meth:`calibrate` (it runs fp32 meanwhile)."""
        return bool(getattr(self.image_encoder, "needs_calibration", False))

    def calibrate(self, pixels: torch.Tensor) -> str:
        """Calibrate an int8 image tower on preprocessed photos ``(n, 3, S, S)`` (see
        :meth:`indexer.backends.OpenVINOImageEncoder.calibrate`); returns the precision in use after."""
        if not self.needs_calibration:
            return self.precision
        return self.image_encoder.calibrate(pixels)

    def set_streams(self, streams: int) -> int:
        """Let concurrent image embeddings run as parallel forward passes on the CPU (the OpenVINO back-end's
        streams, :meth:`indexer.backends.OpenVINOImageEncoder.set_streams`; 0 = OpenVINO's choice, 1 = one
        pass at a time). The torch back-end and CUDA keep one pass at a time. Returns how many passes can
        run at once. Raises ValueError for ``streams`` < 0."""
        if isinstance(streams, bool) or not isinstance(streams, int) or streams < 0:
            raise ValueError(f"streams must be an int >= 0, got {streams!r}")
        set_streams = getattr(self.image_encoder, "set_streams", None)
        return set_streams(streams) if set_streams is not None else 1

    @property
    def draft_size(self) -> int:
        """Shorter side (px) to decode JPEGs at with Pillow's draft mode: twice the model's input size,
        at least 224, so decoding at 1/2, 1/4 or 1/8 scale never costs quality the model can see."""
        return max(2 * self.identity.image_size, 224)

    @property
    def photo_only_dims(self) -> slice | None:
        """The embedding dimensions that only photos use (texts are zero there), or None: lookalike-base's
        luma signature (:meth:`indexer.base_model.LookalikeBase.photo_only_dims`). A composed query
        leaves them out of its photo (:func:`indexer.compose.compose`)."""
        dims = getattr(self.model, "photo_only_dims", None)
        return dims() if callable(dims) else None

    @property
    def logit_scale(self) -> float:
        """exp of the learned temperature (CLIP paper, Radford et al. 2021, sec. 2.5); 100 for trained CLIP."""
        return float(self.model.logit_scale.detach().exp().clamp(max=100).item())

    def _autocast(self):
        if self.device.type == "cuda" and self._precision != "fp32":
            return torch.autocast("cuda", dtype=torch.float16 if self._precision == "fp16" else torch.bfloat16)
        return contextlib.nullcontext()

    def embed_image_tensors(self, pixels: torch.Tensor) -> np.ndarray:
        """Embed preprocessed images.

        pixels: float tensor ``(n, 3, H, W)`` as produced by ``self.preprocess``.
        Returns float32 ``(n, dim)``, each row of unit L2 norm.
        """
        if self.image_encoder is not None:
            return _normalise(self.image_encoder(pixels))
        with torch.inference_mode(), self._autocast():
            feats = self.model.encode_image(pixels.to(self.device, dtype=self._input_dtype, non_blocking=True))
        return _normalise(feats)

    def embed_images(self, images: Sequence, batch_size: int = 64) -> np.ndarray:
        """Embed RGB PIL images; returns float32 ``(n, dim)`` with unit-norm rows."""
        out = [np.zeros((0, self.dim), np.float32)]
        for i in range(0, len(images), batch_size):
            batch = torch.stack([self.preprocess(im) for im in images[i : i + batch_size]])
            out.append(self.embed_image_tensors(batch))
        return np.concatenate(out)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts with the model's tokenizer; float32 ``(n, dim)``, unit-norm rows.

        Results are kept in an LRU cache of ``TEXT_CACHE_ITEMS`` texts (a repeated query,
        a label prompt, costs a dictionary lookup instead of a forward pass).
        """
        known = {t: v for t in dict.fromkeys(texts) if (v := self._text_cache.get(t)) is not None}
        missing = [t for t in dict.fromkeys(texts) if t not in known]
        if missing:
            vecs = []
            for i in range(0, len(missing), 256):
                tokens = self.tokenizer(missing[i : i + 256]).to(self.device)
                with torch.inference_mode(), self._autocast():
                    vecs.append(_normalise(self.model.encode_text(tokens)))
            fresh = dict(zip(missing, np.concatenate(vecs)))
            known.update(fresh)
            for t, v in fresh.items():
                self._text_cache.put(t, v)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([known[t] for t in texts])


def _normalise(feats: torch.Tensor) -> np.ndarray:
    feats = feats.float()
    feats = feats / feats.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return feats.cpu().numpy().astype(np.float32, copy=False)


def load_model(name: str = DEFAULT_MODEL, pretrained: str | None = DEFAULT_PRETRAINED, device: str | None = "auto",
               precision: str | None = "auto", backend: str | None = "auto") -> ClipModel:
    """Build an open_clip model, its eval preprocessing and tokenizer.

    name: an open_clip architecture (``ViT-B-32``), ``hf-hub:org/repo``, a model folder,
      ``local-dir:PATH``, or a model bundled under ``data/models/`` (``test-tiny``).
    pretrained: an open_clip pretrained tag or a checkpoint file; ignored for folders and hub ids;
      None or ``"none"`` builds the architecture with random weights (for speed benchmarks).
    device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
    precision: ``auto``, ``fp32``, ``bf16``, ``fp16``, ``int8`` (see :func:`resolve_precision`); training
      needs ``fp32``. ``int8`` reads the tower calibrated earlier for these weights, else runs fp32 until
      :meth:`ClipModel.calibrate`; the text tower stays fp32.
    backend: runtime of the image tower: ``torch``, ``openvino`` (CPU only; see :mod:`indexer.backends`),
      or ``auto`` = openvino on CPU when it is installed, else torch. A model OpenVINO cannot convert
      falls back to torch under ``auto`` (logged) and raises ModelLoadError under ``openvino``.

    Raises ModelLoadError with a message that says what to do (weights missing,
    unknown name, bad file); never lets open_clip's or the hub's exception escape.
    """
    import open_clip

    dev = resolve_device(device)
    requested = (precision or "auto").lower()
    precision = resolve_precision(precision, dev, backend)
    ident, extra = open_clip_name(name)
    if ident.startswith("hf-hub:") or local_dir(ident) is not None:
        pretrained = None
    elif ident not in open_clip.list_models():
        raise ModelLoadError(
            f"unknown model {name!r}: give an open_clip architecture (e.g. ViT-B-32), a model folder, "
            f"hf-hub:ORG/REPO, or one of the bundled models: {', '.join(bundled_models())}"
        )
    _check_weights_present(ident, extra)
    if pretrained and pretrained.lower() == "none":
        pretrained = None
    seed = extra.get("random_init_seed")
    if extra.get("architecture") == BASE_ARCHITECTURE:
        model, preprocess, tokenizer = _load_base(name, local_dir(ident))
    else:
        hub = _hub_source(ident, pretrained)
        cached = check_hub_weights(name, pretrained, hub) if hub else False
        try:
            with torch.random.fork_rng(devices=[]), _quiet_open_clip(), _hub_client(offline=cached):
                if seed is not None:
                    torch.manual_seed(int(seed))
                model, _, preprocess = open_clip.create_model_and_transforms(ident, pretrained=pretrained or None)
        except Exception as e:  # open_clip and huggingface_hub raise bare RuntimeError/OSError/ValueError
            raise ModelLoadError(_load_failure_message(name, pretrained, e)) from e
        tokenizer = open_clip.get_tokenizer(ident)
        bound_tokenizer_cache(tokenizer)  # it memoises every word it meets: bounded, or clients grow it
    model.eval().to(dev)
    vision = model.visual
    image_size = vision.image_size[0] if isinstance(vision.image_size, (tuple, list)) else int(vision.image_size)
    dim = int(model.text_projection.shape[1]) if getattr(model, "text_projection", None) is not None else None
    if dim is None:
        with torch.inference_mode():
            dim = int(model.encode_text(tokenizer(["x"]).to(dev)).shape[-1])
    identity = ModelIdentity(
        name=name, pretrained=pretrained or None, weights_sha256=_weights_sha256(model), dim=dim, image_size=image_size
    )
    encoder = _image_backend(backend, model, dev, precision, identity,
                             choose_fastest=requested == "auto" and precision == "int8")
    if encoder is None and precision == "int8":  # OpenVINO could not convert this tower (logged): torch fp32
        precision = "fp32"
    if dev.type == "cpu" and precision == "bf16":
        model.to(torch.bfloat16)  # after hashing and converting: the identity is of the weights as stored
    clip = ClipModel(model, preprocess, tokenizer, identity, dev, precision, encoder, extra.get("calibration"))
    log.info("loaded model %s (%s) on %s, %s, %s back-end, dim %d", name, pretrained, dev, precision, clip.backend, dim)
    return clip


def _load_base(name: str, folder: Path):
    """(model, preprocess, tokenizer) of a ``lookalike-base``-style folder (:mod:`indexer.base_model`)."""
    from .base_model import load_base_model

    try:
        return load_base_model(folder)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        detail = str(e).splitlines()[0] if str(e) else repr(e)
        raise ModelLoadError(f"cannot load model {name!r} from {folder}: {detail}") from e


def _image_backend(backend: str | None, model, dev: torch.device, precision: str, identity: ModelIdentity,
                   choose_fastest: bool = False):
    """The image tower's runtime back-end (:mod:`indexer.backends`), or None for plain torch.
    choose_fastest: ``auto`` chose int8; the calibration then keeps the fastest of fp32, bf16 and int8."""
    from .backends import OpenVINOImageEncoder, openvino_available

    backend = (backend or "auto").lower()
    if backend not in BACKENDS:
        raise ModelLoadError(f"unknown back-end {backend!r}: use {', '.join(BACKENDS)}")
    if backend == "torch" or (backend == "auto" and (dev.type != "cpu" or not openvino_available())):
        return None
    if dev.type != "cpu":
        raise ModelLoadError("the openvino back-end runs on the CPU: use --device cpu, or --backend torch on CUDA")
    if not openvino_available():
        raise ModelLoadError("the openvino back-end needs the openvino package: pip install openvino")
    try:
        return OpenVINOImageEncoder(model.visual, identity.image_size, precision, identity.weights_sha256[:24],
                                    choose_fastest=choose_fastest)
    except Exception as e:  # TorchScript tracing or OpenVINO conversion of an unusual architecture
        if backend == "openvino":
            raise ModelLoadError(f"OpenVINO cannot run the image tower of {identity.name}: {e}") from e
        log.warning("OpenVINO cannot run the image tower of %s (%s); using torch", identity.name, e)
        return None


def _hub_source(ident: str, pretrained: str | None) -> str | None:
    """Where open_clip will fetch the weights from on the Hugging Face hub (``ORG/REPO/`` or
    ``ORG/REPO/FILE``, as its pretrained table writes it); None for local files and random weights."""
    import open_clip

    if ident.startswith("hf-hub:"):
        return ident[len("hf-hub:"):] + "/"
    if not pretrained or os.path.exists(pretrained):
        return None
    return open_clip.get_pretrained_cfg(ident, pretrained).get("hf_hub") or None


@contextlib.contextmanager
def _hub_client(offline: bool):
    """Quiet the Hugging Face hub client while open_clip fetches weights, and keep it off the network
    when the weights are cached (``offline``).

    Unquiet, a failed download prints each of its five retries twice (the client's own handler, then
    the root logger's) over about a minute; the failure reaches the user as one ModelLoadError.
    Offline, cached weights load without a request to the hub (which, unreachable, would be retried
    before the cache is used). The client reads offline mode from ``constants.HF_HUB_OFFLINE`` on each
    request (huggingface_hub.utils._http), which is set for the load and put back after it.
    """
    from huggingface_hub import constants

    hub_log = logging.getLogger("huggingface_hub")
    level, was_offline = hub_log.level, constants.HF_HUB_OFFLINE
    hub_log.setLevel(logging.ERROR)
    if offline:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_log.setLevel(level)
        constants.HF_HUB_OFFLINE = was_offline


@contextlib.contextmanager
def _quiet_open_clip():
    """Silence open_clip's root-logger messages while it builds a model.

    Its failures come back to the caller as one ModelLoadError; its 'no weights,
    initialised randomly' notices concern models that are random on purpose
    (checked before loading, see :func:`_check_weights_present`).
    """

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "open_clip" not in record.pathname

    flt = _Filter()
    root = logging.getLogger()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def _check_weights_present(ident: str, extra: dict) -> None:
    """A model folder must hold weights, unless its config declares it random on purpose."""
    folder = local_dir(ident)
    if folder is None or extra.get("random_init_seed") is not None:
        return
    if not any(next(folder.glob(pattern), None) for pattern in ("*.safetensors", "*.bin", "*.pth", "*.pt")):
        raise ModelLoadError(f"model folder {folder} has no weights file (*.safetensors, *.bin, *.pth)")


def _load_failure_message(name: str, pretrained: str | None, err: Exception) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if pretrained and not os.path.exists(pretrained) and ("download" in text.lower() or "hub" in text.lower()):
        return missing_weights_message(name, pretrained, f"the download failed ({text})")
    if name.startswith("hf-hub:"):
        return missing_weights_message(name, None, f"loading it failed ({text})")
    return f"cannot load model {name!r} (pretrained={pretrained!r}): {text}"
