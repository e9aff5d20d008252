"""ConvNeXt vision tower of the Slow-Fast MLLM (timm module layout, so checkpoint keys map 1:1).

The official tower is ConvNeXt-XXLarge (`convnext_xxlarge.clip_laion2b_soup`) at 576 px: depths
(3, 4, 30, 3), widths (384, 768, 1536, 3072), LayerNorm eps 1e-5. Only the last stage output is used
(stride 32, no final norm, no head): [B, (S/32)^2, C_last] tokens in row-major order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

CONVNEXT_XXL_DEPTHS = (3, 4, 30, 3)
CONVNEXT_XXL_DIMS = (384, 768, 1536, 3072)


@dataclass
class ConvNextConfig:
    depths: tuple[int, ...] = CONVNEXT_XXL_DEPTHS
    dims: tuple[int, ...] = CONVNEXT_XXL_DIMS
    norm_eps: float = 1e-5
    image_size: int = 576

    @property
    def hidden_size(self) -> int:
        return self.dims[-1]

    @property
    def grid(self) -> int:
        """Side of the last feature map: stem stride 4, then three 2x downsamples."""
        return self.image_size // 32

    @property
    def tokens_per_image(self) -> int:
        return self.grid * self.grid


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
