"""Work beside the caller's thread: `Prefetcher` (iterate a source on a worker thread, a few items ahead:
video chunks decoded while the vision tower encodes the previous one, tickets prepared while the engine
runs) and `call_with_timeout` (media_timeout).

PyAV decoding, PIL resizing and torch kernels all release the GIL, so the worker really runs beside
the encoder.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from .errors import MediaTimeout

_DONE = object()
_PUT_POLL = 0.05  # seconds between checks for a consumer that has gone away
T = TypeVar("T")


def call_with_timeout(fn: Callable[[], T], seconds: float | None, what: str) -> T:
    """`fn()`, or MediaTimeout once it has run `seconds` (None: no limit, run here).

    Python threads cannot be killed: `fn` runs on a daemon thread that is abandoned at the deadline (it ends
    when its blocking call returns, e.g. at the download's own timeout, and holds nothing the caller needs),
    so a hung decoder costs one idle thread, never the caller."""
    if seconds is None:
        return fn()
    box: list = []
    finished = threading.Event()

    def run() -> None:
        try:
            box.append((True, fn()))
        except BaseException as e:  # handed to the caller
            box.append((False, e))
        finally:
            finished.set()

    threading.Thread(target=run, daemon=True, name="owlvid-media").start()
    if not finished.wait(seconds):
        raise MediaTimeout(f"{what}: loading and decoding took longer than media_timeout={seconds:g} s")
    ok, value = box[0]
    if not ok:
        raise value
    return value


class Prefetcher:
    """Iterate `source` on a daemon thread, at most `depth` items ahead; errors surface in the consumer.

    The producer never blocks for good: every put (items, the end marker, an error) waits in short
    steps and gives up once the consumer has stopped (closed the iterator, broken out of its loop, or
    dropped it: the thread holds no reference to the Prefetcher, so it can be collected). `source` is
    then closed on the worker thread, which releases what it holds (an open video file).
    """

    def __init__(self, source: Iterable, depth: int = 2) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=_produce, args=(source, self._queue, self._stop), daemon=True,
                                        name="owlvid-prefetch")
        self._thread.start()

    EMPTY = object()  # `next(block=False)`: nothing is ready yet

    def __iter__(self) -> Iterator:
        try:
            while True:
                item = self.next()
                if item is _DONE:
                    return
                yield item
        finally:
            self.close()

    def next(self, block: bool = True, timeout: float | None = None) -> Any:
        """The next item; `Prefetcher.EMPTY` when nothing came (not blocking, or after `timeout` seconds);
        `Prefetcher.END` after the last one. The source's error is raised here."""
        try:
            ok, item = self._queue.get(block=block, timeout=timeout if block else None)
        except queue.Empty:
            return self.EMPTY
        if not ok:
            self.close()
            raise item
        if item is _DONE:
            self._queue.put((True, _DONE))  # stays the answer for later calls
        return item

    END = _DONE

    def close(self) -> None:
        """Stop the producer (it ends within about `_PUT_POLL` seconds of its current item)."""
        self._stop.set()

    def __del__(self) -> None:
        self._stop.set()


def _put(q: queue.Queue, stop: threading.Event, entry: tuple) -> bool:
    """Put `entry` unless the consumer stops first; False if it did."""
    while not stop.is_set():
        try:
            q.put(entry, timeout=_PUT_POLL)
            return True
        except queue.Full:
            continue
    return False


def _produce(source: Iterable, q: queue.Queue, stop: threading.Event) -> None:
    it = iter(source)
    try:
        for item in it:
            if not _put(q, stop, (True, item)):
                return
        _put(q, stop, (True, _DONE))
    except BaseException as e:  # handed to the consumer, re-raised there
        _put(q, stop, (False, e))
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            try:
                close()
            except Exception:  # noqa: BLE001 - the consumer has its answer (or has gone); nothing to report to
                pass
