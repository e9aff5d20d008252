"""`owlvid batch` beyond the answers: the per-request audit (`body["owlvid"]`), `--media-timeout` against
media that really hang, and `--json-progress` read from a real process."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import owlvid
from owlvid import batch
from owlvid.jobs import generate_each
from tests.batch.test_batch import assert_answered_like_generate, read_output, request_line, write_jsonl
from tests.media.synth import write_video

pytest.importorskip("fastapi")

FPS = 25
# owl3-eval with num_frames=4 on 50 frames: the middle frame of each quarter (edges 0, 12, 25, 37, 50)
EXPECTED_INDICES = [5, 18, 30, 43]
EXPECTED_TIMESTAMPS = [i / FPS for i in EXPECTED_INDICES]


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("audit") / "clip.mp4"
    write_video(path, 50, fps=FPS)
    return path


def video_request(custom_id: str, url: str, question: str) -> dict:
    return request_line(custom_id, [{"type": "video_url", "video_url": {"url": url}},
                                    {"type": "text", "text": question}],
                        media_io_kwargs={"video": {"num_frames": len(EXPECTED_INDICES)}})


def media_of(line: dict) -> dict:
    body = line["response"]["body"]
    assert line["response"]["status_code"] == 200, body
    (media,) = body["owlvid"]["media"]
    return media


@pytest.mark.parametrize("form", ["path", "data-url"])
def test_audit_names_the_frames_decoder_and_hash_and_a_second_question_hits_the_cache(
        tiny_owl3_dirs, video, tmp_path, form):
    """A local file is decoded chunk by chunk while encoding (streamed path); a data: URL is decoded
    eagerly. Either way the audit has the sampler's frames with the decoder's timestamps, the SHA-256 of
    the bytes, and the second question about the video is answered from the visual cache."""
    model = owlvid.load(tiny_owl3_dirs["241101"], dtype="float32", device="cpu")
    data = video.read_bytes()
    url = str(video) if form == "path" else "data:video/mp4;base64," + base64.b64encode(data).decode()
    requests = [video_request("first", url, "What happens?"), video_request("second", url, "Who is there?")]
    output = tmp_path / "out.jsonl"
    assert batch.run(write_jsonl(tmp_path / "in.jsonl", requests), output, model, progress=False)["completed"] == 2
    lines = read_output(output)
    first, second = media_of(lines["first"]), media_of(lines["second"])
    digest = hashlib.sha256(data).hexdigest()
    for media in (first, second):
        assert media["type"] == "video" and media["decoder"] == "pyav"
        assert media["frames"] == media["crops"] == len(EXPECTED_INDICES)
        assert media["indices"] == EXPECTED_INDICES
        assert media["timestamps"] == pytest.approx(EXPECTED_TIMESTAMPS, abs=1e-6)
        assert media["sha256"] == digest
    assert first["visual_cache"] == "miss" and first["encode_s"] > 0 and first["decode_s"] > 0
    assert second["visual_cache"] == "hit" and second["encode_s"] < first["encode_s"]
    if form == "path":  # the file is recognised before decoding: nothing decoded the second time
        assert first["source"].endswith("clip.mp4") and second["decode_s"] == 0
    timings = lines["first"]["response"]["body"]["owlvid"]["timings"]
    assert timings["media_s"] == first["decode_s"] and timings["vision_s"] == first["encode_s"]
    assert timings["decode_steps"] == lines["first"]["response"]["body"]["usage"]["completion_tokens"] - 1
    # time was spent where the work was: the prefill, the decoding steps, the preparation (which decoded the video)
    assert timings["prefill_s"] > 0 and timings["decode_s"] > 0 and timings["prepare_s"] >= first["decode_s"] > 0
    messages = [{"role": "user", "content": [{"type": "video", "video": url, "num_frames": len(EXPECTED_INDICES)},
                                             {"type": "text", "text": "What happens?"}]}]
    alone = model.generate(messages, max_new_tokens=request_line("x", "")["body"]["max_tokens"])
    assert lines["first"]["response"]["body"]["choices"][0]["message"]["content"] == alone.text
    assert alone.media[0]["indices"] == EXPECTED_INDICES  # the Python API reports the same


def test_the_audit_survives_the_disk_cache(tiny_owl3_dirs, video, tmp_path):
    """A video answered from the disk tier of the visual cache (another process, say) still says which frames
    it stands for."""
    messages = [{"role": "user", "content": [{"type": "video", "video": str(video), "num_frames": 4},
                                             {"type": "text", "text": "What happens?"}]}]
    first = owlvid.load(tiny_owl3_dirs["241101"], dtype="float32", device="cpu", cache_dir=tmp_path / "cache")
    encoded = first.generate(messages, max_new_tokens=3).media[0]
    fresh = owlvid.load(tiny_owl3_dirs["241101"], dtype="float32", device="cpu", cache_dir=tmp_path / "cache")
    (cached,) = fresh.generate(messages, max_new_tokens=3).media
    assert encoded["visual_cache"] == "miss" and cached["visual_cache"] == "hit"
    for key in ("indices", "timestamps", "sha256", "decoder", "frames"):
        assert cached[key] == encoded[key]
    assert cached["indices"] == EXPECTED_INDICES


class StallingHandler(BaseHTTPRequestHandler):
    """Answers 200 with a promised megabyte, sends a few bytes, then stalls until released."""

    release = threading.Event()

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Content-Length", str(1 << 20))
        self.end_headers()
        self.wfile.write(b"\x00\x00\x00\x18ftypmp42" + bytes(1000))
        self.wfile.flush()
        self.release.wait(120)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def stalling_host():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StallingHandler)
    server.daemon_threads = True
    StallingHandler.release.clear()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    StallingHandler.release.set()
    server.shutdown()
    server.server_close()


def test_a_video_that_hangs_is_a_408_line_and_the_job_goes_on(tiny_owl3_models, video, tmp_path, stalling_host):
    """The download stalls mid-body (it would hang until the 60 s download timeout): with media_timeout=1 the
    request fails on its own within seconds, and the requests after it are answered."""
    model = tiny_owl3_models["241101"]
    requests = [video_request("hangs", f"{stalling_host}/clip.mp4", "What happens?"),
                request_line("text", "Say something."),
                request_line("video", [{"type": "video_url", "video_url": {"url": str(video)}},
                                       {"type": "text", "text": "Who is there?"}]),
                request_line("image-hangs", [{"type": "image_url", "image_url": {"url": f"{stalling_host}/a.png"}},
                                             {"type": "text", "text": "What is it?"}])]
    output = tmp_path / "out.jsonl"
    t0 = time.monotonic()
    summary = batch.run(write_jsonl(tmp_path / "in.jsonl", requests), output, model, progress=False,
                        media_timeout=1.0)
    elapsed = time.monotonic() - t0
    assert elapsed < 20, f"the job took {elapsed:.1f} s"
    assert (summary["completed"], summary["failed"]) == (2, 2)
    lines = read_output(output)
    for custom_id in ("hangs", "image-hangs"):
        response = lines[custom_id]["response"]
        assert response["status_code"] == 408, response
        error = response["body"]["error"]
        assert error["code"] == "media_timeout" and "media_timeout=1 s" in error["message"]
        assert "127.0.0.1" in error["message"] and "Traceback" not in error["message"]
    for custom_id in ("text", "video"):
        assert_answered_like_generate(model, lines[custom_id], next(r for r in requests if r["custom_id"] == custom_id))


def test_generate_each_fails_only_the_job_whose_media_hangs(tiny_owl3_models, stalling_host):
    model = tiny_owl3_models["241101"]
    hangs = [{"role": "user", "content": [{"type": "video", "video": f"{stalling_host}/v.mp4"},
                                          {"type": "text", "text": "?"}]}]
    text = [{"role": "user", "content": "Hello there"}]
    t0 = time.monotonic()
    results = dict(generate_each(model, [("hangs", (hangs, {"max_new_tokens": 4})),
                                         ("text", (text, {"max_new_tokens": 4}))], media_timeout=0.5))
    assert time.monotonic() - t0 < 15
    assert isinstance(results["hangs"], owlvid.errors.MediaTimeout)
    assert results["text"].token_ids == model.generate(text, max_new_tokens=4).token_ids


def test_json_progress_lines_from_a_real_process(tiny_owl3_dirs, video, tmp_path):
    requests = [request_line("a", "Say something."), video_request("b", str(video), "What happens?"),
                request_line("missing", [{"type": "video_url", "video_url": {"url": str(tmp_path / "nope.mp4")}},
                                         {"type": "text", "text": "?"}])]
    source = write_jsonl(tmp_path / "in.jsonl", requests)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8")
    proc = subprocess.run([sys.executable, "-m", "owlvid", "batch", "-i", str(source), "-o", str(tmp_path / "o.jsonl"),
                           "--model", str(tiny_owl3_dirs["241101"]), "--device", "cpu", "--json-progress",
                           "--media-timeout", "30"], capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("owlvid: batch: 3 request(s): 2 answered, 1 failed")
    progress = [json.loads(line) for line in lines[:-1]]  # every other line is one JSON object
    assert len(progress) == 4
    keys = {"done", "failed", "total", "requests_per_s", "eta_s", "elapsed_s"}
    assert all(set(p) == keys and p["total"] == 3 for p in progress)
    assert [p["done"] + p["failed"] for p in progress] == [0, 1, 2, 3]
    assert (progress[-1]["done"], progress[-1]["failed"], progress[-1]["eta_s"]) == (2, 1, 0.0)
    assert progress[-1]["requests_per_s"] > 0 and progress[0]["eta_s"] is None
    assert all(b["elapsed_s"] >= a["elapsed_s"] for a, b in zip(progress, progress[1:]))
    assert "it/s" not in proc.stderr and "req/s" not in proc.stderr  # no bar next to the lines
