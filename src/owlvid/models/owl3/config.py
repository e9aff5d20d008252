"""mPLUG-Owl3 configuration: the SigLIP and Owl3 config dataclasses and `owl3_config`, which reads
config.json and checks it against the checkpoint's tensor names and shapes.

The hyper-attention variant is picked from the checkpoint keys, never from the model name:
  * ``dynamic_gate`` (7B-240728): ``self_attn.gate_proj`` per hyper layer;
  * ``static_gate`` (1B/2B-241014): a learned vector ``self_attn.gate``;
  * ``fused`` (7B/2B-241101): neither.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ...errors import CheckpointError
from ...layers import Qwen2Config

log = logging.getLogger("owlvid.models.owl3")

@dataclass
class SiglipConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_attention_heads: int = 16
    num_hidden_layers: int = 27
    image_size: int = 384
    patch_size: int = 14
    layer_norm_eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class Owl3Config:
    llm: Qwen2Config
    vision: SiglipConfig
    hyper_layers: list[int]  # 0-based (config.json stores them 1-based)
    attention: str  # "dynamic_gate" | "static_gate" | "fused"
    projector: str  # "linear" | "mlp"
    vision_batch_size: int = 16
    raw: dict = field(default_factory=dict)

    @property
    def release_family(self) -> str:
        return {"dynamic_gate": "240728", "static_gate": "241014", "fused": "241101"}[self.attention]

    @property
    def cut_prompt(self) -> str:
        """`v2_global` only for 240728 (untied dynamic-gate 7B); 241014 and 241101 use `v3_global`."""
        if self.attention == "dynamic_gate" and not self.llm.tie_word_embeddings:
            return "v2"
        return "v3"

    @property
    def media_offset_format(self) -> str:
        return "starts" if self.attention == "fused" else "rows"

    @property
    def strict_visibility(self) -> bool:
        """240728/241014: token i sees media j iff i > s_j (MI-RoPE at s_j + 1); 241101: i >= s_j (at s_j)."""
        return self.attention != "fused"


def owl3_config(raw: dict, shapes: dict[str, tuple[int, ...]]) -> Owl3Config:
    """Read config.json and pick the variant from the checkpoint keys (never from the name)."""
    try:
        llm = Qwen2Config.from_dict(raw)
        vc = raw["vision_config"]
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"config.json is not an mPLUG-Owl3 config (missing {e})") from None
    vision = SiglipConfig(**{k: vc[k] for k in SiglipConfig.__dataclass_fields__ if k in vc})
    hyper = sorted(i - 1 for i in raw.get("hyper_layers", [1, 9, 17, 25]))
    prefix = "language_model.model.layers"
    if any(k.endswith("self_attn.gate_proj.0.weight") for k in shapes):
        attention = "dynamic_gate"
    elif any(k.endswith("self_attn.gate") for k in shapes):
        attention = "static_gate"
    else:
        attention = "fused"
    for i in hyper:
        if f"{prefix}.{i}.self_attn.v_kv_proj.weight" not in shapes:
            raise CheckpointError(f"hyper layer {i + 1} of config.json has no '{prefix}.{i}.self_attn.v_kv_proj"
                                  ".weight' in the checkpoint")
    projector = "mlp" if "vision2text_model.0.weight" in shapes else "linear"
    if "language_model.lm_head.weight" not in shapes:
        llm.tie_word_embeddings = True
    elif llm.tie_word_embeddings:
        log.warning("config.json ties the output layer to the embeddings (tie_word_embeddings true): the "
                    "checkpoint's language_model.lm_head.weight is ignored")
    return Owl3Config(llm=llm, vision=vision, hyper_layers=hyper, attention=attention, projector=projector,
                      vision_batch_size=int(raw.get("vision_batch_size", 16)), raw=raw)
