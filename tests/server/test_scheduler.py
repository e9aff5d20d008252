"""The server's scheduler in front of the one engine, with a real (tiny) model: bounded queue, cancellation
between steps, deadlines, errors delivered to the caller, continuous batching with each request's solo
result."""

from __future__ import annotations

import asyncio
import time

import pytest

from owlvid.engine import Generation
from owlvid.errors import InputError
from owlvid.server.scheduler import Job, JobCancelled, JobTimeout, PendingMediaTooLargeError, QueueFullError, Scheduler

PROMPTS = [[{"role": "user", "content": f"Question number {i}: tell me something."}] for i in range(6)]


@pytest.fixture(scope="module")
def tiny(tiny_owl3_models):
    return tiny_owl3_models["241101"]


async def collect(job: Job):
    events = []
    while True:
        event = await job.next_event(timeout=30)
        events.append(event)
        if isinstance(event, (Generation, BaseException)):
            return events


def run(coro):
    return asyncio.run(coro)


def test_queue_bound_and_reservations(tiny):
    sched = Scheduler(tiny, max_queued=2, max_batch=1)
    sched.start()

    async def main():
        running = sched.submit(Job(PROMPTS[0], {"max_new_tokens": 3000}))
        await running.next_event(timeout=30)  # the engine has taken it: the queue is empty again
        queued = [sched.submit(Job(PROMPTS[i], {"max_new_tokens": 2})) for i in (1, 2)]
        with pytest.raises(QueueFullError):
            sched.submit(Job(PROMPTS[3], {"max_new_tokens": 1}))
        with pytest.raises(QueueFullError):
            sched.reserve()
        assert sched.stats()["waiting"] == 2 and sched.stats()["running"] == 1
        running.cancel()
        results = [await collect(j) for j in queued]
        sched.reserve()  # a slot is free again; give it back unused
        sched.release()
        return results

    try:
        results = run(main())
    finally:
        sched.stop()
    assert all(isinstance(r[-1], Generation) for r in results)  # accepted requests are never dropped


def test_cancel_ends_the_request_before_the_next_step(tiny):
    sched = Scheduler(tiny)
    sched.start()

    async def main():
        job = sched.submit(Job(PROMPTS[0], {"max_new_tokens": 3000}))
        await job.next_event(timeout=30)
        job.cancel()
        return await collect(job)

    try:
        events = run(main())
        time.sleep(0.05)
    finally:
        sched.stop()
    assert isinstance(events[-1], JobCancelled) and len(events) < 100
    assert sched.stats()["cancelled"] == 1 and sched.stats()["running"] == 0


def test_cancelled_while_queued_never_runs(tiny):
    sched = Scheduler(tiny, max_batch=1)
    sched.start()

    async def main():
        first = sched.submit(Job(PROMPTS[0], {"max_new_tokens": 5}))
        second = sched.submit(Job(PROMPTS[1], {"max_new_tokens": 5}))
        second.cancel()
        return await collect(first), await collect(second)

    try:
        first, second = run(main())
    finally:
        sched.stop()
    assert isinstance(first[-1], Generation)
    assert second == [second[0]] and isinstance(second[0], JobCancelled)


def test_deadline_and_errors_are_delivered_and_the_engine_survives(tiny):
    sched = Scheduler(tiny)
    sched.start()

    async def main():
        slow = sched.submit(Job(PROMPTS[0], {"max_new_tokens": 3000}, timeout=0.3))
        bad = sched.submit(Job(PROMPTS[1], {"oops": True}))
        good = sched.submit(Job(PROMPTS[2], {"max_new_tokens": 2}))
        return await collect(slow), await collect(bad), await collect(good)

    try:
        slow, bad, good = run(main())
    finally:
        sched.stop()
    assert isinstance(slow[-1], JobTimeout) and len(slow) < 3000
    assert isinstance(bad[-1], InputError)
    assert isinstance(good[-1], Generation)
    stats = sched.stats()
    assert stats["failed"] == 2 and stats["completed"] == 1


def test_submit_requires_a_running_engine(tiny):
    sched = Scheduler(tiny)

    async def main():
        with pytest.raises(RuntimeError):
            sched.submit(Job(PROMPTS[0], {}))

    run(main())
    assert sched.stats()["waiting"] == 0


# -- the batching scheduler with a real (tiny) model ---------------------------------------------------

def _solo(model, messages, **options):
    model.runtime._prefixes.clear()  # no prefix reuse between the reference and the scheduled run
    return model.generate(messages, **options)


def test_batching_ragged_finish_gives_every_request_its_solo_result(tiny):
    lengths = [3, 17, 9, 30]
    solo = [_solo(tiny, PROMPTS[i], max_new_tokens=n) for i, n in enumerate(lengths)]
    sched = Scheduler(tiny, max_batch=4, prefill_chunk=8)
    sched.start()

    async def main():
        jobs = [sched.submit(Job(PROMPTS[i], {"max_new_tokens": n})) for i, n in enumerate(lengths)]
        return await asyncio.gather(*(collect(j) for j in jobs))

    try:
        results = run(main())
    finally:
        sched.stop()
    for events, ref in zip(results, solo):
        final = events[-1]
        assert isinstance(final, Generation)
        assert final.token_ids == ref.token_ids and final.text == ref.text
        assert "".join(e.text for e in events[:-1]) == ref.text
    assert sched.stats()["peak_batch"] >= 2 and sched.stats()["completed"] == len(lengths)


def test_batching_cancel_mid_generation_leaves_the_others_intact(tiny):
    ref = _solo(tiny, PROMPTS[1], max_new_tokens=40)
    sched = Scheduler(tiny, max_batch=4)
    sched.start()

    async def main():
        doomed = sched.submit(Job(PROMPTS[0], {"max_new_tokens": 2000}))
        other = sched.submit(Job(PROMPTS[1], {"max_new_tokens": 40}))
        seen = [await doomed.next_event(timeout=30) for _ in range(5)]
        doomed.cancel()
        return seen + await collect(doomed), await collect(other)

    try:
        doomed, other = run(main())
        time.sleep(0.05)
    finally:
        sched.stop()
    assert isinstance(doomed[-1], JobCancelled) and len(doomed) < 1000
    assert isinstance(other[-1], Generation) and other[-1].token_ids == ref.token_ids
    stats = sched.stats()
    assert stats["cancelled"] == 1 and stats["completed"] == 1 and stats["running"] == 0


def test_batching_queue_full_admission_and_no_admitted_request_is_dropped(tiny):
    refs = [_solo(tiny, PROMPTS[i], max_new_tokens=6) for i in range(4)]
    sched = Scheduler(tiny, max_queued=1, max_batch=1)
    sched.start()

    async def main():
        running = sched.submit(Job(PROMPTS[5], {"max_new_tokens": 3000}))
        await running.next_event(timeout=30)
        accepted, refused = [], 0
        for i in range(4):
            await asyncio.sleep(0.2)  # the preparation thread takes one request ahead of the engine
            try:
                accepted.append((i, sched.submit(Job(PROMPTS[i], {"max_new_tokens": 6}))))
            except QueueFullError:
                refused += 1
        with pytest.raises(QueueFullError):
            sched.reserve()
        running.cancel()
        return accepted, refused, [await collect(job) for _, job in accepted]

    try:
        accepted, refused, results = run(main())
    finally:
        sched.stop()
    assert refused >= 1 and len(accepted) == 1  # prepared ahead of the engine or not: it waits
    for (i, _), events in zip(accepted, results):
        assert isinstance(events[-1], Generation) and events[-1].token_ids == refs[i].token_ids


def test_pending_media_budget(tiny):
    import numpy as np

    frame = np.zeros((64, 64, 3), dtype=np.uint8)  # 12288 bytes

    def video_job(frames: int) -> Job:
        return Job([{"role": "user", "content": [{"type": "video", "video": [frame] * frames},
                                                 {"type": "text", "text": "What happens?"}]}],
                   {"max_new_tokens": 2})

    sched = Scheduler(tiny, max_batch=1, max_pending_media_bytes=3 * frame.nbytes)
    sched.start()

    async def main():
        with pytest.raises(PendingMediaTooLargeError, match="--max-pending-media-bytes"):
            sched.submit(video_job(4))  # alone over the budget: 413, whatever the load
        assert sched.stats()["waiting"] == 0
        # the engine is busy and one request is prepared ahead: what comes next stays queued
        running = sched.submit(Job(PROMPTS[0], {"max_new_tokens": 3000}))
        await running.next_event(timeout=30)
        ahead = sched.submit(Job(PROMPTS[1], {"max_new_tokens": 2}))
        await asyncio.sleep(0.3)
        queued = [sched.submit(video_job(2))]
        with pytest.raises(QueueFullError, match="--max-pending-media-bytes"):
            sched.submit(video_job(2))
        assert sched.stats()["pending_media_bytes"] == 2 * frame.nbytes and sched.stats()["waiting"] == 2
        queued.append(sched.submit(video_job(1)))  # what is left of the budget
        running.cancel()
        return [await collect(job) for job in [ahead, *queued]]

    try:
        results = run(main())
        assert all(isinstance(events[-1], Generation) for events in results)
        assert sched.stats()["pending_media_bytes"] == 0  # taken off the queue: the bytes are free again
    finally:
        sched.stop()
