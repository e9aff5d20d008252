"""Pipelined video ingestion: frames are decoded and preprocessed on a worker thread while the vision
tower encodes the previous chunk, and only one or two chunks of frames are alive at a time.

PyAV decoding, PIL resizing and torch kernels all release the GIL, so the worker really runs beside
the encoder.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from .cache import PreparedVideo

_DONE = object()
_PUT_POLL = 0.05  # seconds between checks for a consumer that has gone away


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

    def __iter__(self) -> Iterator:
        try:
            while True:
                ok, item = self._queue.get()
                if not ok:
                    raise item
                if item is _DONE:
                    return
                yield item
        finally:
            self.close()

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


class StreamedVideo(PreparedVideo):
    """A video whose frame selection is known (`indices`) but whose frames are decoded only when the
    model encodes them, chunk by chunk."""

    def __init__(self, source: Any, indices: list[int], options: dict, cache_key: str | None,
                 chunk_size: int = 16) -> None:
        self.source = source
        self.indices = list(indices)
        self.options = {k: v for k, v in options.items()
                        if k not in ("sampling", "max_frames", "num_frames", "fps", "min_frames", "start", "end")}
        self.cache_key = cache_key
        self.chunk_size = chunk_size

    @property
    def num_frames(self) -> int:
        return len(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def pixel_chunks(self, transform: Callable[[list], torch.Tensor]) -> Iterator[torch.Tensor]:
        """Yield `transform(frames)` for consecutive chunks, decoded and transformed on a worker thread."""
        from .media import iter_video_chunks

        def produce():
            for clip in iter_video_chunks(self.source, chunk_size=self.chunk_size, indices=self.indices,
                                          **self.options):
                yield transform(clip.frames)

        return iter(Prefetcher(produce(), depth=2))
