"""mPLUG-Owl3 runtime: loading, request preparation, prefix cache, chunked prefill, batched decoding and
the visual cache (the `owlvid.runtime.ModelRuntime` contract)."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from ...cache import VisualCache, content_key
from ...checkpoint import checkpoint_shapes, load_weights
from ...errors import InputError
from ...kv_cache import KVCache
from ...layers import RotaryTable
from ...quantize import LoadQuantizer
from ...runtime import DecodeBatch, ModelRuntime, PrefillJob
from ...runtime import DecodeState as BaseDecodeState
from ...stages import Stages
from ...tokenizer import QwenTokenizer
from ...video_plan import CachedVideo, PreparedVideo
from .config import Owl3Config, owl3_config
from .language import BatchedVisualMemory, VisualMemory
from .model import Owl3, checkpoint_key_map
from .processor import IMAGE, VIDEO, Owl3Inputs, Owl3Processor, frames_to_pixels


@dataclass
class DecodeState(BaseDecodeState):
    visual: VisualMemory | None = None
    fed_ids: list[int] = field(default_factory=list)  # every token whose K/V is in `cache`
    media_keys: tuple[str, ...] = ()


@dataclass
class PrefillState(PrefillJob):
    """A prefill in progress: `state.position` prompt tokens of `ids` are in the cache."""

    state: DecodeState
    ids: list[int]


class Owl3Runtime(ModelRuntime):
    architecture = "mplug-owl3"
    image_placeholder = IMAGE
    video_placeholder = VIDEO
    default_video_sampling = "owl3"
    supports_streamed_video = True  # video files are decoded chunk by chunk during encoding
    uses_visual_cache = True

    def __init__(self, model: Owl3, cfg: Owl3Config, tokenizer: QwenTokenizer, folder: Path,
                 device: torch.device, dtype: torch.dtype, visual_cache: VisualCache | None = None,
                 prefix_slots: int = 1) -> None:
        processor = Owl3Processor(tokenizer, image_size=cfg.vision.image_size, cut_style=cfg.cut_prompt,
                                  media_offset_format=cfg.media_offset_format, video_spans=cfg.cut_prompt == "v3")
        stop_ids = [tokenizer.token_id("<|im_end|>"), tokenizer.token_id("<|endoftext|>")]
        super().__init__(model, tokenizer, processor, folder, device, dtype, stop_ids,
                         cfg.llm.max_position_embeddings)
        self.cfg = cfg
        self.visual_cache = visual_cache
        self.model_key = content_key("owl3", str(folder.resolve()), str(dtype), sorted(cfg.raw.items()))
        self.prefix_slots = prefix_slots
        self._prefixes: OrderedDict[int, DecodeState] = OrderedDict()
        self.stats = {"encoded_crops": 0, "cached_crops": 0, "prefix_reused_tokens": 0}

    @classmethod
    def load(cls, folder: Path, raw_config: dict, tokenizer: QwenTokenizer, device: torch.device,
             dtype: torch.dtype, quantize: str | None = None, stages: Stages | None = None,
             visual_cache: VisualCache | None = None) -> Owl3Runtime:
        cfg = owl3_config(raw_config, checkpoint_shapes(folder))
        with torch.device("meta"):
            model = Owl3(cfg)
        quantizer = LoadQuantizer(model, quantize, dtype) if quantize else None
        load_weights(model, folder, checkpoint_key_map(cfg), dtype, device if stages is None else stages.device_of,
                     transform=quantizer)
        model.llm.stages = stages
        model.rope = RotaryTable(cfg.llm.head_dim, cfg.llm.rope_theta, cfg.llm.max_position_embeddings, device)
        model.eval()
        runtime = cls(model, cfg, tokenizer, folder, device, dtype, visual_cache)
        runtime.quantization = quantizer.finish() if quantizer else None
        return runtime

    def describe(self) -> dict:
        c = self.cfg
        return {"architecture": self.architecture, "release_family": c.release_family,
                "hyper_attention": c.attention, "projector": c.projector, "image_size": c.vision.image_size,
                "cut_prompt": c.cut_prompt + "_global", "hyper_layers_0_based": c.hyper_layers,
                "tied_embeddings": c.llm.tie_word_embeddings, "vocab_size": c.llm.vocab_size,
                "layers": c.llm.num_hidden_layers, "hidden_size": c.llm.hidden_size}

    def weight_key_map(self):
        return checkpoint_key_map(self.cfg)

    # -- requests ----------------------------------------------------------------------------------

    def prepare(self, messages: list[dict], images: list, videos: list[list], cut_enable: bool | None
                ) -> tuple[Owl3Inputs, list[int]]:
        inputs = self.processor(messages, images=images, videos=videos,
                                cut_enable=True if cut_enable is None else cut_enable)
        return inputs, inputs["input_ids"][0].tolist()

    def video_options(self, requested: dict) -> dict:
        """`num_frames` alone means N evenly spread frames (vLLM's meaning): the official evaluation sampler."""
        opts = {k: v for k, v in requested.items() if v is not None}
        if "num_frames" in opts:
            opts.setdefault("sampling", "owl3-eval")
        return super().video_options(opts)

    def weights_changed(self, tag: str) -> None:
        """A merged adapter may change the vision tower or projector: cached features are keyed by it."""
        self.model_key = content_key(self.model_key, tag)

    def cached_video(self, key: str) -> CachedVideo | None:
        """A video already encoded under `key` (file identity + sampling): skip decoding and encoding."""
        if self.visual_cache is None:
            return None
        full_key = content_key(self.model_key, key)
        embeds = self.visual_cache.get(full_key)
        return CachedVideo(key, embeds.shape[0], self.visual_cache.note(full_key)) if embeds is not None else None

    @torch.inference_mode()
    def image_embeds(self, inputs: Owl3Inputs) -> torch.Tensor | None:
        """Projector outputs of every crop, from the visual cache where possible."""
        items = inputs.get("media_items")
        if items is None:  # an official-style dict built elsewhere: just encode its pixels
            pv = inputs.get("pixel_values")
            return None if pv is None else self.model.encode_images(pv)
        parts = []
        for item in items:
            key = content_key(self.model_key, item["key"])
            t0 = time.perf_counter()
            embeds = self.visual_cache.get(key) if self.visual_cache is not None else None
            if embeds is None:
                if item.get("stream") is not None:  # decode the next chunk while this one is encoded
                    chunks = item["stream"].pixel_chunks(partial(frames_to_pixels, size=self.cfg.vision.image_size))
                    embeds = torch.cat([self.model.encode_images(chunk) for chunk in chunks])
                elif item["pixels"] is None:
                    raise InputError("a cached video was evicted from the visual cache; send it again")
                else:
                    embeds = self.model.encode_images(item["pixels"])
                self.stats["encoded_crops"] += embeds.shape[0]
                item["visual_cache"] = "miss" if self.visual_cache is not None else "off"
                if self.visual_cache is not None:
                    media = item.get("media")
                    self.visual_cache.put(key, embeds, media.remember() if isinstance(media, PreparedVideo) else None)
            else:
                self.stats["cached_crops"] += embeds.shape[0]
                item["visual_cache"] = "hit"
            item["encode_s"] = item.get("encode_s", 0.0) + time.perf_counter() - t0
            parts.append(embeds.to(self.device))
        return torch.cat(parts) if parts else None

    def media_audit(self, inputs: Owl3Inputs) -> list[dict]:
        """Per image/video of the request, in prompt order: what was used and what it cost (see
        `engine.Generation.media`)."""
        out = []
        for item in inputs.get("media_items") or []:
            media = item.get("media")
            record = media.describe() if isinstance(media, PreparedVideo) else dict(media or {"type": "image"})
            record["crops"] = item["crops"]
            record["visual_cache"] = item.get("visual_cache", "reused")  # an earlier turn's, kept
            record["encode_s"] = item.get("encode_s", 0.0)
            out.append(record)
        return out

    @torch.inference_mode()
    def encode_media(self, inputs: Owl3Inputs) -> Owl3Inputs:
        """Run the vision tower and the hyper layers' visual K/V projection now (any thread: they only read
        the weights) so that the prefill does not: the results ride along in `inputs`."""
        if inputs.get("media_starts") and "visual_memory" not in inputs:
            embeds = self.image_embeds(inputs)
            inputs["visual_memory"] = self.model.visual_memory(embeds, inputs["media_starts"],
                                                               self.adapter_rows([self.request_adapter(inputs)]))
        return inputs

    def _visual_memory(self, inputs: Owl3Inputs) -> VisualMemory | None:
        visual = inputs.get("visual_memory")
        if visual is not None:
            return visual
        embeds = self.image_embeds(inputs)
        if embeds is None:
            return None
        return self.model.visual_memory(embeds, inputs["media_starts"],
                                        self.adapter_rows([self.request_adapter(inputs)]))

    @torch.inference_mode()
    def begin_prefill(self, inputs: Owl3Inputs) -> PrefillState:
        """Everything before the LLM prefill (prefix reuse, visual memory); `prefill_step` then feeds the
        prompt chunk by chunk, so that a long prompt can be interleaved with other requests' decoding."""
        cfg = self.cfg.llm
        ids = inputs["input_ids"][0].tolist()
        keys = tuple(item["key"] for item in inputs.get("media_items") or [])
        starts = inputs["media_starts"]
        adapter = self.request_adapter(inputs)
        state, reuse = self._take_prefix(ids, keys, starts, adapter)
        if state is None:
            visual = self._visual_memory(inputs)
            cache = KVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, cfg.head_dim, len(ids) + 256,
                            self.dtype, self.cache_devices)
            state = DecodeState(cache, 0, adapter, visual, [], keys)
        elif keys != state.media_keys:  # the new turn adds media: extend the visual memory
            state.visual = self._visual_memory(inputs)
            state.media_keys = keys
        state.cache.length = reuse
        state.fed_ids = ids[:reuse]
        state.position = reuse
        self.stats["prefix_reused_tokens"] += reuse
        return PrefillState(state, ids)

    @torch.inference_mode()
    def prefill_step(self, job: PrefillState, max_tokens: int | None = None) -> torch.Tensor | None:
        """Feed the next `max_tokens` prompt tokens (all if None); the next-token logits after the last
        chunk, None before. Positions and media visibility are absolute, so chunks give the same result."""
        state = job.state
        end = len(job.ids) if max_tokens is None else min(len(job.ids), state.position + max_tokens)
        chunk = job.ids[state.position: end]
        logits = self._forward(torch.tensor([chunk], device=self.device), state.position, state.cache,
                               state.visual, state.adapter)
        state.fed_ids.extend(chunk)
        state.position = end
        return logits[0, -1] if end == len(job.ids) else None

    @torch.inference_mode()
    def decode(self, state: DecodeState, token_id: int) -> torch.Tensor:
        ids = torch.tensor([[token_id]], device=self.device)
        logits = self._forward(ids, state.position, state.cache, state.visual, state.adapter)
        state.position += 1
        state.fed_ids.append(token_id)
        return logits[0, -1]

    @property
    def keeps_finished_states(self) -> bool:
        return self.prefix_slots > 0

    def finish_row(self, batch: DecodeBatch, row: int, generated: list[int]) -> None:
        state = batch.rows[row]
        fed = batch.host_positions[row] - state.position  # generated tokens fed to the batch's decoding steps
        if self.keeps_finished_states:
            state.fed_ids.extend(generated[:fed])
        super().finish_row(batch, row, generated)

    def finish(self, state: DecodeState) -> None:
        """Keep a finished conversation's caches so that its next turn only prefills the new tokens."""
        if self.prefix_slots <= 0:
            return
        self._prefixes[id(state)] = state
        while len(self._prefixes) > self.prefix_slots:
            self._prefixes.popitem(last=False)

    def _take_prefix(self, ids: list[int], keys: tuple[str, ...], starts: list[int], adapter: int
                     ) -> tuple[DecodeState | None, int]:
        """The stored state sharing the longest token prefix with `ids` (and the same earlier media and
        LoRA adapter: another adapter's cached K/V are other numbers)."""
        best, best_len = None, 0
        for slot, state in self._prefixes.items():
            if keys[: len(state.media_keys)] != state.media_keys or state.adapter != adapter:
                continue
            n = 0
            for a, b in zip(ids, state.fed_ids):
                if a != b:
                    break
                n += 1
            # Tokens at or after a new media marker must see it: they cannot come from the old cache.
            for s in starts[len(state.visual.starts) if state.visual is not None else 0:]:
                n = min(n, s + 1 if self.cfg.strict_visibility else s)
            n = min(n, len(ids) - 1)  # at least one token to compute logits from
            if n > best_len:
                best, best_len = slot, n
        if best is None or best_len < 16:  # not worth it
            return None, 0
        return self._prefixes.pop(best), best_len

    # -- batched decoding (the loop is `ModelRuntime`'s; the rows' visual memories are padded together) --

    def batch_memory(self, states: list[DecodeState]) -> BatchedVisualMemory | None:
        layers = [h.layer_index for h in self.model.hyper_attentions()]
        return BatchedVisualMemory.from_memories([s.visual for s in states], layers)

    def join_memory(self, memory: BatchedVisualMemory | None, rows: int, newcomers: BatchedVisualMemory | None,
                    new_rows: int) -> BatchedVisualMemory | None:
        return BatchedVisualMemory.concat(memory, rows, newcomers, new_rows)

    def keep_memory(self, memory: BatchedVisualMemory, rows: list[int]) -> BatchedVisualMemory | None:
        return memory.keep(rows)

    def _forward(self, ids: torch.Tensor, start: int, cache: KVCache, visual: VisualMemory | None,
                 adapter: int = 0, last_only: bool = True) -> torch.Tensor:
        h = self.run_decoder(self.model.llm.embed_tokens(ids), start, cache, visual, adapter)
        return self.model.logits(h[:, -1:] if last_only else h)
