"""The overhead of running `owlvid batch` on Ray: the same job single-process and on a local Ray cluster with 1
and 2 replicas (Ray Data actors, one model each).

    python benchmarks/ray_batch.py                       # tiny model, 64 requests over 16 videos
    python benchmarks/ray_batch.py --videos 4 --questions 2 --frames 2 --max-tokens 8   # a fast check

The requests (`--videos` synthetic 640x360 H.264 clips, `--questions` questions each, listed round-robin,
`--frames` frames per video) are answered by:

  single process        `owlvid.batch.run` with `--threads` torch threads
  ray, N replica(s)     `owlvid.ray.run` on a local cluster (started before the clock), N replicas of
                        `--threads` CPUs each (Ray gives a replica that many torch threads)

Each run is timed whole ("job": loading the model, for Ray starting its replicas, a Python worker each
importing torch and loading the model; the cluster itself is started before the clock), and its start-up
alone ("start": the same run over one one-token request); "job - start" is the work. With one replica on
the resources of the single process, the difference is what Ray costs (scheduling, request lines and
answers through the object store, a process per replica, the last Ray batch of a replica running alone).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import perf  # noqa: E402 - the table printer

import owlvid  # noqa: E402
import owlvid.ray  # noqa: E402
from owlvid import batch  # noqa: E402
from owlvid.testing import make_tiny_owl3  # noqa: E402

QUESTIONS = ["What happens in this video?", "Who is in the video?", "Describe the setting in detail.",
             "What changes between the start and the end?"]


def write_videos(folder: Path, count: int, seconds: int = 4, fps: int = 25) -> list[Path]:
    """`count` different synthetic clips (moving random texture, 640x360 H.264)."""
    import av

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for v in range(count):
        path = folder / f"video{v:03d}.mp4"
        base = np.random.default_rng(v).integers(0, 256, (360, 640, 3), dtype=np.uint8)
        with av.open(str(path), "w") as out:
            stream = out.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
            for i in range(seconds * fps):
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.roll(base, 5 * i, axis=1),
                                                                       format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        paths.append(path)
    return paths


def request_line(custom_id: str, content: list[dict] | str, max_tokens: int, frames: int) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                     "media_io_kwargs": {"video": {"num_frames": frames}}}}


def write_requests(path: Path, videos: list[Path], questions: int, frames: int, max_tokens: int) -> int:
    """Round-robin: question 1 about every video, then question 2, ... Returns the number of requests."""
    lines = [request_line(f"v{v}-q{q}", [{"type": "video_url", "video_url": {"url": str(video)}},
                                         {"type": "text", "text": f"{QUESTIONS[q % len(QUESTIONS)]} ({q})"}],
                          max_tokens, frames)
             for q in range(questions) for v, video in enumerate(videos)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return len(lines)


def timed(fn: Callable[[], dict]) -> float:
    t0 = time.perf_counter()
    summary = fn()
    seconds = time.perf_counter() - t0
    if summary["failed"]:
        raise RuntimeError(f"{summary['failed']} request(s) failed: see {summary['output']}")
    return seconds


def row(name: str, start: float, seconds: float, n: int) -> dict:
    return {"run": name, "start s": start, "job s": seconds, "job - start s": seconds - start,
            "requests/s (job - start)": n / max(seconds - start, 1e-9)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=16)
    ap.add_argument("--questions", type=int, default=4, help="questions per video")
    ap.add_argument("--frames", type=int, default=8, help="frames per video")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--replicas", default="1,2", help="replica counts of the Ray rows")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of each model: the single process and each replica (default 1: the tiny "
                    "model gains nothing from more, and loses a lot on a loaded machine)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    import ray

    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="owlvid-ray-bench-"))
    model_dir = make_tiny_owl3(work / "tiny", "241101")
    source = work / "requests.jsonl"
    n = write_requests(source, write_videos(work / "videos", args.videos), args.questions, args.frames,
                       args.max_tokens)
    one = work / "one.jsonl"  # start-up alone: one one-token request
    one.write_text(json.dumps(request_line("one", "Hi", 1, args.frames)) + "\n")
    print(f"machine: {cores} cores, torch {torch.__version__}; {n} requests over {args.videos} videos, "
          f"{args.frames} frames, {args.max_tokens} tokens, max_batch {args.max_batch}")

    threads = args.threads
    torch.set_num_threads(threads)

    def single(source: Path, output: Path) -> dict:
        return batch.run(source, output, lambda: owlvid.load(model_dir, device="cpu", dtype="float32"),
                         max_batch=args.max_batch, progress=False)

    rows = [row(f"single process, {threads} thread(s)", timed(lambda: single(one, work / "one.out.jsonl")),
                timed(lambda: single(source, work / "single.jsonl")), n)]
    perf.table("single process", rows)

    replica_counts = [int(x) for x in args.replicas.split(",") if x]
    ray.init(num_cpus=max(cores, threads * max(replica_counts)), include_dashboard=False, log_to_driver=False)
    try:
        for replicas in replica_counts:
            options = {"device": "cpu", "dtype": "float32", "max_batch": args.max_batch, "num_replicas": replicas,
                       "cpus_per_replica": threads, "progress": False}  # Ray: OMP_NUM_THREADS = CPUs

            def on_ray(source: Path, output: Path, options: dict = options) -> dict:
                return owlvid.ray.run(source, output, model_dir, **options)

            output = work / f"ray-{replicas}.jsonl"
            rows.append(row(f"ray, {replicas} replica(s) x {threads} CPU",
                            timed(lambda r=replicas: on_ray(one, work / f"one-{r}.out.jsonl")),
                            timed(lambda out=output: on_ray(source, out)), n))
            rows[-1]["same answers"] = _answers(output) == _answers(work / "single.jsonl")
            perf.table(rows[-1]["run"], rows[-1:])
    finally:
        ray.shutdown()
    for r in rows:
        r["overhead (job - start)"] = f"{100 * (r['job - start s'] / rows[0]['job - start s'] - 1):+.0f}%"
        r["overhead (job)"] = f"{100 * (r['job s'] / rows[0]['job s'] - 1):+.0f}%"
    perf.table("owlvid batch: single process vs Ray", rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"cores": cores, "requests": n, "rows": rows}, indent=1))


def _answers(path: Path) -> dict[str, list]:
    """custom_id -> choices of an output file."""
    return {line["custom_id"]: line["response"]["body"]["choices"]
            for line in map(json.loads, path.read_text().splitlines())}


if __name__ == "__main__":
    main()
