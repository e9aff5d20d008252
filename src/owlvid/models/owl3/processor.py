"""The mPLUG-Owl3 processor, reproducing the official one token for token and pixel for pixel.

Prompt: ChatML with an empty system turn; every user turn is split around `<|image|>` and each piece is
tokenized on its own (BPE never merges across a media marker). Images are optionally cut into a grid
of crops plus a global view (`grid_squ_6` anchors, docowl selection, PIL bicubic). `<|video|>` becomes
one `<|image|>` per frame (wrapped in `<|start_video_frame|>`…`<|end_video_frame|>` from 241014 on).

Divergence from the official 240728 processor, on purpose: several images can each be cut (the official
code gives the second image the prompt of the first image's global view).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ...cache import content_key, image_record
from ...errors import InputError
from ...tokenizer import QwenTokenizer
from ...video_plan import CachedVideo, FrameList, StreamedVideo

IMAGE = "<|image|>"
VIDEO = "<|video|>"
GRID_SQU_6 = [(2, 2), (1, 3), (1, 4), (3, 1), (4, 1), (2, 3), (3, 2)]  # (rows, cols); no (1, 1)
NO_MEDIA_OFFSET = -1_000_000


def _box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of int64 xyxy boxes a [N, 4] and b [M, 4], `inter / (union + 1e-5)` as the official code."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / (union + 1e-5)


def select_grid(width: int, height: int, size: int) -> tuple[int, int]:
    """(rows, cols) of the cut grid for an image (docowl anchor ranking)."""
    anchors = torch.tensor([[0, 0, c * size, r * size] for r, c in GRID_SQU_6], dtype=torch.int64)
    image_box = torch.tensor([[0, 0, width, height]], dtype=torch.int64)
    iou = _box_iou(anchors, image_box).squeeze(1)
    shape_boxes = anchors.clone()
    # The official code writes the float height into the int64 box: truncation toward zero.
    shape_boxes[:, 3] = (height / width) * anchors[:, 2].double()
    shape_iou = _box_iou(anchors, shape_boxes).diagonal()
    best = int(torch.argmax(shape_iou * 100 + iou))
    return GRID_SQU_6[best]


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> [3, H, W] float32 normalised with mean = std = 0.5."""
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    return (x - 0.5) / 0.5


def as_rgb(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    from ...media import load_image

    return load_image(image)


def frames_to_pixels(frames: list, size: int) -> torch.Tensor:
    """Video frames -> [T, 3, size, size] (PIL bicubic to a square, never cut)."""
    return torch.stack([to_tensor(as_rgb(f).resize((size, size), Image.BICUBIC)) for f in frames])


def cut_image(image: Image.Image, size: int) -> tuple[list[torch.Tensor], tuple[int, int]]:
    rows, cols = select_grid(image.width, image.height, size)
    big = to_tensor(image.resize((cols * size, rows * size), Image.BICUBIC))
    crops = [big[:, r * size:(r + 1) * size, c * size:(c + 1) * size] for r in range(rows) for c in range(cols)]
    crops.append(to_tensor(image.resize((size, size), Image.BICUBIC)))
    return crops, (rows, cols)


def cut_prompt(rows: int, cols: int, style: str) -> str:
    if style == "v2":
        grid = "\n".join(" ".join(f"subimg({i},{j}){IMAGE}" for j in range(cols)) for i in range(rows))
        return f"Cut to {rows} rows {cols} columns with a global view\n{grid}\nglobal_view{IMAGE}"
    grid = "\n".join(" ".join(IMAGE for _ in range(cols)) for _ in range(rows))
    return f"<|start_cut|>{rows}*{cols}\n{grid}\n{IMAGE}<|end_cut|>"


class Owl3Inputs(dict):
    """`input_ids`, `media_offset`, `pixel_values` like the official processor's output (a dict), plus
    `media_starts` (the index of each `<|image|>`), `media_items` (per image/video: cache key, number of
    crops, pixels or None when cached, `media`: the PreparedVideo or the image's audit record) and
    `messages` (after placeholder expansion)."""

    @property
    def num_tokens(self) -> int:
        return int(self["input_ids"].shape[1])


@dataclass
class Owl3Processor:
    tokenizer: QwenTokenizer
    image_size: int
    cut_style: str  # "v2" (240728) or "v3" (241014, 241101)
    media_offset_format: str  # "rows" ([1, L, 2], 240728/241014) or "starts" (list of [N], 241101)
    video_spans: bool  # `<|start_video_frame|>` ... `<|end_video_frame|>` around video frames

    def __call__(self, messages: list[dict], images: Sequence | None = None,
                 videos: Sequence[Sequence] | None = None, cut_enable: bool = True) -> Owl3Inputs:
        images = list(images or [])
        videos = [v if isinstance(v, (FrameList, CachedVideo, StreamedVideo)) else list(v) for v in (videos or [])]
        messages = [dict(m) for m in messages]
        expanded, items = self._expand_media(messages, images, videos, cut_enable)
        input_ids, starts = self._tokenize(expanded)
        pixels = [p for item in items if item["pixels"] is not None for p in item["pixels"]]
        out = Owl3Inputs(input_ids=torch.tensor([input_ids], dtype=torch.long))
        if self.media_offset_format == "starts":
            out["media_offset"] = [torch.tensor(starts, dtype=torch.long)]
        else:
            out["media_offset"] = media_offset_rows(len(input_ids), starts)
        out["pixel_values"] = torch.stack(pixels) if pixels else None
        out["media_starts"] = starts
        out["media_items"] = items
        out["messages"] = expanded
        return out

    # -- media -------------------------------------------------------------------------------------

    def _expand_media(self, messages: list[dict], images: list, videos: list[list], cut_enable: bool):
        """Replace each placeholder by its expansion; media items (and their crops) come in text order."""
        n_img = sum(str(m.get("content", "")).count(IMAGE) for m in messages)
        n_vid = sum(str(m.get("content", "")).count(VIDEO) for m in messages)
        if n_img != len(images):
            raise InputError(f"the prompt has {n_img} {IMAGE} placeholder(s) but {len(images)} image(s) were given")
        if n_vid != len(videos):
            raise InputError(f"the prompt has {n_vid} {VIDEO} placeholder(s) but {len(videos)} video(s) were given")
        if videos and self.cut_style == "v2":
            cut_enable = False  # the 240728 processor never cuts when a video is present
        image_iter, video_iter = iter(images), iter(videos)
        items: list[dict] = []
        size = self.image_size

        def add(pixels: torch.Tensor | None, key: str | None, count: int, media: object = None) -> None:
            items.append({"key": key or content_key("pixels", pixels), "crops": count, "pixels": pixels,
                          "media": media})

        def expand(match: re.Match) -> str:
            if match.group(0) == VIDEO:
                frames = next(video_iter)
                if isinstance(frames, CachedVideo):
                    add(None, frames.cache_key, frames.num_frames, frames)
                    count = frames.num_frames
                elif isinstance(frames, StreamedVideo):  # decoded while the model encodes (see prefill)
                    items.append({"key": frames.cache_key or content_key("stream", id(frames), frames.source),
                                  "crops": frames.num_frames, "pixels": None, "stream": frames, "media": frames})
                    count = frames.num_frames
                else:
                    if not frames:
                        raise InputError("a video has no frames")
                    pixels = frames_to_pixels(frames, size)
                    prepared = frames if isinstance(frames, FrameList) else None
                    add(pixels, prepared.cache_key if prepared is not None else None, len(frames), prepared)
                    count = len(frames)
                body = IMAGE * count
                return f"<|start_video_frame|>{body}<|end_video_frame|>" if self.video_spans else body
            image = as_rgb(next(image_iter))
            record = image_record(image)
            if not cut_enable:
                add(to_tensor(image.resize((size, size), Image.BICUBIC))[None], None, 1, record)
                return IMAGE
            crops, (rows, cols) = cut_image(image, size)
            add(torch.stack(crops), None, len(crops), record)
            return cut_prompt(rows, cols, self.cut_style)

        pattern = re.compile(re.escape(IMAGE) + "|" + re.escape(VIDEO))
        for m in messages:
            if isinstance(m.get("content"), str) and m.get("role") != "system":
                m["content"] = pattern.sub(expand, m["content"])
        return messages, items

    # -- text --------------------------------------------------------------------------------------

    def _tokenize(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        chunks: list[str] = []
        if not messages or messages[0].get("role") != "system":
            chunks.append("<|im_start|>system\n<|im_end|>")
        if messages and messages[-1].get("role") != "assistant":
            messages = [*messages, {"role": "assistant", "content": ""}]
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content") or ""
            if not isinstance(content, str):
                raise InputError(f"message {i} content must be a string here (got {type(content).__name__})")
            if role == "system":
                chunks.append(f"<|im_start|>system\n{content}<|im_end|>")
            elif role == "user":
                chunks.extend(re.split(f"({re.escape(IMAGE)})", f"\n<|im_start|>user\n{content}<|im_end|>"))
            elif role == "assistant":
                chunks.append("\n<|im_start|>assistant\n")
                if i < len(messages) - 1:  # the final assistant turn is the prompt end (header only)
                    chunks.extend([f"{content}<|im_end|>", "<|endoftext|>"])
            else:
                raise InputError(f"message {i} has unknown role {role!r} (use system, user or assistant)")
        ids: list[int] = []
        starts: list[int] = []
        for chunk in chunks:
            if chunk == IMAGE:
                starts.append(len(ids))
            ids.extend(self.tokenizer.encode(chunk) if chunk else [])
        return ids, starts


def media_offset_rows(length: int, starts: list[int]) -> torch.Tensor:
    """240728/241014 format [1, L, 2]: row i = [0, number of media starting strictly before i]."""
    if not starts:
        rows = torch.zeros(length, 2, dtype=torch.long)
        rows[:, 1] = NO_MEDIA_OFFSET
        return rows[None]
    i = torch.arange(length)[:, None]
    count = (torch.tensor(starts)[None, :] < i).sum(1)
    return torch.stack([torch.zeros_like(count), count], dim=1)[None]
