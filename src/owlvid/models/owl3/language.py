"""mPLUG-Owl3 hyper-attention layers and their visual memory.

Three hyper-attention variants exist across the releases (``Owl3Config.attention``):
  * ``dynamic_gate`` (7B-240728): causal self-attention, separate masked cross-attention to the visual
    tokens, mixed per head by ``sigmoid(gate_proj(ctx))``;
  * ``static_gate`` (1B/2B-241014): the same with a learned vector ``sigmoid(gate)``;
  * ``fused`` (7B/2B-241101): one softmax over [visual keys ; text keys], no gate.
Visual keys/values of every hyper layer are computed once per request (``VisualMemory``) and reused at
every decoding step; the official code recomputes them each step. A decoding batch pads its rows'
memories into one ``BatchedVisualMemory``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from ...layers import (
    AttentionInputs,
    Linear,
    Qwen2Attention,
    RotaryTable,
    apply_rope,
    causal_mask,
    merge_heads,
    sdpa,
    sdpa_parts,
)
from .config import Owl3Config

_PARTS_MAX_ROWS = 16  # query rows up to which fused attention scores visual and text keys without concatenating
_PREFILL_ROWS = 128  # query rows per fused-attention call at prefill (bounds the [rows, keys] mask)


def visible_segments(visible: torch.Tensor) -> list[tuple[int, int, int]]:
    """[(first row, end row, media items seen)] for runs of query rows that see the same media.
    `visible` [T, N] must be a prefix per row, non-decreasing down the rows (media in text order)."""
    counts = visible.sum(dim=1)
    if bool((counts[1:] < counts[:-1]).any()) or not bool(
            (visible == (torch.arange(visible.shape[1], device=visible.device) < counts[:, None])).all()):
        raise AssertionError("media visibility is not a prefix of the visual memory")
    values, lengths = torch.unique_consecutive(counts, return_counts=True)
    out, row = [], 0
    for items, n in zip(values.tolist(), lengths.tolist()):
        out.append((row, row + n, items))
        row += n
    return out


@dataclass
class VisualMemory:
    """Per-request visual state: media start indices and, per hyper layer, the visual keys (MI-RoPE'd)
    and values [1, Hkv, N*P, D], computed once at prefill."""

    starts: torch.Tensor  # [N] token index s_j of the `<` of each media marker
    tokens_per_item: int
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]

    _segments: tuple | None = field(default=None, repr=False, compare=False)  # (positions, strict, result)

    def visible(self, positions: torch.Tensor, strict: bool) -> torch.Tensor:
        """Bool [T, N]: which media each query token (raw sequence index) may attend."""
        pos = positions.reshape(-1, 1)
        return pos > self.starts[None, :] if strict else pos >= self.starts[None, :]

    def on(self, device: torch.device) -> VisualMemory:
        """The memory for a split model's stage on `device`: itself (each layer's K/V live on that layer's
        device; `starts` stay beside the positions, so the segments are computed once per forward)."""
        return self

    def segments(self, positions: torch.Tensor, strict: bool) -> list[tuple[int, int, int]]:
        """`visible_segments` of these positions; every hyper layer of one forward asks with the same
        positions tensor, so it is computed once per forward."""
        if self._segments is None or self._segments[0] is not positions or self._segments[1] != strict:
            self._segments = (positions, strict, visible_segments(self.visible(positions, strict)))
        return self._segments[2]


class BatchedVisualMemory:
    """Visual memories of a decoding batch: K/V storage [rows, Hkv, capacity, D] per hyper layer and a key
    mask [rows, capacity], allocated once and reused as requests join and leave (like the text cache,
    `layers.RaggedKVCache`): a newcomer's memory is copied into the next free rows, leaving rows are
    compacted in place, and the storage grows (doubling) only when the batch outgrows it. The batch's B rows
    are the first B; `kv`, `key_mask` [B, N] (False on padding) and `has_media` [B] are views over the
    longest row's N keys, which decode steps read. Each row sees all of its own media."""

    def __init__(self, storage: dict[int, tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor,
                 sizes: list[int]) -> None:
        self.storage, self.mask, self.sizes = storage, mask, list(sizes)
        self._refresh()

    @classmethod
    def from_memories(cls, memories: list[VisualMemory | None], layers: list[int]) -> BatchedVisualMemory | None:
        present = [m for m in memories if m is not None]
        if not present:
            return None
        sizes = [m.kv[layers[0]][0].shape[2] if m is not None else 0 for m in memories]
        like = {layer: present[0].kv[layer][0] for layer in layers}
        memory = cls.allocate(len(memories), max(sizes), like, present[0].starts.device)
        for layer in layers:
            k, v = memory.storage[layer]
            for b, m in enumerate(memories):
                if m is not None:
                    k[b, :, : sizes[b]], v[b, :, : sizes[b]] = m.kv[layer][0][0], m.kv[layer][1][0]
        for b, n in enumerate(sizes):
            memory.mask[b, :n] = True
        memory.sizes = sizes
        memory._refresh()
        return memory

    @classmethod
    def allocate(cls, rows: int, capacity: int, like: dict[int, torch.Tensor], mask_device: torch.device
                 ) -> BatchedVisualMemory:
        """Empty storage per layer, with the dtype and device of `like[layer]` (a split model's layers keep
        theirs on their own devices), and the key mask on `mask_device` (the inputs' device). Zeros: masked
        keys still meet the weighted sum, where a NaN would spread."""
        storage = {layer: (t.new_zeros((rows, t.shape[1], capacity, t.shape[3])),
                           t.new_zeros((rows, t.shape[1], capacity, t.shape[3]))) for layer, t in like.items()}
        return cls(storage, torch.zeros(rows, capacity, dtype=torch.bool, device=mask_device), [])

    @property
    def media_rows(self) -> list[bool]:
        return [n > 0 for n in self.sizes]

    @staticmethod
    def concat(a: BatchedVisualMemory | None, rows_a: int, b: BatchedVisualMemory | None, rows_b: int
               ) -> BatchedVisualMemory | None:
        """Rows of `a` then rows of `b` (either may be None: rows without media), into `a`'s storage."""
        if b is None:
            if a is not None:
                a.add_rows([0] * rows_b)
            return a
        if a is None:
            like = {layer: k for layer, (k, _) in b.storage.items()}
            a = BatchedVisualMemory.allocate(rows_a + rows_b, b.mask.shape[1], like, b.mask.device)
            a.add_rows([0] * rows_a)
        a.add(b)
        return a

    def add_rows(self, sizes: list[int]) -> int:
        """Make room for rows of these sizes after the batch's rows (masked, empty); their first index."""
        start, end = len(self.sizes), len(self.sizes) + len(sizes)
        self._reserve(end, max(sizes + self.sizes + [1]))
        self.mask[start:end] = False
        self.sizes += sizes
        self._refresh()
        return start

    def add(self, other: BatchedVisualMemory) -> None:
        """Append the rows of `other` (requests joining the batch)."""
        start = self.add_rows(other.sizes)
        end, width = start + len(other.sizes), max(other.sizes)
        for layer, (k, v) in self.storage.items():
            ok, ov = other.storage[layer]
            k[start:end, :, :width] = ok[: end - start, :, :width]
            v[start:end, :, :width] = ov[: end - start, :, :width]
        self.mask[start:end, :width] = other.mask[: end - start, :width]
        self._refresh()

    def keep(self, rows: list[int]) -> BatchedVisualMemory | None:
        """Only these rows (ascending) stay, moved down in place; None if none of them has media."""
        if not any(self.sizes[i] for i in rows):
            return None
        for i, r in enumerate(rows):
            if r != i:
                n = self.sizes[r]
                for k, v in self.storage.values():
                    k[i, :, :n], v[i, :, :n] = k[r, :, :n], v[r, :, :n]
                self.mask[i] = self.mask[r]
        self.sizes = [self.sizes[r] for r in rows]
        self._refresh()
        return self

    def _reserve(self, rows: int, capacity: int) -> None:
        have_rows, have_capacity = self.mask.shape
        if rows <= have_rows and capacity <= have_capacity:
            return
        rows = have_rows if rows <= have_rows else max(rows, 2 * have_rows)
        capacity = have_capacity if capacity <= have_capacity else max(capacity, 2 * have_capacity)
        used = len(self.sizes)
        for layer, (k, v) in self.storage.items():
            shape = (rows, k.shape[1], capacity, k.shape[3])
            new_k, new_v = k.new_zeros(shape), v.new_zeros(shape)
            new_k[:used, :, :have_capacity], new_v[:used, :, :have_capacity] = k[:used], v[:used]
            self.storage[layer] = (new_k, new_v)
        mask = self.mask.new_zeros((rows, capacity))
        mask[:used, :have_capacity] = self.mask[:used]
        self.mask = mask

    def _refresh(self) -> None:
        """The views decode steps read: the batch's rows, up to the longest row's keys."""
        b, n = len(self.sizes), max(self.sizes, default=0)
        self.kv = {layer: (k[:b, :, :n], v[:b, :, :n]) for layer, (k, v) in self.storage.items()}
        self.key_mask = self.mask[:b, :n]
        self.has_media = torch.tensor(self.media_rows, dtype=torch.bool, device=self.mask.device)
        self._on: dict[torch.device, BatchedVisualMemory] = {}

    def on(self, device: torch.device) -> BatchedVisualMemory:
        """The memory for a split model's stage on `device`: the key mask and media rows copied there once per
        change of rows (the layers' K/V already live on their own devices)."""
        if device == self.mask.device:
            return self
        if device not in self._on:
            view = copy.copy(self)
            view.key_mask, view.has_media = self.key_mask.to(device), self.has_media.to(device)
            self._on[device] = view
        return self._on[device]


class HyperAttention(Qwen2Attention):
    """Qwen2 attention plus the hyper-attention path to the visual memory (variant from config)."""

    def __init__(self, cfg: Owl3Config, layer_index: int) -> None:
        c = cfg.llm
        super().__init__(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, layer_index)
        self.variant = cfg.attention
        self.strict = cfg.strict_visibility
        self.v_kv_proj = Linear(c.hidden_size, 2 * c.num_key_value_heads * self.head_dim)
        if self.variant == "dynamic_gate":
            # owlvid's Linear (same keys) so that an unmerged LoRA adapter can reach it through `adapters`
            self.gate_proj = nn.Sequential(Linear(self.head_dim, self.head_dim), nn.Sigmoid())
        elif self.variant == "static_gate":
            self.gate = nn.Parameter(torch.zeros(c.hidden_size))

    def visual_kv(self, normed_embeds: torch.Tensor, positions: torch.Tensor, rope: RotaryTable,
                  adapters: object | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """normed_embeds [N, P, hidden] -> K, V [1, Hkv, N*P, D]; K rotated (MI-RoPE, float32) with one
        position per media item."""
        n, p, _ = normed_embeds.shape
        kv = self.v_kv_proj(normed_embeds.flatten(0, 1)[None], adapters).view(n * p, self.kv_heads, 2, self.head_dim)
        k, v = kv[:, :, 0].transpose(0, 1), kv[:, :, 1].transpose(0, 1)  # [Hkv, N*P, D]
        pos = positions.repeat_interleave(p)
        cos, sin = rope.table(pos)
        k = apply_rope(k.float(), cos.to(k.device), sin.to(k.device)).to(v.dtype)
        return k[None].contiguous(), v[None].contiguous()

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        memory = inputs.visual
        if memory is None or self.layer_index not in memory.kv:
            return super().forward(x, inputs)
        if isinstance(memory, BatchedVisualMemory):
            return self._batched_decode(x, inputs, memory)
        q, k, v = self.project(x, inputs)
        vis_k, vis_v = memory.kv[self.layer_index]
        p = memory.tokens_per_item
        # Media starts are in text order and visibility is monotone in the position, so each query row
        # sees a prefix of the visual memory: rows are grouped by that prefix and attend to it without a
        # [T, N*P] mask (which SDPA would expand per head into gigabytes for long videos).
        segments = memory.segments(inputs.positions, self.strict)  # batch 1
        if self.variant == "fused":
            text_mask = inputs.causal_mask
            if text_mask is None:
                text_mask = causal_mask(q.shape[2], k.shape[2], q.device)
            text_mask = text_mask.reshape(q.shape[2], -1)
            pieces = []
            for lo, hi, items in segments:
                vk, vv = vis_k[:, :, : items * p], vis_v[:, :, : items * p]
                if hi - lo <= _PARTS_MAX_ROWS:  # decoding: no per-token copy of the visual memory
                    pieces.append(sdpa_parts(q[:, :, lo:hi], [(vk, vv, None), (k, v, text_mask[lo:hi])]))
                    continue
                keys, values = torch.cat([vk, k], dim=2), torch.cat([vv, v], dim=2)
                for a in range(lo, hi, _PREFILL_ROWS):  # bounded masks for long prompts
                    b = min(hi, a + _PREFILL_ROWS)
                    seen = text_mask.new_ones(b - a, items * p)
                    pieces.append(sdpa(q[:, :, a:b], keys, values, torch.cat([seen, text_mask[a:b]], dim=-1)))
            ctx = torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]
            return self.o_proj(merge_heads(ctx), inputs.adapters)
        ctx = self.self_attention(q, k, v, inputs)
        # Tokens before the first media item get no cross-attention and no gate.
        pieces = [(lo, sdpa(q[:, :, lo:hi], vis_k[:, :, : items * p], vis_v[:, :, : items * p]))
                  for lo, hi, items in segments if items > 0]
        if pieces:
            first = pieces[0][0]
            v_ctx = torch.cat([piece for _, piece in pieces], dim=2) if len(pieces) > 1 else pieces[0][1]
            tail = ctx[:, :, first:]
            g = self._gate(tail, inputs.adapters)
            ctx = torch.cat([ctx[:, :, :first], tail * (1 - g) + v_ctx * g], dim=2)
        return self.o_proj(merge_heads(ctx), inputs.adapters)

    def _gate(self, ctx: torch.Tensor, adapters: object | None = None) -> torch.Tensor:
        if self.variant == "dynamic_gate":
            return self.gate_proj[1](self.gate_proj[0](ctx, adapters))
        return torch.sigmoid(self.gate).view(1, self.heads, 1, self.head_dim)

    def _batched_decode(self, x: torch.Tensor, inputs: AttentionInputs, memory: BatchedVisualMemory
                        ) -> torch.Tensor:
        """One new token per row; every row sees all of its own media (none of the padding)."""
        q, k, v = self.project(x, inputs)
        vis_k, vis_v = memory.kv[self.layer_index]
        vis_mask = memory.key_mask[:, None, None, :]
        if self.variant == "fused":
            ctx = sdpa_parts(q, [(vis_k, vis_v, vis_mask), (k, v, inputs.causal_mask)])
            return self.o_proj(merge_heads(ctx), inputs.adapters)
        ctx = self.self_attention(q, k, v, inputs)
        with_media = memory.has_media[:, None, None, None]
        v_ctx = sdpa(q, vis_k, vis_v, vis_mask | ~with_media)  # rows without media: ignored below
        g = self._gate(ctx, inputs.adapters)
        ctx = torch.where(with_media, ctx * (1 - g) + v_ctx * g, ctx)
        return self.o_proj(merge_heads(ctx), inputs.adapters)
