"""The frames a protocol shows the model, decoded with owlvid's media layer, with their audit.

The index math is the protocol's (`Protocol.frame_indices`: official segment middles, the official random
draw inside an MVBench bound, `get_index` over a TVQA frame folder, the Slow-Fast fork's PyAV rule ...);
here the video is probed (frame count, average rate), those indices are decoded exactly
(`owlvid.media.load_video(indices=...)`), and the audit records what the model saw: indices, timestamps,
the decoder, and the seed of a random draw.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MediaError
from ..media import list_frame_files, load_video, probe_video
from .datasets import Question
from .protocols import Protocol


@dataclass
class DecodedFrames:
    """The frames a question's model input gets, and where they came from."""

    frames: list[Any]  # PIL images
    indices: list[int]  # source frame numbers (frame folders: positions in the sorted frame files)
    timestamps: list[float]  # seconds
    decoder: str  # the media layer's backend ("pyav", "frames", ...)
    source: Path
    extra: dict[str, Any] = field(default_factory=dict)  # seed, bound, video length ...

    def audit(self) -> dict[str, Any]:
        return {"indices": self.indices, "timestamps": [round(t, 4) for t in self.timestamps],
                "decoder": self.decoder, **self.extra}


def question_seed(qid: str, seed: int = 0) -> int:
    """A stable per-question seed (the same on every run and resume)."""
    return zlib.crc32(f"{seed}:{qid}".encode()) & 0x7FFFFFFF


def draws_per_question(question: Question, proto: Protocol) -> bool:
    """Whether the protocol draws this question's frames at random (the official MVBench bound)."""
    bound = question.bound
    return (proto.bound == "official_random" and question.video_kind == "video" and bound is not None
            and bool(bound[0]) and bool(bound[1]))


def reuse_key(question: Question, proto: Protocol) -> tuple:
    """Questions with equal keys get the same frames, so the runner decodes them once."""
    return (str(question.video), question.video_kind, question.bound, proto.num_frames,
            question.qid if draws_per_question(question, proto) else None)


def decode_frames(question: Question, proto: Protocol, *, seed: int = 0, backend: str = "pyav") -> DecodedFrames:
    """Decode the frames `proto` picks for `question` (MediaError/InputError when it cannot)."""
    path = question.video
    if not path.exists():
        kind = "frame folder" if question.video_kind == "frames" else "video"
        raise MediaError(f"{kind} not found: {path}")
    qseed = question_seed(question.qid, seed)
    extra: dict[str, Any] = {"seed": qseed} if draws_per_question(question, proto) else {}
    if question.bound is not None:
        extra["bound"] = list(question.bound)
    if question.video_kind == "frames":
        files = list_frame_files(path)
        if not files:
            raise MediaError(f"frame folder {path} has no frame images")
        fps = question.frame_fps or 1.0
        indices = proto.frame_indices(len(files), fps, bound=question.bound, frame_folder=True,
                                      rng=random.Random(qseed))
        clip = load_video([files[i] for i in indices], indices=list(range(len(indices))), source_fps=fps)
        extra.update(files=[Path(files[i]).name for i in indices], fps=fps)
        return DecodedFrames(clip.frames, indices, [i / fps for i in indices], clip.backend, path, extra)
    info = probe_video(path, backend=backend)
    extra.update(total_frames=info["total_frames"], fps=round(info["fps"], 6))
    indices = proto.frame_indices(info["total_frames"], info["fps"], bound=question.bound, rng=random.Random(qseed))
    clip = load_video(path, indices=indices, backend=backend)
    if clip.indices != indices:
        raise MediaError(f"{path}: frames {sorted(set(indices) - set(clip.indices))} could not be decoded")
    return DecodedFrames(clip.frames, clip.indices, clip.timestamps, clip.backend, path, extra)
