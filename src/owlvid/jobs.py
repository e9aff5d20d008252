"""Many independent conversations through one model: the engine under batch jobs, evaluation and Ray.

`generate_each(model, items)` takes `(key, job)` pairs and yields `(key, Generation | Exception)` as each
one completes. A job is either `(messages, options)` or a zero-argument function returning that pair; a
function is called only when its job is prepared, so media is loaded just in time and a failure in it (a
missing or corrupt video, a bad option, media over `media_timeout`) becomes that job's exception while the
others go on.

Jobs decode together through the one engine (`engine.Engine`: continuous batching, long prompts prefilled
in chunks between decoding steps, the prefix cache of follow-up questions). With `prefetch`, the next jobs
are prepared on a background thread while the engine works: their media decoded and vision-encoded, as
the server's preparation thread does. At most `prefetch` prepared jobs wait for the engine (plus the one
being prepared), so a job of 10,000 videos never holds more than a few in memory. Results are token for
token those of `model.generate` alone. Callers that want the visual cache to decode and encode a shared
video once put the jobs about it next to each other (see `batch.job_order`): preparation is sequential,
so the second job finds the first one's encoding in the cache.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any

from .engine import EMPTY, Engine, Generation, Ticket
from .metrics import EngineMetrics

Job = tuple[list[dict], dict] | Callable[[], tuple[list[dict], dict]]


def _tickets(model: Any, items: Iterable[tuple[Hashable, Job]], media_timeout: float | None,
             encode_ahead: bool) -> Iterator[Ticket]:
    for key, job in items:
        try:
            messages, options = job() if callable(job) else job
            yield model.ticket(messages, options, key=key, encode_ahead=encode_ahead, media_timeout=media_timeout,
                               timed=True)
        except Exception as e:  # this job's input only
            yield Ticket(key=key, error=e)


def generate_each(model: Any, items: Iterable[tuple[Hashable, Job]], *, max_batch: int = 8, prefetch: int = 2,
                  media_timeout: float | None = None, encode_ahead: bool | None = None,
                  prefill_chunk: int | None = 512, metrics: EngineMetrics | None = None
                  ) -> Iterator[tuple[Hashable, Generation | Exception]]:
    """(key, Generation) for each job in completion order, or (key, the exception) for a job that failed.

    `model` is an `owlvid.Model`; options are those of `Model.generate` (max_new_tokens, temperature,
    seed, stop, max_frames, media_timeout, ...). Greedy results are token for token those of
    `model.generate` alone. `prefetch`: jobs prepared ahead on a background thread (0: each job is prepared
    when a batch slot frees, on the caller's thread). `media_timeout`: seconds each image or video of a job
    may take to load and decode (a job's own `media_timeout` option wins); past it the job fails with
    `errors.MediaTimeout` and the engine goes on. `encode_ahead`: run the vision tower in the preparation
    thread too (default: when prefetching). `prefill_chunk`: prompt tokens prefilled per engine step (None:
    whole prompts). `metrics`: counts the requests, tokens and latencies (a run record's summary). Each
    Generation's timings add `prepare_s` and `queue_s`; its `media` is the audit of what the model saw."""
    if max_batch < 1:
        raise ValueError("max_batch must be at least 1")
    if prefetch < 0:
        raise ValueError("prefetch must be >= 0")
    ahead = bool(prefetch) if encode_ahead is None else encode_ahead
    tickets = _tickets(model, items, media_timeout, ahead)
    if prefetch:
        from .pipeline import Prefetcher

        prefetcher = Prefetcher(tickets, depth=prefetch)

        def feed(block: bool) -> Any:
            item = prefetcher.next(block=block)
            return EMPTY if item is Prefetcher.EMPTY else None if item is Prefetcher.END else item
    else:
        prefetcher = None

        def feed(block: bool) -> Any:
            return next(tickets, None)

    try:
        for ticket, event in Engine(model.runtime, max_batch, prefill_chunk, metrics).run(feed):
            if isinstance(event, (Generation, BaseException)):
                yield ticket.key, event
    finally:
        if prefetcher is not None:
            prefetcher.close()
