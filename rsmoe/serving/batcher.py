"""Cross-request batching: jobs that arrive within a short window run in one call, in one thread.

    batcher = Batcher(run_group, window_s=0.02, max_batch=8)
    future = batcher.submit(key, payload)      # from any thread; returns a concurrent Future
    result = future.result()                   # -> Done(value, batch_size, queue_s, run_s)

One worker thread owns the model (torch generation is not re-entrant across threads). It blocks
for a first job, then keeps collecting until `window_s` has passed since it started collecting
or `max_batch` jobs are collected. (A lone request therefore waits out the window: the price of
catching the others of a burst, which reach the server a few ms apart.) The collected jobs are grouped by `key` (jobs of one key can share a
call: same task, same generation settings) and `run_group(key, payloads) -> results` runs once per
group. Under load no time is lost: jobs that queued while the previous batch ran are taken at once.
`max_batch=1` turns batching off (the baseline of bench/serve.py).

A group that raises is retried one job at a time, so one bad input fails only its own caller.
Jobs whose caller gave up (future cancelled: timeout, disconnect) are dropped before they run.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More jobs are waiting than `max_queue`: the caller should answer 503."""


class Closed(Exception):
    """The batcher is shutting down and takes no new jobs."""


@dataclass
class Done:
    value: Any
    batch_size: int
    """How many jobs shared the call that produced `value`."""
    queue_s: float
    run_s: float


@dataclass
class _Job:
    key: Hashable
    payload: Any
    future: Future
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class BatcherStats:
    calls: int = 0
    jobs: int = 0
    largest: int = 0


class Batcher:
    def __init__(self, run_group: Callable[[Hashable, list[Any]], list[Any]], window_s: float = 0.02,
                 max_batch: int = 8, max_queue: int = 256, name: str = "rsmoe-batcher"):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if window_s < 0:
            raise ValueError("window_s must be >= 0")
        self.run_group = run_group
        self.window_s = window_s
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.stats = BatcherStats()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ callers
    def submit(self, key: Hashable, payload: Any) -> Future:
        with self._lock:
            if self._closed:
                raise Closed("the server is shutting down")
            if self._queue.qsize() >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting")
            job = _Job(key, payload, Future())
            self._queue.put(job)
        return job.future

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def close(self, timeout: float | None = None) -> None:
        """Take no new jobs, finish the queued ones, stop the worker."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout)

    # ------------------------------------------------------------ worker
    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        jobs, stop = [first], False
        # The window opens when the worker is free, not when `first` arrived: a job that queued during
        # the previous generation would otherwise run alone, a few ms ahead of the peers that were
        # answered by that generation and are sending their next requests now (closed-loop clients
        # then split into alternating small batches for good).
        deadline = time.monotonic() + self.window_s
        while len(jobs) < self.max_batch:
            try:
                job = self._queue.get_nowait()  # already waiting: no reason to sleep
            except queue.Empty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    job = self._queue.get(timeout=left)
                except queue.Empty:
                    break
            if job is None:
                stop = True
                break
            jobs.append(job)
        return jobs, stop

    def _loop(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            jobs, stop = self._collect(first)
            groups: dict[Hashable, list[_Job]] = {}
            for job in jobs:
                if job.future.set_running_or_notify_cancel():  # False: the caller gave up
                    groups.setdefault(job.key, []).append(job)
            for key, group in groups.items():
                self._run(key, group)
        # The sentinel is queued under the lock after every accepted job, so none is left behind.

    def _run(self, key: Hashable, group: list[_Job]) -> None:
        start = time.monotonic()
        try:
            values = self.run_group(key, [j.payload for j in group])
            if len(values) != len(group):
                raise RuntimeError(f"run_group returned {len(values)} results for {len(group)} jobs")
        except Exception as exc:
            if len(group) == 1:
                log.exception("batch of 1 failed (key %s)", key)
                group[0].future.set_exception(exc)
                return
            log.warning("batch of %d failed (%s: %s); retrying its jobs one by one", len(group), type(exc).__name__, exc)
            for job in group:
                self._run(key, [job])
            return
        run_s = time.monotonic() - start
        self.stats.calls += 1
        self.stats.jobs += len(group)
        self.stats.largest = max(self.stats.largest, len(group))
        for job, value in zip(group, values):
            job.future.set_result(Done(value, len(group), start - job.arrived, run_s))
