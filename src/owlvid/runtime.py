"""The contract between a model family and everything above it (engine, API, server, batch jobs).

A model family provides one `ModelRuntime` subclass: it loads its checkpoint (`load`), turns messages and
media into model inputs (`prepare`), runs the vision side ahead of the prefill (`encode_media`), the prefill
in chunks (`begin_prefill` / `prefill_step`) and batched decoding steps on float32 next-token logits
(`start_batch` / `join_batch` / `keep_rows` / `decode_batch`, implemented here once over ragged text caches;
a family adds its visual memory through the `batch_memory` / `join_memory` / `keep_memory` hooks). The
engine (`engine.py`) drives them. What differs between families is declared by class flags that callers
read by value, never probed with `hasattr`:

* `supports_streamed_video`: video files may arrive as `StreamedVideo` (decoded chunk by chunk while the
  vision tower encodes);
* `uses_visual_cache`: the runtime reads and fills `visual_cache` (set by `owlvid.load`);
* `penalize_prompt`: whether a repetition penalty also sees the prompt tokens (the official behaviour of
  each family).

Model-specific request policy lives here too (`video_options`: what a frame count means for this model),
so that the API, the server and batch jobs apply it the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .cache import VisualCache
from .errors import InputError
from .kv_cache import KVCache, RaggedKVCache
from .layers import AdapterRows, new_attention_inputs
from .tokenizer import QwenTokenizer

if TYPE_CHECKING:
    from .adapters import Adapter
    from .quantize import QuantizationReport
    from .stages import Stages
    from .video_plan import CachedVideo


@dataclass
class DecodeState:
    """One request's decoding state: its text K/V cache, the sequence index of the next token and its LoRA
    adapter slot (0: the base model)."""

    cache: KVCache
    position: int
    adapter: int = 0


@dataclass
class PrefillJob:
    """A chunked prefill in progress (`begin_prefill` -> `prefill_step`s): `state` decodes once it is done."""

    state: DecodeState


@dataclass
class DecodeBatch:
    """Requests decoding together: ragged text caches, each row's next position, the rows' decoding states
    and the family's batched visual memory (None: every layer is a plain Qwen2 layer at decode steps)."""

    cache: RaggedKVCache
    positions: torch.Tensor  # [B]
    rows: list[DecodeState]
    visual: Any = None
    host_positions: list[int] = field(default_factory=list)  # `positions` on the host (no device reads)
    adapters: AdapterRows | None = None  # the rows' LoRA slots (None: every row on the base model)


class ModelRuntime:
    """Base class of the model runtimes: the attributes every caller may read and the methods every family
    implements."""

    architecture: ClassVar[str] = ""
    image_placeholder: ClassVar[str] = ""
    video_placeholder: ClassVar[str] = ""
    default_video_sampling: ClassVar[str] = ""  # the media sampling preset a plain video path gets
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
        self.quantization: QuantizationReport | None = None  # set by owlvid.load(quantize=...)
        self.adapters: list[Adapter] = []  # unmerged LoRA adapters, slot i + 1 (owlvid.load(lora_modules=...))
        self.merged_adapter: Adapter | None = None  # owlvid.load(adapter=...)
        self.lora_layout = (0, 0)  # (slots, rank) of the LoraLinear layers, set with `adapters`

    # -- what every family implements --------------------------------------------------------------

    @classmethod
    def load(cls, folder: Path, raw_config: dict, tokenizer: QwenTokenizer, device: torch.device,
             dtype: torch.dtype, quantize: str | None = None, stages: Stages | None = None) -> ModelRuntime:
        """Build and fill the model; `quantize` (int8 / int4) quantizes the weights as they are read
        (quantize.LoadQuantizer) and sets `quantization`. `stages`: the model split across devices
        (owlvid.stages; `device` is then the embedding's)."""
        raise NotImplementedError

    def describe(self) -> dict:
        """Architecture facts for `owlvid info` and `Model.describe()`."""
        raise NotImplementedError

    def weight_key_map(self) -> Callable[[str], str | None]:
        """Official checkpoint key -> parameter name of `model` (None: a tensor the model never uses); LoRA
        adapters are mapped with it too."""
        raise NotImplementedError

    def prepare(self, messages: list[dict], images: list, videos: list, cut_enable: bool | None
                ) -> tuple[Any, list[int]]:
        """Messages with the model's placeholders + media lists -> (model inputs, prompt token ids)."""
        raise NotImplementedError

    def prefill(self, request: Any, chunk_tokens: int | None = None) -> tuple[torch.Tensor, Any]:
        """The whole prompt: (float32 next-token logits [vocab], decoding state): `begin_prefill` then
        `prefill_step` of `chunk_tokens` tokens (all at once if None) until done."""
        job = self.begin_prefill(request)
        logits = None
        while logits is None:
            logits = self.prefill_step(job, chunk_tokens)
        return logits, job.state

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

    keeps_finished_states: ClassVar[bool] = False  # `finish` keeps states (a prefix cache): see `finish_row`

    def finish(self, state: Any) -> None:
        """A request's generation ended (a runtime may keep its caches for the next turn)."""

    @torch.inference_mode()
    def finish_row(self, batch: DecodeBatch, row: int, generated: list[int]) -> None:
        """Row `row` of a decoding batch finished (`generated`: its generated tokens). For a runtime that
        keeps finished states, the row's state takes back its keys/values from the batch and goes to
        `finish`; the others need nothing copied."""
        if not self.keeps_finished_states:
            return
        state = batch.rows[row]
        state.cache.load_row(batch.cache, row)
        state.position = batch.host_positions[row]
        self.finish(state)

    def media_audit(self, request: Any) -> list[dict]:
        """Per image/video of a prepared request, in prompt order, what the model used and what it cost
        (the records of `engine.Generation.media`); `encode_s` grows as the vision side runs."""
        return []

    def adapter_slot(self, name: str | None) -> int:
        """The slot of the adapter called `name` (0: None, the base model); unknown names are an InputError."""
        if name is None:
            return 0
        for slot, adapter in enumerate(self.adapters, 1):
            if adapter.name == name:
                return slot
        known = ", ".join(repr(a.name) for a in self.adapters) or "none loaded"
        raise InputError(f"unknown adapter {name!r} (adapters: {known})")

    def request_adapter(self, request: Any) -> int:
        """The adapter slot `Model.prepare` recorded in a prepared request (0 if none)."""
        return request.get("adapter", 0) if isinstance(request, dict) else 0

    def adapter_rows(self, slots: list[int]) -> AdapterRows | None:
        """What a forward call over rows on these adapter slots passes to its layers."""
        return AdapterRows.of(slots, self.lora_layout, self.dtype, self.device) if self.adapters else None

    def weights_changed(self, tag: str) -> None:
        """The weights now differ from the checkpoint's (a merged adapter, `tag` identifies it): a family that
        caches outputs of its weights under the checkpoint's identity must key them by `tag` too."""

    def cached_video(self, key: str) -> CachedVideo | None:
        """A video already encoded under `key`, so that it needs no decoding (None: not cached)."""
        return None

    def encode_media(self, request: Any) -> Any:
        """Run the vision side of a request ahead of its prefill (any thread: it only reads the weights)."""
        return request

    def begin_prefill(self, request: Any) -> PrefillJob:
        """Start a prefill (the vision side too, unless `encode_media` ran it); `prefill_step` feeds it."""
        raise NotImplementedError

    def prefill_step(self, job: Any, max_tokens: int | None = None) -> torch.Tensor | None:
        """Feed the next `max_tokens` prompt tokens (all if None): the next-token logits after the last
        chunk, None before. Positions and media visibility are absolute, so chunks give the same result."""
        raise NotImplementedError

    @torch.inference_mode()
    def start_batch(self, states: list[DecodeState], max_rows: int | None = None) -> DecodeBatch:
        """A decoding batch of prefilled requests (their caches are copied into one ragged cache with room
        for `max_rows` requests, so that later ones join without reallocating it)."""
        return DecodeBatch(cache=RaggedKVCache.from_caches([s.cache for s in states], rows=max_rows),
                           positions=torch.tensor([s.position for s in states], device=self.device),
                           rows=list(states), visual=self.batch_memory(states),
                           host_positions=[s.position for s in states],
                           adapters=self.adapter_rows([s.adapter for s in states]))

    @torch.inference_mode()
    def join_batch(self, batch: DecodeBatch, states: list[DecodeState]) -> None:
        """Requests prefilled since the last step join the running batch (continuous batching)."""
        batch.visual = self.join_memory(batch.visual, len(batch.rows), self.batch_memory(states), len(states))
        batch.cache.add([s.cache for s in states])
        batch.positions = torch.cat([batch.positions, torch.tensor([s.position for s in states], device=self.device)])
        batch.host_positions += [s.position for s in states]
        batch.rows.extend(states)
        batch.adapters = self.adapter_rows([s.adapter for s in batch.rows])

    @torch.inference_mode()
    def keep_rows(self, batch: DecodeBatch, rows: list[int]) -> None:
        """Only these rows (indices into the batch, ascending) go on decoding."""
        batch.cache.keep(rows)
        batch.visual = self.keep_memory(batch.visual, rows) if batch.visual is not None else None
        batch.positions = batch.positions[torch.tensor(rows, dtype=torch.long, device=self.device)]
        batch.host_positions = [batch.host_positions[i] for i in rows]
        batch.rows = [batch.rows[i] for i in rows]
        batch.adapters = self.adapter_rows([s.adapter for s in batch.rows])

    @torch.inference_mode()
    def decode_batch(self, batch: DecodeBatch, token_ids: list[int] | torch.Tensor) -> torch.Tensor:
        """One decoding step for every row in one forward call: float32 logits [B, vocab] on the device.
        Each row attends only to its own keys (the padding of the ragged cache is masked) at its own
        position. `token_ids` may be a device tensor [B] (the sampler's output): nothing is read back."""
        model = self.model
        ids = torch.as_tensor(token_ids, device=self.device).reshape(-1, 1)
        inputs = new_attention_inputs(model.rope, batch.positions[:, None], batch.cache, self.dtype,
                                      causal_mask=batch.cache.valid_mask(), visual=batch.visual,
                                      max_position=max(batch.host_positions), adapters=batch.adapters)
        h = model.llm(model.llm.embed_tokens(ids), inputs)
        batch.cache.advance(1)
        batch.positions += 1
        batch.host_positions = [p + 1 for p in batch.host_positions]
        return model.logits(h[:, -1])

    # Hooks for a family whose decode steps read a visual memory (default: none).

    def batch_memory(self, states: list[DecodeState]) -> Any:
        """The rows' visual memories as one batched memory read by the special layers (None: no row has one)."""
        return None

    def join_memory(self, memory: Any, rows: int, newcomers: Any, new_rows: int) -> Any:
        """`memory` of `rows` rows followed by `newcomers` of `new_rows` rows (either may be None)."""
        return None

    def keep_memory(self, memory: Any, rows: list[int]) -> Any:
        """The batched memory of these rows only (None if none of them has media)."""
        return None

    # -- shared by the families --------------------------------------------------------------------------

    @property
    def cache_devices(self) -> torch.device | list[torch.device]:
        """Where the decoder layers' K/V live: the model's device, or one per layer for a model split across
        devices (owlvid.stages; `device` is then the embedding's, where the inputs are built)."""
        stages = self.model.llm.stages
        return self.device if stages is None else stages.layer_devices

    def run_decoder(self, embeds: torch.Tensor, start: int, cache: KVCache, memory: Any = None,
                    adapter: int = 0) -> torch.Tensor:
        """The Qwen2 decoder over `embeds` [B, T, hidden] at positions start.., appending their K/V to
        `cache`; `memory` is the family's visual memory read by its special layers, `adapter` the LoRA slot of
        every row. Hidden states out."""
        model = self.model
        positions = torch.arange(start, start + embeds.shape[1], device=self.device)[None]
        inputs = new_attention_inputs(model.rope, positions, cache, self.dtype, visual=memory,
                                      max_position=start + embeds.shape[1] - 1,
                                      adapters=self.adapter_rows([adapter] * embeds.shape[0]))
        h = model.llm(embeds, inputs)
        cache.advance(embeds.shape[1])
        return h
