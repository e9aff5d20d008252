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


# ------------------------------------------------------------------ bf16 CPU kernels (blocked attention, fused GELU)


def _sdpa_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    b, t, d = q.shape
    split = (x.float().view(b, t, heads, -1).transpose(1, 2) for x in (q, k, v))
    return torch.nn.functional.scaled_dot_product_attention(*split).transpose(1, 2).reshape(b, t, d)


@pytest.mark.parametrize("head_block", [4, 3, 1])  # 3: a ragged last block of heads
def test_blocked_attention_equals_sdpa(monkeypatch, head_block):
    monkeypatch.setattr(vision, "ATTENTION_HEAD_BLOCK", head_block)
    gen = torch.Generator().manual_seed(head_block)
    q, k, v = (torch.randn(3, 9, 4 * 8, generator=gen) * 2 for _ in range(3))
    want = _sdpa_reference(q, k, v, 4)
    got = vision.blocked_attention(q, k, v, 4)
    assert got.shape == (3, 9, 32) and got.is_contiguous()
    torch.testing.assert_close(got, want, atol=2e-6, rtol=0)  # float32: the same sums, another order
    # bf16: scores and probabilities rounded to bf16 (as the official eager attention does), so within a few
    # bf16 steps of the float32 result, as SDPA in bf16 (its flash kernel keeps the probabilities in float32).
    q16, k16, v16 = (x.bfloat16() for x in (q, k, v))
    exact = _sdpa_reference(q16, k16, v16, 4)
    blocked_err = (vision.blocked_attention(q16, k16, v16, 4).float() - exact).abs().max().item()
    sdpa_err = (torch.nn.functional.scaled_dot_product_attention(
        *(x.view(3, 9, 4, 8).transpose(1, 2) for x in (q16, k16, v16))).transpose(1, 2).reshape(3, 9, 32).float()
        - exact).abs().max().item()
    ulp = exact.abs().max().item() * 2 ** -8
    assert blocked_err < 5 * max(sdpa_err, ulp), (blocked_err, sdpa_err, ulp)  # measured 1.4-3.7x
    # no farther than the official eager SigLIP attention in bf16 (bf16 scores, softmax in float32 cast to bf16):
    qh, kh, vh = (x.view(3, 9, 4, 8).transpose(1, 2) for x in (q16, k16, v16))
    probs = torch.softmax(qh @ kh.transpose(-1, -2) * 8 ** -0.5, -1, dtype=torch.float32).bfloat16()
    official = (probs @ vh).transpose(1, 2).reshape(3, 9, 32).float()
    official_err = (official - exact).abs().max().item()
    assert blocked_err < official_err + ulp, (blocked_err, official_err, ulp)
    assert want.abs().max().item() > 1.0


def test_bf16_kernels_policy(monkeypatch):
    monkeypatch.setattr(vision, "_bf16_cpu_kernels", lambda: True)
    monkeypatch.delenv("OWLVID_VISION_BF16_KERNELS", raising=False)
    bf16 = torch.zeros(1, dtype=torch.bfloat16)
    assert not vision.bf16_kernels_apply(bf16)  # autograd on: the plain modules
    with torch.no_grad():
        assert vision.bf16_kernels_apply(bf16)
        assert not vision.bf16_kernels_apply(bf16.float())  # float32 keeps SDPA (its flash kernel is faster)
        assert not vision.bf16_kernels_apply(torch.zeros(1, dtype=torch.bfloat16, device="meta"))  # not a CPU
        monkeypatch.setenv("OWLVID_VISION_BF16_KERNELS", "0")
        assert not vision.bf16_kernels_apply(bf16)
        monkeypatch.setattr(vision, "_bf16_cpu_kernels", lambda: False)  # no AVX512-BF16 / AMX
        monkeypatch.delenv("OWLVID_VISION_BF16_KERNELS")
        assert not vision.bf16_kernels_apply(bf16)


@pytest.mark.skipif(not vision._bf16_cpu_kernels(), reason="needs a CPU with AVX512-BF16 or AMX")
def test_bf16_kernels_keep_the_features_within_bf16_tolerance(tower, monkeypatch):
    """The bf16 tower with the kernels (blocked attention, GELU in the GEMM epilogue) is as close to the
    float32 features as the plain bf16 path (SDPA, separate GELU), in MLP blocks with a ragged last one."""
    monkeypatch.setattr(vision, "MLP_BLOCK_ROWS", 4)
    pixels = torch.randn(3, 3, 42, 42, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = tower(pixels)
        bf = tower.to(torch.bfloat16)
        monkeypatch.setenv("OWLVID_VISION_BF16_KERNELS", "0")
        plain = bf(pixels.bfloat16()).float()
        monkeypatch.setenv("OWLVID_VISION_BF16_KERNELS", "1")
        fast = bf(pixels.bfloat16()).float()
    plain_err, fast_err = (plain - want).abs().max().item(), (fast - want).abs().max().item()
    assert not torch.equal(fast, plain)  # the kernels did run
    assert fast_err < max(2 * plain_err, 0.05 * want.abs().max().item()), (fast_err, plain_err)
    assert torch.nn.functional.cosine_similarity(fast.flatten(), want.flatten(), dim=0).item() > 0.999
