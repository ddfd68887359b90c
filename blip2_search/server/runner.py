"""How the server runs library calls: model calls one at a time, everything else in worker threads.

One model serves every request, so model calls (search, similar, rerank) take turns; they wait for
their turn in the event loop, never in a worker thread, so the pool stays free for thumbnails,
originals and status however many queries queue. Decodes (thumbnails, and uploads before their
request's model turn) share a pixel budget the same way: a PNG or TIFF is decoded in full (a 48 MP one
holds about 200 MB), and a page asks for 24 thumbnails at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from contextlib import asynccontextmanager
from typing import AsyncIterator
from urllib.parse import quote

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from . import limits
from .limits import ApiError


class Runner:
    """Runs library calls in worker threads; model calls one at a time (one model, one lock).

    A model call waits for its turn in the event loop, not in a worker thread: however many queries
    queue, the pool stays free for thumbnails, originals and status. At most MAX_QUEUED_MODEL_CALLS
    wait (more get a 503), a call whose client went away while it waited is not run, and once `stop`
    is called (the server is shutting down) no call that has not started runs."""

    def __init__(self):
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._decodes: PixelBudget | None = None
        self._waiting = 0
        self._stopping = False

    def _for_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # asyncio locks and futures belong to one loop (an app may be served by several in turn)
            self._loop, self._lock, self._decodes = loop, asyncio.Lock(), PixelBudget(limits.MAX_DECODE_PIXELS)
            self._stopping = False

    def stop(self) -> None:
        """The server is shutting down (call it in its event loop): the model call running finishes, but those
        queued and those still to come answer 503 instead of running; shutdown waits for every open request,
        and 5 queued reranks kept a stopped server up for 38 s."""
        self._for_loop()
        self._stopping = True

    def _refuse_if_stopping(self, request: Request) -> None:
        if self._stopping:
            raise ApiError(503, f"{request.method} {request.url.path}: the server is shutting down, so the query was not run; "
                                "send it again once the server is back", headers={"retry-after": "5"})

    def _model_lock(self) -> asyncio.Lock:
        self._for_loop()
        return self._lock

    def admit(self, request: Request) -> None:
        """A 503 unless a model call of `request` would be queued now: what a request checks before the work it
        does ahead of its turn (decoding uploads), so an overloaded or stopping server does none of it."""
        lock = self._model_lock()
        self._refuse_if_stopping(request)
        if lock.locked() and self._waiting >= limits.MAX_QUEUED_MODEL_CALLS:
            raise ApiError(503, f"{self._waiting} queries are already waiting for the model, the most this server queues; "
                                f"retry in a few seconds, or send fewer queries at once", headers={"retry-after": "5"})

    async def model(self, request: Request, fn, *args, **kwargs):
        self.admit(request)
        lock = self._model_lock()
        self._waiting += 1
        try:
            await lock.acquire()  # FIFO
        finally:
            self._waiting -= 1
        try:
            self._refuse_if_stopping(request)
            if await request.is_disconnected():  # e.g. the page aborted it for a newer search
                _log_unsent(request, 499)
                raise ApiError(499, f"{request.method} {request.url.path}: the client closed the connection while the query "
                                    "waited for the model; it was not run")
            return await run_in_threadpool(fn, *args, **kwargs)  # the lock is held until the thread returns, also on cancel
        finally:
            lock.release()

    async def io(self, fn, *args, **kwargs):
        return await run_in_threadpool(fn, *args, **kwargs)

    async def decode(self, pixels: int, fn, *args, **kwargs):
        """`fn` in a worker thread once `pixels` of the decode budget (MAX_DECODE_PIXELS, all requests
        together) are free; it waits for them in the event loop, and holds them until the thread returns."""
        self._for_loop()
        async with self._decodes.reserve(pixels):
            return await run_in_threadpool(fn, *args, **kwargs)  # not abandoned on cancel: the pixels stay held meanwhile


_ACCESS_LOG = logging.getLogger("uvicorn.access")


def _log_unsent(request: Request, status: int) -> None:
    """An access-log line, as uvicorn writes it, for an answer uvicorn will not log: it drops what is sent
    once the client is gone, log line included."""
    scope = request.scope
    client = scope.get("client")
    target = quote(scope["path"]) + (f"?{scope['query_string'].decode('ascii', 'replace')}" if scope.get("query_string") else "")
    _ACCESS_LOG.info('%s - "%s %s HTTP/%s" %d', "%s:%d" % tuple(client) if client else "", scope["method"], target,
                     scope.get("http_version", "1.1"), status)


class PixelBudget:
    """At most `total` pixels reserved at once, granted in arrival order (a large request is not passed over
    for ever by small ones); a request for more than `total` waits until nothing else is reserved, then
    runs alone. For one event loop."""

    def __init__(self, total: int):
        self.total = total
        self.used = 0
        self._waiting: deque[tuple[int, asyncio.Future]] = deque()

    @asynccontextmanager
    async def reserve(self, pixels: int) -> AsyncIterator[None]:
        n = min(max(pixels, 0), self.total)
        if self._waiting or self.used + n > self.total:
            entry = (n, asyncio.get_running_loop().create_future())
            self._waiting.append(entry)
            try:
                await entry[1]
            except BaseException:
                if entry[1].done() and not entry[1].cancelled():  # granted just as the request was cancelled
                    self._release(n)
                else:
                    if entry in self._waiting:  # else `_grant` passed it over, already cancelled
                        self._waiting.remove(entry)
                    self._grant()  # those behind it may fit now
                raise
        else:
            self.used += n
        try:
            yield
        finally:
            self._release(n)

    def _release(self, n: int) -> None:
        self.used -= n
        self._grant()

    def _grant(self) -> None:
        while self._waiting and (self._waiting[0][1].done() or self.used + self._waiting[0][0] <= self.total):
            n, granted = self._waiting.popleft()
            if granted.done():  # cancelled while it waited (before its task ran again to leave the line): nothing to grant
                continue
            self.used += n
            granted.set_result(None)


__all__ = ["PixelBudget", "Runner"]
