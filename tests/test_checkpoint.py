"""Checkpoint loading: local folders, sharded files, the hub cache, clear errors, bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import owlvid
from owlvid.errors import CheckpointError
from owlvid.testing import make_tiny_owl3


def copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_sharded_checkpoint_loads_identically(tiny_owl3_dirs, tiny_owl3_models, tmp_path):
    src = tiny_owl3_dirs["241101"]
    dst = copy_checkpoint(src, tmp_path / "sharded")
    tensors = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    keys = sorted(tensors)
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(dst / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model = owlvid.load(dst, dtype="float32", device="cpu")
    msg = [{"role": "user", "content": "hello"}]
    assert torch.equal(model.next_token_logits(msg), tiny_owl3_models["241101"].next_token_logits(msg))


def test_unused_tensors_are_optional_and_skipped(tiny_owl3_dirs, tmp_path):
    """The SigLIP head, post-layernorm and last encoder layer are never loaded (and may be absent)."""
    dst = copy_checkpoint(tiny_owl3_dirs["240728"], tmp_path / "nohead")
    tensors = load_file(str(dst / "model.safetensors"))
    kept = {k: v for k, v in tensors.items()
            if not k.startswith(("vision_model.head.", "vision_model.post_layernorm.",
                                 "vision_model.encoder.layers.2."))}
    assert len(kept) < len(tensors)
    save_file(kept, str(dst / "model.safetensors"))
    model = owlvid.load(dst, dtype="float32", device="cpu")
    names = {n for n, _ in model.runtime.model.named_parameters()}
    assert not any("post_layernorm" in n or ".head." in n or "encoder.layers.2." in n for n in names)


def test_missing_and_misshaped_tensors_name_the_key(tiny_owl3_dirs, tmp_path):
    dst = copy_checkpoint(tiny_owl3_dirs["241101"], tmp_path / "broken")
    tensors = load_file(str(dst / "model.safetensors"))
    key = "language_model.model.layers.1.mlp.up_proj.weight"
    save_file({k: v for k, v in tensors.items() if k != key}, str(dst / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor for 'llm.layers.1.mlp.up_proj.weight'"):
        owlvid.load(dst, device="cpu")
    tensors[key] = torch.zeros(3, 3, dtype=torch.bfloat16)
    save_file(tensors, str(dst / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"'{key}' has shape \(3, 3\)"):
        owlvid.load(dst, device="cpu")
    (dst / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        owlvid.load(dst, device="cpu")


def test_hyper_layer_without_visual_projection_is_rejected(tiny_owl3_dirs, tmp_path):
    dst = copy_checkpoint(tiny_owl3_dirs["241101"], tmp_path / "wrong-hyper")
    cfg = json.loads((dst / "config.json").read_text())
    cfg["hyper_layers"] = [1, 2]
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="hyper layer 1"):
        owlvid.load(dst, device="cpu")


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env},
                          timeout=120)


def test_hub_id_resolves_through_the_huggingface_cache(tiny_owl3_dirs, tmp_path):
    """A hub id goes through huggingface_hub's snapshot_download; here the cache already holds it and
    the hub is offline, so it must be found there without network."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny--owl3" / "snapshots" / ("a" * 40)
    copy_checkpoint(tiny_owl3_dirs["241101"], snapshot)
    (cache / "models--tiny--owl3" / "refs").mkdir(parents=True)
    (cache / "models--tiny--owl3" / "refs" / "main").write_text("a" * 40)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    ok = _run("import owlvid; m = owlvid.load('tiny/owl3', device='cpu'); print(m.runtime.folder)", env)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == str(snapshot)
    missing = _run("import owlvid\ntry:\n    owlvid.load('tiny/absent')\nexcept owlvid.CheckpointError as e:\n"
                   "    print('ERR', e)", env)
    assert missing.stdout.startswith("ERR cannot download 'tiny/absent'") and "\n" not in missing.stdout.strip()


def test_peak_memory_while_loading_is_bounded(tmp_path, tiny_owl3_dirs):
    """Peak RSS growth while loading stays within 1.3x the weights in the target dtype (measured 0.99x
    for bf16, 1.09x for float32 from a bf16 file). A tiny load first warms up the libraries."""
    folder = make_tiny_owl3(tmp_path / "mid", "241101", hidden=768, layers=6, hyper_layers=(3,))
    code = (
        "import owlvid\n"
        "def status(field):\n"
        "    line = next(x for x in open('/proc/self/status') if x.startswith(field))\n"
        "    return int(line.split()[1]) * 1024\n"
        f"owlvid.load({str(tiny_owl3_dirs['241101'])!r}, dtype='{{dtype}}', device='cpu')\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to the current RSS\n"
        "base = status('VmRSS')\n"
        f"m = owlvid.load({str(folder)!r}, dtype='{{dtype}}', device='cpu')\n"
        "size = sum(p.numel() * p.element_size() for p in m.runtime.model.parameters())\n"
        "print(status('VmHWM') - base, size)\n"
    )
    for dtype in ("bfloat16", "float32"):
        out = _run(code.format(dtype=dtype), {})
        assert out.returncode == 0, out.stderr
        grown, size = map(int, out.stdout.split())
        assert size > 50_000_000
        assert grown <= 1.3 * size, (dtype, grown / size)


def _with_config(src: Path, dst: Path, **changes) -> Path:
    copy_checkpoint(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(("changes", "match"), [
    ({"rope_scaling": {"type": "dynamic", "factor": 4.0}}, "rope_scaling"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"use_sliding_window": True, "sliding_window": 4096}, "sliding window"),
])
def test_unimplemented_qwen2_settings_are_rejected(tiny_owl3_dirs, tmp_path, changes, match):
    from owlvid.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match=match):
        owlvid.load(_with_config(tiny_owl3_dirs["241101"], tmp_path / "bad", **changes), device="cpu")


def test_released_qwen2_settings_load(tiny_owl3_dirs, tiny_owl3_models, tmp_path):
    """The released configs' values (1B-241014: sliding_window 32768 with use_sliding_window false; 241101's
    rope_scaling None) load unchanged, as does an explicit default RoPE or a window covering every position."""
    msg = [{"role": "user", "content": "hello"}]
    want = tiny_owl3_models["241101"].next_token_logits(msg)
    for i, changes in enumerate(({"sliding_window": 32768, "use_sliding_window": False, "rope_scaling": None},
                                 {"rope_scaling": {"rope_type": "default"}},
                                 {"sliding_window": 32768, "use_sliding_window": True,
                                  "max_position_embeddings": 32768})):
        folder = _with_config(tiny_owl3_dirs["241101"], tmp_path / str(i), **changes)
        assert torch.equal(owlvid.load(folder, dtype="float32", device="cpu").next_token_logits(msg), want)


def test_tied_config_with_stored_lm_head_warns(tiny_owl3_dirs, tmp_path, caplog):
    import logging

    folder = _with_config(tiny_owl3_dirs["240728"], tmp_path / "tied", tie_word_embeddings=True)
    with caplog.at_level(logging.WARNING, logger="owlvid.models.owl3"):
        owlvid.load(folder, dtype="float32", device="cpu")
    assert any("lm_head.weight is ignored" in r.getMessage() for r in caplog.records)


def test_float8_checkpoint_loads(tiny_owl3_dirs, tmp_path):
    """F8 tensors (E4M3 / E5M2) are read and cast like any other dtype: the model equals one loaded from
    the same values stored in bf16."""
    src = load_file(str(tiny_owl3_dirs["241101"] / "model.safetensors"))
    f8 = {k: v.to(torch.float8_e4m3fn if i % 2 else torch.float8_e5m2) for i, (k, v) in enumerate(src.items())}
    out = {}
    for name, tensors in (("f8", f8), ("bf16", {k: v.to(torch.bfloat16) for k, v in f8.items()})):
        dst = copy_checkpoint(tiny_owl3_dirs["241101"], tmp_path / name)
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
        out[name] = owlvid.load(dst, dtype="float32", device="cpu").next_token_logits(
            [{"role": "user", "content": "hello"}])
    assert torch.equal(out["f8"], out["bf16"])


def _write_raw_safetensors(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def test_invalid_headers_and_mismatched_shards_are_rejected(tiny_owl3_dirs, tmp_path):
    dst = copy_checkpoint(tiny_owl3_dirs["241101"], tmp_path / "bad")
    tensors = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    # two tensors sharing the same bytes (sizes right, offsets overlapping): safetensors rejects it
    _write_raw_safetensors(dst / "model.safetensors", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                                       "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
                           bytes(8))
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        owlvid.load(dst, device="cpu")
    (dst / "model.safetensors").unlink()
    keys = sorted(tensors)
    half = len(keys) // 2
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    save_file({k: tensors[k] for k in keys[:half + 1]}, str(dst / names[0]))  # keys[half] in both shards
    save_file({k: tensors[k] for k in keys[half:]}, str(dst / names[1]))
    weight_map = {k: names[i >= half] for i, k in enumerate(keys)}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=rf"index.json does not list '{keys[half]}' in {names[0]}"):
        owlvid.load(dst, device="cpu")
    save_file({k: tensors[k] for k in keys[:half]}, str(dst / names[0]))
    weight_map[keys[0]] = names[1]  # the index points at the wrong shard
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="mismatched shards"):
        owlvid.load(dst, device="cpu")
    (dst / "model.safetensors.index.json").unlink()  # no index: every *.safetensors, each key once
    save_file({k: tensors[k] for k in keys[:half + 1]}, str(dst / names[0]))
    with pytest.raises(CheckpointError, match=rf"'{keys[half]}' is stored twice"):
        owlvid.load(dst, device="cpu")
