"""Applying LoRA adapters: merged into the weights at load, or kept apart to serve several at once.

Merged (`owlvid.load(model, adapter=PATH)`): `W += scale * B @ A` once (float32, cast back), so a token
costs what it costs on the base model.

Unmerged (`owlvid.load(model, lora_modules={name: PATH})`): each adapted linear layer of the decoder becomes a
`LoraLinear` holding every adapter's factors stacked by slot (slot 0 is the base model: zeros). A forward
call carries the slot of each of its rows in `AttentionInputs.adapters` (an `AdapterRows`, built by the runtime
from the prepared request or the decoding batch, never global state): the base GEMM is shared by all rows and
each row adds its own low-rank delta, `(x @ A[slot].T) @ B[slot].T` (scale folded into B): with few adapters
as two GEMMs over all slots' stacked factors with each row masked to its own slot's columns, with many as bmm
over the rows' gathered factors. Rows on the base model cost nothing when the whole call is on it.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import Adapter
from .errors import UnsupportedError
from .layers import AdapterRows, Linear, linear

# Layers that take an `adapters` argument at every call (decoder projections and the hyper / hybrid layers'
# gates): the only ones the unmerged path can adapt. Others (vision tower, projector) need the adapter merged.
UNMERGED_SUFFIXES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.v_kv_proj",
                     "self_attn.cross_attn_kv_proj", "self_attn.gate_proj.0", "self_attn.cross_attn_gate_proj.0")


@torch.no_grad()
def merge_adapter(model: nn.Module, adapter: Adapter) -> None:
    """Add every module's update to its weight in place (float32 sum, cast back to the weight's dtype)."""
    params = dict(model.named_parameters())
    for module, w in adapter.modules.items():
        weight = params[module + ".weight"]
        if type(weight.data) is not torch.Tensor:
            raise UnsupportedError("an adapter cannot be merged into quantized weights: merge before quantizing")
        merged = weight.float() + w.delta().to(weight.device)
        weight.copy_(merged.to(weight.dtype))


class LoraLinear(Linear):
    """A decoder projection with the low-rank factors of several adapters (see the module docstring). The
    weight and bias are the base layer's (same parameters, possibly quantized); the factors are buffers kept
    out of the state dict: slot s owns rows s*r..(s+1)*r of `lora_a` and the same columns of `lora_b`."""

    lora_a: torch.Tensor  # [slots * r, in]
    lora_b: torch.Tensor  # [out, slots * r], scale folded in
    fused: torch.Tensor | None  # [out + slots * r, in]: the weight and lora_a are its two views (plain weights)
    fused_bias: torch.Tensor | None

    @classmethod
    def wrap(cls, base: nn.Linear, slots: int, rank: int) -> LoraLinear:
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = base.in_features, base.out_features
        layer.weight, layer.bias = base.weight, base.bias
        dtype = base.weight.dtype  # a quantized weight reports its activation dtype
        device = base.weight.device
        a = torch.zeros(slots * rank, base.in_features, dtype=dtype, device=device)
        fused = fused_bias = None
        if type(base.weight.data) is torch.Tensor:
            # The weight and every slot's A factors in one tensor: the base GEMM and x @ A are then one call
            # (at decoding, a second small GEMM per layer cost about as much as the B factors' GEMM).
            fused = torch.cat([base.weight.data, a])
            layer.weight = nn.Parameter(fused[: base.out_features], requires_grad=base.weight.requires_grad)
            a = fused[base.out_features:]
            if base.bias is not None:
                fused_bias = torch.cat([base.bias.data, a.new_zeros(slots * rank)])
        # buffers, so that `module.to(device)` moves them with the weight (the moved copies are equal, no longer views)
        layer.register_buffer("fused", fused, persistent=False)
        layer.register_buffer("fused_bias", fused_bias, persistent=False)
        layer.register_buffer("lora_a", a, persistent=False)
        layer.register_buffer("lora_b", torch.zeros(base.out_features, slots * rank, dtype=dtype, device=device),
                              persistent=False)
        return layer

    def forward(self, x: torch.Tensor, adapters: AdapterRows | None = None) -> torch.Tensor:
        if adapters is None:
            return linear(x, self.weight, self.bias)
        if self.fused is not None and adapters.reads_every_slot(x):
            both = linear(x, self.fused, self.fused_bias)
            out = self.out_features
            return both[..., :out] + adapters.delta(x, self.lora_a, self.lora_b, both[..., out:])
        return linear(x, self.weight, self.bias) + adapters.delta(x, self.lora_a, self.lora_b)


def check_unmerged(adapter: Adapter) -> None:
    """Refuse, with one line, an adapter that the unmerged path cannot apply."""
    for module in adapter.modules:
        if not (module.startswith("llm.layers.") and module.endswith(UNMERGED_SUFFIXES)):
            raise UnsupportedError(f"adapter {adapter.name!r} adapts {module!r}, which can only be merged: load it "
                                   "with adapter=PATH (--adapter) instead of lora_modules")


@torch.no_grad()
def install_adapters(model: nn.Module, adapters: list[Adapter]) -> tuple[int, int]:
    """Make every layer some adapter targets a LoraLinear with one slot per adapter (slot i + 1 is
    adapters[i]); ranks are padded with zeros to the largest. Returns the layout (slots, rank)."""
    for adapter in adapters:
        check_unmerged(adapter)
    targets = sorted({m for adapter in adapters for m in adapter.modules})
    rank = max(adapter.max_rank for adapter in adapters)
    for module in targets:
        parent_name, _, leaf = module.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = LoraLinear.wrap(getattr(parent, leaf), len(adapters) + 1, rank)
        for slot, adapter in enumerate(adapters, 1):
            w = adapter.modules.get(module)
            if w is not None:
                layer.lora_a[slot * rank: slot * rank + w.rank] = w.a.to(layer.lora_a.dtype)
                layer.lora_b[:, slot * rank: slot * rank + w.rank] = (w.b * w.scale).to(layer.lora_b.dtype)
        setattr(parent, leaf, layer)
    return len(adapters) + 1, rank
