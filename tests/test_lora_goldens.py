"""LoRA adapters against goldens from the OFFICIAL model code with PEFT applied (mPLUG-Owl3 7B-240728, Slow-Fast).

tests/fixtures/lora/make_goldens.py made them in separate reference environments (PEFT 0.11.1 with transformers
4.41.2 over the EgoThink copy of the official Owl3 remote code, and with transformers 4.45.1 over the SHI-Labs
Slow-Fast code): the adapters in tests/fixtures/lora/<checkpoint>/ were written by PEFT's own `save_pretrained`,
applied to the official model with `PeftModel.from_pretrained` (PEFT's unmerged LoRA layers) and run on the parity
fixture's cases (Owl3: image, cut image, two images, video; Slow-Fast: image, video, two-turn video). owlvid's
merged (`adapter=`) and unmerged (`lora_modules=`, per request and per batch row) paths must reproduce the prefill
logits within the parity tolerance (1e-4, float32) and the 16 greedy tokens, every step's top-16 too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from .conftest import FIXTURES, assert_close_to_golden_steps, fixtures_or_skip, teacher_forced_logits

LORA = Path(__file__).resolve().parent / "fixtures" / "lora"
OWL3, SLOWFAST = "tiny-240728", "tiny-slowfast-qwen2-convnext576-s1t4"
ATOL = 1e-4  # the parity tolerance (fixtures README, check 5)


class Goldens:
    """One checkpoint's committed goldens (a missing file fails at import, never skips)."""

    def __init__(self, checkpoint: str) -> None:
        self.dir = LORA / checkpoint
        self.facts = json.loads((self.dir / "goldens.json").read_text())
        self.tensors = load_file(str(self.dir / "goldens.safetensors"))
        self.cases = self.facts["cases"]

    def case(self, adapter: str, case: str) -> dict:
        return self.facts["adapters"][adapter]["cases"][case]

    def tensor(self, adapter: str, case: str, key: str) -> torch.Tensor:
        return self.tensors[f"{adapter}.{case}.{key}"]


GOLDENS = {OWL3: Goldens(OWL3), SLOWFAST: Goldens(SLOWFAST)}
PARAMS = [(ck, case) for ck, g in GOLDENS.items() for case in g.cases]
# The fast lane keeps every Owl3 case and the Slow-Fast still image; the Slow-Fast videos (8 frames through
# ConvNeXt at 576 px, ~20 s each on two cores) run with the slow tests (CI runs all).
FAST = [p if p[0] == OWL3 or p[1] == "image_single_turn" else pytest.param(*p, marks=pytest.mark.slow) for p in PARAMS]
SLOW_SLOWFAST = pytest.param(SLOWFAST, marks=pytest.mark.slow)


def case_inputs(checkpoint: str, case: str) -> tuple[list[dict], dict]:
    """The parity case's messages and media, as the parity tests give them to owlvid."""
    if checkpoint == OWL3:
        folder = FIXTURES / "owl3" / "cases" / "_inputs" / case
        spec = json.loads((folder / "case.json").read_text())
        images = [Image.open(folder / p).convert("RGB") for p in spec["images"] or []]
        videos = [[Image.open(folder / p).convert("RGB") for p in v] for v in spec["videos"] or []]
        return spec["messages"], {"images": images, "videos": videos, "cut_enable": spec["cut_enable"]}
    folder = FIXTURES / "slowfast" / "cases" / SLOWFAST / case
    spec = json.loads((folder / "case.json").read_text())
    frames = [Image.open(folder / f).convert("RGB") for f in spec["visual"]["files"]]
    media = {"images": frames} if spec["visual"]["kind"] == "image" else {"videos": [frames]}
    return spec["messages"], media


def base_tokens(checkpoint: str, case: str) -> list[int]:
    """The parity goldens' greedy tokens (the official code without an adapter)."""
    if checkpoint == OWL3:
        meta = FIXTURES / "owl3" / "cases" / OWL3 / case / "meta.json"
        return json.loads(meta.read_text())["greedy_new_token_ids"]
    spec = FIXTURES / "slowfast" / "cases" / SLOWFAST / case / "case.json"
    return json.loads(spec.read_text())["generation"]["token_ids"]


@pytest.fixture(scope="module")
def models():
    """Loaded once per checkpoint: each adapter merged, and a and b unmerged in one model."""
    import owlvid

    memo = {}

    def get(checkpoint: str, kind: str):
        if (checkpoint, kind) not in memo:
            folder = LORA / checkpoint
            if checkpoint == OWL3:
                root = fixtures_or_skip("owl3")
                path, extra = root / OWL3, {"tokenizer": root / "tokenizer"}
            else:
                path, extra = fixtures_or_skip("slowfast", SLOWFAST), {}
            options = {"lora_modules": {"a": folder / "a", "b": folder / "b"}} if kind == "served" \
                else {"adapter": folder / kind}
            memo[checkpoint, kind] = owlvid.load(path, dtype="float32", device="cpu", **extra, **options)
        return memo[checkpoint, kind]

    return get


def assert_logits_match(logits: torch.Tensor, g: Goldens, adapter: str, case: str) -> None:
    facts = g.case(adapter, case)
    assert logits.shape == (facts["vocab"],)
    subset_ids = torch.arange(0, facts["vocab"], g.facts["stored"]["subset_stride"])
    torch.testing.assert_close(logits[g.tensor(adapter, case, "top_ids")], g.tensor(adapter, case, "top_values"),
                               atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[subset_ids], g.tensor(adapter, case, "subset_values"), atol=ATOL, rtol=0)
    assert int(logits.argmax()) == facts["last_logits_argmax"]
    assert abs(float(torch.logsumexp(logits.double(), 0)) - facts["last_logits_logsumexp"]) < ATOL


def assert_matches_official(model, checkpoint: str, adapter_name: str | None, adapter: str, case: str) -> None:
    """Prefill logits (step 0) and, fed the golden tokens, every decode step's golden top-16 logits within ATOL with
    the golden token our argmax; then the 16 tokens of a real greedy run."""
    g = GOLDENS[checkpoint]
    messages, media = case_inputs(checkpoint, case)
    gold = g.case(adapter, case)["greedy_new_token_ids"]
    request, _ = model.prepare(messages, adapter=adapter_name, **media)
    steps = teacher_forced_logits(model.runtime, request, gold)
    assert_logits_match(steps[0], g, adapter, case)
    assert_close_to_golden_steps(steps, gold, g.tensor(adapter, case, "step_top_ids"),
                                 g.tensor(adapter, case, "step_top_values"), atol=ATOL, max_rank=0)
    assert model.generate(messages, adapter=adapter_name, max_new_tokens=16, **media).token_ids == gold


@pytest.mark.parametrize("checkpoint", [OWL3, SLOWFAST])
def test_goldens_are_the_real_thing(checkpoint):
    """The reference reproduced the parity goldens without an adapter, and every adapter changes every answer.
    Adapter a is ms-swift's default, the hyper / hybrid layers' gate included (served unmerged since that gate takes
    the rows' adapters; before, such an adapter was refused unmerged)."""
    g = GOLDENS[checkpoint]
    assert set(g.facts["adapters"]) == {"a", "b", "vision"} and len(g.cases) >= 3
    gate = "self_attn.gate_proj.0" if checkpoint == OWL3 else "self_attn.cross_attn_gate_proj.0"
    keys = load_file(str(g.dir / "a" / "adapter_model.safetensors"))
    assert any(f"{gate}.lora_B.weight" in k for k in keys)
    for check in g.facts["base_vs_parity_goldens"].values():
        assert check["last_logits_maxabs"] < 1e-4 and check["same_greedy_tokens"]
    for case in g.cases:
        for adapter in g.facts["adapters"]:
            assert g.case(adapter, case)["greedy_new_token_ids"] != base_tokens(checkpoint, case)


@pytest.mark.parametrize("adapter", ["a", pytest.param("b", marks=pytest.mark.slow), "vision"])
@pytest.mark.parametrize("checkpoint,case", FAST)
def test_merged_adapter_matches_official_peft(models, checkpoint, case, adapter):
    assert_matches_official(models(checkpoint, adapter), checkpoint, None, adapter, case)


@pytest.mark.parametrize("adapter", ["a", "b"])
@pytest.mark.parametrize("checkpoint,case", FAST)
def test_unmerged_adapter_matches_official_peft(models, checkpoint, case, adapter):
    assert_matches_official(models(checkpoint, "served"), checkpoint, adapter, adapter, case)


@pytest.mark.parametrize("checkpoint", [OWL3, SLOW_SLOWFAST])
def test_mixed_batch_rows_match_official_peft(models, checkpoint):
    """One batch over the base and both adapters on every case: each row gets the official tokens of its adapter.
    The rows are built as `Model.generate_batch` builds them (one ticket each; here each with its own media and
    cut_enable, which generate_batch shares) and run by the same `run_batch`, 5 rows at a time (rows join the
    batch as others finish)."""
    from owlvid.engine import run_batch

    g, served = GOLDENS[checkpoint], models(checkpoint, "served")
    tickets, want = [], []
    for i, case in enumerate(g.cases):
        messages, media = case_inputs(checkpoint, case)
        for name in ((None, "a", "b") * 2)[i % 3: i % 3 + 3]:  # a different row order per case
            tickets.append(served.ticket(messages, {**media, "adapter": name, "max_new_tokens": 16}))
            want.append(base_tokens(checkpoint, case) if name is None else
                        g.case(name, case)["greedy_new_token_ids"])
    results = run_batch(served.runtime, tickets, max_batch=5)
    assert [r.token_ids for r in results] == want


@pytest.mark.parametrize("checkpoint", [OWL3, SLOWFAST])
def test_vision_adapter_is_refused_unmerged(checkpoint):
    """The vision adapters (tower, projector) merge (tested above); unmerged they are
    refused with one line."""
    import owlvid
    from owlvid.errors import UnsupportedError

    path = FIXTURES / "owl3" / OWL3 if checkpoint == OWL3 else FIXTURES / "slowfast" / SLOWFAST
    extra = {"tokenizer": FIXTURES / "owl3" / "tokenizer"} if checkpoint == OWL3 else {}
    with pytest.raises(UnsupportedError, match="can only be merged") as e:
        owlvid.load(path, dtype="float32", device="cpu", lora_modules={"v": LORA / checkpoint / "vision"}, **extra)
    assert "\n" not in str(e.value)
