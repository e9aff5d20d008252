"""Which frames to take from a video: the official presets as pure index math (no decoding here).

Frame ``k`` always means the k-th frame in presentation order. Presets work on a frame count and an
average frame rate; the time-based ones (``fps``, ``timestamps=``, ``start``/``end``) also accept the
real per-frame presentation times so that variable-frame-rate videos map times to the right frames.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from owlvid.errors import MediaError

__all__ = ["PRESETS", "MAX_FRAMES_HARD_CAP", "VideoSampling", "cap_indices", "sample_indices", "frame_at_times"]

PRESETS = ("owl3", "owl3-eval", "slowfast", "fps", "all")
# load_video refuses to materialise more frames than this in one call (iter_video_chunks streams and
# has no cap): 4096 full-HD RGB frames are already ~25 GB.
MAX_FRAMES_HARD_CAP = 4096

_DEFAULTS = {"owl3": 16, "owl3-eval": 16, "slowfast": 64}
# Which keyword options each preset understands; anything else is an error, not silently ignored.
_ALLOWED = {
    "owl3": {"max_frames", "fps"},
    "owl3-eval": {"num_frames", "max_frames"},
    "slowfast": {"num_frames", "max_frames"},
    "fps": {"fps", "max_frames", "min_frames"},
    "all": {"max_frames"},
}
_EPS = 1e-6  # seconds·fps slack so that t = k / fps maps to frame k despite float rounding


def _positive_int(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise MediaError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _positive_float(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise MediaError(f"{name} must be a positive number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise MediaError(f"{name} must be a positive number, got {value!r}")
    return v


def uniform_sample(seq: Sequence[int], n: int) -> list[int]:
    """mPLUG-Owl3 README ``uniform_sample``: the middle element of each of ``n`` equal slices."""
    gap = len(seq) / n
    return [seq[int(i * gap + gap / 2)] for i in range(n)]


def cap_indices(indices: Sequence[int], cap: int | None) -> list[int]:
    """At most ``cap`` of ``indices``, evenly spread from the first (all of them when there are not more)."""
    if cap is None or len(indices) <= cap:
        return list(indices)
    return [indices[int(i * len(indices) / cap)] for i in range(cap)]


def frame_at_times(
    times: Sequence[float] | np.ndarray,
    total_frames: int,
    avg_fps: float,
    frame_times: np.ndarray | None = None,
) -> list[int]:
    """Index of the frame on screen at each time ``t`` (seconds from the first frame).

    Frame k is shown from its presentation time until the next frame's. With ``frame_times`` (sorted
    per-frame times, frame 0 at 0.0) the real times are used (variable frame rate); without, frame k is
    at ``k / avg_fps``.
    """
    t = np.asarray(times, dtype=np.float64)
    if frame_times is None:
        k = np.floor(t * avg_fps + _EPS).astype(np.int64)
    else:
        k = np.searchsorted(np.asarray(frame_times, dtype=np.float64), t + _EPS / max(avg_fps, 1.0),
                            side="right") - 1
    return np.clip(k, 0, total_frames - 1).astype(int).tolist()


def _default_duration(total_frames: int, avg_fps: float, frame_times: np.ndarray | None) -> float:
    if frame_times is None or total_frames < 2:
        return total_frames / avg_fps
    last = float(frame_times[-1])
    return last + last / (total_frames - 1)  # the last frame lasts one average frame interval


def sample_indices(
    preset: str,
    total_frames: int,
    avg_fps: float,
    *,
    max_frames: int | None = None,
    num_frames: int | None = None,
    fps: float | None = None,
    min_frames: int | None = None,
    frame_times: Sequence[float] | np.ndarray | None = None,
    duration: float | None = None,
) -> list[int]:
    """Frame indices (ascending, possibly repeated) that ``preset`` picks from a video.

    * ``owl3`` (mPLUG-Owl3 README): ``step = max(1, round(avg_fps / fps))`` with ``fps`` defaulting to 1
      (one candidate per second), candidates ``range(0, total_frames, step)``; if more than ``max_frames``
      (16) candidates, README ``uniform_sample`` picks ``max_frames`` of them.
    * ``owl3-eval`` (official evaluation, "middle"): ``n = min(num_frames, total_frames)`` equal
      segments of ``np.linspace(0, total, n+1).astype(int)``, the middle frame of each, padded with the
      last index up to ``num_frames`` (16). ``max_frames`` is accepted as an alias of ``num_frames``.
    * ``slowfast`` (Slow-Fast demo): ``np.linspace(0, total-1, max_frames).astype(int)`` (64); repeats
      indices when the video is shorter. ``num_frames`` is accepted as an alias.
    * ``fps``: one frame every ``1/fps`` s (``fps`` default 1.0) at times ``i / fps`` from the first frame
      while ``t < duration``; if that is more than ``max_frames`` (or fewer than ``min_frames``), ``n =
      max_frames`` (``min_frames``) times at the centres of ``n`` equal slices of the duration instead.
    * ``all``: every frame.
    """
    if preset not in _ALLOWED:
        raise MediaError(f"unknown sampling preset {preset!r}; choose one of {', '.join(PRESETS)}")
    given = {k for k, v in (("max_frames", max_frames), ("num_frames", num_frames), ("fps", fps),
                            ("min_frames", min_frames)) if v is not None}
    extra = given - _ALLOWED[preset]
    if extra:
        raise MediaError(f"option(s) {', '.join(sorted(extra))} do not apply to sampling preset {preset!r} "
                         f"(it takes: {', '.join(sorted(_ALLOWED[preset]))})")
    max_frames = _positive_int("max_frames", max_frames)
    num_frames = _positive_int("num_frames", num_frames)
    min_frames = _positive_int("min_frames", min_frames)
    fps = _positive_float("fps", fps)
    avg = _positive_float("average fps", avg_fps)
    assert avg is not None
    if isinstance(total_frames, bool) or not isinstance(total_frames, (int, np.integer)) or total_frames < 1:
        raise MediaError(f"video has no frames to sample (total_frames={total_frames!r})")
    n_total = int(total_frames)
    ft = None if frame_times is None else np.asarray(frame_times, dtype=np.float64)
    if ft is not None and len(ft) != n_total:
        raise MediaError(f"frame_times has {len(ft)} entries for {n_total} frames")

    if preset == "owl3":
        step = max(1, round(avg / (fps or 1.0)))  # Python round(), as the README's round(avg_fps / 1)
        candidates = list(range(0, n_total, step))
        limit = max_frames or _DEFAULTS["owl3"]
        return uniform_sample(candidates, limit) if len(candidates) > limit else candidates

    if preset in ("owl3-eval", "slowfast"):
        if num_frames is not None and max_frames is not None and num_frames != max_frames:
            raise MediaError(f"num_frames={num_frames} and max_frames={max_frames} disagree for {preset!r}")
        n = num_frames or max_frames or _DEFAULTS[preset]
        if preset == "slowfast":
            return np.linspace(0, n_total - 1, n).astype(int).tolist()
        acc = min(n, n_total)
        edges = np.linspace(0, n_total, acc + 1).astype(int)
        picked = [int((edges[k] + edges[k + 1] - 1) // 2) for k in range(acc)]
        return picked + [picked[-1]] * (n - acc)

    if preset == "all":
        if max_frames is not None and n_total > max_frames:
            raise MediaError(f"preset 'all' would take {n_total} frames, more than max_frames={max_frames}")
        return list(range(n_total))

    # preset == "fps"
    if min_frames is not None and max_frames is not None and min_frames > max_frames:
        raise MediaError(f"min_frames={min_frames} is larger than max_frames={max_frames}")
    rate = fps or 1.0
    dur = duration if duration is not None else _default_duration(n_total, avg, ft)
    if not (dur > 0 and math.isfinite(dur)):
        raise MediaError(f"cannot sample at fps={rate}: video duration is unknown ({dur!r})")
    count = max(1, math.ceil(dur * rate - _EPS))
    if max_frames is not None and count > max_frames:
        count, times = max_frames, (np.arange(max_frames) + 0.5) * (dur / max_frames)
    elif min_frames is not None and count < min_frames:
        count, times = min_frames, (np.arange(min_frames) + 0.5) * (dur / min_frames)
    else:
        times = np.arange(count) / rate
    return frame_at_times(times, n_total, avg, ft)


@dataclass(frozen=True)
class VideoSampling:
    """A complete frame-selection request: a preset with its options, or explicit indices/timestamps,
    optionally restricted to the window ``[start, end)`` seconds.

    With a window, everything is computed on the sub-video made of the frames whose presentation time
    is in ``[start, end)`` (its frame 0 is the first frame in the window, its time 0.0 that frame's time),
    and :meth:`select` returns source-video indices. Explicit ``indices``/``timestamps`` are relative to
    the window too (to the whole video without one).
    """

    preset: str = "owl3"
    max_frames: int | None = None
    num_frames: int | None = None
    fps: float | None = None
    min_frames: int | None = None
    indices: tuple[int, ...] | None = None
    timestamps: tuple[float, ...] | None = None
    start: float | None = None
    end: float | None = None
    frame_cap: int | None = None  # keep at most this many of the selected frames, evenly (a server limit)

    def __post_init__(self) -> None:
        if self.indices is not None and self.timestamps is not None:
            raise MediaError("pass either indices= or timestamps=, not both")
        explicit = self.indices is not None or self.timestamps is not None
        if explicit:
            names = ("max_frames", "num_frames", "fps", "min_frames")
            opts = [k for k in names if getattr(self, k) is not None]
            if opts:
                raise MediaError(f"option(s) {', '.join(opts)} do not apply to explicit indices/timestamps")
        elif self.preset not in _ALLOWED:
            raise MediaError(f"unknown sampling preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        for name in ("start", "end"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
                raise MediaError(f"{name} must be a non-negative number of seconds, got {v!r}")
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise MediaError(f"end={self.end} must be after start={self.start}")
        if self.indices is not None:
            object.__setattr__(self, "indices", tuple(self._check_index(i) for i in self.indices))
            if not self.indices:
                raise MediaError("indices= is empty")
        if self.timestamps is not None:
            ts = tuple(float(t) for t in self.timestamps)
            if not ts:
                raise MediaError("timestamps= is empty")
            bad = [t for t in ts if not math.isfinite(t) or t < 0]
            if bad:
                raise MediaError(f"timestamps must be non-negative seconds, got {bad[0]!r}")
            object.__setattr__(self, "timestamps", ts)

    @staticmethod
    def _check_index(i: object) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise MediaError(f"frame indices must be integers, got {i!r}")
        return int(i)

    @property
    def name(self) -> str:
        """What to report as ``VideoClip.sampling``."""
        if self.indices is not None:
            return "indices"
        if self.timestamps is not None:
            return "timestamps"
        return self.preset

    def window(
        self, total_frames: int, avg_fps: float, frame_times: np.ndarray | None = None,
        duration: float | None = None,
    ) -> tuple[int, int, float]:
        """``(first, stop, sub_duration)``: the frames ``first..stop-1`` inside ``[start, end)``."""
        ft = None if frame_times is None else np.asarray(frame_times, dtype=np.float64)
        dur = duration if duration is not None else _default_duration(total_frames, avg_fps, ft)
        if self.start is None and self.end is None:
            return 0, total_frames, dur
        start = self.start or 0.0
        end = min(self.end, dur) if self.end is not None else dur
        if start >= dur:
            raise MediaError(f"start={start} s is at or after the end of the video ({dur:.3f} s)")

        def first_at_or_after(t: float) -> int:
            if ft is None:
                return min(total_frames, max(0, math.ceil(t * avg_fps - _EPS)))
            return int(np.searchsorted(ft, t - _EPS / max(avg_fps, 1.0), side="left"))

        first, stop = first_at_or_after(start), first_at_or_after(end) if end < dur else total_frames
        if stop <= first:
            raise MediaError(f"no frame is shown inside the window [{start}, {end}) s")
        t_first = first / avg_fps if ft is None else float(ft[first])
        return first, stop, end - t_first

    def select(
        self,
        total_frames: int,
        avg_fps: float,
        frame_times: Sequence[float] | np.ndarray | None = None,
        duration: float | None = None,
        *,
        cap: int | None = MAX_FRAMES_HARD_CAP,
    ) -> list[int]:
        """Source-video frame indices for a video of ``total_frames`` frames at ``avg_fps``.

        ``frame_times``: per-frame presentation times in seconds (frame 0 at 0.0), for variable frame
        rate; ``duration``: the video duration (default: from the frame times / count and fps).
        More than ``cap`` frames raises :class:`MediaError`.
        """
        if (isinstance(total_frames, bool) or not isinstance(total_frames, (int, np.integer))
                or total_frames < 1):
            raise MediaError(f"video has no frames (total_frames={total_frames!r})")
        total_frames = int(total_frames)
        if cap is not None:
            for k in ("max_frames", "num_frames", "min_frames"):
                v = getattr(self, k)
                if v is not None and v > cap:
                    raise MediaError(f"{k}={v} is more than the limit of {cap} frames per call "
                                     "(use iter_video_chunks for more)")
        ft = None if frame_times is None else np.asarray(frame_times, dtype=np.float64)
        first, stop, sub_dur = self.window(total_frames, avg_fps, ft, duration)
        n = stop - first
        sub_ft = None if ft is None else ft[first:stop] - ft[first]
        if self.indices is not None:
            bad = [i for i in self.indices if not 0 <= i < n]
            if bad:
                where = "the window" if n != total_frames else "the video"
                raise MediaError(f"frame index {bad[0]} is out of range: {where} has {n} frames (0..{n - 1})")
            picked = list(self.indices)
        elif self.timestamps is not None:
            late = [t for t in self.timestamps if t > sub_dur + _EPS]
            if late:
                where = "the window" if n != total_frames else "the video"
                raise MediaError(f"timestamp {late[0]} s is after the end of {where} ({sub_dur:.3f} s)")
            picked = frame_at_times(self.timestamps, n, avg_fps, sub_ft)
        else:
            picked = sample_indices(self.preset, n, avg_fps, max_frames=self.max_frames,
                                    num_frames=self.num_frames, fps=self.fps, min_frames=self.min_frames,
                                    frame_times=sub_ft, duration=sub_dur)
        picked = cap_indices(picked, self.frame_cap)
        if cap is not None and len(picked) > cap:
            raise MediaError(f"{len(picked)} frames requested, more than the limit of {cap} per call "
                             "(set max_frames, or use iter_video_chunks)")
        return [first + i for i in picked]
