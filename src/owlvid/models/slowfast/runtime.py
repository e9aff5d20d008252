"""Slow-Fast video MLLM runtime (SHI-Labs, arXiv 2504.01328): loading, request preparation, chunked
prefill with the slow-token cross-attention, and cached decoding, alone or batched.

Decode steps are plain Qwen2 steps (the official model gives generated tokens no cross-attention), so
the slow tokens' keys/values live only as long as the prefill, and a decoding batch is rows of ragged
text caches without any visual memory (`ModelRuntime`'s batched decoding, nothing added here)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ...checkpoint import checkpoint_shapes, load_weights
from ...errors import CheckpointError, InputError
from ...kv_cache import KVCache
from ...layers import RotaryTable
from ...quantize import LoadQuantizer
from ...runtime import DecodeState, ModelRuntime, PrefillJob
from ...stages import Stages
from ...tokenizer import QwenTokenizer
from .config import IMAGE_TOKEN_INDEX, SlowFastConfig, slowfast_config
from .language import SlowMemory
from .model import SlowFast, checkpoint_key_map
from .processor import IMAGE, SlowFastInputs, SlowFastProcessor


@dataclass
class PreparedSequence:
    """The spliced prefill sequence of one request."""

    embeds: torch.Tensor  # [1, L, hidden]
    text_rows: torch.Tensor  # [n_text] positions of text tokens (token type 1)
    num_fast: int  # fast-token positions left in the sequence (0: no visual / truncated away)
    slow: torch.Tensor | None  # [N_slow, hidden]


@dataclass
class SlowFastPrefill(PrefillJob):
    """A prefill in progress: `state.position` positions of `embeds` are in the cache. The spliced
    sequence and the slow-token K/V are dropped when the last chunk is done."""

    embeds: torch.Tensor | None  # [1, L, hidden]
    memory: SlowMemory | None  # query rows are positions in the whole sequence
    length: int


class SlowFastRuntime(ModelRuntime):
    architecture = "slowfast"
    image_placeholder = IMAGE
    video_placeholder = IMAGE
    default_video_sampling = "slowfast"
    # The official generate() runs from inputs_embeds, so a repetition penalty only sees generated ids.
    penalize_prompt = False

    def __init__(self, model: SlowFast, cfg: SlowFastConfig, tokenizer: QwenTokenizer, folder: Path,
                 device: torch.device, dtype: torch.dtype, stop_token_ids: list[int]) -> None:
        super().__init__(model, tokenizer, SlowFastProcessor(tokenizer, cfg), folder, device, dtype, stop_token_ids,
                         cfg.llm.max_position_embeddings)
        self.cfg = cfg
        # Prompt positions taken by fast visual tokens carry this id in the prompt ids handed to the
        # engine: it is past the logits (never sampled, never penalised) and decodes to nothing.
        self.fast_token_id = model.vocab_used

    @property
    def truncation(self) -> bool:
        """Whether prompts are cut to `tokenizer_model_max_length` after splicing (official: True)."""
        return self.processor.truncation

    @truncation.setter
    def truncation(self, value: bool) -> None:
        self.processor.truncation = bool(value)

    def video_options(self, requested: dict) -> dict:
        """Without a frame count, the frame count the checkpoint was trained with (`max_frames`); `fps`
        alone means that rate (the slowfast preset has a fixed frame count and no rate)."""
        opts = {k: v for k, v in requested.items() if v is not None}
        counted = "num_frames" in opts or "max_frames" in opts
        if "fps" in opts and not counted:
            opts.setdefault("sampling", "fps")
        if not counted:
            opts.setdefault("max_frames", self.cfg.training_frames)
        return super().video_options(opts)

    @classmethod
    def load(cls, folder: Path, raw_config: dict, tokenizer: QwenTokenizer, device: torch.device,
             dtype: torch.dtype, quantize: str | None = None, stages: Stages | None = None) -> SlowFastRuntime:
        cfg = slowfast_config(raw_config, checkpoint_shapes(folder))
        with torch.device("meta"):
            model = SlowFast(cfg)
        # the vocabulary is cut to the tokenizer's before quantizing: the cut rows are never stored
        quantizer = LoadQuantizer(model, quantize, dtype, keep_rows=len(tokenizer)) if quantize else None
        load_weights(model, folder, checkpoint_key_map(cfg), dtype, device if stages is None else stages.device_of,
                     transform=quantizer)
        model.llm.stages = stages
        model.truncate_vocab(len(tokenizer))
        llm = cfg.llm
        model.rope = RotaryTable(llm.head_dim, llm.rope_theta, llm.max_position_embeddings, device)
        model.eval()
        runtime = cls(model, cfg, tokenizer, folder, device, dtype, _stop_ids(folder, raw_config, tokenizer))
        runtime.quantization = quantizer.finish() if quantizer else None
        return runtime

    def describe(self) -> dict:
        c = self.cfg
        return {"architecture": self.architecture, "vision_tower": c.raw.get("mm_vision_tower"),
                "image_size": c.vision.image_size, "convnext_depths": list(c.vision.depths),
                "convnext_dims": list(c.vision.dims), "projector": c.projector,
                "hybrid_layers_0_based": c.hybrid_layers, "video_pooling_stride": c.video_pooling_stride,
                "fast_token_temporal_sampling_stride": c.fast_temporal_sampling_stride,
                "fast_token_temporal_stride": c.fast_temporal_stride,
                "fast_token_spatial_stride": c.fast_spatial_stride, "min_fast_frames": c.min_fast_frames,
                "training_frames": c.training_frames, "tokenizer_model_max_length": c.model_max_length,
                "truncation": self.truncation, "vocab_size": self.model.vocab_used,
                "vocab_rows_stored": c.llm.vocab_size, "layers": c.llm.num_hidden_layers,
                "hidden_size": c.llm.hidden_size, "tied_embeddings": c.llm.tie_word_embeddings}

    def weight_key_map(self):
        return checkpoint_key_map(self.cfg)

    # -- requests ----------------------------------------------------------------------------------

    def prepare(self, messages: list[dict], images: list, videos: list[list], cut_enable: bool | None
                ) -> tuple[SlowFastInputs, list[int]]:
        inputs = self.processor(messages, images=images, videos=videos, cut_enable=cut_enable)
        ids: list[int] = []
        for i in inputs["input_ids"][0].tolist():
            ids.extend([self.fast_token_id] * inputs["num_fast_tokens"] if i == IMAGE_TOKEN_INDEX else [i])
        return inputs, ids[: inputs.seq_len]

    def sequence(self, inputs: SlowFastInputs) -> PreparedSequence:
        """Vision, fast/slow split and splicing: the embedded prefill sequence and its text rows."""
        model = self.model
        ids = inputs["input_ids"][0].to(self.device)
        emb = model.llm.embed_tokens
        is_image = ids == IMAGE_TOKEN_INDEX
        fast = slow = None
        if int(is_image.sum()) and inputs.get("pixel_values") is not None:
            t0 = time.perf_counter()
            fast, slow = model.fast_and_slow(model.encode_frames(inputs["pixel_values"]))
            inputs["encode_s"] = time.perf_counter() - t0
            if fast.shape[0] != inputs["num_fast_tokens"]:
                raise AssertionError(f"fast tokens {fast.shape[0]} != planned {inputs['num_fast_tokens']}")
        if (int(is_image.sum()) > 0) != (fast is not None):
            raise InputError(f"the request has {int(is_image.sum())} {IMAGE} placeholder(s) but "
                             f"{'no' if fast is None else 'a'} visual input")
        text_embeds = emb(ids[~is_image])
        if fast is None:
            embeds = text_embeds
            types = torch.ones(ids.shape[0], dtype=torch.bool, device=self.device)
        else:
            at = int(is_image.nonzero()[0])
            embeds = torch.cat([text_embeds[:at], fast.to(text_embeds.device, text_embeds.dtype), text_embeds[at:]])
            types = torch.ones(embeds.shape[0], dtype=torch.bool, device=self.device)
            types[at:at + fast.shape[0]] = False
        length = inputs.seq_len
        embeds, types = embeds[:length], types[:length]
        num_fast = int((~types).sum())
        rows = types.nonzero().flatten()
        return PreparedSequence(embeds[None], rows, num_fast, slow if num_fast else None)

    def media_audit(self, inputs: SlowFastInputs) -> list[dict]:
        """The request's one visual (see `engine.Generation.media`): no visual cache in this family."""
        return [{**record, "visual_cache": "off", "encode_s": inputs.get("encode_s", 0.0)}
                for record in inputs.get("media") or []]

    @torch.inference_mode()
    def encode_media(self, inputs: SlowFastInputs) -> SlowFastInputs:
        """Vision tower, splicing and the slow tokens' K/V now (any thread: they only read the weights), so
        that the prefill does not; the result rides along in `inputs` until `begin_prefill` takes it."""
        if "prepared" not in inputs:
            inputs["prepared"] = self._prepared(inputs)
        return inputs

    def _prepared(self, inputs: SlowFastInputs) -> tuple[torch.Tensor, SlowMemory | None]:
        seq = self.sequence(inputs)
        # K/V of the slow tokens: once per request, dropped after the prefill
        adapters = self.adapter_rows([self.request_adapter(inputs)])
        memory = self.model.slow_memory(seq.slow, seq.text_rows, adapters) if seq.slow is not None else None
        return seq.embeds, memory

    @torch.inference_mode()
    def begin_prefill(self, inputs: SlowFastInputs) -> SlowFastPrefill:
        """Everything before the LLM prefill (vision, slow K/V unless `encode_media` ran); `prefill_step`
        then feeds the spliced sequence chunk by chunk."""
        cfg = self.cfg.llm
        embeds, memory = inputs.pop("prepared", None) or self._prepared(inputs)
        length = embeds.shape[1]
        cache = KVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, cfg.head_dim, length + 256,
                        self.dtype, self.cache_devices)
        return SlowFastPrefill(DecodeState(cache, 0, self.request_adapter(inputs)), embeds, memory, length)

    @torch.inference_mode()
    def prefill_step(self, job: SlowFastPrefill, max_tokens: int | None = None) -> torch.Tensor | None:
        """Feed the next `max_tokens` positions (all if None); the next-token logits after the last chunk,
        None before. Chunks give the result of one call: the cross-attention is per query row over all of
        the request's slow tokens (no text-to-text interaction), and positions are absolute."""
        state = job.state
        start = state.position
        end = job.length if max_tokens is None else min(job.length, start + max_tokens)
        memory = None
        if job.memory is not None:
            rows = job.memory.query_rows
            rows = rows[(rows >= start) & (rows < end)] - start
            memory = SlowMemory(query_rows=rows, kv=job.memory.kv)
        h = self.run_decoder(job.embeds[:, start:end], start, state.cache, memory, state.adapter)
        state.position = end
        if end < job.length:
            return None
        job.embeds = job.memory = None
        return self.model.logits(h[:, -1])[0]

    @torch.inference_mode()
    def decode(self, state: DecodeState, token_id: int) -> torch.Tensor:
        """One generated token: plain Qwen2 layers (the official decode steps get no cross-attention)."""
        ids = torch.tensor([[token_id]], device=self.device)
        h = self.run_decoder(self.model.llm.embed_tokens(ids), state.position, state.cache, None, state.adapter)
        state.position += 1
        return self.model.logits(h[:, -1])[0]


def _stop_ids(folder: Path, raw: dict, tokenizer: QwenTokenizer) -> list[int]:
    """`<|im_end|>` and `<|endoftext|>` plus the eos ids of generation_config.json / config.json."""
    ids = [tokenizer.token_id("<|im_end|>"), tokenizer.token_id("<|endoftext|>")]
    extra = raw.get("eos_token_id")
    path = folder / "generation_config.json"
    if path.exists():  # unreadable: an error, not a silent loss of its extra eos ids
        try:
            extra = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id", extra)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise CheckpointError(f"cannot read {path} (its eos_token_id decides where generation stops): "
                                  f"{e or type(e).__name__}") from None
    for i in extra if isinstance(extra, list) else [extra]:
        if isinstance(i, int) and 0 <= i < len(tokenizer) and i not in ids:
            ids.append(i)
    return ids
