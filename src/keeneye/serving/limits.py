"""Reading request bodies with bounded time and bounded memory.

Two attacks a public endpoint meets, and what answers them here:

* A slow (or stalled) client announces a body and sends it a few bytes at a time, holding a
  connection and a buffer forever. `read_body` gives the whole body `body_timeout_s`; past it the
  request gets 408 and the connection is closed (`Connection: close`).
* Many large bodies at once multiply memory (each body is held, parsed and base64-decoded).
  `BodyBudget` reserves a request's declared size (else max_body_bytes) from one shared budget
  before its body is read and keeps it until its images are decoded; a request that does not fit
  waits with its bytes left in the client's socket (TCP back-pressure), up to `request_timeout_s`,
  then gets 503 with Retry-After. Small requests are not held up by a slow large one. A body of N
  bytes costs about 2N at its peak as a raw image (chunks, joined body) and 2.75N as base64 JSON
  (body, parsed string, decoded bytes). Measured with benchmarks/load_test.py (hostile phase, only
  31-40 MB bodies, 8 clients): RSS grew 207 MB with a 64 MiB budget and 368 MB with 512 MiB.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import AsyncIterator

from starlette.requests import ClientDisconnect, Request

from keeneye.serving.inputs import RequestRejected
from keeneye.serving.settings import ServeSettings

#: An oversized body is read (and thrown away) up to this many bytes so the client gets its 413
#: instead of a reset connection; beyond it the connection is closed after the answer.
DRAIN_BYTES = 64 * 1024 * 1024
CLOSE = {"Connection": "close"}


class BodyBudget:
    """Bytes of request bodies in memory, all requests together, bounded by `capacity`."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.reserved = 0
        self.waiting = 0
        self._changed = asyncio.Condition()

    @asynccontextmanager
    async def reserve(self, n_bytes: int, timeout_s: float) -> AsyncIterator[None]:
        """Hold `n_bytes` of the budget for the duration of the block (503 if none frees in time)."""
        n_bytes = max(0, min(n_bytes, self.capacity))
        async with self._changed:
            self.waiting += 1
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.reserved + n_bytes <= self.capacity), timeout_s)
            except asyncio.TimeoutError:
                raise RequestRejected(
                    503, "busy", f"too many request bodies in memory (max_buffered_body_bytes={self.capacity}); retry",
                    {"Retry-After": "1"},
                ) from None
            finally:
                self.waiting -= 1
            self.reserved += n_bytes
        try:
            yield
        finally:
            async with self._changed:
                self.reserved -= n_bytes
                self._changed.notify_all()


def declared_length(request: Request) -> int | None:
    """The Content-Length header as an int (None when absent or not a number)."""
    declared = request.headers.get("content-length")
    return int(declared) if declared is not None and declared.isdigit() else None


def reservation(request: Request, settings: ServeSettings) -> int:
    """What a request's body may occupy: its declared size, max_body_bytes when undeclared, 0 when refused unread."""
    declared = declared_length(request)
    if declared is None:
        return settings.max_body_bytes
    return declared if declared <= settings.max_body_bytes else 0


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body, refusing (413) anything over `limit` bytes and (408) anything slower than `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    declared = declared_length(request)
    too_large = RequestRejected(413, "body_too_large", f"request body is larger than max_body_bytes={limit}", CLOSE)
    if declared is not None and declared > limit:
        if declared <= DRAIN_BYTES:  # else: answer at once and close the connection
            await _drain(request, 0, deadline)
        raise too_large
    chunks, total = [], 0
    while True:
        message = await _receive(request, deadline, timeout_s)
        total += len(message.get("body", b""))
        if total > limit:
            await _drain(request, total, deadline)
            raise too_large
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _receive(request: Request, deadline: float, timeout_s: float) -> dict:
    remaining = deadline - asyncio.get_running_loop().time()
    try:
        if remaining <= 0:
            raise asyncio.TimeoutError
        message = await asyncio.wait_for(request.receive(), remaining)
    except asyncio.TimeoutError:
        raise RequestRejected(
            408, "body_timeout", f"the request body did not arrive within body_timeout_s={timeout_s:g} s", CLOSE,
        ) from None
    if message["type"] == "http.disconnect":
        raise ClientDisconnect()
    return message


async def _drain(request: Request, already: int, deadline: float) -> None:
    """Read and discard the rest of an oversized body (bounded in bytes and time), so the 413 reaches the client."""
    total = already
    loop = asyncio.get_running_loop()
    while total <= DRAIN_BYTES:
        remaining = deadline - loop.time()
        if remaining <= 0:
            return
        try:
            message = await asyncio.wait_for(request.receive(), remaining)
        except asyncio.TimeoutError:
            return
        if message["type"] != "http.request":
            return
        total += len(message.get("body", b""))
        if not message.get("more_body", False):
            return
