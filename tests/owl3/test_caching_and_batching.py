"""Encode once / ask many (visual cache, multi-turn prefix reuse) and batched decoding: results must be
exactly what a plain, unbatched, uncached run gives."""

from __future__ import annotations

import pytest

import owlvid
from owlvid.engine import Engine, SamplingParams

from .test_visual_cache import image


def conversations():
    frames = [image(10 + i, (160, 120)) for i in range(3)]
    return [
        [{"role": "user", "content": [{"type": "image", "image": image(1)}, {"type": "text", "text": "Describe."}]}],
        [{"role": "user", "content": "A text-only question that is a little longer than the others."}],
        [{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "What happens?"}]}],
        [{"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image", "image": image(2)},
                                      {"type": "text", "text": " with "}, {"type": "image", "image": image(3)}]}],
    ]


@pytest.mark.parametrize("release", ["240728", "241014", "241101"])
def test_batch_results_equal_individual_results(tiny_owl3_dirs, release):
    model = owlvid.load(tiny_owl3_dirs[release], dtype="float32", device="cpu", cache_bytes=0)
    model.runtime.prefix_slots = 0
    alone = [model.generate(c, max_new_tokens=12) for c in conversations()]
    batched = model.generate_batch(conversations(), max_new_tokens=12)
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert [r.text for r in batched] == [r.text for r in alone]
    assert all(r.completion_tokens >= 1 for r in batched)


def test_requests_join_a_running_batch(tiny_owl3_dirs):
    """Continuous batching: a request added between steps decodes exactly as it would alone."""
    model = owlvid.load(tiny_owl3_dirs["241101"], dtype="float32", device="cpu", cache_bytes=0)
    model.runtime.prefix_slots = 0
    convs = conversations()
    alone = [model.generate(c, max_new_tokens=10).token_ids for c in convs]
    engine = Engine(model.runtime)
    params = SamplingParams(max_new_tokens=10)
    streams = [engine.add(*model.prepare(convs[0]), params).stream]
    for conv in convs[1:]:
        engine.step()
        engine.step()
        streams.append(engine.add(*model.prepare(conv), SamplingParams(max_new_tokens=10)).stream)
    while engine.active:
        engine.step()
    assert [s.result().token_ids for s in streams] == alone


def test_second_question_reuses_cached_image_features(tiny_owl3_dirs, tmp_path):
    model = owlvid.load(tiny_owl3_dirs["240728"], dtype="float32", device="cpu", cache_dir=tmp_path / "vc")
    model.runtime.prefix_slots = 0  # measure the visual cache alone
    plain = owlvid.load(tiny_owl3_dirs["240728"], dtype="float32", device="cpu", cache_bytes=0)
    conv = conversations()[3]
    first = model.generate(conv, max_new_tokens=8)
    stats = dict(model.runtime.stats)
    assert stats["encoded_crops"] == 14 and stats["cached_crops"] == 0  # two 4:3 images cut 2x3 + global
    second = model.generate(conv, max_new_tokens=8)
    assert model.runtime.stats["encoded_crops"] == 14 and model.runtime.stats["cached_crops"] == 14
    assert first.token_ids == second.token_ids == plain.generate(conv, max_new_tokens=8).token_ids
    # A fresh model instance sharing the disk cache encodes nothing.
    other = owlvid.load(tiny_owl3_dirs["240728"], dtype="float32", device="cpu", cache_dir=tmp_path / "vc")
    assert other.generate(conv, max_new_tokens=8).token_ids == first.token_ids
    assert other.runtime.stats["encoded_crops"] == 0 and other.runtime.stats["cached_crops"] == 14
    assert len(list((tmp_path / "vc").glob("*.safetensors"))) == 2


def test_memory_budget_evicts_least_recently_used():
    import torch

    from owlvid.cache import VisualCache

    cache = VisualCache(max_bytes=3 * 400)
    for i in range(4):
        cache.put(f"k{i}", torch.zeros(100))  # 400 bytes each
    assert cache.get("k0") is None and cache.get("k3") is not None and cache.nbytes <= 1200


def test_multi_turn_reuses_the_prefix_kv_cache(tiny_owl3_dirs):
    model = owlvid.load(tiny_owl3_dirs["241101"], dtype="float32", device="cpu")
    fresh = owlvid.load(tiny_owl3_dirs["241101"], dtype="float32", device="cpu")
    fresh.runtime.prefix_slots = 0
    conv = conversations()[0]
    answer = model.generate(conv, max_new_tokens=8)
    turn2 = conv + [{"role": "assistant", "content": answer.text},
                    {"role": "user", "content": "And what else?"}]
    second = model.generate(turn2, max_new_tokens=8)
    assert model.runtime.stats["prefix_reused_tokens"] > 0
    assert second.token_ids == fresh.generate(turn2, max_new_tokens=8).token_ids
    assert model.runtime.stats["encoded_crops"] == 7  # the image (2x3 + global) was encoded once
