"""Slow-Fast vision side: the ConvNeXt tower, the projector, and the fast/slow token split.

  * ConvNeXt tower (timm module layout, so checkpoint keys map 1:1): only the last stage output is used
    (stride 32, no final norm, no head): [B, (S/32)^2, C_last] tokens in row-major order;
  * `mlp2x_gelu` projector, then a 2x2 average pool per frame when T > 1 (`pool_frames`);
  * fast tokens (temporally sampled/pooled, `split_fast_tokens`) replace the `<image>` placeholder in the
    LLM sequence; slow tokens (every pooled token of every frame) feed the hybrid layers' cross-attention.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConvNextConfig, SlowFastConfig

# ----------------------------------------------------------------------------------------------- tower


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (permute to channels-last and back, as timm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ConvNextBlock(nn.Module):
    """7x7 depthwise conv -> channels-last LayerNorm -> MLP (4x, exact GELU) -> layer scale -> residual.
    The layer scale is stored as `weight` on the block (timm's `gamma`, renamed by the official loader)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, 4 * dim)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_dw(x).permute(0, 2, 3, 1)
        y = self.mlp(self.norm(y)).permute(0, 3, 1, 2)
        return x + y.mul(self.weight.reshape(1, -1, 1, 1))


class ConvNextStage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, eps: float, downsample: bool) -> None:
        super().__init__()
        if downsample:
            self.downsample = nn.Sequential(LayerNorm2d(in_dim, eps=eps), nn.Conv2d(in_dim, dim, 2, stride=2))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*(ConvNextBlock(dim, eps) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ConvNeXt(nn.Module):
    """Stem (4x4/4 conv + LayerNorm2d) and four stages; `forward` returns the last stage as tokens."""

    def __init__(self, cfg: ConvNextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dims = cfg.dims
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=cfg.norm_eps))
        self.stages = nn.Sequential(*(
            ConvNextStage(dims[max(i - 1, 0)], dims[i], cfg.depths[i], cfg.norm_eps, downsample=i > 0)
            for i in range(len(dims))))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, (S/32)^2, C_last]."""
        x = self.stages(self.stem(pixels))
        return x.flatten(2).transpose(1, 2)


# ----------------------------------------------------------------------------------------------- projector


def build_projector(kind: str, d_in: int, d_out: int) -> nn.Module:
    """`linear` or `mlp{N}x_gelu` (N linears with GELU between), as the official `build_vision_projector`."""
    if kind == "linear":
        return nn.Linear(d_in, d_out)
    depth = int(re.fullmatch(r"mlp(\d+)x_gelu", kind).group(1))
    modules: list[nn.Module] = [nn.Linear(d_in, d_out)]
    for _ in range(1, depth):
        modules += [nn.GELU(), nn.Linear(d_out, d_out)]
    return nn.Sequential(*modules)


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
