"""LoRA adapters (PEFT / ms-swift format): reading, merging at load, refusals, full fine-tunes.

The reference here is written in the tests from the math: the adapter merged into the official checkpoint's
tensors by hand, `W + scale * B @ A` with PEFT's scale (`alpha / r`, `alpha / sqrt(r)` with rslora, per-module
patterns), saved as a checkpoint and loaded as a base model. It covers every family (241014 and 241101 too);
tests/test_lora_goldens.py checks 240728 and Slow-Fast against the official code with PEFT applied.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import owlvid
from owlvid.errors import CheckpointError, InputError, UnsupportedError
from owlvid.testing import make_lora_adapter, make_tiny_owl3
from owlvid.testing.slowfast import make_tiny_slowfast


def image(seed: int, size=(320, 240)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def image_messages(text="Describe this image.", seed=7):
    return [{"role": "user", "content": [{"type": "image", "image": image(seed)}, {"type": "text", "text": text}]}]


def two_image_messages():
    return [{"role": "user", "content": [
        {"type": "text", "text": "First: "}, {"type": "image", "image": image(1)},
        {"type": "text", "text": " and second: "}, {"type": "image", "image": image(2, (200, 300))},
        {"type": "text", "text": "compare them"}]}]


def video_messages(n=8):
    rng = np.random.default_rng(3)
    frames = [Image.fromarray(rng.integers(0, 256, (36, 64, 3), dtype=np.uint8)) for _ in range(n)]
    return [{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "What?"}]}]


def reference_merge(base: Path, adapter: Path, out: Path) -> Path:
    """The adapter merged into the official tensors by hand (the test's own reading of the PEFT format)."""
    shutil.copytree(base, out)
    config = json.loads((adapter / "adapter_config.json").read_text())
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    weights = load_file(str(base / "model.safetensors"))
    for key in lora:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len("base_model.model."): -len(".lora_A.weight")]
        a = lora[key].double()
        b = lora[key.replace("lora_A", "lora_B")].double()
        r = a.shape[0]
        alpha = config["lora_alpha"]
        for pattern, value in config.get("alpha_pattern", {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = value
                break
        scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
        w = weights[module + ".weight"]
        weights[module + ".weight"] = (w.double() + scale * (b @ a)).to(w.dtype)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def owl3_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-owl3")
    return {rel: make_tiny_owl3(root / rel, rel, dtype=torch.float32) for rel in ("240728", "241014", "241101")}


@pytest.fixture(scope="module")
def slowfast_dir(tmp_path_factory):
    return make_tiny_slowfast(tmp_path_factory.mktemp("lora-slowfast"), dtype=torch.float32)


def load(folder, **kwargs):
    return owlvid.load(folder, device="cpu", dtype="float32", cache_bytes=0, **kwargs)


@pytest.mark.parametrize("release", ["240728", "241014", "241101"])
@pytest.mark.parametrize("options", [{}, {"use_rslora": True, "alpha": 16},
                                     {"r": 6, "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"q_proj": 3}}])
def test_merged_adapter_equals_reference_merge(owl3_dirs, tmp_path, release, options):
    base = owl3_dirs[release]
    adapter = make_lora_adapter(tmp_path / "adapter", base, seed=1, **options)
    reference = load(reference_merge(base, adapter, tmp_path / "merged"))
    merged = load(base, adapter=adapter)
    for messages in (image_messages(), two_image_messages()):
        want = reference.next_token_logits(messages)
        got = merged.next_token_logits(messages)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        assert (load(base).next_token_logits(messages) - want).abs().max() > 1e-2  # the adapter matters
    assert merged.generate(image_messages(), max_new_tokens=8).token_ids == \
        reference.generate(image_messages(), max_new_tokens=8).token_ids
    assert merged.describe()["adapter"]["modules"] == len(merged.runtime.merged_adapter.modules) > 0


def test_merged_slowfast_adapter_equals_reference_merge(slowfast_dir, tmp_path):
    adapter = make_lora_adapter(tmp_path / "adapter", slowfast_dir, seed=2, under="model.layers")
    reference = load(reference_merge(slowfast_dir, adapter, tmp_path / "merged"))
    merged = load(slowfast_dir, adapter=adapter)
    for messages in (image_messages(), video_messages()):
        torch.testing.assert_close(merged.next_token_logits(messages), reference.next_token_logits(messages),
                                   atol=2e-5, rtol=1e-5)
    assert merged.generate(video_messages(), max_new_tokens=6).token_ids == \
        reference.generate(video_messages(), max_new_tokens=6).token_ids


def test_vision_adapter_merges_and_changes_the_visual_cache_key(owl3_dirs, tmp_path):
    """An adapter on the vision tower and projector (ms-swift with freeze_vit / freeze_aligner off) merges;
    the visual cache keys change with it (features of the base tower must not be reused)."""
    base = owl3_dirs["241101"]
    adapter = make_lora_adapter(tmp_path / "adapter", base, seed=3, under="vision",
                                targets=("q_proj", "fc1", "out_proj", "0", "2"))
    reference = load(reference_merge(base, adapter, tmp_path / "merged"))
    merged = load(base, adapter=adapter)
    torch.testing.assert_close(merged.next_token_logits(image_messages()),
                               reference.next_token_logits(image_messages()), atol=2e-5, rtol=1e-5)
    assert merged.runtime.model_key != load(base).runtime.model_key
    modules = merged.runtime.merged_adapter.modules
    assert any(m.startswith("projector.") for m in modules) and any(m.startswith("vision.") for m in modules)


def test_unused_vision_tensors_are_listed(owl3_dirs, tmp_path):
    """LoRA factors on the last SigLIP layer (never run, as in the official code) load, and are listed."""
    base = owl3_dirs["241101"]
    adapter = make_lora_adapter(tmp_path / "adapter", base, under="vision_model.encoder.layers.2", targets=("fc1",))
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    extra = make_lora_adapter(tmp_path / "a3", base, targets=("q_proj",))
    tensors.update(load_file(str(extra / "adapter_model.safetensors")))
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    model = load(base, adapter=adapter)
    described = model.describe()["adapter"]
    assert len(described["unused_tensors"]) == 2 and all("layers.2.mlp.fc1" in k for k in described["unused_tensors"])


def edit_adapter(folder: Path, config: dict | None = None, tensors: dict | None = None, drop: str | None = None):
    if config:
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if tensors is not None or drop:
        t = load_file(str(folder / "adapter_model.safetensors"))
        t = {k: v for k, v in t.items() if not (drop and re.search(drop, k))}
        t.update(tensors or {})
        save_file(t, str(folder / "adapter_model.safetensors"))


LM = "base_model.model.language_model.model.layers.0"


@pytest.mark.parametrize("change, error, words", [
    ({"config": {"use_dora": True}}, UnsupportedError, "DoRA"),
    ({"config": {"bias": "all"}}, UnsupportedError, "bias 'all'"),
    ({"config": {"lora_bias": True}}, UnsupportedError, "lora_bias"),
    ({"config": {"modules_to_save": ["lm_head"]}}, UnsupportedError, "modules_to_save"),
    ({"config": {"peft_type": "IA3"}}, UnsupportedError, "'IA3'"),
    ({"config": {"r": 0}}, CheckpointError, "positive number 'r'"),
    ({"config": {"r": 8}}, CheckpointError, "rank 4 but adapter_config.json says r=8"),
    ({"tensors": {f"{LM}.self_attn.q_proj.lora_magnitude_vector": torch.ones(16)}}, UnsupportedError,
     "lora_magnitude_vector"),
    ({"tensors": {"base_model.model.language_model.model.embed_tokens.lora_embedding_A": torch.ones(4, 10)}},
     UnsupportedError, "lora_embedding_A"),
    ({"tensors": {f"{LM}.self_attn.q_proj.bias": torch.ones(16)}}, UnsupportedError, "q_proj.bias"),
    ({"tensors": {f"{LM}.self_attn.qkv.lora_A.weight": torch.ones(4, 16)}}, UnsupportedError,
     "not a linear layer of this model"),
    ({"tensors": {f"{LM}.self_attn.q_proj.lora_A.weight": torch.ones(4, 17)}}, CheckpointError, "do not fit"),
    ({"drop": r"layers\.1\.mlp\.up_proj\.lora_B"}, CheckpointError, "has lora_A but no lora_B"),
    ({"tensors": {"base_model.model.language_model.lm_head.lora_A.weight": torch.ones(4, 16),
                  "base_model.model.language_model.lm_head.lora_B.weight": torch.ones(10, 4)}},
     UnsupportedError, "ties to the token embeddings"),
])
def test_unsupported_adapters_are_refused_with_one_line(owl3_dirs, tmp_path, change, error, words):
    base = owl3_dirs["241014"]  # tied LM head
    adapter = make_lora_adapter(tmp_path / "adapter", base)
    edit_adapter(adapter, **change)
    with pytest.raises(error) as e:
        load(base, adapter=adapter)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_missing_adapter_files(owl3_dirs, tmp_path):
    base = owl3_dirs["241101"]
    with pytest.raises(CheckpointError, match="not found"):
        load(base, adapter=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no adapter_config.json"):
        load(base, adapter=tmp_path / "empty")
    adapter = make_lora_adapter(tmp_path / "adapter", base)
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="convert it to safetensors"):
        load(base, adapter=adapter)


def test_full_finetune_as_ms_swift_saves_it(owl3_dirs, tmp_path):
    """ms-swift saves a full fine-tune (and a merged LoRA export) with transformers' save_pretrained: the same
    official keys, sharded with an index, config.json with extra fields (dtype, auto_map, versions), extra
    files (args.json, the remote code); a tied LM head is stored once. It loads like a base checkpoint."""
    base = owl3_dirs["241014"]
    out = tmp_path / "full"
    out.mkdir()
    weights = load_file(str(base / "model.safetensors"))
    weights = {k: v * 1.01 if k.endswith("norm.weight") else v for k, v in weights.items()}  # "trained"
    keys = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in shards.items():
        save_file({k: weights[k] for k in part}, str(out / name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": 0}, "weight_map": {k: n for n, part in shards.items() for k in part}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((base / "config.json").read_text())
    config.update({"dtype": "float32", "transformers_version": "4.57.1", "use_cache": True,
                   "auto_map": {"AutoModel": "modeling_mplugowl3.mPLUGOwl3Model"}})
    (out / "config.json").write_text(json.dumps(config))
    for extra in ("args.json", "modeling_mplugowl3.py"):
        (out / extra).write_text("{}")
    shutil.copy(base / "tokenizer.json", out)
    tuned, original = load(out), load(base)
    got = tuned.next_token_logits(image_messages())
    reference = load(reference_copy(base, tmp_path / "ref", weights))
    torch.testing.assert_close(got, reference.next_token_logits(image_messages()), atol=1e-6, rtol=1e-6)
    assert (got - original.next_token_logits(image_messages())).abs().max() > 1e-3


def reference_copy(base: Path, out: Path, weights: dict) -> Path:
    shutil.copytree(base, out)
    save_file(weights, str(out / "model.safetensors"))
    return out


def test_lora_modules_names_are_checked(owl3_dirs):
    with pytest.raises(InputError, match="lora_modules must be a dict"):
        load(owl3_dirs["241101"], lora_modules=["a"])
    with pytest.raises(InputError, match="non-empty string"):
        load(owl3_dirs["241101"], lora_modules={" a": "x"})


def test_null_and_empty_config_fields_are_defaults(owl3_dirs, tmp_path):
    """Older PEFT / ms-swift versions write null (or omit) fields that newer ones write as false / []."""
    base = owl3_dirs["241101"]
    adapter = make_lora_adapter(tmp_path / "adapter", base, extra_config={
        "use_dora": None, "lora_bias": None, "modules_to_save": None, "bias": "none", "layer_replication": [],
        "trainable_token_indices": None, "use_qalora": False})
    assert load(base, adapter=adapter).runtime.merged_adapter.modules
