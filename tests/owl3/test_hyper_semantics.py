"""Mask and position semantics of hyper attention, checked on tiny checkpoints of each family,
including the static-gate 1B/2B-241014 family that has no official fixture."""

from __future__ import annotations

import pytest
import torch

from owlvid.kv_cache import KVCache

from .test_visual_cache import image


def all_position_logits(model, messages, images):
    """Logits at every prompt position (prefill only)."""
    runtime = model.runtime
    request, ids = model.prepare(messages, images=images, cut_enable=False)
    owl3 = runtime.model
    visual = owl3.visual_memory(owl3.encode_images(request["pixel_values"]), request["media_starts"])
    cfg = runtime.cfg.llm
    cache = KVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, cfg.head_dim, len(ids), runtime.dtype, "cpu")
    with torch.inference_mode():
        logits = runtime._forward(request["input_ids"], 0, cache, visual, last_only=False)[0]
    return logits, request["media_starts"]


@pytest.mark.parametrize("release", ["240728", "241014", "241101"])
def test_tokens_before_an_image_ignore_its_pixels(tiny_owl3_models, release):
    model = tiny_owl3_models[release]
    messages = [{"role": "user", "content": "A <|image|> then B <|image|> end"}]
    first, second_a, second_b = image(1), image(2), image(3)
    la, starts = all_position_logits(model, messages, [first, second_a])
    lb, _ = all_position_logits(model, messages, [first, second_b])
    s0, s1 = starts
    # Only the second image differs: every position up to its marker is unchanged ...
    boundary = s1 if release != "241101" else s1 - 1  # 241101: the `<` of a marker already sees its image
    assert torch.equal(la[: boundary + 1], lb[: boundary + 1])
    # ... and every position after it changes.
    assert (la[s1 + 1:] - lb[s1 + 1:]).abs().amax(dim=-1).min() > 1e-4

    # Changing the first image changes everything from its marker on and nothing before it.
    lc, _ = all_position_logits(model, messages, [image(4), second_a])
    boundary0 = s0 if release != "241101" else s0 - 1
    assert torch.equal(la[: boundary0 + 1], lc[: boundary0 + 1])
    assert (la[s0 + 1:] - lc[s0 + 1:]).abs().amax(dim=-1).min() > 1e-4


def test_marker_start_visibility_differs_by_family(tiny_owl3_models):
    """241101: the `<` token of a marker sees its image (i >= s); 240728/241014: it does not (i > s)."""
    messages = [{"role": "user", "content": "<|image|> x"}]
    for release, sees in (("240728", False), ("241014", False), ("241101", True)):
        model = tiny_owl3_models[release]
        la, (s0,) = all_position_logits(model, messages, [image(1)])
        lb, _ = all_position_logits(model, messages, [image(2)])
        assert (not torch.equal(la[s0], lb[s0])) == sees, release


def test_static_gate_is_used(tiny_owl3_models):
    """The static gate vector scales the visual contribution: with gate -> -inf (sigmoid 0) the image has
    no effect at all."""
    model = tiny_owl3_models["241014"]
    hyper = model.runtime.model.hyper_attentions()
    assert all(h.variant == "static_gate" for h in hyper)
    messages = [{"role": "user", "content": "<|image|> what"}]
    saved = [h.gate.detach().clone() for h in hyper]
    try:
        for h in hyper:
            h.gate.data.fill_(-1e4)
        la, _ = all_position_logits(model, messages, [image(1)])
        lb, _ = all_position_logits(model, messages, [image(2)])
        assert torch.equal(la, lb)
    finally:
        for h, g in zip(hyper, saved):
            h.gate.data.copy_(g)
    la, _ = all_position_logits(model, messages, [image(1)])
    lb, _ = all_position_logits(model, messages, [image(2)])
    assert not torch.equal(la, lb)


def test_variant_comes_from_keys_not_name(tiny_owl3_models):
    info = {rel: m.describe() for rel, m in tiny_owl3_models.items()}
    assert info["240728"]["hyper_attention"] == "dynamic_gate" and info["240728"]["cut_prompt"] == "v2_global"
    assert info["241014"]["hyper_attention"] == "static_gate" and info["241014"]["cut_prompt"] == "v3_global"
    assert info["241014"]["tied_embeddings"] is True
    assert info["241101"]["hyper_attention"] == "fused" and info["241101"]["projector"] == "mlp"
    assert info["241101"]["image_size"] == 378 and info["240728"]["image_size"] == 384
    assert info["240728"]["hyper_layers_0_based"] == [1, 3]
