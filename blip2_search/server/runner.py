"""How the server runs library calls: model calls one at a time, everything else in worker threads.

One model serves every request, so model calls (search, similar, rerank) take turns; they wait for
their turn in the event loop, never in a worker thread, so the pool stays free for thumbnails,
originals and status however many queries queue.
"""

from __future__ import annotations

import asyncio

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from . import limits
from .limits import ApiError


class Runner:
    """Runs library calls in worker threads; model calls one at a time (one model, one lock).

    A model call waits for its turn in the event loop, not in a worker thread: however many queries
    queue, the pool stays free for thumbnails, originals and status. At most MAX_QUEUED_MODEL_CALLS
    wait (more get a 503), and a call whose client went away while it waited is not run."""

    def __init__(self):
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._waiting = 0

    def _model_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # an asyncio lock belongs to one loop (an app may be served by several in turn)
            self._loop, self._lock = loop, asyncio.Lock()
        return self._lock

    async def model(self, request: Request, fn, *args, **kwargs):
        lock = self._model_lock()
        if lock.locked() and self._waiting >= limits.MAX_QUEUED_MODEL_CALLS:
            raise ApiError(503, f"{self._waiting} queries are already waiting for the model, the most this server queues; "
                                f"retry in a few seconds, or send fewer queries at once", headers={"retry-after": "5"})
        self._waiting += 1
        try:
            await lock.acquire()  # FIFO
        finally:
            self._waiting -= 1
        try:
            if await request.is_disconnected():  # e.g. the page aborted it for a newer search
                raise ApiError(499, f"{request.method} {request.url.path}: the client closed the connection while the query "
                                    "waited for the model; it was not run")
            return await run_in_threadpool(fn, *args, **kwargs)  # the lock is held until the thread returns, also on cancel
        finally:
            lock.release()

    async def io(self, fn, *args, **kwargs):
        return await run_in_threadpool(fn, *args, **kwargs)


__all__ = ["Runner"]
