"""owlvid performance suite: mPLUG-Owl3 at real model shapes with random weights (no download).

    python benchmarks/perf.py                      # 1B-241014 shape, bf16 + fp32, default points
    python benchmarks/perf.py --models 1b,2b --dtypes bfloat16 --ttft-frames 1,8,32,128 --concat-frames 8,32
    python benchmarks/perf.py --device cuda --models 7b --dtypes bfloat16   # on a GPU (benchmarks/gpu.sh)

Prints one table per section and writes JSON (benchmarks/results/perf-<host>.json). Sections:
  machine      measured GEMM rate (bf16 / fp32) in this run, the reference for the ratios below
  vision       SigLIP + projector crops/s and achieved GFLOP/s
  ttft         time to first token for N frames through the public API (decode + preprocess + encode +
               prefill), next to the LLaVA-style "concatenation" baseline: the same LLM with the visual
               tokens placed in the context (prefill over N*729 extra tokens), with peak memory
  prefill      LLM prefill alone (no vision) over N frames of visual memory: time and peak memory
  decode       decoding tokens/s with N frames of visual memory (visual K/V cached once per request)
  cache        a second question about the same video (visual cache hit) vs the first
  batch        B concurrent requests decoded together vs one after another (total tokens/s)
  slowfast-batch  the same for the Slow-Fast model at Qwen2-7B layer widths (hidden 3584, 28 heads / 4 KV
               heads, MLP 18944, real vocabulary), `--sf-layers` of its 28 layers (memory and time), a tiny
               ConvNeXt tower (the section measures the LLM), in the dtype owlvid.load(dtype="auto") picks
Shapes: 1B-241014 = Qwen2-0.5B LLM (hidden 896, 24 layers, hyper layers [6, 13, 20, 22]); 2B-241014 =
Qwen2-1.5B (hidden 1536, 28 layers; its hyper layers are not public, [1, 9, 17, 25] assumed). Both
use SigLIP-so400m at 384 px (26 of 27 layers run). 7B-241101 = Qwen2-7B (hidden 3584, 28 layers, 28 heads /
4 KV heads, MLP 18944, 151651 embedding rows, separate LM head, hyper layers [7, 15, 23, 26]) with fused
hyper attention, the GELU MLP projector and SigLIP at 378 px. `--layers N` builds only the first N decoder
layers (and the hyper layers among them). The prompt tokenizer is a small byte-level BPE, so text prompts
are a few tokens longer than with the real Qwen2 vocabulary.
With `--device cuda` the model is built on the GPU, every timer read waits for the GPU's queued work, and
peak memory is the GPU memory allocated (torch.cuda.max_memory_allocated) instead of the process RSS.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import platform
import socket
import sys
import tempfile
import time as _time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import owlvid
from owlvid.api import Model
from owlvid.kv_cache import KVCache
from owlvid.layers import RotaryTable, new_attention_inputs
from owlvid.models.owl3 import Owl3, Owl3Runtime
from owlvid.models.owl3.config import owl3_config
from owlvid.models.slowfast import SlowFast, SlowFastRuntime
from owlvid.models.slowfast.config import slowfast_config
from owlvid.testing import write_tiny_tokenizer
from owlvid.tokenizer import QwenTokenizer

SIGLIP = dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, num_hidden_layers=27,
              image_size=384, patch_size=14)
VOCAB = 151851
SHAPES = {
    "1b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
               num_key_value_heads=2, hyper_layers=[6, 13, 20, 22], tie_word_embeddings=True),
    "2b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
               num_key_value_heads=2, hyper_layers=[1, 9, 17, 25], tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, hyper_layers=[7, 15, 23, 26], tie_word_embeddings=False,
               vocab_size=151651, vision_config=dict(SIGLIP, image_size=378)),
}
# The variant follows from the checkpoint keys (owl3_config): 241014 = static gate vector, Linear projector,
# LM head tied to the embeddings; 241101 = fused hyper attention (no gate), GELU MLP projector, own LM head.
RELEASES = {"1b": "241014", "2b": "241014", "7b": "241101"}
# Slow-Fast = Qwen2-7B-Instruct + hybrid cross-attention layers every 8 layers (0, 8, 16, 24).
SLOWFAST_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                   num_key_value_heads=4)
SLOWFAST_VOCAB, SLOWFAST_TOKENIZER_LEN = 152064, 151646  # rows stored / kept (len of the real tokenizer)


# ----------------------------------------------------------------------------------------------- helpers

DEVICE = torch.device("cpu")  # set from --device in main(); read by the timers and the memory counters


class _DeviceTime:
    """This file's `time`: on a GPU, `perf_counter()` first waits for the work queued on it (kernels run
    asynchronously), so every timer read in the sections below measures finished work."""

    def perf_counter(self) -> float:
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return _time.perf_counter()

    def __getattr__(self, name: str):
        return getattr(_time, name)


time = _DeviceTime()


def peak_reset() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def rss_bytes(field: str = "VmHWM") -> int:
    """The process's resident memory (VmRSS) or its peak since `peak_reset` (VmHWM); on a GPU the device
    memory allocated now or at its peak instead."""
    if DEVICE.type == "cuda":
        return torch.cuda.max_memory_allocated() if field == "VmHWM" else torch.cuda.memory_allocated()
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def owl3_shape_config(shape: str, layers: int | None = None):
    """The Owl3Config of a shape, its variant picked from the keys its release's checkpoints have;
    `layers`: only the first N decoder layers (hyper layers past them dropped; the first one if none is left)."""
    raw = {"vocab_size": VOCAB, "vision_config": SIGLIP, **SHAPES[shape]}
    raw.update(model_type="mplugowl3", rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768)
    if layers:
        raw["num_hidden_layers"] = layers
        raw["hyper_layers"] = [i for i in raw["hyper_layers"] if i <= layers] or [1]
    keys = {f"language_model.model.layers.{i - 1}.self_attn.v_kv_proj.weight": () for i in raw["hyper_layers"]}
    if RELEASES[shape] == "241014":
        keys.update({f"language_model.model.layers.{raw['hyper_layers'][0] - 1}.self_attn.gate": (),
                     "vision2text_model.weight": ()})
    else:
        keys.update({"vision2text_model.0.weight": (), "language_model.lm_head.weight": ()})
    return owl3_config(raw, keys)


def build_model(shape: str, dtype: torch.dtype, tokenizer_dir: Path, device: torch.device | str = "cpu",
                layers: int | None = None) -> Model:
    """An Owl3 at real shapes with random weights, built in memory directly on `device`."""
    cfg = owl3_shape_config(shape, layers)
    with torch.device("meta"):
        model = Owl3(cfg).to(dtype)
    model = model.to_empty(device=device)
    _random_init(model, torch.Generator(device).manual_seed(0))
    model.rope = RotaryTable(cfg.llm.head_dim, cfg.llm.rope_theta, cfg.llm.max_position_embeddings, device)
    model.eval()
    runtime = Owl3Runtime(model, cfg, QwenTokenizer.from_dir(tokenizer_dir), tokenizer_dir, device,
                          dtype, visual_cache=owlvid.cache.VisualCache(8 << 30))
    return Model(runtime, name=f"random-{shape}")


def _random_init(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Random weights of a sensible scale, one parameter at a time (float32 draws on the generator's device,
    cast in place)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = math.prod(p.shape[1:])
                draw = torch.randn(p.shape, generator=gen, device=gen.device)
                p.copy_(draw / math.sqrt(fan_in) if "embed" not in name else draw)
                del draw
            elif name.endswith("gate"):
                p.zero_()
            else:
                p.fill_(1.0 if "norm" in name else 0.0)


def build_slowfast(layers: int, dtype: torch.dtype, tokenizer_dir: Path, device: torch.device | str = "cpu"
                   ) -> Model:
    """A Slow-Fast at Qwen2-7B layer widths with `layers` decoder layers (hybrid layers every 8: 0, 8, ...),
    the real vocabulary (152064 rows stored, 151646 kept) and a tiny ConvNeXt tower, random weights."""
    raw = dict(SLOWFAST_7B, num_hidden_layers=layers, model_type="llava_qwen_slow_fast", vocab_size=SLOWFAST_VOCAB,
               rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768, tie_word_embeddings=False,
               mm_vision_tower="convnext-576", mm_hidden_size=64, mm_projector_type="mlp2x_gelu",
               mm_video_pooling_stride=2, cross_attn_every_n_layers=8, cross_attn_min_layer_depth=0,
               cross_attn_max_layer_depth=layers, cross_attn_implementation="text-only-vanilla-flashattn",
               cross_attn_gating_type="whole-dynamic-tanh-warmup", fast_token_temporal_stride=4,
               fast_token_temporal_sampling_stride=1, fast_token_spatial_stride=1, min_fast_frames=16,
               mm_training_video_frames=64, tokenizer_model_max_length=4096,
               convnext_config={"depths": [1, 1, 1, 1], "dims": [32, 32, 64, 64]})
    shapes = {"model.embed_tokens.weight": (SLOWFAST_VOCAB, 3584), "lm_head.weight": (SLOWFAST_VOCAB, 3584)}
    shapes.update({f"model.layers.{i}.self_attn.cross_attn_kv_proj.weight": () for i in range(0, layers, 8)})
    cfg = slowfast_config(raw, shapes)
    with torch.device("meta"):
        model = SlowFast(cfg).to(dtype)
    model = model.to_empty(device=device)
    _random_init(model, torch.Generator(device).manual_seed(0))
    model.truncate_vocab(SLOWFAST_TOKENIZER_LEN)
    model.rope = RotaryTable(cfg.llm.head_dim, cfg.llm.rope_theta, cfg.llm.max_position_embeddings, device)
    model.eval()
    tokenizer = QwenTokenizer.from_dir(tokenizer_dir)
    runtime = SlowFastRuntime(model, cfg, tokenizer, tokenizer_dir, device, dtype,
                              [tokenizer.token_id("<|im_end|>")])
    return Model(runtime, name=f"random-slowfast-{layers}-layers")


def frames(n: int, seed: int = 0, size=(640, 360)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return [Image.fromarray(np.roll(base, 7 * i, axis=1)) for i in range(n)]


def video_messages(n: int, seed: int = 0, question: str = "What happens in this video?") -> list[dict]:
    if n == 0:
        return [{"role": "user", "content": question}]
    return [{"role": "user", "content": [{"type": "video", "video": frames(n, seed)},
                                         {"type": "text", "text": question}]}]


def vision_flops_per_crop(d=1152, m=4304, layers=26, p=729, patch=14, hidden=896) -> float:
    per_layer = 4 * 2 * p * d * d + 2 * 2 * p * p * d + 2 * 2 * p * d * m
    return layers * per_layer + 2 * p * 3 * patch * patch * d + 2 * p * d * hidden


def llm_flops_per_token(cfg) -> float:
    c = cfg.llm
    hd = c.head_dim
    attn = 2 * c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads) * hd + 2 * c.hidden_size ** 2
    mlp = 3 * 2 * c.hidden_size * c.intermediate_size
    return c.num_hidden_layers * (attn + mlp)


def table(title: str, rows: list[dict]) -> None:
    if not rows:
        return
    cols = list(dict.fromkeys(c for r in rows for c in r))  # every column of every row, in first-seen order
    widths = [max(len(str(c)), *(len(fmt(r.get(c))) for r in rows)) for c in cols]
    print(f"\n## {title}")
    print("| " + " | ".join(str(c).ljust(w) for c, w in zip(cols, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(fmt(r.get(c)).ljust(w) for c, w in zip(cols, widths)) + " |")
    sys.stdout.flush()


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


# ----------------------------------------------------------------------------------------------- sections


def gemm_size() -> int:
    """The matmul size of the machine's reference rate: 1024 on a CPU, 8192 on a GPU (fills all its SMs)."""
    return 8192 if DEVICE.type == "cuda" else 1024


def bench_matmul(dtype: torch.dtype, n: int | None = None, seconds: float = 2.0) -> float:
    """GFLOP/s of an n x n matmul in `dtype`, time-boxed (a CPU without a bf16 path runs it ~100x slower)."""
    n = n or gemm_size()
    a = torch.randn(n, n, device=DEVICE).to(dtype)
    b = torch.randn(n, n, device=DEVICE).to(dtype)
    a @ b  # warm up
    count, t = 0, time.perf_counter()
    while count == 0 or time.perf_counter() - t < seconds:
        a @ b
        count += 1
    return 2 * n ** 3 * count / (time.perf_counter() - t) / 1e9


def bench_vision(model: Model, crops: int) -> dict:
    runtime = model.runtime
    size = runtime.cfg.vision.image_size
    pixels = torch.randn(crops, 3, size, size, device=DEVICE)
    runtime.model.encode_images(pixels[:1])  # warm up
    t = time.perf_counter()
    runtime.model.encode_images(pixels)
    el = time.perf_counter() - t
    flops = vision_flops_per_crop(hidden=runtime.cfg.llm.hidden_size) * crops
    # Which path was measured: the dtype, whether this CPU has bf16 hardware, its ISA, crops per tower call.
    dtype = runtime.model.llm.embed_tokens.weight.dtype
    isa = torch.backends.cpu.get_cpu_capability()
    path = (f"{str(dtype).replace('torch.', '')}, bf16 hardware: "
            f"{'yes' if owlvid.checkpoint.cpu_has_fast_bf16() else 'no'} ({isa}), "
            f"chunk {runtime.model.vision_chunk(runtime.model.llm.embed_tokens.weight.device, dtype)}")
    return {"crops": crops, "crops_per_s": crops / el, "gflops": flops / el / 1e9, "s_per_crop": el / crops,
            "path": path}


def bench_ttft(model: Model, n: int) -> dict:
    model.runtime.visual_cache.clear()
    model.runtime._prefixes.clear()
    peak_reset()
    base = rss_bytes("VmRSS")
    t = time.perf_counter()
    g = model.generate(video_messages(n, seed=n), max_new_tokens=1)
    return {"ttft_s": time.perf_counter() - t, "prompt_tokens": g.prompt_tokens,
            "peak_mem_gb": (rss_bytes() - base) / 1e9}


@torch.inference_mode()
def bench_concat(model: Model, n: int, embeds_per_frame: int = 729) -> dict:
    """Baseline: the LLM with every frame's 729 visual tokens in the context (LLaVA-style), prefill only.
    Vision encoding is identical for both designs and is added from the measured per-crop time."""
    runtime = model.runtime
    cfg = runtime.cfg.llm
    request, ids = model.prepare(video_messages(n))
    starts = request["media_starts"]
    dtype = runtime.dtype
    embeds = torch.randn(n, embeds_per_frame, cfg.hidden_size, device=DEVICE).to(dtype)
    text = runtime.model.llm.embed_tokens(torch.tensor(ids, device=DEVICE))
    pieces, last = [], 0
    for j, s in enumerate(starts):
        pieces += [text[last:s], embeds[j]]
        last = s
    pieces.append(text[last:])
    h = torch.cat(pieces)[None]
    length = h.shape[1]
    gc.collect()
    peak_reset()
    base = rss_bytes("VmRSS")
    t = time.perf_counter()
    cache = KVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, cfg.head_dim, length, dtype, DEVICE)
    positions = torch.arange(length, device=DEVICE)[None]
    inputs = new_attention_inputs(runtime.model.rope, positions, cache, dtype)
    out = runtime.model.llm(h, inputs)
    runtime.model.logits(out[:, -1:])
    return {"prefill_s": time.perf_counter() - t, "context_tokens": length,
            "peak_mem_gb": (rss_bytes() - base) / 1e9}


@torch.inference_mode()
def bench_prefill(model: Model, n: int) -> dict:
    """LLM prefill alone over a prompt with N frames of visual memory (random image embeddings, no vision
    encoding): time and peak memory of the hyper layers attending to N*729 visual keys."""
    runtime = model.runtime
    cfg = runtime.cfg.llm
    request, ids = model.prepare(video_messages(n))
    gen = torch.Generator(DEVICE).manual_seed(n)
    embeds = torch.randn(n, 729, cfg.hidden_size, generator=gen, device=DEVICE).to(runtime.dtype)
    visual = runtime.model.visual_memory(embeds, request["media_starts"])
    cache = KVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, cfg.head_dim, len(ids) + 8,
                    runtime.dtype, DEVICE)
    gc.collect()
    peak_reset()
    base = rss_bytes("VmRSS")
    t = time.perf_counter()
    runtime._forward(torch.tensor([ids], device=DEVICE), 0, cache, visual)
    return {"frames": n, "prompt_tokens": len(ids), "prefill_s": time.perf_counter() - t,
            "peak_mem_gb": (rss_bytes() - base) / 1e9}


@torch.inference_mode()
def bench_decode(model: Model, n: int, tokens: int) -> dict:
    """Decoding speed with N frames of visual memory (random image embeddings, no vision encoding)."""
    runtime = model.runtime
    request, ids = model.prepare(video_messages(n))
    cfg = runtime.cfg.llm
    visual = None
    if n:
        embeds = torch.randn(n, 729, cfg.hidden_size, device=DEVICE).to(runtime.dtype)
        visual = runtime.model.visual_memory(embeds, request["media_starts"])
    from owlvid.models.owl3.runtime import DecodeState

    cache = KVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, cfg.head_dim, len(ids) + tokens + 8,
                    runtime.dtype, DEVICE)
    state = DecodeState(cache, len(ids), visual=visual)
    runtime._forward(torch.tensor([ids], device=DEVICE), 0, cache, visual)
    token = 100
    for _ in range(2):  # warm up
        runtime.decode(state, token)
    t = time.perf_counter()
    for _ in range(tokens):
        runtime.decode(state, token)
    el = time.perf_counter() - t
    return {"tokens_per_s": tokens / el, "visual_tokens": n * 729}


def bench_cache(model: Model, n: int, video_path: str | None) -> dict:
    runtime = model.runtime
    runtime.visual_cache.clear()
    runtime._prefixes.clear()
    source = video_path if video_path else frames(n, seed=99)
    msgs = [{"role": "user", "content": [{"type": "video", "video": source, "max_frames": n},
                                         {"type": "text", "text": "What happens in this video?"}]}]
    encoded = runtime.stats["encoded_crops"]
    t = time.perf_counter()
    model.generate(msgs, max_new_tokens=1)
    t1 = time.perf_counter() - t
    n_frames = runtime.stats["encoded_crops"] - encoded
    msgs2 = [{"role": "user", "content": [{"type": "video", "video": source, "max_frames": n},
                                          {"type": "text", "text": "Is there a person? Answer yes or no."}]}]
    t = time.perf_counter()
    model.generate(msgs2, max_new_tokens=1)
    t2 = time.perf_counter() - t
    return {"frames": n_frames, "first_s": t1, "second_s": t2, "ratio": t2 / t1,
            "source": "mp4 file" if video_path else "frame list"}


def bench_batch(model: Model, sizes: list[int], tokens: int) -> list[dict]:
    runtime = model.runtime
    convs = [[{"role": "user", "content": [{"type": "image", "image": frames(1, seed=200 + i)[0]},
                                           {"type": "text", "text": f"Question number {i}: describe it."}]}]
             for i in range(max(sizes))]
    runtime.stop_token_ids = []  # random weights: generate exactly `tokens` tokens per request
    for c in convs:  # warm the visual cache: this section measures the LLM, not vision
        model.generate(c, max_new_tokens=1, cut_enable=False)
    rows = []
    for b in sizes:
        runtime._prefixes.clear()
        runtime.prefix_slots = 0
        t = time.perf_counter()
        for c in convs[:b]:
            model.generate(c, max_new_tokens=tokens, cut_enable=False)
        seq = b * tokens / (time.perf_counter() - t)
        t = time.perf_counter()
        results = model.generate_batch(convs[:b], max_new_tokens=tokens, cut_enable=False, max_batch=b)
        bat = sum(r.completion_tokens for r in results) / (time.perf_counter() - t)
        rows.append({"requests": b, "sequential_tok_s": seq, "batched_tok_s": bat, "speedup": bat / seq})
    runtime.prefix_slots = 1
    return rows


def slowfast_conversations(n: int) -> list[list[dict]]:
    """A mix of what a server sees: text only, an image (324 fast and slow tokens), videos of 2 and 4
    frames (162 / 324 tokens each) - ragged prompts and slow-token memories."""
    out = []
    for i in range(n):
        question = {"type": "text", "text": f"Question number {i}: describe it."}
        kind = i % 4
        if kind == 0:
            out.append([{"role": "user", "content": f"Question number {i}: tell me a story about a cat."}])
        elif kind == 2:
            out.append([{"role": "user", "content": [{"type": "image", "image": frames(1, seed=300 + i)[0]},
                                                     question]}])
        else:
            out.append([{"role": "user", "content": [{"type": "video", "video": frames(kind + 1, seed=300 + i)},
                                                     question]}])
    return out


@torch.inference_mode()
def decode_step_times(model: Model, convs: list[list[dict]], steps: int = 8) -> tuple[float, float]:
    """Fastest of `steps` alternated decoding steps: one row alone (`decode`) vs all rows of `convs` in one
    batch (`decode_batch`). Alternating and taking the minimum keeps a shared machine's noise out of the
    ratio, which the whole-request rows cannot."""
    runtime = model.runtime
    states = [runtime.prefill(model.prepare(c)[0])[1] for c in convs]
    alone = runtime.prefill(model.prepare(convs[0])[0])[1]
    batch = runtime.start_batch(states)
    one, many = [], []
    for _ in range(steps):
        t = time.perf_counter()
        runtime.decode(alone, 100)
        one.append(time.perf_counter() - t)
        t = time.perf_counter()
        runtime.decode_batch(batch, [100] * len(convs))
        many.append(time.perf_counter() - t)
    return min(one), min(many)


def bench_slowfast_batch(model: Model, sizes: list[int], tokens: int) -> list[dict]:
    """B requests through `generate_batch` (continuous batching: B prefills, then one B-row forward per
    token) vs one `generate` after another. Total tokens/s includes the prefills (the same work both ways);
    decode tokens/s counts the tokens after each request's first over the time spent decoding; the step
    columns time single decoding steps (see `decode_step_times`)."""
    runtime = model.runtime
    runtime.stop_token_ids = []  # random weights: generate exactly `tokens` tokens per request
    convs = slowfast_conversations(max(sizes))
    model.generate(convs[0], max_new_tokens=2)  # warm up
    rows = []
    for b in sizes:
        t = time.perf_counter()
        alone = [model.generate(c, max_new_tokens=tokens) for c in convs[:b]]
        seq_wall = time.perf_counter() - t
        seq_decode = sum(g.timings["decode_s"] for g in alone)
        t = time.perf_counter()
        batched = model.generate_batch(convs[:b], max_new_tokens=tokens, max_batch=b)
        bat_wall = time.perf_counter() - t
        bat_decode = bat_wall - sum(g.timings["prefill_s"] for g in batched)
        n = sum(g.completion_tokens for g in batched)
        rows.append({"requests": b, "prompt_tokens": "/".join(str(g.prompt_tokens) for g in alone),
                     "sequential_tok_s": b * tokens / seq_wall, "batched_tok_s": n / bat_wall,
                     "speedup": (n / bat_wall) / (b * tokens / seq_wall),
                     "decode_seq_tok_s": b * (tokens - 1) / seq_decode, "decode_batched_tok_s": (n - b) / bat_decode,
                     "decode_speedup": ((n - b) / bat_decode) / (b * (tokens - 1) / seq_decode),
                     "same_tokens": all(a.token_ids == g.token_ids for a, g in zip(alone, batched))})
        one, many = decode_step_times(model, convs[:b])
        rows[-1].update({"step_1_row_s": one, "step_all_rows_s": many, "step_speedup": b * one / many})
    return rows


def synthetic_video(path: Path, seconds: int, fps: int = 25, seed: int = 0) -> str | None:
    try:
        import av
    except ImportError:
        return None
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
        base = np.random.default_rng(seed).integers(0, 256, (360, 640, 3), dtype=np.uint8)
        for i in range(seconds * fps):
            frame = av.VideoFrame.from_ndarray(np.roll(base, 5 * i, axis=1), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return str(path)


# ----------------------------------------------------------------------------------------------- main


def main() -> None:
    global DEVICE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--models", default="1b", help="shapes: 1b, 2b (241014), 7b (241101)")
    ap.add_argument("--layers", type=int, default=None, help="build only the first N decoder layers of each shape")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--vision-crops", type=int, default=4)
    ap.add_argument("--ttft-frames", default="0,1,8,32")
    ap.add_argument("--concat-frames", default="8,32")
    ap.add_argument("--prefill-frames", default="32,128")
    ap.add_argument("--decode-frames", default="0,8,32,128")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--cache-frames", type=int, default=32)
    ap.add_argument("--batch-sizes", default="1,2,4,8")
    ap.add_argument("--batch-tokens", type=int, default=32)
    ap.add_argument("--sf-layers", type=int, default=4, help="Slow-Fast decoder layers (of 28) to build")
    ap.add_argument("--sf-batch-sizes", default="1,4")
    ap.add_argument("--sf-tokens", type=int, default=32)
    ap.add_argument("--sections", default="vision,ttft,prefill,decode,cache,batch,slowfast-batch")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    sections = set(args.sections.split(","))
    DEVICE = owlvid.checkpoint.resolve_device(args.device)
    torch.manual_seed(0)
    report = {"machine": {"host": socket.gethostname(), "cpu": platform.processor() or platform.machine(),
                          "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "fast_bf16": owlvid.checkpoint.cpu_has_fast_bf16(), "torch": torch.__version__,
                          "device": str(DEVICE)}}
    if DEVICE.type == "cuda":
        props = torch.cuda.get_device_properties(DEVICE)
        report["machine"].update(gpu=props.name, gpu_memory_gb=props.total_memory / 1e9, cuda=torch.version.cuda)
    out = Path(args.json or Path(__file__).parent / "results" / f"perf-{socket.gethostname()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every section, so that a run stopped part-way keeps what it measured
        out.write_text(json.dumps(report, indent=2, default=str))

    rates = {dt: bench_matmul(getattr(torch, dt)) for dt in args.dtypes.split(",")}
    report["machine"]["gemm_gflops"] = rates
    gemm = f"gemm_{gemm_size()}_gflops"
    table("machine", [{"dtype": dt, gemm: r} for dt, r in rates.items()]
          + [{"dtype": "cores/threads", gemm: f"{os.cpu_count()}/{torch.get_num_threads()}"}]
          + ([{"dtype": "device", gemm: report["machine"]["gpu"]}] if DEVICE.type == "cuda" else []))
    save()
    tok_dir = Path(tempfile.mkdtemp())
    write_tiny_tokenizer(tok_dir)
    video_dir = Path(tempfile.mkdtemp())
    # A dtype whose matmuls run far below the best one here (bf16 on a CPU without AVX512-BF16/AMX) is
    # reported but not benchmarked: owlvid's dtype="auto" never picks it on such a machine.
    best = max(rates.values())
    slow = [dt for dt, r in rates.items() if r < 0.25 * best]
    for dt in slow:
        print(f"\nskipping {dt}: {rates[dt]:.3g} GFLOP/s vs {best:.3g} for the fastest dtype on this machine "
              f"(no fast {dt} path; dtype='auto' would not use it)")
    report["machine"]["skipped_dtypes"] = slow
    for shape in args.models.split(","):
        for dt in [d for d in args.dtypes.split(",") if d not in slow]:
            dtype = getattr(torch, dt)
            label = f"{shape}-{RELEASES[shape]} {dt}"
            if args.layers:
                label += f", {args.layers} of {SHAPES[shape]['num_hidden_layers']} layers"
            if DEVICE.type == "cuda":
                label += f", {report['machine']['gpu']}"
            model = build_model(shape, dtype, tok_dir, DEVICE, args.layers)
            res = report.setdefault(label, {})
            if "vision" in sections:
                v = bench_vision(model, args.vision_crops)
                v["pct_of_gemm"] = 100 * v["gflops"] / rates[dt]
                res["vision"] = v
                table(f"vision encoder, {label}", [v])
                save()
            if "ttft" in sections:
                rows = []
                per_crop = res.get("vision", {}).get("s_per_crop")
                for n in ints(args.ttft_frames):
                    row = {"frames": n, **bench_ttft(model, n)}
                    if n in ints(args.concat_frames):
                        try:
                            c = bench_concat(model, n)
                        except torch.OutOfMemoryError:  # N*729 tokens in the context: keep the owlvid row
                            row["concat_llm_prefill_s"] = "out of memory"
                            rows.append(row)
                            continue
                        row["concat_llm_prefill_s"] = c["prefill_s"]
                        row["concat_context"] = c["context_tokens"]
                        row["concat_peak_mem_gb"] = c["peak_mem_gb"]
                        if per_crop:
                            row["concat_ttft_s"] = c["prefill_s"] + per_crop * n
                            row["speedup_vs_concat"] = row["concat_ttft_s"] / row["ttft_s"]
                    rows.append(row)
                res["ttft"] = rows
                table(f"time to first token, {label}", rows)
                save()
            if "prefill" in sections:
                rows = [bench_prefill(model, n) for n in ints(args.prefill_frames)]
                res["prefill"] = rows
                table(f"prefill over the visual memory, {label}", rows)
                save()
            if "decode" in sections:
                rows = [{"frames": n, **bench_decode(model, n, args.decode_tokens)} for n in ints(args.decode_frames)]
                base = rows[0]["tokens_per_s"]
                for r in rows:
                    r["vs_text_only"] = r["tokens_per_s"] / base
                res["decode"] = rows
                table(f"decoding, {label}", rows)
                save()
            if "cache" in sections:
                # The owl3 preset takes ~1 frame per second: a 2N-second clip yields N frames.
                path = synthetic_video(video_dir / "clip.mp4", seconds=2 * args.cache_frames)
                if importlib.util.find_spec("owlvid.media") is None:
                    path = None
                c = bench_cache(model, args.cache_frames, path)
                res["cache"] = c
                table(f"second question on the same video, {label}", [c])
                save()
            if "batch" in sections:
                rows = bench_batch(model, ints(args.batch_sizes), args.batch_tokens)
                res["batch"] = rows
                table(f"concurrent requests, {label}", rows)
                save()
            del model
            gc.collect()
    if "slowfast-batch" in sections:
        dtype = owlvid.checkpoint.resolve_dtype("auto", DEVICE)
        label = f"slowfast 7B widths, {args.sf_layers} of 28 layers, {str(dtype).removeprefix('torch.')}"
        model = build_slowfast(args.sf_layers, dtype, tok_dir, DEVICE)
        rows = bench_slowfast_batch(model, ints(args.sf_batch_sizes), args.sf_tokens)
        report[label] = {"batch": rows, "bf16_hardware": owlvid.checkpoint.cpu_has_fast_bf16()}
        table(f"concurrent requests, {label} (dtype='auto'; AVX512-BF16/AMX: "
              f"{'yes' if owlvid.checkpoint.cpu_has_fast_bf16() else 'no'}; {args.sf_tokens} tokens each)", rows)
        del model
        gc.collect()
    save()
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
