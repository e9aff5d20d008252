"""A request's messages: OpenAI / Hugging Face style messages normalised for the model's processor, their
media loaded, and the request checks the Python API and the server share.

Messages are `{"role": ..., "content": str | [parts]}` with parts `{"type": "text", "text": ...}`,
`{"type": "image", "image": path|URL|PIL|array}`, `{"type": "video", "video": path|URL|[frames], "max_frames"?,
"fps"?, "sampling"?, "num_frames"?, "start"?, "end"?}` (and the OpenAI `image_url` / `video_url` forms). Videos
are planned and loaded by `owlvid.video_plan`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .cache import IMAGE_DECODE_S, IMAGE_SOURCE
from .errors import InputError
from .media import load_image
from .media.sources import describe_source, is_bytes_source
from .pipeline import call_with_timeout
from .video_plan import load_video_frames

if TYPE_CHECKING:
    from .runtime import ModelRuntime

_VIDEO_PART_KEYS = ("max_frames", "fps", "sampling", "num_frames", "start", "end")


# -- request checks shared by the Python API and the server --------------------------------------------

SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1  # what torch.Generator.manual_seed takes


def check_seed(seed: Any) -> None:
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an integer, got {type(seed).__name__}")
    if not SEED_MIN <= seed <= SEED_MAX:
        raise InputError(f"seed {seed} is out of range: it must be between -2**63 and 2**64-1")


def check_text(text: Any, where: str) -> None:
    """Text must be encodable as UTF-8: a lone surrogate (e.g. JSON "\\ud800") is refused."""
    if not isinstance(text, str):
        raise InputError(f"{where} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{where} is not valid Unicode text: a lone surrogate {text[e.start]!r} at "
                         f"character {e.start}") from None


def _part_source(part: dict, kind: str) -> Any:
    value = part.get(kind)
    if value is None and f"{kind}_url" in part:  # OpenAI style {"type": "image_url", "image_url": {"url": ...}}
        value = part[f"{kind}_url"]
        value = value.get("url") if isinstance(value, dict) else value
    if value is None:
        raise InputError(f"content part of type {part.get('type')!r} has no {kind!r} field")
    return value


# -- messages and their media ---------------------------------------------------------------------------


def load_image_source(source: Any, media_timeout: float | None = None, *, name: Any = None) -> Any:
    """An image given as a path, URL, data: URL, bytes or file-like, loaded now (under `media_timeout`),
    with where it came from and how long it took in its `info` (see `cache.image_record`). Anything else
    (PIL images, arrays) is returned as it is, for the processor. `source` may also be a function that
    loads the image (with the caller's limits); `name` then says what it loads."""
    if callable(source) and not is_bytes_source(source):
        load = source
    elif is_bytes_source(source):
        name = source
        load = lambda: load_image(source)  # noqa: E731
    else:
        return source
    name = describe_source(name)
    t0 = time.perf_counter()
    image = call_with_timeout(load, media_timeout, name)
    image.info[IMAGE_SOURCE] = name
    image.info[IMAGE_DECODE_S] = time.perf_counter() - t0
    return image


def normalize_messages(messages: list[dict], runtime: ModelRuntime, images: list | None, videos: list | None,
                       video_options: dict, media_timeout: float | None = None) -> tuple[list[dict], list, list]:
    """Structured content parts -> string content with the model's placeholders + media lists in
    text order. A media part followed by text renders as `<placeholder>\\n{text}` like the official
    README prompt. Media are loaded here, each within `media_timeout` seconds when given."""
    if not isinstance(messages, list) or not messages:
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    out_images = [load_image_source(i, media_timeout) for i in images or []]
    out_videos = [load_video_frames(v, runtime, video_options, media_timeout=media_timeout) for v in (videos or [])]
    structured = any(isinstance(m.get("content"), list) for m in messages if isinstance(m, dict))
    if structured and (images or videos):
        raise InputError("pass media either as content parts or as images=/videos=, not both")
    out: list[dict] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise InputError(f"message {i} must be a dict with 'role' and 'content'")
        content = m.get("content")
        if content is None or isinstance(content, str):
            check_text(content or "", f"message {i} content")
            out.append({"role": m["role"], "content": content or ""})
            continue
        if not isinstance(content, list):
            raise InputError(f"message {i} content must be a string or a list of parts")
        text = ""
        prev_media = False
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                part_text = part.get("text", "")
                part_text = part_text if isinstance(part_text, str) else str(part_text)
                check_text(part_text, f"message {i} text part")
                text += ("\n" if prev_media else "") + part_text
                prev_media = False
            elif kind in ("image", "image_url"):
                out_images.append(load_image_source(_part_source(part, "image"), media_timeout))
                text += runtime.image_placeholder
                prev_media = True
            elif kind in ("video", "video_url"):
                opts = dict(video_options)
                opts.update({k: part[k] for k in _VIDEO_PART_KEYS if k in part})
                out_videos.append(load_video_frames(_part_source(part, "video"), runtime, opts,
                                                    media_timeout=media_timeout))
                text += runtime.video_placeholder
                prev_media = True
            else:
                raise InputError(f"message {i} has a content part of unknown type {kind!r}")
        out.append({"role": m["role"], "content": text})
    return out, out_images, out_videos
