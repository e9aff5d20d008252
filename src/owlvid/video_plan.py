"""A request's video, resolved once: the plan and the prepared-video types the models take.

`plan_video` turns a video source and its options into a frozen `VideoPlan` (the model's sampling options,
the frame cap, the visual-cache key, the decoder options); `resolve_plan` opens and probes the video once
and adds what it found and the frames chosen. The decoder gets that plan unchanged and the video already
open: nothing is probed, opened or selected twice. `load_video_frames` (the model's path) and the server's
frame preview both follow it, so the preview shows the frames the model gets.

What a model receives is a `PreparedVideo`: decoded frames (`FrameList`), frames decoded later while the
model encodes them (`StreamedVideo`), or embeddings already in the visual cache (`CachedVideo`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from .cache import content_key, file_identity
from .errors import InputError, MediaTimeout
from .media.sampling import VideoSampling
from .media.sources import describe_source
from .media.video import OpenedVideo, VideoInfo, open_video
from .pipeline import Prefetcher, call_with_timeout

if TYPE_CHECKING:
    from .runtime import ModelRuntime

# Options that choose frames (the rest are the decoder's: backend, max_bytes, timeout, max_pixels, ...).
SELECTION_KEYS = ("sampling", "max_frames", "num_frames", "fps", "min_frames", "start", "end")
# Presets whose own `max_frames` respects a frame cap: `fps` spreads its frames, `all` refuses past it.
_CAPPED_BY_MAX_FRAMES = ("fps", "all")
_STREAMED_DECODER_OPTIONS = {"backend", "skip_bad_frames", "max_bytes"}


# -- prepared videos -------------------------------------------------------------------------------------


class PreparedVideo:
    """What every prepared video offers, whatever holds its pixels. Code that handles videos uses these
    attributes, never `len()`.

    `num_frames`: frames the model sees; `cache_key`: file identity + sampling settings (None when
    unknown); `indices` / `timestamps`: source frame numbers and their times in seconds, where known.
    For audits: `source_name` (a safe description of the source), `sha256` (of the source's bytes),
    `decoder` (the backend that decoded it), `decode_s` (seconds spent fetching and decoding it for this
    request)."""

    cache_key: str | None = None
    indices: list[int] | None = None
    timestamps: list[float] | None = None
    source_name: str | None = None
    sha256: str | None = None
    decoder: str | None = None
    decode_s: float = 0.0

    @property
    def num_frames(self) -> int:
        raise NotImplementedError

    def describe(self) -> dict:
        """What a request used of this video: the audit record (see `Generation.media`) before encoding."""
        return {"type": "video", "source": self.source_name, "sha256": self.sha256, "decoder": self.decoder,
                "frames": self.num_frames, "indices": self.indices, "timestamps": self.timestamps,
                "decode_s": self.decode_s}

    def remember(self) -> dict:
        """What the visual cache keeps next to this video's embeddings, so that a later request answered from
        the cache can say which frames it saw (see `CachedVideo`)."""
        return {"sha256": self.sha256, "decoder": self.decoder, "indices": self.indices,
                "timestamps": self.timestamps}


class FrameList(list, PreparedVideo):
    """Decoded video frames (PIL images) with their cache key and, from a decoder, their source indices."""

    def __init__(self, frames, cache_key: str | None = None, indices: list[int] | None = None,
                 timestamps: list[float] | None = None) -> None:
        super().__init__(frames)
        self.cache_key = cache_key
        self.indices = None if indices is None else list(indices)
        self.timestamps = None if timestamps is None else list(timestamps)

    @property
    def num_frames(self) -> int:
        return len(self)


class CachedVideo(PreparedVideo):
    """A video whose image embeddings are already in the visual cache: nothing to decode or encode."""

    def __init__(self, cache_key: str, num_frames: int, remembered: dict | None = None) -> None:
        self.cache_key = cache_key
        self._num_frames = num_frames
        for name, value in (remembered or {}).items():  # what `PreparedVideo.remember` kept
            if name in ("sha256", "decoder", "indices", "timestamps"):
                setattr(self, name, value)

    @property
    def num_frames(self) -> int:
        return self._num_frames

    def __repr__(self) -> str:
        return f"CachedVideo({self.cache_key!r}, num_frames={self._num_frames})"


# -- the plan --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoPlan:
    """How one video of a request is read. `sampling` holds the model's frame selection with the frame cap
    in it; `decoder` the reader's options; `cache_key` is None unless the source is a local file. A
    resolved plan (`resolve_plan`) adds what probing found (`info`) and the frames chosen (`indices`)."""

    source: Any
    name: str
    sampling: VideoSampling
    decoder: Mapping[str, Any]
    frame_cap: int | None
    cache_key: str | None
    info: VideoInfo | None = None
    indices: tuple[int, ...] | None = None


def plan_video(source: Any, runtime: ModelRuntime, options: dict, *, frame_cap: int | None = None) -> VideoPlan:
    """The plan of a video: the model's defaults for the options the caller left open, and the one place
    where a frame cap (a server's --max-frames) applies: at most `frame_cap` of the frames the preset picks
    are kept, evenly, before anything is decoded (`fps` and `all` take it as their `max_frames` unless the
    caller gave one). Nothing is opened (a local file is only stat'ed for its cache key)."""
    requested = dict(options)
    if frame_cap is not None and requested.get("sampling") in _CAPPED_BY_MAX_FRAMES:
        requested.setdefault("max_frames", frame_cap)
    opts = runtime.video_options(requested)
    key = None
    if isinstance(source, (str, os.PathLike)) and not str(source).startswith(("http:", "https:", "data:")):
        try:
            capped = () if frame_cap is None else (("frame_cap", frame_cap),)
            key = content_key("video-file", file_identity(source), sorted(opts.items()), *capped)
        except OSError:
            key = None  # missing file: opening it reports that
    decoder = {k: v for k, v in opts.items() if k not in SELECTION_KEYS}
    return VideoPlan(source, describe_source(source), _sampling(opts, frame_cap), MappingProxyType(decoder),
                     frame_cap, key)


def _sampling(opts: dict, frame_cap: int | None) -> VideoSampling:
    sampling = opts.get("sampling")
    if isinstance(sampling, VideoSampling):
        return sampling if frame_cap is None else dataclasses.replace(sampling, frame_cap=frame_cap)
    if not isinstance(sampling, str):
        raise InputError(f"sampling must be a preset name, got {sampling!r}")
    spec = {k: opts[k] for k in SELECTION_KEYS[1:] if k in opts}
    return VideoSampling(preset=sampling, **spec, frame_cap=frame_cap)


def resolve_plan(plan: VideoPlan) -> tuple[VideoPlan, OpenedVideo]:
    """Open and probe the video once and choose its frames (at most `MAX_FRAMES_HARD_CAP`): the resolved
    plan, and the opened video to decode them from (the caller closes it)."""
    video = open_video(plan.source, **plan.decoder)
    try:
        indices = video.select(plan.sampling)
    except BaseException:
        video.close()
        raise
    return dataclasses.replace(plan, info=video.info, indices=tuple(indices)), video


def _streams(plan: VideoPlan) -> bool:
    """Decode while encoding? The cases it has always covered: a plain preset on a local constant-rate file
    read with the default decoder options (everything else is decoded at once, as before)."""
    s = plan.sampling
    return (plan.cache_key is not None and os.path.isfile(plan.source)
            and set(plan.decoder) <= _STREAMED_DECODER_OPTIONS
            and s.start is None and s.end is None and s.indices is None and s.timestamps is None
            and not plan.info.variable_frame_rate)


class StreamedVideo(PreparedVideo):
    """A video whose frames are chosen (a resolved plan) but decoded only when the model encodes them, chunk
    by chunk, from the video opened when it was planned."""

    def __init__(self, plan: VideoPlan, video: OpenedVideo, chunk_size: int = 16,
                 media_timeout: float | None = None) -> None:
        assert plan.indices is not None and plan.info is not None, "a resolved plan"
        self.plan = plan
        self._video: OpenedVideo | None = video
        self.indices = list(plan.indices)
        self.cache_key = plan.cache_key
        self.chunk_size = chunk_size
        self.media_timeout = media_timeout  # decoding that stalls or takes longer in all: MediaTimeout
        self.decoder = plan.info.backend
        self.source_name = plan.name

    @property
    def source(self) -> Any:
        return self.plan.source

    @property
    def num_frames(self) -> int:
        return len(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def pixel_chunks(self, transform: Callable[[list], torch.Tensor]) -> Iterator[torch.Tensor]:
        """Yield `transform(frames)` for consecutive chunks, decoded and transformed on a worker thread.
        The frames' timestamps and the decoding time are recorded as they come (`timestamps`, `decode_s`).
        With `media_timeout`, a chunk that does not come within it, or decoding that takes longer in all,
        raises MediaTimeout (the worker is abandoned). The video is closed once read; read again (the same
        video encoded twice without a visual cache), it is opened again for the same frames."""
        self.timestamps = []
        limit = self.media_timeout
        video, self._video = self._video, None
        plan = self.plan

        def produce():
            opened = video if video is not None else open_video(plan.source, **plan.decoder)
            try:
                chunks = opened.chunks(self.indices, plan.sampling.name, self.chunk_size)
                spent = 0.0
                while True:
                    t0 = time.perf_counter()
                    clip = next(chunks, None)
                    spent += time.perf_counter() - t0
                    self.decode_s += time.perf_counter() - t0
                    if clip is None:
                        return
                    if limit is not None and spent > limit:
                        raise MediaTimeout(f"{clip.source}: decoding took longer than media_timeout={limit:g} s")
                    self.timestamps.extend(clip.timestamps)
                    yield transform(clip.frames)
            finally:
                opened.close()

        feed = Prefetcher(produce(), depth=2)
        try:
            while True:
                chunk = feed.next(timeout=limit)
                if chunk is Prefetcher.EMPTY:
                    raise MediaTimeout(f"{self.source_name}: no decoded frames for media_timeout={limit:g} s")
                if chunk is Prefetcher.END:
                    return
                yield chunk
        finally:
            feed.close()


# -- the model's path ------------------------------------------------------------------------------------


def load_video_frames(source: Any, runtime: ModelRuntime, options: dict, *, frame_cap: int | None = None,
                      media_timeout: float | None = None,
                      decoded: Callable[[str], PreparedVideo | None] | None = None) -> PreparedVideo | list:
    """A list of frames is used as is; anything else is planned (`plan_video`) and decoded with the model's
    sampling preset. A local file already encoded with the same settings is not decoded again (the
    runtime's visual cache), nor one whose frames `decoded(key)` holds (e.g. decoded by the server's frame
    preview). `frame_cap`: at most this many frames (evenly spread over those the preset picks), chosen
    before decoding. `media_timeout`: seconds the fetching and decoding may take (MediaTimeout after that,
    for frames decoded later while encoding too). The result records what was decoded, how and how long
    (`PreparedVideo.describe()`)."""
    if isinstance(source, PreparedVideo):
        return source  # already prepared (e.g. `owlvid chat` keeps a video across turns)
    if isinstance(source, (list, tuple)):
        return list(source)
    plan = plan_video(source, runtime, options, frame_cap=frame_cap)
    if plan.cache_key is not None:
        cached = runtime.cached_video(plan.cache_key)
        if cached is None and decoded is not None:
            cached = decoded(plan.cache_key)
        if cached is not None:
            cached.source_name = plan.name
            return cached

    def load() -> PreparedVideo:
        resolved, video = resolve_plan(plan)
        if runtime.supports_streamed_video and _streams(resolved):
            streamed = StreamedVideo(resolved, video, media_timeout=media_timeout)  # the video stays open
            streamed.sha256 = video.sha256()
            return streamed
        with video:
            clip = video.decode(resolved.indices, resolved.sampling.name)
        prepared = FrameList(clip.frames, resolved.cache_key, clip.indices, clip.timestamps)
        prepared.sha256, prepared.decoder = clip.sha256, clip.backend
        return prepared

    t0 = time.perf_counter()
    prepared = call_with_timeout(load, media_timeout, plan.name)
    prepared.source_name = plan.name
    prepared.decode_s = time.perf_counter() - t0  # a streamed video adds its decoding while it is encoded
    return prepared
