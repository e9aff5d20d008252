"""How long a running stream stalls while a long video request arrives (continuous batching server path).

    python benchmarks/stall.py                    # small random model, 128 frames, chunked vs before
    python benchmarks/stall.py --model 1b --frames 128 --chunk 512

A stream A decodes; after its per-token time is measured, a request B with a many-frame video is
submitted. "before" runs B's preparation (prompt, frame pixels), vision encoding and whole prefill on the
engine thread, as owlvid did; "chunked" is the Scheduler as it is: preparation and vision
encoding on the preparation thread, the LLM prefill `--chunk` tokens per engine step between decode
steps. Reported: A's normal per-token time, A's largest inter-token gap while B arrives (target: under
2x the normal time plus the largest chunk of the same run), the time of the largest prefill chunk (alone,
before the runs, and within the run), and the throughput of the whole run.
Random weights at real (1b) or small shapes; the numbers are about scheduling, not answers.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import perf  # noqa: E402 - real-shape random models and the table printer

from owlvid.engine import (  # noqa: E402
    Generation,
    Ticket,  # noqa: E402
    TokenEvent,
)
from owlvid.server.scheduler import Job, Scheduler, watched  # noqa: E402
from owlvid.testing import write_tiny_tokenizer  # noqa: E402

# A small model that runs the scenario in a few minutes on two cores (same code paths as 1b).
SMALL = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=6,
             num_key_value_heads=2, hyper_layers=[2, 6], tie_word_embeddings=True)
SMALL_SIGLIP = dict(hidden_size=192, intermediate_size=768, num_attention_heads=3, num_hidden_layers=4,
                    image_size=384, patch_size=14)


class BeforeScheduler(Scheduler):
    """owlvid before the preparation thread: the engine thread prepares, encodes and prefills each new request."""

    def _prepare_loop(self) -> None:
        while True:
            self._ahead.acquire()
            job = self._queue.get()
            if job is None:
                self._ready.put(None)
                return
            self._ready.put(watched(Ticket(), job))

    def _feed(self, block: bool):
        ticket = super()._feed(block)
        if isinstance(ticket, Ticket):  # prepared here, on the engine thread
            job = ticket.owner
            return watched(self.model.ticket(job.messages, job.options, timed=True), job)
        return ticket


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


async def scenario(sched: Scheduler, frames: int, warm_tokens: int, seed: int) -> dict:
    a_msgs = [{"role": "user", "content": "Write a long story about owls in the forest at night."}]
    # A runs until cancelled: as long as the context allows (the server-default rule, not a 400)
    stream_a = sched.submit(Job(a_msgs, {"max_new_tokens": 100000, "shorten_to_context": True}))
    times: list[float] = []
    t_start = time.perf_counter()

    async def next_token(job: Job):
        event = await job.next_event(timeout=600)
        if isinstance(event, BaseException):
            raise event
        return event

    while len(times) < warm_tokens:
        if isinstance(await next_token(stream_a), TokenEvent):
            times.append(time.perf_counter())
    normal = statistics.median(b - a for a, b in zip(times, times[1:]))
    b_msgs = perf.video_messages(frames, seed=seed)
    t_submit = time.perf_counter()
    job_b = sched.submit(Job(b_msgs, {"max_new_tokens": 8}))
    b_first = b_done = None
    result_b = None
    while result_b is None:  # A keeps decoding; B's events are collected as they come
        while not job_b._events.empty():
            event = job_b._events.get_nowait()
            if isinstance(event, BaseException):
                raise event
            if isinstance(event, TokenEvent) and b_first is None:
                b_first = time.perf_counter()
            if isinstance(event, Generation):
                result_b, b_done = event, time.perf_counter()
        if isinstance(await next_token(stream_a), TokenEvent):
            times.append(time.perf_counter())
    after_times = []
    while len(after_times) < warm_tokens:
        if isinstance(await next_token(stream_a), TokenEvent):
            after_times.append(time.perf_counter())
    stream_a.cancel()
    while not isinstance(await stream_a.next_event(timeout=600), BaseException | Generation):
        pass
    t_end = after_times[-1]
    arrival = [t for t in times if t >= t_submit]
    gaps = [b - a for a, b in zip([max(t for t in times if t < t_submit)] + arrival, arrival)]
    tokens = len(times) + len(after_times) + result_b.completion_tokens
    return {"normal_token_s": normal, "max_gap_s": max(gaps) if gaps else float("nan"),
            "b_prompt_tokens": result_b.prompt_tokens, "b_prefill_s": result_b.timings.get("prefill_s"),
            "b_first_token_s": (b_first or b_done) - t_submit,
            "a_tok_s_before": (warm_tokens - 1) / (times[warm_tokens - 1] - times[0]),
            "a_tok_s_after": (len(after_times) - 1) / (after_times[-1] - after_times[0]),
            "total_tok_s": tokens / (t_end - t_start), "wall_s": t_end - t_start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", choices=["small", "1b"])
    ap.add_argument("--frames", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=512, help="prefill tokens per engine step")
    ap.add_argument("--warm-tokens", type=int, default=20)
    ap.add_argument("--modes", default="before,chunked")
    args = ap.parse_args()
    if args.model == "small":
        perf.SHAPES["small"], perf.SIGLIP = SMALL, SMALL_SIGLIP
        perf.RELEASES["small"] = "241014"  # tied embeddings, as the 1B/2B releases
    tok_dir = Path(tempfile.mkdtemp())
    write_tiny_tokenizer(tok_dir)
    model = perf.build_model(args.model, torch.float32, tok_dir)
    model.runtime.visual_cache = None  # every run encodes its frames
    request, ids = model.prepare(perf.video_messages(args.frames))
    chunks = math.ceil(len(ids) / args.chunk)
    # Warm-up and the chunk times, measured alone. Chunks differ: rows after the video also attend to
    # its visual memory, so the target uses the largest chunk (what one engine step may have to run).
    job = model.runtime.begin_prefill(request)
    chunk_times = []
    while True:
        t0 = time.perf_counter()
        done = model.runtime.prefill_step(job, args.chunk) is not None
        chunk_times.append(time.perf_counter() - t0)
        if done:
            break
    chunk_s = max(chunk_times)
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, float32; "
          f"model {args.model} (random weights); B: {args.frames} frames, {len(ids)} prompt tokens, "
          f"{chunks} chunk(s) of {args.chunk}")
    # The chunks of the run itself are timed too (a wrapper around the runtime's `prefill_step`): on a
    # shared machine a chunk measured alone a minute earlier can read faster or slower than in the run.
    in_run: list[float] = []
    step = model.runtime.prefill_step

    def timed_step(job, tokens=None):
        t0 = time.perf_counter()
        try:
            return step(job, tokens)
        finally:
            in_run.append(time.perf_counter() - t0)

    model.runtime.prefill_step = timed_step
    rows = []
    for mode in args.modes.split(","):
        cls = BeforeScheduler if mode == "before" else Scheduler
        sched = cls(model, max_batch=4, prefill_chunk=None if mode == "before" else args.chunk)
        in_run.clear()
        sched.start()
        try:
            res = asyncio.run(scenario(sched, args.frames, args.warm_tokens, seed=len(rows) + 1))
        finally:
            sched.stop()
        res["largest_chunk_alone_s"] = chunk_s if mode != "before" else None
        res["largest_chunk_in_run_s"] = max(in_run) if mode != "before" and in_run else None
        target = 2 * res["normal_token_s"] + (res["largest_chunk_in_run_s"] or chunk_s)
        rows.append({"mode": mode, **res, "target_s": target, "ok": res["max_gap_s"] < target})
    perf.table("stall of a running stream while a long video request arrives", rows)


if __name__ == "__main__":
    main()
