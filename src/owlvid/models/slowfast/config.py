"""Slow-Fast configuration: `config.json` (official schema plus the owlvid `convnext_config` extension)
read into `SlowFastConfig` and checked against the checkpoint keys; the ConvNeXt tower's shape.

The official tower is ConvNeXt-XXLarge (`convnext_xxlarge.clip_laion2b_soup`) at 576 px: depths
(3, 4, 30, 3), widths (384, 768, 1536, 3072), LayerNorm eps 1e-5.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from ...errors import CheckpointError, UnsupportedError
from ...layers import Qwen2Config

IMAGE_TOKEN_INDEX = -200
SUPPORTED_TOWERS = {"convnext-576": 576}
SUPPORTED_CROSS_ATTN = "text-only-vanilla"  # "text-only-vanilla-flashattn" in the released configs
SUPPORTED_GATING = "whole-dynamic-tanh-warmup"
CONVNEXT_XXL_DEPTHS = (3, 4, 30, 3)
CONVNEXT_XXL_DIMS = (384, 768, 1536, 3072)

log = logging.getLogger("owlvid.models.slowfast")


@dataclass
class ConvNextConfig:
    """Shape of the ConvNeXt tower (defaults: the official XXL at 576 px)."""

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


@dataclass
class SlowFastConfig:
    llm: Qwen2Config  # vocab_size = embedding rows stored in the checkpoint
    vision: ConvNextConfig
    projector: str  # "linear" or "mlp{N}x_gelu"
    hybrid_layers: list[int]
    video_pooling_stride: int = 2
    fast_temporal_sampling_stride: int = 1
    fast_temporal_stride: int = 4
    fast_spatial_stride: int = 1
    min_fast_frames: int = 16
    model_max_length: int | None = 4096  # `tokenizer_model_max_length`: official truncation after splicing
    training_frames: int = 64  # `mm_training_video_frames`
    vision_batch_size: int = 8
    raw: dict = field(default_factory=dict)

    @property
    def mm_hidden_size(self) -> int:
        return self.vision.hidden_size


def _int(raw: dict, key: str, default: int) -> int:
    value = raw.get(key)
    return default if value is None else int(value)


def slowfast_config(raw: dict, shapes: dict[str, tuple[int, ...]]) -> SlowFastConfig:
    """Read config.json (official schema plus the owlvid `convnext_config` extension) and check it
    against the checkpoint keys."""
    try:
        # LlavaQwenSlowFastForCausalLM.__init__ forces rope_scaling to None: whatever the file says is unused.
        llm = Qwen2Config.from_dict({**raw, "rope_scaling": None})
    except TypeError as e:
        raise CheckpointError(f"config.json is not a Slow-Fast (Qwen2) config: {e}") from None
    rows = shapes.get("model.embed_tokens.weight")
    if rows is None:
        raise CheckpointError("checkpoint has no 'model.embed_tokens.weight': not a Slow-Fast checkpoint")
    llm.vocab_size = rows[0]
    if "lm_head.weight" not in shapes:
        llm.tie_word_embeddings = True
    elif llm.tie_word_embeddings:
        log.warning("config.json ties the output layer to the embeddings (tie_word_embeddings true): the "
                    "checkpoint's lm_head.weight is ignored")
    # checkpoint_key_map skips image_newline and vision_resampler.*: only right for these two settings.
    merge = raw.get("mm_patch_merge_type") or "flat"
    if merge != "flat":
        raise UnsupportedError(f"unsupported mm_patch_merge_type {merge!r} (owlvid implements 'flat', the "
                               "released models' choice)")
    resampler = raw.get("mm_resampler_type")
    if resampler not in (None, "identity"):
        raise UnsupportedError(f"unsupported mm_resampler_type {resampler!r} (owlvid implements none)")

    tower = raw.get("mm_vision_tower")
    if tower not in SUPPORTED_TOWERS:
        raise CheckpointError(f"unsupported vision tower {tower!r} (owlvid supports "
                              f"{sorted(SUPPORTED_TOWERS)})")
    vision = ConvNextConfig(image_size=SUPPORTED_TOWERS[tower])
    override = raw.get("convnext_config")
    if override:  # owlvid extension for tiny test checkpoints; real checkpoints hard-code ConvNeXt-XXL
        vision = ConvNextConfig(depths=tuple(override.get("depths", vision.depths)),
                                dims=tuple(override.get("dims", vision.dims)),
                                norm_eps=float(override.get("norm_eps", vision.norm_eps)),
                                image_size=vision.image_size)
    if len(vision.depths) != 4 or len(vision.dims) != 4:
        raise CheckpointError("convnext_config needs four stage depths and four widths")
    mm_hidden = raw.get("mm_hidden_size")
    if mm_hidden is not None and int(mm_hidden) != vision.hidden_size:
        raise CheckpointError(f"mm_hidden_size {mm_hidden} does not match the ConvNeXt width "
                              f"{vision.hidden_size}")

    projector = raw.get("mm_projector_type", "linear")
    if projector != "linear" and not re.fullmatch(r"mlp(\d+)x_gelu", projector):
        raise CheckpointError(f"unsupported mm_projector_type {projector!r} (linear or mlpNx_gelu)")

    impl = raw.get("cross_attn_implementation") or ""
    if not impl.startswith(SUPPORTED_CROSS_ATTN) or "masksystem" in impl:
        raise CheckpointError(f"unsupported cross_attn_implementation {impl!r} (owlvid implements "
                              "'text-only-vanilla[-flashattn]', the released models' choice)")
    gating = raw.get("cross_attn_gating_type")
    if gating != SUPPORTED_GATING:
        raise CheckpointError(f"unsupported cross_attn_gating_type {gating!r} (owlvid implements "
                              f"{SUPPORTED_GATING!r})")
    every = raw.get("cross_attn_every_n_layers")
    if not every:
        raise CheckpointError("config.json has no cross_attn_every_n_layers: not a Slow-Fast checkpoint")
    lo = _int(raw, "cross_attn_min_layer_depth", 0)
    hi = _int(raw, "cross_attn_max_layer_depth", llm.num_hidden_layers)
    hybrid = list(range(lo, hi, int(every)))
    for i in hybrid:
        key = f"model.layers.{i}.self_attn.cross_attn_kv_proj.weight"
        if key not in shapes:
            raise CheckpointError(f"hybrid layer {i} of config.json has no {key!r} in the checkpoint")

    max_len = raw.get("tokenizer_model_max_length")
    return SlowFastConfig(
        llm=llm, vision=vision, projector=projector, hybrid_layers=hybrid,
        video_pooling_stride=_int(raw, "mm_video_pooling_stride", 1),
        fast_temporal_sampling_stride=_int(raw, "fast_token_temporal_sampling_stride", 1),
        fast_temporal_stride=_int(raw, "fast_token_temporal_stride", 1),
        fast_spatial_stride=_int(raw, "fast_token_spatial_stride", 1),
        min_fast_frames=_int(raw, "min_fast_frames", 1),
        model_max_length=None if max_len is None else int(max_len),
        training_frames=_int(raw, "mm_training_video_frames", 64),
        vision_batch_size=_int(raw, "vision_batch_size", 8),
        raw=raw,
    )
