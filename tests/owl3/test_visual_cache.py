"""Visual keys/values are built once per request and reused at every decoding step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from owlvid.engine import SamplingParams, run_generation


def image(seed: int, size=(320, 240)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def two_image_messages():
    return [{"role": "user", "content": [
        {"type": "text", "text": "First: "}, {"type": "image", "image": image(1)},
        {"type": "text", "text": " and second: "}, {"type": "image", "image": image(2, (200, 300))},
        {"type": "text", "text": "compare them"}]}]


@pytest.mark.parametrize("release", ["240728", "241014", "241101"])
def test_visual_kv_built_once_per_request(tiny_owl3_models, release):
    model = tiny_owl3_models[release]
    hyper = model.runtime.model.hyper_attentions()
    assert len(hyper) == 2
    before = [h.visual_kv_calls for h in hyper]
    result = model.generate(two_image_messages(), max_new_tokens=12, cut_enable=False)
    assert result.completion_tokens >= 1
    assert [h.visual_kv_calls - b for h, b in zip(hyper, before)] == [1, 1]


@pytest.mark.parametrize("release", ["240728", "241014", "241101"])
def test_cached_decoding_equals_full_recompute(tiny_owl3_models, release):
    """Greedy tokens with cached text+visual K/V equal a step-by-step full recompute (the official
    code path: no cache, visual K/V rebuilt for every step)."""
    model = tiny_owl3_models[release]
    runtime = model.runtime
    request, prompt_ids = model.prepare(two_image_messages(), cut_enable=True)
    *_, cached = run_generation(runtime, request, prompt_ids, SamplingParams(max_new_tokens=10))
    assert cached.completion_tokens == 10 or cached.finish_reason == "stop"

    ids = list(prompt_ids)
    recomputed = []
    for _ in range(cached.completion_tokens):
        step = dict(request)
        step["input_ids"] = torch.tensor([ids])
        logits, _ = runtime.prefill(type(request)(step))
        token = int(torch.argmax(logits))
        recomputed.append(token)
        ids.append(token)
    assert recomputed == cached.token_ids
