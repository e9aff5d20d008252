"""Slow-Fast batched decoding and chunked prefill on a tiny random checkpoint (float32): every request gets
token for token what it gets alone, whatever its neighbours (text only, an image, videos of different
lengths, so different numbers of fast and slow tokens), when it joins or leaves, and however its prompt is
chunked; and the batch really is decoded in one forward call per step."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import torch

import owlvid
from owlvid.engine import Engine, SamplingParams, run_batch
from owlvid.jobs import generate_each
from owlvid.testing.slowfast import make_tiny_slowfast

from .test_slowfast_tiny import frames, video_message


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return owlvid.load(make_tiny_slowfast(tmp_path_factory.mktemp("tiny_slowfast_batch")), device="cpu",
                       dtype="float32")


@pytest.fixture()
def no_stop_tokens(model, monkeypatch):
    """Random weights may sample an end token at any step: without stop tokens every request decodes exactly
    its max_new_tokens, so the counts of forward calls below are exact."""
    monkeypatch.setattr(model.runtime, "stop_token_ids", [])


def conversations() -> list[list[dict]]:
    image = [{"type": "image", "image": frames(1, seed=7, size=(50, 80))[0]}, {"type": "text", "text": "What is it?"}]
    return [
        video_message(frames(6, seed=1), "What happens in this video?"),  # 6 frames: 486 fast and slow tokens
        [{"role": "user", "content": "A text-only question, with no video at all."}],  # no slow tokens
        video_message(frames(2, seed=2), "Describe it."),  # 2 frames: 162 tokens
        [{"role": "user", "content": image}],  # an image: 324 tokens, not pooled
    ]


@contextlib.contextmanager
def llm_calls(model):
    """The batch size of every forward call of the language model (prefill chunks and decode steps)."""
    sizes: list[int] = []
    hook = model.runtime.model.llm.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        yield sizes
    finally:
        hook.remove()


def test_generate_batch_decodes_all_rows_in_one_forward_per_step(model, no_stop_tokens):
    """generate_batch: the tokens of `generate` alone, from 4 prefills and then one 4-row forward per token
    (a loop over `generate` would make 4 x 8 single-row calls)."""
    convs = conversations()
    with llm_calls(model) as alone_calls:
        alone = [model.generate(c, max_new_tokens=8) for c in convs]
    assert alone_calls == [1] * 32
    with llm_calls(model) as calls:
        batched = model.generate_batch(convs, max_new_tokens=8)
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert [r.text for r in batched] == [r.text for r in alone]
    assert all(len(r.token_ids) == 8 for r in batched)
    assert calls == [1, 1, 1, 1] + [4] * 7


def test_rows_join_mid_decode_and_leave_with_chunked_prefill(model, no_stop_tokens):
    """Continuous batching with chunked prefill: requests arrive between steps, their prompts are
    prefilled 64 positions per step between decoding steps, and they finish at different lengths."""
    convs = conversations()
    lengths = [30, 12, 24, 16]
    alone = [model.generate(c, max_new_tokens=n).token_ids for c, n in zip(convs, lengths)]
    prepared = [model.prepare(c) for c in convs]
    engine = Engine(model.runtime, max_batch=4, prefill_chunk=64)
    streams = []
    with llm_calls(model) as calls:
        for (request, ids), n in zip(prepared, lengths):
            streams.append(engine.add(request, ids, SamplingParams(max_new_tokens=n)).stream)
            engine.step()
            engine.step()
        while engine.active:
            engine.step()
    assert [s.result().token_ids for s in streams] == alone
    assert max(calls) >= 3  # requests overlapped in one decoding step
    chunks = sum(-(-len(ids) // 64) for _, ids in prepared)
    one_row_at_a_time = chunks + sum(lengths) - len(lengths)  # the first token of each comes from its prefill
    assert len(calls) < one_row_at_a_time - 20


def test_generate_each_and_run_batch_use_the_batch(model, no_stop_tokens):
    """Batch jobs (`jobs.generate_each`) and `run_batch` decode Slow-Fast requests together."""
    convs = conversations()
    alone = [model.generate(c, max_new_tokens=5).token_ids for c in convs]
    jobs = [(i, (c, {"max_new_tokens": 5})) for i, c in enumerate(convs)]
    # prefetch=0: jobs are prepared on the engine thread, so all four are admitted before the first step;
    # whole prefills (no chunking): all four are prefilled in the first step and decode together
    with llm_calls(model) as calls:
        results = dict(generate_each(model, jobs, max_batch=4, prefetch=0, prefill_chunk=None))
    assert [results[i].token_ids for i in range(4)] == alone
    assert calls.count(4) == 4
    # with prefetching (the default) jobs join as they are ready: the same tokens
    results = dict(generate_each(model, jobs, max_batch=4))
    assert [results[i].token_ids for i in range(4)] == alone
    items = [(*model.prepare(c), SamplingParams(max_new_tokens=5)) for c in convs]
    assert [g.token_ids for g in run_batch(model.runtime, items, max_batch=2, prefill_chunk=16)] == alone


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_prefill_equals_one_shot(model, chunk):
    """Chunk boundaries inside the text before the video, the fast tokens and the question give the
    logits of one call; the slow tokens' K/V are computed once and dropped with the finished prefill."""
    rt = model.runtime
    messages = video_message(frames(3, seed=5), "What happens in this video, and why?")
    reference, state = rt.prefill(model.prepare(messages)[0])
    request, ids = model.prepare(messages)
    job = rt.begin_prefill(request)
    assert job.memory is not None
    logits, steps = None, 0
    while logits is None:
        logits = rt.prefill_step(job, chunk)
        steps += 1
    assert steps == -(-len(ids) // chunk)
    assert job.state.position == state.position == len(ids)
    assert job.embeds is None and job.memory is None
    # float32 sums in another order (other matmul shapes): a few ulp of logits ~4
    assert torch.allclose(logits, reference, atol=1e-5, rtol=1e-5), (logits - reference).abs().max()
    assert int(logits.argmax()) == int(reference.argmax())


def test_encode_media_runs_the_vision_side_ahead(model):
    """The server's preparation thread calls encode_media: the prefill then runs no vision and no slow K/V."""
    rt = model.runtime
    messages = video_message(frames(2, seed=9))
    reference, _ = rt.prefill(model.prepare(messages)[0])
    request = rt.encode_media(model.prepare(messages)[0])
    towers = []
    hooks = [rt.model.vision_tower.register_forward_hook(lambda *a: towers.append(1))]
    hooks += [a.cross_attn_kv_proj.register_forward_hook(lambda *a: towers.append(2))
              for a in rt.model.hybrid_attentions()]
    try:
        logits, _ = rt.prefill(request, chunk_tokens=50)
    finally:
        for h in hooks:
            h.remove()
    assert towers == []
    assert torch.allclose(logits, reference, atol=1e-5, rtol=1e-5)


def test_batching_scheduler_serves_slowfast_requests_together(model, no_stop_tokens):
    """The server's scheduler picks continuous batching for Slow-Fast: concurrent requests overlap and each
    gets its solo answer."""
    from owlvid.engine import Generation
    from owlvid.server.scheduler import Job, Scheduler

    convs = conversations()
    lengths = [10, 14, 6, 12]
    solo = [model.generate(c, max_new_tokens=n) for c, n in zip(convs, lengths)]
    sched = Scheduler(model, max_batch=4, prefill_chunk=64)
    sched.start()

    async def collect(job):
        events = []
        while not isinstance(events[-1] if events else None, (Generation, BaseException)):
            events.append(await job.next_event(timeout=60))
        return events

    async def main():
        jobs = [sched.submit(Job(c, {"max_new_tokens": n})) for c, n in zip(convs, lengths)]
        return await asyncio.gather(*(collect(j) for j in jobs))

    try:
        results = asyncio.run(main())
    finally:
        sched.stop()
    for events, ref in zip(results, solo):
        assert isinstance(events[-1], Generation), events[-1]
        assert events[-1].token_ids == ref.token_ids and events[-1].text == ref.text
    assert sched.stats()["peak_batch"] >= 2 and sched.stats()["completed"] == 4


def test_a_long_video_joining_a_batch_job_is_prefilled_in_chunks_between_the_others_tokens(model, no_stop_tokens):
    """Batch jobs run on the server's engine: a 64-frame request (~1,400 prompt tokens) joining a running job
    is prefilled at most `prefill_chunk` tokens per step, and the request already decoding gets a token at
    every step in between (before the one engine, batch jobs prefilled it whole while the others waited)."""
    calls: list[tuple[int, int]] = []  # (rows, tokens) of every forward call of the language model
    llm = model.runtime.model.llm
    hook = llm.register_forward_pre_hook(lambda m, args: calls.append(tuple(args[0].shape[:2])))
    jobs = [("text", ([{"role": "user", "content": "Tell me a long story."}], {"max_new_tokens": 120})),
            ("video", (video_message(frames(64, seed=3), "What happens?"), {"max_new_tokens": 4}))]
    try:
        results = dict(generate_each(model, jobs, max_batch=2, prefetch=0, prefill_chunk=128))
    finally:
        hook.remove()
    alone = model.generate(jobs[1][1][0], max_new_tokens=4)
    assert results["video"].token_ids == alone.token_ids and results["video"].prompt_tokens > 1000
    assert max(tokens for _, tokens in calls) <= 128
    prefill = [i for i, (_, tokens) in enumerate(calls) if tokens > 1]
    video_chunks = [i for i in prefill if i > prefill[0] + 1]  # after the text prompt's own prefill
    assert len(video_chunks) >= results["video"].prompt_tokens // 128
    # between two chunks of the video's prompt, the text request decodes a token (a one-row call)
    for a, b in zip(video_chunks, video_chunks[1:]):
        assert calls[a + 1: b] == [(1, 1)], (a, b, calls[a: b + 1])


def test_a_follow_up_question_in_a_batch_job_reuses_the_prefix(tiny_owl3_models):
    """The engine hands finished rows to the runtime's prefix cache in batch jobs too: the second turn of a
    conversation prefills only its new tokens, and answers as it does from scratch."""
    model = tiny_owl3_models["241101"]
    first = [{"role": "user", "content": "Describe an owl in a few words, please, in detail."}]
    answer = model.generate(first, max_new_tokens=12).text
    second = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And its eyes?"}]
    model.runtime._prefixes.clear()
    scratch = model.generate(second, max_new_tokens=12)
    model.runtime._prefixes.clear()
    before = model.runtime.stats["prefix_reused_tokens"]
    jobs = [("1", (first, {"max_new_tokens": 12})), ("2", (second, {"max_new_tokens": 12}))]
    results = dict(generate_each(model, jobs, max_batch=1, prefetch=0))
    reused = model.runtime.stats["prefix_reused_tokens"] - before
    assert results["1"].text == answer
    assert reused >= results["1"].prompt_tokens  # the whole first turn came from the cache
    assert results["2"].token_ids == scratch.token_ids
