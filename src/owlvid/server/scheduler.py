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

import numpy as np
import torch
from PIL import Image

from ..engine import Generation
from ..media import MediaTooLargeError

log = logging.getLogger("owlvid.server")


class QueueFullError(Exception):
    """Too many requests are already waiting (HTTP 503)."""


class PendingMediaTooLargeError(MediaTooLargeError):
    """One request's decoded media alone is over the pending-media budget (HTTP 413)."""


class JobCancelled(Exception):
    """The job was cancelled (client gone) before or while it ran."""


class JobTimeout(Exception):
    """The job passed its deadline before or while it ran."""


_ids = itertools.count(1)


def media_nbytes(messages: Any) -> int:
    """Bytes of decoded media (images, video frames) held by a request's messages. Videos that are only
    planned (decoded later, while encoding) or already encoded hold nothing yet."""
    if isinstance(messages, dict):
        return sum(media_nbytes(v) for v in messages.values())
    if isinstance(messages, (list, tuple)):
        return sum(media_nbytes(v) for v in messages)
    if isinstance(messages, np.ndarray):
        return messages.nbytes
    if isinstance(messages, torch.Tensor):
        return messages.element_size() * messages.numel()
    if isinstance(messages, Image.Image):
        width, height = messages.size
        return width * height * len(messages.getbands())
    if isinstance(messages, (bytes, bytearray)):
        return len(messages)
    return 0


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
        self.media_bytes = media_nbytes(messages)  # held while queued: counted against the pending budget

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

    def __init__(self, model: Any, max_queued: int = 64, max_pending_media_bytes: int | None = None) -> None:
        if max_queued < 1:
            raise ValueError("max_queued must be at least 1")
        self.model = model
        self.max_queued = max_queued
        self.max_pending_media_bytes = max_pending_media_bytes  # None: no byte budget
        self._pending_media = 0  # bytes of decoded media held by submitted, not yet started requests
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
        """Queue a job; without a prior `reserve()` this reserves (and may raise QueueFullError). Its
        decoded media count against the pending-media budget: QueueFullError while the budget is taken by
        other waiting requests, PendingMediaTooLargeError when the job alone is over it. On any error
        the slot is not kept when this call took it; a caller's own reservation stays the caller's."""
        if not reserved:
            self.reserve()
        try:
            if not self.alive:
                raise RuntimeError("the scheduler is not running")
            self._hold_media(job)
        except BaseException:
            if not reserved:
                self.release()
            raise
        self._queue.put(job)
        return job

    def _hold_media(self, job: Job) -> None:
        budget = self.max_pending_media_bytes
        if budget is None or job.media_bytes == 0:
            return
        if job.media_bytes > budget:
            raise PendingMediaTooLargeError(
                f"the request's decoded media take {job.media_bytes} bytes, more than this server's budget "
                f"of {budget} bytes for queued media (--max-pending-media-bytes): send fewer or smaller "
                "images/frames")
        with self._lock:
            if self._pending_media + job.media_bytes > budget:
                raise QueueFullError(
                    f"the server is busy: waiting requests already hold {self._pending_media} bytes of decoded "
                    f"media; this one needs {job.media_bytes} more (limit {budget}, "
                    "--max-pending-media-bytes); retry later")
            self._pending_media += job.media_bytes

    def _picked_up(self, job: Job) -> None:
        """A worker took the job off the queue: its slot and its media bytes are free again."""
        with self._lock:
            self._reserved = max(self._reserved - 1, 0)
            if self.max_pending_media_bytes is not None and job.media_bytes:
                self._pending_media = max(self._pending_media - job.media_bytes, 0)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"waiting": self._reserved, "running": int(self._running is not None),
                    "max_queued": self.max_queued, "pending_media_bytes": self._pending_media,
                    "completed": self.completed, "cancelled": self.cancelled, "failed": self.failed}

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
            self._picked_up(job)
            with self._lock:
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
    """Continuous batching: every engine step runs one chunk of a pending prefill, then decodes one token
    for all active requests at once (same tokens as alone).

    Request preparation (prompt rendering, video decoding, vision encoding) runs on a second thread, one
    request ahead of the engine: the vision tower only reads the weights, so it may run beside decoding
    steps. Long prompts are prefilled `prefill_chunk` tokens per step (None: whole prompts at once), so
    a long request arriving delays running streams by about one chunk per token, not its whole prefill.

    Used when the model's runtime supports batched decoding; the admission, cancellation and timeout
    contract is the one of `Scheduler`.
    """

    def __init__(self, model: Any, max_queued: int = 64, max_batch: int = 8, prefill_chunk: int | None = 512,
                 max_pending_media_bytes: int | None = None) -> None:
        super().__init__(model, max_queued, max_pending_media_bytes)
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self._active: dict[Any, Job] = {}  # RequestStream -> Job (prefilling or decoding)
        self._ready: queue.Queue = queue.Queue()  # prepared requests waiting for a batch slot
        self._ahead = threading.Semaphore(1)  # one request prepared ahead of the engine at most
        self._prep_thread: threading.Thread | None = None
        self.peak_batch = 0

    def stats(self) -> dict[str, int]:
        out = super().stats()
        out.update(running=len(self._active), max_batch=self.max_batch, peak_batch=self.peak_batch)
        return out

    # -- lifecycle: a preparation thread feeds the engine thread -----------------------------------

    @property
    def alive(self) -> bool:
        return super().alive and self._prep_thread is not None and self._prep_thread.is_alive()

    def start(self) -> None:
        if self.alive:
            return
        self._prep_thread = threading.Thread(target=self._prepare_loop, name="owlvid-prepare", daemon=True)
        self._prep_thread.start()
        super().start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish the jobs already queued, then stop both threads."""
        if self._thread is None:
            return
        self._queue.put(None)  # the preparation thread passes it on to the engine thread
        if self._prep_thread is not None:
            self._prep_thread.join(timeout)
            self._prep_thread = None
        self._thread.join(timeout)
        self._thread = None

    def _finish(self, job: Job, outcome: str) -> None:
        job.done = True
        with self._lock:
            if outcome == "completed":
                self.completed += 1
            elif outcome == "cancelled":
                self.cancelled += 1
            else:
                self.failed += 1

    def _gone(self, job: Job, where: str) -> bool:
        """Emit the end of a job that was cancelled or passed its deadline; False if it may go on."""
        if job.cancelled:
            job.emit(JobCancelled("the client went away"))
            self._finish(job, "cancelled")
            return True
        if job.expired():
            job.emit(JobTimeout(f"the request timed out while {where}"))
            self._finish(job, "failed")
            return True
        return False

    def _prepare_loop(self) -> None:
        from ..api import split_options

        runtime = self.model.runtime
        while True:
            self._ahead.acquire()  # released when the engine takes the prepared request
            job = self._queue.get()
            if job is None:
                self._ready.put(None)
                return
            # A prepared request still waits for the engine: its queue slot and media bytes stay taken
            # until the engine admits it (`_admit`).
            if self._gone(job, "waiting in the queue"):
                self._picked_up(job)
                self._ahead.release()
                continue
            try:
                prep, params = split_options(dict(job.options))
                request, prompt_ids = self.model.prepare(job.messages, **prep)
                if self.prefill_chunk and runtime.supports_chunked_prefill:
                    request = runtime.encode_media(request)  # the vision tower, beside decoding steps
            except Exception as e:  # bad input of this request only
                log.debug("request %d failed in preparation: %r", job.id, e)
                self._picked_up(job)
                job.emit(e)
                self._finish(job, "failed")
                self._ahead.release()
                continue
            self._ready.put((job, request, prompt_ids, params))

    # -- engine thread -----------------------------------------------------------------------------

    def _admit(self, item: tuple, engine: Any) -> None:
        job, request, prompt_ids, params = item
        self._picked_up(job)
        if self._gone(job, "waiting in the queue"):
            return
        try:
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

        def new_engine() -> BatchEngine:
            return BatchEngine(self.model.runtime, self.max_batch, self.prefill_chunk)

        engine = new_engine()
        stopping = False
        while True:
            # Admit prepared requests: block only when nothing is prefilling or decoding.
            while engine.active < self.max_batch and not stopping:
                try:
                    item = self._ready.get(block=not self._active)
                except queue.Empty:
                    break
                self._ahead.release()
                if item is None:
                    stopping = True
                    break
                self._admit(item, engine)
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
                engine = new_engine()
                continue
            for stream, events in results:
                job = self._active.get(stream)
                if job is None:
                    continue
                for event in events:
                    job.emit(event)
                if stream.done:
                    job.emit(stream.result())
                    del self._active[stream]
                    self._finish(job, "completed")
            for stream, job in list(self._active.items()):
                if job.cancelled or job.expired():
                    engine.remove(stream)
                    del self._active[stream]
                    self._gone(job, "generating")
