"""Video loading entry points: :func:`load_video`, :func:`iter_video_chunks`, :func:`probe_video`,
:func:`open_video` (probe once, decode later).

They open the source, pick a reader from the backend registry (:mod:`.pyav_backend`, the default, or
:mod:`.torchcodec_backend`; frame folders, lists and arrays: :mod:`.frames`), select frames with
:mod:`.sampling` and decode only those. Readers share the protocol in :mod:`.base` and never import this
module.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from owlvid.errors import MediaError

from .base import MediaWarning, SizeRule, VideoClip, VideoInfo, VideoReader, size_fn
from .frames import FRAME_IMAGE_EXTENSIONS, frame_list_reader, list_frame_files
from .image import DEFAULT_MAX_PIXELS
from .pyav_backend import VIDEO_DEMUXERS, PyAVReader
from .sampling import MAX_FRAMES_HARD_CAP, VideoSampling
from .sources import (
    DEFAULT_VIDEO_MAX_BYTES,
    DEFAULT_VIDEO_TIMEOUT,
    OpenedMedia,
    UrlPolicy,
    describe_source,
    is_bytes_source,
    open_source,
)
from .torchcodec_backend import TorchCodecReader

__all__ = [
    "BACKENDS",
    "DECODE_STRATEGIES",
    "FRAME_IMAGE_EXTENSIONS",
    "MediaWarning",
    "OpenedVideo",
    "SizeRule",
    "VIDEO_DEMUXERS",
    "VideoClip",
    "VideoInfo",
    "iter_video_chunks",
    "list_frame_files",
    "load_video",
    "open_video",
    "probe_video",
]

# Backend name -> reader factory (an opened file in, a VideoReader out). TorchCodec itself is imported
# only when its reader is built.
_READERS: dict[str, Callable[..., VideoReader]] = {
    "pyav": lambda opened, *, size_fn, skip_bad, strategy: PyAVReader(opened, size_fn=size_fn, skip_bad=skip_bad,
                                                                       strategy=strategy),
    "torchcodec": lambda opened, *, size_fn, skip_bad, strategy: TorchCodecReader(opened, size_fn=size_fn,
                                                                                   skip_bad=skip_bad),
}
BACKENDS = tuple(_READERS)
DECODE_STRATEGIES = ("auto", "seek", "sequential")


_SELECTION = ("max_frames", "num_frames", "fps", "min_frames", "indices", "timestamps", "start", "end")


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
                 max_pixels: int | None, url_policy: UrlPolicy | None) -> tuple[VideoReader, OpenedMedia | None]:
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
        reader = frame_list_reader(src, desc, float(source_fps or 1.0), size_fn, skip_bad,
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
        reader = _READERS[backend](opened, size_fn=size_fn, skip_bad=skip_bad, strategy=strategy)
    except BaseException:
        opened.close()
        raise
    return reader, opened


def _looks_like_url(source: Any) -> bool:
    return isinstance(source, str) and re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+:", source) is not None \
        and not os.path.exists(source)


class OpenedVideo:
    """A video opened and probed once (:func:`open_video`): its :class:`VideoInfo`, then any of its frames,
    as often as needed, without opening or probing the source again. Close it (or use ``with``); a
    collected one closes itself."""

    _reader: VideoReader | None = None
    _opened: OpenedMedia | None = None

    def __init__(self, reader: VideoReader, opened: OpenedMedia | None) -> None:
        self._reader, self._opened = reader, opened
        self.info = VideoInfo(reader.total_frames, reader.avg_fps, reader.duration, reader.frame_times(),
                              reader.variable_frame_rate, reader.backend, reader.description)

    def select(self, spec: VideoSampling, cap: int | None = MAX_FRAMES_HARD_CAP) -> list[int]:
        """The frames ``spec`` picks (source indices; more than ``cap`` raises MediaError)."""
        i = self.info
        return spec.select(i.total_frames, i.fps, i.frame_times, i.duration, cap=cap)

    def sha256(self) -> str | None:
        """SHA-256 of the source's bytes (None for frame folders and lists)."""
        return self._opened.sha256() if self._opened is not None else None

    def decode(self, picked: Sequence[int], sampling: str, *, sha256: bool = True) -> VideoClip:
        """The frames ``picked`` (any order, repeats allowed) as one clip; ``sampling`` names the selection."""
        wanted = sorted(set(picked))
        got: dict[int, tuple[float, Image.Image]] = {}
        for idx, ts, img in self._reader.read(wanted):
            got[idx] = (ts, img)
        keep = [i for i in picked if i in got]
        if not keep:
            raise MediaError(f"{self.info.source}: none of the {len(wanted)} requested frames could be decoded")
        return self._clip(sampling, [got[i][1] for i in keep], keep, [got[i][0] for i in keep],
                          self.sha256() if sha256 else None)

    def chunks(self, picked: Sequence[int], sampling: str, chunk_size: int) -> Iterator[VideoClip]:
        """The frames ``picked`` (ascending) as consecutive clips of at most ``chunk_size`` frames, decoded
        lazily: one chunk of RGB frames alive at a time."""
        if any(b < a for a, b in zip(picked, picked[1:])):
            raise MediaError(f"{self.info.source}: iter_video_chunks needs indices in ascending order")
        frames: list[Image.Image] = []
        idxs: list[int] = []
        times: list[float] = []
        pending = iter(picked)
        nxt = next(pending, None)
        for idx, ts, img in self._reader.read(sorted(set(picked))):
            while nxt is not None and nxt < idx:  # skipped (undecodable) frames
                nxt = next(pending, None)
            while nxt == idx:  # a repeated index (e.g. slowfast on a short video) repeats the frame
                frames.append(img)
                idxs.append(idx)
                times.append(ts)
                nxt = next(pending, None)
                if len(frames) == chunk_size:
                    yield self._clip(sampling, frames, idxs, times)
                    frames, idxs, times = [], [], []
        if frames:
            yield self._clip(sampling, frames, idxs, times)

    def _clip(self, sampling: str, frames, indices, timestamps, sha256: str | None = None) -> VideoClip:
        i = self.info
        return VideoClip(frames=frames, indices=indices, timestamps=timestamps, fps=i.fps, duration=i.duration,
                         total_frames=i.total_frames, backend=i.backend, source=i.source, sampling=sampling,
                         sha256=sha256)

    def close(self) -> None:
        reader, opened, self._reader, self._opened = self._reader, self._opened, None, None
        if reader is not None:
            reader.close()
        if opened is not None:
            opened.close()

    def __enter__(self) -> OpenedVideo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if self._reader is not None:
            self.close()


def open_video(
    source: Any,
    *,
    backend: str = "pyav",
    size: SizeRule = None,
    skip_bad_frames: bool = False,
    max_bytes: int | None = DEFAULT_VIDEO_MAX_BYTES,
    timeout: float | None = DEFAULT_VIDEO_TIMEOUT,
    source_fps: float | None = None,
    decode_strategy: str = "auto",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    url_policy: UrlPolicy | None = None,
) -> OpenedVideo:
    """Open and probe a video once (options as :func:`load_video`'s): select frames with its ``info`` and
    decode them with ``decode`` / ``chunks``, any number of times."""
    reader, opened = _open_reader(source, backend=backend, size_fn=size_fn(size), skip_bad=skip_bad_frames,
                                  strategy=decode_strategy, source_fps=source_fps, max_bytes=max_bytes,
                                  timeout=timeout, max_pixels=max_pixels, url_policy=url_policy)
    try:
        return OpenedVideo(reader, opened)
    except BaseException:
        reader.close()
        if opened is not None:
            opened.close()
        raise


def probe_video(
    source: Any,
    *,
    backend: str = "pyav",
    source_fps: float | None = None,
    max_bytes: int | None = DEFAULT_VIDEO_MAX_BYTES,
    timeout: float | None = DEFAULT_VIDEO_TIMEOUT,
    url_policy: UrlPolicy | None = None,
) -> dict[str, Any]:
    """Frame count, average fps, duration and whether the frame rate varies, without decoding."""
    with open_video(source, backend=backend, source_fps=source_fps, max_bytes=max_bytes, timeout=timeout,
                    url_policy=url_policy) as video:
        return video.info.as_dict()


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
    with open_video(source, backend=backend, size=size, skip_bad_frames=skip_bad_frames, max_bytes=max_bytes,
                    timeout=timeout, source_fps=source_fps, decode_strategy=decode_strategy,
                    max_pixels=max_pixels, url_policy=url_policy) as video:
        return video.decode(video.select(spec), spec.name)


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
    spec = _make_sampling(opts.pop("sampling"), *(opts.pop(k) for k in _SELECTION))
    with open_video(source, **opts) as video:
        yield from video.chunks(video.select(spec, cap=None), spec.name, chunk_size)
