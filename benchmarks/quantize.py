"""Weight quantization of the language model (owlvid.quantize): decode speed, weight memory and first token,
unquantized vs int8 vs int4, mPLUG-Owl3 at real shapes with random weights (no download).

    PYTHONPATH=src python benchmarks/quantize.py                  # 1B shape, bf16 on a bf16 CPU, else fp32
    PYTHONPATH=src python benchmarks/quantize.py --models 1b,2b --dtype bfloat16

Per shape and mode: the language model's weight bytes (decoder, embedding = tied LM head) and their ratio to
the unquantized model; decoding tokens/s with no media and with 8 frames of visual memory (random image
embeddings), and its ratio; the first token of a text-only request through the public API, and the LLM
prefill of a long (512-token) text prompt, where the quantized matrix-vector kernels are slowest. The vision
tower is not quantized: a video's first token changes only by the LLM prefill. Prints which kernels ran.

    PYTHONPATH=src python benchmarks/quantize.py --kernels        # the path choice's crossover (below)

`--kernels` times one decoder layer's seven projections at the 1B shape (q/o 896x896, k/v 128x896, gate/up
4864x896, down 896x4864) per row count, unquantized and through each quantized path (the quantized kernel,
the weight dequantized on the fly + one GEMM), fastest of `--repeats`: where the paths cross is
owlvid.quantize.KERNEL_MAX_ROWS. `--prefill-tokens` sets the prompt lengths of the model-level prefill rows.
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
from owlvid import quantize as quantize_module
from owlvid.kv_cache import KVCache
from owlvid.layers import linear
from owlvid.quantize import import_torchao, language_model_bytes, quantize_language_model, quantize_weight
from owlvid.testing import write_tiny_tokenizer

MODES = (None, "int8", "int4")


def kernel_path(dtype: torch.dtype) -> str:
    bf16 = "yes" if owlvid.checkpoint.cpu_has_fast_bf16() else "no"
    return (f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads, bf16 hardware: {bf16}), "
            f"{str(dtype).replace('torch.', '')} activations; up to {quantize_module.KERNEL_MAX_ROWS} rows the "
            "quantized kernels (int8: torch _weight_int8pack_mm; int4: torchao Int4OpaqueTensor, "
            "_weight_int4pack_mm_for_cpu, groups of 128), more rows the weight dequantized on the fly + one GEMM; "
            "embedding / tied LM head int8 in both modes")


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
def bench_prefill(model, tokens: int, repeats: int = 3) -> float:
    """Best of `repeats` LLM prefills of a `tokens`-token text prompt (no media), logits of the last row."""
    runtime = model.runtime
    cfg = runtime.cfg.llm
    ids = torch.randint(1000, 2000, (1, tokens), generator=torch.Generator().manual_seed(0))
    best = float("inf")
    for _ in range(repeats):
        cache = KVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, cfg.head_dim, tokens + 8, runtime.dtype,
                        "cpu")
        t = time.perf_counter()
        runtime._forward(ids, 0, cache, None)
        best = min(best, time.perf_counter() - t)
    return best


LAYER_1B = [(896, 896), (128, 896), (128, 896), (896, 896), (4864, 896), (4864, 896), (896, 4864)]


def _layer(xs: list[torch.Tensor], weights: list[torch.Tensor]) -> list[torch.Tensor]:
    return [linear(x, w) for x, w in zip(xs, weights)]


def _fastest(repeats: int, fn, *args) -> float:
    fn(*args)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t)
    return best


@torch.inference_mode()
def bench_kernels(dtype: torch.dtype, rows: list[int], repeats: int) -> list[dict]:
    """ms per decoder layer (its seven projections) per row count: unquantized, and each quantized path forced
    by setting its KERNEL_MAX_ROWS above or below the row count."""
    gen = torch.Generator().manual_seed(0)
    weights = [(torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype) for n, k in LAYER_1B]
    quantized = {mode: [quantize_weight(w, mode) for w in weights] for mode in ("int8", "int4")}
    saved = dict(quantize_module.KERNEL_MAX_ROWS)
    out = []
    try:
        for r in rows:
            xs = [torch.randn(r, w.shape[1], generator=gen).to(dtype) for w in weights]
            row = {"rows": r, "bf16_ms" if dtype == torch.bfloat16 else "unquantized_ms":
                   1e3 * _fastest(repeats, _layer, xs, weights)}
            for mode, qs in quantized.items():
                for path, limit in (("kernel", 1 << 30), ("dequant", 0)):
                    quantize_module.KERNEL_MAX_ROWS[mode] = limit
                    row[f"{mode}_{path}_ms"] = 1e3 * _fastest(repeats, _layer, xs, qs)
                quantize_module.KERNEL_MAX_ROWS[mode] = saved[mode]
                row[f"{mode}_chosen"] = "kernel" if r <= saved[mode] else "dequant"
            out.append(row)
    finally:
        quantize_module.KERNEL_MAX_ROWS.update(saved)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="1b")
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on a CPU with bf16 hardware, else float32")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--decode-frames", default="0,8")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's); 1 gives steadier ratios on a shared machine")
    ap.add_argument("--prefill-tokens", default="1,32,128,512")
    ap.add_argument("--kernels", action="store_true", help="only the per-layer kernel table (the crossover)")
    ap.add_argument("--kernel-rows", default="1,4,8,12,16,20,24,32,48,64,128,512")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = owlvid.checkpoint.resolve_dtype(args.dtype, torch.device("cpu"))
    torchao = import_torchao("int8")
    quantize_module.register_kernels()
    if args.kernels:
        rows = bench_kernels(dtype, [int(r) for r in args.kernel_rows.split(",")], args.repeats)
        table(f"one 1B decoder layer's projections, {str(dtype).replace('torch.', '')}, {torch.get_num_threads()} "
              f"threads, KERNEL_MAX_ROWS {quantize_module.KERNEL_MAX_ROWS}", rows)
        return
    gemm = bench_matmul(dtype)
    machine = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
               "torchao": torchao.__version__, "gemm_gflops": gemm, "path": kernel_path(dtype)}
    print(f"machine path: {machine['path']}\n{str(dtype).replace('torch.', '')} GEMM 1024: {gemm:.0f} GFLOP/s; "
          f"torch {torch.__version__}, torchao {torchao.__version__}")
    tok_dir = Path(tempfile.mkdtemp())
    write_tiny_tokenizer(tok_dir)
    frames = [int(n) for n in args.decode_frames.split(",") if n]
    prefill_tokens = [int(n) for n in args.prefill_tokens.split(",") if n]
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
            for n in prefill_tokens:
                row[f"prefill_{n}_s"] = bench_prefill(model, n)
            row["quantize_s"] = quantize_s if mode else 0.0
            rows.append(row)
            del model
        base = rows[0]
        for row in rows:
            row["weight_ratio"] = row["lm_weight_gb"] / base["lm_weight_gb"]
            for n in frames:
                row[f"decode_x_{n}f"] = row[f"decode_tok_s_{n}f"] / base[f"decode_tok_s_{n}f"]
            row["first_token_x"] = row["first_token_text_s"] / base["first_token_text_s"]
            for n in prefill_tokens:
                row[f"prefill_{n}_x"] = row[f"prefill_{n}_s"] / base[f"prefill_{n}_s"]
        report[shape] = rows
        table(f"weight quantization, {shape}-241014 shape, {str(dtype).replace('torch.', '')}", rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
