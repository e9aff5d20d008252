"""pipeline.Prefetcher: the producer thread ends soon after its consumer goes away, however it goes
(close, break, garbage collection), including while it waits to hand over the end marker or an error."""

from __future__ import annotations

import gc
import threading
import time

import pytest

from owlvid.pipeline import Prefetcher


def wait_ended(thread: threading.Thread, within: float = 2.0) -> None:
    thread.join(within)
    assert not thread.is_alive(), "the producer thread is still running after its consumer went away"


def wait_full(p: Prefetcher) -> None:
    deadline = time.monotonic() + 5
    while not p._queue.full():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.1)  # the producer is now blocked on its next put


def endless(closed: list):
    try:
        i = 0
        while True:
            yield i
            i += 1
    finally:
        closed.append(True)


def few(n: int):
    yield from range(n)


def failing():
    yield 0
    raise ValueError("broken source")


def test_items_in_order_and_errors_reach_the_consumer():
    assert list(Prefetcher(range(20), depth=3)) == list(range(20))
    got = []
    with pytest.raises(ValueError, match="broken source"):
        for x in Prefetcher(failing(), depth=1):
            got.append(x)
    assert got == [0]


def test_break_stops_producer_and_closes_source():
    closed: list = []
    p = Prefetcher(endless(closed), depth=2)
    for x in p:
        if x == 3:
            break
    wait_ended(p._thread)
    assert closed == [True]  # the source generator was closed (an open video file is released)


def test_garbage_collected_consumer_stops_producer():
    closed: list = []
    p = Prefetcher(endless(closed), depth=2)
    it = iter(p)
    next(it)
    thread = p._thread
    del p, it
    gc.collect()
    wait_ended(thread)


@pytest.mark.parametrize("source", [few(1), failing()], ids=["end-marker", "error"])
def test_sentinel_into_full_queue_never_blocks_forever(source):
    # depth 1: the queue is full with the first item while the producer wants to put the end marker
    # (or the error); the consumer never reads.
    p = Prefetcher(source, depth=1)
    wait_full(p)
    thread = p._thread
    p.close()
    wait_ended(thread)


def test_never_iterated_prefetcher_dropped_stops_producer():
    p = Prefetcher(few(5), depth=1)
    wait_full(p)
    thread = p._thread
    del p
    gc.collect()
    wait_ended(thread)
