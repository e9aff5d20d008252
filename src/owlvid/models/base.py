"""The skeleton every model family's top-level module fills in: the names the runtime and the tools
(quantization, LoRA, the memory plan) read, declared once instead of probed."""

from __future__ import annotations

import torch
from torch import nn

from ..layers import Qwen2Decoder, RotaryTable


class VisionLanguageModel(nn.Module):
    """`llm`: the Qwen2 decoder with the family's special (cross-attention) layers; `lm_head`: the output
    projection, None when tied to the embedding; `vision`: the vision tower; `projector`: vision features to
    the LLM's width; `rope`: the rotary table (built once the weights are on their device); `logits(h)`:
    float32 next-token logits of hidden states."""

    llm: Qwen2Decoder
    lm_head: nn.Linear | None
    rope: RotaryTable | None
    vision: nn.Module  # a submodule, or a property naming the family's own (declared here, not defined:
    projector: nn.Module  # a class-level property would hide the submodules nn.Module keeps)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
