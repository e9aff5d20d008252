"""Tiny random checkpoints in the official Hugging Face layouts, for tests, examples and benchmarks.

Everything here is self-contained (no download): a byte-level BPE tokenizer with the three Qwen2
special tokens, and seeded random weights under the official tensor names.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_tiny_tokenizer(folder: str | Path) -> int:
    """A byte-level BPE over the 256 byte symbols plus a few merges; returns its size."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    merges = []
    for a, b in [("Ġ", "t"), ("h", "e"), ("i", "n"), ("a", "n"), ("Ġt", "he")]:
        merges.append((a, b))
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.save(str(folder / "tokenizer.json"))
    return tok.get_vocab_size(with_added_tokens=True)


def _init(shape: tuple[int, ...], kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "norm":
        return 1 + 0.1 * torch.randn(shape, generator=gen)
    if kind == "embed":
        return torch.randn(shape, generator=gen)
    if kind == "bias":
        return 0.05 * torch.randn(shape, generator=gen)
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    return torch.randn(shape, generator=gen) / fan_in**0.5


OWL3_VARIANTS = {
    # name: (attention variant, projector, image size, tied embeddings)
    "240728": ("dynamic_gate", "linear", 384, False),
    "241014": ("static_gate", "linear", 384, True),
    "241101": ("fused", "mlp", 378, False),
}


def make_tiny_owl3(folder: str | Path, release: str = "241101", *, seed: int = 0, hidden: int = 16,
                   layers: int = 4, hyper_layers: tuple[int, ...] = (2, 4), vision_layers: int = 3,
                   dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write config.json, model.safetensors and a tokenizer for a tiny mPLUG-Owl3 of `release` family."""
    attention, projector, image_size, tied = OWL3_VARIANTS[release]
    folder = Path(folder)
    vocab = write_tiny_tokenizer(folder) + 5  # spare rows without a token, as the real checkpoints
    heads, kv_heads, inter = 2, 1, 3 * hidden
    head_dim = hidden // heads
    vis = {"hidden_size": 32, "image_size": image_size, "intermediate_size": 64, "model_type": "siglip_vision_model",
           "num_attention_heads": 2, "num_hidden_layers": vision_layers, "patch_size": 14}
    config = {
        "architectures": ["mPLUGOwl3Model"], "model_type": "mplugowl3", "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": inter, "max_position_embeddings": 32768,
        "num_attention_heads": heads, "num_hidden_layers": layers, "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": tied, "torch_dtype": "bfloat16",
        "use_sliding_window": False, "vocab_size": vocab, "hyper_layers": list(hyper_layers), "vision_config": vis,
    }
    gen = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {}
    lm = "language_model.model"
    t[f"{lm}.embed_tokens.weight"] = _init((vocab, hidden), "embed", gen)
    for i in range(layers):
        p = f"{lm}.layers.{i}"
        for name, shape in [("q_proj", (heads * head_dim, hidden)), ("k_proj", (kv_heads * head_dim, hidden)),
                            ("v_proj", (kv_heads * head_dim, hidden))]:
            t[f"{p}.self_attn.{name}.weight"] = _init(shape, "w", gen)
            t[f"{p}.self_attn.{name}.bias"] = _init(shape[:1], "bias", gen)
        t[f"{p}.self_attn.o_proj.weight"] = _init((hidden, hidden), "w", gen)
        t[f"{p}.mlp.gate_proj.weight"] = _init((inter, hidden), "w", gen)
        t[f"{p}.mlp.up_proj.weight"] = _init((inter, hidden), "w", gen)
        t[f"{p}.mlp.down_proj.weight"] = _init((hidden, inter), "w", gen)
        t[f"{p}.input_layernorm.weight"] = _init((hidden,), "norm", gen)
        t[f"{p}.post_attention_layernorm.weight"] = _init((hidden,), "norm", gen)
        if i + 1 in hyper_layers:
            t[f"{p}.self_attn.v_kv_proj.weight"] = _init((2 * kv_heads * head_dim, hidden), "w", gen)
            t[f"{p}.self_attn.v_kv_proj.bias"] = _init((2 * kv_heads * head_dim,), "bias", gen)
            if attention == "dynamic_gate":
                t[f"{p}.self_attn.gate_proj.0.weight"] = _init((head_dim, head_dim), "w", gen)
                t[f"{p}.self_attn.gate_proj.0.bias"] = _init((head_dim,), "bias", gen)
            elif attention == "static_gate":
                t[f"{p}.self_attn.gate"] = torch.randn(hidden, generator=gen)
    t[f"{lm}.norm.weight"] = _init((hidden,), "norm", gen)
    if not tied:
        t["language_model.lm_head.weight"] = _init((vocab, hidden), "w", gen)
    d, m = vis["hidden_size"], vis["intermediate_size"]
    t["vision_model.embeddings.patch_embedding.weight"] = _init((d, 3, 14, 14), "w", gen)
    t["vision_model.embeddings.patch_embedding.bias"] = _init((d,), "bias", gen)
    t["vision_model.embeddings.position_embedding.weight"] = 0.5 * _init((729, d), "embed", gen)
    for i in range(vision_layers):
        p = f"vision_model.encoder.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[f"{p}.self_attn.{name}.weight"] = _init((d, d), "w", gen)
            t[f"{p}.self_attn.{name}.bias"] = _init((d,), "bias", gen)
        for ln in ("layer_norm1", "layer_norm2"):
            t[f"{p}.{ln}.weight"] = _init((d,), "norm", gen)
            t[f"{p}.{ln}.bias"] = _init((d,), "bias", gen)
        t[f"{p}.mlp.fc1.weight"] = _init((m, d), "w", gen)
        t[f"{p}.mlp.fc1.bias"] = _init((m,), "bias", gen)
        t[f"{p}.mlp.fc2.weight"] = _init((d, m), "w", gen)
        t[f"{p}.mlp.fc2.bias"] = _init((d,), "bias", gen)
    t["vision_model.post_layernorm.weight"] = _init((d,), "norm", gen)
    t["vision_model.post_layernorm.bias"] = _init((d,), "bias", gen)
    t["vision_model.head.probe"] = _init((1, 1, d), "embed", gen)
    if projector == "mlp":
        t["vision2text_model.0.weight"] = _init((hidden, d), "w", gen)
        t["vision2text_model.0.bias"] = _init((hidden,), "bias", gen)
        t["vision2text_model.2.weight"] = _init((hidden, hidden), "w", gen)
        t["vision2text_model.2.bias"] = _init((hidden,), "bias", gen)
    else:
        t["vision2text_model.weight"] = _init((hidden, d), "w", gen)
        t["vision2text_model.bias"] = _init((hidden,), "bias", gen)
    save_file({k: v.to(dtype).contiguous() for k, v in t.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "v_kv_proj",
                "cross_attn_kv_proj")


def make_lora_adapter(folder: str | Path, base: str | Path, *, seed: int = 0, r: int = 4, alpha: float = 8,
                      use_rslora: bool = False, targets: tuple[str, ...] = LORA_TARGETS,
                      under: str = "language_model", rank_pattern: dict | None = None,
                      alpha_pattern: dict | None = None, dtype: torch.dtype = torch.float32,
                      extra_config: dict | None = None) -> Path:
    """A random LoRA adapter of the checkpoint in `base`, on disk exactly as PEFT (and ms-swift, which
    trains through PEFT) saves one: adapter_config.json and adapter_model.safetensors keyed
    `base_model.model.<official module>.lora_A.weight` [r, in] / `lora_B.weight` [out, r], for every linear
    layer whose name is in `targets` and whose path starts with `under` (ms-swift's default for mPLUG-Owl3:
    the language model's linear layers). Both factors are random (a trained adapter's B is not zero)."""
    import re

    from safetensors import safe_open

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    with safe_open(str(Path(base) / "model.safetensors"), framework="pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    tensors = {}
    for key, shape in sorted(shapes.items()):
        module = key[: -len(".weight")]
        if not key.endswith(".weight") or len(shape) != 2 or not module.startswith(under) \
                or module.rsplit(".", 1)[-1] not in targets:
            continue
        rank = r
        for pattern, value in (rank_pattern or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                rank = value
                break
        out_features, in_features = shape
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, in_features, generator=gen) \
            / in_features**0.5
        tensors[f"base_model.model.{module}.lora_B.weight"] = 0.5 * torch.randn(out_features, rank, generator=gen) \
            / rank**0.5
    config = {
        "alpha_pattern": alpha_pattern or {}, "auto_mapping": None, "base_model_name_or_path": str(base),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "layer_replication": None, "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
        "lora_alpha": alpha, "lora_bias": False, "lora_dropout": 0.05, "megatron_config": None,
        "megatron_core": "megatron.core", "modules_to_save": [], "peft_type": "LORA", "r": r,
        "rank_pattern": rank_pattern or {}, "revision": None,
        # ms-swift writes its `all-linear` choice as one regex over the module paths
        "target_modules": rf"^({under}(?=\.).*\.({'|'.join(targets)}))$", "task_type": "CAUSAL_LM",
        "use_dora": False, "use_rslora": use_rslora,
    }
    config.update(extra_config or {})
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder
