"""`min_tokens` and `ignore_eos` (vLLM's options): end tokens are masked until min_tokens tokens are generated,
stop strings wait for min_tokens too, and with ignore_eos an end token is an ordinary token."""

from __future__ import annotations

import pytest
import torch

from owlvid.errors import InputError
from owlvid.sampling import SamplingParams

MESSAGES = [{"role": "user", "content": "Describe a cat."}]
BUDGET = 14


@pytest.fixture()
def owl3(tiny_owl3_models):
    return tiny_owl3_models["241101"]


@pytest.fixture()
def free_answer(owl3, monkeypatch):
    """The greedy answer with no end token at all; then the end token is set to its 4th token, so that a
    plain request stops after 3 tokens."""
    monkeypatch.setattr(owl3.runtime, "stop_token_ids", [])
    free = owl3.generate(MESSAGES, max_new_tokens=BUDGET)
    end = free.token_ids[3]
    if end in free.token_ids[:3]:
        pytest.skip("the greedy answer repeats its 4th token earlier")
    monkeypatch.setattr(owl3.runtime, "stop_token_ids", [end])
    return free, end


def _reference(owl3, end: int, min_tokens: int) -> list[int]:
    """Greedy decoding written out: the end token's logit is -inf before `min_tokens` tokens (HF's and
    vLLM's MinTokens processors)."""
    request, _ = owl3.prepare(MESSAGES)
    logits, state = owl3.runtime.prefill(request)
    out: list[int] = []
    while len(out) < BUDGET:
        logits = logits.float().clone()
        if len(out) < min_tokens:
            logits[end] = float("-inf")
        token = int(torch.argmax(logits))
        if token == end:
            break
        out.append(token)
        logits = owl3.runtime.decode(state, token)
    owl3.runtime.finish(state)
    return out


def test_a_plain_request_stops_at_the_end_token(owl3, free_answer):
    free, end = free_answer
    plain = owl3.generate(MESSAGES, max_new_tokens=BUDGET)
    assert plain.token_ids == free.token_ids[:3] and plain.finish_reason == "stop"


def test_ignore_eos_generates_through_end_tokens(owl3, free_answer):
    free, end = free_answer
    for result in (owl3.generate(MESSAGES, max_new_tokens=BUDGET, ignore_eos=True),
                   owl3.generate_batch([MESSAGES, MESSAGES[:1]], max_new_tokens=BUDGET, ignore_eos=True)[0]):
        assert result.token_ids == free.token_ids  # the end token included, as an ordinary token
        assert result.finish_reason == "length" and result.completion_tokens == BUDGET


@pytest.mark.parametrize("min_tokens", [4, 7])
def test_min_tokens_masks_end_tokens_until_reached(owl3, free_answer, min_tokens):
    free, end = free_answer
    expected = _reference(owl3, end, min_tokens)
    assert len(expected) >= min_tokens and end not in expected[:min_tokens]
    alone = owl3.generate(MESSAGES, max_new_tokens=BUDGET, min_tokens=min_tokens)
    other = [{"role": "user", "content": "Name three colours."}]
    batched = owl3.generate_batch([other, MESSAGES], max_new_tokens=BUDGET, min_tokens=min_tokens)[1]
    streamed = "".join(owl3.stream(MESSAGES, max_new_tokens=BUDGET, min_tokens=min_tokens))
    for result in (alone, batched):
        assert result.token_ids == expected
        assert result.finish_reason == ("length" if len(expected) == BUDGET else "stop")
    assert streamed == alone.text


def test_stop_strings_do_not_fire_before_min_tokens(owl3, free_answer, monkeypatch):
    monkeypatch.setattr(owl3.runtime, "stop_token_ids", [])
    free, _ = free_answer
    if not free.text:
        pytest.skip("the greedy answer has no text")
    stop = [free.text[0]]  # found at once without min_tokens: the answer is empty
    assert owl3.generate(MESSAGES, max_new_tokens=BUDGET, stop=stop).text == ""
    late = owl3.generate(MESSAGES, max_new_tokens=BUDGET, stop=stop, min_tokens=5)
    assert late.completion_tokens >= 5 and late.token_ids[:5] == free.token_ids[:5]
    assert late.text.startswith(stop[0])
    streamed = "".join(owl3.stream(MESSAGES, max_new_tokens=BUDGET, stop=stop, min_tokens=5))
    assert streamed == late.text


@pytest.mark.parametrize("options, message", [
    ({"min_tokens": -1}, "min_tokens must be an integer >= 0"),
    ({"min_tokens": 1.5}, "min_tokens must be an integer >= 0"),
    ({"min_tokens": 20, "max_new_tokens": 10}, "min_tokens (20) must be at most max_new_tokens (10)"),
    ({"ignore_eos": "yes"}, "ignore_eos must be true or false"),
])
def test_bad_values_are_input_errors(owl3, options, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SamplingParams(**options).validate()
    with pytest.raises(InputError, match="min_tokens|ignore_eos"):
        owl3.generate(MESSAGES, **{"max_new_tokens": 10, **options})
