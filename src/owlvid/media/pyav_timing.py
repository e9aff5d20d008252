"""The PyAV reader's time model: frame numbers from presentation timestamps, read without decoding.

Frame ``k`` is the k-th frame in presentation (pts) order, as decord numbers them, so the official
sampling code picks the same pictures (see :class:`~owlvid.media.pyav_backend.PyAVReader` for the models).
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

import numpy as np

from owlvid.errors import MediaError

from .base import warn_or_raise

__all__ = ["PyAVTimeModel", "ffmpeg_reason"]


class PyAVTimeModel:
    """Probing part of :class:`~owlvid.media.pyav_backend.PyAVReader`: maps pts to frame numbers.

    Uses the reader's ``_stream``, ``_container``, ``_skip``, ``description`` and ``_after_scan()`` (called
    once a packet scan has read the container to its end); sets
    ``total_frames``, ``avg_fps``, ``duration`` and the model (``cfr``, ``table`` or ``count``).
    """

    description: str
    total_frames: int
    avg_fps: float
    duration: float

    def _probe(self) -> None:
        s = self._stream
        self._stream_index = s.index
        self._tb = Fraction(s.time_base) if s.time_base else Fraction(1, 90000)
        rate = s.average_rate or s.guessed_rate or s.base_rate
        self._rate = float(rate) if rate else None
        # The old "rotate" tag (clockwise degrees) for files whose frames carry no display matrix.
        # Read before any re-open: a closed container's stream objects must not be touched.
        tag = s.metadata.get("rotate") if s.metadata else None
        try:
            self._tag_rotation = -int(float(tag)) if tag else 0
        except ValueError:
            self._tag_rotation = 0
        self._model = None
        fmt = self._container.format.name.split(",")
        if "mov" in fmt and (s.frames or 0) > 0:
            self._model_from_index()
        if self._model is None:
            self._model_from_packets()
            self._after_scan()
        if self.total_frames < 1:
            raise MediaError(f"{self.description}: the video stream has no frames")
        self._fix_duration_and_rate()

    def _fix_duration_and_rate(self) -> None:
        n = self.total_frames
        # The container's duration includes the last frame's display time; the frame table cannot.
        declared = self._declared_duration()
        if self._model == "table" and declared is not None:
            data_end = self._data_end if self._data_end is not None else self.duration
            if declared - data_end > max(0.5, 0.05 * declared):
                # Matroska & co. write the duration in the header: video data ending far earlier means
                # the file was cut (an interrupted download or copy).
                warn_or_raise(self._skip, f"{self.description}: truncated file: the video data ends at "
                                           f"{data_end:.2f} s but the file declares {declared:.2f} s")
            elif self._times[-1] < declared:
                self.duration = declared
        rate = self._rate
        if self.duration > 0 and (not rate or abs(rate * self.duration - n) > max(1.0, 0.1 * n)):
            # No rate, or one that contradicts count and duration (e.g. Matroska's 25 fps default on a
            # variable-frame-rate file): frames per second of the actual file.
            rate = n / self.duration
        if not rate or not math.isfinite(rate) or rate <= 0:
            rate = 25.0
        self.avg_fps = float(rate)
        if self.duration <= 0:
            self.duration = n / self.avg_fps

    def _declared_duration(self) -> float | None:
        """The video stream's duration as written in the file's header, if it says so."""
        s = self._stream
        if s.duration is not None and s.duration > 0:
            return float(s.duration * self._tb)
        tag = (s.metadata or {}).get("DURATION") or (s.metadata or {}).get("duration")
        if tag:
            m = re.match(r"^(\d+):(\d+):(\d+(?:\.\d+)?)$", tag.strip())
            if m:
                return int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
        if self._container.duration and len(self._container.streams) == 1:
            return self._container.duration / 1_000_000 - float((s.start_time or 0) * self._tb)
        return None

    def _model_from_index(self) -> None:
        s = self._stream
        entries = s.index_entries
        n_all = len(entries)
        if n_all != s.frames:
            return
        items = entries[:n_all]
        ts = np.fromiter((e.timestamp for e in items), np.int64, n_all)
        keep = np.fromiter((not e.is_discard for e in items), bool, n_all)
        key = np.fromiter((e.is_keyframe for e in items), bool, n_all)
        ts = ts[keep]
        n = len(ts)
        if n == 0:
            return
        d = np.diff(ts)
        if n > 1 and not (d[0] > 0 and (d == d[0]).all()):
            return  # variable frame rate: the packet scan gives exact per-frame times
        if n > 1:
            delta = int(d[0])
        elif self._rate:
            delta = max(1, round(1 / (self._rate * self._tb)))
        else:
            delta = int(s.duration or 1)
        self._model = "cfr"
        self._delta = delta
        self._t0 = int(s.start_time) if s.start_time is not None else int(ts[0])
        self.total_frames = n
        # Keyframe positions in decoding order; for closed GOPs they equal presentation positions, and
        # they only feed the seek-or-decode cost estimate (seeking itself is verified frame by frame).
        self._keyframes = np.union1d([0], np.flatnonzero(key[keep]))
        self.duration = float(n * delta * self._tb)
        if not self._rate:
            self._rate = float(1 / (delta * self._tb))

    def _model_from_packets(self) -> None:
        import av

        pts: list[int] = []
        keys: list[int] = []
        count = 0
        data_end = None  # end of the last frame (pts + duration) when packets carry durations
        demux = self._container.demux(self._stream)
        while True:
            try:
                p = next(demux)
            except StopIteration:
                break
            except av.FFmpegError as e:
                # Corrupt data in the middle: what comes after it cannot be counted (nor decoded).
                warn_or_raise(self._skip, f"{self.description}: corrupt or truncated video data after "
                                           f"{count} frames ({ffmpeg_reason(e)})")
                break
            if p.size == 0 or p.is_discard:
                continue  # the flush packet at EOF, empty "dropped frame" packets, edit-list discards
            count += 1
            if p.pts is not None:
                pts.append(p.pts)
                if p.is_keyframe:
                    keys.append(p.pts)
                if p.duration:
                    end = p.pts + p.duration
                    data_end = end if data_end is None else max(data_end, end)
        self.total_frames = count
        self._keyframes = np.zeros(1, dtype=np.int64)
        if count == 0:
            self.duration = 0.0
            self._model = "count"
            return
        arr = np.unique(np.asarray(pts, dtype=np.int64))
        if len(pts) != count or len(arr) != count:
            self._model = "count"  # no usable timestamps: sequential decoding, numbered by output order
            self.duration = count / self._rate if self._rate else 0.0
            return
        self._data_end = None if data_end is None else float((data_end - arr[0]) * self._tb)
        self._model = "table"
        self._pts = arr
        self._t0 = int(arr[0])
        self._times = (arr - arr[0]).astype(np.float64) * float(self._tb)
        self._keyframes = np.unique(np.searchsorted(arr, np.asarray(keys, dtype=np.int64)))
        if len(self._keyframes) == 0 or self._keyframes[0] != 0:
            self._keyframes = np.concatenate([[0], self._keyframes])
        span, n = float(self._times[-1]), count
        self.duration = span + (span / (n - 1) if n > 1 else (1 / self._rate if self._rate else 0.0))
        if self._rate is None and span > 0:
            self._rate = (n - 1) / span

    def frame_times(self) -> np.ndarray | None:
        """Per-frame presentation times (s from frame 0), or None when frame k is at ``k / avg_fps``."""
        if self._model == "count":
            return None
        if self._model == "cfr":
            step = float(self._delta * self._tb)
            times = None
        else:
            d = np.diff(self._pts)
            if len(d) and not (d == d[0]).all():
                return self._times
            step, times = (float(d[0] * self._tb) if len(d) else 1 / self.avg_fps), self._times
        if abs(step * self.avg_fps - 1) < 1e-6:
            return None
        # Constant frame rate, but the container's average rate does not say so exactly: keep
        # avg_fps as reported (official code uses it) and map times with the real spacing.
        return times if times is not None else np.arange(self.total_frames) * step

    @property
    def variable_frame_rate(self) -> bool:
        if self._model != "table":
            return False
        d = np.diff(self._pts)
        return bool(len(d) and not (d == d[0]).all())

    def _index_of_pts(self, pts: int | None) -> int | None:
        if pts is None or self._model == "count":
            return None
        if self._model == "cfr":
            return (pts - self._t0 + self._delta // 2) // self._delta
        k = int(np.searchsorted(self._pts, pts))
        if k < len(self._pts) and self._pts[k] == pts:
            return k
        # A pts the demuxer never showed (decoder-made): take the nearest frame.
        if k == 0:
            return 0
        if k >= len(self._pts):
            return len(self._pts) - 1
        return k if self._pts[k] - pts < pts - self._pts[k - 1] else k - 1

    def _pts_of(self, index: int) -> int:
        if self._model == "cfr":
            return self._t0 + index * self._delta
        return int(self._pts[index])

    def _time_of(self, pts: int | None, index: int) -> float:
        if pts is None or self._model == "count":
            return index / self.avg_fps
        return float((pts - self._t0) * self._tb)


def ffmpeg_reason(e: Exception) -> str:
    msg = getattr(e, "strerror", None) or str(e)
    return " ".join(str(msg).split())[:200]
