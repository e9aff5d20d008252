"""`owlvid batch` against a plain loop over `model.chat`: requests per second on one machine, and where the
speed-up comes from (visual cache, batching).

    python benchmarks/batch.py                  # tiny + 1B-shape models, 64 requests over 16 videos
    python benchmarks/batch.py --quick          # 8 requests over 2 videos, 1 frame each: a fast check
    python benchmarks/batch.py --models 1b --frames 4 --max-tokens 16

The same requests (`--videos` synthetic 640x360 H.264 videos, `--questions` questions each, `num_frames`
frames per video) are answered by:

  loop, cache off          for each request in input order: `model.chat(...)`, no visual cache (what a
                           script over an engine without a cross-request cache does)
  loop, cache on           the same loop with owlvid's default visual cache
  batch, cache off, 1      `owlvid.batch.run` (input checks, request order by video, prefetching, output
                           file) with max_batch 1 and no visual cache
  batch, cache on, 1       ... with the visual cache
  batch, cache on, N       ... and continuous batching (max_batch N): `owlvid batch` as shipped
  batch, ..., prefetch 0   as the row above, with the media prepared on the engine thread (no overlap)

The input lists the questions round-robin over the videos (q1 of every video, then q2, ...), so the plain
loop meets each video again only after all the others. Random weights generate exactly `--max-tokens`
tokens per request (stop tokens off), so every row does the same decoding work. Speed-up shares are in
log terms (they add up to the whole): cache = log(r[cache on, 1] / r[cache off, 1]), batching =
log(r[cache on, N] / r[cache on, 1]), the rest (order, overlap, overheads) = log(r[cache off, 1] / r[loop,
cache off]), each divided by log(r[cache on, N] / r[loop, cache off]).

Ray rows (`--ray 1,2`, needs the `ray` extra; tiny model only): the shipped job on a local Ray cluster with
that many replicas against the same job in this process, start-up measured apart (see `ray_rows`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import perf  # noqa: E402 - real-shape random models, the table printer

import owlvid  # noqa: E402
from owlvid import batch  # noqa: E402
from owlvid.cache import VisualCache  # noqa: E402
from owlvid.testing import make_tiny_owl3, write_tiny_tokenizer  # noqa: E402

QUESTIONS = ["What happens in this video?", "Who is in the video?", "Describe the setting in detail.",
             "What changes between the start and the end?", "Is anyone outside?", "What colour dominates?"]


def machine() -> dict:
    """CPU, cores, torch, and whether this CPU has a bf16 matmul path (lscpu flags avx512_bf16 / amx)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        out = ""
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    return {"cpu": fields.get("Model name", platform.processor() or platform.machine()).strip(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def write_videos(folder: Path, count: int, seconds: int = 4, fps: int = 25) -> list[Path]:
    """`count` different synthetic clips (moving random texture, 640x360 H.264)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"video{v:03d}.mp4" for v in range(count)]
    for v, path in enumerate(paths):
        perf.synthetic_video(path, seconds, fps, seed=v)
    return paths


def request_lines(videos: list[Path], questions: int, frames: int, max_tokens: int) -> list[dict]:
    """Round-robin: question 1 about every video, then question 2, ..."""
    lines = []
    for q in range(questions):
        for v, path in enumerate(videos):
            content = [{"type": "video_url", "video_url": {"url": str(path)}},
                       {"type": "text", "text": f"{QUESTIONS[q % len(QUESTIONS)]} ({q})"}]
            lines.append({"custom_id": f"v{v}-q{q}", "method": "POST", "url": "/v1/chat/completions",
                          "body": {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                                   "media_io_kwargs": {"video": {"num_frames": frames}}}})
    return lines


def as_messages(line: dict) -> list[dict]:
    """A request line as `model.chat` messages (what a user's own loop would pass)."""
    path = line["body"]["messages"][0]["content"][0]["video_url"]["url"]
    frames = line["body"]["media_io_kwargs"]["video"]["num_frames"]
    text = line["body"]["messages"][0]["content"][1]["text"]
    return [{"role": "user", "content": [{"type": "video", "video": path, "num_frames": frames},
                                         {"type": "text", "text": text}]}]


def set_cache(model: owlvid.Model, on: bool) -> None:
    """A fresh, empty visual cache (or none); no conversation prefix kept from an earlier row."""
    model.runtime.visual_cache = VisualCache(8 << 30) if on else None
    model.runtime._prefixes.clear()


def run_loop(model: owlvid.Model, lines: list[dict], max_tokens: int, cache: bool) -> float:
    set_cache(model, cache)
    t0 = time.perf_counter()
    for line in lines:
        model.chat(as_messages(line), max_new_tokens=max_tokens)
    return time.perf_counter() - t0


def run_batch(model: owlvid.Model, source: Path, work: Path, cache: bool, max_batch: int, prefetch: int) -> float:
    set_cache(model, cache)
    output = work / f"out-{time.monotonic_ns()}.jsonl"
    t0 = time.perf_counter()
    summary = batch.run(source, output, model, max_batch=max_batch, prefetch=prefetch, progress=False)
    seconds = time.perf_counter() - t0
    if summary["failed"]:
        raise RuntimeError(f"{summary['failed']} request(s) failed: see {output}")
    return seconds


def ray_rows(label: str, source: Path, work: Path, args: argparse.Namespace) -> list[dict]:
    """The shipped job (max_batch N) on a local Ray cluster with each replica count of `--ray`, against the
    same job in this process, both loading the model from its folder (Ray replicas cannot take a model built
    in memory: tiny only). Each is timed whole ("job s": loading the model; for Ray, starting a worker per
    replica that imports torch and loads it) and over one one-token request ("start s"); "seconds" is
    job - start, the work. These rows keep the checkpoint's stop tokens (the rows above generate exactly
    max_tokens), so compare them with each other. The replicas share this machine's cores (cores / N CPUs
    each, that many torch threads: one replica has the single process's threads)."""
    if not args.ray:
        return []
    if label != "tiny":
        print(f"\n(Ray rows for {label}: the replicas load a checkpoint folder, this model is built in memory)")
        return []
    import ray

    import owlvid.ray

    folder = work / "tiny"  # written by load()
    one = work / "one-request.jsonl"
    one.write_text(json.dumps({"custom_id": "one", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}}) + "\n")
    n = sum(1 for line in source.read_text().splitlines() if line.strip())
    cores = os.cpu_count() or 1

    def timed(run: Callable[[Path, Path], dict], source: Path) -> float:
        output = work / f"ray-bench-{time.monotonic_ns()}.jsonl"
        t0 = time.perf_counter()
        summary = run(source, output)
        if summary["failed"]:
            raise RuntimeError(f"{summary['failed']} request(s) failed: see {output}")
        return time.perf_counter() - t0

    def row(name: str, run: Callable[[Path, Path], dict]) -> dict:
        start = min(timed(run, one) for _ in range(args.repeat))  # the least disturbed runs count
        job = min(timed(run, source) for _ in range(args.repeat))
        return {"model": label, "dtype": "float32", "device": "cpu", "run": name, "requests": n,
                "start s": start, "job s": job, "seconds": job - start, "requests_per_s": n / (job - start)}

    def single(source: Path, output: Path) -> dict:
        return batch.run(source, output, lambda: owlvid.load(folder, device="cpu", dtype="float32"),
                         max_batch=args.max_batch, prefetch=args.prefetch, progress=False)

    rows = [row(f"batch from the folder, single process, {torch.get_num_threads()} threads", single)]
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    try:
        for replicas in args.ray:
            cpus = max(cores // replicas, 1)

            def on_ray(source: Path, output: Path, replicas: int = replicas, cpus: int = cpus) -> dict:
                return owlvid.ray.run(source, output, folder, device="cpu", dtype="float32", max_batch=args.max_batch,
                                      prefetch=args.prefetch, num_replicas=replicas, cpus_per_replica=cpus,
                                      progress=False)

            rows.append(row(f"ray, {replicas} replica(s) x {cpus} CPU", on_ray))
            perf.table(f"{label}: {rows[-1]['run']}", rows[-1:])
    finally:
        ray.shutdown()
    for r in rows:
        r["ray overhead (job s)"] = f"{100 * (r['job s'] / rows[0]['job s'] - 1):+.0f}%"
    return rows


def load(label: str, device: str, work: Path, dtype: str = "auto") -> tuple[owlvid.Model, str]:
    """(model, dtype name): `tiny` is the test checkpoint (hidden 16, float32), `1b` the real 1B-241014 shape
    with random weights; `dtype="auto"` is what `owlvid.load` picks: bf16 where the hardware has a bf16 path
    (CUDA, AVX512-BF16/AMX), float32 elsewhere."""
    fast_bf16 = device == "cuda" or owlvid.checkpoint.cpu_has_fast_bf16()
    if label == "tiny":
        model = owlvid.load(make_tiny_owl3(work / "tiny"), device=device, dtype="float32")
        dtype = "float32"
    else:
        tok = work / "tokenizer"
        write_tiny_tokenizer(tok)
        dtype = ("bfloat16" if fast_bf16 else "float32") if dtype == "auto" else dtype
        model = perf.build_model(label, getattr(torch, dtype), tok)
        if device != "cpu":
            model.runtime.model.to(device)
            model.runtime.device = torch.device(device)
            model.runtime.model.rope = type(model.runtime.model.rope)(
                model.runtime.cfg.llm.head_dim, model.runtime.cfg.llm.rope_theta,
                model.runtime.cfg.llm.max_position_embeddings, torch.device(device))
    model.runtime.stop_token_ids = []  # random weights: exactly max_tokens tokens per request
    return model, dtype


def measure(label: str, args: argparse.Namespace, work: Path) -> list[dict]:
    frames = args.frames or (8 if label == "tiny" else 2)
    max_tokens = args.max_tokens or (32 if label == "tiny" else 16)
    videos = write_videos(work / f"videos-{label}", args.videos)
    lines = request_lines(videos, args.questions, frames, max_tokens)
    source = work / f"requests-{label}.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    model, dtype = load(label, args.device, work, args.dtype)
    # warm-up of both paths (first-call costs, kernels for new shapes are nobody's)
    run_loop(model, lines[:2], 2, cache=False)
    warm = work / f"warm-{label}.jsonl"
    warm.write_text("".join(json.dumps(line) + "\n" for line in lines[:2]))
    run_batch(model, warm, work, False, 2, args.prefetch)
    if args.ray_only:  # the Ray rows and their single-process reference only (long jobs: start-up amortized)
        return ray_rows(label, source, work, args)
    n = len(lines)
    runs: list[tuple[str, Callable[[], float]]] = [
        ("loop, cache off", lambda: run_loop(model, lines, max_tokens, False)),
        ("loop, cache on", lambda: run_loop(model, lines, max_tokens, True)),
        ("batch, cache off, max_batch 1", lambda: run_batch(model, source, work, False, 1, args.prefetch)),
        ("batch, cache on, max_batch 1", lambda: run_batch(model, source, work, True, 1, args.prefetch)),
        (f"batch, cache on, max_batch {args.max_batch}",
         lambda: run_batch(model, source, work, True, args.max_batch, args.prefetch)),
        (f"batch, cache on, max_batch {args.max_batch}, prefetch 0",
         lambda: run_batch(model, source, work, True, args.max_batch, 0)),
    ]
    if args.runs:  # a subset (long real-shape runs); the speed-up split needs all of them
        runs = [(name, fn) for name, fn in runs if name in args.runs]
    rows = []
    for name, fn in runs:
        seconds = min(fn() for _ in range(args.repeat))  # the least disturbed run on a shared machine
        rows.append({"model": label, "dtype": dtype, "device": args.device, "run": name, "requests": n,
                     "frames": frames, "max_tokens": max_tokens, "seconds": seconds, "requests_per_s": n / seconds})
        perf.table(f"{label}: {name}", rows[-1:])
    rows += ray_rows(label, source, work, args)
    if args.runs:
        return rows
    rate = {r["run"]: r["requests_per_s"] for r in rows}
    base = rate["loop, cache off"]
    for r in rows:
        r["vs_loop_cache_off"] = r["requests_per_s"] / base
    shipped = rate[f"batch, cache on, max_batch {args.max_batch}"]
    whole = math.log(shipped / base)
    if abs(whole) > 1e-9:
        parts = {"cache": math.log(rate["batch, cache on, max_batch 1"] / rate["batch, cache off, max_batch 1"]),
                 "batching": math.log(shipped / rate["batch, cache on, max_batch 1"]),
                 "rest (order, overlap, overheads)": math.log(rate["batch, cache off, max_batch 1"] / base)}
        rows.append({"model": label, "dtype": dtype, "device": args.device,
                     "run": f"speed-up {shipped / base:.2f}x: share from "
                            + ", ".join(f"{k} {100 * v / whole:.0f}%" for k, v in parts.items())})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,1b", help="tiny, 1b (comma-separated)")
    ap.add_argument("--videos", type=int, default=16)
    ap.add_argument("--questions", type=int, default=4, help="questions per video")
    ap.add_argument("--frames", type=int, default=None, help="frames per video (default: tiny 8, 1b 2)")
    ap.add_argument("--max-tokens", type=int, default=None, help="tokens per answer (default: tiny 32, 1b 16)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="of the 1b model (auto: as owlvid.load; the tiny one is always float32)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per row; the fastest counts")
    ap.add_argument("--quick", action="store_true", help="2 videos x 4 questions, 1 frame, 4 tokens")
    ap.add_argument("--ray", default="", help="replica counts for Ray rows, e.g. 1,2 (see ray_rows)")
    ap.add_argument("--runs", type=lambda t: [x.strip() for x in t.split(";") if x.strip()], default=None,
                    help="only these rows, by name, ';'-separated (e.g. 'loop, cache on;batch, cache on, max_batch 8')")
    ap.add_argument("--ray-only", action="store_true", help="only the Ray rows and the single-process job")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    if args.quick:
        args.videos, args.questions = 2, 4
        args.frames, args.max_tokens = args.frames or 1, args.max_tokens or 4
    args.ray = [int(x) for x in args.ray.split(",") if x]
    info = machine()
    bf16 = "yes" if info["avx512_bf16"] or info["amx_bf16"] or info["cuda"] else "no"
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), "
          f"GPU: {info['cuda'] or 'none'}; bf16 matmul hardware (avx512_bf16/amx or CUDA): {bf16}")
    work = Path(tempfile.mkdtemp(prefix="owlvid-batch-bench-"))
    rows = []
    for label in args.models.split(","):
        rows += measure(label, args, work)
    perf.table("owlvid batch vs a loop over model.chat", rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
