"""Slow-Fast language side: the hybrid decoder layers' gated text-to-slow-token cross-attention.

Only prompt text tokens query the slow tokens, with their post-RoPE self-attention queries; keys/values
are `cross_attn_kv_proj(input_layernorm(slow))` laid out per KV head as (K, V), without positions. The
result is added before `o_proj`, scaled by `tanh(cross_attn_gate_proj(A)) * tanh(cross_attn_warm_up_gate)`.
Slow-token K/V are computed once per request (`SlowMemory`) and dropped after the prefill: decode steps
get no cross-attention in the official semantics, so they never need them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...layers import AttentionInputs, Linear, Qwen2Attention, Qwen2Config, merge_heads, sdpa


@dataclass
class SlowMemory:
    """Per-request slow path of one prefill: which rows of the forward call query (the prompt text
    tokens) and, per hybrid layer, the slow-token keys/values [1, Hkv, N, D] computed once."""

    query_rows: torch.Tensor  # [n_text] long indices into the tokens of the forward call
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]

    def on(self, device: torch.device) -> SlowMemory:
        """The memory for a split model's stage on `device` (each layer's K/V already live on its device)."""
        return SlowMemory(self.query_rows.to(device), self.kv)


class HybridAttention(Qwen2Attention):
    """Qwen2 self-attention plus the gated text-to-slow-token cross-attention of the hybrid layers."""

    def __init__(self, cfg: Qwen2Config, layer_index: int) -> None:
        super().__init__(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, layer_index)
        self.cross_attn_kv_proj = Linear(cfg.hidden_size, 2 * self.kv_heads * self.head_dim)
        # owlvid's Linear (same keys) so that an unmerged LoRA adapter can reach it through `adapters`
        self.cross_attn_gate_proj = nn.Sequential(Linear(cfg.hidden_size, 1), nn.Tanh())
        self.cross_attn_warm_up_gate = nn.Parameter(torch.zeros(1))

    def slow_kv(self, normed_slow: torch.Tensor, adapters: object | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """normed_slow [N, hidden] -> K, V [1, Hkv, N, D]; the projection is head-major (K then V per
        KV head), as the official einops split `(H KV D)`. Keys get no positions."""
        n = normed_slow.shape[0]
        kv = self.cross_attn_kv_proj(normed_slow[None], adapters).view(n, self.kv_heads, 2, self.head_dim)
        k = kv[:, :, 0].transpose(0, 1)[None].contiguous()
        v = kv[:, :, 1].transpose(0, 1)[None].contiguous()
        return k, v

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        memory: SlowMemory | None = inputs.visual
        if memory is None or self.layer_index not in memory.kv or memory.query_rows.numel() == 0:
            return super().forward(x, inputs)  # decode steps and text-only requests: plain Qwen2
        q, k, v = self.project(x, inputs)
        ctx = merge_heads(self.self_attention(q, k, v, inputs))  # A: [1, T, H*D], before o_proj
        slow_k, slow_v = memory.kv[self.layer_index]
        rows = memory.query_rows
        cross = merge_heads(sdpa(q[:, :, rows], slow_k, slow_v))  # C: non-causal over every slow token
        text = ctx[:, rows]
        gate = self.cross_attn_gate_proj[1](self.cross_attn_gate_proj[0](text, inputs.adapters)) \
            * torch.tanh(self.cross_attn_warm_up_gate)
        ctx = ctx.index_copy(1, rows, text + cross * gate)
        return self.o_proj(ctx, inputs.adapters)
