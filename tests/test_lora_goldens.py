"""LoRA adapters against goldens from the OFFICIAL mPLUG-Owl3 7B-240728 code with PEFT applied.

tests/fixtures/lora/make_goldens.py made them in the separate reference environment (transformers 4.41.2, PEFT
0.11.1, the EgoThink copy of the official remote code): the adapters in tests/fixtures/lora/tiny-240728/ were
written by PEFT's own `save_pretrained`, applied to the official model with `PeftModel.from_pretrained` (PEFT's
unmerged LoRA layers), and run on the parity fixture's image, cut image, multi-image and video cases. owlvid's
merged (`adapter=`) and unmerged (`lora_modules=`, per request and per batch row) paths must reproduce the
prefill logits within the parity tolerance (1e-4, float32) and the 16 greedy tokens, every step's top-16 too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from .conftest import FIXTURES, assert_close_to_golden_steps, fixtures_or_skip, teacher_forced_logits

GOLDENS = Path(__file__).resolve().parent / "fixtures" / "lora" / "tiny-240728"
FACTS = json.loads((GOLDENS / "goldens.json").read_text())  # committed: a missing file fails, never skips
TENSORS = load_file(str(GOLDENS / "goldens.safetensors"))
CASES = FACTS["cases"]
ATOL = 1e-4  # the parity tolerance (fixtures README, check 5)


def case_inputs(case: str) -> tuple[list[dict], dict]:
    folder = FIXTURES / "owl3" / "cases" / "_inputs" / case
    spec = json.loads((folder / "case.json").read_text())
    images = [Image.open(folder / p).convert("RGB") for p in spec["images"] or []]
    videos = [[Image.open(folder / p).convert("RGB") for p in v] for v in spec["videos"] or []]
    return spec["messages"], {"images": images, "videos": videos, "cut_enable": spec["cut_enable"]}


@pytest.fixture(scope="module")
def models():
    """Loaded once: the base, each adapter merged, and a and b unmerged in one model."""
    import owlvid

    root = fixtures_or_skip("owl3")

    def load(**kwargs):
        return owlvid.load(root / "tiny-240728", tokenizer=root / "tokenizer", dtype="float32", device="cpu",
                           **kwargs)

    out = {name: load(adapter=GOLDENS / name) for name in FACTS["adapters"]}
    out["served"] = load(lora_modules={"a": GOLDENS / "a", "b": GOLDENS / "b"})
    out["base"] = load()
    return out


def assert_logits_match(logits: torch.Tensor, adapter: str, case: str) -> None:
    facts = FACTS["adapters"][adapter]["cases"][case]
    prefix = f"{adapter}.{case}."
    assert logits.shape == (facts["vocab"],)
    top_ids, subset_ids = TENSORS[prefix + "top_ids"], torch.arange(0, facts["vocab"], FACTS["stored"]["subset_stride"])
    torch.testing.assert_close(logits[top_ids], TENSORS[prefix + "top_values"], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[subset_ids], TENSORS[prefix + "subset_values"], atol=ATOL, rtol=0)
    assert int(logits.argmax()) == facts["last_logits_argmax"]
    assert abs(float(torch.logsumexp(logits.double(), 0)) - facts["last_logits_logsumexp"]) < ATOL


def assert_matches_official(model, adapter_name: str | None, adapter: str, case: str) -> None:
    """Prefill logits (step 0) and, fed the golden tokens, every decode step's golden top-16 logits within ATOL with
    the golden token our argmax; then the 16 tokens of a real greedy run."""
    messages, media = case_inputs(case)
    gold = FACTS["adapters"][adapter]["cases"][case]["greedy_new_token_ids"]
    request, _ = model.prepare(messages, adapter=adapter_name, **media)
    steps = teacher_forced_logits(model.runtime, request, gold)
    assert_logits_match(steps[0], adapter, case)
    prefix = f"{adapter}.{case}."
    assert_close_to_golden_steps(steps, gold, TENSORS[prefix + "step_top_ids"], TENSORS[prefix + "step_top_values"],
                                 atol=ATOL, max_rank=0)
    assert model.generate(messages, adapter=adapter_name, max_new_tokens=16, **media).token_ids == gold


def test_goldens_are_the_real_thing():
    """The reference reproduced the parity goldens without an adapter, and every adapter changes every answer."""
    assert set(FACTS["adapters"]) == {"a", "b", "vision"} and len(CASES) == 4
    for check in FACTS["base_vs_parity_goldens"].values():
        assert check["last_logits_maxabs"] < 1e-4 and check["same_greedy_tokens"]
    for adapter in FACTS["adapters"].values():
        for case in CASES:
            parity = json.loads((FIXTURES / "owl3" / "cases" / "tiny-240728" / case / "meta.json").read_text())
            assert adapter["cases"][case]["greedy_new_token_ids"] != parity["greedy_new_token_ids"]


@pytest.mark.parametrize("adapter", ["a", pytest.param("b", marks=pytest.mark.slow), "vision"])
@pytest.mark.parametrize("case", CASES)
def test_merged_adapter_matches_official_peft(models, adapter, case):
    assert_matches_official(models[adapter], None, adapter, case)


@pytest.mark.parametrize("adapter", ["a", "b"])
@pytest.mark.parametrize("case", CASES)
def test_unmerged_adapter_matches_official_peft(models, adapter, case):
    assert_matches_official(models["served"], adapter, adapter, case)


def test_mixed_batch_rows_match_official_peft(models):
    """One batch over the base and both adapters on every case: each row gets the official tokens of its adapter.
    The rows are built as `Model.generate_batch` builds them (one ticket each; here each with its own media and
    cut_enable, which generate_batch shares) and run by the same `run_batch`."""
    from owlvid.engine import run_batch

    served = models["served"]
    tickets, want = [], []
    for i, case in enumerate(CASES):
        messages, media = case_inputs(case)
        parity = json.loads((FIXTURES / "owl3" / "cases" / "tiny-240728" / case / "meta.json").read_text())
        for name in ((None, "a", "b") * 2)[i % 3: i % 3 + 3]:  # a different row order per case
            tickets.append((messages, {**media, "adapter": name, "max_new_tokens": 16}))
            want.append(parity["greedy_new_token_ids"] if name is None
                        else FACTS["adapters"][name]["cases"][case]["greedy_new_token_ids"])
    results = run_batch(served.runtime, [served.ticket(m, options) for m, options in tickets], max_batch=5)
    assert [r.token_ids for r in results] == want  # 5 at a time: rows join the batch as others finish


def test_vision_adapter_is_refused_unmerged(models):
    """The vision adapter (SigLIP, projector, the 240728 gate) merges (tested above); unmerged it is refused."""
    import owlvid
    from owlvid.errors import UnsupportedError

    root = FIXTURES / "owl3"
    with pytest.raises(UnsupportedError, match="can only be merged"):
        owlvid.load(root / "tiny-240728", tokenizer=root / "tokenizer", dtype="float32", device="cpu",
                    lora_modules={"v": GOLDENS / "vision"})
