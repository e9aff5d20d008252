"""What every video reader shares: the reader protocol, :class:`VideoClip`, warnings, the ``size`` rule.

Readers (:mod:`.frames`, :mod:`.pyav_backend`, :mod:`.torchcodec_backend`) import from here;
:mod:`.video` picks one and runs the frame selection. Nothing here imports a reader.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image

from owlvid.errors import MediaError

__all__ = ["MediaWarning", "SizeRule", "VideoClip", "VideoInfo", "VideoReader", "size_fn", "warn_or_raise"]

SizeRule = tuple[int, int] | int | Callable[[int, int], tuple[int, int]] | None


class MediaWarning(UserWarning):
    """Emitted for skipped frames (``skip_bad_frames=True``) and ignored metadata."""


@dataclass
class VideoClip:
    """Decoded frames with where they came from.

    ``indices`` are source frame numbers (presentation order), ``timestamps`` their presentation times
    in seconds from the first frame of the video. ``fps`` is the average frame rate, ``duration`` the
    video duration in seconds, ``total_frames`` its frame count. The same picture may appear more than
    once (e.g. ``slowfast`` on a short video); repeated entries share one ``PIL.Image`` object.
    ``sha256``: the SHA-256 of the source's bytes (file, download, data URL payload) when it had bytes.
    """

    frames: list[Image.Image]
    indices: list[int]
    timestamps: list[float]
    fps: float
    duration: float
    total_frames: int
    backend: str
    source: str
    sampling: str
    sha256: str | None = None

    def __len__(self) -> int:
        return len(self.frames)

    def to_numpy(self) -> np.ndarray:
        """The frames as one uint8 array ``T x H x W x 3`` (all frames must have the same size)."""
        return np.stack([np.asarray(f) for f in self.frames])


@dataclass(frozen=True, eq=False)
class VideoInfo:
    """What probing a video found (no frame decoded): frame count, average rate, duration in seconds,
    per-frame presentation times (None when frame k is at ``k / fps``), whether the rate varies, the reader
    that probed it and a safe description of the source."""

    total_frames: int
    fps: float
    duration: float
    frame_times: np.ndarray | None
    variable_frame_rate: bool
    backend: str
    source: str

    def as_dict(self) -> dict:
        """:func:`~owlvid.media.probe_video`'s answer."""
        return {"total_frames": self.total_frames, "fps": self.fps, "duration": self.duration,
                "variable_frame_rate": self.variable_frame_rate, "backend": self.backend, "source": self.source}


def size_fn(size: SizeRule) -> Callable[[int, int], tuple[int, int]] | None:
    """Normalise ``size``: (w, h) exact, int = shorter side (aspect kept), or a callable (w, h) -> (w, h)."""
    if size is None:
        return None
    if isinstance(size, bool):
        raise MediaError(f"size must be (width, height), an int or a callable, got {size!r}")
    if isinstance(size, (int, np.integer)):
        short = int(size)
        if short < 1:
            raise MediaError(f"size must be positive, got {size}")

        def by_short_side(w: int, h: int) -> tuple[int, int]:
            if w <= h:
                return short, max(1, round(h * short / w))
            return max(1, round(w * short / h)), short

        return by_short_side
    if isinstance(size, (tuple, list)):
        if len(size) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in size):
            raise MediaError(f"size must be (width, height) with positive integers, got {size!r}")
        fixed = (int(size[0]), int(size[1]))
        return lambda w, h: fixed
    if callable(size):
        rule = size

        def checked(w: int, h: int) -> tuple[int, int]:
            out = rule(w, h)
            if (not isinstance(out, (tuple, list)) or len(out) != 2
                    or not all(isinstance(v, (int, np.integer)) and v > 0 for v in out)):
                raise MediaError(f"size rule returned {out!r} for {w}x{h}; expected (width, height)")
            return int(out[0]), int(out[1])

        return checked
    raise MediaError(f"size must be (width, height), an int or a callable, got {size!r}")


class VideoReader(Protocol):
    """An opened video: frame count, average rate, duration, per-frame times, whether the rate varies, and
    the wanted frames. Everything but ``read`` is known once the reader is built (the probe)."""

    backend: str
    description: str
    total_frames: int
    avg_fps: float
    duration: float
    variable_frame_rate: bool

    def frame_times(self) -> np.ndarray | None: ...

    def read(self, wanted: list[int]) -> Iterator[tuple[int, float, Image.Image]]: ...

    def close(self) -> None: ...


def warn_or_raise(skip: bool, message: str) -> None:
    if not skip:
        raise MediaError(message)
    warnings.warn(message + " (skipped: skip_bad_frames=True)", MediaWarning, stacklevel=4)

