"""One request can never fail another: near-zero sampling values are safe, and a failure that belongs to
one row (its sampling, stop handling, detokenisation) fails that request alone, through every front door
over the engine (`generate_batch`, batch jobs); a failed shared step fails its batch, and the engine goes on."""

from __future__ import annotations

import math

import pytest
import torch

from owlvid.engine import Engine, Generation, RequestFailed, SamplingParams, list_feed
from owlvid.errors import InputError
from owlvid.generation import RequestStream
from owlvid.jobs import generate_each
from owlvid.sampling import Sampler, sample

PROMPTS = [[{"role": "user", "content": f"Question number {i}: tell me something."}] for i in range(4)]


@pytest.fixture(scope="module")
def model(tiny_owl3_models):
    model = tiny_owl3_models["241101"]
    model.runtime.prefix_slots = 0  # every request computed from scratch: results comparable with solo runs
    return model


@pytest.fixture(scope="module")
def solo(model):
    return [model.generate(p, max_new_tokens=12).token_ids for p in PROMPTS]


# -- the values ------------------------------------------------------------------------------------------


def test_near_zero_temperature_is_greedy_and_tiny_top_p_keeps_the_top_token():
    logits = torch.randn(3, 1000) * 5
    rows = [Sampler(SamplingParams(temperature=1e-40).validate()),
            Sampler(SamplingParams(temperature=0.7, top_p=1e-300, seed=1).validate()),
            Sampler(SamplingParams(temperature=0.7, top_k=5, top_p=1e-300, seed=1).validate())]
    best = logits.argmax(-1)
    assert sample(logits.clone(), rows).tolist() == best.tolist()


@pytest.mark.parametrize("field", ["temperature", "top_p", "repetition_penalty"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_values_are_refused(model, field, value):
    with pytest.raises(InputError, match=f"{field} must be a finite number"):
        model.generate(PROMPTS[0], max_new_tokens=2, **{field: value})


def test_near_zero_values_beside_other_requests(model, solo):
    """A temperature of 1e-40 or a top_p of 1e-300 in one job: every job in the batch still answers (before,
    the NaN probabilities of one row failed the whole batch)."""
    options = [{"temperature": 1e-40}, {"temperature": 0.8, "top_p": 1e-300, "seed": 3}, {}, {}]
    jobs = [(i, (PROMPTS[i], {"max_new_tokens": 12, **options[i]})) for i in range(4)]
    results = dict(generate_each(model, jobs, max_batch=4, prefetch=0))
    assert [results[i].token_ids for i in range(4)] == solo  # near-zero temperature / top_p: the greedy tokens


# -- one row's failure -------------------------------------------------------------------------------------


@pytest.fixture
def third_token_fails_for_question_1(model, monkeypatch):
    """Fault injection: the stop handling of the request asking PROMPTS[1] raises at its third token."""
    accept_token = RequestStream.accept_token
    doomed = model.prepare(PROMPTS[1])[1]

    def failing(self, token):
        if self.prompt_ids == doomed and len(self.generated) == 2:
            raise RuntimeError("injected failure")
        return accept_token(self, token)

    monkeypatch.setattr(RequestStream, "accept_token", failing)


def test_a_failing_row_fails_alone_in_batch_jobs(model, solo, third_token_fails_for_question_1):
    jobs = [(i, (PROMPTS[i], {"max_new_tokens": 12})) for i in range(4)]
    results = dict(generate_each(model, jobs, max_batch=4, prefetch=0))
    assert isinstance(results[1], RequestFailed) and "injected failure" in str(results[1])
    assert isinstance(results[1].__cause__, RuntimeError)
    assert [results[i].token_ids for i in (0, 2, 3)] == [solo[i] for i in (0, 2, 3)]


def test_a_failing_row_fails_alone_in_generate_batch(model, solo, third_token_fails_for_question_1):
    results = model.generate_batch(PROMPTS, max_new_tokens=12, return_exceptions=True)
    assert isinstance(results[1], RequestFailed)
    assert [results[i].token_ids for i in (0, 2, 3)] == [solo[i] for i in (0, 2, 3)]
    with pytest.raises(RequestFailed, match="injected failure"):  # without return_exceptions: raised
        model.generate_batch(PROMPTS, max_new_tokens=12)


def test_a_failing_sampler_row_fails_alone(model, solo, monkeypatch):
    """A draw that raises (as torch.multinomial does on NaN probabilities) fails its row only."""
    import owlvid.sampling as sampling

    draw = sampling._draw
    monkeypatch.setattr(sampling, "_draw", lambda values, top_p, gen: (_ for _ in ()).throw(
        RuntimeError("probability tensor contains either inf, nan")) if top_p == 0.5 else draw(values, top_p, gen))
    jobs = [(i, (PROMPTS[i], {"max_new_tokens": 12, **({"temperature": 1.0, "top_p": 0.5} if i == 2 else {})}))
            for i in range(4)]
    results = dict(generate_each(model, jobs, max_batch=4, prefetch=0))
    assert isinstance(results[2], RequestFailed) and "sampling" in str(results[2])
    assert [results[i].token_ids for i in (0, 1, 3)] == [solo[i] for i in (0, 1, 3)]


def test_a_failed_forward_step_fails_its_batch_and_the_engine_goes_on(model, solo, monkeypatch):
    runtime = model.runtime
    decode_batch = runtime.decode_batch
    calls = []

    def once_failing(batch, tokens):
        calls.append(len(tokens))
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return decode_batch(batch, tokens)

    monkeypatch.setattr(runtime, "decode_batch", once_failing)
    engine = Engine(runtime, max_batch=2, prefill_chunk=None)
    tickets = [model.ticket(p, {"max_new_tokens": 12}, key=i) for i, p in enumerate(PROMPTS)]
    finals = {t.key: e for t, e in engine.run(list_feed(tickets)) if isinstance(e, (BaseException, Generation))}
    failed = [k for k, e in finals.items() if isinstance(e, RequestFailed)]
    assert failed == [0, 1] and all("device lost" in str(finals[k]) for k in failed)
    assert "shared with 1 other request" in str(finals[0])
    assert [finals[k].token_ids for k in (2, 3)] == [solo[2], solo[3]]
    assert engine.failed_steps == 1 and engine.active == 0
