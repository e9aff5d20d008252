"""The fixture cases of both model families as (checkpoint, messages, media), and the quality measures of a
quantized model against the unquantized one: shared by tests/test_quantize.py and the README's table."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .conftest import FIXTURES

OWL3_CASES = {
    "tiny-240728": ["single_image_nocut", "square_image_cut", "two_images_interleaved", "video_8_frames", "text_only"],
    "tiny-241101": ["single_image_nocut", "square_image_cut", "two_images_cut", "video_8_frames"],
}
SLOWFAST_CHECKPOINT = "tiny-slowfast-qwen2-convnext576-s1t4"
SLOWFAST_CASES = ["image_single_turn", "video_8f_single_turn", "video_16f_single_turn", "video_8f_two_turn"]
CASES = [(ck, case) for ck, cases in OWL3_CASES.items() for case in cases] + [
    (SLOWFAST_CHECKPOINT, case) for case in SLOWFAST_CASES]
STEPS = 16  # greedy tokens compared per case


def checkpoint_folder(checkpoint: str) -> tuple[Path, Path | None]:
    """(checkpoint folder, tokenizer folder or None)."""
    if checkpoint == SLOWFAST_CHECKPOINT:
        return FIXTURES / "slowfast" / checkpoint, None
    return FIXTURES / "owl3" / checkpoint, FIXTURES / "owl3" / "tokenizer"


def case_inputs(checkpoint: str, case: str) -> tuple[list[dict], list, list, bool | None]:
    """(messages, images, videos, cut_enable) of a fixture case, as the official code received them."""
    if checkpoint == SLOWFAST_CHECKPOINT:
        d = FIXTURES / "slowfast" / "cases" / checkpoint / case
        spec = json.loads((d / "case.json").read_text(encoding="utf-8"))
        frames = [Image.open(d / f).convert("RGB") for f in spec["visual"]["files"]]
        images, videos = (frames, []) if spec["visual"]["kind"] == "image" else ([], [frames])
        return spec["messages"], images, videos, None
    inp = FIXTURES / "owl3" / "cases" / "_inputs" / case
    spec = json.loads((inp / "case.json").read_text(encoding="utf-8"))
    images = [Image.open(inp / p).convert("RGB") for p in spec["images"] or []]
    videos = [[Image.open(inp / p).convert("RGB") for p in v] for v in spec["videos"] or []]
    return spec["messages"], images, videos, spec["cut_enable"]


@dataclass
class Trace:
    """The prefill logits and STEPS greedy tokens of one runtime on one case."""

    last_logits: torch.Tensor  # float32 [vocab]
    tokens: list[int]


@dataclass
class Quality:
    logit_error: float  # max |quantized - reference| of the last prompt token's logits / max |reference|
    leading_agreement: int  # greedy tokens identical before the first difference (of STEPS)
    forced_agreement: float  # share of steps whose argmax matches, fed the reference tokens


@torch.inference_mode()
def greedy_trace(runtime, checkpoint: str, case: str) -> Trace:
    messages, images, videos, cut = case_inputs(checkpoint, case)
    request, _ = runtime.prepare(messages, images, videos, cut)
    logits, state = runtime.prefill(request)
    first = logits.float().cpu()
    tokens = [int(first.argmax())]
    for _ in range(STEPS - 1):
        tokens.append(int(runtime.decode(state, tokens[-1]).argmax()))
    return Trace(first, tokens)


@torch.inference_mode()
def quality(runtime, reference: Trace, checkpoint: str, case: str) -> Quality:
    """`runtime` (quantized) against the unquantized model's trace of the same case."""
    ours = greedy_trace(runtime, checkpoint, case)
    error = float((ours.last_logits - reference.last_logits).abs().max() / reference.last_logits.abs().max())
    leading = next((i for i, (a, b) in enumerate(zip(ours.tokens, reference.tokens)) if a != b), STEPS)
    messages, images, videos, cut = case_inputs(checkpoint, case)
    request, _ = runtime.prepare(messages, images, videos, cut)
    logits, state = runtime.prefill(request)
    matches = [int(logits.argmax()) == reference.tokens[0]]
    for step in range(1, STEPS):
        matches.append(int(runtime.decode(state, reference.tokens[step - 1]).argmax()) == reference.tokens[step])
    return Quality(error, leading, sum(matches) / STEPS)
