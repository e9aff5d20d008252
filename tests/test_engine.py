"""The generation loop on its own: sampling restrictions, stop strings while streaming, chunked prefill."""

from __future__ import annotations

import pytest
import torch

from owlvid.engine import RequestStream, Sampler, SamplingParams

# -- sampling ------------------------------------------------------------------------------------------


def _crafted_logits(vocab: int = 50, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, generator=g) * 2.0


def _nucleus(logits: torch.Tensor, top_p: float, temperature: float) -> set[int]:
    """The smallest set of most probable tokens whose probability reaches top_p (computed independently)."""
    probs = (logits / temperature).softmax(-1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    out, total = set(), 0.0
    for i in order:
        out.add(i)
        total += probs[i]
        if total >= top_p:
            break
    return out


@pytest.mark.parametrize("top_k", [1, 3, 10])
def test_top_k_draws_only_among_the_k_best(top_k):
    logits = _crafted_logits()
    allowed = set(torch.topk(logits, top_k).indices.tolist())
    drawn = {Sampler(SamplingParams(temperature=1.5, top_k=top_k, seed=seed))(logits) for seed in range(300)}
    assert drawn <= allowed
    assert len(drawn) == min(top_k, 3) or len(drawn) > 3  # really sampled, not always the argmax
    if top_k > 1:
        assert len(drawn) > 1


def test_top_k_one_is_greedy():
    for seed in range(20):
        logits = _crafted_logits(seed=seed)
        params = SamplingParams(temperature=2.0, top_k=1, seed=seed)
        assert Sampler(params)(logits) == int(torch.argmax(logits))


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.9])
def test_top_p_draws_only_from_the_nucleus(top_p):
    logits = _crafted_logits(seed=1)
    allowed = _nucleus(logits, top_p, 1.3)
    drawn = {Sampler(SamplingParams(temperature=1.3, top_p=top_p, seed=seed))(logits) for seed in range(300)}
    assert drawn <= allowed
    assert len(drawn) == len(allowed) or len(allowed) > 5  # every member of a small nucleus shows up


def test_top_k_and_top_p_together_draw_from_the_intersection():
    logits = _crafted_logits(seed=2)
    allowed = set(torch.topk(logits, 4).indices.tolist()) & _nucleus(logits, 0.5, 1.0)
    drawn = {Sampler(SamplingParams(temperature=1.0, top_k=4, top_p=0.5, seed=s))(logits) for s in range(200)}
    assert drawn <= allowed


# -- stop strings while streaming -----------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "Describe a cat."}]


@pytest.fixture(scope="module")
def owl3(tiny_owl3_models):
    return tiny_owl3_models["241101"]


def _stop_cases(text: str) -> list[list[str]]:
    """Stop strings of every kind for a greedy answer `text`: one completed across tokens, one whose
    start appears but never completes, one that would complete only after the last token."""
    mid = text[len(text) // 2: len(text) // 2 + 2]
    return [[mid], [text[3] + "\x00never"], [text[-1] + "\x00tail"], [mid, text[5:7]], ["\x00none"]]


def test_streamed_text_equals_generate_with_stop_strings(owl3):
    full = owl3.generate(MESSAGES, max_new_tokens=30)
    assert full.finish_reason == "length" and len(full.text) > 10
    for stop in _stop_cases(full.text):
        result = owl3.generate(MESSAGES, max_new_tokens=30, stop=stop)
        deltas = list(owl3.stream(MESSAGES, max_new_tokens=30, stop=stop))
        assert "".join(deltas) == result.text, stop
        assert not any(s in result.text for s in stop)
        assert full.text.startswith(result.text)
        hit = any(s in full.text for s in stop)
        assert result.finish_reason == ("stop" if hit else "length"), stop


def test_stop_string_split_across_tokens_never_leaks(owl3):
    full = owl3.generate(MESSAGES, max_new_tokens=30).text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    deltas = list(owl3.stream(MESSAGES, max_new_tokens=30, stop=[stop]))
    assert "".join(deltas) == full[: full.index(stop)]


def test_request_stream_holds_back_a_possible_stop_prefix(owl3):
    """Driven token by token: the prefix of a stop string is not emitted until it is known."""
    runtime = owl3.runtime
    stream = RequestStream(runtime, [1, 2, 3], SamplingParams(max_new_tokens=10, stop=["ab"]))
    tok = runtime.tokenizer
    a, b, c = (tok.encode(ch)[0] for ch in "abc")
    emitted = []
    for token in (c, a, c, a, b):
        logits = torch.full((runtime.model.logits(torch.zeros(1, runtime.cfg.llm.hidden_size)).shape[-1],), -1e9)
        logits[token] = 0.0
        emitted.append("".join(e.text for e in stream.accept(logits)))
    assert emitted == ["c", "", "ac", "", ""]
    assert stream.done and stream.finish_reason == "stop" and stream.text == "cac"


# -- chunked prefill -----------------------------------------------------------------------------------


def _image(seed: int):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 56, 3), dtype=np.uint8))


def _media_in_the_middle():
    """Media between text: hyper attention's visibility changes mid-prompt, also inside a chunk."""
    return [{"role": "user", "content": [
        {"type": "text", "text": "Compare the first picture"}, {"type": "image", "image": _image(1)},
        {"type": "text", "text": "with the second one"}, {"type": "image", "image": _image(2)},
        {"type": "text", "text": "and say which is brighter, in detail."}]}]


@pytest.mark.parametrize("release", ["240728", "241014", "241101"])
def test_chunked_prefill_equals_one_shot(tiny_owl3_models, release):
    model = tiny_owl3_models[release]
    runtime = model.runtime
    request, ids = model.prepare(_media_in_the_middle(), cut_enable=False)
    starts = request["media_starts"]
    assert len(starts) == 2 and 0 < starts[0] < starts[1] < len(ids) - 8
    runtime._prefixes.clear()  # no earlier conversation's cache: every token is prefilled here
    reference, _ = runtime.prefill(request)
    for chunk in (1, 5, starts[1], 64):  # one chunk ends right at a media marker
        request, _ = model.prepare(_media_in_the_middle(), cut_enable=False)
        runtime._prefixes.clear()
        logits, state = runtime.prefill(request, chunk_tokens=chunk)
        # float32 sums in another order (other matmul shapes): differences of a few ulp of logits ~10
        assert torch.allclose(logits, reference, atol=1e-5, rtol=1e-5), (chunk, (logits - reference).abs().max())
        assert int(logits.argmax()) == int(reference.argmax())
        assert state.position == len(ids) and state.fed_ids == ids


def test_chunked_prefill_in_a_batch_gives_the_solo_tokens(tiny_owl3_models):
    from owlvid.engine import run_batch

    model = tiny_owl3_models["241014"]
    conversations = [_media_in_the_middle(), MESSAGES, [{"role": "user", "content": "Tell me a story."}]]
    lengths = [12, 5, 20]  # ragged finish
    solo = [model.generate(c, max_new_tokens=n) for c, n in zip(conversations, lengths)]
    items = []
    for c, n in zip(conversations, lengths):
        request, ids = model.prepare(c)
        items.append((request, ids, SamplingParams(max_new_tokens=n)))
    batched = run_batch(model.runtime, items, max_batch=3, prefill_chunk=7)
    assert [g.token_ids for g in batched] == [g.token_ids for g in solo]
    assert [g.text for g in batched] == [g.text for g in solo]
