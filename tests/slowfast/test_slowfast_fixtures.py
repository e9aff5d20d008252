"""Parity of the Slow-Fast implementation with the golden outputs of the official code (float32).

Fixtures: `tests/fixtures/slowfast` (see tests/conftest.py for the search order and OWLVID_FIXTURES).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ..conftest import FIXTURES, fixtures_or_skip

ROOT = FIXTURES / "slowfast"
CHECKPOINT = "tiny-slowfast-qwen2-convnext576-s1t4"
CASES = ["image_single_turn", "video_8f_single_turn", "video_16f_single_turn", "video_8f_two_turn"]
VOCAB = 151646



def case_dir(case: str) -> Path:
    return ROOT / "cases" / CHECKPOINT / case


def load_case(case: str) -> dict:
    return json.loads((case_dir(case) / "case.json").read_text(encoding="utf-8"))


def case_media(c: dict) -> tuple[list, list]:
    frames = [Image.open(case_dir(c["case"]) / f).convert("RGB") for f in c["visual"]["files"]]
    return (frames, []) if c["visual"]["kind"] == "image" else ([], [frames])


@pytest.fixture(scope="module")
def model():
    import owlvid

    return owlvid.load(fixtures_or_skip("slowfast", CHECKPOINT), device="cpu", dtype="float32")


@dataclass
class Run:
    case: dict
    inputs: dict
    prompt_ids: list[int]
    captured: dict
    prefill_logits: torch.Tensor
    prefill_len: int
    step_logits: list[torch.Tensor]
    tokens: list[int]


_RUNS: dict[str, Run] = {}


def run_case(model, case: str) -> Run:
    """Prepare, prefill (capturing intermediates) and decode 16 greedy tokens, once per case."""
    if case in _RUNS:
        return _RUNS[case]
    rt, net = model.runtime, model.runtime.model
    c = load_case(case)
    images, videos = case_media(c)
    inputs, prompt_ids = rt.prepare(c["messages"], images, videos, None)
    captured: dict = {"vision": [], "projector": [], "gates": {}}
    hooks = [net.vision_tower.register_forward_hook(lambda m, a, out: captured["vision"].append(out)),
             net.mm_projector.register_forward_hook(lambda m, a, out: captured["projector"].append(out))]
    for attn in net.hybrid_attentions():
        hooks.append(attn.cross_attn_gate_proj[-1].register_forward_hook(  # the Tanh: the gate's output
            lambda m, a, out, i=attn.layer_index: captured["gates"].setdefault(i, out)))
    original = net.fast_and_slow

    def spy(features):
        fast, slow = original(features)
        captured["fast"], captured["slow"] = fast, slow
        return fast, slow

    net.fast_and_slow = spy
    try:
        logits, state = rt.prefill(inputs)
    finally:
        del net.fast_and_slow
        for h in hooks:
            h.remove()
    prefill_len = state.position
    steps, tokens = [logits], []
    for i in range(16):
        tokens.append(int(torch.argmax(steps[-1])))
        if i < 15:
            steps.append(rt.decode(state, tokens[-1]))
    _RUNS[case] = Run(c, inputs, prompt_ids, captured, logits, prefill_len, steps, tokens)
    return _RUNS[case]


def stats(x: torch.Tensor) -> dict:
    x = x.double()
    return {"sum": x.sum().item(), "abs_sum": x.abs().sum().item(), "sq_sum": x.pow(2).sum().item(),
            "min": x.min().item(), "max": x.max().item()}


def assert_stats(x: torch.Tensor, ref: dict, rel: float, abs_: float, what: str) -> None:
    assert list(x.shape) == ref["shape"], f"{what}: shape {list(x.shape)} != {ref['shape']}"
    got = stats(x)
    for key in ("sum", "abs_sum", "sq_sum"):
        scale = max(abs(ref[key]), ref["abs_sum"] if key == "sum" else 0.0, 1.0)
        assert abs(got[key] - ref[key]) <= rel * scale, f"{what}.{key}: {got[key]} vs {ref[key]}"
    for key in ("min", "max"):
        assert abs(got[key] - ref[key]) <= abs_, f"{what}.{key}: {got[key]} vs {ref[key]}"


# ----------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_probes(model):
    summary = json.loads((ROOT / "summary.json").read_text(encoding="utf-8"))
    report = summary["tokenizer"]["report"]
    tok = model.tokenizer
    assert len(tok) == report["len_tokenizer"] == VOCAB
    for probe in report["probes"]:
        assert tok.encode(probe["text"]) == probe["ids"], probe["text"]
    for text, i in report["special_tokens"].items():
        assert tok.token_id(text) == i


def test_checkpoint_layout(model):
    info = model.describe()
    assert info["architecture"] == "slowfast"
    assert info["hybrid_layers_0_based"] == [0, 2, 4, 6]
    assert info["vocab_size"] == VOCAB and info["vocab_rows_stored"] == 152064
    assert model.runtime.stop_token_ids[:2] == [151645, 151643]
    assert model.runtime.video_options({}) == {"max_frames": 64, "sampling": "slowfast"}


# ----------------------------------------------------------------------------------------------- processor


@pytest.mark.parametrize("case", CASES)
def test_prompt_and_counts(model, case):
    r = run_case(model, case)
    c = r.case
    assert r.inputs["prompt"] == c["prompt"]
    assert r.inputs["input_ids"][0].tolist() == c["input_ids"]
    assert int((r.inputs["input_ids"] == -200).sum()) == c["num_image_placeholders"]
    assert r.inputs["num_fast_tokens"] == c["num_fast_tokens"] == r.captured["fast"].shape[0]
    assert r.inputs["num_slow_tokens"] == c["num_slow_tokens"] == r.captured["slow"].shape[0]
    assert r.prefill_len == r.inputs.seq_len == len(r.prompt_ids) == c["prefill_seq_len"]
    seq = model.runtime.sequence(r.inputs)
    assert {"1": seq.text_rows.numel(), "3": seq.num_fast} == c["token_type_counts"]
    assert seq.text_rows.numel() == c["num_text_tokens"]


@pytest.mark.parametrize("case", CASES)
def test_pixel_values(model, case):
    r = run_case(model, case)
    ref = r.case["pixel_values"]
    px = r.inputs["pixel_values"]
    assert list(px.shape) == ref["shape"] and px.dtype == torch.float32
    assert_stats(px, ref, rel=1e-6, abs_=1e-6, what="pixel_values")
    for t, ch, y, x, value in ref["samples"]:
        assert abs(px[t, ch, y, x].item() - value) <= 1e-6, (t, ch, y, x)


def test_resize_crop_is_pil_exact(model):
    inputs = json.loads((ROOT / "inputs" / "inputs.json").read_text(encoding="utf-8"))
    proc = model.runtime.processor.image_processor
    for src, ref in inputs["preprocessed_uint8_refs"].items():
        got = proc.resize_and_crop(Image.open(ROOT / "inputs" / src))
        want = np.asarray(Image.open(ROOT / "inputs" / ref["file"]).convert("RGB"))
        assert got.shape == want.shape == (576, 576, 3)
        assert np.array_equal(got, want), src


# ----------------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("case", CASES)
def test_intermediates(model, case):
    r = run_case(model, case)
    ref = r.case["intermediates"]
    assert_stats(torch.cat(r.captured["vision"]), ref["vision_tower_out"], 1e-4, 1e-4, "vision_tower_out")
    assert_stats(torch.cat(r.captured["projector"]), ref["projector_out"], 1e-4, 1e-4, "projector_out")
    from safetensors.torch import load_file

    golden = load_file(case_dir(case) / "intermediates.safetensors")
    for name in ("fast_tokens", "slow_tokens"):
        got, want = r.captured[name.split("_")[0]], golden[name]
        assert got.shape == want.shape, name
        assert (got - want).abs().max().item() <= 1e-4, name
        assert_stats(got, ref[name], 1e-4, 1e-4, name)
    for layer, gref in ref["hybrid_gate_proj_out"].items():
        gate = r.captured["gates"][int(layer)][0]  # [n_text, 1]
        assert_stats(gate, gref, 1e-4, 1e-4, f"gate[{layer}]")


@pytest.mark.parametrize("case", CASES)
def test_prefill_logits(model, case):
    from safetensors.torch import load_file

    r = run_case(model, case)
    want = load_file(case_dir(case) / "prefill_logits.safetensors")["logits"]
    assert r.prefill_logits.shape == want.shape == (VOCAB,)
    assert r.prefill_logits.dtype == torch.float32
    assert (r.prefill_logits - want).abs().max().item() <= 1e-4
    ref = r.case["prefill_last_logits"]
    assert int(torch.argmax(r.prefill_logits)) == ref["argmax"]
    assert torch.topk(r.prefill_logits, 5).indices.tolist() == ref["top5_ids"]


@pytest.mark.parametrize("case", CASES)
def test_greedy_tokens(model, case):
    from safetensors.torch import load_file

    r = run_case(model, case)
    assert r.tokens == r.case["generation"]["token_ids"]
    golden = load_file(case_dir(case) / "intermediates.safetensors")
    ids, values = golden["generate_step_logits_top16_ids"], golden["generate_step_logits_top16_values"]
    for step, logits in enumerate(r.step_logits):
        assert (logits[ids[step]] - values[step]).abs().max().item() <= 1e-4, step


def test_api_generate_matches(model):
    """The public API path (content parts, engine loop) gives the golden greedy tokens."""
    c = load_case("video_8f_two_turn")
    _, videos = case_media(c)
    first = c["messages"][0]["content"].replace("<image>\n", "")
    parts = [{"type": "video", "video": videos[0]}, {"type": "text", "text": first}]
    messages = [{"role": "user", "content": parts}, *c["messages"][1:]]
    out = model.generate(messages, max_new_tokens=16)
    assert out.token_ids == c["generation"]["token_ids"]
    assert out.prompt_tokens == c["prefill_seq_len"]


def test_batched_decoding_gives_the_golden_tokens(model):
    """The four cases decoded together (continuous batching: each joins between steps, its prompt prefilled
    in chunks of 256 positions) give the official greedy tokens, as each alone."""
    from owlvid.engine import Engine, SamplingParams

    engine = Engine(model.runtime, max_batch=4, prefill_chunk=256)
    streams = []
    with_rows = []
    hook = model.runtime.model.llm.register_forward_pre_hook(lambda m, args: with_rows.append(args[0].shape[0]))
    try:
        for case in CASES:
            c = load_case(case)
            request, ids = model.runtime.prepare(c["messages"], *case_media(c), None)
            streams.append((c, engine.add(request, ids, SamplingParams(max_new_tokens=16)).stream))
            engine.step()
        while engine.active:
            engine.step()
    finally:
        hook.remove()
    for c, stream in streams:
        assert stream.result().token_ids == c["generation"]["token_ids"], c["case"]
    assert max(with_rows) >= 3


# ----------------------------------------------------------------------------------------------- bfloat16


@pytest.fixture(scope="module")
def bf16_model():
    import owlvid

    return owlvid.load(fixtures_or_skip("slowfast", CHECKPOINT), device="cpu", dtype="bfloat16")


# The two 8/16-frame single-turn cases add nothing in bf16 the two below do not cover and cost ~4 s per
# frame there (bf16 ConvNeXt at 576 px without AVX512-BF16); the 64-frame pooling path is covered by
# tests/slowfast/test_slowfast_tiny.py::test_64_frames_bfloat16.
@pytest.mark.parametrize("case", ["image_single_turn", "video_8f_two_turn"])
def test_bfloat16_matches_official_within_bf16_tolerance(bf16_model, case):
    """bf16 against the float32 goldens: prefill logits within 0.5 over the whole vocabulary (measured
    <= 0.25 over all four cases; logits std ~4) with cosine > 0.9995 (measured >= 0.99991); teacher-forced
    decoding (fed the golden ids): per step the golden top-16 logits within 0.35 (measured <= 0.17) and
    the golden token ranked at most 2nd (measured: 1st except once). Free-running bf16 greedy ids may
    diverge where the golden top-1/top-2 margin (>= 0.013) is below bf16 noise."""
    from safetensors.torch import load_file

    from ..conftest import assert_close_to_golden_steps, teacher_forced_logits

    c = load_case(case)
    images, videos = case_media(c)
    rt = bf16_model.runtime
    assert bf16_model.dtype == torch.bfloat16
    inputs, _ = rt.prepare(c["messages"], images, videos, None)
    tokens = c["generation"]["token_ids"]
    steps = teacher_forced_logits(rt, inputs, tokens)
    want = load_file(case_dir(case) / "prefill_logits.safetensors")["logits"]
    assert steps[0].shape == want.shape
    assert (steps[0] - want).abs().max().item() < 0.5
    assert torch.nn.functional.cosine_similarity(steps[0], want, dim=0).item() > 0.9995
    golden = load_file(case_dir(case) / "intermediates.safetensors")
    assert_close_to_golden_steps(steps, tokens, golden["generate_step_logits_top16_ids"],
                                 golden["generate_step_logits_top16_values"], atol=0.35, max_rank=1)
