"""Shared attention/linear kernels: the fast paths compute what the plain PyTorch calls compute."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from owlvid.layers import Linear, causal_mask, linear, sdpa, sdpa_parts


@pytest.mark.parametrize("rows", [1, 2, 4, 7, 32, 33])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_equals_f_linear(rows, bias):
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(48, 40, generator=gen)
    b = torch.randn(48, generator=gen) if bias else None
    x = torch.randn(1, rows, 40, generator=gen)
    out = linear(x, weight, b)
    assert out.shape == (1, rows, 48) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, weight, b), atol=1e-5, rtol=1e-5)
    layer = Linear(40, 48, bias=bias)
    assert set(dict(layer.named_parameters())) == ({"weight", "bias"} if bias else {"weight"})
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


def test_sdpa_drops_an_all_true_mask_without_changing_the_result():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 3, 8, generator=gen), torch.randn(1, 2, 10, 8, generator=gen),
               torch.randn(1, 2, 10, 8, generator=gen))
    full = torch.ones(3, 10, dtype=torch.bool)
    torch.testing.assert_close(sdpa(q, k, v, full), sdpa(q, k, v))
    partial = full.clone()
    partial[:, :4] = False
    assert not torch.allclose(sdpa(q, k, v, partial), sdpa(q, k, v))


@pytest.mark.parametrize("batch,rows", [(1, 1), (1, 3), (2, 1)])
def test_sdpa_parts_equals_attention_over_the_concatenation(batch, rows):
    gen = torch.Generator().manual_seed(batch * 10 + rows)
    q = torch.randn(batch, 14, rows, 16, generator=gen)
    vis_k, vis_v = torch.randn(batch, 2, 300, 16, generator=gen), torch.randn(batch, 2, 300, 16, generator=gen)
    txt_k, txt_v = torch.randn(batch, 2, 20, 16, generator=gen), torch.randn(batch, 2, 20, 16, generator=gen)
    if batch == 1:
        vis_mask = torch.rand(rows, 300, generator=gen) > 0.4
        txt_mask = causal_mask(rows, 20, "cpu").reshape(rows, 20)
    else:  # decoding a batch: [B, 1, 1, S] masks (padding of the shorter visual memory masked)
        vis_mask = torch.ones(batch, 1, 1, 300, dtype=torch.bool)
        vis_mask[1, ..., 200:] = False
        txt_mask = torch.ones(batch, 1, 1, 20, dtype=torch.bool)
    expected = sdpa(q, torch.cat([vis_k, txt_k], 2), torch.cat([vis_v, txt_v], 2),
                    torch.cat([vis_mask, txt_mask], -1))
    got = sdpa_parts(q, [(vis_k, vis_v, vis_mask), (txt_k, txt_v, txt_mask)])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
