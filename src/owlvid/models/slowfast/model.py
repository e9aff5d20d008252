"""Slow-Fast video MLLM (SHI-Labs): config, projector, fast/slow token split, hybrid decoder layers.

Structure (see docs/slowfast_usage.md and the shared design notes):
  * ConvNeXt tower (last stage) -> `mlp2x_gelu` projector -> 2x2 average pool per frame when T > 1;
  * fast tokens (temporally sampled/pooled) replace the `<image>` placeholder in the LLM sequence;
  * slow tokens (every pooled token of every frame) are read by a gated cross-attention in the hybrid
    layers (0, 8, 16, 24 for the 7B models). Only prompt text tokens query them, with their post-RoPE
    self-attention queries; keys/values are `cross_attn_kv_proj(input_layernorm(slow))` laid out
    per KV head as (K, V), without positions. The result is added before `o_proj`, scaled by
    `tanh(cross_attn_gate_proj(A)) * tanh(cross_attn_warm_up_gate)`.
Slow-token K/V are computed once per request (`SlowMemory`) and dropped after the prefill: decode steps
get no cross-attention in the official semantics, so they never need them.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import CheckpointError, UnsupportedError
from ...layers import (
    AttentionInputs,
    Qwen2Attention,
    Qwen2Config,
    Qwen2Decoder,
    RotaryTable,
    linear,
    merge_heads,
    sdpa,
)
from .convnext import ConvNeXt, ConvNextConfig

IMAGE_TOKEN_INDEX = -200
SUPPORTED_TOWERS = {"convnext-576": 576}
SUPPORTED_CROSS_ATTN = "text-only-vanilla"  # "text-only-vanilla-flashattn" in the released configs
SUPPORTED_GATING = "whole-dynamic-tanh-warmup"

log = logging.getLogger("owlvid.models.slowfast")

# ----------------------------------------------------------------------------------------------- config


@dataclass
class SlowFastConfig:
    llm: Qwen2Config  # vocab_size = embedding rows stored in the checkpoint
    vision: ConvNextConfig
    projector: str  # "linear" or "mlp{N}x_gelu"
    hybrid_layers: list[int]
    video_pooling_stride: int = 2
    fast_temporal_sampling_stride: int = 1
    fast_temporal_stride: int = 4
    fast_spatial_stride: int = 1
    min_fast_frames: int = 16
    model_max_length: int | None = 4096  # `tokenizer_model_max_length`: official truncation after splicing
    training_frames: int = 64  # `mm_training_video_frames`
    vision_batch_size: int = 8
    raw: dict = field(default_factory=dict)

    @property
    def mm_hidden_size(self) -> int:
        return self.vision.hidden_size


def _int(raw: dict, key: str, default: int) -> int:
    value = raw.get(key)
    return default if value is None else int(value)


def slowfast_config(raw: dict, shapes: dict[str, tuple[int, ...]]) -> SlowFastConfig:
    """Read config.json (official schema plus the owlvid `convnext_config` extension) and check it
    against the checkpoint keys."""
    try:
        # LlavaQwenSlowFastForCausalLM.__init__ forces rope_scaling to None: whatever the file says is unused.
        llm = Qwen2Config.from_dict({**raw, "rope_scaling": None})
    except TypeError as e:
        raise CheckpointError(f"config.json is not a Slow-Fast (Qwen2) config: {e}") from None
    rows = shapes.get("model.embed_tokens.weight")
    if rows is None:
        raise CheckpointError("checkpoint has no 'model.embed_tokens.weight': not a Slow-Fast checkpoint")
    llm.vocab_size = rows[0]
    if "lm_head.weight" not in shapes:
        llm.tie_word_embeddings = True
    elif llm.tie_word_embeddings:
        log.warning("config.json ties the output layer to the embeddings (tie_word_embeddings true): the "
                    "checkpoint's lm_head.weight is ignored")
    # checkpoint_key_map skips image_newline and vision_resampler.*: only right for these two settings.
    merge = raw.get("mm_patch_merge_type") or "flat"
    if merge != "flat":
        raise UnsupportedError(f"unsupported mm_patch_merge_type {merge!r} (owlvid implements 'flat', the "
                               "released models' choice)")
    resampler = raw.get("mm_resampler_type")
    if resampler not in (None, "identity"):
        raise UnsupportedError(f"unsupported mm_resampler_type {resampler!r} (owlvid implements none)")

    tower = raw.get("mm_vision_tower")
    if tower not in SUPPORTED_TOWERS:
        raise CheckpointError(f"unsupported vision tower {tower!r} (owlvid supports "
                              f"{sorted(SUPPORTED_TOWERS)})")
    vision = ConvNextConfig(image_size=SUPPORTED_TOWERS[tower])
    override = raw.get("convnext_config")
    if override:  # owlvid extension for tiny test checkpoints; real checkpoints hard-code ConvNeXt-XXL
        vision = ConvNextConfig(depths=tuple(override.get("depths", vision.depths)),
                                dims=tuple(override.get("dims", vision.dims)),
                                norm_eps=float(override.get("norm_eps", vision.norm_eps)),
                                image_size=vision.image_size)
    if len(vision.depths) != 4 or len(vision.dims) != 4:
        raise CheckpointError("convnext_config needs four stage depths and four widths")
    mm_hidden = raw.get("mm_hidden_size")
    if mm_hidden is not None and int(mm_hidden) != vision.hidden_size:
        raise CheckpointError(f"mm_hidden_size {mm_hidden} does not match the ConvNeXt width "
                              f"{vision.hidden_size}")

    projector = raw.get("mm_projector_type", "linear")
    if projector != "linear" and not re.fullmatch(r"mlp(\d+)x_gelu", projector):
        raise CheckpointError(f"unsupported mm_projector_type {projector!r} (linear or mlpNx_gelu)")

    impl = raw.get("cross_attn_implementation") or ""
    if not impl.startswith(SUPPORTED_CROSS_ATTN) or "masksystem" in impl:
        raise CheckpointError(f"unsupported cross_attn_implementation {impl!r} (owlvid implements "
                              "'text-only-vanilla[-flashattn]', the released models' choice)")
    gating = raw.get("cross_attn_gating_type")
    if gating != SUPPORTED_GATING:
        raise CheckpointError(f"unsupported cross_attn_gating_type {gating!r} (owlvid implements "
                              f"{SUPPORTED_GATING!r})")
    every = raw.get("cross_attn_every_n_layers")
    if not every:
        raise CheckpointError("config.json has no cross_attn_every_n_layers: not a Slow-Fast checkpoint")
    lo = _int(raw, "cross_attn_min_layer_depth", 0)
    hi = _int(raw, "cross_attn_max_layer_depth", llm.num_hidden_layers)
    hybrid = list(range(lo, hi, int(every)))
    for i in hybrid:
        key = f"model.layers.{i}.self_attn.cross_attn_kv_proj.weight"
        if key not in shapes:
            raise CheckpointError(f"hybrid layer {i} of config.json has no {key!r} in the checkpoint")

    max_len = raw.get("tokenizer_model_max_length")
    return SlowFastConfig(
        llm=llm, vision=vision, projector=projector, hybrid_layers=hybrid,
        video_pooling_stride=_int(raw, "mm_video_pooling_stride", 1),
        fast_temporal_sampling_stride=_int(raw, "fast_token_temporal_sampling_stride", 1),
        fast_temporal_stride=_int(raw, "fast_token_temporal_stride", 1),
        fast_spatial_stride=_int(raw, "fast_token_spatial_stride", 1),
        min_fast_frames=_int(raw, "min_fast_frames", 1),
        model_max_length=None if max_len is None else int(max_len),
        training_frames=_int(raw, "mm_training_video_frames", 64),
        vision_batch_size=_int(raw, "vision_batch_size", 8),
        raw=raw,
    )


# ----------------------------------------------------------------------------------------------- tokens


def sample_fast_frames(total: int, stride: int, min_frames: int) -> list[int]:
    """Frame indices of the fast path when the temporal sampling stride is > 1 (official rule)."""
    if total < min_frames:
        return list(range(total))
    count = max(total // stride, min_frames)
    step = total / count
    return [min(int(i * step), total - 1) for i in range(count)]


@dataclass(frozen=True)
class FastPlan:
    """How the fast tokens of a clip of T frames are formed."""

    frames: list[int]  # temporal sampling
    temporal: str  # "none" | "avg" (non-overlapping groups, floor) | "adaptive"
    out_frames: int
    spatial_stride: int

    def tokens(self, side: int) -> int:
        s = side // self.spatial_stride if self.spatial_stride > 1 else side
        return self.out_frames * s * s


def fast_plan(num_frames: int, cfg: SlowFastConfig) -> FastPlan:
    """The official `split_slow_fast_tokens` rules. T == 1 (an image): no temporal operation.
    (The official zero-padding of T to a multiple of s*t is dropped again by the frame selection.)"""
    p = max(cfg.fast_spatial_stride, 1)
    if num_frames == 1:
        return FastPlan([0], "none", 1, p)
    s, t, m = cfg.fast_temporal_sampling_stride, cfg.fast_temporal_stride, cfg.min_fast_frames
    frames = sample_fast_frames(num_frames, s, m) if s > 1 else list(range(num_frames))
    k = len(frames)
    if t <= 1:
        return FastPlan(frames, "none", k, p)
    if k // t >= m:
        return FastPlan(frames, "avg", k // t, p)
    return FastPlan(frames, "adaptive", min(k, m), p)


def pool_frames(features: torch.Tensor, stride: int) -> torch.Tensor:
    """[T, n, C] -> [T, (sqrt(n)/stride)^2, C]: per-frame 2-D average pooling (floor mode)."""
    t, n, c = features.shape
    side = math.isqrt(n)
    x = features.reshape(t, side, side, c).permute(0, 3, 1, 2)
    x = F.avg_pool2d(x, kernel_size=stride, stride=stride)
    return x.flatten(2).transpose(1, 2)


def split_fast_tokens(features: torch.Tensor, cfg: SlowFastConfig) -> torch.Tensor:
    """Fast tokens [F * n', C] (frame, row, column order) from the per-frame features [T, n, C]."""
    t, n, c = features.shape
    plan = fast_plan(t, cfg)
    side = math.isqrt(n)
    x = features[plan.frames] if plan.frames != list(range(t)) else features
    x = x.reshape(len(plan.frames), side, side, c).permute(3, 0, 1, 2)  # [C, K, h, w]
    if plan.temporal == "avg":
        stride = cfg.fast_temporal_stride
        # The CPU avg_pool3d kernel has no bf16/fp16 version: pool in float32 (a no-op for float32 inputs).
        x = F.avg_pool3d(x[None].float(), kernel_size=(stride, 1, 1))[0].to(features.dtype)
    elif plan.temporal == "adaptive":
        x = F.adaptive_avg_pool3d(x[None], (plan.out_frames, side, side))[0]
    x = x.permute(1, 0, 2, 3)  # [F, C, h, w]
    if plan.spatial_stride > 1:
        x = F.avg_pool2d(x, kernel_size=plan.spatial_stride, stride=plan.spatial_stride)
    return x.flatten(2).transpose(1, 2).reshape(-1, c)


def tokens_per_frame(num_frames: int, cfg: SlowFastConfig) -> int:
    """Visual tokens per frame after the projector (pooled when T > 1)."""
    side = cfg.vision.grid
    if num_frames > 1 and cfg.video_pooling_stride > 1:
        side //= cfg.video_pooling_stride
    return side * side


def token_counts(num_frames: int, cfg: SlowFastConfig) -> tuple[int, int]:
    """(fast tokens in the sequence, slow tokens for the cross-attention) for a clip of T frames."""
    n = tokens_per_frame(num_frames, cfg)
    return fast_plan(num_frames, cfg).tokens(math.isqrt(n)), num_frames * n


# ----------------------------------------------------------------------------------------------- LLM


@dataclass
class SlowMemory:
    """Per-request slow path of one prefill: which rows of the forward call query (the prompt text
    tokens) and, per hybrid layer, the slow-token keys/values [1, Hkv, N, D] computed once."""

    query_rows: torch.Tensor  # [n_text] long indices into the tokens of the forward call
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]


class HybridAttention(Qwen2Attention):
    """Qwen2 self-attention plus the gated text-to-slow-token cross-attention of the hybrid layers."""

    def __init__(self, cfg: Qwen2Config, layer_index: int) -> None:
        super().__init__(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, layer_index)
        self.cross_attn_kv_proj = nn.Linear(cfg.hidden_size, 2 * self.kv_heads * self.head_dim)
        self.cross_attn_gate_proj = nn.Sequential(nn.Linear(cfg.hidden_size, 1), nn.Tanh())
        self.cross_attn_warm_up_gate = nn.Parameter(torch.zeros(1))
        self.slow_kv_calls = 0  # the tests check that slow K/V are built once per request

    def slow_kv(self, normed_slow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """normed_slow [N, hidden] -> K, V [1, Hkv, N, D]; the projection is head-major (K then V per
        KV head), as the official einops split `(H KV D)`. Keys get no positions."""
        self.slow_kv_calls += 1
        n = normed_slow.shape[0]
        kv = self.cross_attn_kv_proj(normed_slow).view(n, self.kv_heads, 2, self.head_dim)
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
        gate = self.cross_attn_gate_proj(text) * torch.tanh(self.cross_attn_warm_up_gate)
        ctx = ctx.index_copy(1, rows, text + cross * gate)
        return self.o_proj(ctx)


def build_projector(kind: str, d_in: int, d_out: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(d_in, d_out)
    depth = int(re.fullmatch(r"mlp(\d+)x_gelu", kind).group(1))
    modules: list[nn.Module] = [nn.Linear(d_in, d_out)]
    for _ in range(1, depth):
        modules += [nn.GELU(), nn.Linear(d_out, d_out)]
    return nn.Sequential(*modules)


class SlowFast(nn.Module):
    """The whole network; module names follow the official keys minus the `model.` prefixes."""

    def __init__(self, cfg: SlowFastConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.llm
        self.llm = Qwen2Decoder(c, cfg.hybrid_layers, lambda i: HybridAttention(c, i))
        if not c.tie_word_embeddings:
            self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.vision_tower = ConvNeXt(cfg.vision)
        self.mm_projector = build_projector(cfg.projector, cfg.mm_hidden_size, c.hidden_size)
        self.rope: RotaryTable | None = None  # built after the weights are on their device
        self.vocab_used = c.vocab_size  # rows actually used (len(tokenizer)), see truncate_vocab

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
        emb.weight = nn.Parameter(emb.weight.detach()[:n], requires_grad=False)
        emb.num_embeddings = n
        if not self.cfg.llm.tie_word_embeddings:
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
        device, dtype = self._param.device, self._param.dtype
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
    def slow_memory(self, slow: torch.Tensor, query_rows: torch.Tensor) -> SlowMemory:
        """Slow-token K/V of every hybrid layer, normalised with that layer's own input RMSNorm; once
        per request."""
        kv = {}
        for layer in self.llm.layers:
            attn = layer.self_attn
            if isinstance(attn, HybridAttention):
                kv[attn.layer_index] = attn.slow_kv(layer.input_layernorm(slow))
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
