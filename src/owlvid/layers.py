"""Shared transformer pieces: RMSNorm, rotary embeddings, SDPA attention, Qwen2 blocks, KV cache.

Numerics follow the official Qwen2 code (the reference both model families were trained with):
RMSNorm in float32 then cast back before the weight multiply, RoPE tables in float32 cast to the
activation dtype, logits in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UnsupportedError


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


@dataclass
class LayerKV:
    """The text keys/values of one layer for a batch: [B, Hkv, capacity, D], first `length` valid."""

    k: torch.Tensor
    v: torch.Tensor


class KVCache:
    """Pre-allocated per-layer key/value storage for one batch of sequences (all the same length)."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (batch, kv_heads, capacity, head_dim)
        self.layers = [LayerKV(torch.empty(shape, dtype=dtype, device=device),
                               torch.empty(shape, dtype=dtype, device=device)) for _ in range(num_layers)]
        self.length = 0
        self.capacity = capacity

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, Hkv, T, D] after the current length; return all valid keys/values."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.capacity:
            self._grow(max(end, 2 * self.capacity))
        entry = self.layers[layer]
        entry.k[:, :, start:end] = k
        entry.v[:, :, start:end] = v
        return entry.k[:, :, :end], entry.v[:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def load_row(self, ragged: RaggedKVCache, row: int) -> None:
        """This (one-sequence) cache takes the keys/values of `row` of a decoding batch's ragged cache."""
        n = ragged.host_lengths[row]
        if n > self.capacity:
            self._grow(n)
        for entry, source in zip(self.layers, ragged.layers):
            entry.k[0, :, :n] = source.k[row, :, :n]
            entry.v[0, :, :n] = source.v[row, :, :n]
        self.length = n

    def _grow(self, capacity: int) -> None:
        for entry in self.layers:
            for name in ("k", "v"):
                old = getattr(entry, name)
                new = old.new_empty((*old.shape[:2], capacity, old.shape[3]))
                new[:, :, : self.length] = old[:, :, : self.length]
                setattr(entry, name, new)
        self.capacity = capacity


class RaggedKVCache:
    """Key/value storage for a decoding batch whose sequences have different lengths, allocated once.

    Storage is [rows, Hkv, capacity, D] per layer for up to `rows` requests; the batch's B requests are
    its first B rows, row b holding `lengths[b]` valid entries. `append` writes one new token per row at
    its own length, in place, and `valid_mask()` hides the padding from attention. Requests join into the
    next free rows and leaving rows are compacted in place, so the storage is reallocated only when the
    batch outgrows it (capacity doubles). The lengths are mirrored on the host: no step reads them back
    from the device (on a GPU every such read is a synchronisation).
    """

    def __init__(self, layers: list[LayerKV], lengths: list[int], device: torch.device | str) -> None:
        self.layers = layers  # [rows, Hkv, capacity, D] each; only the first len(host_lengths) rows in use
        self.host_lengths = list(lengths)
        self.lengths = torch.tensor(lengths, dtype=torch.long, device=device)  # [B] on the device

    @classmethod
    def from_caches(cls, caches: list[KVCache], rows: int | None = None, extra: int = 64) -> RaggedKVCache:
        """A batch of these prefilled requests, with room for `rows` requests (default: just these)."""
        ref = caches[0].layers[0].k
        cache = cls.allocate(len(caches[0].layers), max(rows or 0, len(caches)), ref.shape[1],
                             max(c.length for c in caches) + extra, ref.shape[3], ref.dtype, ref.device)
        cache.add(caches)
        return cache

    @classmethod
    def allocate(cls, num_layers: int, rows: int, kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> RaggedKVCache:
        """Empty storage. Zeros, not `empty`: padding is masked, but a NaN there would still reach the
        output through 0 * NaN in the attention's weighted sum."""
        shape = (rows, kv_heads, capacity, head_dim)
        return cls([LayerKV(torch.zeros(shape, dtype=dtype, device=device),
                            torch.zeros(shape, dtype=dtype, device=device)) for _ in range(num_layers)], [], device)

    @property
    def batch_size(self) -> int:
        return len(self.host_lengths)

    @property
    def rows(self) -> int:
        return self.layers[0].k.shape[0]

    @property
    def capacity(self) -> int:
        return self.layers[0].k.shape[2]

    def add(self, caches: list[KVCache]) -> None:
        """Prefilled requests join the batch: their keys/values are copied into the next free rows."""
        start, end = self.batch_size, self.batch_size + len(caches)
        longest = max([c.length for c in caches] + self.host_lengths)
        self._reserve(end, longest + 1)
        for i, entry in enumerate(self.layers):
            for b, c in enumerate(caches, start):
                entry.k[b, :, : c.length] = c.layers[i].k[0, :, : c.length]
                entry.v[b, :, : c.length] = c.layers[i].v[0, :, : c.length]
        self.host_lengths += [c.length for c in caches]
        self.lengths = torch.cat([self.lengths, torch.tensor([c.length for c in caches], dtype=torch.long,
                                                             device=self.lengths.device)])

    def keep(self, rows: list[int]) -> None:
        """Only these rows (ascending) stay: each moves down into the first free row, in place."""
        for i, r in enumerate(rows):
            if r != i:
                n = self.host_lengths[r]
                for entry in self.layers:
                    entry.k[i, :, :n] = entry.k[r, :, :n]
                    entry.v[i, :, :n] = entry.v[r, :, :n]
        self.host_lengths = [self.host_lengths[r] for r in rows]
        self.lengths = self.lengths[torch.tensor(rows, dtype=torch.long, device=self.lengths.device)]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one new token per row (k/v [B, Hkv, 1, D]) at each row's length; all keys/values up to the
        longest row (the padding is hidden by `valid_mask`)."""
        end = self.end
        if end > self.capacity:
            self._reserve(self.batch_size, end)
        entry, b = self.layers[layer], k.shape[0]
        rows = torch.arange(b, device=k.device)
        entry.k[rows, :, self.lengths] = k[:, :, 0]
        entry.v[rows, :, self.lengths] = v[:, :, 0]
        return entry.k[:b, :, :end], entry.v[:b, :, :end]

    @property
    def end(self) -> int:
        """Keys visible to this step: the longest row plus its new token."""
        return max(self.host_lengths) + 1

    def valid_mask(self) -> torch.Tensor:
        """Bool [B, 1, 1, S] over the keys after this step's append."""
        return (torch.arange(self.end, device=self.lengths.device)[None, :] <= self.lengths[:, None])[:, None, None]

    def advance(self, n: int = 1) -> None:
        self.lengths += n
        self.host_lengths = [length + n for length in self.host_lengths]

    def _reserve(self, rows: int, capacity: int) -> None:
        """Grow the storage (doubling) to at least `rows` rows of `capacity` keys, keeping the contents."""
        if rows <= self.rows and capacity <= self.capacity:
            return
        new_rows = self.rows if rows <= self.rows else max(rows, 2 * self.rows)
        new_capacity = self.capacity if capacity <= self.capacity else max(capacity, 2 * self.capacity)
        used = self.batch_size
        for entry in self.layers:
            for name in ("k", "v"):
                old = getattr(entry, name)
                new = old.new_zeros((new_rows, old.shape[1], new_capacity, old.shape[3]))
                new[:used, :, : old.shape[2]] = old[:used]
                setattr(entry, name, new)


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
class AttentionInputs:
    """What every attention layer of one forward call needs besides its hidden states."""

    positions: torch.Tensor  # [B, T] RoPE positions of the new tokens
    cos: torch.Tensor  # [B, 1, T, D] in activation dtype
    sin: torch.Tensor
    cache: KVCache | RaggedKVCache
    causal_mask: torch.Tensor | None  # [B, 1, T, S] bool over cached+new text keys, None = plain causal
    visual: object | None = None  # model-specific per-request visual memory (see the model files)
    adapters: object | None = None  # the rows' LoRA slots (owlvid.lora.AdapterRows), None: the base model


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
    model's own attention (hyper / hybrid cross-attention) from `make_attention(index)`."""

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
    "RMSNorm", "RotaryTable", "apply_rope", "rotate_half", "sdpa", "KVCache", "Qwen2MLP", "Qwen2Attention",
    "Qwen2DecoderLayer", "Qwen2Decoder", "Qwen2Config", "AttentionInputs", "new_attention_inputs",
    "merge_heads", "causal_mask", "gelu_tanh", "param_count",
]
