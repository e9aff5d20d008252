"""Through a real server with the `openai` client: streamed stop strings never leak, and the queue is
bounded by the bytes of decoded media its waiting requests hold (--max-pending-media-bytes)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from .helpers import ServerProcess, data_url, png_bytes

MODEL = "tiny-owl3"
IMAGE_BYTES = 96 * 64 * 3  # one decoded png_bytes() image


def user(text):
    return [{"role": "user", "content": text}]


def stream_text(client, messages, **kw):
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True, temperature=0, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, finish[-1]


def test_streamed_stop_strings_equal_the_plain_answer(server, local_model):
    messages = user("Say something long.")
    full = local_model.generate(messages, max_new_tokens=24).text
    mid = full[len(full) // 2: len(full) // 2 + 2]
    for stop in ([mid], [full[2] + "\x00never"], [full[-1] + "\x00tail"]):
        ref = local_model.generate(messages, max_new_tokens=24, stop=stop)
        text, finish = stream_text(server.client(), messages, max_tokens=24, stop=stop)
        assert text == ref.text, stop
        assert finish == ref.finish_reason
        plain = server.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=24,
                                                        temperature=0, stop=stop)
        assert plain.choices[0].message.content == text


@pytest.fixture(scope="module")
def budget_server(server_model_dir, tmp_path_factory):
    """One request decodes at a time, and queued requests may hold one decoded image between them."""
    proc = ServerProcess(server_model_dir, tmp_path_factory.mktemp("budget-logs"), "--max-batch", "1",
                         "--max-pending-media-bytes", str(IMAGE_BYTES + 1000))
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def image_message(width=96, height=64, seed=0):
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png_bytes(width, height, seed), "image/png")}},
        {"type": "text", "text": "What is this?"}]}]


def test_one_request_over_the_media_budget_is_413(budget_server):
    with pytest.raises(openai.APIStatusError) as err:
        budget_server.client().chat.completions.create(model=MODEL, messages=image_message(200, 200),
                                                       max_tokens=2)
    assert err.value.status_code == 413
    assert "--max-pending-media-bytes" in err.value.message


def test_queued_media_over_the_budget_is_503_with_retry_after(budget_server):
    """Requests with an image arrive together; one decodes, one is prepared ahead, and the queue holds
    one image's bytes: the others are refused with 503 until the budget frees up."""

    def post(i):
        return httpx.post(budget_server.url + "/v1/chat/completions", timeout=120,
                          json={"model": MODEL, "messages": image_message(seed=i), "max_tokens": 200})

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(post, range(12)))
    refused = [r for r in answers if r.status_code == 503]
    assert refused and all(r.status_code == 200 for r in answers if r not in refused)
    assert all(r.headers["retry-after"] for r in refused)
    assert all("--max-pending-media-bytes" in r.json()["error"]["message"] for r in refused)
    assert budget_server.health()["pending_media_bytes"] == 0
