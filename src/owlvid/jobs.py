"""Many independent conversations through one model: the engine under batch jobs, evaluation and Ray.

`generate_each(model, items)` takes `(key, job)` pairs and yields `(key, Generation | Exception)` as each
one completes. A job is either `(messages, options)` or a zero-argument function returning that pair; a
function is called only when its job is admitted, so media is loaded just in time and a failure in it (a
missing or corrupt video, a bad option) becomes that job's exception while the others go on.

Jobs decode together (continuous batching, `engine.BatchEngine`) where the model supports it, one by one
otherwise. Callers that want the visual cache to decode and encode a shared video once put the jobs about
it next to each other (see `batch.job_order`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any

from .engine import BatchEngine, Generation, run_generation

Job = tuple[list[dict], dict] | Callable[[], tuple[list[dict], dict]]


def _prepared(model: Any, job: Job) -> tuple[Any, list[int], Any]:
    from .api import split_options

    messages, options = job() if callable(job) else job
    prep, params = split_options(dict(options))
    request, prompt_ids = model.prepare(messages, **prep)
    return request, prompt_ids, params


def generate_each(model: Any, items: Iterable[tuple[Hashable, Job]], *, max_batch: int = 8
                  ) -> Iterator[tuple[Hashable, Generation | Exception]]:
    """(key, Generation) for each job in completion order, or (key, the exception) for a job that failed.

    `model` is an `owlvid.Model`; options are those of `Model.generate` (max_new_tokens, temperature,
    seed, stop, max_frames, ...). Greedy results are token for token those of `model.generate` alone."""
    if max_batch < 1:
        raise ValueError("max_batch must be at least 1")
    runtime = model.runtime
    pending = iter(items)
    if not runtime.supports_batching:  # one by one
        for key, job in pending:
            try:
                *_, result = run_generation(runtime, *_prepared(model, job))  # the last event: Generation
            except Exception as e:  # this job's input or run only
                yield key, e
                continue
            yield key, result
        return

    engine = BatchEngine(runtime, max_batch)
    active: dict[Any, Hashable] = {}  # RequestStream -> key
    exhausted = False
    while not exhausted or active:
        # continuous batching: a freed slot takes the next job at once
        while not exhausted and engine.active < max_batch:
            item = next(pending, None)
            if item is None:
                exhausted = True
                break
            key, job = item
            try:
                stream, _ = engine.add(*_prepared(model, job))
            except Exception as e:
                yield key, e
                continue
            if stream.done:
                yield key, stream.result()
            else:
                active[stream] = key
        if not active:
            continue
        try:
            results = engine.step()
        except Exception as e:  # a bug: fail the running jobs, go on with a fresh engine
            for key in active.values():
                yield key, e
            active.clear()
            engine = BatchEngine(runtime, max_batch)
            continue
        for stream, _ in results:
            if stream.done and stream in active:
                yield active.pop(stream), stream.result()
