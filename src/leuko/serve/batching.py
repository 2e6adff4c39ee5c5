"""Micro-batching: concurrent requests share forward passes, on one inference thread.

On a CPU a forward pass of 16 small images costs far less than 16 passes of
one, so when several clients post at once their images should ride together.
:class:`MicroBatcher` owns the model's only thread:

* request handlers (on the event loop) call :meth:`MicroBatcher.predict`,
  which queues the images and awaits a future, so the loop stays free to
  accept and parse other uploads while the model runs;
* the inference thread takes the first waiting job, then everything else
  already queued (up to ``max_batch`` images, waiting at most ``max_wait_ms``
  for stragglers), runs **one** forward pass and hands each job its rows;
* :meth:`MicroBatcher.call` runs any other use of the model (Grad-CAM, whose
  hooks must not see another request's forward pass) on the same thread,
  between batches, so nothing touches the model concurrently.

Under no load a request waits at most ``max_wait_ms`` extra; under load the
queue fills while the model is busy and batches form by themselves.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

log = logging.getLogger("leuko.serve")

PredictFn = Callable[[Sequence[np.ndarray]], tuple[np.ndarray, ...]]
"""``images -> (logits, probs, ...)``: arrays whose rows follow the input order (each caller gets its rows of each)."""


@dataclass
class _Job:
    images: Sequence[np.ndarray] | None
    fn: Callable[[], Any] | None
    future: Future = field(default_factory=Future)


@dataclass
class BatchStats:
    """What the batcher has done (for ``/health``, tests and the benchmark)."""

    batches: int = 0
    images: int = 0
    jobs: int = 0
    largest_batch: int = 0


_STOP = object()


class MicroBatcher:
    """One inference thread that batches queued prediction jobs (see the module docstring)."""

    def __init__(self, predict_fn: PredictFn, *, max_batch: int = 32, max_wait_ms: float = 2.0) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1; got {max_batch}")
        self._predict = predict_fn
        self.max_batch = int(max_batch)
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000.0
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.stats = BatchStats()

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="leuko-inference", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the queued jobs, then end the thread."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_STOP)
            thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    # ------------------------------------------------------------ client side
    async def predict(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
        """``predict_fn``'s arrays (``logits, probs, ...``) for ``images``, computed in a batch shared with concurrent callers."""
        return await self._submit(_Job(list(images), None))

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the inference thread, between batches (exclusive use of the model)."""
        return await self._submit(_Job(None, fn))

    async def _submit(self, job: _Job) -> Any:
        if not self.running:
            raise RuntimeError("the inference thread is not running (was the app started?)")
        self._queue.put(job)
        return await asyncio.wrap_future(job.future)

    # ------------------------------------------------------------ worker side
    def _run(self) -> None:
        held: _Job | None = None  # a call job met while gathering a batch runs right after it
        while True:
            job = held if held is not None else self._queue.get()
            held = None
            if job is _STOP:
                return
            if job.fn is not None:
                self._finish(job, job.fn)
                continue
            batch = [job]
            n = len(job.images or ())
            deadline = time.perf_counter() + self.max_wait
            while n < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.perf_counter())) if self.max_wait else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP or nxt.fn is not None:
                    held = nxt
                    break
                batch.append(nxt)
                n += len(nxt.images or ())
            self._run_batch(batch)

    def _run_batch(self, batch: list[_Job]) -> None:
        images = [im for job in batch for im in (job.images or ())]
        try:
            arrays = self._predict(images)
        except BaseException as exc:  # every waiting request learns of it; the thread lives on
            log.exception("inference failed for a batch of %d image(s)", len(images))
            for job in batch:
                _settle(job.future, error=exc)
            return
        self.stats.batches += 1
        self.stats.images += len(images)
        self.stats.jobs += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(images))
        start = 0
        for job in batch:
            k = len(job.images or ())
            _settle(job.future, result=tuple(a[start : start + k] for a in arrays))
            start += k

    @staticmethod
    def _finish(job: _Job, fn: Callable[[], Any]) -> None:
        try:
            result = fn()
        except BaseException as exc:
            _settle(job.future, error=exc)
        else:
            _settle(job.future, result=result)


def _settle(future: Future, *, result: Any = None, error: BaseException | None = None) -> None:
    """Resolve a job's future unless its client went away (a cancelled future refuses results)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass
