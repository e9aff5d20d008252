"""mPLUG-Owl3 runtime: loading, request preparation, prefill and cached decoding."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ...checkpoint import checkpoint_shapes, load_weights
from ...errors import InputError
from ...layers import KVCache, RotaryTable, new_attention_inputs
from ...tokenizer import QwenTokenizer
from .model import Owl3, Owl3Config, VisualMemory, checkpoint_key_map, owl3_config
from .processor import IMAGE, VIDEO, Owl3Inputs, Owl3Processor

__all__ = ["Owl3Runtime", "Owl3", "Owl3Config", "Owl3Processor", "Owl3Inputs", "IMAGE", "VIDEO"]


@dataclass
class DecodeState:
    cache: KVCache
    visual: VisualMemory | None
    position: int  # sequence index of the next token


class Owl3Runtime:
    architecture = "mplug-owl3"
    image_placeholder = IMAGE
    video_placeholder = VIDEO
    default_video_sampling = "owl3"

    def __init__(self, model: Owl3, cfg: Owl3Config, tokenizer: QwenTokenizer, folder: Path,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.model, self.cfg, self.tokenizer = model, cfg, tokenizer
        self.folder, self.device, self.dtype = folder, device, dtype
        self.processor = Owl3Processor(tokenizer, image_size=cfg.vision.image_size, cut_style=cfg.cut_prompt,
                                       media_offset_format=cfg.media_offset_format,
                                       video_spans=cfg.cut_prompt == "v3")
        self.stop_token_ids = [tokenizer.token_id("<|im_end|>"), tokenizer.token_id("<|endoftext|>")]
        self.max_positions = cfg.llm.max_position_embeddings

    @classmethod
    def load(cls, folder: Path, raw_config: dict, tokenizer: QwenTokenizer, device: torch.device,
             dtype: torch.dtype) -> Owl3Runtime:
        cfg = owl3_config(raw_config, checkpoint_shapes(folder))
        with torch.device("meta"):
            model = Owl3(cfg)
        load_weights(model, folder, checkpoint_key_map(cfg), dtype, device)
        model.rope = RotaryTable(cfg.llm.head_dim, cfg.llm.rope_theta, cfg.llm.max_position_embeddings, device)
        model.eval()
        return cls(model, cfg, tokenizer, folder, device, dtype)

    def describe(self) -> dict:
        c = self.cfg
        return {"architecture": self.architecture, "release_family": c.release_family,
                "hyper_attention": c.attention, "projector": c.projector, "image_size": c.vision.image_size,
                "cut_prompt": c.cut_prompt + "_global", "hyper_layers_0_based": c.hyper_layers,
                "tied_embeddings": c.llm.tie_word_embeddings, "vocab_size": c.llm.vocab_size,
                "layers": c.llm.num_hidden_layers, "hidden_size": c.llm.hidden_size}

    # -- requests ----------------------------------------------------------------------------------

    def prepare(self, messages: list[dict], images: list, videos: list[list], cut_enable: bool | None
                ) -> tuple[Owl3Inputs, list[int]]:
        inputs = self.processor(messages, images=images, videos=videos,
                                cut_enable=True if cut_enable is None else cut_enable)
        ids = inputs["input_ids"][0].tolist()
        if len(ids) >= self.max_positions:
            raise InputError(f"the prompt has {len(ids)} tokens; mPLUG-Owl3 has {self.max_positions} positions")
        return inputs, ids

    @torch.inference_mode()
    def prefill(self, inputs: Owl3Inputs) -> tuple[torch.Tensor, DecodeState]:
        model, cfg = self.model, self.cfg.llm
        ids = inputs["input_ids"].to(self.device)
        length = ids.shape[1]
        visual = None
        if inputs.get("pixel_values") is not None:
            embeds = model.encode_images(inputs["pixel_values"])
            visual = model.visual_memory(embeds, inputs["media_starts"])
        cache = KVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, cfg.head_dim, length + 256,
                        self.dtype, self.device)
        logits = self._forward(ids, 0, cache, visual)
        return logits[0, -1], DecodeState(cache, visual, length)

    @torch.inference_mode()
    def decode(self, state: DecodeState, token_id: int) -> torch.Tensor:
        ids = torch.tensor([[token_id]], device=self.device)
        logits = self._forward(ids, state.position, state.cache, state.visual)
        state.position += 1
        return logits[0, -1]

    def _forward(self, ids: torch.Tensor, start: int, cache: KVCache, visual: VisualMemory | None,
                 last_only: bool = True) -> torch.Tensor:
        model = self.model
        positions = torch.arange(start, start + ids.shape[1], device=self.device)[None]
        inputs = new_attention_inputs(model.rope, positions, cache, self.dtype, visual=visual)
        h = model.llm(model.llm.embed_tokens(ids), inputs)
        cache.advance(ids.shape[1])
        return model.logits(h[:, -1:] if last_only else h)
