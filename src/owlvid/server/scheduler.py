"""The server's admission in front of the one engine: a bounded queue, a preparation thread, an engine thread.

A `Model` is not thread-safe, so exactly one thread ever runs the engine (`engine.Engine.run`: chunked
prefill, continuous batching, per-request failure isolation). Requests are admitted with `reserve()` (which
refuses with `QueueFullError` when `max_queued` requests are already waiting), prepared on a second thread
one request ahead of the engine (media download and decoding, prompt rendering, the vision tower: it only
reads the weights, so it may run beside decoding steps), then decoded. An admitted request is never
dropped: it runs, or is skipped only when its client is gone or its deadline has passed.

Events of a job (`TokenEvent`s, then the final `Generation`, or an exception) are handed to the event
loop that owns the job with `call_soon_threadsafe`. `Job.cancel()` (client disconnected) makes it leave
the batch before the next step.
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

from ..engine import EMPTY, Engine, Generation, RequestCancelled, RequestTimeout, Ticket
from ..media import MediaTooLargeError
from ..metrics import EngineMetrics
from ..requests.errors import QueueFullError

log = logging.getLogger("owlvid.server")


class PendingMediaTooLargeError(MediaTooLargeError):
    """One request's decoded media alone is over the pending-media budget (HTTP 413)."""


JobCancelled = RequestCancelled  # the job was cancelled (client gone) before or while it ran
JobTimeout = RequestTimeout  # the job passed its deadline before or while it ran


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


def watched(ticket: Ticket, job: Job) -> Ticket:
    """`ticket` ends with its job: when the client goes away or the job's deadline passes."""
    ticket.owner, ticket.deadline = job, job.deadline
    ticket.cancelled = lambda: job.cancelled
    return ticket


class Scheduler:
    """A bounded FIFO, a preparation thread and the engine thread (see the module docstring)."""

    def __init__(self, model: Any, max_queued: int = 64, max_batch: int = 8, prefill_chunk: int | None = 512,
                 max_pending_media_bytes: int | None = None) -> None:
        if max_queued < 1:
            raise ValueError("max_queued must be at least 1")
        self.model = model
        self.max_queued = max_queued
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.max_pending_media_bytes = max_pending_media_bytes  # None: no byte budget
        self._pending_media = 0  # bytes of decoded media held by submitted, not yet admitted requests
        self._queue: queue.Queue[Job | None] = queue.Queue()  # bounded by the reservation count
        self._ready: queue.Queue[Ticket | None] = queue.Queue()  # prepared, waiting for a batch slot
        self._ahead = threading.Semaphore(1)  # one request prepared ahead of the engine at most
        self._lock = threading.Lock()
        self._reserved = 0  # admitted, not yet taken by the engine
        self._running = 0
        self._thread: threading.Thread | None = None
        self._prep_thread: threading.Thread | None = None
        self.engine: Engine | None = None
        self.metrics = EngineMetrics()  # kept across engines (`GET /metrics`)
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
            self.metrics.waiting = self._reserved

    def release(self) -> None:
        """Give back a slot taken by `reserve()` whose request will not be submitted."""
        with self._lock:
            self._reserved = max(self._reserved - 1, 0)
            self.metrics.waiting = self._reserved

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
        """The engine took the job (or it ended before): its slot and its media bytes are free again."""
        with self._lock:
            self._reserved = max(self._reserved - 1, 0)
            self.metrics.waiting = self._reserved
            if self.max_pending_media_bytes is not None and job.media_bytes:
                self._pending_media = max(self._pending_media - job.media_bytes, 0)

    def stats(self) -> dict[str, int]:
        engine = self.engine
        with self._lock:
            return {"waiting": self._reserved, "running": self._running, "max_queued": self.max_queued,
                    "pending_media_bytes": self._pending_media, "completed": self.completed,
                    "cancelled": self.cancelled, "failed": self.failed, "max_batch": self.max_batch,
                    "peak_batch": engine.peak_batch if engine is not None else 0}

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """Whether both threads run (False before start() and after stop())."""
        return all(t is not None and t.is_alive() for t in (self._thread, self._prep_thread))

    def start(self) -> None:
        if self.alive:
            return
        self._prep_thread = threading.Thread(target=self._prepare_loop, name="owlvid-prepare", daemon=True)
        self._thread = threading.Thread(target=self._engine_loop, name="owlvid-engine", daemon=True)
        self._prep_thread.start()
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish the jobs already queued, then stop both threads."""
        if self._thread is None:
            return
        self._queue.put(None)  # the preparation thread passes it on to the engine thread
        for thread in (self._prep_thread, self._thread):
            if thread is not None:
                thread.join(timeout)
        self._thread = self._prep_thread = None

    def _finish(self, job: Job, event: Any) -> None:
        job.emit(event)
        job.done = True
        with self._lock:
            if isinstance(event, Generation):
                self.completed += 1
            elif isinstance(event, RequestCancelled):
                self.cancelled += 1
            else:
                self.failed += 1

    # -- preparation thread ------------------------------------------------------------------------

    def _prepare_loop(self) -> None:
        encode_ahead = bool(self.prefill_chunk)  # the vision tower here, beside the decoding steps
        while True:
            self._ahead.acquire()  # released when the engine takes the prepared request
            job = self._queue.get()
            if job is None:
                self._ready.put(None)
                return
            # A prepared request still waits for the engine: its queue slot and media bytes stay taken
            # until the engine takes it.
            ended = watched(Ticket(), job).gone()
            if ended is not None:
                self._picked_up(job)
                self._finish(job, ended)
                self._ahead.release()
                continue
            try:
                ticket = self.model.ticket(job.messages, job.options, key=job.id, encode_ahead=encode_ahead,
                                           timed=True)
            except Exception as e:  # bad input of this request only
                log.debug("request %d failed in preparation: %r", job.id, e)
                ticket = Ticket(key=job.id, error=e)
            self._ready.put(watched(ticket, job))

    # -- engine thread -----------------------------------------------------------------------------

    def _feed(self, block: bool) -> Any:
        try:
            ticket = self._ready.get(block=block)
        except queue.Empty:
            return EMPTY
        self._ahead.release()
        if ticket is not None:
            self._picked_up(ticket.owner)
            with self._lock:
                self._running += 1
        return ticket

    def _engine_loop(self) -> None:
        while True:
            self.engine = engine = Engine(self.model.runtime, self.max_batch, self.prefill_chunk, self.metrics)
            try:
                for ticket, event in engine.run(self._feed):
                    if isinstance(event, BaseException) and not isinstance(event, (RequestCancelled, RequestTimeout)):
                        log.debug("request %d failed: %r", ticket.owner.id, event)
                    if isinstance(event, (Generation, BaseException)):
                        with self._lock:
                            self._running -= 1
                        self._finish(ticket.owner, event)
                    else:
                        ticket.owner.emit(event)
                return  # the feed ended: stop() was called
            except Exception as e:  # a bug in the engine itself: fail what it held, keep serving
                log.exception("the engine failed")
                held = [t for t in engine.decoding] + [t for t, _ in engine.prefilling + engine.joining]
                for ticket in held:
                    with self._lock:
                        self._running -= 1
                    self._finish(ticket.owner, e)
