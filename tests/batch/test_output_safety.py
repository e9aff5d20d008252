"""The output of a batch job is never destroyed, and is written by one run at a time (issue 20, items 2-4).

A file that is not batch output is refused untouched; only a torn tail after valid lines is cut. Two real
`owlvid batch` processes on one output: the second exits at once naming the first; after a `kill -9` of the
first, a rerun answers the rest (no stale lock). An output hard-linked to the input is refused.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from owlvid import batch
from owlvid.errors import InputError
from tests.batch.test_batch import read_output, request_line, run_cli, write_jsonl
from tests.second_run import assert_second_run_refused

pytest.importorskip("fastapi")


def no_model():
    raise AssertionError("a refused output must not load a model")


OUTPUT_LINE = {"id": "batch_req_1", "custom_id": "a", "response": {"status_code": 200, "request_id": "r",
                                                                   "body": {}}, "error": None}


@pytest.mark.parametrize("content", [
    b'{"model":"x","temperature":0.5,"stop":["a"]}',  # a minified JSON config: one line, no newline
    b'{"model": "x"}\n',
    b"not json",
    b"[1, 2, 3]\n",
    # a batch *input* line: it has a custom_id, but it is not an answer
    json.dumps(request_line("a", "Hi")).encode() + b"\n",
], ids=["minified-config", "json-line", "text", "array", "request-line"])
def test_a_file_that_is_not_batch_output_is_refused_untouched(tmp_path, content):
    source = write_jsonl(tmp_path / "in.jsonl", [request_line("a", "Hi"), request_line("b", "Ho")])
    output = tmp_path / "config.json"
    output.write_bytes(content)
    with pytest.raises(InputError, match=r"config.json is not a batch output file") as e:
        batch.run(source, output, no_model, progress=False)
    assert "\n" not in str(e.value)
    assert output.read_bytes() == content


def test_a_torn_tail_is_cut_only_after_valid_lines(tmp_path):
    good = json.dumps(OUTPUT_LINE).encode() + b"\n"
    path = tmp_path / "out.jsonl"
    path.write_bytes(good + b'{"id": "batch_req_2", "custom_id": "b", "resp')  # killed while writing
    assert batch.read_done(path) == {"a"}
    assert path.read_bytes() == good
    # a last line that ends with its newline was written whole: damage, not a tear
    path.write_bytes(good + b"garbage\n")
    with pytest.raises(InputError, match="line 2 is not a batch output line"):
        batch.read_done(path)
    assert path.read_bytes() == good + b"garbage\n"
    # no valid line before the tail: nothing says this file is ours
    path.write_bytes(b'{"id": "batch_req_2", "custom_id": "b", "resp')
    with pytest.raises(InputError, match="is not a batch output file"):
        batch.read_done(path)
    assert path.read_bytes() == b'{"id": "batch_req_2", "custom_id": "b", "resp'
    # empty and blank files are empty outputs
    path.write_bytes(b"\n\n")
    assert batch.read_done(path) == set()


def test_an_output_hard_linked_to_the_input_is_refused(tmp_path, model_dir):
    source = write_jsonl(tmp_path / "in.jsonl", [request_line("a", "Hi"), request_line("b", "Ho")])
    before = source.read_bytes()
    linked = tmp_path / "out.jsonl"
    os.link(source, linked)
    with pytest.raises(InputError, match="is the input file"):
        batch.run(source, linked, no_model, progress=False)
    proc = run_cli("batch", "-i", str(source), "-o", str(linked), "--model", str(model_dir), "--device", "cpu")
    err = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(err) == 1 and "is the input file" in err[0], proc.stderr
    assert source.read_bytes() == before


@pytest.fixture(scope="module")
def model_dir(tiny_owl3_dirs) -> Path:
    return tiny_owl3_dirs["241101"]


@pytest.fixture
def silent_host():
    """An http host that takes connections and never answers (a download waits until its timeout)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # connections complete in the backlog; nothing is ever read or sent
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def test_a_second_run_on_the_same_output_exits_at_once_naming_the_first(model_dir, model, tmp_path, silent_host):
    """Two real `owlvid batch` processes: while the first runs (its last request's video download stalls, so
    it runs until killed), the second refuses at once with the first's PID and writes nothing; after the
    first is killed with SIGKILL, the next run takes the lock and every custom_id ends in the output once."""
    requests = [request_line(f"q{i}", f"Question number {i}?") for i in range(3)]
    requests.append(request_line("stalls", [{"type": "video_url", "video_url": {"url": f"{silent_host}/v.mp4"}},
                                            {"type": "text", "text": "What happens?"}]))
    source = write_jsonl(tmp_path / "in.jsonl", requests)
    output = tmp_path / "out.jsonl"
    args = ["batch", "-i", str(source), "-o", str(output), "--model", str(model_dir), "--device", "cpu",
            "--dtype", "float32", "--no-progress"]
    env = dict(os.environ, PYTHONIOENCODING="utf-8", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    assert_second_run_refused(args, env, output, 3, output)
    assert Path(f"{output}.lock").exists()  # left by the killed run: it must not block the next one
    summary = batch.run(source, output, model, media_timeout=1.0, progress=False)
    assert (summary["skipped"], summary["failed"]) == (3, 1)
    lines = read_output(output)  # fails on a custom_id written twice
    assert sorted(lines) == sorted(r["custom_id"] for r in requests)
    assert not Path(f"{output}.lock").exists()


@pytest.fixture(scope="module")
def model(tiny_owl3_models):
    return tiny_owl3_models["241101"]


def test_the_ray_job_takes_the_same_lock(model_dir, tmp_path):
    """`owlvid batch --ray` (owlvid.ray.run) refuses an output another process is writing, before it starts
    a Ray cluster; the holder here is a real process holding the lock as `owlvid batch` does."""
    ray = pytest.importorskip("ray")
    import owlvid.ray

    cluster = ray.is_initialized()
    source = write_jsonl(tmp_path / "in.jsonl", [request_line("a", "Hi")])
    output = tmp_path / "out.jsonl"
    code = ("import time\nfrom owlvid.records import exclusive\n"
            f"with exclusive({str(output)!r}):\n    print('held', flush=True)\n    time.sleep(120)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    holder = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(InputError, match=rf"{output} is being written by another owlvid run \(PID {holder.pid}\)"):
            owlvid.ray.run(source, output, model_dir, device="cpu")
        assert not output.exists()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert ray.is_initialized() == cluster  # refused before connecting to (or starting) a cluster


def test_a_symlink_to_an_output_shares_its_lock(tmp_path):
    from owlvid.records import exclusive

    output = tmp_path / "out.jsonl"
    output.touch()
    (tmp_path / "alias.jsonl").symlink_to(output)
    with exclusive(output):
        holder = subprocess.run([sys.executable, "-c", "from owlvid.records import exclusive\n"
                                 f"with exclusive({str(tmp_path / 'alias.jsonl')!r}): pass"],
                                env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)), capture_output=True,
                                text=True, timeout=60)
        assert holder.returncode != 0 and f"another owlvid run (PID {os.getpid()})" in holder.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alias.jsonl", "out.jsonl"]  # the lock file is gone
