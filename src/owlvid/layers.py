"""Shared transformer pieces: RMSNorm, rotary embeddings, SDPA attention, Qwen2 blocks (the KV caches: kv_cache.py).

Numerics follow the official Qwen2 code (the reference both model families were trained with):
RMSNorm in float32 then cast back before the weight multiply, RoPE tables in float32 cast to the
activation dtype, logits in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UnsupportedError
from .kv_cache import KVCache, RaggedKVCache

if TYPE_CHECKING:
    from .stages import Stages


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class RotaryTable:
    """cos/sin of the NeoX ("rotate half") RoPE in float32, grown on demand up to `max_positions`
    (a full 32768-position table would cost memory most requests never touch)."""

    def __init__(self, head_dim: int, base: float, max_positions: int, device: torch.device | str = "cpu"):
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        self.inv_freq = (1.0 / (base**exponents)).to(device)
        self.max_positions = max_positions
        self._cos = self._sin = torch.empty(0, head_dim, device=device)

    @property
    def device(self) -> torch.device:
        return self.inv_freq.device

    def _ensure(self, needed: int) -> None:
        if needed <= self._cos.shape[0]:
            return
        size = min(max(needed, 2 * self._cos.shape[0], 4096), max(needed, self.max_positions))
        t = torch.arange(size, dtype=torch.int64, device=self.inv_freq.device).float()
        emb = torch.outer(t, self.inv_freq).repeat(1, 2)
        self._cos, self._sin = emb.cos(), emb.sin()

    def table(self, positions: torch.Tensor, max_position: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 cos/sin rows for integer `positions` (any shape) -> [..., head_dim]. `max_position`, when
        the caller knows it, spares reading the largest position back from the device."""
        if max_position is None:
            max_position = int(positions.max()) if positions.numel() else -1
        self._ensure(max_position + 1)
        return self._cos[positions], self._sin[positions]

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype, max_position: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows for `positions` ([..., T]) in `dtype`, shaped [..., T, head_dim]."""
        cos, sin = self.table(positions, max_position)
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, D]; cos/sin broadcastable to it ([B, 1, T, D] or [T, D])."""
    return x * cos + rotate_half(x) * sin


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
         is_causal: bool = False) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads: q [B, H, T, D], k/v [B, Hkv, S, D].

    `mask` is boolean (True = attend), broadcastable to [B, 1 or H, T, S]. The query heads that share
    a key/value head are folded into the query length instead of copying K/V per head, which matters
    when the keys are tens of thousands of visual tokens.
    """
    if mask is not None and not is_causal and mask.device.type == "cpu" and bool(mask.all()):
        # Nothing masked (a decoded token over all of its media): the unmasked CPU kernels are faster.
        # (Not on GPUs, where reading the flag back would synchronise every attention call.)
        mask = None
    b, h, t, d = q.shape
    groups = h // k.shape[1]
    if is_causal and mask is None and t != k.shape[2]:
        # The queries are the last t of the keys' positions; torch's is_causal would align them top-left.
        mask = causal_mask(t, k.shape[2], q.device) if t > 1 else None
        is_causal = False
    if groups == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)
    if is_causal and mask is None:
        # Plain causal prefill: let the kernel handle heads and causality (no [T, T] mask in memory).
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    qg = q.reshape(b, k.shape[1], groups * t, d)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=_fold_mask(mask, groups, t))
    return out.reshape(b, h, t, d)


def _fold_mask(mask: torch.Tensor | None, groups: int, t: int) -> torch.Tensor | None:
    """A [B, 1, T, S] (or [T, S]) mask for query heads folded as [B, Hkv, groups * T, D] (see `sdpa`)."""
    if mask is None:
        return None
    if mask.dim() == 2:
        mask = mask[None, None]
    if mask.shape[1] != 1:
        raise ValueError("per-head masks are not supported with grouped-query attention")
    if mask.shape[2] != 1 and groups > 1:  # one row per query: repeat it for every head of the group
        mask = mask.unsqueeze(2).expand(mask.shape[0], 1, groups, t, mask.shape[-1])
        mask = mask.reshape(mask.shape[0], 1, groups * t, mask.shape[-1])
    return mask


def sdpa_parts(q: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
               ) -> torch.Tensor:
    """`sdpa` over the keys of several (k, v, mask) parts as if they were concatenated along the key axis,
    without building the concatenation. For a few query rows (decoding): the fused hyper layers attend to
    [visual memory ; text cache], and copying tens of thousands of visual K/V per token would cost more
    than the attention itself. Softmax in float32 over all parts at once."""
    b, h, t, d = q.shape
    groups = h // parts[0][0].shape[1]
    qg = q.reshape(b, parts[0][0].shape[1], groups * t, d)
    scores = []
    for k, _, mask in parts:
        s = torch.matmul(qg, k.transpose(-1, -2)).float() * d ** -0.5
        folded = _fold_mask(mask, groups, t)
        scores.append(s if folded is None else s.masked_fill(~folded, float("-inf")))
    probs = torch.cat(scores, dim=-1).softmax(dim=-1).to(q.dtype)
    out, start = None, 0
    for k, v, _ in parts:
        part = torch.matmul(probs[..., start : start + k.shape[2]], v)
        out = part if out is None else out + part
        start += k.shape[2]
    return out.reshape(b, h, t, d)


# Linear kernels for quantized weights (tensor subclasses), by weight type; filled by owlvid.quantize. A
# subclass not listed here goes to F.linear, which dispatches to the subclass's own implementation.
QUANTIZED_LINEAR: dict[type, Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]] = {}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, except for 2-32 float32 rows on the CPU (batched decoding, short prompts): there MKL's
    GEMM repacks the whole weight on every call and runs 1.5-4x slower than `weight @ x.T`, which streams
    the weight once (measured on the 2-core development machine; see the batch section of
    benchmarks/perf.py). In bfloat16 it is the other way round: `F.linear` reads the weight at the memory
    rate for any number of rows and `weight @ x.T` ran 1.6-2x slower for 2-4 rows (Qwen2-7B widths,
    AVX512-BF16; the slowfast-batch section). Quantized weights go to their kernel in QUANTIZED_LINEAR."""
    if type(weight) not in (torch.Tensor, nn.Parameter):
        return QUANTIZED_LINEAR.get(type(weight), F.linear)(x, weight, bias)
    rows = x.numel() // x.shape[-1] if x.dim() else 0
    if x.device.type != "cpu":
        return F.linear(x, weight, bias)
    if x.dtype != torch.float32 or not 2 <= rows <= 32:
        # Always 2-D: a [B, 1, H] slice of a longer sequence (the last position, for the logits) keeps the
        # sequence's strides, and torch's 3-D matmul then copies the whole weight first: 0.5 s per call for
        # the tied 151851x896 embedding in bf16 (benchmarks/perf.py: the text-only "ttft" row, 0 frames).
        return F.linear(x.reshape(-1, x.shape[-1]), weight, bias).reshape(*x.shape[:-1], weight.shape[0])
    y = (weight @ x.reshape(rows, x.shape[-1]).t()).t().contiguous()
    if bias is not None:
        y += bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and keys) computed with :func:`linear`. `adapters` (the rows' LoRA slots,
    `AttentionInputs.adapters`) is read by `owlvid.lora.LoraLinear` only."""

    def forward(self, x: torch.Tensor, adapters: object | None = None) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class Qwen2MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor, adapters: object | None = None) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x, adapters)) * self.up_proj(x, adapters), adapters)


@dataclass
class AdapterRows:
    """The adapter slot of each row of one forward call: `host` on the host, `index` [B] on the device (gathers),
    `mask` [B, 1, slots * rank] (1 on the columns of the row's slot) in the model dtype, `single` the slot when
    every row has the same one."""

    host: list[int]
    index: torch.Tensor
    mask: torch.Tensor
    single: int | None
    slots: int
    rank: int

    @classmethod
    def of(cls, slots: list[int], layout: tuple[int, int], dtype: torch.dtype, device: torch.device
           ) -> AdapterRows | None:
        """Rows on these slots, for LoraLinear layers of `layout` (slots, rank); None when every row is on the
        base model (the layers then skip the LoRA path entirely)."""
        if not any(slots):
            return None
        count, rank = layout
        single = slots[0] if all(s == slots[0] for s in slots) else None
        mask = torch.zeros(len(slots), 1, count * rank, dtype=dtype)
        for row, slot in enumerate(slots):
            mask[row, 0, slot * rank: (slot + 1) * rank] = 1
        return cls(list(slots), torch.tensor(slots, dtype=torch.long, device=device), mask.to(device), single,
                   count, rank)

    def on(self, device: torch.device) -> AdapterRows:
        """The same rows for layers on `device` (a split model's stage)."""
        return replace(self, index=self.index.to(device), mask=self.mask.to(device))

    def reads_every_slot(self, x: torch.Tensor) -> bool:
        """Whether `delta` uses `x @ A.T` over every slot (then a caller may compute it with the base GEMM)."""
        return self.single is not None or self.slots <= 2 * x.shape[0]

    def delta(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, xa: torch.Tensor | None = None
              ) -> torch.Tensor:
        """Each row's `(x @ A[slot].T) @ B[slot].T` for x [B, ..., in], stacked factors a [slots * r, in] and
        b [out, slots * r]; `xa`: `x @ a.T` when the caller has it (see `reads_every_slot`)."""
        r = self.rank
        if self.single is not None:  # one adapter: plain matmuls over its own columns
            cols = slice(self.single * r, (self.single + 1) * r)
            h = linear(x, a[cols]) if xa is None else xa[..., cols]
            return linear(h, b[:, cols].contiguous())
        rows = x.shape[0]
        if self.slots <= 2 * rows:
            # Few adapters: every slot's factors at once, each row keeping its own slot's columns (two GEMMs and
            # a multiply: on the CPU 2x faster than gathering per-row factors for bmm; on a GPU fewer kernels).
            xb = x.reshape(rows, -1, x.shape[-1])
            h = linear(xb, a) if xa is None else xa.reshape(rows, -1, a.shape[0])
            return linear(h * self.mask, b).reshape(*x.shape[:-1], b.shape[0])
        # Many adapters: only the rows' own factors are read (gathered), one bmm each way.
        xb = x.reshape(rows, -1, x.shape[-1])
        a_rows = a.view(self.slots, r, -1).index_select(0, self.index)  # [B, r, in]
        b_rows = b.view(b.shape[0], self.slots, r).index_select(1, self.index)  # [out, B, r]
        out = torch.bmm(torch.bmm(xb, a_rows.transpose(1, 2)), b_rows.permute(1, 2, 0))
        return out.reshape(*x.shape[:-1], b.shape[0])


@dataclass
class AttentionInputs:
    """What every attention layer of one forward call needs besides its hidden states."""

    positions: torch.Tensor  # [B, T] RoPE positions of the new tokens
    cos: torch.Tensor  # [B, 1, T, D] in activation dtype
    sin: torch.Tensor
    cache: KVCache | RaggedKVCache
    causal_mask: torch.Tensor | None  # [B, 1, T, S] bool over cached+new text keys, None = plain causal
    visual: object | None = None  # model-specific per-request visual memory (see the model files)
    adapters: AdapterRows | None = None  # the rows' LoRA slots (None: every row on the base model)

    def on(self, device: torch.device) -> AttentionInputs:
        """These inputs for the layers of a split model's stage on `device`: the step's RoPE rows, mask and LoRA
        rows moved there, the visual memory's view there (`visual.on`). The caches keep each layer's K/V on
        its own device already; `positions` stay with the media starts they are compared with."""
        return replace(self, cos=self.cos.to(device), sin=self.sin.to(device),
                       causal_mask=None if self.causal_mask is None else self.causal_mask.to(device),
                       visual=None if self.visual is None else self.visual.on(device),
                       adapters=None if self.adapters is None else self.adapters.on(device))


class Qwen2Attention(nn.Module):
    """Qwen2 self-attention. `context()` returns the per-head output before `o_proj` so that
    cross-attention variants can mix visual context in before the output projection."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, layer_index: int) -> None:
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads
        self.head_dim = hidden // heads
        self.layer_index = layer_index
        self.q_proj = Linear(hidden, heads * self.head_dim, bias=True)
        self.k_proj = Linear(hidden, kv_heads * self.head_dim, bias=True)
        self.v_proj = Linear(hidden, kv_heads * self.head_dim, bias=True)
        self.o_proj = Linear(heads * self.head_dim, hidden, bias=False)

    def project(self, x: torch.Tensor, inputs: AttentionInputs) -> tuple[torch.Tensor, ...]:
        """RoPE'd q [B, H, T, D] and all text k/v so far [B, Hkv, S, D] (the new ones cached)."""
        b, t, _ = x.shape
        a = inputs.adapters
        q = self.q_proj(x, a).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x, a).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x, a).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, inputs.cos, inputs.sin)
        k = apply_rope(k, inputs.cos, inputs.sin)
        k_all, v_all = inputs.cache.append(self.layer_index, k, v)
        return q, k_all, v_all

    def self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       inputs: AttentionInputs) -> torch.Tensor:
        mask = inputs.causal_mask
        if mask is None and q.shape[2] == k.shape[2]:
            return sdpa(q, k, v, is_causal=True)
        if mask is None:  # new tokens at the end of the cache see every cached key and the causal part
            mask = causal_mask(q.shape[2], k.shape[2], q.device)
        return sdpa(q, k, v, mask)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        q, k, v = self.project(x, inputs)
        ctx = self.self_attention(q, k, v, inputs)
        return self.o_proj(merge_heads(ctx), inputs.adapters)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [B, T, H*D]."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def causal_mask(q_len: int, kv_len: int, device: torch.device | str) -> torch.Tensor:
    """Bool [q_len, kv_len]: the new queries are the last q_len of kv_len positions."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    return torch.arange(kv_len, device=device)[None, :] <= q_pos


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, attention: nn.Module, hidden: int, intermediate: int, eps: float) -> None:
        super().__init__()
        self.self_attn = attention
        self.mlp = Qwen2MLP(hidden, intermediate)
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)

    def forward(self, h: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), inputs)
        return h + self.mlp(self.post_attention_layernorm(h), inputs.adapters)


@dataclass
class Qwen2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> Qwen2Config:
        """The fields we implement; settings that would change the numerics and that we do not implement
        (RoPE scaling, an active sliding window) are rejected instead of silently dropped."""
        scaling = d.get("rope_scaling")
        if scaling is not None and not (isinstance(scaling, dict)
                                        and (scaling.get("rope_type") or scaling.get("type")) == "default"):
            raise UnsupportedError(f"config.json sets rope_scaling {scaling!r}: owlvid implements plain RoPE only")
        fields = cls.__dataclass_fields__
        cfg = cls(**{k: d[k] for k in fields if k in d})
        # Released configs carry e.g. sliding_window 32768/131072 with use_sliding_window false: inactive.
        window = d.get("sliding_window")
        if d.get("use_sliding_window") and window is not None and window < cfg.max_position_embeddings:
            raise UnsupportedError(f"config.json enables a {window}-token sliding window (use_sliding_window "
                                   "true): owlvid implements full attention only")
        return cfg


class Qwen2Decoder(nn.Module):
    """Token embeddings, decoder layers and the final norm. Layers listed in `special_layers` get the
    model's own attention (hyper / hybrid cross-attention) from `make_attention(index)`. `stages`, set when the
    model is split across devices (owlvid.stages), runs the layers stage by stage."""

    stages: Stages | None = None

    def __init__(self, cfg: Qwen2Config, special_layers: Collection[int] = (),
                 make_attention: Callable[[int], nn.Module] | None = None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        layers = []
        for i in range(cfg.num_hidden_layers):
            attn = make_attention(i) if i in special_layers and make_attention else Qwen2Attention(
                cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, i)
            layers.append(Qwen2DecoderLayer(attn, cfg.hidden_size, cfg.intermediate_size, cfg.rms_norm_eps))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        if self.stages is not None:
            return self.stages.run(self, h, inputs)
        for layer in self.layers:
            h = layer(h, inputs)
        return self.norm(h)


def new_attention_inputs(rope: RotaryTable, positions: torch.Tensor, cache: KVCache | RaggedKVCache,
                         dtype: torch.dtype, causal_mask: torch.Tensor | None = None, visual: object | None = None,
                         max_position: int | None = None, adapters: object | None = None) -> AttentionInputs:
    cos, sin = rope.lookup(positions, dtype, max_position)
    return AttentionInputs(positions=positions, cos=cos[:, None], sin=sin[:, None], cache=cache,
                           causal_mask=causal_mask, visual=visual, adapters=adapters)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "RMSNorm", "RotaryTable", "apply_rope", "rotate_half", "sdpa", "Qwen2MLP", "Qwen2Attention",
    "Qwen2DecoderLayer", "Qwen2Decoder", "Qwen2Config", "AttentionInputs", "new_attention_inputs",
    "merge_heads", "causal_mask", "gelu_tanh", "param_count",
]
