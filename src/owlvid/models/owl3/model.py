"""mPLUG-Owl3: config, SigLIP vision tower, projector, Qwen2 with hyper-attention layers, weight map.

Three hyper-attention variants exist across the releases and are told apart by the checkpoint keys:
  * ``dynamic_gate`` (7B-240728): causal self-attention, separate masked cross-attention to the visual
    tokens, mixed per head by ``sigmoid(gate_proj(ctx))``;
  * ``static_gate`` (1B/2B-241014): the same with a learned vector ``sigmoid(gate)``;
  * ``fused`` (7B/2B-241101): one softmax over [visual keys ; text keys], no gate.
Visual keys/values of every hyper layer are computed once per request (``VisualMemory``) and reused at
every decoding step; the official code recomputes them each step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import CheckpointError
from ...layers import (
    AttentionInputs,
    Qwen2Attention,
    Qwen2Config,
    Qwen2Decoder,
    RotaryTable,
    apply_rope,
    causal_mask,
    gelu_tanh,
    linear,
    merge_heads,
    sdpa,
    sdpa_parts,
)

log = logging.getLogger("owlvid.models.owl3")

# ----------------------------------------------------------------------------------------------- config


@dataclass
class SiglipConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_attention_heads: int = 16
    num_hidden_layers: int = 27
    image_size: int = 384
    patch_size: int = 14
    layer_norm_eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class Owl3Config:
    llm: Qwen2Config
    vision: SiglipConfig
    hyper_layers: list[int]  # 0-based (config.json stores them 1-based)
    attention: str  # "dynamic_gate" | "static_gate" | "fused"
    projector: str  # "linear" | "mlp"
    vision_batch_size: int = 16
    raw: dict = field(default_factory=dict)

    @property
    def release_family(self) -> str:
        return {"dynamic_gate": "240728", "static_gate": "241014", "fused": "241101"}[self.attention]

    @property
    def cut_prompt(self) -> str:
        """`v2_global` only for 240728 (untied dynamic-gate 7B); 241014 and 241101 use `v3_global`."""
        if self.attention == "dynamic_gate" and not self.llm.tie_word_embeddings:
            return "v2"
        return "v3"

    @property
    def media_offset_format(self) -> str:
        return "starts" if self.attention == "fused" else "rows"

    @property
    def strict_visibility(self) -> bool:
        """240728/241014: token i sees media j iff i > s_j (MI-RoPE at s_j + 1); 241101: i >= s_j (at s_j)."""
        return self.attention != "fused"


def owl3_config(raw: dict, shapes: dict[str, tuple[int, ...]]) -> Owl3Config:
    """Read config.json and pick the variant from the checkpoint keys (never from the name)."""
    try:
        llm = Qwen2Config.from_dict(raw)
        vc = raw["vision_config"]
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"config.json is not an mPLUG-Owl3 config (missing {e})") from None
    vision = SiglipConfig(**{k: vc[k] for k in SiglipConfig.__dataclass_fields__ if k in vc})
    hyper = sorted(i - 1 for i in raw.get("hyper_layers", [1, 9, 17, 25]))
    prefix = "language_model.model.layers"
    if any(k.endswith("self_attn.gate_proj.0.weight") for k in shapes):
        attention = "dynamic_gate"
    elif any(k.endswith("self_attn.gate") for k in shapes):
        attention = "static_gate"
    else:
        attention = "fused"
    for i in hyper:
        if f"{prefix}.{i}.self_attn.v_kv_proj.weight" not in shapes:
            raise CheckpointError(f"hyper layer {i + 1} of config.json has no '{prefix}.{i}.self_attn.v_kv_proj"
                                  ".weight' in the checkpoint")
    projector = "mlp" if "vision2text_model.0.weight" in shapes else "linear"
    if "language_model.lm_head.weight" not in shapes:
        llm.tie_word_embeddings = True
    elif llm.tie_word_embeddings:
        log.warning("config.json ties the output layer to the embeddings (tie_word_embeddings true): the "
                    "checkpoint's language_model.lm_head.weight is ignored")
    return Owl3Config(llm=llm, vision=vision, hyper_layers=hyper, attention=attention, projector=projector,
                      vision_batch_size=int(raw.get("vision_batch_size", 16)), raw=raw)


# ----------------------------------------------------------------------------------------------- vision


class SiglipAttention(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(merge_heads(F.scaled_dot_product_attention(q, k, v)))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_tanh(self.fc1(x)))


class SiglipLayer(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # 384 = 27 * 14 + 6: the stride-14 conv ignores the last 6 rows/columns, as the official model.
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        return x + self.position_embedding.weight


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: SiglipConfig, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SiglipLayer(cfg) for _ in range(num_layers))


class SiglipTower(nn.Module):
    """SigLIP up to the penultimate layer (the features mPLUG-Owl3 uses); the last layer,
    post-layernorm and pooling head of the checkpoint are never loaded."""

    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg, cfg.num_hidden_layers - 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels)
        for layer in self.encoder.layers:
            x = layer(x)
        return x


# ----------------------------------------------------------------------------------------------- LLM


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

    def segments(self, positions: torch.Tensor, strict: bool) -> list[tuple[int, int, int]]:
        """`visible_segments` of these positions; every hyper layer of one forward asks with the same
        positions tensor, so it is computed once per forward."""
        if self._segments is None or self._segments[0] is not positions or self._segments[1] != strict:
            self._segments = (positions, strict, visible_segments(self.visible(positions, strict)))
        return self._segments[2]


@dataclass
class BatchedVisualMemory:
    """Visual memories of a decoding batch, padded to the longest: K/V [B, Hkv, Nmax, D] per hyper layer,
    `key_mask` [B, Nmax] (False on padding) and `has_media` [B]. Decode steps see all media of their row."""

    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]
    key_mask: torch.Tensor
    has_media: torch.Tensor

    @classmethod
    def from_memories(cls, memories: list[VisualMemory | None], layers: list[int]) -> BatchedVisualMemory | None:
        present = [m for m in memories if m is not None]
        if not present:
            return None
        ref_k, _ = present[0].kv[layers[0]]
        sizes = [m.kv[layers[0]][0].shape[2] if m is not None else 0 for m in memories]
        n_max = max(sizes)
        kv = {}
        for layer in layers:
            shape = (len(memories), ref_k.shape[1], n_max, ref_k.shape[3])
            k, v = ref_k.new_zeros(shape), ref_k.new_zeros(shape)
            for b, m in enumerate(memories):
                if m is not None:
                    k[b, :, : sizes[b]], v[b, :, : sizes[b]] = m.kv[layer][0][0], m.kv[layer][1][0]
            kv[layer] = (k, v)
        sizes_t = torch.tensor(sizes, device=ref_k.device)
        key_mask = torch.arange(n_max, device=ref_k.device)[None, :] < sizes_t[:, None]
        return cls(kv=kv, key_mask=key_mask, has_media=sizes_t > 0)

    @staticmethod
    def concat(a: BatchedVisualMemory | None, rows_a: int, b: BatchedVisualMemory | None, rows_b: int
               ) -> BatchedVisualMemory | None:
        """Rows of `a` then rows of `b`; either may be None (rows without media)."""
        if a is None and b is None:
            return None
        ref = a if a is not None else b
        n_max = max(m.key_mask.shape[1] for m in (a, b) if m is not None)
        kv = {}
        for layer, (k_ref, _) in ref.kv.items():
            shape = (rows_a + rows_b, k_ref.shape[1], n_max, k_ref.shape[3])
            k, v = k_ref.new_zeros(shape), k_ref.new_zeros(shape)
            for m, lo, hi in ((a, 0, rows_a), (b, rows_a, rows_a + rows_b)):
                if m is not None:
                    n = m.key_mask.shape[1]
                    k[lo:hi, :, :n], v[lo:hi, :, :n] = m.kv[layer]
            kv[layer] = (k, v)
        mask = torch.zeros(rows_a + rows_b, n_max, dtype=torch.bool, device=ref.key_mask.device)
        for m, lo, hi in ((a, 0, rows_a), (b, rows_a, rows_a + rows_b)):
            if m is not None:
                mask[lo:hi, : m.key_mask.shape[1]] = m.key_mask
        return BatchedVisualMemory(kv=kv, key_mask=mask, has_media=mask.any(dim=1))

    def keep(self, rows: list[int]) -> BatchedVisualMemory | None:
        index = torch.tensor(rows, dtype=torch.long, device=self.key_mask.device)
        if not bool(self.has_media[index].any()):
            return None
        return BatchedVisualMemory({layer: (k[index], v[index]) for layer, (k, v) in self.kv.items()},
                                   self.key_mask[index], self.has_media[index])


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


class HyperAttention(Qwen2Attention):
    """Qwen2 attention plus the hyper-attention path to the visual memory (variant from config)."""

    def __init__(self, cfg: Owl3Config, layer_index: int) -> None:
        c = cfg.llm
        super().__init__(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, layer_index)
        self.variant = cfg.attention
        self.strict = cfg.strict_visibility
        self.v_kv_proj = nn.Linear(c.hidden_size, 2 * c.num_key_value_heads * self.head_dim)
        if self.variant == "dynamic_gate":
            self.gate_proj = nn.Sequential(nn.Linear(self.head_dim, self.head_dim), nn.Sigmoid())
        elif self.variant == "static_gate":
            self.gate = nn.Parameter(torch.zeros(c.hidden_size))
        self.visual_kv_calls = 0  # counted by the tests: visual K/V must be built once per request

    def visual_kv(self, normed_embeds: torch.Tensor, positions: torch.Tensor, rope: RotaryTable
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """normed_embeds [N, P, hidden] -> K, V [1, Hkv, N*P, D]; K rotated (MI-RoPE, float32) with one
        position per media item."""
        self.visual_kv_calls += 1
        n, p, _ = normed_embeds.shape
        kv = self.v_kv_proj(normed_embeds).view(n * p, self.kv_heads, 2, self.head_dim)
        k, v = kv[:, :, 0].transpose(0, 1), kv[:, :, 1].transpose(0, 1)  # [Hkv, N*P, D]
        pos = positions.repeat_interleave(p)
        cos, sin = rope.table(pos)
        k = apply_rope(k.float(), cos, sin).to(v.dtype)
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
            return self.o_proj(merge_heads(ctx))
        ctx = self.self_attention(q, k, v, inputs)
        # Tokens before the first media item get no cross-attention and no gate.
        pieces = [(lo, sdpa(q[:, :, lo:hi], vis_k[:, :, : items * p], vis_v[:, :, : items * p]))
                  for lo, hi, items in segments if items > 0]
        if pieces:
            first = pieces[0][0]
            v_ctx = torch.cat([piece for _, piece in pieces], dim=2) if len(pieces) > 1 else pieces[0][1]
            tail = ctx[:, :, first:]
            g = self._gate(tail)
            ctx = torch.cat([ctx[:, :, :first], tail * (1 - g) + v_ctx * g], dim=2)
        return self.o_proj(merge_heads(ctx))

    def _gate(self, ctx: torch.Tensor) -> torch.Tensor:
        if self.variant == "dynamic_gate":
            return self.gate_proj(ctx)
        return torch.sigmoid(self.gate).view(1, self.heads, 1, self.head_dim)

    def _batched_decode(self, x: torch.Tensor, inputs: AttentionInputs, memory: BatchedVisualMemory
                        ) -> torch.Tensor:
        """One new token per row; every row sees all of its own media (none of the padding)."""
        q, k, v = self.project(x, inputs)
        vis_k, vis_v = memory.kv[self.layer_index]
        vis_mask = memory.key_mask[:, None, None, :]
        if self.variant == "fused":
            ctx = sdpa_parts(q, [(vis_k, vis_v, vis_mask), (k, v, inputs.causal_mask)])
            return self.o_proj(merge_heads(ctx))
        ctx = self.self_attention(q, k, v, inputs)
        with_media = memory.has_media[:, None, None, None]
        v_ctx = sdpa(q, vis_k, vis_v, vis_mask | ~with_media)  # rows without media: ignored below
        g = self._gate(ctx)
        ctx = torch.where(with_media, ctx * (1 - g) + v_ctx * g, ctx)
        return self.o_proj(merge_heads(ctx))


class Owl3(nn.Module):
    """The whole mPLUG-Owl3 network. Module names are ours; `checkpoint_key_map` maps official keys."""

    def __init__(self, cfg: Owl3Config) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.llm
        self.llm = Qwen2Decoder(c, cfg.hyper_layers, lambda i: HyperAttention(cfg, i))
        if not c.tie_word_embeddings:
            self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
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
        device = self.llm.embed_tokens.weight.device
        out = []
        for chunk in pixel_values.split(max(1, self.cfg.vision_batch_size)):
            out.append(self.projector(self.vision(chunk.to(device=device, dtype=dtype))))
        return torch.cat(out)

    @torch.inference_mode()
    def visual_memory(self, image_embeds: torch.Tensor, starts: list[int]) -> VisualMemory:
        """Normalise the image embeddings with each hyper layer's own input RMSNorm and project them to
        that layer's visual K/V, once per request."""
        device = image_embeds.device
        starts_t = torch.tensor(starts, dtype=torch.long, device=device)
        rope_pos = starts_t + 1 if self.cfg.strict_visibility else starts_t
        kv = {}
        for layer in self.llm.layers:
            attn = layer.self_attn
            if isinstance(attn, HyperAttention):
                kv[attn.layer_index] = attn.visual_kv(layer.input_layernorm(image_embeds), rope_pos, self.rope)
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
