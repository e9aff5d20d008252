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
def test_visual_kv_built_once_per_request(tiny_owl3_models, release, monkeypatch):
    model = tiny_owl3_models[release]
    hyper = model.runtime.model.hyper_attentions()
    assert len(hyper) == 2
    calls = [0] * len(hyper)

    def counting(index, visual_kv):
        def wrapper(*args, **kwargs):
            calls[index] += 1
            return visual_kv(*args, **kwargs)
        return wrapper

    for i, layer in enumerate(hyper):
        # An instance attribute shadows the method; monkeypatch deletes it again after the test.
        monkeypatch.setitem(vars(layer), "visual_kv", counting(i, layer.visual_kv))
    result = model.generate(two_image_messages(), max_new_tokens=12, cut_enable=False)
    assert result.completion_tokens >= 1
    assert calls == [1, 1]


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


def test_disk_cache_corrupt_entry_is_logged_and_dropped(tmp_path, caplog):
    """A missing entry is a quiet miss; a damaged one (truncated, overwritten) is a logged warning, deleted,
    and a miss, so the caller recomputes and rewrites it."""
    import logging

    from owlvid.cache import VisualCache

    cache = VisualCache(cache_dir=tmp_path)
    value = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    cache.put("good", value)
    with caplog.at_level(logging.WARNING, logger="owlvid.cache"):
        assert VisualCache(cache_dir=tmp_path).get("absent") is None
        assert not caplog.records
        assert torch.equal(VisualCache(cache_dir=tmp_path).get("good"), value)
        path = tmp_path / "good.safetensors"
        for damage in (path.read_bytes()[:-7], b"\x00" * 5, b"\x08\x00\x00\x00\x00\x00\x00\x00{\"x\": 1}"):
            path.write_bytes(damage)
            fresh = VisualCache(cache_dir=tmp_path)
            assert fresh.get("good") is None and fresh.misses == 1
            assert not path.exists()
        assert len(caplog.records) == 3
        assert all("corrupt entry" in r.getMessage() and "good.safetensors" in r.getMessage()
                   for r in caplog.records)
    cache.put("good", value)
    assert torch.equal(VisualCache(cache_dir=tmp_path).get("good"), value)
