"""The contract between a model family and everything above it (engine, API, server, batch jobs).

A model family provides one `ModelRuntime` subclass: it loads its checkpoint (`load`), turns messages and
media into model inputs (`prepare`), and runs the prefill and the decoding steps on float32 next-token
logits. What a family can do beyond that is declared by class flags that callers read by value, never
probed with `hasattr`:

* `supports_chunked_prefill`: `encode_media` / `begin_prefill` / `prefill_step` (a long prompt is
  prefilled chunk by chunk between other requests' decoding steps);
* `supports_batching`: `start_batch` / `join_batch` / `keep_rows` / `decode_batch` (continuous batching);
* `supports_streamed_video`: video files may arrive as `StreamedVideo` (decoded chunk by chunk while the
  vision tower encodes);
* `uses_visual_cache`: the runtime reads and fills `visual_cache` (set by `owlvid.load`);
* `penalize_prompt`: whether a repetition penalty also sees the prompt tokens (the official behaviour of
  each family).

Model-specific request policy lives here too (`video_options`: what a frame count means for this model),
so that the API, the server and batch jobs apply it the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from .cache import CachedVideo, VisualCache
from .errors import UnsupportedError
from .layers import KVCache, new_attention_inputs
from .tokenizer import QwenTokenizer


@dataclass
class DecodeState:
    """One request's decoding state: its text K/V cache and the sequence index of the next token."""

    cache: KVCache
    position: int


class ModelRuntime:
    """Base class of the model runtimes: the attributes every caller may read, the methods every family
    implements, and the optional capabilities (flags + methods that raise UnsupportedError when off)."""

    architecture: ClassVar[str] = ""
    image_placeholder: ClassVar[str] = ""
    video_placeholder: ClassVar[str] = ""
    default_video_sampling: ClassVar[str] = ""  # the media sampling preset a plain video path gets
    supports_chunked_prefill: ClassVar[bool] = False
    supports_batching: ClassVar[bool] = False
    supports_streamed_video: ClassVar[bool] = False
    uses_visual_cache: ClassVar[bool] = False
    penalize_prompt: ClassVar[bool] = True

    def __init__(self, model: torch.nn.Module, tokenizer: QwenTokenizer, processor: Any, folder: Path,
                 device: torch.device, dtype: torch.dtype, stop_token_ids: list[int], max_positions: int) -> None:
        self.model, self.tokenizer, self.processor = model, tokenizer, processor
        self.folder, self.device, self.dtype = folder, device, dtype
        self.stop_token_ids = stop_token_ids
        self.max_positions = max_positions
        self.visual_cache: VisualCache | None = None

    # -- what every family implements --------------------------------------------------------------

    @classmethod
    def load(cls, folder: Path, raw_config: dict, tokenizer: QwenTokenizer, device: torch.device,
             dtype: torch.dtype) -> ModelRuntime:
        raise NotImplementedError

    def describe(self) -> dict:
        """Architecture facts for `owlvid info` and `Model.describe()`."""
        raise NotImplementedError

    def prepare(self, messages: list[dict], images: list, videos: list, cut_enable: bool | None
                ) -> tuple[Any, list[int]]:
        """Messages with the model's placeholders + media lists -> (model inputs, prompt token ids)."""
        raise NotImplementedError

    def prefill(self, request: Any) -> tuple[torch.Tensor, Any]:
        """The whole prompt: (float32 next-token logits [vocab], decoding state)."""
        raise NotImplementedError

    def decode(self, state: Any, token_id: int) -> torch.Tensor:
        """One generated token: the next float32 logits [vocab]."""
        raise NotImplementedError

    # -- policy with a default -------------------------------------------------------------------------

    def video_options(self, requested: dict) -> dict:
        """The options a video is decoded with: the caller's, then this model's defaults for what the
        caller left open (a frame count or rate the caller gives always wins over a preset default)."""
        opts = {k: v for k, v in requested.items() if v is not None}
        opts.setdefault("sampling", self.default_video_sampling)
        return opts

    def finish(self, state: Any) -> None:
        """A request's generation ended (a runtime may keep its caches for the next turn)."""

    def media_audit(self, request: Any) -> list[dict]:
        """Per image/video of a prepared request, in prompt order, what the model used and what it cost
        (the records of `engine.Generation.media`); `encode_s` grows as the vision side runs."""
        return []

    def cached_video(self, key: str) -> CachedVideo | None:
        """A video already encoded under `key`, so that it needs no decoding (None: not cached)."""
        return None

    # -- optional capabilities ---------------------------------------------------------------------------

    def encode_media(self, request: Any) -> Any:
        """Run the vision side of a request ahead of its prefill (any thread). `supports_chunked_prefill`."""
        return request

    def begin_prefill(self, request: Any) -> Any:
        raise UnsupportedError(f"{self.architecture} has no chunked prefill")

    def prefill_step(self, job: Any, max_tokens: int | None = None) -> torch.Tensor | None:
        raise UnsupportedError(f"{self.architecture} has no chunked prefill")

    def start_batch(self, states: list[Any]) -> Any:
        raise UnsupportedError(f"{self.architecture} has no batched decoding")

    def join_batch(self, batch: Any, newcomers: Any) -> None:
        raise UnsupportedError(f"{self.architecture} has no batched decoding")

    def keep_rows(self, batch: Any, rows: list[int]) -> None:
        raise UnsupportedError(f"{self.architecture} has no batched decoding")

    def decode_batch(self, batch: Any, token_ids: list[int]) -> torch.Tensor:
        raise UnsupportedError(f"{self.architecture} has no batched decoding")

    # -- shared by the families --------------------------------------------------------------------------

    def run_decoder(self, embeds: torch.Tensor, start: int, cache: KVCache, memory: Any = None) -> torch.Tensor:
        """The Qwen2 decoder over `embeds` [B, T, hidden] at positions start.., appending their K/V to
        `cache`; `memory` is the family's visual memory read by its special layers. Hidden states out."""
        model = self.model
        positions = torch.arange(start, start + embeds.shape[1], device=self.device)[None]
        inputs = new_attention_inputs(model.rope, positions, cache, self.dtype, visual=memory)
        h = model.llm(embeds, inputs)
        cache.advance(embeds.shape[1])
        return h
