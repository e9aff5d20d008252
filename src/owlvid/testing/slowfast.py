"""Test helpers: tiny random Slow-Fast checkpoints in the official Hugging Face layout, and a no-cache
reference recompute of the logits.

`make_tiny_slowfast(folder)` writes config.json (the official schema plus the owlvid `convnext_config`
extension), generation_config.json, a tiny byte-level tokenizer and model.safetensors with every key of
the official `LlavaQwenSlowFastForCausalLM` state dict (vision tower head included, embedding rows past
the tokenizer as in the released models). `reference_logits(runtime, inputs, generated)` recomputes
prompt + generated ids in one call, the yardstick of the cached decoding.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from ..kv_cache import KVCache
from ..models.slowfast.processor import SlowFastInputs
from . import write_tiny_tokenizer

if TYPE_CHECKING:
    from ..models.slowfast.runtime import SlowFastRuntime


def _draw(shape: tuple[int, ...], kind: str, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(shape, generator=gen)
    if kind == "norm":
        return 1 + 0.1 * x
    if kind == "bias":
        return 0.05 * x
    if kind == "embed":
        return x
    if kind == "scale":  # ConvNeXt layer scale
        return 0.2 * x
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    return x / fan_in**0.5


def make_tiny_slowfast(folder: str | Path, *, seed: int = 0, hidden: int = 32, layers: int = 4,
                       heads: int = 4, kv_heads: int = 2, cross_attn_every_n_layers: int = 2,
                       convnext_depths: tuple[int, ...] = (1, 1, 1, 1),
                       convnext_dims: tuple[int, ...] = (8, 8, 16, 16), temporal_stride: int = 4,
                       temporal_sampling_stride: int = 1, spatial_stride: int = 1, min_fast_frames: int = 16,
                       training_frames: int = 64, model_max_length: int | None = 4096, spare_rows: int = 7,
                       dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a tiny Slow-Fast checkpoint (ConvNeXt at the real 576 px, hybrid layers every
    `cross_attn_every_n_layers`) and return its folder."""
    folder = Path(folder)
    n_tokens = write_tiny_tokenizer(folder)  # ends with <|endoftext|>, <|im_start|>, <|im_end|>
    endoftext, im_end = n_tokens - 3, n_tokens - 1
    vocab = n_tokens + spare_rows  # rows past len(tokenizer) are truncated at load, as the real models
    inter, head_dim = 3 * hidden, hidden // heads
    dims, depths = list(convnext_dims), list(convnext_depths)
    config = {
        "architectures": ["LlavaQwenSlowFastForCausalLM"], "model_type": "llava_qwen_slow_fast",
        "attention_dropout": 0.0, "bos_token_id": endoftext, "eos_token_id": im_end, "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": inter, "max_position_embeddings": 32768,
        "max_window_layers": layers, "num_attention_heads": heads, "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "sliding_window": 131072,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab, "mm_vision_tower": "convnext-576", "mm_hidden_size": dims[-1],
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "flat", "mm_video_pooling_stride": 2, "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False, "use_mm_proj": True, "tune_mm_mlp_adapter": False,
        "image_aspect_ratio": "pad", "tokenizer_padding_side": "right",
        "tokenizer_model_max_length": model_max_length,
        "cross_attn_every_n_layers": cross_attn_every_n_layers,
        "cross_attn_implementation": "text-only-vanilla-flashattn",
        "cross_attn_gating_type": "whole-dynamic-tanh-warmup", "cross_attn_max_layer_depth": layers,
        "cross_attn_min_layer_depth": 0, "tile_image_input": False, "min_fast_frames": min_fast_frames,
        "fast_token_spatial_stride": spatial_stride, "fast_token_temporal_stride": temporal_stride,
        "fast_token_temporal_sampling_stride": temporal_sampling_stride,
        "mm_training_video_frames": training_frames,
        "convnext_config": {"depths": depths, "dims": dims, "norm_eps": 1e-5},
    }
    gen = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {}
    t["model.embed_tokens.weight"] = _draw((vocab, hidden), "embed", gen)
    hybrid = set(range(0, layers, cross_attn_every_n_layers))
    for i in range(layers):
        p = f"model.layers.{i}"
        for name, rows in (("q_proj", heads * head_dim), ("k_proj", kv_heads * head_dim),
                           ("v_proj", kv_heads * head_dim)):
            t[f"{p}.self_attn.{name}.weight"] = _draw((rows, hidden), "w", gen)
            t[f"{p}.self_attn.{name}.bias"] = _draw((rows,), "bias", gen)
        t[f"{p}.self_attn.o_proj.weight"] = _draw((hidden, heads * head_dim), "w", gen)
        t[f"{p}.mlp.gate_proj.weight"] = _draw((inter, hidden), "w", gen)
        t[f"{p}.mlp.up_proj.weight"] = _draw((inter, hidden), "w", gen)
        t[f"{p}.mlp.down_proj.weight"] = _draw((hidden, inter), "w", gen)
        t[f"{p}.input_layernorm.weight"] = _draw((hidden,), "norm", gen)
        t[f"{p}.post_attention_layernorm.weight"] = _draw((hidden,), "norm", gen)
        if i in hybrid:
            t[f"{p}.self_attn.cross_attn_kv_proj.weight"] = _draw((2 * kv_heads * head_dim, hidden), "w", gen)
            t[f"{p}.self_attn.cross_attn_kv_proj.bias"] = _draw((2 * kv_heads * head_dim,), "bias", gen)
            t[f"{p}.self_attn.cross_attn_gate_proj.0.weight"] = _draw((1, hidden), "w", gen)
            t[f"{p}.self_attn.cross_attn_gate_proj.0.bias"] = _draw((1,), "bias", gen)
            # 0 at the start of the official training would switch the slow path off: keep it visible
            t[f"{p}.self_attn.cross_attn_warm_up_gate"] = 0.5 + 0.1 * torch.randn(1, generator=gen)
    t["model.norm.weight"] = _draw((hidden,), "norm", gen)
    t["lm_head.weight"] = 4 * torch.randn((vocab, hidden), generator=gen) / hidden**0.5
    v = "model.vision_tower.vision_tower"
    t[f"{v}.stem.0.weight"] = _draw((dims[0], 3, 4, 4), "w", gen)
    t[f"{v}.stem.0.bias"] = _draw((dims[0],), "bias", gen)
    t[f"{v}.stem.1.weight"] = _draw((dims[0],), "norm", gen)
    t[f"{v}.stem.1.bias"] = _draw((dims[0],), "bias", gen)
    for s, (dim, depth) in enumerate(zip(dims, depths, strict=True)):
        p = f"{v}.stages.{s}"
        if s:
            t[f"{p}.downsample.0.weight"] = _draw((dims[s - 1],), "norm", gen)
            t[f"{p}.downsample.0.bias"] = _draw((dims[s - 1],), "bias", gen)
            t[f"{p}.downsample.1.weight"] = _draw((dim, dims[s - 1], 2, 2), "w", gen)
            t[f"{p}.downsample.1.bias"] = _draw((dim,), "bias", gen)
        for b in range(depth):
            q = f"{p}.blocks.{b}"
            t[f"{q}.conv_dw.weight"] = _draw((dim, 1, 7, 7), "w", gen)
            t[f"{q}.conv_dw.bias"] = _draw((dim,), "bias", gen)
            t[f"{q}.norm.weight"] = _draw((dim,), "norm", gen)
            t[f"{q}.norm.bias"] = _draw((dim,), "bias", gen)
            t[f"{q}.mlp.fc1.weight"] = _draw((4 * dim, dim), "w", gen)
            t[f"{q}.mlp.fc1.bias"] = _draw((4 * dim,), "bias", gen)
            t[f"{q}.mlp.fc2.weight"] = _draw((dim, 4 * dim), "w", gen)
            t[f"{q}.mlp.fc2.bias"] = _draw((dim,), "bias", gen)
            t[f"{q}.weight"] = _draw((dim,), "scale", gen)
    t[f"{v}.head.norm.weight"] = _draw((dims[-1],), "norm", gen)
    t[f"{v}.head.norm.bias"] = _draw((dims[-1],), "bias", gen)
    t[f"{v}.head.fc.weight"] = _draw((10, dims[-1]), "w", gen)
    t[f"{v}.head.fc.bias"] = _draw((10,), "bias", gen)
    t["model.mm_projector.0.weight"] = _draw((hidden, dims[-1]), "w", gen)
    t["model.mm_projector.0.bias"] = _draw((hidden,), "bias", gen)
    t["model.mm_projector.2.weight"] = _draw((hidden, hidden), "w", gen)
    t["model.mm_projector.2.bias"] = _draw((hidden,), "bias", gen)
    save_file({k: x.to(dtype).contiguous() for k, x in t.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": endoftext, "eos_token_id": [im_end, endoftext], "pad_token_id": endoftext}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return folder


@torch.inference_mode()
def reference_logits(runtime: SlowFastRuntime, inputs: SlowFastInputs, generated: list[int]) -> torch.Tensor:
    """No-cache recompute of prompt + `generated` in one call, with the official token types:
    generated tokens are text but only the prompt's text tokens query the slow tokens.
    Returns float32 logits [len(generated) + 1, V] for the last prompt position onwards."""
    cfg = runtime.cfg.llm
    seq = runtime.sequence(inputs)
    embeds = seq.embeds
    if generated:
        extra = runtime.model.llm.embed_tokens(torch.tensor([generated], device=runtime.device))
        embeds = torch.cat([embeds, extra], dim=1)
    memory = runtime.model.slow_memory(seq.slow, seq.text_rows) if seq.slow is not None else None
    cache = KVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, cfg.head_dim, embeds.shape[1],
                    runtime.dtype, runtime.device)
    h = runtime.run_decoder(embeds, 0, cache, memory)
    return runtime.model.logits(h[0, seq.embeds.shape[1] - 1:])
