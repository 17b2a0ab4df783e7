"""Dynamic batching for the server: texts of concurrent requests are gathered for at most
`max_wait_ms` (or until `max_texts` are waiting) and run as one length-sorted call, with a
bounded queue and a deadline per request."""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


# How many recent runs the drain rate (and so Retry-After) is measured over.
DRAIN_RUNS = 32


class Overloaded(RuntimeError):
    """The queue is full: the caller should retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(TimeoutError):
    """A request waited and ran longer than its deadline."""


@dataclass
class Job:
    texts: list[str]
    options: tuple[tuple[str, Any], ...]
    future: asyncio.Future
    expires: float
    queued: float = field(default_factory=time.monotonic)


class Batcher:
    """Gathers the texts of concurrent requests into shared runs of `predict`.

    Args:
        predict: `predict(texts, **options) -> list` (one result per text), run in a thread.
        max_texts: a run starts once this many texts are waiting.
        max_wait_ms: or once the oldest waiting request has waited this long (0: no waiting;
            requests that arrive while a run is busy are still gathered into the next one).
        max_queue: texts allowed to wait; past it a request gets `Overloaded`.
        deadline_s: a request not answered within this many seconds gets `DeadlineExceeded`;
            its texts are dropped from the queue if they have not started.
        workers: runs at once (ONNX Runtime sessions are thread-safe).
    """

    def __init__(
        self,
        predict: Callable[..., Sequence[Any]],
        max_texts: int = 64,
        max_wait_ms: float = 5.0,
        max_queue: int = 2048,
        deadline_s: float = 30.0,
        workers: int = 1,
    ) -> None:
        if max_texts <= 0 or max_queue <= 0 or deadline_s <= 0 or workers <= 0 or max_wait_ms < 0:
            raise ValueError(
                "max_texts, max_queue, deadline_s and workers must be > 0, max_wait_ms >= 0"
            )
        self.predict = predict
        self.max_texts = max_texts
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.deadline = deadline_s
        self.workers = workers
        self.pending: list[Job] = []
        self.waiting_texts = 0
        self.wakeup: asyncio.Event | None = None
        self.tasks: list[asyncio.Task] = []
        self.runs = 0
        self.last_run_s = 0.05
        # (texts, seconds) of the recent runs: the drain rate that Retry-After is based on.
        self.recent: collections.deque[tuple[int, float]] = collections.deque(maxlen=DRAIN_RUNS)

    def retry_after(self) -> int:
        """Seconds until the waiting texts have drained at the recent rate, in [1, deadline].
        The rate is the median of the recent runs' texts per second, so that one slow run (a
        long text) does not stand for the others."""
        if not self.recent:
            return 1
        rate = statistics.median(n / max(s, 1e-6) for n, s in self.recent) * self.workers
        return int(min(max(1, math.ceil(self.waiting_texts / rate)), self.deadline))

    async def start(self) -> None:
        self.wakeup = asyncio.Event()
        self.tasks = [asyncio.create_task(self._worker()) for _ in range(self.workers)]

    async def stop(self) -> None:
        """Finish what is queued, then stop the workers."""
        while self.pending:
            await asyncio.sleep(0.01)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks = []

    async def submit(self, texts: list[str], **options: Any) -> list[Any]:
        """The results for `texts`, computed in a shared run."""
        if not texts:
            return []
        if self.wakeup is None:
            raise RuntimeError("Batcher.start() was not awaited")
        if self.waiting_texts + len(texts) > self.max_queue:
            raise Overloaded(
                f"{self.waiting_texts} texts are waiting (limit {self.max_queue}); retry later",
                self.retry_after(),
            )
        loop = asyncio.get_running_loop()
        job = Job(
            list(texts),
            tuple(sorted(options.items())),
            loop.create_future(),
            time.monotonic() + self.deadline,
        )
        self.pending.append(job)
        self.waiting_texts += len(texts)
        self.wakeup.set()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), self.deadline)
        except TimeoutError:
            self._drop(job)
            raise DeadlineExceeded(
                f"not answered within the {self.deadline:g} s deadline; retry or send fewer texts"
            ) from None

    def _drop(self, job: Job) -> None:
        if job in self.pending:
            self.pending.remove(job)
            self.waiting_texts -= len(job.texts)

    def _take(self) -> list[Job]:
        """The oldest job and those waiting with the same options, up to `max_texts` texts (a
        single larger request runs on its own)."""
        now = time.monotonic()
        for job in [j for j in self.pending if j.expires <= now or j.future.done()]:
            self._drop(job)
        if not self.pending:
            return []
        first = self.pending[0]
        taken, count = [], 0
        for job in list(self.pending):
            if job.options != first.options:
                continue
            if taken and count + len(job.texts) > self.max_texts:
                break
            taken.append(job)
            count += len(job.texts)
        for job in taken:
            self._drop(job)
        return taken

    async def _worker(self) -> None:
        assert self.wakeup is not None
        while True:
            if not self.pending:
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            oldest = self.pending[0].queued
            wait = oldest + self.max_wait - time.monotonic()
            if self.waiting_texts < self.max_texts and wait > 0:
                await asyncio.sleep(min(wait, 0.001 + self.max_wait / 4))
                continue
            jobs = self._take()
            if jobs:
                await self._run(jobs)

    async def _run(self, jobs: list[Job]) -> None:
        texts = [t for job in jobs for t in job.texts]
        options = dict(jobs[0].options)
        start = time.monotonic()
        try:
            results = await asyncio.to_thread(self.predict, texts, **options)
        except Exception as exc:  # each request gets the error; a bad text fails its own
            if len(jobs) > 1 and isinstance(exc, ValueError):
                for job in jobs:  # run alone, so one malformed text fails only its request
                    await self._run([job])
                return
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        self.runs += 1
        self.last_run_s = time.monotonic() - start
        self.recent.append((len(texts), self.last_run_s))
        at = 0
        for job in jobs:
            if not job.future.done():
                job.future.set_result(list(results[at : at + len(job.texts)]))
            at += len(job.texts)
