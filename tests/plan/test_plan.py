"""The memory planner (owlvid.plan) as a pure function: weights per group against the modules owlvid
builds, placements of the published 7B on the GPUs people have, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch

from owlvid.errors import InputError
from owlvid.plan import GiB, model_shape, need, parse_max_memory, parse_size, plan_memory

from ..conftest import fixtures_or_skip
from .published import OWL3_1B_241014, OWL3_7B_240728, OWL3_7B_241101, PUBLISHED, SLOWFAST_7B_FRAME64


def _module_bytes(config: dict, shapes: dict | None = None) -> dict[str, int]:
    """Bytes per planner group of the module owlvid builds from this config (on the meta device, bf16)."""
    if config["model_type"] == "mplugowl3":
        from owlvid.models.owl3.config import owl3_config
        from owlvid.models.owl3.model import Owl3 as Net
        cfg = owl3_config(config, shapes)
    else:
        from owlvid.models.slowfast.config import slowfast_config
        from owlvid.models.slowfast.model import SlowFast as Net
        cfg = slowfast_config(config, shapes)
    with torch.device("meta"):
        net = Net(cfg)
    out: dict[str, int] = {}
    for name, p in net.named_parameters():
        if name.startswith(("vision", "projector", "model.vision", "mm_projector")):
            group = "vision"
        elif name.startswith("llm.layers."):
            group = ".".join(name.split(".")[:3])
        elif name.startswith("llm.embed_tokens"):
            group = "llm.embed_tokens"
        else:
            group = "lm_head"
        out[group] = out.get(group, 0) + p.numel() * 2
    return out


def _owl3_shapes(config: dict) -> dict:
    """The checkpoint keys owl3_config looks at, as the published files have them."""
    shape = model_shape(config)
    prefix = "language_model.model.layers"
    keys = {f"{prefix}.{i}.self_attn.v_kv_proj.weight": (1,) for i in shape.special_layers}
    if shape.variant == "dynamic_gate":
        keys[f"{prefix}.0.self_attn.gate_proj.0.weight"] = (1,)
    elif shape.variant == "static_gate":
        keys[f"{prefix}.0.self_attn.gate"] = (1,)
    if shape.variant == "fused":
        keys["vision2text_model.0.weight"] = (1,)
    if not shape.tied:
        keys["language_model.lm_head.weight"] = (1,)
    return keys


def _groups(plan) -> dict[str, int]:
    return {g.name: g.weights for g in plan.groups}


@pytest.mark.parametrize("name", ["mPLUG-Owl3-7B-240728", "mPLUG-Owl3-7B-241101", "mPLUG-Owl3-1B-241014",
                                  "mPLUG-Owl3-2B-241014"])
def test_weights_per_group_equal_the_built_owl3_modules(name):
    config = PUBLISHED[name]
    plan = plan_memory(config, max_memory={"cpu": 1 << 50})
    assert _groups(plan) == _module_bytes(config, _owl3_shapes(config))


def test_weights_per_group_equal_the_built_slowfast_modules():
    shapes = {"model.embed_tokens.weight": (152064, 3584), "lm_head.weight": (152064, 3584)}
    shapes.update({f"model.layers.{i}.self_attn.cross_attn_kv_proj.weight": (1024, 3584) for i in (0, 8, 16, 24)})
    plan = plan_memory(SLOWFAST_7B_FRAME64, max_memory={"cpu": 1 << 50}, shapes=shapes)
    assert _groups(plan) == _module_bytes(SLOWFAST_7B_FRAME64, shapes)


@pytest.mark.parametrize("folder", [("owl3", "tiny-240728"), ("owl3", "tiny-241101"),
                                    ("slowfast", "tiny-slowfast-qwen2-convnext576-s1t4")])
def test_fixture_checkpoints_config_only_and_with_shapes(folder):
    """A config.json alone gives the same weights as the checkpoint's own tensor shapes."""
    from owlvid.checkpoint import checkpoint_shapes

    path = fixtures_or_skip(*folder)
    config = json.loads((path / "config.json").read_text())
    shapes = checkpoint_shapes(path)
    with_shapes = plan_memory(config, max_memory={"cpu": 1 << 40}, shapes=shapes)
    config_only = plan_memory(config, max_memory={"cpu": 1 << 40})
    assert _groups(config_only) == _groups(with_shapes) == _module_bytes(config, shapes)


def test_published_sizes_match_the_files():
    """bf16 weights against the published model.safetensors sizes (docs/mplug_owl3.md §1), less the tensors
    owlvid never loads: SigLIP's last layer and pooling head (2 x 15.2 M parameters, 61 MB)."""
    unused = 2 * (4 * (1152 * 1152 + 1152) + 2 * 1152 * 4304 + 4304 + 1152) * 2
    for config, published in ((OWL3_7B_240728, 16.12e9), (OWL3_1B_241014, 1.848e9)):
        weights = plan_memory(config, max_memory={"cpu": 1 << 50}).weights
        assert weights == pytest.approx(published - unused, rel=0.003)


def test_kv_and_visual_sizes_7b():
    plan = plan_memory(OWL3_7B_241101, max_memory={"cpu": 1 << 50}, max_frames=64)
    assert plan.kv_per_token == 28 * 2 * 4 * 128 * 2  # 56 KiB
    assert plan.visual_kv_per_frame == 4 * 729 * 2 * 4 * 128 * 2  # 5.7 MiB
    slow = plan_memory(SLOWFAST_7B_FRAME64, max_memory={"cpu": 1 << 50})
    assert slow.settings.max_frames == 64 and slow.visual_kv_per_frame == 4 * 81 * 2 * 4 * 128 * 2


def test_quantized_weights():
    bf16 = plan_memory(OWL3_7B_241101, max_memory={"cpu": 1 << 50})
    int8 = plan_memory(OWL3_7B_241101, max_memory={"cpu": 1 << 50}, quantize="int8")
    int4 = plan_memory(OWL3_7B_241101, max_memory={"cpu": 1 << 50}, quantize="int4")
    layer = "llm.layers.3"  # a plain layer: 7 projections, biases and norms
    projections = 2 * 3584 * 3584 + 2 * 512 * 3584 + 3 * 18944 * 3584
    rows = 2 * 3584 + 2 * 512 + 2 * 18944 + 3584
    assert _groups(int8)[layer] == projections + 5 * rows + (3584 + 1024 + 2 * 3584) * 2
    assert _groups(int4)[layer] == projections // 2 + projections // 128 * 4 + (3584 + 1024 + 2 * 3584) * 2
    # the vision tower is never quantized; the embedding is int8 in both modes
    assert _groups(int8)["vision"] == _groups(int4)["vision"] == _groups(bf16)["vision"]
    assert _groups(int8)["llm.embed_tokens"] == _groups(int4)["llm.embed_tokens"] == 151651 * (3584 + 5)
    assert 0.5 < int8.weights / bf16.weights < 0.56 and 0.3 < int4.weights / bf16.weights < 0.36


def _layers_on(plan, device: str) -> list[int]:
    dev = next(d for d in plan.devices if d.device == device)
    return [int(g.name.split(".")[-1]) for g in dev.groups if g.name.startswith("llm.layers.")]


def test_7b_on_four_16gb_gpus():
    """4 x T4 (16 GB, 14 GiB given to owlvid each), bf16, 64 frames, batch 8."""
    memory = parse_max_memory("cuda:0=14GiB,cuda:1=14GiB,cuda:2=14GiB,cuda:3=14GiB")
    auto = plan_memory(OWL3_7B_241101, max_memory=memory, max_frames=64)
    used = [d for d in auto.devices if d.groups]
    assert [d.device for d in used] == ["cuda:0", "cuda:1"]  # auto fills in order
    assert auto.devices[0].groups[0].name == "vision"
    assert all(0 <= d.headroom < 14 * GiB for d in used)
    assert _layers_on(auto, "cuda:0") + _layers_on(auto, "cuda:1") == list(range(28))
    balanced = plan_memory(OWL3_7B_241101, max_memory=memory, max_frames=64, device_map="balanced")
    counts = [len(_layers_on(balanced, f"cuda:{i}")) for i in range(4)]
    assert sum(counts) == 28 and counts[0] == min(counts) >= 4 and max(counts) <= 9  # cuda:0 holds the vision tower
    loads = [14 * GiB - d.headroom for d in balanced.devices]
    assert max(loads) - min(loads) < 0.5 * GiB
    assert max(loads) < max(14 * GiB - d.headroom for d in auto.devices)
    # the map owlvid.load would use: every group on exactly one device, in order
    device_of = balanced.device_of()
    assert device_of["vision"] == device_of["llm.embed_tokens"] == device_of["llm.layers.0"] == "cuda:0"
    assert device_of["lm_head"] == device_of["llm.layers.27"] == "cuda:3"


def test_7b_on_two_24gb_gpus_and_its_refusal_on_one():
    memory = parse_max_memory("cuda:0=22GiB,cuda:1=22GiB")
    plan = plan_memory(OWL3_7B_240728, max_memory=memory, max_frames=128, device_map="balanced")
    assert all(d.headroom >= 0 and _layers_on(plan, d.device) for d in plan.devices)
    with pytest.raises(InputError) as e:
        plan_memory(OWL3_7B_240728, max_memory={"cuda:0": 16 * GiB}, max_frames=128, max_batch=1)
    msg = str(e.value)
    assert "\n" not in msg and "does not fit on cuda:0=16.00GiB" in msg
    assert "--quantize int8" in msg and "one more 16.00 GiB GPU" in msg and "--max-frames" not in msg
    # what the refusal proposes works
    plan_memory(OWL3_7B_240728, max_memory={"cuda:0": 16 * GiB}, max_frames=128, max_batch=1, quantize="int8")
    plan_memory(OWL3_7B_240728, max_memory={"cuda:0": 16 * GiB, "cuda:1": 16 * GiB}, max_frames=128, max_batch=1)


def test_7b_on_one_24gb_gpu_and_cpu():
    """1 x 24 GB with a tight budget: auto leaves the last layers and the LM head to the CPU."""
    memory = parse_max_memory("cuda:0=12GiB,cpu=64GiB")
    plan = plan_memory(OWL3_7B_241101, max_memory=memory, max_frames=64)
    gpu, cpu = plan.devices
    assert gpu.groups[0].name == "vision" and 0 <= gpu.headroom < 1 * GiB
    assert _layers_on(plan, "cuda:0") == list(range(len(_layers_on(plan, "cuda:0"))))
    assert cpu.groups[-1].name == "lm_head" and _layers_on(plan, "cpu")[-1] == 27
    assert 8 < len(_layers_on(plan, "cuda:0")) < 24
    assert need(gpu.groups + [cpu.groups[0]], "cuda:0") > 12 * GiB  # the first layer left to the CPU did not fit
    # without the CPU in max_memory nothing is offloaded: refused, with what would fit
    with pytest.raises(InputError, match="it would fit with 2 more 12.00 GiB GPUs$"):
        plan_memory(OWL3_7B_241101, max_memory={"cuda:0": 12 * GiB}, max_frames=64)


def test_fewer_frames_suggested_when_the_visual_memory_is_what_overflows():
    memory = {"cuda:0": 7 * GiB}
    fits = plan_memory(OWL3_7B_241101, max_memory=memory, quantize="int4", max_frames=16, max_batch=1,
                       visual_cache_bytes=0, max_model_len=2048)
    assert fits.devices[0].headroom >= 0
    with pytest.raises(InputError) as e:
        plan_memory(OWL3_7B_241101, max_memory=memory, quantize="int4", max_frames=512, max_batch=1,
                    visual_cache_bytes=0, max_model_len=2048)
    msg = str(e.value)
    frames = int(msg.split("--max-frames ")[1].split(",")[0].split(" ")[0])
    assert 16 <= frames < 512
    plan_memory(OWL3_7B_241101, max_memory=memory, quantize="int4", max_frames=frames, max_batch=1,
                visual_cache_bytes=0, max_model_len=2048)
    with pytest.raises(InputError):
        plan_memory(OWL3_7B_241101, max_memory=memory, quantize="int4", max_frames=frames + 1, max_batch=1,
                    visual_cache_bytes=0, max_model_len=2048)


def test_nothing_fits_says_so():
    with pytest.raises(InputError, match="needs more memory than 1.00 GiB allows"):
        plan_memory(OWL3_7B_241101, max_memory={"cpu": 1 * GiB})


def test_explicit_device_map():
    memory = {"cuda:0": 20 * GiB, "cuda:1": 20 * GiB}
    mapping = {"": "cuda:0", "llm.layers.20": "cuda:1", "llm.layers.21": "cuda:1", "lm_head": "cuda:1"}
    plan = plan_memory(OWL3_1B_241014, max_memory=memory, device_map=mapping)
    assert _layers_on(plan, "cuda:1") == [20, 21]
    assert plan.device_of()["vision"] == "cuda:0" and plan.device_of()["lm_head"] == "cuda:1"
    with pytest.raises(InputError, match="max_memory does not list"):
        plan_memory(OWL3_1B_241014, max_memory=memory, device_map={"": "cuda:2"})
    with pytest.raises(InputError, match="no module prefix"):
        plan_memory(OWL3_1B_241014, max_memory=memory, device_map={"llm": "cuda:0"})


def test_more_frames_batch_and_context_cost_more():
    base = plan_memory(OWL3_7B_241101, max_memory={"cpu": 1 << 50}, max_frames=16).devices[0].headroom
    for change in ({"max_frames": 128}, {"max_batch": 16}, {"max_model_len": 8192}):
        settings = {"max_frames": 16, **change}
        assert plan_memory(OWL3_7B_241101, max_memory={"cpu": 1 << 50}, **settings).devices[0].headroom < base


def test_parsing():
    assert parse_size("14GiB") == 14 * GiB and parse_size("16GB") == 16 * 10**9 and parse_size("1.5g") == 3 * GiB // 2
    assert parse_max_memory("cpu=64GiB, 1=8GiB,cuda=10GiB") == {"cuda:1": 8 * GiB, "cuda:0": 10 * GiB,
                                                               "cpu": 64 * GiB}
    for bad in ("cuda:0=lots", "cuda:0", "tpu=4GiB", "cpu=1GiB,cpu=2GiB", ""):
        with pytest.raises(InputError):
            parse_max_memory(bad)
    with pytest.raises(InputError, match="model_type"):
        plan_memory({"model_type": "llama"}, max_memory={"cpu": GiB})
    with pytest.raises(InputError, match="not a complete mplugowl3 config"):
        plan_memory({"model_type": "mplugowl3"}, max_memory={"cpu": GiB})
    with pytest.raises(InputError, match="device_map"):
        plan_memory(OWL3_1B_241014, max_memory={"cpu": 64 * GiB}, device_map="sequential")
