"""The Slow-Fast network (SHI-Labs): ConvNeXt tower + projector + Qwen2 decoder with hybrid layers
(0, 8, 16, 24 for the 7B models), and the map from the official checkpoint keys to its parameters.
The pieces live in `vision.py` (tower, projector, fast/slow split) and `language.py` (hybrid layers).
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import CheckpointError
from ...layers import Qwen2Decoder, RotaryTable, linear
from ..base import VisionLanguageModel
from .config import SlowFastConfig
from .language import HybridAttention, SlowMemory
from .vision import ConvNeXt, build_projector, pool_frames, split_fast_tokens


class SlowFast(VisionLanguageModel):
    """The whole network; module names follow the official keys minus the `model.` prefixes."""

    def __init__(self, cfg: SlowFastConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.llm
        self.llm = Qwen2Decoder(c, cfg.hybrid_layers, lambda i: HybridAttention(c, i))
        self.lm_head = None if c.tie_word_embeddings else nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.vision_tower = ConvNeXt(cfg.vision)
        self.mm_projector = build_projector(cfg.projector, cfg.mm_hidden_size, c.hidden_size)
        self.rope: RotaryTable | None = None  # built after the weights are on their device
        self.vocab_used = c.vocab_size  # rows actually used (len(tokenizer)), see truncate_vocab

    @property
    def vision(self) -> nn.Module:  # the official name is kept for the module (weight keys follow it)
        return self.vision_tower

    @property
    def projector(self) -> nn.Module:
        return self.mm_projector

    def hybrid_attentions(self) -> list[HybridAttention]:
        return [layer.self_attn for layer in self.llm.layers if isinstance(layer.self_attn, HybridAttention)]

    def truncate_vocab(self, n: int) -> None:
        """Keep the first `n` embedding / LM-head rows, as the official loader's
        `resize_token_embeddings(len(tokenizer))`: logits have `n` entries."""
        rows = self.llm.embed_tokens.weight.shape[0]
        if n > rows:
            raise CheckpointError(f"the tokenizer has {n} tokens but the checkpoint only {rows} "
                                  "embedding rows")
        emb = self.llm.embed_tokens
        if rows != n:  # (already cut when the weights were quantized while loading)
            emb.weight = nn.Parameter(emb.weight.detach()[:n], requires_grad=False)
        emb.num_embeddings = n
        if not self.cfg.llm.tie_word_embeddings:
            if self.lm_head.weight.shape[0] != n:
                self.lm_head.weight = nn.Parameter(self.lm_head.weight.detach()[:n], requires_grad=False)
            self.lm_head.out_features = n
        self.vocab_used = n

    # -- vision ------------------------------------------------------------------------------------

    @property
    def _param(self) -> torch.Tensor:
        return self.llm.embed_tokens.weight

    @torch.inference_mode()
    def encode_frames(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[T, 3, S, S] pixels -> projected per-frame tokens V [T, n, hidden] (2x2-pooled when T > 1)."""
        device, dtype = next(self.mm_projector.parameters()).device, self._param.dtype
        out = []
        for chunk in pixel_values.split(max(1, self.cfg.vision_batch_size)):
            feats = self.vision_tower(chunk.to(device=device, dtype=dtype))
            out.append(self.mm_projector(feats))
        v = torch.cat(out)
        if v.shape[0] > 1 and self.cfg.video_pooling_stride > 1:
            v = pool_frames(v, self.cfg.video_pooling_stride)
        return v

    def fast_and_slow(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """V [T, n, hidden] -> (fast tokens [N_fast, hidden], slow tokens [T*n, hidden])."""
        return split_fast_tokens(features, self.cfg), features.reshape(-1, features.shape[-1])

    @torch.inference_mode()
    def slow_memory(self, slow: torch.Tensor, query_rows: torch.Tensor, adapters: object | None = None
                    ) -> SlowMemory:
        """Slow-token K/V of every hybrid layer, normalised with that layer's own input RMSNorm (with the
        request's LoRA `adapters`); once per request."""
        kv, moved = {}, {slow.device: slow}
        for layer in self.llm.layers:
            attn = layer.self_attn
            if isinstance(attn, HybridAttention):  # on its layer's device (a split model), moved there once
                device = layer.input_layernorm.weight.device
                if device not in moved:
                    moved[device] = slow.to(device)
                kv[attn.layer_index] = attn.slow_kv(layer.input_layernorm(moved[device]),
                                                    None if adapters is None else adapters.on(device))
        return SlowMemory(query_rows=query_rows, kv=kv)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        weight = self.llm.embed_tokens.weight if self.cfg.llm.tie_word_embeddings else self.lm_head.weight
        return linear(h, weight).float()


def checkpoint_key_map(cfg: SlowFastConfig):
    """Official key -> our parameter name, or None for tensors the model never uses."""

    def key_map(key: str) -> str | None:
        if key.startswith("model.vision_tower.vision_tower.head."):
            return None  # classifier head of the timm model, unused
        if key.startswith("model.vision_tower.vision_tower."):
            return "vision_tower." + key[len("model.vision_tower.vision_tower."):]
        if key.startswith("model.mm_projector."):
            return "mm_projector." + key[len("model.mm_projector."):]
        if key.startswith("model.vision_resampler.") or key == "model.image_newline":
            return None  # not built by the released configuration (identity resampler, flat merge)
        if key.startswith("model."):
            return "llm." + key[len("model."):]
        if key == "lm_head.weight":
            return None if cfg.llm.tie_word_embeddings else "lm_head.weight"
        return key  # unknown keys are reported by the loader

    return key_map
