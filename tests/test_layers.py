"""Shared attention/linear kernels: the fast paths compute what the plain PyTorch calls compute."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

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


def reference_attention(q, k, v, mask=None):
    """Plain SDPA with every K/V head copied for the query heads that share it."""
    groups = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                          attn_mask=mask)


def _mask(kind: str, batch: int, t: int, s: int, gen) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "2d":  # one [T, S] mask for the batch
        return torch.rand(t, s, generator=gen) > 0.3
    if kind == "per-sample":  # [B, 1, T, S], every row keeps at least its first key
        m = torch.rand(batch, 1, t, s, generator=gen) > 0.5
        m[..., 0] = True
        return m
    m = torch.ones(batch, 1, 1, s, dtype=torch.bool)  # "padding": decoding rows, sample 1 shorter
    m[-1, ..., s // 2:] = False
    return m


TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 3e-2, torch.float16: 3e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (14, 2)])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("case", ["causal-prefill", "causal-chunk", "causal-decode", "none", "2d", "per-sample",
                                  "padding"])
def test_sdpa_gqa_equals_attention_over_repeated_kv(dtype, heads, kv_heads, batch, case):
    """owlvid's GQA attention (query heads folded, K/V never copied) equals torch SDPA over K/V repeated per
    query head, in every dtype dtype="auto" can pick, against the same computation in that dtype (measured
    max |diff|: 3.6e-7 in float32, 0 in bfloat16 and float16). `is_causal` with fewer queries than keys
    means the queries are the last positions (it was top-left aligned without GQA before)."""
    gen = torch.Generator().manual_seed(heads * 100 + kv_heads * 10 + batch)
    t, s = {"causal-prefill": (9, 9), "causal-chunk": (5, 12), "causal-decode": (1, 12), "padding": (1, 16)
            }.get(case, (6, 16))
    q = torch.randn(batch, heads, t, 16, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, s, 16, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, s, 16, generator=gen).to(dtype)
    if case.startswith("causal"):
        got = sdpa(q, k, v, is_causal=True)
        want = reference_attention(q, k, v, causal_mask(t, s, "cpu"))
    else:
        mask = _mask(case, batch, t, s, gen)
        got = sdpa(q, k, v, mask)
        want = reference_attention(q, k, v, mask)
    assert got.shape == want.shape == (batch, heads, t, 16) and got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), atol=TOLERANCE[dtype], rtol=0)


@pytest.mark.parametrize("rows", [1, 4, 32])
def test_linear_in_bfloat16_is_f_linear(rows):
    """bfloat16 keeps `F.linear` for a few rows too (its kernel reads the weight at the memory rate; the
    float32 `weight @ x.T` path is slower there), on 2-D rows even for a strided slice (the logits input)."""
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(48, 40, generator=gen).bfloat16()
    x = torch.randn(rows, 3, 40, generator=gen).bfloat16()[:, -1:]
    out = linear(x, weight)
    assert out.shape == (rows, 1, 48)
    assert torch.equal(out, F.linear(x.reshape(rows, 40), weight).reshape(rows, 1, 48))


class _OpLog(TorchDispatchMode):
    """Every aten op run inside, with the element count of its output(s)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.ops.append((str(func), t.numel()))
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_last_position_logits_never_expand_the_weight(dtype):
    """Regression: `F.linear` on a [B, 1, H] slice of a longer sequence (the logits of the last position)
    goes through a batched matmul with the weight expanded per row; on oneDNN (AVX512-BF16) that copied the
    whole tied 151851x896 embedding on every prefill (0.5 s). `linear` must run one 2-D GEMM instead."""
    weight = torch.randn(5000, 64).to(dtype)
    x = torch.randn(2, 7, 64).to(dtype)[:, -1:]
    plain = _OpLog()
    with plain:
        F.linear(x, weight)
    assert max(n for _, n in plain.ops) > weight.numel()  # the hazard exists: the weight is expanded
    log = _OpLog()
    with log:
        out = linear(x, weight)
    assert out.shape == (2, 1, 5000)
    assert max(n for _, n in log.ops) <= weight.numel()
    assert any(name.startswith(("aten.mm", "aten.addmm")) for name, _ in log.ops)
    assert not any(name.startswith(("aten.bmm", "aten.expand")) for name, _ in log.ops)
