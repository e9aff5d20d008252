"""Decode benchmark: how long (and how much memory) it takes to sample N frames from long videos.

Generates (once, cached) synthetic 720p H.264 videos of 10 and 60 minutes (25 fps, a keyframe every
8 s, x264 ``ultrafast``; a moving square plus the frame number drawn as bits, so every result is also
checked for the exact frames), then, for 16 / 64 / 256 frames spread over the whole video (the
``slowfast`` preset), times ``owlvid.media.load_video`` with each decode strategy (``seek``,
``sequential``, ``auto``) against a full decode of every frame. ``--sampling owl3-eval`` takes the
middle frame of N equal segments instead.

Each measurement runs in a fresh subprocess so that its peak resident memory
(``getrusage(RUSAGE_SELF).ru_maxrss``, which counts FFmpeg's C allocations too) is its own.

    PYTHONPATH=src python benchmarks/decode.py            # full run (generates ~70 min of video once)
    PYTHONPATH=src python benchmarks/decode.py --quick    # 2- and 12-minute videos, fewer cases
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WIDTH, HEIGHT, FPS, GOP_SECONDS = 1280, 720, 25, 8
BIT_CELL = 40  # frame number bits: 24 cells of 40x40 along the top edge
N_BITS = 24
HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = Path(os.environ.get("OWLVID_BENCH_CACHE", Path(tempfile.gettempdir()) / "owlvid-bench"))


# ------------------------------------------------------------------------------------- the videos

def _texture() -> np.ndarray:
    """A smooth random texture twice the frame width: panning over it gives every frame real detail
    (residuals and motion vectors to decode), while x264 ultrafast still encodes it at ~300 fps."""
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 256, (HEIGHT // 8 + 2, WIDTH // 4 + 2), dtype=np.uint8)
    return np.asarray(Image.fromarray(noise).resize((2 * WIDTH, HEIGHT), Image.Resampling.BICUBIC))


def _frame_yuv(i: int, texture: np.ndarray) -> np.ndarray:
    """One yuv420p frame as an (H*3/2, W) array: panned texture, a moving square, the frame number."""
    a = np.empty((HEIGHT * 3 // 2, WIDTH), np.uint8)
    a[HEIGHT:] = 128  # gray chroma
    off = (i * 3) % WIDTH
    y = a[:HEIGHT]
    y[:] = texture[:, off : off + WIDTH]
    x0 = (i * 8) % (WIDTH - 160)
    y0 = 200 + int(150 * np.sin(i / 50.0))
    y[y0 : y0 + 160, x0 : x0 + 160] = 220
    for b in range(N_BITS):
        y[0:BIT_CELL, b * BIT_CELL : (b + 1) * BIT_CELL] = 235 if (i >> b) & 1 else 16
    return a


def read_frame_number(img) -> int:
    """The frame number drawn by :func:`_frame_yuv`, read back from a decoded RGB frame of any size."""
    g = np.asarray(img.convert("L"), np.float64)
    sx, sy = g.shape[1] / WIDTH, g.shape[0] / HEIGHT
    value = 0
    for b in range(N_BITS):
        x0, x1 = int((b * BIT_CELL + 10) * sx), int((b * BIT_CELL + 30) * sx)
        cell = g[int(10 * sy) : int(30 * sy) + 1, x0 : max(x1, x0 + 1)]
        if cell.mean() > 128:
            value |= 1 << b
    return value


def make_video(path: Path, minutes: float) -> float:
    """Encode the synthetic video (if not cached); returns the seconds it took (0 when cached)."""
    if path.exists():
        return 0.0
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial.mp4")
    n = int(round(minutes * 60 * FPS))
    texture = _texture()
    t0 = time.perf_counter()
    with av.open(str(tmp), "w") as c:
        s = c.add_stream("libx264", rate=FPS)
        s.width, s.height, s.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        gop = GOP_SECONDS * FPS
        # ultrafast for encoding speed, but with CABAC, deblocking and 2 B-frames switched back on so that
        # decoding costs (and frame reordering) look like a real H.264 file.
        s.options = {"preset": "ultrafast", "crf": "23", "x264-params":
                     f"keyint={gop}:min-keyint={gop}:scenecut=0:cabac=1:deblock=1:bframes=2"}
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(_frame_yuv(i, texture), format="yuv420p")
            frame.pts = i
            for p in s.encode(frame):
                c.mux(p)
            if i % (FPS * 600) == 0 and i:
                print(f"  encoded {i / FPS / 60:.0f} of {minutes:g} min", file=sys.stderr, flush=True)
        for p in s.encode():
            c.mux(p)
    tmp.rename(path)
    return time.perf_counter() - t0


# -------------------------------------------------------------------------------- measurements

def child(args: dict) -> dict:
    """Runs in a subprocess: one measurement."""
    import av

    from owlvid.media import load_video

    path = args["video"]
    t0 = time.perf_counter()
    result: dict = {}
    if args["kind"] == "full":
        with av.open(path) as c:
            s = c.streams.video[0]
            s.thread_type = "AUTO"
            result["frames"] = sum(1 for _ in c.decode(s))
        result["ok"] = True
    else:
        clip = load_video(path, sampling=args.get("sampling", "slowfast"), max_frames=args["n"],
                          decode_strategy=args["strategy"])
        result["frames"] = len(clip)
        elapsed = time.perf_counter() - t0
        result["ok"] = [read_frame_number(f) for f in clip.frames] == clip.indices
        result["seconds"] = elapsed
    result.setdefault("seconds", time.perf_counter() - t0)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def run_child(args: dict, timeout: float) -> dict:
    env = dict(os.environ)
    src = str(HERE.parent / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    try:
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True,
                             text=True, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if out.returncode != 0:
        err = out.stderr.strip()
        return {"error": err.splitlines()[-1] if err else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def baseline_rss() -> float:
    code = ("import resource, av, numpy, PIL.Image; import owlvid.media; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    env = dict(os.environ, PYTHONPATH=str(HERE.parent / "src"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.strip())


def machine() -> dict:
    import av

    return {
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_name(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "pyav": av.__version__,
        "ffmpeg": ".".join(map(str, av.library_versions.get("libavcodec", ()))),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2- and 12-minute videos, 16 and 64 frames only")
    ap.add_argument("--minutes", type=float, nargs="+", help="video lengths (default 10 60; quick: 2 12)")
    ap.add_argument("--frames", type=int, nargs="+", help="frame counts (default 16 64 256)")
    ap.add_argument("--strategies", nargs="+", default=["seek", "sequential", "auto"])
    ap.add_argument("--sampling", default="slowfast", choices=["slowfast", "owl3-eval"],
                    help="which frames: slowfast = np.linspace(0, n-1, N) (on these videos its picks sit "
                         "just before keyframes: the worst case for seeking), owl3-eval = middle of N "
                         "segments")
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--output", type=Path, default=HERE / "results" / "decode.json")
    ap.add_argument("--no-full", action="store_true", help="skip the full-decode baseline")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    minutes = args.minutes or ([2, 12] if args.quick else [10, 60])
    frames = args.frames or ([16, 64] if args.quick else [16, 64, 256])
    info = machine()
    print(f"machine: {info['cpu_count']} CPU cores ({info['cpu']}), PyAV {info['pyav']}, "
          f"libavcodec {info['ffmpeg']}, Python {info['python']}")
    videos = {}
    gen_seconds = {}
    for m in minutes:
        path = args.cache_dir / f"synthetic_{m:g}min_720p{FPS}_gop{GOP_SECONDS}s.mp4"
        print(f"video {m:g} min: {path}", flush=True)
        gen_seconds[m] = make_video(path, m)
        if gen_seconds[m]:
            print(f"  generated in {gen_seconds[m]:.0f} s ({path.stat().st_size / 1e6:.0f} MB)")
        videos[m] = str(path)
    base = baseline_rss()
    print(f"baseline RSS of an idle process with owlvid.media imported: {base:.0f} MB\n")

    rows = []
    header = (f"{'video':>7} {'frames':>6} {'strategy':>10} {'seconds':>8} {'peak MB':>8} "
              f"{'vs full':>8}  check")
    print(header)
    print("-" * len(header))
    for m in minutes:
        full: dict = {}
        if not args.no_full:
            full = run_child({"video": videos[m], "kind": "full"}, args.timeout)
            rows.append({"minutes": m, "frames": full.get("frames"), "strategy": "full decode", **full})
            print(_row(m, full.get("frames", "-"), "full", full, None), flush=True)
        for n in frames:
            for strategy in args.strategies:
                job = {"video": videos[m], "kind": "sample", "n": n, "strategy": strategy,
                       "sampling": args.sampling}
                r = run_child(job, args.timeout)
                rows.append({"minutes": m, "frames": n, "strategy": strategy, **r})
                print(_row(m, n, strategy, r, full.get("seconds")), flush=True)

    summary = _summary(rows, minutes)
    for line in summary:
        print(line)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"machine": info, "sampling": args.sampling, "baseline_rss_mb": base,
                                       "video_generation_seconds":
                                       {str(k): v for k, v in gen_seconds.items()}, "width": WIDTH,
                                       "height": HEIGHT, "fps": FPS, "keyframe_interval_s": GOP_SECONDS,
                                       "results": rows, "summary": summary}, indent=2) + "\n")
    print(f"\nwrote {args.output}")


def _row(m, n, strategy, r, full_seconds) -> str:
    if "error" in r:
        return f"{m:>5g}m {n:>6} {strategy:>10}  error: {r['error']}"
    if full_seconds:
        speed = f"{full_seconds / r['seconds']:>7.1f}x"
    else:
        speed = f"{'1.0x' if strategy == 'full' else '-':>8}"
    check = "ok" if r.get("ok") else "WRONG FRAMES"
    return f"{m:>5g}m {n:>6} {strategy:>10} {r['seconds']:>8.2f} {r['peak_rss_mb']:>8.0f} {speed}  {check}"


def _summary(rows: list[dict], minutes: list[float]) -> list[str]:
    def seconds(m, n, strategy):
        for r in rows:
            if r["minutes"] == m and r["frames"] == n and r["strategy"] == strategy and "seconds" in r:
                return r["seconds"]
        return None

    out = []
    if len(minutes) >= 2:
        short, long = min(minutes), max(minutes)
        a, b = seconds(short, 16, "auto"), seconds(long, 16, "auto")
        if a and b:
            out.append(f"16 frames, auto: {long:g} min video {b:.2f} s vs {short:g} min {a:.2f} s "
                       f"(ratio {b / a:.2f}, goal < 2)")
    for m in minutes:
        full = next((r["seconds"] for r in rows if r["minutes"] == m and r["strategy"] == "full decode"
                     and "seconds" in r), None)
        a = seconds(m, 16, "auto")
        if full and a:
            out.append(f"16 frames, auto, {m:g} min: {full / a:.1f}x faster than a full decode (goal >= 5x)")
    return out


if __name__ == "__main__":
    main()
