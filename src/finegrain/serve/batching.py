"""Dynamic batching: requests that arrive within a short window run as one batch, on one worker thread.

The event loop only queues jobs and awaits their futures; a single worker thread owns the models
(PyTorch work never blocks the loop, and two batches never race over an adapter switch or a KV
cache). The queue is bounded: when it holds `max_queue` jobs, `submit` raises `QueueFull` at once
(the server answers 429) instead of letting memory grow. A job whose caller gave up (timeout,
disconnect) is marked cancelled and skipped, or stopped at its next token when generating.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from finegrain.serve.metrics import Metrics


class QueueFull(Exception):
    """The queue holds `max_queue` jobs; `retry_after` is a guess in whole seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy; retry in {retry_after} s")
        self.retry_after = retry_after


class Cancelled(Exception):
    """Raised inside a running job whose caller is gone, to stop it early."""


@dataclass(eq=False)
class Job:
    """One request's work. Jobs with equal `key` may run in one batch; `size` counts against `max_batch`."""

    key: Hashable
    payload: Any
    size: int = 1
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future | None = None
    cancelled: bool = False
    enqueued: float = field(default_factory=time.monotonic)

    def check(self) -> None:
        """Raise `Cancelled` when the caller is gone: long-running work calls this between steps."""
        if self.cancelled:
            raise Cancelled()

    def _deliver(self, result: Any) -> None:
        if self.future is not None and not self.future.done():
            if isinstance(result, BaseException):
                self.future.set_exception(result)
            else:
                self.future.set_result(result)


class Batcher:
    """A bounded queue and the worker thread that drains it in batches.

    Args:
        run: `run(key, jobs) -> results`, one result per job (an exception instance fails only
            that job); called on the worker thread, which may call `job.check()` between steps.
        max_batch: the most `size` units (texts) in one batch.
        max_wait: seconds the worker waits for more jobs once it holds one.
        max_queue: the most jobs waiting (not counting the batch that runs).
        metrics: where queue depth and batch sizes go.
    """

    def __init__(
        self, run: Callable[[Hashable, list[Job]], list[Any]], max_batch: int = 32, max_wait: float = 0.005,
        max_queue: int = 256, metrics: Metrics | None = None,
    ):
        self.run = run
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self._queue: deque[Job] = deque()
        self._condition = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._batch_seconds = 0.05  # running mean of one batch's time, for Retry-After

    # -- event loop side -------------------------------------------------------------------

    def enqueue(self, key: Hashable, payload: Any, size: int = 1) -> Job:
        """Queue a job and return it; its `future` resolves on the loop. Raises `QueueFull`."""
        loop = asyncio.get_running_loop()
        job = Job(key, payload, size, loop, loop.create_future())
        with self._condition:
            if len(self._queue) >= self.max_queue or self._stopping:
                raise QueueFull(self.retry_after())
            self._queue.append(job)
            self.metrics.queue_depth.set(len(self._queue))
            self._condition.notify()
        return job

    async def submit(self, key: Hashable, payload: Any, size: int = 1, timeout: float | None = None) -> Any:
        """Queue a job and wait for its result; `TimeoutError` after `timeout` seconds (the job is dropped)."""
        job = self.enqueue(key, payload, size)
        return await self.wait(job, timeout)

    async def wait(self, job: Job, timeout: float | None) -> Any:
        try:
            return await asyncio.wait_for(job.future, timeout)
        except BaseException:  # timeout, or the request task cancelled: no one wants the result
            job.cancelled = True
            raise

    def retry_after(self) -> int:
        batches_ahead = len(self._queue) / max(1, self.max_batch) + 1
        return max(1, round(batches_ahead * self._batch_seconds + 0.5))

    @property
    def depth(self) -> int:
        return len(self._queue)

    # -- worker side -----------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="finegrain-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Run what is queued, then end the worker; later `enqueue` calls get `QueueFull`."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _next_batch(self) -> list[Job] | None:
        with self._condition:
            while True:
                while self._queue and self._queue[0].cancelled:
                    self._queue.popleft()
                if self._queue:
                    break
                if self._stopping:
                    return None
                self._condition.wait()
            first = self._queue.popleft()
            batch, size = [first], first.size
            deadline = time.monotonic() + self.max_wait
            while size < self.max_batch:
                for job in list(self._queue):
                    if job.cancelled:
                        self._queue.remove(job)
                    elif job.key == first.key and size + job.size <= self.max_batch:
                        self._queue.remove(job)
                        batch.append(job)
                        size += job.size
                remaining = deadline - time.monotonic()
                if size >= self.max_batch or remaining <= 0 or self._stopping:
                    break
                self._condition.wait(remaining)
            self.metrics.queue_depth.set(len(self._queue))
        self.metrics.batch_size.observe(size)
        return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            started = time.monotonic()
            try:
                results = self.run(batch[0].key, batch)
            except BaseException as exc:  # one bad batch fails its own jobs only
                results = [exc] * len(batch)
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (time.monotonic() - started)
            for job, result in zip(batch, results):
                job.payload = None
                if job.loop is not None and not job.loop.is_closed():
                    job.loop.call_soon_threadsafe(job._deliver, result)
