"""Video loading: exact frame selection, seek-or-sequential decoding with PyAV, frame lists, streaming.

Frame ``k`` is the k-th frame in presentation (pts) order, as decord numbers them, so the official
sampling code picks the same pictures. Only the frames that are needed are converted to RGB, and the
decoder seeks to the keyframe before a wanted frame when that is cheaper than decoding through the gap.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol

import numpy as np
from PIL import Image

from owlvid.errors import MediaError

from .image import DEFAULT_MAX_PIXELS, array_to_image, load_image
from .sampling import MAX_FRAMES_HARD_CAP, VideoSampling
from .sources import (
    DEFAULT_VIDEO_MAX_BYTES,
    DEFAULT_VIDEO_TIMEOUT,
    OpenedMedia,
    UrlPolicy,
    describe_source,
    is_bytes_source,
    open_source,
    sniff_kind,
)

__all__ = [
    "BACKENDS",
    "DECODE_STRATEGIES",
    "FRAME_IMAGE_EXTENSIONS",
    "MediaWarning",
    "SizeRule",
    "VIDEO_DEMUXERS",
    "VideoClip",
    "iter_video_chunks",
    "list_frame_files",
    "load_video",
    "probe_video",
]

BACKENDS = ("pyav", "torchcodec")
DECODE_STRATEGIES = ("auto", "seek", "sequential")
# FFmpeg demuxers we allow. Probing is by content; this list keeps out demuxers that open further
# files or URLs named inside the input (HLS/DASH playlists, concat scripts, image sequences): a crafted
# "video" must not make FFmpeg read other local files or fetch URLs.
VIDEO_DEMUXERS = (
    "mov", "matroska", "webm", "avi", "flv", "mpegts", "mpeg", "gif", "apng", "ogg", "asf", "h264",
    "hevc", "m4v", "ivf", "obu", "yuv4mpegpipe", "nut", "mxf", "rm", "dv", "wav", "mp3", "flac", "aac",
)
FRAME_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Decoding a few frames costs about as much as a seek (demuxer seek, decoder flush, thread refill).
_SEEK_OVERHEAD_FRAMES = 8
_MAX_RESEEKS = 4
_NONREF_SKIP_CODECS = ("h264", "hevc")

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

    def __len__(self) -> int:
        return len(self.frames)

    def to_numpy(self) -> np.ndarray:
        """The frames as one uint8 array ``T x H x W x 3`` (all frames must have the same size)."""
        return np.stack([np.asarray(f) for f in self.frames])


# ----------------------------------------------------------------------------------------- helpers


def _size_fn(size: SizeRule) -> Callable[[int, int], tuple[int, int]] | None:
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


def _natural_key(name: str) -> tuple:
    # "frame_2" < "frame_10": digit runs compare as numbers, the rest case-insensitively.
    return tuple((0, int(p), p) if p.isdigit() else (1, p.lower(), p) for p in re.split(r"(\d+)", name) if p)


def list_frame_files(directory: str | os.PathLike) -> list[str]:
    """Frame image files of a directory in natural order (``frame_2`` before ``frame_10``)."""
    names = [n for n in os.listdir(directory)
             if not n.startswith(".") and os.path.splitext(n)[1].lower() in FRAME_IMAGE_EXTENSIONS]
    names.sort(key=_natural_key)
    return [os.path.join(directory, n) for n in names if os.path.isfile(os.path.join(directory, n))]


class _Reader(Protocol):
    backend: str
    description: str
    total_frames: int
    avg_fps: float
    duration: float

    def frame_times(self) -> np.ndarray | None: ...

    def read(self, wanted: list[int]) -> Iterator[tuple[int, float, Image.Image]]: ...

    def close(self) -> None: ...


def _warn_or_raise(skip: bool, message: str) -> None:
    if not skip:
        raise MediaError(message)
    warnings.warn(message + " (skipped: skip_bad_frames=True)", MediaWarning, stacklevel=4)


# ------------------------------------------------------------------------------------- frame lists


class _FrameListReader:
    """A directory of images, a list of frames or a T x H x W x C array, read lazily as a video."""

    backend = "frames"
    variable_frame_rate = False

    def __init__(self, items: Sequence[Any], loader: Callable[[Any], Image.Image], fps: float,
                 description: str, size_fn, skip_bad: bool) -> None:
        self._items, self._loader, self._size_fn, self._skip = items, loader, size_fn, skip_bad
        self.description = description
        self.total_frames = len(items)
        self.avg_fps = fps
        self.duration = self.total_frames / fps

    def frame_times(self) -> None:
        return None

    def read(self, wanted: list[int]) -> Iterator[tuple[int, float, Image.Image]]:
        for idx in wanted:
            try:
                img = self._loader(self._items[idx])
            except MediaError as e:
                _warn_or_raise(self._skip, f"{self.description}: frame {idx}: {e}")
                continue
            if self._size_fn is not None:
                target = self._size_fn(img.width, img.height)
                if target != img.size:
                    img = img.resize(target, Image.Resampling.BICUBIC)
            yield idx, idx / self.avg_fps, img

    def close(self) -> None:
        pass


def _frame_list_reader(source: Any, desc: str, fps: float, size_fn, skip_bad: bool,
                       max_pixels: int | None, max_bytes: int | None,
                       timeout: float | None, url_policy: UrlPolicy | None) -> _FrameListReader:
    def load_item(item: Any) -> Image.Image:
        return load_image(item, max_pixels=max_pixels, max_bytes=max_bytes, timeout=timeout,
                          url_policy=url_policy)

    if isinstance(source, (str, os.PathLike)):
        files = list_frame_files(source)
        if not files:
            exts = ", ".join(FRAME_IMAGE_EXTENSIONS)
            raise MediaError(f"{desc}: directory contains no frame images ({exts})")
        return _FrameListReader(files, load_item, fps, f"{desc} ({len(files)} frames)", size_fn, skip_bad)
    if isinstance(source, (list, tuple)):
        if not source:
            raise MediaError(f"{desc}: empty frame list")
        return _FrameListReader(list(source), load_item, fps, desc, size_fn, skip_bad)
    # numpy array / torch tensor: T x H x W x C (or T x C x H x W)
    shape = tuple(getattr(source, "shape", ()))
    if len(shape) != 4:
        raise MediaError(f"{desc}: a video array must be T x H x W x 3 (or T x 3 x H x W), got shape {shape}")
    if shape[0] == 0:
        raise MediaError(f"{desc}: video array has no frames")
    return _FrameListReader(source, lambda a: array_to_image(a, desc), fps, desc, size_fn, skip_bad)


# -------------------------------------------------------------------------------------------- PyAV


def _stream_rank(stream) -> tuple:
    """Prefer decodable streams, then the most frames, then the largest picture."""
    ctx = stream.codec_context
    if ctx is None:
        return (False, stream.frames or 0, 0)
    return (True, stream.frames or 0, (ctx.width or 0) * (ctx.height or 0))


class _PyAVReader:
    """One opened video stream with a time model that maps presentation timestamps to frame numbers.

    Time models, cheapest first:
    * ``cfr``: MP4/MOV whose sample table (read from the header, no packet is read) has evenly spaced
      timestamps: frame k is at ``t0 + k * delta``.
    * ``table``: any other file: one demux-only pass (packets are read, never decoded) collects every
      packet's pts; frame k has the k-th smallest pts (exactly decord's numbering).
    * ``count``: packets without timestamps (raw streams): frames are numbered by decoding order of
      output, and the file is only ever decoded sequentially.
    """

    backend = "pyav"

    def __init__(self, opened: OpenedMedia, *, size_fn, skip_bad: bool, strategy: str) -> None:
        import av  # noqa: F401 - imported here so that the image path works without PyAV

        self._opened = opened
        self.description = opened.description
        self._size_fn, self._skip, self._strategy = size_fn, skip_bad, strategy
        self._warned_rotation = False
        kind = sniff_kind(opened.head())
        if kind is not None and kind.endswith("image") and not kind.startswith(("GIF", "WebP")):
            raise MediaError(f"{self.description}: this is a {kind}, not a video (use load_image, or pass a "
                             "list of images as frames)")
        self._kind = kind
        self._container = self._open()
        try:
            self._stream = self._pick_stream()
            self._probe()
        except BaseException:
            self.close()
            raise
        self._fresh = True  # container positioned at the start, nothing demuxed yet
        self._skip_mode: str | None = None
        self._wanted_pts: set[int] = set()
        # Skipping non-reference frames is only done where FFmpeg's decoders support it well.
        codec = self._stream.codec_context.name
        self._nonref_ok = self._model in ("cfr", "table") and codec in _NONREF_SKIP_CODECS

    # -- opening ---------------------------------------------------------------------------------

    def _open(self):
        import av

        self._opened.rewind()
        target = f"file:{self._opened.path}" if self._opened.path is not None else self._opened.fileobj
        options = {"format_whitelist": ",".join(VIDEO_DEMUXERS), "protocol_whitelist": "file"}
        try:
            return av.open(target, mode="r", container_options=options, metadata_errors="ignore")
        except av.FFmpegError as e:
            if isinstance(e, av.EOFError):
                what = "no video data (empty or truncated file)"
            elif self._kind:
                what = f"corrupt, truncated or unsupported {self._kind}"
            else:
                what = "unrecognised format or corrupt data"
            reason = _ffmpeg_reason(e)
            raise MediaError(f"{self.description}: cannot open as a video: {what} ({reason})") from None

    def _pick_stream(self):
        import av

        c = self._container
        videos = [s for s in c.streams.video if not (s.disposition & av.stream.Disposition.attached_pic)]
        if not videos:
            if c.streams.audio:
                raise MediaError(f"{self.description}: no video stream (audio-only {_format_label(c)} file)")
            if c.streams.video:
                raise MediaError(f"{self.description}: no video stream (only a cover picture)")
            raise MediaError(f"{self.description}: no video stream in this {_format_label(c)} file")
        stream = max(videos, key=_stream_rank)
        ctx = stream.codec_context  # None when FFmpeg does not know the codec at all
        try:
            if ctx is None or not ctx.codec.is_decoder:
                raise ValueError
        except Exception:  # noqa: BLE001 - any failure here means FFmpeg has no decoder for it
            label = (getattr(ctx, "name", None) or getattr(ctx, "codec_tag", None)) if ctx is not None else None
            what = f"'{label}'" if label else "(FFmpeg has no decoder for it)"
            raise MediaError(f"{self.description}: unsupported video codec {what}") from None
        stream.thread_type = "AUTO"  # frame + slice threads; decoding is the bottleneck
        return stream

    def _reopen(self) -> None:
        # Re-opening is the one way back to the start that works for every format (some cannot seek).
        self._container.close()
        self._container = self._open()
        self._stream = self._container.streams[self._stream_index]
        self._stream.thread_type = "AUTO"
        self._skip_mode = None  # a fresh decoder context
        self._fresh = True

    # -- time model -----------------------------------------------------------------------------

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
            self._reopen()
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
                _warn_or_raise(self._skip, f"{self.description}: truncated file: the video data ends at "
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
                _warn_or_raise(self._skip, f"{self.description}: corrupt or truncated video data after "
                                           f"{count} frames ({_ffmpeg_reason(e)})")
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

    # -- decoding ---------------------------------------------------------------------------------

    def _can_seek(self) -> bool:
        return self._model in ("cfr", "table") and len(self._keyframes) > 1

    def _keyframe_before(self, index: int) -> int:
        pos = int(np.searchsorted(self._keyframes, index, side="right")) - 1
        return int(self._keyframes[max(pos, 0)])

    def _should_seek(self, pos: int, target: int) -> bool:
        """Seek (to the keyframe before ``target``) instead of decoding on from frame ``pos``?"""
        if self._strategy == "sequential" or not self._can_seek():
            return False
        key = self._keyframe_before(target)
        if key <= pos:
            return False  # the seek would land behind us: decoding on is never worse
        if self._strategy == "seek":
            return True
        return (target - key) + _SEEK_OVERHEAD_FRAMES < target - pos

    def _packets_and_frames(self) -> Iterator[Any]:
        """Decoded frames from the current demuxer position; decode errors are reported or skipped."""
        import av

        self._first_dts = None
        demux = self._container.demux(self._stream)
        while True:
            try:
                packet = next(demux)
            except StopIteration:
                return
            except av.FFmpegError as e:
                _warn_or_raise(self._skip, f"{self.description}: corrupt or truncated video data "
                                           f"({_ffmpeg_reason(e)})")
                return
            if self._first_dts is None and packet.dts is not None:
                self._first_dts = packet.dts
            if self._nonref_ok:
                # Frames nobody asked for that no other frame references need not be decoded at all
                # (a third to a half of an H.264/HEVC stream with B-frames). Wanted frames are matched
                # by packet pts; should one be missed anyway, read() turns this off and decodes again.
                wanted = packet.pts is None or packet.pts in self._wanted_pts
                self._set_skip_mode("DEFAULT" if wanted else "NONREF")
            try:
                frames = packet.decode()
            except av.FFmpegError as e:
                if isinstance(e, av.error.DecoderNotFoundError):
                    reason = _ffmpeg_reason(e)
                    raise MediaError(f"{self.description}: unsupported video codec ({reason})") from None
                where = "" if packet.pts is None else f" at {self._time_of(packet.pts, 0):.3f} s"
                _warn_or_raise(self._skip, f"{self.description}: undecodable video data{where} "
                                           f"({_ffmpeg_reason(e)})")
                continue
            yield from frames

    def _numbered(self, frames: Iterator[Any], after_seek: bool) -> Iterator[tuple[int, Any]]:
        """(index, frame) pairs. After a seek, frames before the first keyframe are dropped: they can
        be leading pictures of an open GOP that reference data from before the seek point."""
        counter = -1
        last = -1
        seen_key = not after_seek
        skipped = 0
        limit = 2 * int(np.diff(self._keyframes).max(initial=250)) + 16
        for frame in frames:
            counter += 1
            if not seen_key:
                if not frame.key_frame:
                    skipped += 1
                    if skipped > limit:
                        return  # no keyframe in sight: the caller falls back to decoding from the start
                    continue
                seen_key = True
            idx = self._index_of_pts(frame.pts)
            if idx is None:
                if after_seek:
                    return
                idx = counter
            if idx <= last:
                continue  # repeated timestamp: keep the first picture for that number
            last = idx
            yield idx, frame

    def _from_start(self) -> Iterator[tuple[int, Any]]:
        if not self._fresh:
            self._reopen()
        self._fresh = False
        return self._numbered(self._packets_and_frames(), after_seek=False)

    def _seek_to(self, target: int) -> Iterator[tuple[int, Any]]:
        """Frames from the keyframe at or before ``target``; the first one is verified to be <= target."""
        import av

        self._fresh = False
        seek_pts = self._pts_of(target)
        for _ in range(_MAX_RESEEKS):
            try:
                self._container.seek(seek_pts, stream=self._stream, backward=True, any_frame=False)
            except av.FFmpegError:
                break
            frames = self._numbered(self._packets_and_frames(), after_seek=True)
            first = next(frames, None)
            if first is None:
                break
            if first[0] <= target:
                return _chain(first, frames)
            # Landed after the target (keyframe dts <= target < keyframe pts, or an open-GOP keyframe):
            # go to the keyframe before the one we got.
            before = self._first_dts if self._first_dts is not None else seek_pts
            seek_pts = min(before, seek_pts) - 1
        return self._from_start()  # seeking does not work for this file: decode from the start

    def read(self, wanted: list[int]) -> Iterator[tuple[int, float, Image.Image]]:
        """Yield ``(index, timestamp, RGB image)`` for each of ``wanted`` (sorted, unique) in order."""
        self._wanted_pts = self._packet_pts_of(wanted)
        i, pos, frames = 0, -1, None
        while i < len(wanted):
            target = wanted[i]
            if frames is None:
                frames = self._seek_to(target) if self._should_seek(-1, target) else self._from_start()
            elif self._should_seek(pos, target):
                frames = self._seek_to(target)
            retry = False
            for idx, frame in frames:
                pos = idx
                if idx < target:
                    continue
                first_missed = i
                while i < len(wanted) and wanted[i] < idx:
                    i += 1
                if i > first_missed:
                    if self._stop_skipping_nonref():
                        i, retry = first_missed, True  # a wanted frame may have been skipped: redo
                        break
                    _warn_or_raise(self._skip, f"{self.description}: frame(s) "
                                               f"{_fmt_list(wanted[first_missed:i])} could not be decoded "
                                               "(corrupt data?)")
                if i < len(wanted) and wanted[i] == idx:
                    yield idx, self._time_of(frame.pts, idx), self._to_image(frame)
                    i += 1
                if i >= len(wanted):
                    break
                target = wanted[i]
                if self._should_seek(pos, target):
                    break
            else:
                if i < len(wanted):
                    if self._stop_skipping_nonref():
                        retry = True
                    else:
                        _warn_or_raise(self._skip, f"{self.description}: the video ends after frame "
                                                   f"{pos} but frame(s) {_fmt_list(wanted[i:])} were "
                                                   f"requested (the container reports {self.total_frames} "
                                                   "frames; truncated?)")
                        return
            if retry:
                target = wanted[i]
                frames = self._seek_to(target) if self._can_seek() else self._from_start()

    def _packet_pts_of(self, indices: list[int]) -> set[int]:
        """Packet pts of the wanted frames (the packets that must be decoded even if non-reference)."""
        return {self._pts_of(k) for k in indices} if self._model in ("cfr", "table") else set()

    def _stop_skipping_nonref(self) -> bool:
        """Turn non-reference frame skipping off; True if it was on (the caller then decodes again)."""
        if not self._nonref_ok:
            return False
        self._nonref_ok = False
        self._set_skip_mode("DEFAULT")
        return True

    def _set_skip_mode(self, mode: str) -> None:
        if mode != self._skip_mode:
            self._stream.codec_context.skip_frame = mode
            self._skip_mode = mode

    def _to_image(self, frame) -> Image.Image:
        rotation = frame.rotation or self._tag_rotation
        quarter = 0
        if rotation:
            if rotation % 90:
                if not self._warned_rotation:
                    self._warned_rotation = True
                    warnings.warn(f"{self.description}: ignoring non-right-angle rotation {rotation}",
                                  MediaWarning, stacklevel=4)
            else:
                quarter = (rotation // 90) % 4  # counter-clockwise quarter turns
        width, height = frame.width, frame.height
        kwargs: dict[str, Any] = {"format": "rgb24"}
        if frame.color_range == 2:  # full-range YUV tagged only in metadata: swscale must be told
            kwargs["src_color_range"] = 2
        if self._size_fn is not None:
            disp = (height, width) if quarter % 2 else (width, height)
            tw, th = self._size_fn(*disp)
            if quarter % 2:
                tw, th = th, tw
            if (tw, th) != (width, height):
                kwargs.update(width=tw, height=th, interpolation="BICUBIC")
        img = frame.reformat(**kwargs).to_image()
        if quarter:
            img = img.transpose((None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180,
                                 Image.Transpose.ROTATE_270)[quarter])
        return img

    def close(self) -> None:
        c = getattr(self, "_container", None)
        if c is not None:
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass
            self._container = None


def _chain(first, rest):
    yield first
    yield from rest


def _fmt_list(xs: list[int], limit: int = 8) -> str:
    shown = ", ".join(str(x) for x in xs[:limit])
    return shown + (f", ... ({len(xs)} in all)" if len(xs) > limit else "")


def _format_label(container) -> str:
    fmt = container.format
    return fmt.long_name or fmt.name.split(",")[0]


def _ffmpeg_reason(e: Exception) -> str:
    msg = getattr(e, "strerror", None) or str(e)
    return " ".join(str(msg).split())[:200]


# ----------------------------------------------------------------------------------------- public


def _make_sampling(sampling: str | VideoSampling, max_frames, num_frames, fps, min_frames, indices,
                   timestamps, start, end) -> VideoSampling:
    if isinstance(sampling, VideoSampling):
        others = {"max_frames": max_frames, "num_frames": num_frames, "fps": fps, "min_frames": min_frames,
                  "indices": indices, "timestamps": timestamps, "start": start, "end": end}
        given = [k for k, v in others.items() if v is not None]
        if given:
            raise MediaError(f"pass {', '.join(given)} inside the VideoSampling object, not next to it")
        return sampling
    if not isinstance(sampling, str):
        raise MediaError(f"sampling must be a preset name or a VideoSampling, got {sampling!r}")
    return VideoSampling(
        preset=sampling, max_frames=max_frames, num_frames=num_frames, fps=fps, min_frames=min_frames,
        indices=None if indices is None else tuple(indices),
        timestamps=None if timestamps is None else tuple(timestamps), start=start, end=end,
    )


def _is_frame_sequence(source: Any) -> bool:
    if isinstance(source, (list, tuple)):
        return True
    if isinstance(source, np.ndarray):
        return True
    return type(source).__module__.startswith("torch") and hasattr(source, "detach")


def _open_reader(source: Any, *, backend: str, size_fn, skip_bad: bool, strategy: str,
                 source_fps: float | None, max_bytes: int | None, timeout: float | None,
                 max_pixels: int | None, url_policy: UrlPolicy | None) -> tuple[_Reader, OpenedMedia | None]:
    desc = describe_source(source)
    if backend not in BACKENDS:
        raise MediaError(f"unknown video backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if strategy not in DECODE_STRATEGIES:
        choices = ", ".join(DECODE_STRATEGIES)
        raise MediaError(f"unknown decode_strategy {strategy!r}; choose one of {choices}")
    if source_fps is not None and (not isinstance(source_fps, (int, float)) or not math.isfinite(source_fps)
                                   or source_fps <= 0):
        raise MediaError(f"source_fps must be a positive number, got {source_fps!r}")
    is_dir = isinstance(source, (str, os.PathLike)) and not _looks_like_url(source) \
        and os.path.isdir(os.path.expanduser(os.fspath(source)))
    if is_dir or _is_frame_sequence(source):
        src = os.path.expanduser(os.fspath(source)) if is_dir else source
        reader = _frame_list_reader(src, desc, float(source_fps or 1.0), size_fn, skip_bad,
                                    max_pixels, max_bytes, timeout, url_policy)
        return reader, None
    if isinstance(source, Image.Image):
        raise MediaError(f"{desc}: a single image is not a video (use load_image, or pass [image] as frames)")
    if not is_bytes_source(source):
        raise MediaError(f"{desc}: unsupported video source type {type(source).__name__}")
    if source_fps is not None:
        raise MediaError(f"{desc}: source_fps only applies to frame lists and directories; a video file "
                         "has its own timestamps")
    opened = open_source(source, max_bytes=max_bytes, timeout=timeout, url_policy=url_policy)
    try:
        if backend == "torchcodec":
            from .torchcodec_backend import TorchCodecReader

            reader = TorchCodecReader(opened, size_fn=size_fn, skip_bad=skip_bad)
        else:
            reader = _PyAVReader(opened, size_fn=size_fn, skip_bad=skip_bad, strategy=strategy)
    except BaseException:
        opened.close()
        raise
    return reader, opened


def _looks_like_url(source: Any) -> bool:
    return isinstance(source, str) and re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+:", source) is not None \
        and not os.path.exists(source)


def _select(reader: _Reader, spec: VideoSampling, cap: int | None) -> list[int]:
    return spec.select(reader.total_frames, reader.avg_fps, reader.frame_times(), reader.duration, cap=cap)


def _clip(reader: _Reader, spec: VideoSampling, frames, indices, timestamps) -> VideoClip:
    return VideoClip(frames=frames, indices=indices, timestamps=timestamps, fps=reader.avg_fps,
                     duration=reader.duration, total_frames=reader.total_frames, backend=reader.backend,
                     source=reader.description, sampling=spec.name)


def probe_video(
    source: Any,
    *,
    backend: str = "pyav",
    source_fps: float | None = None,
    max_bytes: int | None = DEFAULT_VIDEO_MAX_BYTES,
    timeout: float | None = DEFAULT_VIDEO_TIMEOUT,
    url_policy: UrlPolicy | None = None,
) -> dict[str, Any]:
    """Frame count, average fps, duration (and per-frame times for variable frame rate) without decoding."""
    reader, opened = _open_reader(source, backend=backend, size_fn=None, skip_bad=False, strategy="auto",
                                  source_fps=source_fps, max_bytes=max_bytes, timeout=timeout,
                                  max_pixels=DEFAULT_MAX_PIXELS, url_policy=url_policy)
    try:
        return {"total_frames": reader.total_frames, "fps": reader.avg_fps, "duration": reader.duration,
                "variable_frame_rate": bool(getattr(reader, "variable_frame_rate", False)),
                "backend": reader.backend,
                "source": reader.description}
    finally:
        reader.close()
        if opened is not None:
            opened.close()


def load_video(
    source: Any,
    *,
    sampling: str | VideoSampling = "owl3",
    max_frames: int | None = None,
    num_frames: int | None = None,
    fps: float | None = None,
    min_frames: int | None = None,
    indices: Sequence[int] | None = None,
    timestamps: Sequence[float] | None = None,
    start: float | None = None,
    end: float | None = None,
    backend: str = "pyav",
    size: SizeRule = None,
    skip_bad_frames: bool = False,
    max_bytes: int | None = DEFAULT_VIDEO_MAX_BYTES,
    timeout: float | None = DEFAULT_VIDEO_TIMEOUT,
    source_fps: float | None = None,
    decode_strategy: str = "auto",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    url_policy: UrlPolicy | None = None,
) -> VideoClip:
    """Decode the frames that ``sampling`` selects (see :mod:`owlvid.media.sampling`) as RGB PIL images.

    ``source``: path, URL, data URL, bytes, file-like, a directory of frame images, a list of frames
    (PIL images, arrays, paths) or a T x H x W x 3 array/tensor (``source_fps`` gives the frame rate of
    such frame sources, default 1.0). ``indices``/``timestamps`` select frames explicitly; ``start``/
    ``end`` (seconds) restrict any selection to a window. ``size`` resizes in the decoder: ``(w, h)``, an
    int for the shorter side, or a callable ``(w, h) -> (w, h)`` (default: native resolution).
    ``decode_strategy``: ``auto`` (cost model), ``seek`` or ``sequential``. At most
    :data:`MAX_FRAMES_HARD_CAP` frames per call. ``url_policy``: which hosts http(s) URLs may reach (see
    :class:`owlvid.media.UrlPolicy`; default: any host). Raises :class:`owlvid.errors.MediaError`.
    """
    spec = _make_sampling(sampling, max_frames, num_frames, fps, min_frames, indices, timestamps, start, end)
    reader, opened = _open_reader(source, backend=backend, size_fn=_size_fn(size), skip_bad=skip_bad_frames,
                                  strategy=decode_strategy, source_fps=source_fps, max_bytes=max_bytes,
                                  timeout=timeout, max_pixels=max_pixels, url_policy=url_policy)
    try:
        picked = _select(reader, spec, MAX_FRAMES_HARD_CAP)
        wanted = sorted(set(picked))
        got: dict[int, tuple[float, Image.Image]] = {}
        for idx, ts, img in reader.read(wanted):
            got[idx] = (ts, img)
        keep = [i for i in picked if i in got]
        if not keep:
            raise MediaError(f"{reader.description}: none of the {len(wanted)} requested frames could be "
                             "decoded")
        return _clip(reader, spec, [got[i][1] for i in keep], keep, [got[i][0] for i in keep])
    finally:
        reader.close()
        if opened is not None:
            opened.close()


def iter_video_chunks(source: Any, chunk_size: int = 32, **options: Any) -> Iterator[VideoClip]:
    """Like :func:`load_video`, but yields the frames as consecutive :class:`VideoClip` pieces of at most
    ``chunk_size`` frames, decoding lazily: only one chunk of RGB frames is alive at a time, so hour-long
    videos (``sampling="all"`` or ``"fps"``) can be processed in bounded memory. There is no frame cap.
    Explicit ``indices`` must be in ascending order.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise MediaError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    unknown = set(options) - set(load_video.__kwdefaults__)
    if unknown:
        raise TypeError(f"iter_video_chunks() got unexpected option(s) {', '.join(sorted(unknown))}")
    opts = {**load_video.__kwdefaults__, **options}
    spec = _make_sampling(opts["sampling"], opts["max_frames"], opts["num_frames"], opts["fps"],
                          opts["min_frames"], opts["indices"], opts["timestamps"], opts["start"], opts["end"])
    reader, opened = _open_reader(source, backend=opts["backend"], size_fn=_size_fn(opts["size"]),
                                  skip_bad=opts["skip_bad_frames"], strategy=opts["decode_strategy"],
                                  source_fps=opts["source_fps"], max_bytes=opts["max_bytes"],
                                  timeout=opts["timeout"], max_pixels=opts["max_pixels"],
                                  url_policy=opts["url_policy"])
    try:
        picked = _select(reader, spec, None)
        if any(b < a for a, b in zip(picked, picked[1:])):
            raise MediaError(f"{reader.description}: iter_video_chunks needs indices in ascending order")
        wanted = sorted(set(picked))
        frames: list[Image.Image] = []
        idxs: list[int] = []
        times: list[float] = []
        pending = iter(picked)
        nxt = next(pending, None)
        for idx, ts, img in reader.read(wanted):
            while nxt is not None and nxt < idx:  # skipped (undecodable) frames
                nxt = next(pending, None)
            while nxt == idx:  # a repeated index (e.g. slowfast on a short video) repeats the frame
                frames.append(img)
                idxs.append(idx)
                times.append(ts)
                nxt = next(pending, None)
                if len(frames) == chunk_size:
                    yield _clip(reader, spec, frames, idxs, times)
                    frames, idxs, times = [], [], []
        if frames:
            yield _clip(reader, spec, frames, idxs, times)
    finally:
        reader.close()
        if opened is not None:
            opened.close()
