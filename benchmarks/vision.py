"""The mPLUG-Owl3 SigLIP tower (so400m, 384 px, 26 of 27 layers: the 1B/2B shape) in crops/s and as a share
of the bf16 2048^3 matmul rate measured in the same run, before/after the bf16 CPU kernels.

    PYTHONPATH=src python benchmarks/vision.py                       # crops 1,8,32, both paths, bf16
    PYTHONPATH=src python benchmarks/vision.py --layers 4 --profile  # quicker; where one chunk's time goes

Rows: `sdpa` = the eager layers with SDPA (CPU flash attention) and a separate GELU pass
(OWLVID_VISION_BF16_KERNELS=0); `bf16` = the default on AVX512-BF16/AMX CPUs (blocked GEMM + softmax
attention, GELU in the oneDNN GEMM epilogue). Crops go through the tower in the chunks Owl3.encode_images
uses (9 in bf16 on the CPU). The matmul reference is measured right before each row: on a shared machine
compare a row with its own reference. torch.compile (inductor) of the layer was tried and dropped: see
`bf16_kernels_apply` in owlvid/models/owl3/vision.py for its figures.

2-core AMD EPYC with AVX512-BF16 (no AMX), torch 2.13, 2 threads, 26 layers, a quiet moment of a shared VM:

| crops | sdpa crops/s | bf16 crops/s | sdpa % of matmul | bf16 % of matmul | same-run bf16 matmul |
|---|---|---|---|---|---|
| 1 | 0.439 | 0.518 | 73% | 84% | 388-394 GFLOP/s |
| 8 | 0.442 | 0.516 | 72% | 86% | 386-394 GFLOP/s |
| 32 | 0.473 | 0.517 | 76% | 83% | 398-402 GFLOP/s |
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

from owlvid.models.owl3.config import SiglipConfig
from owlvid.models.owl3.model import CPU_VISION_CHUNK_BYTES
from owlvid.models.owl3.vision import SiglipTower


def matmul_gflops(dtype: torch.dtype, n: int = 2048, seconds: float = 1.5) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while count == 0 or time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n ** 3 * count / (time.perf_counter() - start) / 1e9


def tower_flops_per_crop(cfg: SiglipConfig, layers: int) -> float:
    """Useful FLOPs: the GEMMs and the attention products (patch conv included), nothing elementwise."""
    p, d, m = cfg.num_patches, cfg.hidden_size, cfg.intermediate_size
    per_layer = 4 * 2 * p * d * d + 2 * 2 * p * p * d + 2 * 2 * p * d * m
    return layers * per_layer + 2 * p * 3 * cfg.patch_size ** 2 * d


def build(layers: int, dtype: torch.dtype) -> tuple[SiglipTower, SiglipConfig]:
    cfg = SiglipConfig(num_hidden_layers=layers + 1)
    with torch.device("meta"):
        tower = SiglipTower(cfg)
    tower = tower.to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(math.prod(p.shape[1:])))
            else:
                p.fill_(1.0 if "norm" in name else 0.01)
    return tower.to(dtype), cfg


def encode(tower: SiglipTower, pixels: torch.Tensor, chunk: int) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([tower(c) for c in pixels.split(chunk)])


def profile_chunk(tower: SiglipTower, pixels: torch.Tensor) -> None:
    from torch.profiler import ProfilerActivity, profile

    encode(tower, pixels, len(pixels))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        encode(tower, pixels, len(pixels))
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in rows)
    print(f"\n## where one {len(pixels)}-crop chunk's time goes ({os.environ.get('OWLVID_VISION_BF16_KERNELS')})")
    print("| op | ms | share |\n|---|---|---|")
    for e in rows[:10]:
        print(f"| {e.key} | {e.self_cpu_time_total / 1e3:.0f} | {100 * e.self_cpu_time_total / total:.1f}% |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=26, help="encoder layers (26 of SigLIP's 27 run)")
    ap.add_argument("--crops", default="1,8,32")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--modes", default="sdpa,bf16")
    ap.add_argument("--profile", action="store_true", help="also profile one chunk per mode")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    tower, cfg = build(args.layers, dtype)
    chunk = max(1, CPU_VISION_CHUNK_BYTES // (cfg.num_patches * cfg.hidden_size * dtype.itemsize))
    flops = tower_flops_per_crop(cfg, args.layers)
    print(f"SigLIP so400m/384, {args.layers} layers, {args.dtype}, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}, chunk {chunk}")
    rows, outs = [], {}
    for crops in [int(c) for c in args.crops.split(",")]:
        pixels = torch.randn(crops, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1))
        pixels = pixels.to(dtype)
        for mode in args.modes.split(","):
            os.environ["OWLVID_VISION_BF16_KERNELS"] = "0" if mode == "sdpa" else "1"
            encode(tower, pixels[:1], 1)  # warm up
            ref = matmul_gflops(dtype)
            start = time.perf_counter()
            outs[mode] = encode(tower, pixels, chunk).float()
            el = time.perf_counter() - start
            gflops = flops * crops / el / 1e9
            rows.append((crops, mode, crops / el, gflops, ref, 100 * gflops / ref))
            print(f"  {rows[-1]}", flush=True)
        if len(outs) == 2:
            diff = (outs["sdpa"] - outs["bf16"]).abs().max().item()
            print(f"  crops {crops}: max |bf16 - sdpa| {diff:.3g} (features' max {outs['sdpa'].abs().max():.3g})")
    print("\n| crops | path | crops/s | useful GFLOP/s | same-run matmul GFLOP/s | % of matmul |")
    print("|---|---|---|---|---|---|")
    for c, mode, cps, g, ref, pct in rows:
        print(f"| {c} | {mode} | {cps:.3f} | {g:.0f} | {ref:.0f} | **{pct:.0f}%** |")
    if args.profile:
        pixels = torch.randn(chunk, 3, cfg.image_size, cfg.image_size).to(dtype)
        for mode in args.modes.split(","):
            os.environ["OWLVID_VISION_BF16_KERNELS"] = "0" if mode == "sdpa" else "1"
            profile_chunk(tower, pixels)


if __name__ == "__main__":
    main()
