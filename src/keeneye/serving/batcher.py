"""Micro-batching: images of requests that arrive together go through the model in one forward pass.

Requests put their (already decoded) images on an asyncio queue and await a future. One batching
task hands merged batches of at most `max_batch_size` images to a single model thread (a
one-thread executor: the model is only ever called from that thread). While the model runs, new
requests queue up; when it is done, everything queued forms the next batch at once, with no
waiting (under load the model is the bottleneck and must not idle). Only a request that finds
the model idle waits, at most `max_wait_s`, for others to join it.

With batching off, each request's images are one forward pass on the same model thread, which
is what the benchmark compares against.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from keeneye.errors import ServiceError

log = logging.getLogger("keeneye.serving")

PredictFn = Callable[[Sequence[np.ndarray]], np.ndarray]


class Unavailable(ServiceError):
    """The batcher cannot take the request now (shutting down, or too much work queued): `Unavailable(code, message)`."""


@dataclass
class BatchStats:
    forward_passes: int = 0
    images: int = 0
    requests: int = 0
    max_batch_images: int = 0
    max_requests_per_pass: int = 0
    merged_passes: int = 0  # passes that served more than one request
    failed_passes: int = 0
    model_seconds: float = 0.0
    batch_sizes: Counter = field(default_factory=Counter)

    def record(self, n_images: int, n_requests: int, seconds: float) -> None:
        self.forward_passes += 1
        self.images += n_images
        self.requests += n_requests
        self.max_batch_images = max(self.max_batch_images, n_images)
        self.max_requests_per_pass = max(self.max_requests_per_pass, n_requests)
        self.merged_passes += n_requests > 1
        self.model_seconds += seconds
        self.batch_sizes[n_images] += 1

    def to_dict(self) -> dict:
        return {
            "forward_passes": self.forward_passes,
            "images": self.images,
            "requests": self.requests,
            "mean_batch_images": round(self.images / self.forward_passes, 3) if self.forward_passes else 0.0,
            "max_batch_images": self.max_batch_images,
            "max_requests_per_pass": self.max_requests_per_pass,
            "merged_passes": self.merged_passes,
            "failed_passes": self.failed_passes,
            "model_seconds": round(self.model_seconds, 4),
            "batch_size_histogram": {str(k): v for k, v in sorted(self.batch_sizes.items())},
        }


@dataclass
class _Job:
    images: list
    future: asyncio.Future


_STOP = object()


class MicroBatcher:
    def __init__(
        self, predict: PredictFn, executor: Executor, *, enabled: bool = True, max_batch_size: int = 32,
        max_wait_s: float = 0.005, max_pending_images: int = 1024,
    ) -> None:
        self._predict = predict
        self._executor = executor
        self.enabled = enabled
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_pending_images = max_pending_images
        self.stats = BatchStats()
        self.pending_images = 0
        self._closing = False
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        if self.enabled:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="keeneye-batcher")

    @property
    def alive(self) -> bool:
        return not self.enabled or (self._task is not None and not self._task.done())

    async def close(self, timeout: float = 30.0) -> None:
        """Refuse new work, finish everything already queued, stop the batching task."""
        self._closing = True
        if self._task is None:
            return
        self._queue.put_nowait(_STOP)  # FIFO: every job queued before it is still run
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except asyncio.TimeoutError:
            log.error("batcher did not drain within %.1f s; cancelling", timeout)
            self._task.cancel()

    # --- the request side --------------------------------------------------------------

    async def predict(self, images: list[np.ndarray]) -> np.ndarray:
        """Probabilities for `images` (decoded, model-sized), in order."""
        if self._closing:
            raise Unavailable("shutting_down", "the server is shutting down")
        if not images:
            return np.empty(0, np.float32)
        if self.pending_images + len(images) > self.max_pending_images:
            raise Unavailable("server_busy", f"too much work queued ({self.pending_images} images); retry shortly")
        self.pending_images += len(images)
        try:
            if not self.enabled:
                return await self._forward([images])
            future = asyncio.get_running_loop().create_future()
            self._queue.put_nowait(_Job(images, future))
            return await future
        finally:
            self.pending_images -= len(images)

    # --- the model side ----------------------------------------------------------------

    async def _forward(self, groups: list[list[np.ndarray]]) -> np.ndarray:
        merged = [image for group in groups for image in group]
        loop = asyncio.get_running_loop()
        try:
            probabilities, seconds = await loop.run_in_executor(self._executor, self._timed, merged)
        except Exception:
            self.stats.failed_passes += 1
            raise
        self.stats.record(len(merged), len(groups), seconds)
        return np.asarray(probabilities, dtype=np.float32).reshape(-1)

    def _timed(self, images: list[np.ndarray]) -> tuple[np.ndarray, float]:
        """Runs in the model thread: the time measured is the forward pass, not the wait for the thread."""
        started = time.perf_counter()
        return self._predict(images), time.perf_counter() - started

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        carry = None
        stopping = False
        while not stopping:
            # Under load the model is the bottleneck: when it frees up, everything already queued
            # runs at once, without waiting. Only a request that finds the model idle waits (up to
            # max_wait_s) for others to join it.
            idle = False
            if carry is not None:
                first, carry = carry, None
            else:
                try:
                    first = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    first = await self._queue.get()
                    idle = True
            if first is _STOP:
                break
            batch, n_images = [first], len(first.images)
            deadline = loop.time() + (self.max_wait_s if idle else 0.0)
            while n_images < self.max_batch_size:
                try:
                    job = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        job = await asyncio.wait_for(self._queue.get(), remaining)
                    except asyncio.TimeoutError:
                        break
                if job is _STOP:
                    stopping = True
                    break
                if n_images + len(job.images) > self.max_batch_size:
                    carry = job  # starts the next batch
                    break
                batch.append(job)
                n_images += len(job.images)
            await self._run_batch(batch)
        # Drain whatever is left (only jobs queued before _STOP can be here).
        while carry is not None or not self._queue.empty():
            job = carry if carry is not None else self._queue.get_nowait()
            carry = None
            if job is not _STOP:
                await self._run_batch([job])

    async def _run_batch(self, batch: list[_Job]) -> None:
        batch = [job for job in batch if not job.future.done()]  # timed-out or abandoned requests
        if not batch:
            return
        try:
            probabilities = await self._forward([job.images for job in batch])
        except Exception as exc:  # the model failed: every waiting request learns why; the loop goes on
            log.exception("forward pass failed")
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        offset = 0
        for job in batch:
            n = len(job.images)
            if not job.future.done():
                job.future.set_result(probabilities[offset : offset + n])
            offset += n
