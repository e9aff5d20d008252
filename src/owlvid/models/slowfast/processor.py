"""The Slow-Fast processor: `qwen_1_5` prompt, chunk-wise tokenization around `<image>` (-200), and the
official CLIP-style preprocessing (PIL bicubic shortest-edge resize to 576, centre crop, CLIP mean/std).

Official behaviours reproduced on purpose:
  * the default system prompt "You are a helpful assistant." (a leading system message replaces it);
  * the prompt is split on the literal `<image>` and every chunk is tokenized on its own;
  * after splicing the fast tokens, the sequence is cut to `tokenizer_model_max_length` (4096 / 3072)
    keeping the beginning. That can drop the end of the question and the assistant header, so owlvid
    warns when it happens; `truncation=False` (processor call, or `runtime.truncation = False`)
    keeps the whole prompt instead.
Decisions where the official code crashes or is inconsistent: at most one image or one video per
request, one `<image>` placeholder per visual, and a prompt without any visual runs as a plain Qwen2
text model (the hybrid layers' cross-attention is zeroed for samples without visual tokens, exactly
as the official model treats pure-text samples of a batch).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ...cache import image_record
from ...errors import InputError
from ...tokenizer import QwenTokenizer
from ...video_plan import PreparedVideo
from .config import IMAGE_TOKEN_INDEX, SlowFastConfig
from .vision import token_counts

IMAGE = "<image>"
DEFAULT_SYSTEM = "You are a helpful assistant."
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------------------------- pixels


def as_rgb(image) -> Image.Image:
    """PIL (any mode), HxWx3 uint8 array, or a path/URL (through owlvid.media) -> RGB PIL image."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise InputError("an image array must be HxWx3 uint8 RGB "
                             f"(got shape {image.shape}, {image.dtype})")
        return Image.fromarray(image)
    from ...media import load_image

    return load_image(image)


@dataclass
class ClipImageProcessor:
    """The official hard-coded `CLIPImageProcessor` state: shortest edge and crop 576, bicubic (PIL),
    rescale 1/255 in float64 then float32, normalise in float32 with the OpenAI-CLIP mean/std."""

    size: int = 576
    crop_size: int = 576
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD

    def resize_and_crop(self, image) -> np.ndarray:
        """uint8 [crop, crop, 3] after the PIL-exact resize and centre crop."""
        img = as_rgb(image)
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.size * long / short)
        new_w, new_h = (self.size, new_long) if w <= h else (new_long, self.size)
        arr = np.asarray(img.resize((new_w, new_h), Image.BICUBIC))
        c = self.crop_size
        if new_h < c or new_w < c:
            raise InputError(f"image of size {w}x{h} is too small for a {c}x{c} crop")
        top, left = (new_h - c) // 2, (new_w - c) // 2
        return arr[top:top + c, left:left + c]

    def __call__(self, frames: Sequence) -> torch.Tensor:
        """A list of frames/images -> pixel_values [T, 3, crop, crop] float32."""
        c = self.crop_size
        out = torch.empty((len(frames), 3, c, c), dtype=torch.float32)
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        for i, frame in enumerate(frames):
            x = (self.resize_and_crop(frame).astype(np.float64) * (1 / 255)).astype(np.float32)
            x = (x - mean) / std
            out[i] = torch.from_numpy(x).permute(2, 0, 1)
        return out


# ----------------------------------------------------------------------------------------------- prompt


class SlowFastInputs(dict):
    """`input_ids` [1, n] (with -200 at `<image>`) and `pixel_values` [T, 3, 576, 576] (or None) as the
    official pipeline, plus `prompt`, `num_frames`, `num_fast_tokens`, `num_slow_tokens`, `seq_len`
    (prefill length after splicing and truncation), `truncated` and `media` (the visual's audit record)."""

    @property
    def seq_len(self) -> int:
        return int(self["seq_len"])


def render_qwen_1_5(messages: list[dict]) -> str:
    """The `qwen_1_5` ChatML conversation; the prompt ends with the assistant header (or, when the
    last message is an assistant turn with text, with that text as the start of the answer)."""
    msgs = list(messages)
    system = DEFAULT_SYSTEM
    if msgs and msgs[0].get("role") == "system":
        system = msgs.pop(0).get("content") or ""
    out = [f"<|im_start|>system\n{system}<|im_end|>\n"]
    if not msgs or msgs[-1].get("role") != "assistant":
        msgs.append({"role": "assistant", "content": ""})
    for i, m in enumerate(msgs):
        role, content = m.get("role"), m.get("content")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise InputError(f"message content must be a string here (got {type(content).__name__})")
        if role not in ("user", "assistant"):
            where = "only as the first message" if role == "system" else "(use system, user or assistant)"
            raise InputError(f"message with role {role!r} is not allowed here {where}")
        last = i == len(msgs) - 1
        if last and role == "assistant":
            out.append(f"<|im_start|>assistant\n{content}")
        else:
            out.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
    return "".join(out)


def tokenize_with_image(tokenizer: QwenTokenizer, prompt: str) -> list[int]:
    """Split on `<image>`, tokenize every chunk on its own, join with -200 (Qwen2 adds no BOS)."""
    ids: list[int] = []
    for i, chunk in enumerate(prompt.split(IMAGE)):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        if chunk:
            ids.extend(tokenizer.encode(chunk))
    return ids


@dataclass
class SlowFastProcessor:
    tokenizer: QwenTokenizer
    cfg: SlowFastConfig
    truncation: bool = True  # the official cut to `tokenizer_model_max_length` after splicing
    image_processor: ClipImageProcessor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.image_processor is None:
            size = self.cfg.vision.image_size
            self.image_processor = ClipImageProcessor(size=size, crop_size=size)

    def __call__(self, messages: list[dict], images: Sequence | None = None,
                 videos: Sequence[Sequence] | None = None, cut_enable: bool | None = None,
                 truncation: bool | None = None) -> SlowFastInputs:
        """`cut_enable` is accepted for API symmetry with mPLUG-Owl3 and ignored (no image cutting)."""
        del cut_enable
        images = list(images or [])
        media = [v.describe() if isinstance(v, PreparedVideo) else {"type": "video"} for v in videos or []]
        videos = [self._frames(v) for v in (videos or [])]
        media += [image_record(as_rgb(i) if isinstance(i, Image.Image) else i) for i in images]
        prompt = render_qwen_1_5(messages)
        n_placeholders = prompt.count(IMAGE)
        n_visuals = len(images) + len(videos)
        if n_visuals > 1:
            raise InputError("Slow-Fast takes one video or one image per request "
                             f"(got {len(videos)} video(s) and {len(images)} image(s))")
        if n_placeholders != n_visuals:
            raise InputError(f"the prompt has {n_placeholders} {IMAGE} placeholder(s) but {n_visuals} "
                             f"image/video input(s) were given; put one {IMAGE} where the visual goes")
        frames = videos[0] if videos else images
        modality = "video" if videos else ("image" if images else None)
        ids = tokenize_with_image(self.tokenizer, prompt)
        num_frames = len(frames)
        n_fast, n_slow = token_counts(num_frames, self.cfg) if num_frames else (0, 0)
        seq_len = len(ids) - n_placeholders + n_fast
        limit = self.cfg.model_max_length
        do_truncate = self.truncation if truncation is None else truncation
        truncated = bool(do_truncate and limit is not None and seq_len > limit)
        if truncated:
            warnings.warn(f"Slow-Fast prompt of {seq_len} positions cut to tokenizer_model_max_length="
                          f"{limit} as the official model does (the end of the prompt is lost); pass "
                          "truncation=False or set runtime.truncation = False to keep it", stacklevel=2)
            seq_len = limit
        return SlowFastInputs(
            input_ids=torch.tensor([ids], dtype=torch.long),
            pixel_values=self.image_processor(frames) if frames else None,
            modality=modality, prompt=prompt, num_frames=num_frames, num_fast_tokens=n_fast,
            num_slow_tokens=n_slow, seq_len=seq_len, truncated=truncated, media=media)

    @staticmethod
    def _frames(video) -> list:
        if isinstance(video, (np.ndarray, torch.Tensor)) and video.ndim == 4:  # [T, H, W, 3] uint8 stack
            frames = list(video)
        elif isinstance(video, (list, tuple)):
            frames = list(video)
        else:
            raise InputError("a video must be a list of frames (PIL images or HxWx3 uint8 arrays) or a "
                             f"[T, H, W, 3] array (got {type(video).__name__})")
        if not frames:
            raise InputError("a video has no frames")
        return frames
