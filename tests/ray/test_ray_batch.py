"""Batch jobs on Ray Data, on a real local Ray cluster: the same output as the single-process job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="Ray is not installed: pip install 'owlvid[ray]'")
pytest.importorskip("fastapi")

import owlvid.ray  # noqa: E402
from owlvid import batch  # noqa: E402
from tests.batch.test_batch import read_output, request_line, run_cli, write_jsonl  # noqa: E402
from tests.media.synth import write_video  # noqa: E402

VIDEOS = 3


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_owl3_dirs, tiny_owl3_models) -> dict:
    """An input of questions over shared videos (interleaved: the job groups them), a corrupt video, a
    text-only request; and its output from the single-process job (the reference)."""
    folder = tmp_path_factory.mktemp("ray-job")
    videos = [folder / f"clip{i}.mp4" for i in range(VIDEOS)]
    for i, video in enumerate(videos):
        write_video(video, 16 + 8 * i)
    corrupt = folder / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    requests = [request_line(f"q{i}", [{"type": "video_url", "video_url": {"url": str(videos[i % VIDEOS])}},
                                       {"type": "text", "text": f"Question {i}?"}]) for i in range(12)]
    requests.insert(5, request_line("corrupt", [{"type": "video_url", "video_url": {"url": corrupt.as_uri()}},
                                                {"type": "text", "text": "What happens?"}]))
    requests.insert(9, request_line("text", "Say something."))
    source = write_jsonl(folder / "in.jsonl", requests)
    reference = folder / "reference.jsonl"
    summary = batch.run(source, reference, tiny_owl3_models["241101"], max_batch=4, progress=False)
    assert (summary["completed"], summary["failed"]) == (13, 1)
    return {"source": source, "reference": reference, "requests": requests, "model_dir": tiny_owl3_dirs["241101"],
            "folder": folder}


def assert_same_answers(output: Path, reference: Path) -> None:
    """Every request exactly once, with the single-process job's answer (greedy) or error."""
    lines, expected = read_output(output), read_output(reference)
    assert set(lines) == set(expected)
    for custom_id, line in lines.items():
        got, want = line["response"], expected[custom_id]["response"]
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert got["status_code"] == want["status_code"], (custom_id, got)
        if want["status_code"] == 200:
            assert got["body"]["choices"] == want["body"]["choices"], custom_id
            assert got["body"]["usage"] == want["body"]["usage"], custom_id
        else:
            assert got["body"] == want["body"], custom_id


def test_ray_job_answers_like_the_single_process_job(ray_address, job, tmp_path):
    output = tmp_path / "out.jsonl"
    summary = owlvid.ray.run(job["source"], output, job["model_dir"], device="cpu", dtype="float32", max_batch=4,
                             num_replicas=2, progress=False)
    assert summary == {"requests": 14, "skipped": 0, "completed": 13, "failed": 1, "output": str(output)}
    assert output.read_text().endswith("\n") and len(output.read_text().splitlines()) == 14
    assert_same_answers(output, job["reference"])
    corrupt = read_output(output)["corrupt"]["response"]
    assert corrupt["status_code"] == 400 and corrupt["body"]["error"]["code"] == "invalid_media"


def test_cli_resumes_a_partial_output_on_ray(ray_address, job, tmp_path):
    """`owlvid batch --ray` joining the cluster: lines already answered are kept byte for byte, a torn last
    line is cut, the rest is answered once."""
    answered = job["reference"].read_text().splitlines()
    output = tmp_path / "out.jsonl"
    torn = answered[5][: len(answered[5]) // 2]
    output.write_text("".join(line + "\n" for line in answered[:5]) + torn)
    args = ["batch", "-i", str(job["source"]), "-o", str(output), "--model", str(job["model_dir"]), "--device",
            "cpu", "--dtype", "float32", "--max-batch", "4", "--no-progress", "--ray", "--ray-address", ray_address,
            "--num-replicas", "2"]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert "14 request(s): 8 answered, 1 failed, 5 already in" in proc.stderr, proc.stderr
    text = output.read_text()
    assert text.startswith("".join(line + "\n" for line in answered[:5])) and torn not in text
    assert_same_answers(output, job["reference"])
    rerun = run_cli(*args)  # nothing left: nothing written, Ray not even started
    assert rerun.returncode == 0 and "0 answered, 0 failed, 14 already in" in rerun.stderr, rerun.stderr
    assert output.read_text() == text


def test_building_blocks_keep_a_video_on_one_replica(ray_address, job):
    """The documented pipeline pieces: one Ray batch per group of same-video requests, two replicas."""
    requests = batch.read_requests(job["source"])
    raw = job["source"].read_text().splitlines()
    groups = [[raw[r.line - 1] for r in group] for group in batch.job_groups(requests)]
    assert sorted(len(g) for g in groups) == [1, 1, 4, 4, 4]
    dataset = owlvid.ray.requests_dataset(groups, requests_per_batch=4)
    answers = owlvid.ray.answers_dataset(dataset, job["model_dir"], num_replicas=2, device="cpu", dtype="float32",
                                         max_batch=4)
    rows = {row["custom_id"]: row for row in answers.iter_rows()}
    assert len(rows) == 14
    expected = read_output(job["reference"])
    for custom_id, row in rows.items():
        assert row["status_code"] == expected[custom_id]["response"]["status_code"]
    for group in batch.job_groups(requests):
        assert len({rows[r.custom_id]["replica"] for r in group}) == 1, "a video's questions split over replicas"
    assert len({row["replica"] for row in rows.values()}) == 2


def test_without_ray_one_line_says_what_to_install(job, tmp_path):
    output = tmp_path / "out.jsonl"
    argv = ["batch", "-i", str(job["source"]), "-o", str(output), "--model", str(job["model_dir"]), "--ray"]
    code = f"import sys; sys.modules['ray'] = None; from owlvid.cli import main; sys.exit(main({argv!r}))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 1 and proc.stderr.strip() == "owlvid: error: Ray jobs need Ray: pip install 'owlvid[ray]'"
    assert not output.exists()


def test_a_batch_replica_loads_with_the_device_map(tiny_owl3_dirs):
    """`owlvid batch --ray --device-map ...`: the map reaches each replica's `owlvid.load`."""
    predictor = owlvid.ray.BatchPredictor(str(tiny_owl3_dirs["241101"]), dtype="float32",
                                          device_map={"": "cpu", "llm.layers.1": "cpu:1"})
    assert "layers 1-1: cpu:1" in " ".join(predictor.model.describe()["device_map"])
