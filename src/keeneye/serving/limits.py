"""Reading request bodies with bounded time and bounded memory.

Two attacks a public endpoint meets, and what answers them here:

* A slow (or stalled) client announces a body and sends it a few bytes at a time, holding a
  connection and a buffer forever. `read_body` gives the whole body `body_timeout_s`; past it the
  request gets 408 and the connection is closed (`Connection: close`).
* Many large bodies at once multiply memory (each body is held, parsed and base64-decoded).
  `BodyBudget` reserves a request's declared size (else max_body_bytes) from one shared budget
  before its body is read and keeps it until its images are decoded; a request that does not fit
  waits with its bytes left in the client's socket (TCP back-pressure), up to `request_timeout_s`,
  then gets 503 with Retry-After. Small requests are not held up by a slow large one.

What a request reserves is what its body really occupies at its peak, not its length. A body with
a Content-Length is read into one buffer of that size (without one: chunks, then joined, 2N). Then
a body of N bytes is held once as a raw image (N); as the body and each file read back as multipart
(2N; starlette spools file parts over 1 MiB to disk); as the body, the parsed string and the decoded
bytes as base64 JSON (2.75N, counted 3N). `BODY_COPIES` holds these factors. So the budget bounds the
memory of bodies, and `serve` makes glibc return freed large buffers to the system at once
(`release_large_buffers`), so that RSS follows the bytes in use rather than the largest past peak.
benchmarks/load_test.py checks it: hostile traffic may add at most the budget to the RSS of normal
traffic.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import AsyncIterator

from starlette.requests import ClientDisconnect, Request

from keeneye.serving.inputs import RequestRejected
from keeneye.serving.settings import BODY_COPIES, ServeSettings

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


def body_copies(content_type: str) -> int:
    """How many copies of its body a request of this Content-Type holds at its peak."""
    mime = content_type.split(";", 1)[0].strip().lower()
    if mime == "application/json" or mime.endswith("+json"):
        return BODY_COPIES["json"]
    return BODY_COPIES["multipart"] if mime == "multipart/form-data" else BODY_COPIES["raw"]


def reservation(request: Request, settings: ServeSettings) -> int:
    """Bytes a request's body may occupy at its peak: its declared size (max_body_bytes when undeclared)
    times its copies; 0 when it is refused unread (declared over max_body_bytes)."""
    declared = declared_length(request)
    copies = body_copies(request.headers.get("content-type", ""))
    if declared is None:  # read in chunks, then joined: two copies of even a raw body
        return settings.max_body_bytes * max(copies, 2)
    return declared * copies if declared <= settings.max_body_bytes else 0


def release_large_buffers(threshold: int = 1024 * 1024) -> bool:
    """Make glibc serve allocations of `threshold` bytes and more by mmap, returned to the system when freed.

    Without it glibc raises its mmap threshold after each large free (up to 32 MiB), so a burst of
    large bodies leaves their memory in the heap and RSS stays at the burst's peak. Setting the
    threshold also turns that adjustment off. Returns False where this is not glibc.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes | bytearray:
    """The request body, refusing (413) anything over `limit` bytes and (408) anything slower than `timeout_s`.

    With a declared length the body is written into one buffer of that size as it arrives (one copy);
    without one, chunks are collected and joined (two copies at the join).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    declared = declared_length(request)
    too_large = RequestRejected(413, "body_too_large", f"request body is larger than max_body_bytes={limit}", CLOSE)
    if declared is not None and declared > limit:
        if declared <= DRAIN_BYTES:  # else: answer at once and close the connection
            await _drain(request, 0, deadline)
        raise too_large
    if declared is not None:
        return await _read_declared(request, declared, deadline, timeout_s)
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


async def _read_declared(request: Request, declared: int, deadline: float, timeout_s: float) -> bytearray:
    """A body of `declared` bytes, read into one preallocated buffer (the server enforces the framing)."""
    buffer = bytearray(declared)
    filled = 0
    with memoryview(buffer) as view:
        while True:
            message = await _receive(request, deadline, timeout_s)
            data = message.get("body", b"")
            if filled + len(data) > declared:
                raise RequestRejected(400, "malformed_body", "the body is longer than its Content-Length", CLOSE)
            view[filled : filled + len(data)] = data
            filled += len(data)
            if not message.get("more_body", False):
                break
    if filled < declared:
        del buffer[filled:]
    return buffer


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
