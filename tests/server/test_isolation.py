"""A real server whose engine fails one request mid-batch (fault injection in the server process): that
client gets a 500 with the reason, the request decoding beside it streams its full answer, and the server
keeps serving. Near-zero sampling values from one client never fail another."""

from __future__ import annotations

import concurrent.futures

import openai
import pytest

from .helpers import ServerProcess

INJECT = """
from owlvid.generation import RequestStream
_accept_token = RequestStream.accept_token
def _failing(self, token):
    if self.params.seed == 666 and len(self.generated) == 3:
        raise RuntimeError("injected failure")
    return _accept_token(self, token)
RequestStream.accept_token = _failing
"""

QUESTION = [{"role": "user", "content": "Write a very long essay about owls."}]


@pytest.fixture(scope="module")
def faulty_server(server_model_dir, tmp_path_factory):
    server = ServerProcess(server_model_dir, tmp_path_factory.mktemp("faulty-logs"), prelude=INJECT).wait_ready()
    yield server
    server.stop()


def _stream_text(client, **kw) -> str:
    chunks = client.chat.completions.create(model="tiny-owl3", messages=QUESTION, stream=True, **kw)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_one_failing_request_leaves_its_neighbour_streaming(faulty_server, local_model):
    local_model.runtime._prefixes.clear()
    expected = local_model.generate(QUESTION, max_new_tokens=300).text
    client = faulty_server.client()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        neighbour = pool.submit(_stream_text, client, max_tokens=300)
        doomed = [pool.submit(client.chat.completions.create, model="tiny-owl3", messages=QUESTION,
                              max_tokens=50, seed=666) for _ in range(3)]
        for future in doomed:
            with pytest.raises(openai.InternalServerError) as err:
                future.result(timeout=120)
            assert err.value.status_code == 500 and "injected failure" in err.value.message
        assert neighbour.result(timeout=120) == expected
    assert faulty_server.health()["status"] == "ok"
    again = client.chat.completions.create(model="tiny-owl3", messages=QUESTION, max_tokens=20)
    assert again.choices[0].message.content == local_model.generate(QUESTION, max_new_tokens=20).text


def test_near_zero_sampling_values_beside_a_stream(faulty_server, local_model):
    local_model.runtime._prefixes.clear()
    expected = local_model.generate(QUESTION, max_new_tokens=200).text
    client = faulty_server.client()
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        neighbour = pool.submit(_stream_text, client, max_tokens=200)
        tiny_t = pool.submit(client.chat.completions.create, model="tiny-owl3", messages=QUESTION, max_tokens=20,
                             temperature=1e-40)
        tiny_p = pool.submit(client.chat.completions.create, model="tiny-owl3", messages=QUESTION, max_tokens=20,
                             temperature=0.9, top_p=1e-300, seed=1)
        greedy = local_model.generate(QUESTION, max_new_tokens=20).text
        assert tiny_t.result(timeout=120).choices[0].message.content == greedy
        assert tiny_p.result(timeout=120).choices[0].message.content == greedy  # only the top token is left
        assert neighbour.result(timeout=120) == expected
