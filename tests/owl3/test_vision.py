"""The SigLIP tower's inference path (in-place residual stream, blocked MLP) and the CPU chunk policy."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from owlvid.models.owl3 import Owl3, vision
from owlvid.models.owl3.config import SiglipConfig

TINY = SiglipConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_hidden_layers=4,
                    image_size=42, patch_size=14)


@pytest.fixture
def tower() -> vision.SiglipTower:
    torch.manual_seed(0)
    t = vision.SiglipTower(TINY).eval()
    with torch.no_grad():
        for p in t.parameters():
            p.normal_(0, 0.3)
    return t


def test_inference_path_matches_the_autograd_formula(tower, monkeypatch):
    # 3 crops x 9 patches = 27 rows in MLP blocks of 4: a ragged last block.
    monkeypatch.setattr(vision, "MLP_BLOCK_ROWS", 4)
    pixels = torch.randn(3, 3, 42, 42)
    with torch.enable_grad():  # the plain `x + f(x)` formula, no in-place update
        expected = tower(pixels).detach()
    with torch.inference_mode():
        got = tower(pixels)
    assert got.is_contiguous() and got.shape == (3, 9, 32)
    assert (got - expected).abs().max().item() < 1e-5
    assert expected.abs().max().item() > 0.5  # not a trivially small output


def test_layer_call_leaves_its_input_unchanged(tower):
    x = torch.randn(2, 9, 32)
    before = x.clone()
    with torch.inference_mode():
        out = tower.encoder.layers[0](x)
    assert torch.equal(x, before)
    assert (out - x).abs().max().item() > 1e-3


def test_embeddings_are_contiguous(tower):
    with torch.inference_mode():
        assert tower.embeddings(torch.randn(2, 3, 42, 42)).is_contiguous()


@pytest.mark.parametrize("device,dtype,configured,expected", [
    ("cpu", torch.float32, 16, 4),  # 729 x 1152 x 4 bytes = 3.4 MB per crop, 16 MB per chunk
    ("cpu", torch.bfloat16, 16, 9),
    ("cpu", torch.float32, 2, 2),  # config.json's vision_batch_size still caps it
    ("cuda", torch.float32, 16, 16),  # the policy is for CPU allocations only
])
def test_vision_chunk_policy(device, dtype, configured, expected):
    owl3 = SimpleNamespace(cfg=SimpleNamespace(vision=SiglipConfig(), vision_batch_size=configured))
    assert Owl3.vision_chunk(owl3, torch.device(device), dtype) == expected


def test_chunking_does_not_change_the_features(tiny_owl3_models):
    owl3 = tiny_owl3_models["241014"].runtime.model
    size = owl3.cfg.vision.image_size
    pixels = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(0))
    whole = owl3.encode_images(pixels)
    saved = owl3.cfg.vision_batch_size
    try:
        owl3.cfg.vision_batch_size = 2
        chunked = owl3.encode_images(pixels)
    finally:
        owl3.cfg.vision_batch_size = saved
    assert whole.shape[0] == 5
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)
