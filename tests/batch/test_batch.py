"""`owlvid batch`: OpenAI batch files answered on one machine, with the server's request parsing.

Answers of the tiny random checkpoint are random tokens: each 200 line is compared with the same request
run through `model.generate` (greedy), which is what the server answers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from owlvid import batch
from owlvid.errors import InputError
from tests.media.synth import write_video

pytest.importorskip("pydantic")

MAX_TOKENS = 6


def request_line(custom_id: str, content, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "tiny", "messages": [{"role": "user", "content": content}],
                     "max_tokens": MAX_TOKENS, **body}}


def write_jsonl(path: Path, items: list) -> Path:
    path.write_text("".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in items))
    return path


def read_output(path: Path) -> dict[str, dict]:
    """custom_id -> output line; fails on a custom_id written twice or a line that is not JSON."""
    lines = [json.loads(raw) for raw in path.read_text().splitlines()]
    ids = [line["custom_id"] for line in lines]
    assert len(ids) == len(set(ids)), f"duplicate custom_ids: {ids}"
    return {line["custom_id"]: line for line in lines}


def run_cli(*args: str, **kwargs) -> subprocess.Popen | subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONIOENCODING="utf-8", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "owlvid", *args], capture_output=True, text=True, env=env,
                          timeout=180, **kwargs)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("batch-media")
    image = folder / "photo.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 64, 3), dtype=np.uint8)).save(image)
    video = folder / "clip.mp4"
    write_video(video, 24)
    return {"image": image, "video": video, "missing": folder / "missing.mp4", "folder": folder}


@pytest.fixture(scope="module")
def model_dir(tiny_owl3_dirs) -> Path:
    return tiny_owl3_dirs["241101"]


@pytest.fixture(scope="module")
def model(tiny_owl3_models):
    return tiny_owl3_models["241101"]


def job_lines(media: dict[str, Path]) -> list[dict]:
    video, image = media["video"], media["image"]
    return [
        request_line("text", "Say something."),
        request_line("image", [{"type": "image_url", "image_url": {"url": str(image)}},
                               {"type": "text", "text": "What is in the photo?"}]),
        request_line("video-1", [{"type": "video_url", "video_url": {"url": video.as_uri()}},
                                 {"type": "text", "text": "What happens?"}]),
        request_line("missing", [{"type": "video_url", "video_url": {"url": str(media["missing"])}},
                                 {"type": "text", "text": "What happens?"}]),
        request_line("text-2", [{"type": "text", "text": "Tell me more."}], max_tokens=MAX_TOKENS + 3),
        request_line("video-2", [{"type": "video_url", "video_url": {"url": str(video)}},
                                 {"type": "text", "text": "Who is there?"}]),
    ]


def expected_answer(model, body: dict):
    """What `model.generate` answers for a request body (greedy), with the media parts as owlvid parts."""
    messages = []
    for m in body["messages"]:
        content = m["content"]
        if isinstance(content, list):
            parts = []
            for p in content:
                if p["type"] == "text":
                    parts.append(p)
                else:
                    kind = p["type"].removesuffix("_url")
                    url = p[p["type"]]["url"]
                    parts.append({"type": kind, kind: url.removeprefix("file://")})
            content = parts
        messages.append({"role": m["role"], "content": content})
    return model.generate(messages, max_new_tokens=body["max_tokens"], temperature=0.0)


def assert_answered_like_generate(model, line: dict, request: dict) -> None:
    assert line["error"] is None and line["id"].startswith("batch_req_")
    response = line["response"]
    assert response["status_code"] == 200, response
    body = response["body"]
    assert body["object"] == "chat.completion"
    g = expected_answer(model, request["body"])
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": g.text}
    assert choice["finish_reason"] == g.finish_reason
    assert body["usage"] == {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
                             "total_tokens": g.prompt_tokens + g.completion_tokens}


def test_job_answers_like_generate_and_a_bad_request_gets_its_400(model, media, tmp_path):
    requests = job_lines(media) + [request_line("two-choices", "Hi", n=2)]
    source = write_jsonl(tmp_path / "in.jsonl", requests)
    output = tmp_path / "out.jsonl"
    summary = batch.run(source, output, model, max_batch=3, progress=False)
    engine = summary.pop("engine")
    assert summary == {"requests": 7, "skipped": 0, "completed": 5, "failed": 2, "output": str(output)}
    raw = output.read_text()
    assert raw.endswith("\n") and len(raw.splitlines()) == 7
    lines = read_output(output)
    # the run record counts what the engine did: the answered requests' tokens, and both refused requests
    # (missing media, n=2: refused while preparing, as the request builder's APIError)
    answered = [line["response"]["body"]["usage"] for line in lines.values() if line["error"] is None
                and line["response"]["status_code"] == 200]
    assert engine["requests_completed"] == 5 and engine["requests_failed"] == {"APIError": 2}
    assert engine["generation_tokens"] == sum(u["completion_tokens"] for u in answered)
    assert engine["prompt_tokens"] == sum(u["prompt_tokens"] for u in answered)
    assert engine["time_to_first_token"]["count"] == 5
    assert set(lines) == {r["custom_id"] for r in requests}
    for request in requests:
        if request["custom_id"] not in ("missing", "two-choices"):
            assert_answered_like_generate(model, lines[request["custom_id"]], request)
    missing = lines["missing"]["response"]
    assert missing["status_code"] == 400 and lines["missing"]["error"] is None
    assert missing["body"]["error"]["code"] == "invalid_media"
    assert "media file not found" in missing["body"]["error"]["message"]
    assert missing["body"]["error"]["param"] == "messages.0.content.0"
    refused = lines["two-choices"]["response"]
    assert refused["status_code"] == 400 and refused["body"]["error"]["param"] == "n"
    # the two questions about the same video run next to each other (one decode/encode of it)
    order = [r.custom_id for r in batch.job_order(batch.read_requests(source))]
    assert order.index("video-2") == order.index("video-1") + 1


@pytest.mark.parametrize(("lines", "fragment"), [
    (["GOOD", '{"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", "body": {'],
     "line 2: not valid JSON"),
    (["GOOD", "", "DUP"], "line 3: duplicate custom_id 'a' (first on line 1)"),
    (["GOOD", {"custom_id": "b", "method": "POST", "url": "/v1/completions", "body": {}}],
     "line 2: url must be '/v1/chat/completions'"),
    ([{"custom_id": "", "method": "POST", "url": "/v1/chat/completions", "body": {}}],
     "line 1: custom_id must be a non-empty string"),
    (["GOOD", {"custom_id": "b", "method": "GET", "url": "/v1/chat/completions", "body": {}}],
     "line 2: method must be POST"),
    (["GOOD", {"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}}],
     "line 2: body.messages: List should have at least 1 item"),
])
def test_invalid_input_is_one_line_naming_the_line_and_writes_nothing(model_dir, tmp_path, lines, fragment):
    good = request_line("a", "Hi")
    items = [good if x in ("GOOD", "DUP") else x for x in lines]
    source = write_jsonl(tmp_path / "in.jsonl", items)
    output = tmp_path / "out.jsonl"
    proc = run_cli("batch", "-i", str(source), "-o", str(output), "--model", str(model_dir), "--device", "cpu")
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert err[0].startswith(f"owlvid: error: {source} ") and fragment in err[0], err[0]
    assert not output.exists()


def test_resume_skips_answered_lines_and_cuts_a_torn_last_line(model, media, tmp_path):
    requests = job_lines(media)
    source = write_jsonl(tmp_path / "in.jsonl", requests)
    reference = tmp_path / "reference.jsonl"
    batch.run(source, reference, model, progress=False)
    answered = reference.read_text().splitlines()
    output = tmp_path / "out.jsonl"
    torn = answered[2][: len(answered[2]) // 2]
    output.write_text(answered[0] + "\n" + answered[1] + "\n" + torn)

    summary = batch.run(source, output, model, progress=False)
    assert summary["skipped"] == 2 and summary["completed"] + summary["failed"] == len(requests) - 2
    text = output.read_text()
    assert text.startswith(answered[0] + "\n" + answered[1] + "\n")  # kept byte for byte
    assert torn not in text
    lines = read_output(output)
    assert set(lines) == {r["custom_id"] for r in requests}
    reference_lines = read_output(reference)
    for custom_id, line in lines.items():
        assert line["response"]["status_code"] == reference_lines[custom_id]["response"]["status_code"]
        if line["response"]["status_code"] == 200:
            assert (line["response"]["body"]["choices"] ==
                    reference_lines[custom_id]["response"]["body"]["choices"])
    # nothing left: a rerun writes nothing
    before = output.read_bytes()
    assert batch.run(source, output, model, progress=False)["skipped"] == len(requests)
    assert output.read_bytes() == before


def test_damaged_output_in_the_middle_is_refused(model, media, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [request_line("a", "Hi"), request_line("b", "Ho")])
    output = tmp_path / "out.jsonl"
    output.write_text("not json\n" + json.dumps({"custom_id": "a"}) + "\n")
    with pytest.raises(InputError, match=r"is not a batch output file \(line 1 is not a batch output line\)"):
        batch.run(source, output, model, progress=False)
    assert output.read_text() == "not json\n" + json.dumps({"custom_id": "a"}) + "\n"


def test_killed_job_resumes_to_the_uninterrupted_answers(model, model_dir, media, tmp_path):
    """A real `owlvid batch` process killed with SIGKILL mid-job, then rerun: every custom_id once, and
    the answers of an uninterrupted run."""
    n = 16
    requests = []
    for i in range(n):
        if i % 4 == 1:
            content = [{"type": "video_url", "video_url": {"url": str(media["video"])}},
                       {"type": "text", "text": f"Question {i}?"}]
        else:
            content = f"Question number {i}, answer at length."
        requests.append(request_line(f"q{i}", content, max_tokens=48))
    source = write_jsonl(tmp_path / "in.jsonl", requests)
    output = tmp_path / "out.jsonl"
    args = ["batch", "-i", str(source), "-o", str(output), "--model", str(model_dir), "--device", "cpu",
            "--dtype", "float32", "--max-batch", "1", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "owlvid", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (output.exists() and output.read_bytes().count(b"\n") >= 1):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    written = output.read_bytes().count(b"\n")
    assert 1 <= written < n, "the job was not interrupted mid-way"

    rerun = run_cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{n} request(s)" in rerun.stderr
    lines = read_output(output)
    assert set(lines) == {r["custom_id"] for r in requests}

    reference = tmp_path / "reference.jsonl"
    batch.run(source, reference, model, max_batch=4, progress=False)
    expected = read_output(reference)
    for custom_id, line in lines.items():
        assert line["response"]["status_code"] == 200
        assert line["response"]["body"]["choices"] == expected[custom_id]["response"]["body"]["choices"]
        assert line["response"]["body"]["usage"] == expected[custom_id]["response"]["body"]["usage"]


def test_relative_paths_are_taken_from_the_working_directory(tmp_path, media, model, monkeypatch):
    """Unrestricted, a relative media path means what it means in the user's shell; with
    --allowed-local-media-path it is taken under that folder."""
    part = [{"type": "image_url", "image_url": {"url": media["image"].name}}, {"type": "text", "text": "What?"}]
    requests = write_jsonl(tmp_path / "in.jsonl", [request_line("rel", part)])
    monkeypatch.chdir(media["folder"])
    output = tmp_path / "out.jsonl"
    batch.run(requests, output, model, progress=False)
    assert read_output(output)["rel"]["response"]["status_code"] == 200
    monkeypatch.chdir(tmp_path)  # the image is not here, but under the allowed folder
    restricted = tmp_path / "restricted.jsonl"
    batch.run(requests, restricted, model, allowed_local_media_path=media["folder"], progress=False)
    assert read_output(restricted)["rel"]["response"]["status_code"] == 200
    elsewhere = tmp_path / "elsewhere.jsonl"
    batch.run(requests, elsewhere, model, progress=False)  # not in the working directory: a 400 line
    assert read_output(elsewhere)["rel"]["response"]["status_code"] == 400
