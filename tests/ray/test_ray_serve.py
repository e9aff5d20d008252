"""`owlvid serve --ray`: the OpenAI-compatible app on two Ray Serve replicas of a real local Ray cluster,
talked to with the official `openai` client."""

from __future__ import annotations

import pytest

pytest.importorskip("ray", reason="Ray is not installed: pip install 'owlvid[ray]'")
pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from owlvid.ray import REPLICA_HEADER  # noqa: E402
from tests.server.helpers import API_KEY, ServerProcess  # noqa: E402

MAX_TOKENS = 8
MAX_REQUEST_BYTES = 20_000


@pytest.fixture(scope="module")
def server(ray_address, tiny_owl3_dirs, tmp_path_factory):
    """`owlvid serve --ray --num-replicas 2` joining the test cluster, with an API key."""
    process = ServerProcess(tiny_owl3_dirs["241101"], tmp_path_factory.mktemp("ray-serve-logs"), "--ray",
                            "--ray-address", ray_address, "--num-replicas", "2", "--api-key", API_KEY,
                            "--max-batch", "4", "--max-request-bytes", str(MAX_REQUEST_BYTES))
    try:
        yield process.wait_ready(timeout=240)
    finally:
        process.stop()


@pytest.fixture(scope="module")
def reference(tiny_owl3_dirs):
    """The checkpoint in this process, for the expected answers (its own instance: the generations below
    would leave conversation prefixes in the session's shared one, whose logits other tests compare exactly)."""
    import owlvid

    return owlvid.load(tiny_owl3_dirs["241101"], dtype="float32", device="cpu")


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_answers_streamed_or_not_from_both_replicas(server, reference):
    model = reference
    client = server.client(API_KEY)
    replicas = set()
    for i in range(24):  # the router picks replicas at random among the least busy: both show up soon
        question = f"Question number {i}?"
        raw = client.chat.completions.with_raw_response.create(model=server.name, messages=ask(question),
                                                               max_tokens=MAX_TOKENS)
        replicas.add(raw.headers[REPLICA_HEADER])
        if i < 2:  # answers: those of the model itself (greedy), whichever replica gave them
            expected = model.generate(ask(question), max_new_tokens=MAX_TOKENS)
            answer = raw.parse()
            assert answer.choices[0].message.content == expected.text
            assert answer.usage.completion_tokens == expected.completion_tokens
        if len(replicas) == 2 and i >= 1:
            break
    assert len(replicas) == 2, replicas

    expected = model.generate(ask("Tell me a story."), max_new_tokens=MAX_TOKENS)
    stream = client.chat.completions.create(model=server.name, messages=ask("Tell me a story."),
                                            max_tokens=MAX_TOKENS, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert len(chunks) > 3  # streamed chunk by chunk, not one body
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == expected.completion_tokens


def test_api_key_and_limits_are_the_servers(server):
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong-key").chat.completions.create(model=server.name, messages=ask("Hi"), max_tokens=2)
    response = httpx.post(server.url + "/v1/chat/completions", json={"messages": ask("Hi")}, timeout=30)
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert response.headers[REPLICA_HEADER]  # answered by a replica, not by Serve's proxy
    client = server.client(API_KEY)
    with pytest.raises(openai.BadRequestError) as refused:  # the server's own checks and limits
        client.chat.completions.create(model=server.name, messages=ask("Hi"), max_tokens=2, n=2)
    assert refused.value.body["param"] == "n"
    with pytest.raises(openai.APIStatusError) as too_large:
        client.chat.completions.create(model=server.name, messages=ask("x" * MAX_REQUEST_BYTES), max_tokens=2)
    assert too_large.value.status_code == 413 and too_large.value.body["code"] == "request_too_large"
