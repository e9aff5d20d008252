"""The engine worker: one thread runs every request, one at a time, from a bounded queue.

A `Model` is not thread-safe, so exactly one thread ever calls into it. Requests are admitted with
`reserve()` (which refuses with `QueueFullError` when `max_queued` requests are already waiting), prepared
outside the worker (media download and decoding), then `submit()`ted; an admitted request is never
dropped: it runs, or is skipped only when its client is gone or its deadline has passed.

Events of a job (`TokenEvent`s, then the final `Generation`, or an exception) are handed to the event
loop that owns the job with `call_soon_threadsafe`. `Job.cancel()` (client disconnected) stops the
generation at the next token. A batching scheduler can replace this class as long as it keeps
`reserve / release / submit / stats / alive / start / stop` and the `Job` contract.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from typing import Any

from ..engine import Generation

log = logging.getLogger("owlvid.server")


class QueueFullError(Exception):
    """Too many requests are already waiting (HTTP 503)."""


class JobCancelled(Exception):
    """The job was cancelled (client gone) before or while it ran."""


class JobTimeout(Exception):
    """The job passed its deadline before or while it ran."""


_ids = itertools.count(1)


class Job:
    """One generation request: `model.iter_generate(messages, **options)` run by the worker.

    The consumer awaits `next_event()`; it gets TokenEvents, then a Generation, or an exception
    instance (raised by the model, `JobCancelled` or `JobTimeout`) as the last event.
    """

    def __init__(self, messages: list[dict], options: dict[str, Any], *,
                 loop: asyncio.AbstractEventLoop | None = None, timeout: float | None = None) -> None:
        self.id = next(_ids)
        self.messages = messages
        self.options = options
        self.loop = loop or asyncio.get_running_loop()
        self.deadline = time.monotonic() + timeout if timeout else None
        self._events: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()
        self.done = False
        self.client_checked_at = time.monotonic()  # consumer bookkeeping: last check that the client is there

    # -- consumer side (event loop) ----------------------------------------------------------------

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    async def next_event(self, timeout: float | None = None) -> Any:
        if timeout is None:
            return await self._events.get()
        return await asyncio.wait_for(self._events.get(), timeout)

    # -- worker side -------------------------------------------------------------------------------

    def emit(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self._cancelled.set()

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


class Scheduler:
    """A bounded FIFO in front of a single engine worker thread."""

    def __init__(self, model: Any, max_queued: int = 64) -> None:
        if max_queued < 1:
            raise ValueError("max_queued must be at least 1")
        self.model = model
        self.max_queued = max_queued
        self._queue: queue.Queue[Job | None] = queue.Queue()  # bounded by the reservation count
        self._lock = threading.Lock()
        self._reserved = 0  # admitted, not yet picked up by the worker
        self._running: Job | None = None
        self._thread: threading.Thread | None = None
        self.completed = 0
        self.cancelled = 0
        self.failed = 0

    # -- admission ---------------------------------------------------------------------------------

    def reserve(self) -> None:
        """Take a queue slot or raise QueueFullError; pair with `submit(job)` or `release()`."""
        with self._lock:
            if self._reserved >= self.max_queued:
                raise QueueFullError(f"the server is busy: {self._reserved} request(s) already waiting "
                                     f"(limit {self.max_queued}); retry later")
            self._reserved += 1

    def release(self) -> None:
        """Give back a slot taken by `reserve()` whose request will not be submitted."""
        with self._lock:
            self._reserved = max(self._reserved - 1, 0)

    def submit(self, job: Job, *, reserved: bool = False) -> Job:
        """Queue a job; without a prior `reserve()` this reserves (and may raise QueueFullError)."""
        if not reserved:
            self.reserve()
        if not self.alive:
            self.release()
            raise RuntimeError("the scheduler is not running")
        self._queue.put(job)
        return job

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"waiting": self._reserved, "running": int(self._running is not None),
                    "max_queued": self.max_queued, "completed": self.completed, "cancelled": self.cancelled,
                    "failed": self.failed}

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """Whether the worker thread is running (False before start() and after stop())."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.alive:
            return
        self._thread = threading.Thread(target=self._work, name="owlvid-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish the jobs already queued, then stop the worker."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None

    # -- worker ------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._reserved = max(self._reserved - 1, 0)
                self._running = job
            outcome = "completed"
            try:
                outcome = self._run(job)
            except Exception as e:  # never let one request kill the worker
                outcome = "failed"
                log.debug("request %d failed: %r", job.id, e)
                job.emit(e)
            finally:
                job.done = True
                with self._lock:
                    self._running = None
                    if outcome == "completed":
                        self.completed += 1
                    elif outcome == "cancelled":
                        self.cancelled += 1
                    else:
                        self.failed += 1

    def _run(self, job: Job) -> str:
        if job.cancelled:
            job.emit(JobCancelled("the client went away"))
            return "cancelled"
        if job.expired():
            job.emit(JobTimeout("the request timed out while waiting in the queue"))
            return "failed"
        events = iter(self.model.iter_generate(job.messages, **job.options))
        try:
            for event in events:
                job.emit(event)
                if isinstance(event, Generation):
                    return "completed"
                if job.cancelled:
                    job.emit(JobCancelled("the client went away"))
                    return "cancelled"
                if job.expired():
                    job.emit(JobTimeout("the request timed out while generating"))
                    return "failed"
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()
        raise RuntimeError("the generation ended without a result")


class BatchingScheduler(Scheduler):
    """Continuous batching: new requests are prefilled between decoding steps and join the running
    batch; every step decodes one token for all active requests at once (same tokens as alone).

    Used when the model's runtime supports batched decoding; the admission, cancellation and timeout
    contract is the one of `Scheduler`.
    """

    def __init__(self, model: Any, max_queued: int = 64, max_batch: int = 8) -> None:
        super().__init__(model, max_queued)
        self.max_batch = max_batch
        self._active: dict[Any, Job] = {}  # RequestStream -> Job
        self.peak_batch = 0

    def stats(self) -> dict[str, int]:
        out = super().stats()
        out.update(running=len(self._active), max_batch=self.max_batch, peak_batch=self.peak_batch)
        return out

    def _finish(self, job: Job, outcome: str) -> None:
        job.done = True
        with self._lock:
            if outcome == "completed":
                self.completed += 1
            elif outcome == "cancelled":
                self.cancelled += 1
            else:
                self.failed += 1

    def _admit(self, job: Job, engine: Any) -> None:
        from ..api import _split_kwargs

        with self._lock:
            self._reserved = max(self._reserved - 1, 0)
        if job.cancelled:
            job.emit(JobCancelled("the client went away"))
            return self._finish(job, "cancelled")
        if job.expired():
            job.emit(JobTimeout("the request timed out while waiting in the queue"))
            return self._finish(job, "failed")
        try:
            prep, params = _split_kwargs(dict(job.options))
            request, prompt_ids = self.model.prepare(job.messages, **prep)
            stream, events = engine.add(request, prompt_ids, params)
        except Exception as e:  # bad input of this request only
            job.emit(e)
            return self._finish(job, "failed")
        for event in events:
            job.emit(event)
        if stream.done:
            job.emit(stream.result())
            return self._finish(job, "completed")
        self._active[stream] = job

    def _work(self) -> None:
        from ..engine import BatchEngine

        engine = BatchEngine(self.model.runtime, self.max_batch)
        stopping = False
        while True:
            # Admit waiting requests: block only when nothing is decoding.
            while len(self._active) < self.max_batch:
                try:
                    job = self._queue.get(block=not self._active and not stopping)
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    continue
                self._admit(job, engine)
            if not self._active:
                if stopping:
                    return
                continue
            self.peak_batch = max(self.peak_batch, len(self._active))
            try:
                results = engine.step()
            except Exception as e:  # a real bug: fail the batch, keep serving
                log.exception("batched decoding step failed")
                for job in list(self._active.values()):
                    job.emit(e)
                    self._finish(job, "failed")
                self._active.clear()
                engine = BatchEngine(self.model.runtime, self.max_batch)
                continue
            for stream, events in results:
                job = self._active[stream]
                for event in events:
                    job.emit(event)
                if stream.done:
                    job.emit(stream.result())
                    del self._active[stream]
                    self._finish(job, "completed")
                elif job.cancelled or job.expired():
                    engine.remove(stream)
                    del self._active[stream]
                    job.emit(JobCancelled("the client went away") if job.cancelled
                             else JobTimeout("the request timed out while generating"))
                    self._finish(job, "cancelled" if job.cancelled else "failed")
