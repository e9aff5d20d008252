"""Through real `owlvid serve` processes: options the server cannot honour are refused naming them (never
silently ignored), min_tokens / ignore_eos reach the engine, /v1/models shows no server path, foreign Host
and Origin headers are refused, and client errors leave one log line each, never a traceback."""

from __future__ import annotations

import json
import shutil
import socket
import time

import httpx
import openai
import pytest

from owlvid import batch
from owlvid.server.requests import public_model_name

from ..media.synth import write_video
from .helpers import ServerProcess, data_url, png_bytes

MODEL = "tiny-owl3"
MESSAGES = [{"role": "user", "content": "Tell me a story."}]
BUDGET = 16
ALLOWED_HOST = "owl.internal.test"
ALLOWED_ORIGIN = "http://app.example.test"


@pytest.fixture(scope="module")
def stopper(server_model_dir, local_model, tmp_path_factory):
    """(folder, in-process model) of a copy of the checkpoint whose end token scores 1.5x the logit of its
    greedy answer's third token: answers end early (the random tiny checkpoint never ends by itself)."""
    from safetensors.torch import load_file, save_file

    import owlvid

    free = local_model.generate(MESSAGES, max_new_tokens=BUDGET)
    end, third = local_model.runtime.stop_token_ids[0], free.token_ids[2]
    folder = tmp_path_factory.mktemp("stopper") / "stopper"
    shutil.copytree(server_model_dir, folder)
    weights = load_file(folder / "model.safetensors")
    head = weights["language_model.lm_head.weight"]
    head[end] = (head[third].float() * 1.5).to(head.dtype)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    model = owlvid.load(folder, dtype="float32", device="cpu")
    plain = model.generate(MESSAGES, max_new_tokens=BUDGET)
    if plain.finish_reason != "stop" or plain.completion_tokens + 3 > BUDGET:
        pytest.skip("the edited checkpoint does not end its answer early")
    return folder, model


@pytest.fixture(scope="module")
def logged_server(stopper, tmp_path_factory):
    """The early-ending checkpoint at log level info, allowing one more host name and one page origin."""
    proc = ServerProcess(stopper[0], tmp_path_factory.mktemp("logged"), "--log-level", "info",
                         "--allowed-hosts", ALLOWED_HOST, "--allowed-origins", ALLOWED_ORIGIN)
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def ask(client, **kw):
    return client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=BUDGET, temperature=0, **kw)


# -- min_tokens and ignore_eos -------------------------------------------------------------------------------


def test_min_tokens_and_ignore_eos_reach_the_engine(logged_server, stopper):
    model = stopper[1]
    plain = model.generate(MESSAGES, max_new_tokens=BUDGET)
    client = logged_server.client()
    for extra in ({}, {"ignore_eos": True}, {"min_tokens": plain.completion_tokens + 3}):
        ref = model.generate(MESSAGES, max_new_tokens=BUDGET, **extra)
        out = ask(client, extra_body=extra)
        assert out.choices[0].message.content == ref.text, extra
        assert out.choices[0].finish_reason == ref.finish_reason
        assert out.usage.completion_tokens == ref.completion_tokens
        chunks = list(ask(client, extra_body=extra, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
        if extra.get("ignore_eos"):
            assert ref.completion_tokens == BUDGET and ref.finish_reason == "length"
        elif extra:
            assert ref.completion_tokens >= extra["min_tokens"] > plain.completion_tokens
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, extra_body={"min_tokens": BUDGET + 1})
    assert e.value.param == "min_tokens" and "min_tokens" in e.value.message


def test_batch_lines_take_min_tokens_and_refuse_unknown_options(stopper, tmp_path):
    model = stopper[1]
    lines = [{"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "x", "messages": MESSAGES, "max_tokens": BUDGET, **extra}}
             for cid, extra in (("eos", {"ignore_eos": True}), ("min", {"min_tokens": 10}),
                                ("guided", {"guided_choice": ["a", "b"]}))]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    batch.run(source, tmp_path / "out.jsonl", model, progress=False)
    written = (tmp_path / "out.jsonl").read_text().splitlines()
    out = {o["custom_id"]: o["response"] for o in map(json.loads, written)}
    for cid, extra in (("eos", {"ignore_eos": True}), ("min", {"min_tokens": 10})):
        ref = model.generate(MESSAGES, max_new_tokens=BUDGET, **extra)
        assert out[cid]["status_code"] == 200
        assert out[cid]["body"]["choices"][0]["message"]["content"] == ref.text
        assert out[cid]["body"]["usage"]["completion_tokens"] == ref.completion_tokens
    assert out["guided"]["status_code"] == 400
    assert out["guided"]["body"]["error"]["param"] == "guided_choice"


# -- options the server cannot honour ----------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, name", [
    ({"extra_body": {"guided_choice": ["yes", "no"]}}, "guided_choice"),
    ({"extra_body": {"guided_json": {"type": "object"}}}, "guided_json"),
    ({"extra_body": {"guided_regex": "a+"}}, "guided_regex"),
    ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, "modalities|audio"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"extra_body": {"best_of": 2}}, "best_of"),
    ({"extra_body": {"best_of": True}}, "best_of"),
    ({"extra_body": {"use_beam_search": True}}, "use_beam_search"),
    ({"extra_body": {"min_p": 0.1}}, "min_p"),
    ({"extra_body": {"stop_token_ids": [5]}}, "stop_token_ids"),
    ({"extra_body": {"structured_outputs": {"choice": ["a"]}}}, "structured_outputs"),
    ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
    ({"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
     "stream_options.continuous_usage_stats"),
])
def test_options_the_server_cannot_honour_are_400_naming_them(server, kwargs, name):
    with pytest.raises(openai.BadRequestError) as e:
        ask(server.client(), **kwargs)
    assert e.value.status_code == 400 and e.value.param in name.split("|") and e.value.param in e.value.message
    assert e.value.code == "unsupported_option"


def test_neutral_values_and_metadata_fields_are_accepted(server, local_model):
    ref = local_model.generate(MESSAGES, max_new_tokens=BUDGET)
    out = ask(server.client(), user="someone", store=False, metadata={"run": "7"}, modalities=["text"],
              extra_body={"best_of": 1, "stop_token_ids": [], "skip_special_tokens": True, "frobnicate": None})
    assert out.choices[0].message.content == ref.text


# -- /v1/models -----------------------------------------------------------------------------------------------


def test_models_names_no_server_path(server, server_model_dir):
    raw = httpx.get(server.url + "/v1/models", timeout=30)
    card = raw.json()["data"][0]
    assert card["id"] == MODEL and card["root"] == server_model_dir.name
    assert str(server_model_dir.parent) not in raw.text


def test_public_model_name(tmp_path):
    assert public_model_name("mPLUG/mPLUG-Owl3-7B-241101") == "mPLUG/mPLUG-Owl3-7B-241101"
    (tmp_path / "owl" / "ckpt").mkdir(parents=True)
    assert public_model_name(str(tmp_path / "owl" / "ckpt")) == "ckpt"
    assert public_model_name("./models/ckpt/") == "ckpt"


# -- Host and Origin ------------------------------------------------------------------------------------------


def test_a_forged_host_is_refused(server):
    port = server.url.rsplit(":", 1)[1]
    forged = server.client(default_headers={"Host": f"rebind.attacker.test:{port}"})
    with pytest.raises(openai.PermissionDeniedError) as e:
        forged.models.list()
    assert e.value.status_code == 403 and e.value.code == "host_not_allowed"
    with pytest.raises(openai.PermissionDeniedError):
        ask(forged)
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST."):
        assert server.client(default_headers={"Host": host}).models.list().data[0].id == MODEL, host


def test_a_foreign_origin_is_refused_and_the_own_one_is_not(server):
    body = {"messages": MESSAGES, "max_tokens": 2}
    url = server.url + "/v1/chat/completions"
    refused = httpx.post(url, json=body, headers={"Origin": "http://evil.example"}, timeout=60)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "origin_not_allowed"
    assert httpx.post(url, json=body, headers={"Origin": "null"}, timeout=60).status_code == 403
    assert httpx.post(url, json=body, headers={"Origin": server.url}, timeout=60).status_code == 200


def test_allowed_hosts_and_origins_let_them_in(logged_server):
    port = logged_server.url.rsplit(":", 1)[1]
    named = logged_server.client(default_headers={"Host": f"{ALLOWED_HOST}:{port}"})
    assert named.models.list().data[0].id == MODEL
    url = logged_server.url + "/v1/models"
    allowed = httpx.get(url, headers={"Origin": ALLOWED_ORIGIN}, timeout=30)
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    preflight = httpx.options(logged_server.url + "/v1/chat/completions", timeout=30, headers={
        "Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert httpx.get(url, headers={"Origin": "http://other.example.test"}, timeout=30).status_code == 403
    assert httpx.get(url, headers={"Host": "other.internal.test"}, timeout=30).status_code == 403


def test_an_allowed_page_passes_the_preflight_and_still_needs_the_api_key(strict_server):
    from .helpers import API_KEY

    url = strict_server.url + "/v1/chat/completions"
    preflight = httpx.options(url, timeout=30, headers={
        "Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})  # browsers send no key here
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    body = {"messages": MESSAGES, "max_tokens": 2}
    keyless = httpx.post(url, json=body, headers={"Origin": ALLOWED_ORIGIN}, timeout=60)
    assert keyless.status_code == 401 and keyless.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    keyed = httpx.post(url, json=body, headers={"Origin": ALLOWED_ORIGIN, "Authorization": f"Bearer {API_KEY}"},
                       timeout=60)
    assert keyed.status_code == 200 and "X-Owlvid-Frames" in keyed.headers["access-control-expose-headers"]


# -- client errors in the log -------------------------------------------------------------------------------


def _hang_up_mid_upload(url: str) -> None:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        s.sendall(f"POST /v1/uploads?filename=a.mp4 HTTP/1.1\r\nHost: {host}:{port}\r\n"
                  "Content-Length: 1000000\r\n\r\n".encode() + b"x" * 5000)
        time.sleep(0.2)


def test_client_errors_leave_one_line_each_and_no_traceback(logged_server, tmp_path):
    url, client = logged_server.url, logged_server.client()
    before = logged_server.log.read_text()
    for part in ({"type": "video_url", "video_url": {"url": "http://10.0.0.1/clip.mp4"}},
                 {"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/a.png"}}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [part]}])
    with pytest.raises(openai.BadRequestError):
        ask(client, extra_body={"guided_choice": ["a"]})
    with pytest.raises(openai.UnprocessableEntityError):
        ask(client, extra_body={"max_tokens": 0})
    refused = httpx.post(url + "/v1/uploads/url", json={"url": "http://127.0.0.1:1/x.mp4"}, timeout=30)
    assert refused.status_code == 400
    write_video(tmp_path / "clip.mp4", 30)
    video = httpx.post(url + "/v1/uploads", params={"filename": "clip.mp4"},
                       content=(tmp_path / "clip.mp4").read_bytes(), timeout=60).json()["id"]
    image = httpx.post(url + "/v1/uploads", params={"filename": "a.png"}, content=png_bytes(),
                       timeout=60).json()["id"]
    bad_previews = [{"mm_processor_kwargs": {"sampling": "bogus"}},
                    {"mm_processor_kwargs": {"fps": 2, "num_frames": 4}},
                    {"mm_processor_kwargs": {"start": 5, "end": 1}}, {"mm_processor_kwargs": {"start": "x"}},
                    {"media_io_kwargs": {"video": 5}}, {"media_io_kwargs": {"video": [1]}}, [1]]
    for body in bad_previews:
        answer = httpx.post(f"{url}/v1/uploads/{video}/frames", json=body, timeout=60)
        assert 400 <= answer.status_code < 500, (body, answer.text)
    assert httpx.post(f"{url}/v1/uploads/{video}/frames", content=b"{", timeout=30).status_code == 400
    assert httpx.post(f"{url}/v1/uploads/upl-nothing/frames", json={}, timeout=30).status_code == 404
    with pytest.raises(openai.BadRequestError):  # an image upload sent as a video
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": f"owlvid-upload://{image}"}}]}])
    for _ in range(3):
        _hang_up_mid_upload(url)
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2000, stream=True,
                                            extra_body={"ignore_eos": True})  # the client leaves mid-answer
    next(iter(stream))
    stream.close()
    assert httpx.get(url + "/v1/models", headers={"Host": "evil.test"}, timeout=30).status_code == 403
    assert httpx.post(url + "/v1/uploads", content=png_bytes(), headers={"Origin": "http://evil.test"},
                      timeout=30).status_code == 403
    ok = client.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png_bytes(), "image/png")}}]}])
    assert ok.choices[0].finish_reason in ("stop", "length")  # the server goes on
    time.sleep(1.0)
    log = logged_server.log.read_text()[len(before):]
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
    assert log.count("POST /v1/uploads/url: 400") == 1  # one line with the reason
    assert log.count(f"POST /v1/uploads/{video}/frames: 400") == 4  # the options the media layer refuses


@pytest.mark.parametrize("argv, fragment", [
    (["--allowed-origins", "example.com"], "--allowed-origins example.com"),
    (["--allowed-origins", "http://example.com/page"], "scheme, host and port only"),
    (["--allowed-origins", "ftp://example.com"], "--allowed-origins ftp://example.com"),
    (["--allowed-origins", ","], "at least one origin"),
    (["--allowed-hosts", "http://example.com"], "--allowed-hosts http://example.com"),
])
def test_bad_origin_and_host_flags_are_one_line_usage_errors(argv, fragment, capsys):
    from owlvid.cli import main

    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("owlvid: error: ") and fragment in err[0]


def test_default_host_names_by_bound_address():
    import socket as sockets

    from owlvid.server.origins import OriginHostPolicy

    loopback = OriginHostPolicy("127.0.0.1")
    for host in ("127.0.0.1:8000", "localhost", "[::1]:80", "LocalHost.:9"):
        assert loopback.host_allowed(host), host
    for host in ("10.0.0.5:8000", "rebind.test:8000", "127.0.0.2", "[::2]"):
        assert not loopback.host_allowed(host), host
    assert OriginHostPolicy(None).names == loopback.names  # create_app without `serve`: loopback
    lan = OriginHostPolicy("192.168.1.7")
    assert lan.host_allowed("192.168.1.7:8000") and not lan.host_allowed("localhost")
    for wildcard in ("0.0.0.0", "::"):  # every interface: any address, this machine's names, not other names
        every = OriginHostPolicy(wildcard)
        for host in ("10.0.0.5:8000", "[fe80::1]:8000", "localhost:8000", sockets.gethostname()):
            assert every.host_allowed(host), (wildcard, host)
        assert not every.host_allowed("rebind.attacker.test:8000")
    listed = OriginHostPolicy("0.0.0.0", allowed_hosts=["GPU1.lab.example.com:8000"])
    assert listed.host_allowed("gpu1.lab.example.com") and not listed.host_allowed("gpu2.lab.example.com")
    assert OriginHostPolicy("127.0.0.1", allowed_hosts=["*"]).host_allowed("anything.test")


def test_same_origin_and_listed_origins():
    from owlvid.server.origins import OriginHostPolicy

    policy = OriginHostPolicy("127.0.0.1", allowed_origins=["HTTP://App.Example.test:3000/"])
    assert policy.origin_allowed(None, "127.0.0.1:8000")  # no Origin: not a browser's cross-origin request
    assert policy.origin_allowed("http://127.0.0.1:8000", "127.0.0.1:8000")
    assert policy.origin_allowed("https://127.0.0.1", "127.0.0.1:443")  # behind a TLS proxy
    assert policy.origin_allowed("http://app.example.test:3000", "127.0.0.1:8000")
    for origin in ("http://localhost:8000", "http://127.0.0.1:8001", "http://app.example.test", "null",
                   "http://127.0.0.1.evil.test:8000"):
        assert not policy.origin_allowed(origin, "127.0.0.1:8000"), origin
    assert OriginHostPolicy("127.0.0.1", allowed_origins=["*"]).origin_allowed("null", "127.0.0.1:8000")
