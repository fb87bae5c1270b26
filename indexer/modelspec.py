"""The model specification: which model to load (name, pretrained weights) and how to run it
(precision, back-end, device), and the rule that picks the model for an existing index.

The CLI's arguments and the server's settings are both built from the option lists and help
texts here, and both load models through :class:`ModelSpec`, so the rule is written once.
Importing this module costs no torch: ``lookalike --help`` and ``lookalike info`` stay light.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import LookalikeError
from .resources import DATA_DIR

if TYPE_CHECKING:
    from .model import ClipModel
    from .records import ModelIdentity
    from .store import Store

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
#: where open_clip fetches the default weights from: its pretrained table's ``hf_hub`` entry for
#: (DEFAULT_MODEL, DEFAULT_PRETRAINED) (tests/test_first_use.py checks that the two agree). Known here so
#: that a first run without the hub fails before torch is imported, in about a second
DEFAULT_PRETRAINED_HUB = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K/"
#: the bundled model that needs no download: what the errors about missing weights offer instead
OFFLINE_MODEL = "lookalike-base"
#: seconds to wait for a TCP connection to the model hub before calling it unreachable
HUB_CONNECT_TIMEOUT_S = 1.5
BUNDLED_MODELS_DIR = DATA_DIR / "models"
LOCAL_DIR_PREFIX = "local-dir:"

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
PRECISION_HELP = ("inference precision: auto = fp16 on CUDA, bf16 on CPUs with AMX, int8 (OpenVINO + NNCF, checked "
                  "against fp32) on CPUs with VNNI but no AMX, bf16 with AVX512-BF16, else fp32")
#: training runs on the CPU, where fp16 is slow (indexer.finetune)
TRAIN_PRECISIONS = ("auto", "bf16", "fp32")
TRAIN_PRECISION_HELP = "auto: bf16 autocast on CPUs with AMX/AVX512-BF16"
BACKENDS = ("auto", "torch", "openvino")
BACKEND_HELP = "image tower runtime: auto = OpenVINO on CPU (when installed), torch on CUDA"
DEVICE_HELP = "auto (CUDA if present), cpu, cuda, cuda:N"
MODEL_HELP = (f"open_clip architecture, model folder, hf-hub:ORG/REPO or bundled name (default: the index's "
              f"model when it exists, else {DEFAULT_MODEL})")
PRETRAINED_HELP = f"open_clip pretrained tag or checkpoint file (default {DEFAULT_PRETRAINED} for {DEFAULT_MODEL})"
INDEX_MODEL_HELP = "model to load instead of the one the index records (must have the same weights)"
INDEX_PRETRAINED_HELP = "weights file or tag for the index's model (checked against the index)"
LABEL_MODEL_HELP = (f"for an index: a model to load instead of the one it records (same weights); for image files: "
                    f"the model to label with (default: the index's model; for image files {DEFAULT_MODEL})")
LABEL_PRETRAINED_HELP = (f"weights file or tag (default: the index's; for image files {DEFAULT_PRETRAINED} for "
                         f"{DEFAULT_MODEL})")
EVAL_MODEL_HELP = (f"model to evaluate: open_clip architecture, model folder, hf-hub:ORG/REPO or bundled name "
                   f"(default {DEFAULT_MODEL})")


class ModelLoadError(LookalikeError):
    """The model or its weights could not be loaded."""


def hub_offline() -> bool:
    """Whether the Hugging Face hub must not be contacted (``HF_HUB_OFFLINE=1``, or ``--offline``)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)  # read from the environment when huggingface_hub was imported


def hub_reachable(url: str | None = None, timeout: float = HUB_CONNECT_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the model hub (``HF_ENDPOINT``, or ``url``), or to the HTTPS proxy the
    environment names, opens within ``timeout`` seconds. The name lookup counts against the timeout too
    (it runs in a thread: ``getaddrinfo`` itself takes no timeout)."""
    if url is None:
        from huggingface_hub import constants

        url = constants.ENDPOINT
    parts = urllib.parse.urlsplit(urllib.request.getproxies().get(urllib.parse.urlsplit(url).scheme) or url)
    if not parts.hostname:
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    opened: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((parts.hostname, port), timeout=timeout).close()
            opened.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(opened)


def hub_weights_cached(hub: str) -> bool:
    """Whether the weights file open_clip would fetch for a pretrained table's ``hf_hub`` entry
    (``ORG/REPO/FILE``, or ``ORG/REPO/`` for open_clip's default file name) is in the Hugging Face cache,
    as safetensors or as the named file (open_clip.pretrained.download_pretrained_from_hf's order)."""
    from huggingface_hub import try_to_load_from_cache

    repo, filename = os.path.split(hub)
    if not filename or filename == "open_clip_pytorch_model.bin":
        candidates = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    elif filename.endswith((".bin", ".pth")):
        candidates = [filename[:-4] + ".safetensors", filename]
    else:
        candidates = [filename]
    return any(isinstance(try_to_load_from_cache(repo, f), str) for f in candidates)


def check_hub_weights(name: str, pretrained: str, hub: str) -> bool:
    """Before a model with hub weights is loaded: True when they are cached (load them without contacting
    the hub), False when they must be and can be downloaded. Raises ModelLoadError at once, with what to
    do instead, when they are neither cached nor downloadable (offline, or the hub does not answer within
    :data:`HUB_CONNECT_TIMEOUT_S`), instead of letting the hub client retry for a minute."""
    if hub_weights_cached(hub):
        return True
    if hub_offline():
        raise ModelLoadError(missing_weights_message(name, pretrained, "the hub is off (HF_HUB_OFFLINE=1, --offline)"))
    from huggingface_hub import constants

    if not hub_reachable(constants.ENDPOINT):
        raise ModelLoadError(missing_weights_message(name, pretrained, f"{constants.ENDPOINT} cannot be reached"))
    return False


def missing_weights_message(name: str, pretrained: str | None, why: str) -> str:
    """One line: the weights of ``name`` are neither cached nor downloadable (``why``), and what to do."""
    from huggingface_hub import constants

    offline = (f"To work offline now, use the bundled model: --model {OFFLINE_MODEL} (no download). "
               if OFFLINE_MODEL in bundled_models() else "")
    weights = f"its pretrained weights {pretrained!r}" if pretrained else "its weights"
    return (f"model {name} needs {weights}, which are not in the cache "
            f"({constants.HF_HUB_CACHE}) and cannot be downloaded: {why}. {offline}For these weights, run the "
            f"same command once on a machine with internet access and copy its cache (~/.cache/huggingface/hub) "
            f"to {constants.HF_HUB_CACHE}, or pass a downloaded weights file with --pretrained PATH.")


def local_dir(ident: str) -> Path | None:
    """The folder named by a ``local-dir:PATH`` model identifier; None for any other identifier."""
    return Path(ident[len(LOCAL_DIR_PREFIX):]) if ident.startswith(LOCAL_DIR_PREFIX) else None


def open_clip_name(name: str) -> tuple[str, dict]:
    """Map a model name to open_clip's identifier and the model folder's ``lookalike`` config keys.

    ``hf-hub:...`` and ``local-dir:...`` are kept; a bundled name (``data/models/NAME``) or an existing
    folder becomes ``local-dir:ABSOLUTE_PATH``; anything else is an open_clip architecture name,
    returned as is with ``{}``. Raises ModelLoadError for a folder without a readable
    ``open_clip_config.json``.
    """
    if name.startswith(("hf-hub:", LOCAL_DIR_PREFIX)):
        ident = name
    elif "/" not in name and (BUNDLED_MODELS_DIR / name / "open_clip_config.json").is_file():
        ident = f"{LOCAL_DIR_PREFIX}{BUNDLED_MODELS_DIR / name}"
    elif os.path.isdir(name):
        ident = f"{LOCAL_DIR_PREFIX}{os.path.abspath(name)}"
    else:
        return name, {}
    folder = local_dir(ident)
    if folder is None:
        return ident, {}
    cfg_path = folder / "open_clip_config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"model folder {folder} has no open_clip_config.json")
    try:
        return ident, json.loads(cfg_path.read_text()).get("lookalike", {})
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {cfg_path}: {e}") from e


def bundled_models() -> list[str]:
    """Names of the models shipped under ``data/models/``."""
    if not BUNDLED_MODELS_DIR.is_dir():
        return []
    return sorted(p.name for p in BUNDLED_MODELS_DIR.iterdir() if (p / "open_clip_config.json").is_file())


@dataclass(frozen=True)
class ModelSpec:
    """What the user asked for: a model (None: the index's, or :data:`DEFAULT_MODEL` for a new index),
    its weights (None: the model's default) and how to run it (see :func:`indexer.model.load_model`)."""

    name: str | None = None
    pretrained: str | None = None
    precision: str = "auto"
    backend: str = "auto"
    device: str = "auto"

    def for_new_index(self) -> tuple[str, str | None]:
        """(name, pretrained) for a model with no index to follow: :data:`DEFAULT_MODEL` unless named,
        with :data:`DEFAULT_PRETRAINED` as its weights unless others are named."""
        name = self.name or DEFAULT_MODEL
        if self.pretrained is None and name == DEFAULT_MODEL:
            return name, DEFAULT_PRETRAINED
        return name, self.pretrained

    def for_index(self, identity: ModelIdentity) -> tuple[str, str | None]:
        """(name, pretrained) to load for an index whose vectors ``identity`` made.

        The index's model and weights unless the user names another model; naming the index's own
        model keeps its weights unless ``pretrained`` names others. Whatever is loaded must have the
        index's weights: :meth:`load_for` checks, and raises ModelMismatch otherwise.
        """
        if self.name is None or self.name == identity.name:
            return identity.name, self.pretrained or identity.pretrained
        return self.name, self.pretrained

    def load(self, identity: ModelIdentity | None = None) -> ClipModel:
        """Load the model for an index with ``identity`` (:meth:`for_index`), or with none
        (:meth:`for_new_index`). Raises ModelLoadError. Imports torch."""
        name, pretrained = self.for_new_index() if identity is None else self.for_index(identity)
        if (name, pretrained) == (DEFAULT_MODEL, DEFAULT_PRETRAINED):
            check_hub_weights(name, pretrained, DEFAULT_PRETRAINED_HUB)  # fails in a second, before torch loads
        from .model import load_model

        return load_model(name, pretrained, self.device, self.precision, self.backend)

    def load_for(self, store: Store) -> ClipModel:
        """:meth:`load` for ``store``'s index, then check that the weights are the ones its vectors were
        made with. Raises ModelLoadError, or ModelMismatch (a clear message naming both models)."""
        from .store import check_model

        model = self.load(store.identity)
        check_model(store, model.identity)
        return model
