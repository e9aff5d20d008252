"""Several LoRA adapters kept unmerged (`lora_modules`): per request, per batch row, equal to the merged path."""

from __future__ import annotations

import pytest
import torch

import owlvid
from owlvid.errors import InputError, UnsupportedError
from owlvid.testing import make_lora_adapter, make_tiny_owl3
from owlvid.testing.slowfast import make_tiny_slowfast

from .test_lora import image_messages, two_image_messages, video_messages


def load(folder, **kwargs):
    return owlvid.load(folder, device="cpu", dtype="float32", **kwargs)


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    """Per model: (base folder, {adapter name: folder}) with two adapters of different ranks and scales."""
    root = tmp_path_factory.mktemp("lora-unmerged")
    out = {}
    for rel in ("240728", "241014", "241101"):
        base = make_tiny_owl3(root / rel, rel, dtype=torch.float32)
        out[rel] = (base, {"a": make_lora_adapter(root / f"{rel}-a", base, seed=1),
                           "b": make_lora_adapter(root / f"{rel}-b", base, seed=2, r=2, alpha=4, use_rslora=True,
                                                  targets=("q_proj", "v_proj", "down_proj", "v_kv_proj"))})
    base = make_tiny_slowfast(root / "slowfast", dtype=torch.float32)
    out["slowfast"] = (base, {"a": make_lora_adapter(root / "sf-a", base, seed=1, under="model.layers"),
                              "b": make_lora_adapter(root / "sf-b", base, seed=2, r=8, under="model.layers",
                                                     targets=("k_proj", "o_proj", "up_proj", "cross_attn_kv_proj"))})
    return out


def cases(name):
    return [image_messages(), video_messages()] if name == "slowfast" else [image_messages(), two_image_messages()]


@pytest.fixture(scope="module")
def loaded(setups):
    """Models loaded once per module: loaded(name, "served" | "plain" | adapter name (merged))."""
    memo = {}

    def get(name, kind):
        if (name, kind) not in memo:
            base, adapters = setups[name]
            options = {"served": {"lora_modules": adapters}, "plain": {}}.get(kind, {"adapter": adapters.get(kind)})
            memo[name, kind] = load(base, **options)
        return memo[name, kind]

    return get


@pytest.mark.parametrize("name", ["241101", "slowfast", pytest.param("240728", marks=pytest.mark.slow),
                                  pytest.param("241014", marks=pytest.mark.slow)])
def test_unmerged_equals_merged(loaded, name):
    served, plain = loaded(name, "served"), loaded(name, "plain")
    assert served.adapter_names == ["a", "b"]
    for adapter in ("a", "b"):
        merged = loaded(name, adapter)
        for messages in cases(name):
            want = merged.next_token_logits(messages)
            torch.testing.assert_close(served.next_token_logits(messages, adapter=adapter), want,
                                       atol=2e-5, rtol=1e-5)
            assert (plain.next_token_logits(messages) - want).abs().max() > 1e-2
        messages = cases(name)[0]
        assert served.generate(messages, adapter=adapter, max_new_tokens=8).token_ids == \
            merged.generate(messages, max_new_tokens=8).token_ids
    assert "".join(served.stream(messages, adapter="a", max_new_tokens=8)) == \
        loaded(name, "a").chat(messages, max_new_tokens=8)
    torch.testing.assert_close(served.next_token_logits(messages), plain.next_token_logits(messages),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["241101", "slowfast", pytest.param("240728", marks=pytest.mark.slow)])
def test_mixed_batch_gives_each_row_its_own_tokens(loaded, name):
    """Rows on the base and two adapters decode in one batch (with max_batch 2, rows join as others leave):
    each row gets the tokens it gets alone, and the adapters do change the answers."""
    served = loaded(name, "served")
    first, second = cases(name)
    conversations = [first, first, first, second, second, first]
    names = [None, "a", "b", "a", None, "b"]
    solo = [served.generate(c, adapter=n, max_new_tokens=6).token_ids for c, n in zip(conversations, names)]
    for max_batch in (8, 2):
        together = served.generate_batch(conversations, adapters=names, max_batch=max_batch, max_new_tokens=6)
        assert [g.token_ids for g in together] == solo
    assert len({tuple(t) for t in solo[:3]}) == 3  # base, a and b answer the same prompt differently


def test_prefix_cache_is_per_adapter(setups, loaded):
    """A finished conversation's cache is reused for the next turn on the same adapter only."""
    served = load(setups["241101"][0], lora_modules=setups["241101"][1])
    long_text = "Describe this image in the greatest detail you can manage, please."
    messages = image_messages(long_text)
    stats = served.runtime.stats
    a_first = served.generate(messages, adapter="a", max_new_tokens=4).token_ids
    reused = stats["prefix_reused_tokens"]
    b = served.generate(messages, adapter="b", max_new_tokens=4).token_ids
    assert stats["prefix_reused_tokens"] == reused  # a's K/V are not b's
    assert b == loaded("241101", "b").generate(messages, max_new_tokens=4).token_ids
    assert served.generate(messages, adapter="b", max_new_tokens=4).token_ids == b
    assert stats["prefix_reused_tokens"] > reused  # b's own cache is
    assert a_first != b


def test_unknown_adapter_and_unmergeable_targets(setups, loaded, tmp_path):
    base = setups["241101"][0]
    served = loaded("241101", "served")
    with pytest.raises(InputError, match=r"unknown adapter 'c' \(adapters: 'a', 'b'\)"):
        served.generate(image_messages(), adapter="c", max_new_tokens=2)
    with pytest.raises(InputError, match="unknown adapter 'a' \\(adapters: none loaded\\)"):
        loaded("241101", "plain").next_token_logits(image_messages(), adapter="a")
    with pytest.raises(InputError, match="2 entries for 1 conversations"):
        served.generate_batch([image_messages()], adapters=["a", "b"])
    vision = make_lora_adapter(tmp_path / "v", base, under="vision2text_model", targets=("0", "2"))
    with pytest.raises(UnsupportedError, match="can only be merged: load it with adapter=PATH"):
        load(base, lora_modules={"v": vision})
    described = served.describe()["lora_modules"]
    assert [d["name"] for d in described] == ["a", "b"] and described[1]["use_rslora"] is True


def test_adapters_on_a_quantized_model(setups, loaded):
    """int8 weights (torchao): a merged adapter is merged before quantizing, unmerged factors stay in the model
    dtype on top of the quantized base GEMM; both land next to the float merged model, far from the base."""
    pytest.importorskip("torchao")
    base, adapters = setups["241101"]
    messages = image_messages()
    want = loaded("241101", "a").next_token_logits(messages)
    plain = loaded("241101", "plain").next_token_logits(messages)
    served = load(base, quantize="int8", lora_modules=adapters).next_token_logits(messages, adapter="a")
    merged = load(base, quantize="int8", adapter=adapters["a"]).next_token_logits(messages)
    far = (plain - want).abs().max()
    for got in (served, merged):
        assert (got - want).abs().max() < 0.1 * far


@pytest.mark.parametrize("slots", [3, 6, 9])
def test_lora_linear_rows_match_per_row_math(slots):
    """Each row of a LoraLinear gets W x + b + B[slot] A[slot] x, whichever way the rows are computed: one
    adapter (plain matmuls), few adapters (stacked factors, masked columns), many (gathered factors, bmm)."""
    from owlvid.adapters import Adapter, LoraWeights
    from owlvid.lora import AdapterRows, install_adapters

    gen = torch.Generator().manual_seed(slots)
    attn, layer, net = torch.nn.Module(), torch.nn.Module(), torch.nn.Module()
    attn.q_proj = torch.nn.Linear(12, 7)
    layer.self_attn = attn
    net.llm = torch.nn.Module()
    net.llm.layers = torch.nn.ModuleList([layer])
    name = "llm.layers.0.self_attn.q_proj"
    adapters = []
    for i in range(slots - 1):
        rank = 1 + i % 3
        w = LoraWeights(name, torch.randn(rank, 12, generator=gen), torch.randn(7, rank, generator=gen), 0.5 + i)
        adapters.append(Adapter(f"a{i}", None, rank, 1.0, False, {name: w}, "x"))
    base = attn.q_proj
    layout = install_adapters(net, adapters)
    assert layout == (slots, max(1 + i % 3 for i in range(slots - 1)))
    x = torch.randn(4, 2, 12, generator=gen)
    for rows in ([0, 1, 2, 0], [2, 2, 2, 2], [1, slots - 1, 0, slots - 2]):
        got = attn.q_proj(x, AdapterRows.of(rows, layout, torch.float32, torch.device("cpu")))
        for r, slot in enumerate(rows):
            want = base(x[r])
            if slot:
                want = want + x[r] @ adapters[slot - 1].modules[name].delta().T
            torch.testing.assert_close(got[r], want, atol=1e-5, rtol=1e-5)
    assert AdapterRows.of([0, 0], layout, torch.float32, torch.device("cpu")) is None
