"""Many independent conversations through one model: the engine under batch jobs, evaluation and Ray.

`generate_each(model, items)` takes `(key, job)` pairs and yields `(key, Generation | Exception)` as each
one completes. A job is either `(messages, options)` or a zero-argument function returning that pair; a
function is called only when its job is prepared, so media is loaded just in time and a failure in it (a
missing or corrupt video, a bad option, media over `media_timeout`) becomes that job's exception while the
others go on.

Jobs decode together (continuous batching, `engine.BatchEngine`) where the model supports it, one by one
otherwise. With `prefetch`, the next jobs are prepared on a background thread while the engine works:
their media decoded and, for runtimes that can encode ahead (`supports_chunked_prefill`), vision-encoded,
as the server's preparation thread does. At most `prefetch` prepared jobs wait for the engine (plus the one
being prepared), so a job of 10,000 videos never holds more than a few in memory. Results are token for
token those of `model.generate` alone. Callers that want the visual cache to decode and encode a shared
video once put the jobs about it next to each other (see `batch.job_order`): preparation is sequential,
so the second job finds the first one's encoding in the cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .engine import BatchEngine, Generation, SamplingParams, run_generation

Job = tuple[list[dict], dict] | Callable[[], tuple[list[dict], dict]]


@dataclass
class _Prepared:
    """A job ready for the engine: model inputs, prompt ids, sampling, and when it became ready."""

    request: Any
    prompt_ids: list[int]
    params: SamplingParams
    prepare_s: float
    ready_at: float


def _prepare(model: Any, job: Job, media_timeout: float | None, encode_ahead: bool) -> _Prepared:
    from .api import split_options

    t0 = time.perf_counter()
    messages, options = job() if callable(job) else job
    options = dict(options)
    if media_timeout is not None:
        options.setdefault("media_timeout", media_timeout)
    prep, params = split_options(options)
    request, prompt_ids = model.prepare(messages, **prep)
    if encode_ahead:
        request = model.runtime.encode_media(request)  # the vision tower, beside the engine's steps
    now = time.perf_counter()
    return _Prepared(request, prompt_ids, params, now - t0, now)


def _prepared_jobs(model: Any, items: Iterable[tuple[Hashable, Job]], media_timeout: float | None,
                   encode_ahead: bool) -> Iterator[tuple[Hashable, _Prepared | Exception]]:
    for key, job in items:
        try:
            yield key, _prepare(model, job, media_timeout, encode_ahead)
        except Exception as e:  # this job's input only
            yield key, e


def _booked(result: Generation, prepared: _Prepared, admitted_at: float) -> Generation:
    result.timings["prepare_s"] = prepared.prepare_s
    result.timings["queue_s"] = max(admitted_at - prepared.ready_at, 0.0)
    return result


def generate_each(model: Any, items: Iterable[tuple[Hashable, Job]], *, max_batch: int = 8, prefetch: int = 2,
                  media_timeout: float | None = None, encode_ahead: bool | None = None
                  ) -> Iterator[tuple[Hashable, Generation | Exception]]:
    """(key, Generation) for each job in completion order, or (key, the exception) for a job that failed.

    `model` is an `owlvid.Model`; options are those of `Model.generate` (max_new_tokens, temperature,
    seed, stop, max_frames, media_timeout, ...). Greedy results are token for token those of
    `model.generate` alone. `prefetch`: jobs prepared ahead on a background thread (0: each job is prepared
    when a batch slot frees, on the caller's thread). `media_timeout`: seconds each image or video of a job
    may take to load and decode (a job's own `media_timeout` option wins); past it the job fails with
    `errors.MediaTimeout` and the engine goes on. `encode_ahead`: run the vision tower in the preparation
    thread too (default: when prefetching and the runtime supports it). Each Generation's timings add
    `prepare_s` and `queue_s`; its `media` is the audit of what the model saw."""
    if max_batch < 1:
        raise ValueError("max_batch must be at least 1")
    if prefetch < 0:
        raise ValueError("prefetch must be >= 0")
    runtime = model.runtime
    ahead = bool(prefetch) and runtime.supports_chunked_prefill if encode_ahead is None else encode_ahead
    prepared = _prepared_jobs(model, items, media_timeout, ahead)
    feed = None
    if prefetch:
        from .pipeline import Prefetcher

        feed = Prefetcher(prepared, depth=prefetch)

    def take(block: bool) -> Any:
        """The next (key, prepared or exception); None at the end; Prefetcher.EMPTY when not ready."""
        if feed is None:
            return next(prepared, None)
        item = feed.next(block=block)
        return None if item is feed.END else item

    try:
        if runtime.supports_batching:
            yield from _batched(runtime, take, max_batch, feed is not None)
        else:
            yield from _one_by_one(runtime, take)
    finally:
        if feed is not None:
            feed.close()


def _one_by_one(runtime: Any, take: Callable[[bool], Any]) -> Iterator[tuple[Hashable, Generation | Exception]]:
    while (item := take(True)) is not None:
        key, job = item
        if isinstance(job, Exception):
            yield key, job
            continue
        admitted = time.perf_counter()
        try:
            *_, result = run_generation(runtime, job.request, job.prompt_ids, job.params)  # last event: Generation
        except Exception as e:  # this job's input or run only
            yield key, e
            continue
        yield key, _booked(result, job, admitted)


def _batched(runtime: Any, take: Callable[[bool], Any], max_batch: int, prefetching: bool
             ) -> Iterator[tuple[Hashable, Generation | Exception]]:
    from .pipeline import Prefetcher

    engine = BatchEngine(runtime, max_batch)
    active: dict[Any, tuple[Hashable, _Prepared, float]] = {}  # RequestStream -> (key, job, admitted at)
    exhausted = False
    while not exhausted or active:
        # continuous batching: a freed slot takes the next prepared job at once; while others decode, a job
        # still being prepared is not waited for
        while not exhausted and engine.active < max_batch:
            item = take(not active or not prefetching)
            if item is Prefetcher.EMPTY:
                break
            if item is None:
                exhausted = True
                break
            key, job = item
            if isinstance(job, Exception):
                yield key, job
                continue
            admitted = time.perf_counter()
            try:
                stream, _ = engine.add(job.request, job.prompt_ids, job.params)
            except Exception as e:
                yield key, e
                continue
            if stream.done:
                yield key, _booked(stream.result(), job, admitted)
            else:
                active[stream] = (key, job, admitted)
        if not active:
            continue
        try:
            results = engine.step()
        except Exception as e:  # a bug: fail the running jobs, go on with a fresh engine
            for key, _, _ in active.values():
                yield key, e
            active.clear()
            engine = BatchEngine(runtime, max_batch)
            continue
        for stream, _ in results:
            if stream.done and stream in active:
                key, job, admitted = active.pop(stream)
                yield key, _booked(stream.result(), job, admitted)
