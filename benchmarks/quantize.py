"""Weight quantization of the language model (owlvid.quantize): decode speed, weight memory and first token,
unquantized vs int8 vs int4, mPLUG-Owl3 at real shapes with random weights (no download).

    PYTHONPATH=src python benchmarks/quantize.py                  # 1B shape, bf16 on a bf16 CPU, else fp32
    PYTHONPATH=src python benchmarks/quantize.py --models 1b,2b --dtype bfloat16

Per shape and mode: the language model's weight bytes (decoder, embedding = tied LM head) and their ratio to
the unquantized model; decoding tokens/s with no media and with 8 frames of visual memory (random image
embeddings), and its ratio; the first token of a text-only request through the public API, and the LLM
prefill of a long (512-token) text prompt, where the quantized matrix-vector kernels are slowest. The vision
tower is not quantized: a video's first token changes only by the LLM prefill. Prints which kernels ran.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from perf import bench_decode, bench_matmul, build_model, table, video_messages

import owlvid
from owlvid.kv_cache import KVCache
from owlvid.quantize import import_torchao, language_model_bytes, quantize_language_model
from owlvid.testing import write_tiny_tokenizer

MODES = (None, "int8", "int4")


def kernel_path(dtype: torch.dtype) -> str:
    bf16 = "yes" if owlvid.checkpoint.cpu_has_fast_bf16() else "no"
    return (f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads, bf16 hardware: {bf16}), "
            f"{str(dtype).replace('torch.', '')} activations; int8: torch _weight_int8pack_mm up to 32 rows, "
            "dequantized weight + GEMM above; int4: torchao Int4OpaqueTensor (_weight_int4pack_mm_for_cpu), "
            "groups of 128; embedding / tied LM head int8 in both modes")


@torch.inference_mode()
def bench_first_token(model, repeats: int = 3) -> float:
    """Best of `repeats` text-only first tokens through the public API (tokenize, prefill, sample)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        model.generate(video_messages(0), max_new_tokens=1)
        best = min(best, time.perf_counter() - t)
    return best


@torch.inference_mode()
def bench_long_prefill(model, tokens: int = 512) -> float:
    runtime = model.runtime
    cfg = runtime.cfg.llm
    ids = torch.randint(1000, 2000, (1, tokens), generator=torch.Generator().manual_seed(0))
    cache = KVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, cfg.head_dim, tokens + 8, runtime.dtype, "cpu")
    t = time.perf_counter()
    runtime._forward(ids, 0, cache, None)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="1b")
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on a CPU with bf16 hardware, else float32")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--decode-frames", default="0,8")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's); 1 gives steadier ratios on a shared machine")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = owlvid.checkpoint.resolve_dtype(args.dtype, torch.device("cpu"))
    torchao = import_torchao("int8")
    gemm = bench_matmul(dtype)
    machine = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
               "torchao": torchao.__version__, "gemm_gflops": gemm, "path": kernel_path(dtype)}
    print(f"machine path: {machine['path']}\n{str(dtype).replace('torch.', '')} GEMM 1024: {gemm:.0f} GFLOP/s; "
          f"torch {torch.__version__}, torchao {torchao.__version__}")
    tok_dir = Path(tempfile.mkdtemp())
    write_tiny_tokenizer(tok_dir)
    frames = [int(n) for n in args.decode_frames.split(",") if n]
    report = {"machine": machine}
    for shape in args.models.split(","):
        rows = []
        for mode in MODES:
            gc.collect()
            model = build_model(shape, dtype, tok_dir)
            if mode is not None:
                t = time.perf_counter()
                quantize_language_model(model.runtime.model, mode)
                quantize_s = time.perf_counter() - t
            row = {"mode": mode or str(dtype).replace("torch.", ""),
                   "lm_weight_gb": language_model_bytes(model.runtime.model) / 1e9}
            for n in frames:
                row[f"decode_tok_s_{n}f"] = bench_decode(model, n, args.decode_tokens)["tokens_per_s"]
            row["first_token_text_s"] = bench_first_token(model)
            row["prefill_512_tokens_s"] = bench_long_prefill(model)
            row["quantize_s"] = quantize_s if mode else 0.0
            rows.append(row)
            del model
        base = rows[0]
        for row in rows:
            row["weight_ratio"] = row["lm_weight_gb"] / base["lm_weight_gb"]
            for n in frames:
                row[f"decode_x_{n}f"] = row[f"decode_tok_s_{n}f"] / base[f"decode_tok_s_{n}f"]
            row["first_token_x"] = row["first_token_text_s"] / base["first_token_text_s"]
        report[shape] = rows
        table(f"weight quantization, {shape}-241014 shape, {str(dtype).replace('torch.', '')}", rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
