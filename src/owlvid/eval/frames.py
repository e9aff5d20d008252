"""Which frames a protocol shows the model, decoded with owlvid's media layer.

The index math is the protocols' own, so the frames are exactly theirs:

* ``middle`` (official mPLUG-Owl3 evaluation, ``read_frames_decord(sample='middle')``): ``n`` equal segments
  of the whole video, the middle frame of each, padded with the last one (the media layer's ``owl3-eval``
  preset). With a bound whose start *and* end are non-zero (``if start_time and end_time``) it is
  ``get_frame_indices_start_end`` instead: segments of ``[int(fps*start), min(int(fps*end), vlen))`` and a
  **random** frame of each (``random.choice(range(a, b - 1))``; a numpy permutation when a segment is too
  short). The official draw is unseeded; here it is seeded per question and the seed is in the audit. A
  bound starting at 0 (LongVideoBench's ``[0, duration]``) therefore means the whole video, as there.
* ``middle`` on a frame folder (MVBench episodic_reasoning, TVQA frames at 3 fps): the official
  ``MVBench_dataset.get_index`` with ``first_idx=1`` over ``len(os.listdir(folder))`` files named
  ``{index:05d}.jpg``.
* ``linspace`` / ``uniform`` (Slow-Fast authors, lmms-eval models): ``np.linspace(0, n_frames - 1, n)``
  cast to int over the frames inside the bound (the whole video without one): the media layer's
  ``slowfast`` preset on the ``[start, end)`` window.

Frames are decoded by index (``owlvid.media.load_video``), so the audit (indices, timestamps, decoder) is
that of the frames the model saw.
"""

from __future__ import annotations

import os
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, MediaError
from ..media import VideoSampling, load_video, probe_video, sample_indices
from .datasets import Question

FRAME_CHOICES = ("middle", "linspace", "uniform")


@dataclass
class DecodedFrames:
    """The frames a question's model input gets, and where they came from."""

    frames: list[Any]  # PIL images
    indices: list[int]  # source frame numbers (frame folders: the official file numbers, or list positions)
    timestamps: list[float]  # seconds
    decoder: str  # the media layer's backend ("pyav", "frames", ...)
    source: Path
    extra: dict[str, Any] = field(default_factory=dict)  # seed, bound used, video length ...

    def audit(self) -> dict[str, Any]:
        return {"indices": self.indices, "timestamps": [round(t, 4) for t in self.timestamps],
                "decoder": self.decoder, **self.extra}


def question_seed(qid: str, seed: int = 0) -> int:
    """A stable per-question seed (the same on every run and resume)."""
    return zlib.crc32(f"{seed}:{qid}".encode()) & 0x7FFFFFFF


# -- the official index math ----------------------------------------------------------------------------


def official_bounded_indices(num_frames: int, vlen: int, fps: float, start: float, end: float,
                             rng: random.Random, np_rng: np.random.RandomState) -> list[int]:
    """mPLUG-Owl3 evaluation `get_frame_indices_start_end`: a random frame in each of `num_frames`
    segments of the bound (padded with the last); raises MediaError where the official code crashes
    (a bound with no frame)."""
    start_idx = max(int(fps * start), 0)
    end_idx = min(int(fps * end), vlen)
    clip_len = end_idx - start_idx
    acc = min(num_frames, clip_len)
    if acc < 1:
        raise MediaError(f"the bound [{start}, {end}] s holds no frame of this {vlen}-frame video "
                         "(the official code fails here too)")
    edges = np.linspace(start=start_idx, stop=end_idx, num=acc + 1).astype(int)
    ranges = [(int(edges[k]), int(edges[k + 1]) - 1) for k in range(acc)]
    if all(b > a for a, b in ranges):
        picked = [rng.choice(range(a, b)) for a, b in ranges]
    else:  # an empty segment: the official `except` branch
        picked = sorted(int(i) for i in np_rng.permutation(list(range(start_idx, end_idx)))[:acc])
    return picked + [picked[-1]] * (num_frames - len(picked))


def official_frame_folder_indices(num_segments: int, n_files: int, bound: tuple[float, float] | None,
                                  fps: float) -> list[int]:
    """MVBench `get_index(bound, fps, max_frame=len(os.listdir(folder)), first_idx=1)`: file numbers."""
    start, end = bound if bound else (-100000, 100000)
    start_idx = max(1, round(start * fps))
    end_idx = min(round(end * fps), n_files)
    seg_size = float(end_idx - start_idx) / num_segments
    return [int(start_idx + (seg_size / 2) + np.round(seg_size * idx)) for idx in range(num_segments)]


# -- choosing and decoding ----------------------------------------------------------------------------------


def reuse_key(question: Question, frame_choice: str, num_frames: int) -> tuple:
    """Questions with equal keys get the same frames (the same video, choice and bound; the official
    random draw is per question), so the runner decodes them once."""
    bound = question.bound
    per_question = frame_choice == "middle" and question.video_kind == "video" and bound and bound[0] and bound[1]
    return (str(question.video), frame_choice, num_frames, bound, question.qid if per_question else None)


def decode_frames(question: Question, frame_choice: str, num_frames: int, *, seed: int = 0,
                  backend: str = "pyav") -> DecodedFrames:
    """Decode the frames `frame_choice` picks for `question` (MediaError/InputError when it cannot)."""
    if frame_choice not in FRAME_CHOICES:
        raise InputError(f"unknown frame choice {frame_choice!r}; choose one of {', '.join(FRAME_CHOICES)}")
    path = question.video
    if not path.exists():
        kind = "frame folder" if question.video_kind == "frames" else "video"
        raise MediaError(f"{kind} not found: {path}")
    if question.video_kind == "frames":
        return _frame_folder(question, frame_choice, num_frames)
    info = probe_video(path, backend=backend)
    total, fps = info["total_frames"], info["fps"]
    extra: dict[str, Any] = {"total_frames": total, "fps": round(fps, 6)}
    bound = question.bound
    if frame_choice == "middle":
        if bound and bound[0] and bound[1]:  # the official `if start_time and end_time`
            qseed = question_seed(question.qid, seed)
            indices = official_bounded_indices(num_frames, total, fps, bound[0], bound[1], random.Random(qseed),
                                               np.random.RandomState(qseed))
            extra.update(bound=list(bound), seed=qseed)
        else:
            indices = sample_indices("owl3-eval", total, fps, num_frames=num_frames)
    else:
        spec = VideoSampling(preset="slowfast", num_frames=num_frames, **_window(bound))
        indices = spec.select(total, fps, None, info["duration"], cap=None)
        if bound:
            extra["bound"] = list(bound)
    clip = load_video(path, indices=indices, backend=backend)
    if clip.indices != indices:
        raise MediaError(f"{path}: frames {sorted(set(indices) - set(clip.indices))} could not be decoded")
    return DecodedFrames(clip.frames, clip.indices, clip.timestamps, clip.backend, path, extra)


def _window(bound: tuple[float, float] | None) -> dict[str, float]:
    if not bound:
        return {}
    start, end = bound
    return {"start": start or None, "end": end} if end > (start or 0) else {}


def _frame_folder(question: Question, frame_choice: str, num_frames: int) -> DecodedFrames:
    folder = question.video
    fps = question.frame_fps or 1.0
    if frame_choice == "middle":  # the official file numbers, files opened by name as the official code
        numbers = official_frame_folder_indices(num_frames, len(os.listdir(folder)), question.bound, fps)
        files = [folder / f"{n:05d}.jpg" for n in numbers]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise MediaError(f"{folder}: frame file(s) {', '.join(missing[:3])} not found")
        clip = load_video([str(f) for f in files], indices=list(range(len(files))), source_fps=fps)
        return DecodedFrames(clip.frames, numbers, [n / fps for n in numbers], clip.backend, folder,
                             {"files": [f.name for f in files], "fps": fps})
    spec = VideoSampling(preset="slowfast", num_frames=num_frames, **_window(question.bound))
    clip = load_video(str(folder), sampling=spec, source_fps=fps)
    return DecodedFrames(clip.frames, clip.indices, clip.timestamps, clip.backend, folder,
                         {"fps": fps, **({"bound": list(question.bound)} if question.bound else {})})
