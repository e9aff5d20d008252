"""Media ingestion: images and videos from paths, URLs, bytes, arrays and frame lists.

See ``docs/media.md`` for sources, sampling presets, options and errors.
"""

from __future__ import annotations

from .image import DEFAULT_MAX_PIXELS, load_image
from .sampling import MAX_FRAMES_HARD_CAP, PRESETS, VideoSampling, cap_indices, frame_at_times, sample_indices
from .sources import (
    DEFAULT_IMAGE_MAX_BYTES,
    DEFAULT_IMAGE_TIMEOUT,
    DEFAULT_VIDEO_MAX_BYTES,
    DEFAULT_VIDEO_TIMEOUT,
    LIBRARY_URL_POLICY,
    MediaFetchError,
    MediaForbiddenUrlError,
    MediaTimeoutError,
    MediaTooLargeError,
    NamedPath,
    UrlPolicy,
    sniff_kind,
)
from .video import (
    BACKENDS,
    DECODE_STRATEGIES,
    MediaWarning,
    OpenedVideo,
    VideoClip,
    VideoInfo,
    iter_video_chunks,
    list_frame_files,
    load_video,
    open_video,
    probe_video,
)

__all__ = [
    "BACKENDS",
    "DECODE_STRATEGIES",
    "DEFAULT_IMAGE_MAX_BYTES",
    "DEFAULT_IMAGE_TIMEOUT",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_VIDEO_MAX_BYTES",
    "DEFAULT_VIDEO_TIMEOUT",
    "LIBRARY_URL_POLICY",
    "MAX_FRAMES_HARD_CAP",
    "MediaFetchError",
    "MediaForbiddenUrlError",
    "MediaTimeoutError",
    "MediaTooLargeError",
    "MediaWarning",
    "NamedPath",
    "OpenedVideo",
    "PRESETS",
    "VideoClip",
    "VideoInfo",
    "UrlPolicy",
    "VideoSampling",
    "cap_indices",
    "frame_at_times",
    "iter_video_chunks",
    "list_frame_files",
    "load_image",
    "load_video",
    "open_video",
    "probe_video",
    "sample_indices",
    "sniff_kind",
]
