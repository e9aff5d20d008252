"""mPLUG-Owl3 network: the `Owl3` module that assembles the SigLIP tower, the projector and the Qwen2
decoder with hyper-attention layers, and `checkpoint_key_map` from official weight names to ours."""

from __future__ import annotations

import torch
from torch import nn

from ...layers import Qwen2Decoder, RotaryTable, linear
from ..base import VisionLanguageModel
from .config import Owl3Config
from .language import HyperAttention, VisualMemory
from .vision import SiglipTower

# On the CPU, crops per vision-tower call so that one [crops, 729, 1152] activation stays within 16 MB (4 crops
# in float32, 9 in bfloat16). Larger buffers come from fresh mmap()s that the kernel zero-fills page by page on
# every layer (2-core EPYC, fp32, 32 crops in 4-layer towers: 720k page faults and 2.5 s of system time per
# call with chunks of 16 or 32 crops, 440k with 8, none with 1-4; 101 vs 113-115 GFLOP/s).
CPU_VISION_CHUNK_BYTES = 16 << 20


class Owl3(VisionLanguageModel):
    """The whole mPLUG-Owl3 network. Module names are ours; `checkpoint_key_map` maps official keys."""

    def __init__(self, cfg: Owl3Config) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.llm
        self.llm = Qwen2Decoder(c, cfg.hyper_layers, lambda i: HyperAttention(cfg, i))
        self.lm_head = None if c.tie_word_embeddings else nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.vision = SiglipTower(cfg.vision)
        d_vis = cfg.vision.hidden_size
        if cfg.projector == "mlp":
            self.projector = nn.Sequential(nn.Linear(d_vis, c.hidden_size), nn.GELU(),
                                           nn.Linear(c.hidden_size, c.hidden_size))
        else:
            self.projector = nn.Linear(d_vis, c.hidden_size)
        self.rope: RotaryTable | None = None  # built after the weights are on their device

    def hyper_attentions(self) -> list[HyperAttention]:
        return [layer.self_attn for layer in self.llm.layers if isinstance(layer.self_attn, HyperAttention)]

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] float32 pixels -> image_embeds [N, 729, hidden] in the model dtype."""
        dtype = self.llm.embed_tokens.weight.dtype
        device = self.projector_device()
        out = []
        for chunk in pixel_values.split(self.vision_chunk(device, dtype)):
            out.append(self.projector(self.vision(chunk.to(device=device, dtype=dtype))))
        return torch.cat(out)

    def projector_device(self) -> torch.device:
        """Where the vision tower and projector run (a split model's first device by default)."""
        return next(self.projector.parameters()).device

    def vision_chunk(self, device: torch.device, dtype: torch.dtype) -> int:
        """Crops per vision-tower call: config.json's vision_batch_size, on the CPU at most what keeps the
        activations in reused memory (CPU_VISION_CHUNK_BYTES). Chunking does not change the features."""
        chunk = max(1, self.cfg.vision_batch_size)
        if device.type == "cpu":
            v = self.cfg.vision
            per_crop = v.num_patches * v.hidden_size * dtype.itemsize
            chunk = min(chunk, max(1, CPU_VISION_CHUNK_BYTES // per_crop))
        return chunk

    @torch.inference_mode()
    def visual_memory(self, image_embeds: torch.Tensor, starts: list[int], adapters: object | None = None
                      ) -> VisualMemory:
        """Normalise the image embeddings with each hyper layer's own input RMSNorm and project them to
        that layer's visual K/V (with the request's LoRA `adapters`), once per request."""
        # the starts stay beside the positions they are compared with (the RoPE table's device); each layer's
        # K/V are computed on that layer's device, the embeddings moved there once per device (a split model)
        starts_t = torch.tensor(starts, dtype=torch.long, device=self.rope.device)
        rope_pos = starts_t + 1 if self.cfg.strict_visibility else starts_t
        kv, moved = {}, {image_embeds.device: image_embeds}
        for layer in self.llm.layers:
            attn = layer.self_attn
            if isinstance(attn, HyperAttention):
                device = layer.input_layernorm.weight.device
                if device not in moved:
                    moved[device] = image_embeds.to(device)
                kv[attn.layer_index] = attn.visual_kv(layer.input_layernorm(moved[device]), rope_pos, self.rope,
                                                         None if adapters is None else adapters.on(device))
        return VisualMemory(starts=starts_t, tokens_per_item=image_embeds.shape[1], kv=kv)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        weight = self.llm.embed_tokens.weight if self.cfg.llm.tie_word_embeddings else self.lm_head.weight
        return linear(h, weight).float()


def checkpoint_key_map(cfg: Owl3Config):
    """Official key -> our parameter name, or None for tensors the model never uses."""
    last_vision_layer = f"vision_model.encoder.layers.{cfg.vision.num_hidden_layers - 1}."

    def key_map(key: str) -> str | None:
        if key.startswith(("vision_model.head.", "vision_model.post_layernorm.", last_vision_layer)):
            return None
        if key.startswith("vision_model."):
            return "vision." + key[len("vision_model."):]
        if key.startswith("vision2text_model."):
            return "projector." + key[len("vision2text_model."):]
        if key.startswith("language_model.model."):
            return "llm." + key[len("language_model.model."):]
        if key == "language_model.lm_head.weight":
            return None if cfg.llm.tie_word_embeddings else "lm_head.weight"
        return key  # unknown keys are reported by the loader

    return key_map
