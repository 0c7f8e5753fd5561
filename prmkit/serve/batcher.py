"""Batching across requests: many small concurrent requests become length-sorted forward batches.

One worker thread owns the engine (:class:`prmkit.scoring.StepScorer`); nothing else runs forward passes. A request
reserves room in the bounded queue (a full queue is :class:`QueueFull`, a 503), is tokenized on a tokenizer thread
(so tokenizing, JSON and HTTP stay off the forward thread), and waits for its scores. The worker takes every solution
queued, up to ``max_batch_rows``, and hands them to the engine in one call, which sorts them by length and cuts them
into batches under its token budget as `prmkit score` does. While requests are still being tokenized it waits up to
``max_wait_ms`` for them to join (a lone request does not wait).

A row's scores do not depend on the rows it shares a batch with (the engine pads each row to a width set by the row
alone), so a request's scores are the same bits whichever requests happened to arrive with it. When a combined call
fails (a sequence too long for the device, NaN scores), each request is scored alone, so only the one at fault fails.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from prmkit.errors import PrmkitError, first_line

log = logging.getLogger("prmkit")

TIMING: contextvars.ContextVar[dict | None] = contextvars.ContextVar("prmkit_serve_timing", default=None)
"""A request handler sets a dict here; :meth:`Batcher.score` fills it with seconds spent tokenizing, queued and in
the engine call that scored the request (the server's ``Server-Timing`` header)."""


class QueueFull(Exception):
    """More solutions are waiting than ``serve.max_queue`` allows."""

    def __init__(self, waiting: int, limit: int, retry_after: int):
        super().__init__(f"the queue is full ({waiting} solutions waiting, serve.max_queue {limit}); retry later")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The server is draining or stopping: no new work is taken."""


@dataclass
class _Job:
    encoded: list[Any] | None
    """What the engine's :meth:`~prmkit.scoring.StepScorer.encode` gave; None for a model scored prefix by prefix."""
    items: list[tuple[str, list[str]]] | None
    rows: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    started: float = 0.0
    engine_s: float = 0.0

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        def settle() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the event loop is closed: nobody waits any more
            pass


class _NoMetrics:
    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


class Batcher:
    """The queue between the request handlers (asyncio) and the engine's worker thread."""

    def __init__(
        self,
        scorer: Any,
        *,
        max_wait_ms: float = 10.0,
        max_queue: int = 4096,
        max_batch_rows: int | None = None,
        metrics: Any = None,
    ):
        self.scorer = scorer
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000.0
        self.max_queue = int(max_queue)
        self.max_batch_rows = int(max_batch_rows) if max_batch_rows else int(getattr(scorer, "sort_window", 2048))
        self.metrics = metrics or _NoMetrics()
        self._queue: collections.deque[_Job] = collections.deque()
        self._cond = threading.Condition()
        self._reserved = 0  # solutions admitted and not yet taken by the worker (tokenizing or queued)
        self._tokenizing = 0  # requests being tokenized: about to join the queue
        self._stopping = False
        self._tokenizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prmkit-tokenize")
        self._worker = threading.Thread(target=self._work, name="prmkit-engine", daemon=True)
        self._rate = 0.0  # solutions per second of recent batches, for Retry-After
        self.prefix_mode = bool(getattr(scorer, "prefix_mode", False))
        # A model scored prefix by prefix tokenizes in the engine call too; a fast tokenizer must not be called from
        # two threads at once (its settings are changed per call), so the two take turns.
        self._tokenizer_lock = threading.Lock()

    # -- the asyncio side -------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._worker.start()

    @property
    def waiting(self) -> int:
        return self._reserved

    async def score(
        self, encode: Callable[[], list[Any]], rows: int, items: Sequence[tuple[str, Sequence[str]]] | None = None
    ) -> list[Any]:
        """Scores (:class:`~prmkit.scoring.StepScores`) for ``rows`` solutions: ``encode()`` runs on the tokenizer
        thread and returns their encodings (:meth:`~prmkit.scoring.StepScorer.encode`, after the caller's checks).
        A model scored prefix by prefix scores ``items`` (the text) instead. Raises :class:`QueueFull`,
        :class:`ShuttingDown`, or whatever tokenizing or scoring this request raised."""
        self._admit(rows)
        loop = asyncio.get_running_loop()
        taken = False
        try:
            with self._cond:
                self._tokenizing += 1
            began = time.perf_counter()
            try:
                encoded = await loop.run_in_executor(self._tokenizer, self._locked, encode)
            finally:
                with self._cond:
                    self._tokenizing -= 1
                    self._cond.notify_all()
            pairs = [(p, list(s)) for p, s in items] if self.prefix_mode and items is not None else None
            job = _Job(None if pairs else list(encoded), pairs, rows, loop.create_future(), loop)
            with self._cond:
                if self._stopping:
                    raise ShuttingDown("the server is shutting down")
                self._queue.append(job)
                taken = True
                self.metrics.queue_depth(self._reserved, len(self._queue))
                self._cond.notify_all()
            try:
                results = await asyncio.shield(job.future)
            except asyncio.CancelledError:
                job.cancelled = True
                raise
            timing = TIMING.get()
            if timing is not None:
                timing.update(tokenize=job.enqueued - began, queue=job.started - job.enqueued, engine=job.engine_s)
            return results
        finally:
            if not taken:
                self._release(rows)

    def _locked(self, encode: Callable[[], list[Any]]) -> list[Any]:
        if not self.prefix_mode:
            return encode()
        with self._tokenizer_lock:
            return encode()

    def _admit(self, n: int) -> None:
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if self._reserved + n > self.max_queue and self._reserved > 0:
                retry = max(1, round((self._reserved / self._rate) if self._rate > 0 else 1))
                self.metrics.rejected("queue_full")
                raise QueueFull(self._reserved, self.max_queue, min(retry, 60))
            self._reserved += n

    def _release(self, n: int) -> None:
        with self._cond:
            self._reserved -= n
            self.metrics.queue_depth(self._reserved, len(self._queue))

    async def stop(self, timeout: float = 5.0) -> None:
        """Refuse new work, fail what is still queued, and wait (up to ``timeout`` s) for the batch in progress."""
        with self._cond:
            self._stopping = True
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in left:
            self._release(job.rows)
            job.finish(error=ShuttingDown("the server is shutting down"))
        self._tokenizer.shutdown(wait=False, cancel_futures=True)
        if self._worker.is_alive():
            await asyncio.get_running_loop().run_in_executor(None, self._worker.join, timeout)

    # -- the worker thread -----------------------------------------------------------------------------------------

    def _take(self) -> list[_Job] | None:
        """The next jobs to score together, or None when stopping."""
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            deadline = self._queue[0].enqueued + self.max_wait
            # Wait for requests still being tokenized, not for ones that may never come: a lone request goes at once.
            while (
                self._tokenizing
                and not self._stopping
                and sum(j.rows for j in self._queue) < self.max_batch_rows
                and time.perf_counter() < deadline
            ):
                self._cond.wait(max(0.0, deadline - time.perf_counter()))
            jobs: list[_Job] = []
            rows = 0
            while self._queue and (not jobs or rows + self._queue[0].rows <= self.max_batch_rows):
                job = self._queue.popleft()
                self._reserved -= job.rows
                if job.cancelled:
                    continue
                jobs.append(job)
                rows += job.rows
            self.metrics.queue_depth(self._reserved, len(self._queue))
            return jobs

    def _work(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            if not jobs:
                continue
            started = time.perf_counter()
            for job in jobs:
                job.started = started
            try:
                results = self._score(jobs)
            except Exception as e:  # each request is then scored alone, so only the one at fault fails
                if len(jobs) == 1:
                    self._fail(jobs[0], e)
                    continue
                log.warning(f"a batch of {len(jobs)} requests failed ({first_line(e)}); scoring each alone")
                for job in jobs:
                    try:
                        job.finish(self._score([job]))
                    except Exception as e1:  # this request's own failure
                        self._fail(job, e1)
                continue
            seconds = time.perf_counter() - started
            offset = 0
            for job in jobs:
                job.engine_s = seconds
                job.finish(results[offset : offset + job.rows])
                offset += job.rows
            rows = sum(j.rows for j in jobs)
            tokens = sum(r.num_tokens for r in results)
            self._rate = rows / seconds if seconds > 0 else self._rate
            self.metrics.batch(requests=len(jobs), rows=rows, tokens=tokens, seconds=seconds)

    def _score(self, jobs: list[_Job]) -> list[Any]:
        if self.prefix_mode and all(job.items is not None for job in jobs):
            with self._tokenizer_lock:
                return self.scorer.score_solutions([item for job in jobs for item in job.items or ()])
        return self.scorer.score_encoded([enc for job in jobs for enc in job.encoded or ()])

    def _fail(self, job: _Job, error: BaseException) -> None:
        if not isinstance(error, PrmkitError):
            log.error(f"scoring failed: {type(error).__name__}: {first_line(error)}")
        self.metrics.error("engine")
        job.finish(error=error)
