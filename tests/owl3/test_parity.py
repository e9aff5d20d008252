"""Parity with the official mPLUG-Owl3 code on the shared golden fixtures (float32, CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ..conftest import FIXTURES, fixtures_or_skip

CASES = {
    "tiny-240728": ["single_image_nocut", "square_image_cut", "two_images_interleaved", "video_8_frames", "text_only"],
    "tiny-241101": ["single_image_nocut", "square_image_cut", "two_images_cut", "video_8_frames"],
}
PARAMS = [(ck, case) for ck, cases in CASES.items() for case in cases]


@pytest.fixture(scope="module")
def models():
    import owlvid

    root = fixtures_or_skip("owl3")
    return {ck: owlvid.load(root / ck, tokenizer=root / "tokenizer", dtype="float32", device="cpu") for ck in CASES}


def load_case(checkpoint: str, case: str):
    d = FIXTURES / "owl3" / "cases" / checkpoint / case
    inp = FIXTURES / "owl3" / "cases" / "_inputs" / case
    spec = json.loads((inp / "case.json").read_text())
    images = [Image.open(inp / p).convert("RGB") for p in spec["images"] or []]
    videos = [[Image.open(inp / p).convert("RGB") for p in v] for v in spec["videos"] or []]
    return d, spec, images, videos


@pytest.mark.parametrize("checkpoint,case", PARAMS)
def test_processor_matches_official(models, checkpoint, case):
    d, spec, images, videos = load_case(checkpoint, case)
    gold = json.loads((d / "processor.json").read_text())
    out = models[checkpoint].processor(spec["messages"], images=images, videos=videos, cut_enable=spec["cut_enable"])
    assert out["input_ids"][0].tolist() == gold["input_ids"]
    offset = out["media_offset"]
    offset = offset[0].tolist() if isinstance(offset, torch.Tensor) else [t.tolist() for t in offset]
    assert offset == gold["media_offset"]
    pixels = out["pixel_values"]
    if gold["pixel_values"] is None:
        assert pixels is None
        return
    stats = gold["pixel_values"]["stats"]
    assert list(pixels.shape) == stats["shape"]
    p64 = pixels.double()
    for key, value in (("sum_f64", p64.sum()), ("abs_sum_f64", p64.abs().sum()), ("sq_sum_f64", p64.pow(2).sum())):
        assert abs(float(value) - stats[key]) <= 1e-6 * max(1.0, abs(stats[key])), key
    size = pixels.shape[-1]
    for item in gold["pixel_values"]["per_image"]:
        crop = pixels[item["index"]]
        flat = crop.reshape(-1)
        sampled = flat[torch.tensor(item["sample_flat_indices"])].numpy()
        np.testing.assert_allclose(sampled, item["sample_values"], atol=1e-6)
        if size == 384:  # 240728: 48x48-pixel blocks
            blocks = crop.double().reshape(3, 8, 48, 8, 48).mean(dim=(2, 4))
        else:  # 241101: adaptive_avg_pool2d windows (overlapping by one pixel)
            blocks = F.adaptive_avg_pool2d(crop.double()[None], (8, 8))[0]
        np.testing.assert_allclose(blocks.numpy(), np.array(item["block_means_8x8"]), atol=1e-6)


@pytest.mark.parametrize("checkpoint,case", PARAMS)
def test_logits_and_greedy_tokens_match_official(models, checkpoint, case):
    from safetensors.numpy import load_file

    d, spec, images, videos = load_case(checkpoint, case)
    meta = json.loads((d / "meta.json").read_text())
    gold = load_file(str(d / "logits.safetensors"))
    model = models[checkpoint]
    kwargs = dict(images=images, videos=videos, cut_enable=spec["cut_enable"])
    logits = model.next_token_logits(spec["messages"], **kwargs).numpy()
    assert logits.shape == gold["last_logits"].shape
    assert np.abs(logits - gold["last_logits"]).max() < 1e-4
    assert int(logits.argmax()) == meta["last_logits_argmax"]

    # Greedy decoding through the engine, with per-step top-32 logits checked on the way.
    from owlvid.engine import SamplingParams, run_generation

    request, prompt_ids = model.prepare(spec["messages"], **kwargs)
    runtime = model.runtime
    step_logits = []
    prefill, decode = runtime.prefill, runtime.decode

    def recording_prefill(req):
        out, state = prefill(req)
        step_logits.append(out.float().cpu())
        return out, state

    def recording_decode(state, token):
        out = decode(state, token)
        step_logits.append(out.float().cpu())
        return out

    runtime.prefill, runtime.decode = recording_prefill, recording_decode
    try:
        *_, result = run_generation(runtime, request, prompt_ids, SamplingParams(max_new_tokens=16))
    finally:
        del runtime.prefill, runtime.decode
    assert result.token_ids == meta["greedy_new_token_ids"]
    top_ids, top_vals = gold["generation_step_logits_top_ids"], gold["generation_step_logits_top"]
    for step, ours in enumerate(step_logits[:16]):
        np.testing.assert_allclose(ours[torch.from_numpy(top_ids[step])].numpy(), top_vals[step], atol=1e-4)


def test_debug_states_single_image(models):
    """Vision embeddings, penultimate SigLIP layer and projector output of the first crop."""
    from safetensors.numpy import load_file

    d, spec, images, _ = load_case("tiny-240728", "single_image_nocut")
    states = load_file(str(d / "debug_states.safetensors"))
    model = models["tiny-240728"]
    pixels = model.processor(spec["messages"], images=images, cut_enable=False)["pixel_values"]
    owl3 = model.runtime.model
    with torch.inference_mode():
        emb = owl3.vision.embeddings(pixels)
        feats = owl3.vision(pixels)
        image_embeds = owl3.encode_images(pixels)
    np.testing.assert_allclose(emb[0].numpy(), states["vision_embeddings_output_item0"], atol=1e-4)
    np.testing.assert_allclose(feats[0].numpy(), states["vision_hidden_states_minus2_item0"], atol=1e-4)
    np.testing.assert_allclose(image_embeds[0].numpy(), states["image_embeds_item0"], atol=1e-4)


@pytest.fixture(scope="module")
def bf16_models():
    import owlvid

    root = fixtures_or_skip("owl3")
    return {ck: owlvid.load(root / ck, tokenizer=root / "tokenizer", dtype="bfloat16", device="cpu") for ck in CASES}


@pytest.mark.parametrize("checkpoint,case", PARAMS)
def test_bfloat16_matches_official_within_bf16_tolerance(bf16_models, checkpoint, case):
    """bf16 (what dtype="auto" picks on AVX512-BF16 CPUs and most GPUs) against the float32 goldens: the
    last-position logits within 0.15 over the whole vocabulary (measured <= 0.054; logits std ~1) with
    cosine > 0.9995 (measured >= 0.99993), and teacher-forced greedy decoding (fed the golden ids): per
    step the golden top-32 logits within 0.15 (measured <= 0.058) and the golden token ranked at most 2nd
    (measured: 1st, except once 2nd). bf16 greedy ids themselves may diverge where the golden margin
    (>= 8e-4) is below bf16 noise."""
    from safetensors.numpy import load_file

    from ..conftest import assert_close_to_golden_steps, teacher_forced_logits

    d, spec, images, videos = load_case(checkpoint, case)
    meta = json.loads((d / "meta.json").read_text())
    gold = load_file(str(d / "logits.safetensors"))
    model = bf16_models[checkpoint]
    assert model.dtype == torch.bfloat16
    kwargs = dict(images=images, videos=videos, cut_enable=spec["cut_enable"])
    request, _ = model.prepare(spec["messages"], **kwargs)
    steps = teacher_forced_logits(model.runtime, request, meta["greedy_new_token_ids"])
    last = torch.from_numpy(gold["last_logits"])
    assert steps[0].shape == last.shape
    assert (steps[0] - last).abs().max().item() < 0.15
    assert F.cosine_similarity(steps[0], last, dim=0).item() > 0.9995
    assert_close_to_golden_steps(steps, meta["greedy_new_token_ids"], gold["generation_step_logits_top_ids"],
                                 gold["generation_step_logits_top"], atol=0.15, max_rank=1)
