"""Micro-batching: concurrent image queries share one forward pass.

A query server gets image queries one at a time, from many clients at once. Embedding
each alone wastes the CPU's matrix units (and the GPU's) on batches of one; this
module queues the preprocessed pixels of concurrent queries and embeds up to
``max_batch`` of them together, the technique of inference servers such as NVIDIA
Triton's dynamic batcher and TorchServe's batch_size / max_batch_delay.

The window only costs latency when it can pay off: the worker waits (at most
``window_ms``) for more queries only while other requests are still decoding and
preprocessing their photos; a lone query is embedded at once.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable

import numpy as np
import torch

log = logging.getLogger("lookalike.batching")

#: seconds a request waits for its vector before it checks the workers: a request still queued while
#: a worker sleeps (its wake-up was lost), or a gathering that outlived its window by this much, is
#: woken again (see :meth:`MicroBatcher.embed`). Longer than any window a server should use.
RESCUE_S = 0.25
#: seconds after which a request still waiting for its vector is logged (once): a model that hangs
SLOW_QUERY_S = 10.0


class MicroBatcher:
    """Embed image queries in batches on ``workers`` worker threads.

    embed: the batch function, float ``(n, 3, H, W)`` pixels -> float32 ``(n, dim)``
      (``ClipModel.embed_image_tensors``).
    max_batch: most queries per forward pass. window_ms: longest wait, in milliseconds,
      for more queries once the first has arrived.
    on_batch: called with each batch's size (for metrics). on_rescue: called with no argument for each
      stranded query woken again (for metrics; see :meth:`embed`).
    workers: forward passes that may run at once (each worker gathers its own batch); more than
      one pays only when ``embed`` runs concurrent calls in parallel (``ClipModel.set_streams``).
    """

    def __init__(self, embed: Callable[[torch.Tensor], np.ndarray], max_batch: int = 16, window_ms: float = 4.0,
                 on_batch: Callable[[int], None] | None = None, workers: int = 1,
                 on_rescue: Callable[[], None] | None = None):
        if max_batch < 1 or window_ms < 0 or workers < 1:
            raise ValueError("max_batch and workers must be >= 1 and window_ms >= 0")
        self._embed = embed
        self.max_batch = max_batch
        self.window_s = window_ms / 1000
        self._on_batch = on_batch
        self._on_rescue = on_rescue
        # One condition guards the queue, the count of requests still preparing and the closed flag, and is
        # notified whenever any of them changes. A worker gathering a batch waits on it with the window's
        # timeout, but never needs that timeout to fire to make progress: the event it waits for (a query
        # queued, or the last preparing request done) wakes it. (On our 2-core VMs a 1 ms timed wait in this
        # worker once seemed never to return, and hung CI. The cause, found later, was not the wait: a
        # process's first OpenVINO inferences, made by two threads at once, deadlocked holding the GIL, so no
        # Python thread could run; see indexer.backends.OpenVINOImageEncoder._warm_up.) Requests also wake the
        # workers again after RESCUE_S (embed): insurance against a lost notify, never seen so far.
        self._cond = threading.Condition()
        self._pending: deque[tuple[torch.Tensor, Future]] = deque()
        self._preparing = 0
        self._gathering = False
        self._gather_started = 0.0
        self._idle = 0  # workers asleep in _next_batch, waiting for a query
        self._closed = False
        #: requests that found their query stranded and woke the workers again (see :meth:`embed`)
        self.rescues = 0
        self._workers = [threading.Thread(target=self._run, name=f"lookalike-batcher-{i}", daemon=True)
                         for i in range(workers)]
        for worker in self._workers:
            worker.start()

    def embed(self, prepare: Callable[[], torch.Tensor]) -> np.ndarray:
        """Run ``prepare`` (decode + preprocess, in the calling thread) and embed its pixels
        ``(3, H, W)`` with whatever other queries arrive meanwhile.

        Returns float32 ``(dim,)`` of unit norm. Exceptions of ``prepare`` and of the model
        propagate to the caller; RuntimeError after :meth:`close`.

        Every :data:`RESCUE_S` seconds without its vector, the request wakes the workers again, and
        counts a rescue (:attr:`rescues`, and a warning in the log) when its query was stranded: still
        queued while a worker slept, or gathered by a worker whose window ended over 50 ms ago. So a
        lost wake-up costs a request :data:`RESCUE_S`, not the rest of its life. A request still waiting
        after :data:`SLOW_QUERY_S` is logged; one whose workers have all stopped gets RuntimeError.
        """
        with self._cond:
            self._preparing += 1
        try:
            pixels = prepare()
        except BaseException:
            with self._cond:
                self._preparing -= 1
                self._cond.notify_all()  # a worker waiting for this request stops waiting
            raise
        future: Future = Future()
        with self._cond:
            self._preparing -= 1
            self._cond.notify_all()
            if self._closed:
                raise RuntimeError("the query batcher is closed")
            self._pending.append((pixels, future))
        waited, warned = 0.0, False
        while True:
            try:
                return future.result(timeout=RESCUE_S)
            except FutureTimeout:
                waited += RESCUE_S
                self._rescue(future)
                if not future.done() and not any(w.is_alive() for w in self._workers):
                    raise RuntimeError("the query batcher has no worker left to embed this query") from None
                if waited >= SLOW_QUERY_S and not warned:
                    warned = True
                    log.warning("an image query has waited %.0f s for the model", waited,
                                extra={"queued": not future.running()})

    def _rescue(self, future: Future) -> None:
        """Wake every worker; count and log it when ``future``'s query was stranded (see :meth:`embed`)."""
        with self._cond:
            queued = not future.running() and not future.done()
            # a gatherer's timed wait ends within milliseconds of its window; 50 ms later it did not fire
            overdue = self._gathering and time.monotonic() - self._gather_started > self.window_s + 0.05
            stranded = overdue or (queued and self._idle > 0 and not self._gathering)
            self._cond.notify_all()
            if stranded:
                self.rescues += 1
        if stranded:
            if self._on_rescue is not None:
                self._on_rescue()
            log.warning("a queued image query was stranded (a lost wake-up): the batcher's workers were woken again",
                        extra={"rescues": self.rescues, "gathering_overdue": overdue})

    def close(self) -> None:
        """Stop the workers after the queued queries are answered."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        deadline = time.monotonic() + 30
        for worker in self._workers:
            worker.join(timeout=max(0.0, deadline - time.monotonic()))

    def _next_batch(self) -> list[tuple[torch.Tensor, Future]] | None:
        """Wait for a query, then gather up to ``max_batch`` while others are still preparing and the window
        lasts. None once closed and drained."""
        with self._cond:
            # one worker gathers at a time: queries that arrive meanwhile join its batch rather than start
            # batches of one on the other workers
            while not self._pending or self._gathering:
                if self._closed and not self._pending:
                    return None
                self._idle += 1
                try:
                    self._cond.wait()
                finally:
                    self._idle -= 1
            self._gathering = True
            self._gather_started = time.monotonic()
            try:
                batch = [self._pending.popleft()]
                deadline = self._gather_started + self.window_s
                while len(batch) < self.max_batch:
                    if self._pending:
                        batch.append(self._pending.popleft())
                        continue
                    wait = deadline - time.monotonic()
                    if wait <= 0 or self._preparing == 0 or self._closed:
                        break
                    self._cond.wait(wait)
            finally:
                self._gathering = False
                self._cond.notify_all()  # the next worker may gather what is left
            for _, future in batch:
                future.set_running_or_notify_cancel()  # no longer queued (nothing cancels these futures)
            return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._run_batch(batch)

    def _run_batch(self, batch: list[tuple[torch.Tensor, Future]]) -> None:
        """Embed ``batch`` and answer each of its requests, whatever happens: an error goes to every
        request of the batch, a failing ``on_batch`` is logged, and the worker lives on (a worker that
        died would leave the requests it had taken waiting for ever)."""
        try:
            vectors = self._embed(torch.stack([pixels for pixels, _ in batch]))
            if len(vectors) != len(batch):
                raise RuntimeError(f"the model returned {len(vectors)} vectors for {len(batch)} images")
        except BaseException as e:
            for _, future in batch:
                future.set_exception(e)
            return
        if self._on_batch is not None:
            try:
                self._on_batch(len(batch))
            except Exception:
                log.exception("the micro-batcher's on_batch callback failed")
        for (_, future), vec in zip(batch, vectors):
            future.set_result(vec)
