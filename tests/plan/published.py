"""config.json values of the published checkpoints, as dicts (planning needs nothing else).

Sources: /work/shared/docs/mplug_owl3.md §1 (7B-240728 and 7B-241101 and 1B-241014 read from their hub
config.json files; 2B-241014 is Qwen2-1.5B's public architecture, [INFERRED] there from the 3.95 GB file, its
hyper_layers unknown: the HyperQwen2Config default is used, only their count matters for memory) and
/work/shared/docs/slowfast.md §1.2 (Qwen2-7B-Instruct plus the training scripts' values).
"""

SIGLIP = {"hidden_size": 1152, "intermediate_size": 4304, "num_attention_heads": 16, "num_hidden_layers": 27,
          "patch_size": 14, "model_type": "siglip_vision_model"}


def _owl3(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, tied: bool, hyper: list[int],
          image_size: int) -> dict:
    return {"model_type": "mplugowl3", "architectures": ["mPLUGOwl3Model"], "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "vocab_size": vocab, "tie_word_embeddings": tied, "hyper_layers": hyper,
            "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "use_sliding_window": False,
            "torch_dtype": "bfloat16", "vision_config": {**SIGLIP, "image_size": image_size}}


OWL3_7B_240728 = _owl3(3584, 18944, 28, 28, 4, 151851, False, [1, 9, 17, 25], 384)
OWL3_7B_241101 = _owl3(3584, 18944, 28, 28, 4, 151651, False, [7, 15, 23, 26], 378)
OWL3_1B_241014 = _owl3(896, 4864, 24, 14, 2, 151851, True, [6, 13, 20, 22], 384)
OWL3_2B_241014 = _owl3(1536, 8960, 28, 12, 2, 151851, True, [1, 9, 17, 25], 384)

SLOWFAST_7B_FRAME64 = {
    "model_type": "llava_qwen_slow_fast", "architectures": ["LlavaQwenSlowFastForCausalLM"], "hidden_size": 3584,
    "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
    "vocab_size": 152064, "tie_word_embeddings": False, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
    "rope_theta": 1e6, "use_sliding_window": False, "torch_dtype": "bfloat16", "mm_vision_tower": "convnext-576",
    "mm_hidden_size": 3072, "mm_projector_type": "mlp2x_gelu", "mm_patch_merge_type": "flat",
    "mm_video_pooling_stride": 2, "tokenizer_model_max_length": 4096, "cross_attn_every_n_layers": 8,
    "cross_attn_min_layer_depth": 0, "cross_attn_max_layer_depth": 28,
    "cross_attn_implementation": "text-only-vanilla-flashattn", "cross_attn_gating_type": "whole-dynamic-tanh-warmup",
    "fast_token_spatial_stride": 1, "fast_token_temporal_stride": 4, "fast_token_temporal_sampling_stride": 1,
    "min_fast_frames": 16, "mm_training_video_frames": 64,
}

PUBLISHED = {"mPLUG-Owl3-7B-240728": OWL3_7B_240728, "mPLUG-Owl3-7B-241101": OWL3_7B_241101,
             "mPLUG-Owl3-1B-241014": OWL3_1B_241014, "mPLUG-Owl3-2B-241014": OWL3_2B_241014,
             "Slow-Fast-7B-frame64": SLOWFAST_7B_FRAME64}
