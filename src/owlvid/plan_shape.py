"""config.json -> the numbers that decide a checkpoint's memory (`ModelShape`), for owlvid.plan.

Parameter counts follow the modules owlvid builds (tests/plan/test_plan.py checks them against the models built
on the meta device), not the files: the official checkpoints' unused tensors are never loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InputError


@dataclass
class ModelShape:
    """The numbers of a checkpoint that decide its memory, read from config.json."""

    family: str  # "owl3" | "slowfast"
    variant: str  # owl3: dynamic_gate / static_gate / fused; slowfast: the vision tower
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    special_layers: list[int]  # 0-based hyper / hybrid layers
    special_params: int  # extra parameters of one such layer
    vision_params: int
    projector_params: int
    visual_tokens: int  # per frame, in the visual K/V (owl3: 729 patches; slowfast: pooled slow tokens)
    vision_batch: int  # frames per vision-tower call
    vision_act_per_frame: int  # elements alive inside one vision-tower call, per frame
    vision_out_per_frame: int  # elements of one frame's projected features
    default_frames: int
    vision_width: int = 0  # SigLIP's hidden size (sets the CPU vision chunk)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def _owl3_shape(raw: dict, shapes: dict | None) -> ModelShape:
    vc = raw.get("vision_config") or {}
    d, m = int(vc.get("hidden_size", 1152)), int(vc.get("intermediate_size", 4304))
    vis_layers, size, patch = int(vc.get("num_hidden_layers", 27)), int(vc.get("image_size", 384)), int(
        vc.get("patch_size", 14))
    tied = bool(raw.get("tie_word_embeddings", False))
    if shapes is not None:  # the checkpoint's keys decide, as models/owl3/config.py
        tied = tied or "language_model.lm_head.weight" not in shapes
        variant = ("dynamic_gate" if any(k.endswith("self_attn.gate_proj.0.weight") for k in shapes) else
                   "static_gate" if any(k.endswith("self_attn.gate") for k in shapes) else "fused")
        mlp = "vision2text_model.0.weight" in shapes
    else:  # config only: 241101 has 378-px crops (fused, MLP projector); 241014 ties its embeddings
        variant = "fused" if size % patch == 0 else "static_gate" if tied else "dynamic_gate"
        mlp = variant == "fused"
    h, heads, kvh = int(raw["hidden_size"]), int(raw["num_attention_heads"]), int(raw["num_key_value_heads"])
    hd = h // heads
    gate = {"dynamic_gate": hd * hd + hd, "static_gate": h, "fused": 0}[variant]
    patches = (size // patch) ** 2
    layer = 4 * (d * d + d) + 4 * d + 2 * m * d + m + d
    return ModelShape(
        family="owl3", variant=variant, hidden=h, intermediate=int(raw["intermediate_size"]),
        layers=int(raw["num_hidden_layers"]), heads=heads, kv_heads=kvh, vocab=int(raw["vocab_size"]), tied=tied,
        special_layers=sorted(i - 1 for i in raw.get("hyper_layers", [1, 9, 17, 25])),
        special_params=2 * kvh * hd * (h + 1) + gate,
        vision_params=d * 3 * patch * patch + d + patches * d + (vis_layers - 1) * layer,
        projector_params=d * h + h + ((h * h + h) if mlp else 0),
        visual_tokens=patches, vision_batch=int(raw.get("vision_batch_size", 16)),
        # inside a SigLIP layer: the residual, its LayerNorm, q/k/v or the MLP's hidden (and its GELU)
        vision_act_per_frame=patches * (3 * d + 2 * m), vision_out_per_frame=patches * h, default_frames=16,
        vision_width=d)


def _slowfast_shape(raw: dict, shapes: dict | None) -> ModelShape:
    override = raw.get("convnext_config") or {}
    depths = list(override.get("depths", (3, 4, 30, 3)))
    dims = list(override.get("dims", (384, 768, 1536, 3072)))
    size = 576  # "convnext-576", the one tower owlvid supports
    params, prev = dims[0] * 3 * 16 + dims[0] + 2 * dims[0], dims[0]  # stem conv + LayerNorm
    act = 0
    for s, (depth, c) in enumerate(zip(depths, dims)):
        if s:
            params += 2 * prev + c * prev * 4 + c
        params += depth * (c * 49 + c + 2 * c + 4 * c * c + 4 * c + 4 * c * c + c + c)
        # a block holds its input, the depthwise conv and LayerNorm outputs and the 4x MLP hidden (+ GELU)
        act = max(act, (size // (4 << s)) ** 2 * 11 * c)
        prev = c
    h, heads, kvh = int(raw["hidden_size"]), int(raw["num_attention_heads"]), int(raw["num_key_value_heads"])
    kvd = kvh * (h // heads)
    proj = raw.get("mm_projector_type", "linear")
    n_linear = int(re.fullmatch(r"mlp(\d+)x_gelu", proj).group(1)) if proj != "linear" else 1
    every = int(raw.get("cross_attn_every_n_layers") or 1)
    lo, hi = int(raw.get("cross_attn_min_layer_depth") or 0), int(raw.get("cross_attn_max_layer_depth")
                                                                   or raw["num_hidden_layers"])
    vocab = int(shapes["model.embed_tokens.weight"][0]) if shapes else int(raw["vocab_size"])
    tied = bool(raw.get("tie_word_embeddings", False)) or (shapes is not None and "lm_head.weight" not in shapes)
    grid, pool = size // 32, int(raw.get("mm_video_pooling_stride") or 1)
    return ModelShape(
        family="slowfast", variant=str(raw.get("mm_vision_tower")), hidden=h,
        intermediate=int(raw["intermediate_size"]), layers=int(raw["num_hidden_layers"]), heads=heads,
        kv_heads=kvh, vocab=vocab, tied=tied, special_layers=list(range(lo, hi, every)),
        special_params=2 * kvd * (h + 1) + h + 1 + 1, vision_params=params,
        projector_params=dims[-1] * h + h + (n_linear - 1) * (h * h + h),
        visual_tokens=(grid // max(pool, 1)) ** 2, vision_batch=int(raw.get("vision_batch_size", 8)),
        vision_act_per_frame=act, vision_out_per_frame=grid * grid * (dims[-1] + h),
        default_frames=int(raw.get("mm_training_video_frames") or 64))


def model_shape(config: dict, shapes: dict[str, tuple[int, ...]] | None = None) -> ModelShape:
    """The ModelShape of a config.json (`shapes`, the checkpoint's tensor shapes when its weights are at
    hand, settles what config.json leaves open: the mPLUG-Owl3 variant, tied embeddings)."""
    kind = config.get("model_type")
    try:
        if kind == "mplugowl3":
            return _owl3_shape(config, shapes)
        if kind == "llava_qwen_slow_fast":
            return _slowfast_shape(config, shapes)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise InputError(f"config.json is not a complete {kind} config ({type(e).__name__}: {e})") from None
    raise InputError(f"cannot plan config.json model_type {kind!r} (owlvid supports mplugowl3 and "
                     "llava_qwen_slow_fast)")
