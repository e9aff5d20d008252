"""Every figure next to its physical limit: one roofline table for this machine, mPLUG-Owl3 at the real 1B-241014
shape with random weights (perf.py's `build_model`; no download).

    PYTHONPATH=src python benchmarks/roofline.py                 # bf16 on a bf16 CPU, else float32
    PYTHONPATH=src python benchmarks/roofline.py --dtype float32 --json roofline.json

Limits, measured in the same process: the matmul rate (bf16 and float32 n x n GEMM, perf.bench_matmul) and
the memory bandwidth (STREAM-like copy a = b and triad a = b + s * c over tensors far larger than the caches,
and a read-only sum; the best of the three is the bandwidth roofline).

Sections, each as a share of the limit that bounds it:
  vision    FLOP-bound: the SigLIP tower's useful FLOPs / time (perf.bench_vision) / the GEMM rate
  prefill   FLOP-bound: a text prompt's useful FLOPs (projections, causal attention, the last row's LM head)
            / time / the GEMM rate
  decode    bandwidth-bound, batch 1: the bytes one token reads (the decoder's weights but the once-per-request
            visual K/V projections, the LM head, the text KV cache, the hyper layers' visual K/V) x tokens/s /
            the bandwidth roofline; text only and with 32 frames of visual memory
If batch-1 decoding reads below 80% of its roofline, a torch.profiler table of a few decoding steps says where
the rest of the time goes (`--profile always` prints it anyway).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from perf import bench_matmul, bench_vision, build_model, table, video_messages
from quantize import bench_prefill  # benchmarks/quantize.py

import owlvid
from owlvid.kv_cache import KVCache
from owlvid.models.owl3.runtime import DecodeState
from owlvid.quantize import tensor_bytes
from owlvid.testing import write_tiny_tokenizer

DECODE_TARGET = 0.80  # the target share of the bandwidth roofline at batch 1
LINEAR_OPS = {"aten::mm", "aten::addmm", "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu"}


def machine() -> dict:
    """lscpu's model name, the bf16 matrix flags, cores and torch threads."""
    model, flags = "unknown", set()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                     model)
        flags = set(next((line.split(":", 1)[1].split() for line in out.splitlines() if line.startswith("Flags")), []))
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "isa": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def bandwidth(mb: int = 256, repeats: int = 5) -> dict:
    """GB/s of a copy (2 arrays' bytes moved), a triad (3) and a read-only sum (1), best of `repeats`, on float32
    tensors of `mb` MB each (far past any L3)."""
    n = mb * (1 << 20) // 4
    a, b, c = (torch.ones(n) for _ in range(3))

    def best(fn) -> float:
        fn()
        t = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            t = min(t, time.perf_counter() - start)
        return t

    return {"copy": 2 * 4 * n / best(lambda: a.copy_(b)) / 1e9,
            "triad": 3 * 4 * n / best(lambda: torch.add(b, c, alpha=3.0, out=a)) / 1e9,
            "read": 4 * n / best(lambda: b.sum()) / 1e9}


def prefill_flops(cfg, tokens: int) -> float:
    """Projections and MLP of every prompt row, causal attention (QK^T and PV over the rows before each), and
    the LM head of the last row (the only one whose logits are computed)."""
    c = cfg.llm
    hd = c.head_dim
    proj = 2 * c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads) * hd + 2 * c.hidden_size ** 2
    mlp = 3 * 2 * c.hidden_size * c.intermediate_size
    attention = 2 * 2 * c.num_attention_heads * hd * tokens * (tokens + 1) / 2
    return c.num_hidden_layers * ((proj + mlp) * tokens + attention) + 2 * c.vocab_size * c.hidden_size


def decode_weight_bytes(net) -> int:
    """Weights one decoding step reads: the decoder layers (not the hyper layers' visual K/V projections, run
    once per request), the final norm and the LM head (the tied embedding table); the embedding lookup itself
    reads one row."""
    head = net.llm.embed_tokens.weight if net.cfg.llm.tie_word_embeddings else net.lm_head.weight
    layers = sum(tensor_bytes(p) for name, p in net.llm.layers.named_parameters() if "v_kv_proj" not in name)
    return layers + tensor_bytes(net.llm.norm.weight) + tensor_bytes(head)


@torch.inference_mode()
def decode_setup(model, frames: int, tokens: int) -> tuple[DecodeState, int, int]:
    """A prefilled request with `frames` frames of random visual memory: (state, prompt length, visual K/V
    bytes)."""
    runtime = model.runtime
    request, ids = model.prepare(video_messages(frames))
    c = runtime.cfg.llm
    visual = None
    if frames:
        embeds = torch.randn(frames, 729, c.hidden_size).to(runtime.dtype)
        visual = runtime.model.visual_memory(embeds, request["media_starts"])
    cache = KVCache(c.num_hidden_layers, 1, c.num_key_value_heads, c.head_dim, len(ids) + tokens + 16, runtime.dtype,
                    "cpu")
    state = DecodeState(cache, len(ids), visual=visual)
    runtime._forward(torch.tensor([ids]), 0, cache, visual)
    visual_bytes = sum(tensor_bytes(t) for kv in visual.kv.values() for t in kv) if visual else 0
    return state, len(ids), visual_bytes


@torch.inference_mode()
def bench_decode(model, frames: int, tokens: int) -> dict:
    runtime = model.runtime
    c = runtime.cfg.llm
    state, prompt, visual_bytes = decode_setup(model, frames, tokens)
    for _ in range(2):  # warm up
        runtime.decode(state, 100)
    start = time.perf_counter()
    for _ in range(tokens):
        runtime.decode(state, 100)
    elapsed = time.perf_counter() - start
    context = prompt + 2 + tokens / 2  # the mean text context over the timed steps
    kv_bytes = int(c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * context * runtime.dtype.itemsize)
    weights = decode_weight_bytes(runtime.model)
    return {"tokens_per_s": tokens / elapsed, "weight_mb": weights / 1e6, "kv_mb": kv_bytes / 1e6,
            "visual_kv_mb": visual_bytes / 1e6, "bytes_per_token": weights + kv_bytes + visual_bytes}


@torch.inference_mode()
def decode_profile(model, frames: int, steps: int = 6, rows: int = 12) -> list[dict]:
    """Self CPU time of a few batch-1 decoding steps by operator, with the linear layers' achieved bandwidth."""
    from torch.profiler import ProfilerActivity, profile

    runtime = model.runtime
    state, _, _ = decode_setup(model, frames, steps + 4)
    runtime.decode(state, 100)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            runtime.decode(state, 100)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    out = [{"op": e.key, "calls_per_token": e.count / steps, "ms_per_token": e.self_cpu_time_total / 1e3 / steps,
            "share_pct": 100 * e.self_cpu_time_total / total} for e in events[:rows]]
    # The weight-reading kernels together, and the bandwidth they reach while they run
    linear_us = sum(e.self_cpu_time_total for e in events if e.key in LINEAR_OPS) / steps
    weights = decode_weight_bytes(runtime.model)
    out.append({"op": f"(linear layers: {', '.join(sorted(LINEAR_OPS & {e.key for e in events}))})",
                "ms_per_token": linear_us / 1e3, "share_pct": 100 * linear_us * steps / total,
                "gb_per_s_while_running": weights / (linear_us / 1e6) / 1e9})
    out.append({"op": "(all ops)", "ms_per_token": total / 1e3 / steps, "share_pct": 100.0})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on a CPU with bf16 hardware, else float32")
    ap.add_argument("--vision-crops", type=int, default=4)
    ap.add_argument("--prefill-tokens", default="128,512")
    ap.add_argument("--decode-frames", default="0,32")
    ap.add_argument("--decode-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--profile", choices=["auto", "always", "never"], default="auto")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = owlvid.checkpoint.resolve_dtype(args.dtype, torch.device("cpu"))
    dt = str(dtype).removeprefix("torch.")
    info = machine()
    rates = {name: bench_matmul(getattr(torch, name)) for name in ("bfloat16", "float32")}
    bw = bandwidth()
    roof_bw = max(bw.values())
    rate = rates[dt]
    tok_dir = Path(tempfile.mkdtemp())
    write_tiny_tokenizer(tok_dir)
    model = build_model("1b", dtype, tok_dir)
    rows = [{"section": f"matmul {name} 1024^3", "measured": f"{r:.0f} GFLOP/s", "limit": "", "share": ""}
            for name, r in rates.items()]
    rows += [{"section": f"memory {name}", "measured": f"{v:.1f} GB/s", "limit": "", "share": ""}
             for name, v in bw.items()]
    report = {"machine": info, "dtype": dt, "matmul_gflops": rates, "bandwidth_gbs": bw, "sections": {}}

    v = bench_vision(model, args.vision_crops)
    report["sections"]["vision"] = v
    rows.append({"section": f"vision, {args.vision_crops} crops (FLOP-bound)", "measured": f"{v['gflops']:.0f} GFLOP/s",
                 "limit": f"{rate:.0f} GFLOP/s", "share": f"{100 * v['gflops'] / rate:.0f}%"})
    for n in (int(t) for t in args.prefill_tokens.split(",") if t):
        seconds = bench_prefill(model, n)
        gflops = prefill_flops(model.runtime.cfg, n) / seconds / 1e9
        report["sections"][f"prefill_{n}"] = {"seconds": seconds, "gflops": gflops}
        rows.append({"section": f"prefill, {n}-token text (FLOP-bound)", "measured": f"{gflops:.0f} GFLOP/s "
                     f"({seconds:.3g} s)", "limit": f"{rate:.0f} GFLOP/s", "share": f"{100 * gflops / rate:.0f}%"})
    shares = {}
    for n in (int(f) for f in args.decode_frames.split(",") if f):
        d = bench_decode(model, n, args.decode_tokens)
        gbs = d["bytes_per_token"] * d["tokens_per_s"] / 1e9
        shares[n] = gbs / roof_bw
        report["sections"][f"decode_{n}_frames"] = {**d, "gbs": gbs, "share": shares[n]}
        what = "text" if n == 0 else f"{n} frames"
        rows.append({"section": f"decode, batch 1, {what} (bandwidth-bound)",
                     "measured": f"{d['tokens_per_s']:.1f} tok/s x {d['bytes_per_token'] / 1e6:.0f} MB "
                     f"(weights {d['weight_mb']:.0f} + KV {d['kv_mb']:.1f} + visual K/V {d['visual_kv_mb']:.0f}) = "
                     f"{gbs:.1f} GB/s", "limit": f"{roof_bw:.1f} GB/s", "share": f"{100 * shares[n]:.0f}%"})
    isa = ", ".join(f for f in ("avx512_bf16", "amx_bf16") if info[f]) or "no bf16 matrix flags"
    table(f"roofline: {info['cpu']} ({isa}; torch ISA {info['isa']}), {info['cores']} cores / {info['threads']} "
          f"threads, {dt} path, mPLUG-Owl3 1B-241014 shape, torch {info['torch']}", rows)
    low = [n for n, s in shares.items() if s < DECODE_TARGET]
    if args.profile == "always" or (args.profile == "auto" and low):
        for n in (low or list(shares)):
            prof = decode_profile(model, n)
            report["sections"][f"decode_{n}_frames"]["profile"] = prof
            table(f"where a batch-1 decoding step's time goes, {'text' if n == 0 else f'{n} frames'} "
                  f"({100 * shares[n]:.0f}% of the bandwidth roofline; target {100 * DECODE_TARGET:.0f}%)", prof)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
