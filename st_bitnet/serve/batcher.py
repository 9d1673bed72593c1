"""``DynamicBatcher``: concurrent requests -> one ``model.encode`` call, results split back per request.

One asyncio worker owns the model. It takes the oldest queued request, waits at most ``max_wait_ms`` (counted
from when that request arrived) for more, then runs one encode call over every gathered text in a single
worker thread (torch releases the GIL, so the event loop keeps accepting requests meanwhile) and hands each
request its rows. Requests are never split and never reordered; a batch only holds requests with the same
batch key (e.g. the prompt), so each batch is exactly one encode call.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


class ServerOverloaded(RuntimeError):
    """More texts are waiting than ``max_queued_texts`` allows; the client should retry later."""


@dataclass
class _Job:
    texts: list[str]
    key: Hashable
    future: asyncio.Future
    enqueued_at: float


@dataclass
class BatcherStats:
    """Counters of a :class:`DynamicBatcher` (read by ``GET /health``)."""

    batches: int = 0
    requests: int = 0
    texts: int = 0
    largest_batch: int = 0
    batch_sizes: collections.deque = field(default_factory=lambda: collections.deque(maxlen=1024))


class DynamicBatcher:
    """Gather concurrent encode requests into batches of at most ``max_batch_size`` texts.

    Args:
        encode_batch: ``encode_batch(texts, key) -> tuple of arrays``, each of length ``len(texts)``; run in one
            worker thread, one call per batch. Each request gets the tuple of its own rows (slices).
        max_batch_size: Most texts per call; a single larger request still runs, alone.
        max_wait_ms: Longest wait of the oldest queued request for companions (0: take what is queued now).
        max_queued_texts: Most texts waiting; :meth:`submit` raises :class:`ServerOverloaded` beyond it.

    Example:
        ::

            batcher = DynamicBatcher(lambda texts, key: (model.encode(texts),), max_batch_size=32, max_wait_ms=5)
            await batcher.start()
            (embeddings,) = await batcher.submit(["hello", "world"])
            await batcher.stop()
    """

    def __init__(
        self,
        encode_batch: Callable[[list[str], Hashable], Sequence[Any]],
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queued_texts: int = 1 << 30,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self._encode_batch = encode_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queued_texts = max_queued_texts
        self.stats = BatcherStats()
        self._pending: collections.deque[_Job] = collections.deque()
        self._queued_texts = 0
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def queued_texts(self) -> int:
        """Texts waiting for the model (not counting the batch being encoded)."""
        return self._queued_texts

    async def start(self) -> None:
        """Start the worker on the running event loop."""
        if self._worker is not None:
            raise RuntimeError("DynamicBatcher already started")
        self._wakeup = asyncio.Event()
        # one thread: the model runs one batch at a time, so batches form while it is busy
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="st-bitnet-encode")
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="st-bitnet-batcher")

    async def stop(self) -> None:
        """Stop the worker; requests still queued fail with ``RuntimeError``."""
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        self._queued_texts = 0
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def submit(self, texts: list[str], key: Hashable = None) -> tuple:
        """Queue ``texts`` and wait for their rows of the batch they end up in.

        Raises:
            ServerOverloaded: If the queue already holds ``max_queued_texts`` texts.
            RuntimeError: If the batcher is not running.
            Exception: Whatever ``encode_batch`` raised for the batch.
        """
        if self._worker is None or self._worker.done():
            raise RuntimeError("DynamicBatcher is not running (call start() first)")
        if self._queued_texts + len(texts) > self.max_queued_texts:
            raise ServerOverloaded(
                f"{self._queued_texts} texts are already waiting (limit {self.max_queued_texts}); retry later"
            )
        loop = asyncio.get_running_loop()
        job = _Job(list(texts), key, loop.create_future(), loop.time())
        self._pending.append(job)
        self._queued_texts += len(job.texts)
        self._wakeup.set()
        try:
            return await job.future
        except asyncio.CancelledError:
            job.future.cancel()  # the worker skips it if it has not run yet
            raise

    def _take_batch(self) -> list[_Job]:
        """Pop the oldest job and every following one with its key that still fits in ``max_batch_size``."""
        first = self._pending.popleft()
        jobs, size = [first], len(first.texts)
        while self._pending:
            job = self._pending[0]
            if job.key != first.key or size + len(job.texts) > self.max_batch_size:
                break
            jobs.append(self._pending.popleft())
            size += len(job.texts)
        self._queued_texts -= size
        return jobs

    def _ready(self) -> bool:
        """Whether the queued jobs that could join the oldest one's batch already fill it."""
        first = self._pending[0]
        size = 0
        for job in self._pending:
            if job.key != first.key:
                return True  # the batch cannot grow past a job with another key
            size += len(job.texts)
            if size >= self.max_batch_size:
                return True
        return False

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            deadline = self._pending[0].enqueued_at + self.max_wait_s
            while not self._ready():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            jobs = [job for job in self._take_batch() if not job.future.done()]  # drop cancelled requests
            if jobs:
                await self._encode(loop, jobs)

    async def _encode(self, loop: asyncio.AbstractEventLoop, jobs: list[_Job]) -> None:
        texts = [text for job in jobs for text in job.texts]
        try:
            outputs = await loop.run_in_executor(self._executor, self._encode_batch, texts, jobs[0].key)
        except asyncio.CancelledError:  # stop() while the batch runs: its requests must not wait forever
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(RuntimeError("the server is shutting down"))
            raise
        except Exception as err:  # every request of the batch gets the error (e.g. out of memory)
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(err)
            return
        self.stats.batches += 1
        self.stats.requests += len(jobs)
        self.stats.texts += len(texts)
        self.stats.largest_batch = max(self.stats.largest_batch, len(texts))
        self.stats.batch_sizes.append(len(texts))
        start = 0
        for job in jobs:
            end = start + len(job.texts)
            if not job.future.done():
                job.future.set_result(tuple(output[start:end] for output in outputs))
            start = end
