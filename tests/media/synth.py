"""Synthetic test videos whose frames carry their own index in the pixels.

Each frame is a 4 x 3 grid of 32 x 32 blocks; block ``b`` (row-major) is white when bit ``b`` of the
frame index is set, else black. Big flat blocks survive H.264 at any sane quality, so the index read
back from a decoded frame identifies the exact source frame.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from fractions import Fraction

import av
import numpy as np
from PIL import Image

W, H = 128, 96
COLS, ROWS, CELL = 4, 3, 32


def index_frame(i: int) -> np.ndarray:
    """H x W x 3 uint8 frame encoding ``i`` (0 <= i < 4096); a colour strip marks the top edge."""
    a = np.zeros((H, W, 3), np.uint8)
    for b in range(COLS * ROWS):
        if (i >> b) & 1:
            r, c = divmod(b, COLS)
            a[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL] = 255
    return a


def read_index(img: Image.Image | np.ndarray) -> int:
    """Decode the index from a frame (any size: the grid is scaled to the frame)."""
    a = np.asarray(img.convert("L") if isinstance(img, Image.Image) else img, dtype=np.float64)
    if a.ndim == 3:
        a = a.mean(axis=2)
    h, w = a.shape
    cw, ch = w / COLS, h / ROWS
    value = 0
    for b in range(COLS * ROWS):
        r, c = divmod(b, COLS)
        y0, y1 = int((r + 0.25) * ch), int((r + 0.75) * ch)
        x0, x1 = int((c + 0.25) * cw), int((c + 0.75) * cw)
        if a[y0:y1, x0:x1].mean() > 127:
            value |= 1 << b
    return value


def write_video(
    target,
    n: int,
    *,
    fps: int = 25,
    codec: str = "libx264",
    gop: int = 10,
    bframes: int = 2,
    pts_ms: Sequence[int] | None = None,
    rotation: int | None = None,
    faststart: bool = False,
    container_format: str | None = None,
    frame_fn=index_frame,
    pix_fmt: str = "yuv420p",
    audio: bool = False,
) -> None:
    """Write ``n`` index frames. ``pts_ms``: explicit presentation times in ms (variable frame rate)."""
    opts = {"movflags": "faststart"} if faststart else {}
    with av.open(target, "w", format=container_format, options=opts) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = W, H, pix_fmt
        if codec == "libx264":
            s.options = {"crf": "10", "preset": "veryfast", "bf": str(bframes),
                         "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"}
        elif codec == "libx265":  # x265 defaults to open GOPs (CRA + RASL leading pictures)
            s.options = {"crf": "8", "preset": "ultrafast", "x265-params":
                         f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes={bframes}:log-level=none"}
        else:
            s.codec_context.gop_size = gop
            s.options = {"qscale": "2"} if codec == "mpeg4" else {}
        if pts_ms is not None:
            s.codec_context.time_base = Fraction(1, 1000)
            s.time_base = Fraction(1, 1000)
        if rotation is not None:
            s.set_display_rotation(rotation)
        a_stream = c.add_stream("aac", rate=16000) if audio else None
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(frame_fn(i), format="rgb24")
            if pts_ms is not None:
                frame.pts = int(pts_ms[i])
                frame.time_base = Fraction(1, 1000)
            else:
                frame.pts = i
                frame.time_base = Fraction(1, fps)
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
        if a_stream is not None:
            _write_tone(c, a_stream, seconds=n / fps)


def _write_tone(c, stream, seconds: float) -> None:
    rate = 16000
    t = np.arange(int(rate * seconds)) / rate
    samples = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    step = 1024
    for k in range(0, len(samples), step):
        chunk = samples[k : k + step]
        if len(chunk) < step:
            chunk = np.pad(chunk, (0, step - len(chunk)))
        frame = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
        frame.sample_rate = rate
        frame.pts = k
        for p in stream.encode(frame):
            c.mux(p)
    for p in stream.encode():
        c.mux(p)


def write_audio_only(path) -> None:
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=16000)
        _write_tone(c, s, seconds=1.0)


def write_empty_video(path) -> None:
    """A Matroska file with a video track that has no frame (and an audio track so that it opens)."""
    with av.open(str(path), "w", format="matroska") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        a = c.add_stream("aac", rate=16000)
        c.start_encoding()
        _write_tone(c, a, seconds=1.0)


def png_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()
