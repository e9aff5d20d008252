"""The default video backend: PyAV (FFmpeg) with exact frame numbering and seek-or-sequential decoding.

Only the frames that are needed are converted to RGB, and the decoder seeks to the keyframe before a
wanted frame when that is cheaper than decoding through the gap.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from owlvid.errors import MediaError

from .base import MediaWarning, warn_or_raise
from .pyav_timing import PyAVTimeModel, ffmpeg_reason
from .sources import OpenedMedia, sniff_kind

__all__ = ["PyAVReader", "PyAVStream", "VIDEO_DEMUXERS"]

# FFmpeg demuxers we allow. Probing is by content; this list keeps out demuxers that open further
# files or URLs named inside the input (HLS/DASH playlists, concat scripts, image sequences): a crafted
# "video" must not make FFmpeg read other local files or fetch URLs.
VIDEO_DEMUXERS = (
    "mov", "matroska", "webm", "avi", "flv", "mpegts", "mpeg", "gif", "apng", "ogg", "asf", "h264",
    "hevc", "m4v", "ivf", "obu", "yuv4mpegpipe", "nut", "mxf", "rm", "dv", "wav", "mp3", "flac", "aac",
)
# Decoding a few frames costs about as much as a seek (demuxer seek, decoder flush, thread refill).
_SEEK_OVERHEAD_FRAMES = 8
_MAX_RESEEKS = 4
_NONREF_SKIP_CODECS = ("h264", "hevc")


def _stream_rank(stream) -> tuple:
    """Prefer decodable streams, then the most frames, then the largest picture."""
    ctx = stream.codec_context
    if ctx is None:
        return (False, stream.frames or 0, 0)
    return (True, stream.frames or 0, (ctx.width or 0) * (ctx.height or 0))


class PyAVStream(PyAVTimeModel):
    """One opened video stream and its time model (see :class:`PyAVReader`), nothing decoded: what the
    TorchCodec backend uses to number frames exactly like this backend. ``close()`` when done."""

    backend = "pyav"

    def __init__(self, opened: OpenedMedia, *, skip_bad: bool) -> None:
        import av  # noqa: F401 - imported here so that the image path works without PyAV

        self._opened = opened
        self.description = opened.description
        self._skip = skip_bad
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
            reason = ffmpeg_reason(e)
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

    def _after_scan(self) -> None:
        """The packet scan of the probe has read the container to its end: nothing to undo here (a
        reader goes back to the start)."""

    def close(self) -> None:
        c = getattr(self, "_container", None)
        if c is not None:
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass
            self._container = None


class PyAVReader(PyAVStream):
    """One opened video stream with a time model that maps presentation timestamps to frame numbers.

    Time models, cheapest first:
    * ``cfr``: MP4/MOV whose sample table (read from the header, no packet is read) has evenly spaced
      timestamps: frame k is at ``t0 + k * delta``.
    * ``table``: any other file: one demux-only pass (packets are read, never decoded) collects every
      packet's pts; frame k has the k-th smallest pts (exactly decord's numbering).
    * ``count``: packets without timestamps (raw streams): frames are numbered by decoding order of
      output, and the file is only ever decoded sequentially.
    """

    def __init__(self, opened: OpenedMedia, *, size_fn, skip_bad: bool, strategy: str) -> None:
        super().__init__(opened, skip_bad=skip_bad)
        self._size_fn, self._strategy = size_fn, strategy
        self._warned_rotation = False
        self._skip_mode: str | None = None
        self._wanted_pts: set[int] = set()
        # Skipping non-reference frames is only done where FFmpeg's decoders support it well.
        codec = self._stream.codec_context.name
        self._nonref_ok = self._model in ("cfr", "table") and codec in _NONREF_SKIP_CODECS

    def _reopen(self) -> None:
        # Re-opening is the one way back to the start that works for every format (some cannot seek).
        self._container.close()
        self._container = self._open()
        self._stream = self._container.streams[self._stream_index]
        self._stream.thread_type = "AUTO"
        self._skip_mode = None  # a fresh decoder context
        self._fresh = True

    def _after_scan(self) -> None:
        self._reopen()

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
                warn_or_raise(self._skip, f"{self.description}: corrupt or truncated video data "
                                           f"({ffmpeg_reason(e)})")
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
                    reason = ffmpeg_reason(e)
                    raise MediaError(f"{self.description}: unsupported video codec ({reason})") from None
                where = "" if packet.pts is None else f" at {self._time_of(packet.pts, 0):.3f} s"
                warn_or_raise(self._skip, f"{self.description}: undecodable video data{where} "
                                           f"({ffmpeg_reason(e)})")
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
                    warn_or_raise(self._skip, f"{self.description}: frame(s) "
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
                        warn_or_raise(self._skip, f"{self.description}: the video ends after frame "
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

def _chain(first, rest):
    yield first
    yield from rest


def _fmt_list(xs: list[int], limit: int = 8) -> str:
    shown = ", ".join(str(x) for x in xs[:limit])
    return shown + (f", ... ({len(xs)} in all)" if len(xs) > limit else "")


def _format_label(container) -> str:
    fmt = container.format
    return fmt.long_name or fmt.name.split(",")[0]

