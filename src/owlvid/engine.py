"""The one engine: every front door (`Model.generate/stream/generate_batch`, batch jobs, evaluation, the
server, Ray replicas) runs its requests through `Engine.run`.

A request reaches the engine as a `Ticket`: its prepared model inputs (media decoded, prompt tokenized,
vision encoded ahead where the caller did so) or the exception its preparation raised. `Engine.run(feed)`
admits tickets from the feed, prefills them (`prefill_chunk` tokens per step, interleaved with decoding
steps, so a long prompt delays running requests by about one chunk per token), decodes every admitted
request together (continuous batching: one forward call per step, rows joining and leaving), and yields
each request's events: `TokenEvent`s, then its `Generation`, or an exception as its last event.

Failures stay where they belong: a request's own preparation, prefill, sampling, stop handling or
detokenisation fails that request alone (`RequestFailed`, its cause attached); only a failure of a shared
step (the batched forward call, joining the batch) fails the requests in that batch, and the engine goes
on with the next ones. Cancelled requests (`Ticket.cancelled`) and requests past their deadline leave the
batch between steps. Finished requests hand their caches to the runtime (`finish`: the prefix cache of a
multi-turn conversation).

The engine does not prepare requests: callers do that beside it (`pipeline.Prefetcher` runs a preparing
iterator on a thread), so media decoding and vision encoding overlap the decoding steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .generation import (
    Generation,
    RequestStream,
    TokenEvent,
    check_context,
    vision_seconds,
)
from .metrics import EngineMetrics
from .runtime import ModelRuntime
from .sampling import Sampler, SamplingParams, sample

__all__ = ["Engine", "Generation", "RequestCancelled", "RequestFailed", "RequestTimeout", "RequestStream",
           "Sampler", "SamplingParams", "Ticket", "TokenEvent", "check_context", "run_batch", "run_generation"]


class RequestFailed(Exception):
    """A request failed inside the engine (its sampling, stop handling, a shared step); the cause is attached.
    Not the user's mistake: the server answers 500 with this message."""


class RequestCancelled(Exception):
    """The request was cancelled (its client went away) before or while it ran."""


class RequestTimeout(Exception):
    """The request passed its deadline before or while it ran."""


@dataclass(eq=False)
class Ticket:
    """One request for the engine.

    `request`, `prompt_ids`, `params`: the prepared model inputs (see `Model.ticket`), or `error`: the
    exception its preparation raised (the engine reports it as the request's only event). `cancelled`:
    polled between steps (a client that went away); `deadline`: `time.monotonic()` past which it is
    dropped with `RequestTimeout`. With `timed` (prepared beside the engine: batch jobs, the server),
    `prepare_s` / `ready_at` go into the result's timings (`prepare_s`,
    `queue_s`). `key` and `owner` are the caller's (an id, a server job)."""

    key: Any = None
    request: Any = None
    prompt_ids: list[int] = field(default_factory=list)
    params: SamplingParams | None = None
    error: BaseException | None = None
    prepare_s: float = 0.0
    timed: bool = False
    ready_at: float = field(default_factory=time.perf_counter)
    cancelled: Callable[[], bool] | None = None
    deadline: float | None = None
    owner: Any = None
    stream: RequestStream | None = None  # set by the engine when admitted
    prefilled: int = 0  # prompt tokens the engine has asked the runtime to prefill (at most; see `_step`)

    @property
    def arrived_at(self) -> float:
        """When the request arrived (`time.perf_counter()`): before its preparation."""
        return self.ready_at - self.prepare_s

    def gone(self) -> BaseException | None:
        """The exception that ends this request now, if its client left or its deadline passed."""
        if self.cancelled is not None and self.cancelled():
            return RequestCancelled("the client went away")
        if self.deadline is not None and time.monotonic() > self.deadline:
            return RequestTimeout("the request timed out")
        return None


EMPTY = object()  # a feed's answer when nothing is ready yet (see `Engine.run`)
Feed = Callable[[bool], Any]  # feed(block) -> Ticket | EMPTY | None (the end)


def list_feed(tickets: Iterable[Ticket]) -> Feed:
    """A feed over tickets that are ready now (or are made on the caller's thread when taken)."""
    it = iter(tickets)
    return lambda block: next(it, None)


class Engine:
    """Continuous batching over one model runtime (see the module docstring). Single-threaded: one thread
    runs `run` (or `step`); tickets come through the feed."""

    def __init__(self, runtime: ModelRuntime, max_batch: int = 8, prefill_chunk: int | None = 512,
                 metrics: EngineMetrics | None = None) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.runtime = runtime
        self.metrics = metrics if metrics is not None else EngineMetrics()
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.batch: Any = None
        self.decoding: list[Ticket] = []  # rows of `batch`, in order
        self.prefilling: list[tuple[Ticket, Any]] = []  # (ticket, runtime prefill job), FIFO
        self.joining: list[tuple[Ticket, Any]] = []  # prefilled last step: join the batch next step
        self.peak_batch = 0
        self.failed_steps = 0  # shared steps that failed (each failed the requests in it)

    @property
    def active(self) -> int:
        """Requests admitted and not finished: prefilling, joining or decoding."""
        return len(self.decoding) + len(self.prefilling) + len(self.joining)

    # -- the loop ------------------------------------------------------------------------------------

    def run(self, feed: Feed) -> Iterator[tuple[Ticket, TokenEvent | Generation | BaseException]]:
        """Admit tickets from `feed` while there is room, step, and yield (ticket, event) until the feed
        has ended (returned None) and every admitted request has finished. `feed(block)` returns the next
        ticket, `EMPTY` when none is ready yet (asked without blocking while others run), or None at the
        end; it is asked to block only when nothing else is running."""
        ended = False
        while True:
            while not ended and self.active < self.max_batch:
                ticket = feed(not self.active)
                if ticket is None:
                    ended = True
                elif ticket is EMPTY:
                    break
                else:
                    yield from self._observed(self.admit(ticket))
            if not self.active:
                if ended:
                    return
                continue
            yield from self._observed(self._step())

    def _observed(self, events: Iterable[tuple[Ticket, Any]]) -> Iterator[tuple[Ticket, Any]]:
        """`events`, with each request's end counted in `metrics`, and the running count updated after them."""
        for ticket, event in events:
            if isinstance(event, (Generation, BaseException)):
                self.metrics.request_done(event, time.perf_counter() - ticket.arrived_at)
            yield ticket, event
        self.metrics.running = self.active

    def add(self, request: Any, prompt_ids: list[int], params: SamplingParams) -> Ticket:
        """Admit prepared model inputs (stepping by hand: `step()`); the ticket's `stream` has the result,
        its `error` the failure."""
        ticket = Ticket(request=request, prompt_ids=prompt_ids, params=params)
        for _ in self._observed(self.admit(ticket)):
            pass
        return ticket

    def step(self) -> list[tuple[Ticket, TokenEvent | Generation | BaseException]]:
        """One engine step (see `_step`), its events as a list."""
        return list(self._observed(self._step()))

    def admit(self, ticket: Ticket) -> Iterator[tuple[Ticket, BaseException]]:
        """Take a prepared ticket: its prefill starts with the next step. A ticket that failed to prepare,
        or whose client has already gone, ends here."""
        error = ticket.error or ticket.gone()
        if error is None:
            try:
                ticket.stream = RequestStream(self.runtime, ticket.prompt_ids, ticket.params or SamplingParams())
                ticket.stream.timings.update(decode_s=0.0, decode_steps=0)
                if ticket.timed:
                    ticket.stream.timings.update(prepare_s=ticket.prepare_s,
                                                 queue_s=max(time.perf_counter() - ticket.ready_at, 0.0))
                before = vision_seconds(self.runtime, ticket.request)
                t0 = time.perf_counter()
                job = self.runtime.begin_prefill(ticket.request)  # vision not encoded ahead runs here
                ticket.stream.prefilled(self.runtime, ticket.request, time.perf_counter() - t0, before)
            except Exception as e:  # this request's input or prefill only
                error = e
        if error is not None:
            yield ticket, error
            return
        self.prefilling.append((ticket, job))

    def _step(self) -> Iterator[tuple[Ticket, TokenEvent | Generation | BaseException]]:
        """One engine step, then one token for every decoding request; yields the step's events, and
        finished requests leave. With `prefill_chunk`, the step first either joins the requests prefilled
        in the previous step or prefills up to `prefill_chunk` prompt tokens of the pending requests, oldest
        first (never both, so that no step costs much more than one chunk); without, every pending prompt is
        prefilled whole and joins at once (the fastest way through a batch that is all there at the start)."""
        yield from self._drop_gone()
        if self.prefill_chunk is None:
            while self.prefilling:
                yield from self._prefill_chunk(None)
            yield from self._join_waiting()
        elif self.joining:
            yield from self._join_waiting()
        else:
            budget = self.prefill_chunk
            while self.prefilling and budget > 0:
                ticket = self.prefilling[0][0]
                take = min(budget, max(len(ticket.prompt_ids) - ticket.prefilled, 1))
                budget -= take
                yield from self._prefill_chunk(take)
        if not self.decoding:
            return
        self.peak_batch = max(self.peak_batch, len(self.decoding))
        t0 = time.perf_counter()
        rows = self.decoding
        try:
            logits = self.runtime.decode_batch(self.batch, [t.stream.generated[-1] for t in rows])
        except Exception as e:  # the shared forward call: every row in it fails, the engine goes on
            yield from self._fail_batch(rows, "a decoding step", e)
            return
        failures: dict[int, Exception] = {}
        tokens = sample(logits, [t.stream.sampler for t in rows], failures).tolist()  # the step's device read
        seconds = time.perf_counter() - t0
        self.metrics.step(seconds, len(rows))
        for b, (ticket, token) in enumerate(zip(rows, tokens)):
            stream = ticket.stream
            stream.timings["decode_s"] += seconds
            stream.timings["decode_steps"] += 1
            if b in failures:
                yield from self._fail_row(ticket, "sampling", failures[b])
                continue
            yield from self._accept(ticket, token=token)
        done = [b for b, t in enumerate(rows) if t.stream.done or t.error is not None]
        if done:
            self._leave(done)

    # -- pieces of a step ----------------------------------------------------------------------------

    def _join_waiting(self) -> Iterator[tuple[Ticket, Any]]:
        joining, self.joining = self.joining, []
        if not joining:
            return
        try:
            self._join(joining)
        except Exception as e:  # a shared step: the batch may be half-joined, every row in it is lost
            yield from self._fail_batch(self.decoding + [t for t, _ in joining], "joining the batch", e)

    def _prefill_chunk(self, tokens: int | None) -> Iterator[tuple[Ticket, Any]]:
        """The next `tokens` prompt tokens (None: the rest) of the oldest pending prefill."""
        ticket, job = self.prefilling[0]
        t0 = time.perf_counter()
        try:
            logits = self.runtime.prefill_step(job, tokens)
            ticket.prefilled += tokens or len(ticket.prompt_ids)
        except Exception as e:  # this request's prefill only
            self.prefilling.pop(0)
            yield ticket, e
            return
        ticket.stream.timings["prefill_s"] = ticket.stream.timings.get("prefill_s", 0.0) + time.perf_counter() - t0
        if logits is None:
            return
        self.prefilling.pop(0)
        self.metrics.first_token(time.perf_counter() - ticket.arrived_at)
        yield from self._accept(ticket, logits=logits)
        if not ticket.stream.done and ticket.error is None:
            self.joining.append((ticket, job.state))
        elif ticket.error is None:
            self.runtime.finish(job.state)

    def _accept(self, ticket: Ticket, token: int | None = None, logits: Any = None
                ) -> Iterator[tuple[Ticket, Any]]:
        """The request's next token (sampled from `logits` for a first token): its events, and its result
        when it finished. Anything that goes wrong here is this request's alone."""
        stream = ticket.stream
        try:
            events = stream.accept(logits) if token is None else stream.accept_token(token)
            result = stream.result() if stream.done else None
        except Exception as e:
            yield from self._fail_row(ticket, "sampling or stop handling" if token is None else "stop handling", e)
            return
        for event in events:
            yield ticket, event
        if result is not None:
            yield ticket, result

    def _fail_row(self, ticket: Ticket, where: str, cause: BaseException) -> Iterator[tuple[Ticket, Any]]:
        error = RequestFailed(f"the request failed in {where}: {cause!r}")
        error.__cause__ = cause
        ticket.error = error
        yield ticket, error

    def _fail_batch(self, rows: list[Ticket], where: str, cause: BaseException) -> Iterator[tuple[Ticket, Any]]:
        """A shared step failed: the requests in it fail with the reason; the batch starts afresh."""
        self.failed_steps += 1
        for ticket in rows:
            error = RequestFailed(f"the request failed in {where} shared with {len(rows) - 1} other "
                                  f"request(s): {cause!r}")
            error.__cause__ = cause
            ticket.error = error
            yield ticket, error
        self.decoding, self.batch = [], None

    def _join(self, joining: list[tuple[Ticket, Any]]) -> None:
        states = [state for _, state in joining]
        if self.batch is None:
            self.batch = self.runtime.start_batch(states, max_rows=self.max_batch)
        else:
            self.runtime.join_batch(self.batch, states)
        self.decoding += [ticket for ticket, _ in joining]

    def _leave(self, rows: list[int]) -> None:
        """These batch rows (ascending) finished, failed or were dropped: finished ones hand their state to
        the runtime (prefix cache), and the rest of the batch is compacted."""
        for b in rows:
            ticket = self.decoding[b]
            if ticket.error is None and ticket.stream.done:
                self.runtime.finish_row(self.batch, b, ticket.stream.generated)
        leaving = set(rows)
        keep = [b for b in range(len(self.decoding)) if b not in leaving]
        self.decoding = [self.decoding[b] for b in keep]
        if keep:
            self.runtime.keep_rows(self.batch, keep)
        else:
            self.batch = None

    def _drop_gone(self) -> Iterator[tuple[Ticket, BaseException]]:
        """Requests whose client left or whose deadline passed end before the step."""
        for queue_ in (self.prefilling, self.joining):
            for item in list(queue_):
                error = item[0].gone()
                if error is not None:
                    queue_.remove(item)
                    item[0].error = error
                    yield item[0], error
        gone = []
        for b, ticket in enumerate(self.decoding):
            error = ticket.gone()
            if error is not None:
                ticket.error = error
                gone.append(b)
                yield ticket, error
        if gone:
            self._leave(gone)


# -- the front doors' shortest paths ---------------------------------------------------------------------


def run_generation(runtime: ModelRuntime, request: Any, prompt_ids: list[int], params: SamplingParams
                   ) -> Iterator[TokenEvent | Generation]:
    """One request through the engine: a TokenEvent per generated token, then the final Generation (its
    error is raised)."""
    ticket = Ticket(request=request, prompt_ids=prompt_ids, params=params)
    for _, event in Engine(runtime, max_batch=1, prefill_chunk=None).run(list_feed([ticket])):
        if isinstance(event, BaseException):
            raise event
        yield event


def run_batch(runtime: ModelRuntime, items: list[Ticket | tuple[Any, list[int], SamplingParams]],
              max_batch: int = 8, prefill_chunk: int | None = None, *, errors: str = "raise"
              ) -> list[Generation | BaseException]:
    """Generate for several requests (tickets, or (request, prompt ids, params)) together; results in input
    order. A request that fails raises its error once the others have finished (`errors="raise"`), or has
    the error in its place (`errors="return"`)."""
    tickets = [item if isinstance(item, Ticket) else Ticket(request=item[0], prompt_ids=item[1], params=item[2])
               for item in items]
    order = {id(ticket): i for i, ticket in enumerate(tickets)}
    results: list[Any] = [None] * len(tickets)
    t0 = time.perf_counter()
    for ticket, event in Engine(runtime, max_batch, prefill_chunk).run(list_feed(tickets)):
        if isinstance(event, (Generation, BaseException)):
            results[order[id(ticket)]] = event
    total = time.perf_counter() - t0
    for result in results:
        if isinstance(result, Generation):
            result.timings["batch_wall_s"] = total
    if errors == "raise":
        for result in results:
            if isinstance(result, BaseException):
                raise result
    return results
