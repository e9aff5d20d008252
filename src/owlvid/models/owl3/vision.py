"""mPLUG-Owl3 vision tower: SigLIP up to its penultimate layer (patch embeddings and encoder layers).

The layers avoid passes over memory that add nothing to the GEMMs (the tower is ~90% GEMM FLOPs): the
residual stream is updated in place (`x += b; x += a @ W.T` with one accumulating GEMM, instead of a
bias copy into a new buffer, the GEMM and a residual add into a third), GELU runs in place, and the MLP
runs over blocks of MLP_BLOCK_ROWS token rows so its [rows, 4304] intermediate stays in the last-level
cache whatever the number of crops. Quantized (tensor-subclass) weights take the plain module calls.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from ...checkpoint import cpu_has_fast_bf16
from ...layers import gelu_tanh, merge_heads
from .config import SiglipConfig

# Token rows per MLP block: the fp32 [rows, 4304] intermediate is 17.6 MB, reused from one block to the next
# (never a fresh, page-faulting allocation; see CPU_VISION_CHUNK_BYTES in model.py) and within a 32 MB L3
# (2-core EPYC, fp32, 16 crops: 112 -> 130-144 GFLOP/s per layer with blocks of 1024-2048 rows).
MLP_BLOCK_ROWS = 1024


# Heads per block of attention scores: one crop's 16 heads ([16, 729, 729] bf16, 17 MB, allocated once per
# call). One thread ran 4, 8 and 16 heads alike (189 / 193 / 202 ms for 9 crops); two threads sharing the
# cores with other work ran fewer, larger calls better (attention 0.68 s with 16 heads vs 1.8 s with 4).
ATTENTION_HEAD_BLOCK = 16


@functools.cache
def _bf16_cpu_kernels() -> bool:
    return torch.backends.mkldnn.is_available() and cpu_has_fast_bf16()


def bf16_kernels_apply(x: torch.Tensor) -> bool:
    """bfloat16 on a CPU with AVX512-BF16/AMX, unless OWLVID_VISION_BF16_KERNELS=0: attention as GEMM +
    softmax + GEMM (blocked_attention) and the MLP's GELU in the oneDNN GEMM's epilogue; without autograd
    (their out= and oneDNN calls have no backward). In float32 the flash kernel wins (59-65 vs 20-36
    GFLOP/s, one thread); on a GPU SDPA has fused kernels."""
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and not torch.is_grad_enabled()
            and _bf16_cpu_kernels() and os.environ.get("OWLVID_VISION_BF16_KERNELS", "1") != "0")


# Measured per layer, 9 crops, as a share of the same-run bf16 2048^3 matmul rate (2-core EPYC with
# AVX512-BF16, CPU time of one thread, ~200 GFLOP/s): SDPA + separate GELU 78-80%, blocked attention 86-87%,
# + GELU in the epilogue 89-92%; two threads (wall clock, best of 5 interleaved, 1 / 8 / 9 crops): SDPA
# 72 / 72 / 76%, these kernels 85 / 83 / 84% (benchmarks/vision.py: the whole tower). The CPU flash kernel
# runs at 32% of the matmul rate at head_dim 72 (9 crops x 16 heads: 331-342 ms), the blocked GEMMs +
# softmax at 53-57% (189-202 ms; the softmax is a third of it).
# Tried and dropped, torch.compile (inductor) of the layer:
#   * layer tensors as graph inputs (one graph for all layers and, over [B*T, D] rows, every batch size; FX
#     graph cache on disk): same speed as eager (1 thread: 159-161 vs 158-159 GFLOP/s with SDPA, 164-180
#     vs 171-180 with blocked attention; 2 threads: 144-154 vs 149-156 with SDPA, 109-111 vs 169 with blocked
#     attention as an opaque custom op), for a 47 s compile on first use (8.6 s in a second process);
#   * `freezing` (weights as constants: prepacked oneDNN linears with GELU and residual epilogues) ran one
#     layer at 188-197 GFLOP/s vs eager 169-173 (1 thread), but compiles every layer apart; the eager GELU
#     epilogue above takes most of that gain without compiling.


def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Softmax attention over [B, T, H*Dh] projections -> [B, T, H*Dh]: q/k/v copied head-major once (the
    batched GEMMs take a slow path on head-strided inputs), then per crop ATTENTION_HEAD_BLOCK heads at a
    time: scaled scores (the scale in the GEMM's alpha), softmax in place (float accumulation), GEMM with V."""
    b, t, d = q.shape
    dh = d // heads
    hb = min(heads, ATTENTION_HEAD_BLOCK)
    qh, kh, vh = (x.view(b, t, heads, dh).transpose(1, 2).contiguous() for x in (q, k, v))
    out = torch.empty_like(q)
    scores = q.new_empty(hb, t, t)
    for i in range(b):
        oh = out[i].view(t, heads, dh).transpose(0, 1)
        for h in range(0, heads, hb):
            n = min(hb, heads - h)
            s = torch.baddbmm(scores[:n], qh[i, h:h + n], kh[i, h:h + n].transpose(1, 2), beta=0,
                              alpha=dh ** -0.5, out=scores[:n])
            torch.ops.aten._softmax.out(s, -1, False, out=s)
            oh[h:h + n] = torch.bmm(s, vh[i, h:h + n])
    return out


def _plain(linear: nn.Linear) -> bool:
    """A dense weight (not a quantized tensor subclass): the in-place fast paths apply."""
    return type(linear.weight.data) is torch.Tensor


def _add_linear_(out: torch.Tensor, x: torch.Tensor, linear: nn.Linear) -> None:
    """out += linear(x), for 2-D `out` and `x`, in place."""
    if _plain(linear):
        out.add_(linear.bias).addmm_(x, linear.weight.t())
    else:
        out.add_(linear(x))


class SiglipAttention(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.attend(x))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """Attention before the output projection: [B, T, D] -> [B, T, D]."""
        b, t, d = x.shape
        if bf16_kernels_apply(x):
            return blocked_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads)
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        # CPU flash SDPA (head_dim 72) beats the math path and matmul+softmax 2-3x here (fp32, 1 thread:
        # 59-65 vs 20-36 GFLOP/s); its output is [B, T, H, D] in memory, so merge_heads copies nothing.
        return merge_heads(F.scaled_dot_product_attention(q, k, v))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_tanh(self.fc1(x)))

    def add_(self, out: torch.Tensor, x: torch.Tensor) -> None:
        """out += mlp(x) for 2-D `out` and `x`, MLP_BLOCK_ROWS rows at a time (see the module docstring)."""
        if not (_plain(self.fc1) and _plain(self.fc2)):
            out.add_(self(x))
            return
        out.add_(self.fc2.bias)
        fused = bf16_kernels_apply(x)
        for start in range(0, x.shape[0], MLP_BLOCK_ROWS):
            if fused:  # GELU in the GEMM's epilogue: no pass of its own over the intermediate
                h = torch.ops.mkldnn._linear_pointwise(x[start:start + MLP_BLOCK_ROWS], self.fc1.weight,
                                                       self.fc1.bias, "gelu", [], "tanh")
            else:
                h = self.fc1(x[start:start + MLP_BLOCK_ROWS])
                torch.ops.aten.gelu_(h, approximate="tanh")
            out[start:start + MLP_BLOCK_ROWS].addmm_(h, self.fc2.weight.t())


class SiglipLayer(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            x = x + self.self_attn(self.layer_norm1(x))
            return x + self.mlp(self.layer_norm2(x))
        return self.forward_(x.clone(memory_format=torch.contiguous_format))

    def forward_(self, x: torch.Tensor) -> torch.Tensor:
        """The layer without autograd, updating the contiguous [B, T, D] `x` in place (returned)."""
        rows = x.view(-1, x.shape[-1])
        _add_linear_(rows, self.self_attn.attend(self.layer_norm1(x)).view(rows.shape), self.self_attn.out_proj)
        self.mlp.add_(rows, self.layer_norm2(rows))
        return x


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # 384 = 27 * 14 + 6: the stride-14 conv ignores the last 6 rows/columns, as the official model.
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        # Contiguous [B, T, D] (the sum would keep the conv's [B, D, T] layout, and every LayerNorm and
        # linear after it would copy it).
        if torch.is_grad_enabled():
            return (x + self.position_embedding.weight).contiguous()
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        return torch.add(x, self.position_embedding.weight, out=out)


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
            # The embeddings' output is ours: the layers update it in place when there is no autograd.
            x = layer(x) if torch.is_grad_enabled() else layer.forward_(x)
        return x
