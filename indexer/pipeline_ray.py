"""Bulk indexing on a Ray cluster (``lookalike index --engine ray``): the photos are read, decoded,
preprocessed and embedded by a pool of Ray actors, each holding the model once; this process (the
driver) plans the run and commits, exactly as the local engine does (:class:`indexer.pipeline._Run`).

The pattern is Ray Data's batch inference: a dataset of photo sources, streamed through
``map_batches`` with a pool of model-holding actors (https://docs.ray.io/en/latest/data/batch_inference.html).

* Each actor loads the model with the run's :class:`indexer.modelspec.ModelSpec` (the index's model,
  the user's precision, back-end and device rules, resolved on the actor's own machine: fp16 on its
  GPU, bf16 on an AMX CPU, OpenVINO on CPU) and refuses to start when its weights are not the ones
  the driver identified (:meth:`indexer.records.ModelIdentity.same_weights`).
* Actors read the photo bytes themselves, with the local engine's reader
  (:class:`indexer.pipeline.PhotoReader`): file paths (a file system every node sees), URLs
  (:mod:`indexer.fetch`) and tar members. Only the sources go out and only vectors, hashes and
  failure reasons come back through the driver.
* Change detection, commits, resume and the report are the local engine's: the driver skips photos
  whose size and mtime are stored, actors skip decoding photos whose SHA-256 is stored, and the driver
  commits every ``commit_every`` photos in one store transaction. A killed driver loses at most the
  photos since its last commit; the next run skips everything committed.
* Faults: Ray Data restarts a dead actor and runs its batch again (``max_restarts=-1``,
  ``max_task_retries=-1`` for actor pools); the driver takes each photo once (a repeated result is
  dropped), and a photo whose result never came is reported as failed, never lost silently.

The report's ``workers`` lists each worker process (Ray node id, host name, pid) with the batches
and photos it did: that is how a run shows which nodes worked.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import socket
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .catalogue import Catalogue
from .errors import LookalikeError
from .images import DEFAULT_MAX_PIXELS
from .modelspec import ModelSpec
from .pipeline import DEFAULT_MAX_FILE_BYTES, IndexReport, PhotoReader, _Item, _Run, progress_bar
from .records import ModelIdentity
from .store import Store

#: Object store of a Ray instance started for one run (``--ray-address local``): only photo sources and
#: vectors pass through it (64 photos' vectors are 128 KiB at dim 512), never pixels.
LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2
#: Seconds to wait for a TCP connection to the cluster's address before giving up.
CONNECT_TIMEOUT_S = 10.0
#: Batches per dataset block: a block is what a retried task redoes after a worker dies.
BATCHES_PER_BLOCK = 4
_STATUS = ("embedded", "unchanged", "failed")


def import_ray():
    """The ``ray`` module, or a LookalikeError that says how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data ships with the "data" extra)
    except ImportError as e:
        raise LookalikeError(f"--engine ray needs Ray with Ray Data ({e}): pip install 'lookalike[ray]'") from None
    return ray


class ray_session:
    """Connect to (or start) Ray for one run; a context manager that disconnects, and stops a Ray it
    started, on exit.

    address: Ray's conventions: ``local`` starts a Ray instance on this machine for this run (its
    ``num_cpus`` CPUs, default all, a small object store, no dashboard, a temporary folder removed
    afterwards); ``auto`` joins the cluster this machine is part of; ``HOST:PORT`` a cluster's head
    (GCS address); ``ray://HOST:10001`` through Ray Client. None: ``$RAY_ADDRESS`` if set, else ``local``.
    Raises LookalikeError when the cluster cannot be reached.
    """

    def __init__(self, address: str | None = None, num_cpus: int | None = None):
        self.address = address or os.environ.get("RAY_ADDRESS") or "local"
        self.num_cpus = num_cpus
        self._temp_dir: str | None = None

    def check(self) -> None:
        """Fail fast, before the model loads: Ray is installed, and something listens at the address."""
        import_ray()
        if self.address not in ("local", "auto"):
            _probe(self.address)

    def __enter__(self):
        self.check()
        import ray
        kwargs: dict = {"log_to_driver": False, "logging_level": logging.WARNING}
        if self.address == "local":
            # short: Ray's unix socket paths must stay under 107 characters
            self._temp_dir = tempfile.mkdtemp(prefix="lkray-", dir="/tmp" if os.path.isdir("/tmp") else None)
            kwargs.update(num_cpus=self.num_cpus or os.cpu_count() or 1, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                          include_dashboard=False, _temp_dir=self._temp_dir)
        try:
            ray.init(address=self.address, **kwargs)
        except Exception as e:  # ConnectionError, ValueError, RuntimeError: all mean "no cluster there"
            self._cleanup()
            if _auth_refused(e):
                raise LookalikeError(f"cannot connect to Ray at {self.address!r}: the cluster refused this process's "
                                     "authentication token (Ray's token authentication). Give every node and this "
                                     "command the same RAY_AUTH_MODE: token (with the cluster's token in "
                                     "~/.ray/auth_token or RAY_AUTH_TOKEN) or, on a trusted network only, "
                                     "disabled") from None
            raise LookalikeError(f"cannot connect to Ray at {self.address!r} ({type(e).__name__}: {e}); give "
                                 "--ray-address HOST:PORT of a running head node (ray start --head), "
                                 "ray://HOST:10001, auto, or local") from None
        return ray

    def __exit__(self, *exc) -> None:
        import ray

        ray.shutdown()
        self._cleanup()

    def _cleanup(self) -> None:
        if self._temp_dir:
            shutil.rmtree(self._temp_dir, ignore_errors=True)


#: Words of Ray's refusal when a client's token does not match the cluster's (``ray.exceptions.AuthenticationError``,
#: ``InvalidAuthToken``); ``ray.init`` wraps it in a ConnectionError whose cause's text holds it.
_AUTH_REFUSALS = ("InvalidAuthToken", "AuthenticationError", "Authentication token is missing")


def _auth_refused(error: BaseException) -> bool:
    """Whether ``error`` (``ray.init``'s, with its chain of causes) is Ray refusing this process's
    authentication token, rather than no cluster at the address."""
    seen = 0
    while error is not None and seen < 10:
        if any(word in f"{type(error).__name__}: {error}" for word in _AUTH_REFUSALS):
            return True
        error = error.__cause__ or error.__context__
        seen += 1
    return False


def _probe(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast when nothing accepts a TCP connection at ``address`` (``HOST:PORT`` or ``ray://HOST:PORT``):
    ``ray.init`` would wait for minutes. Raises LookalikeError."""
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise LookalikeError(f"--ray-address {address!r}: give HOST:PORT, ray://HOST:PORT, auto or local")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise LookalikeError(f"cannot connect to Ray at {address!r} ({e}): is a head node running there "
                             "(ray start --head --port PORT)?") from None


class EmbedWorker:
    """A Ray Data ``map_batches`` actor: loads the model once, then reads, decodes and embeds batches.

    Input batch (numpy format): ``task`` int64 ``(n,)``, ``source`` and ``known_sha256`` (``""`` when
    none) str ``(n,)``. Output: ``task``; ``status`` (``embedded``, ``unchanged``, ``failed``),
    ``sha256``, ``reason``, ``message`` str; ``width``, ``height`` int64 (-1 unknown); ``vector``
    float32 ``(n, dim)`` (zeros where not embedded); ``node_id``, ``host`` str and ``pid`` int64 of
    this worker. Photos are read by ``threads`` threads (decoding releases the GIL).
    Raises ModelMismatch when the loaded weights are not ``identity``'s.
    """

    def __init__(self, spec: ModelSpec, identity: ModelIdentity, max_pixels: int, max_file_bytes: int,
                 allow_private_urls: bool, threads: int):
        import ray

        from .records import ModelMismatch

        self.model = spec.load(identity)
        got = self.model.identity
        if not identity.same_weights(got):
            raise ModelMismatch(f"the Ray worker on {socket.gethostname()} loaded {got.name} with weights "
                                f"{got.weights_sha256[:12]}, not the run's {identity.name} weights "
                                f"{identity.weights_sha256[:12]}: give every node the same model files")
        reader_args = (self.model.preprocess, max_pixels, max_file_bytes, self.model.draft_size, allow_private_urls)
        self._local = threading.local()  # one reader per thread: its open tar shards are not thread-safe
        self._reader = lambda: self._local.__dict__.setdefault("reader", PhotoReader(*reader_args))
        self._pool = ThreadPoolExecutor(max(1, threads))
        self.node_id = ray.get_runtime_context().get_node_id()
        self.host, self.pid = socket.gethostname(), os.getpid()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        items = list(self._pool.map(lambda a: self._reader().read(a[0], a[1] or None),
                                    zip(batch["source"], batch["known_sha256"])))
        n, dim = len(items), self.model.dim
        vectors = np.zeros((n, dim), np.float32)
        ok = [i for i, it in enumerate(items) if it.embeddable]
        if ok:
            vectors[ok] = self.model.embed_image_tensors(torch.stack([items[i].pixels for i in ok]))
        return {
            "task": batch["task"],
            "status": np.array([_STATUS[0] if it.embeddable else _STATUS[1] if it.unchanged else _STATUS[2]
                                for it in items], dtype=object),
            "sha256": np.array([it.sha256 or "" for it in items], dtype=object),
            "reason": np.array([it.reason or "" for it in items], dtype=object),
            "message": np.array([it.message or "" for it in items], dtype=object),
            "width": np.array([-1 if it.width is None else it.width for it in items], np.int64),
            "height": np.array([-1 if it.height is None else it.height for it in items], np.int64),
            "vector": vectors,
            "node_id": np.array([self.node_id] * n, dtype=object),
            "host": np.array([self.host] * n, dtype=object),
            "pid": np.full(n, self.pid, np.int64),
        }


def index_catalogue_ray(
    catalogue: Catalogue,
    store: Store,
    spec: ModelSpec,
    identity: ModelIdentity,
    *,
    catalogue_name: str = "",
    workers: int | None = None,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    batch_size: int | None = None,
    prune: bool = False,
    commit_every: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    progress: bool = True,
    allow_private_urls: bool = False,
) -> IndexReport:
    """:func:`indexer.pipeline.index_catalogue` with Ray actors doing the reading and embedding.

    Needs a connected Ray (:class:`ray_session`). spec: the model and how to run it (precision, back-end,
    device: resolved on each worker); identity: the weights the workers must load (the index's, or the
    model the driver loaded for a new index). workers: actors (default: the cluster's GPUs divided by
    ``gpus_per_worker`` when that is set, else its CPUs divided by ``cpus_per_worker``);
    cpus_per_worker: CPUs each actor reserves, also its decoding threads; gpus_per_worker: GPUs each
    actor reserves (fractions share a GPU). batch_size: photos per forward pass (default 256 with GPUs,
    64 without). Other arguments and the report: as the local engine's. Raises LookalikeError when the
    cluster lacks the resources or the Ray run fails (photos committed so far stay; a rerun resumes).
    """
    import ray
    import ray.data
    import ray.exceptions

    run = _Run(catalogue, store, identity, catalogue_name, commit_every, engine="ray")
    tasks = run.tasks
    resources = ray.cluster_resources()
    if gpus_per_worker > 0 and resources.get("GPU", 0) < gpus_per_worker:
        raise LookalikeError(f"--gpus-per-worker {gpus_per_worker:g}: the Ray cluster has "
                             f"{resources.get('GPU', 0):g} GPUs")
    if resources.get("CPU", 0) < cpus_per_worker:
        raise LookalikeError(f"--cpus-per-worker {cpus_per_worker:g}: the Ray cluster has "
                             f"{resources.get('CPU', 0):g} CPUs")
    if workers is None:
        workers = (int(resources["GPU"] // gpus_per_worker) if gpus_per_worker > 0
                   else int(resources["CPU"] // cpus_per_worker))
    if batch_size is None:
        batch_size = 256 if gpus_per_worker > 0 else 64
    bar = progress_bar(len(tasks)) if progress else None
    if tasks:
        taker = ResultTaker(tasks)
        try:
            for out in _results(ray, tasks, spec, identity, workers, cpus_per_worker, gpus_per_worker, batch_size,
                                max_pixels, max_file_bytes, allow_private_urls):
                items, vectors = taker.take(out)
                run.add(items, vectors)
                if bar is not None:
                    bar.update(len(items))
                    bar.set_postfix(failed=run.report.failed, refresh=False)
        except (ray.exceptions.RayError, RuntimeError) as e:
            run.flush()  # what was embedded is kept: a rerun resumes after it
            raise LookalikeError(f"the Ray run failed ({type(e).__name__}: {str(e).splitlines()[0][:500]}); photos "
                                 "committed so far are kept: run again to resume") from None
        for t in np.flatnonzero(~taker.seen):
            run.add([_Item(tasks[t], reason="lost", message="no Ray worker returned a result for this photo")], [])
        run.report.workers = [{"node_id": k[0], "host": k[1], "pid": k[2], "batches": len(v["batches"]),
                               "photos": v["photos"]} for k, v in sorted(taker.by_worker.items())]
    if bar is not None:
        bar.close()
    return run.finish(prune)


class ResultTaker:
    """Turns the workers' output batches (:class:`EmbedWorker`) back into the driver's items, taking each
    photo once (``seen``) and counting each worker process's batches and photos (``by_worker``)."""

    def __init__(self, tasks: list):
        self.tasks = tasks
        self.seen = np.zeros(len(tasks), bool)
        self.by_worker: dict[tuple[str, str, int], dict] = {}

    def take(self, out: dict[str, np.ndarray]) -> tuple[list[_Item], list[np.ndarray]]:
        """(items in the batch's order, the vectors of its embedded ones), photos already taken left out."""
        items, vectors = [], []
        for j, t in enumerate(out["task"]):
            if self.seen[t]:  # a batch done twice (a retry after its first result came back): once is enough
                continue
            self.seen[t] = True
            status = out["status"][j]
            failed = status == "failed"
            items.append(_Item(self.tasks[t], out["sha256"][j] or None, None,
                               None if out["width"][j] < 0 else int(out["width"][j]),
                               None if out["height"][j] < 0 else int(out["height"][j]),
                               unchanged=status == "unchanged", reason=out["reason"][j] if failed else None,
                               message=out["message"][j] if failed else None))
            if status == "embedded":
                vectors.append(out["vector"][j])
            w = self.by_worker.setdefault((out["node_id"][j], out["host"][j], int(out["pid"][j])),
                                          {"batches": set(), "photos": 0})
            w["photos"] += 1
            w["batches"].add(int(out["task"][0]))
        return items, vectors


def _results(ray, tasks, spec, identity, workers, cpus_per_worker, gpus_per_worker, batch_size, max_pixels,
             max_file_bytes, allow_private_urls):
    """The workers' output batches (numpy format, see :class:`EmbedWorker`), as they finish."""
    import pyarrow as pa

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours is the photo count
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    sources = pa.array([t.row.source for t in tasks], pa.string())
    known = pa.array([(t.known.sha256 or "") if t.known is not None else "" for t in tasks], pa.string())
    # small blocks on small runs, so that every worker gets some; a block is a retry's unit of work
    rows = max(1, min(batch_size * BATCHES_PER_BLOCK, math.ceil(len(tasks) / (4 * workers))))
    table = pa.table({"task": pa.array(np.arange(len(tasks), dtype=np.int64)), "source": sources,
                      "known_sha256": known})
    ds = ray.data.from_arrow([table.slice(i, rows) for i in range(0, len(tasks), rows)])
    worker_spec = dataclasses.replace(spec, name=None, pretrained=None)  # the identity's model, nothing else
    ds = ds.map_batches(
        EmbedWorker,
        fn_constructor_kwargs={"spec": worker_spec, "identity": identity, "max_pixels": max_pixels,
                               "max_file_bytes": max_file_bytes, "allow_private_urls": allow_private_urls,
                               "threads": max(1, int(cpus_per_worker))},
        batch_size=min(batch_size, rows),
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=cpus_per_worker,
        num_gpus=gpus_per_worker or None,
        # --offline (HF_HUB_OFFLINE=1 here) holds on every node, not only in this process
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}} if os.environ.get("HF_HUB_OFFLINE") == "1" else None,
    )
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")
