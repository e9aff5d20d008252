"""`GET /metrics`: the engine's counts in the Prometheus text format, scraped from a real server while a
request runs and after it ends."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families


def scrape(server) -> dict[str, float]:
    """{sample name with its labels but model_name: value}."""
    response = httpx.get(server.url + "/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model_name")
            out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return out


def test_metrics_count_a_running_and_a_finished_request(server, long_messages):
    before = scrape(server)
    client = server.client()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        stream = client.chat.completions.create(model="tiny-owl3", messages=long_messages, max_tokens=400,
                                                stream=True, stream_options={"include_usage": True})
        chunks = iter(stream)
        next(chunks)  # the request is decoding now
        during = scrape(server)
        usage = pool.submit(lambda: [c.usage for c in chunks if c.usage][-1]).result(timeout=120)
    assert during["owlvid:num_requests_running"] == 1
    time.sleep(0.2)  # the engine thread books the end right after the last event
    after = scrape(server)
    assert after["owlvid:num_requests_running"] == 0
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert delta["owlvid:request_success_total{finished_reason=length}"] == 1
    assert delta["owlvid:generation_tokens_total"] == usage.completion_tokens == 400
    assert delta["owlvid:prompt_tokens_total"] == usage.prompt_tokens
    assert delta["owlvid:time_to_first_token_seconds_count"] == 1
    assert delta["owlvid:e2e_request_latency_seconds_count"] == 1
    assert delta["owlvid:inter_token_latency_seconds_count"] == 399  # every token after the first
    assert delta["owlvid:time_to_first_token_seconds_sum"] > 0


def test_metrics_count_errors_by_kind(server):
    """A request the engine refuses (its answer cannot fit the context) is counted by its kind."""
    import openai
    import pytest

    before = scrape(server)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        server.client().chat.completions.create(model="tiny-owl3", max_tokens=10**6,
                                                messages=[{"role": "user", "content": "Hi"}])
    after = scrape(server)
    errors = {k: after[k] - before.get(k, 0) for k in after if k.startswith("owlvid:request_errors_total")}
    assert errors == {"owlvid:request_errors_total{kind=InputError}": 1}, errors
