"""`owlvid eval ... --ray` on a real local Ray cluster: the questions spread over model replicas give the
predictions and results of the single-process run; resuming, the output lock and the one-line errors hold."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="Ray is not installed: pip install 'owlvid[ray]'")
pytest.importorskip("pyarrow")

import owlvid.ray  # noqa: E402
import owlvid.ray_eval  # noqa: E402
from owlvid import records  # noqa: E402
from owlvid.errors import InputError, OwlvidError  # noqa: E402
from owlvid.eval import run, run_images  # noqa: E402
from owlvid.eval.answering import ModelFacts  # noqa: E402
from owlvid.testing.slowfast import make_tiny_slowfast  # noqa: E402
from tests.batch.test_batch import run_cli  # noqa: E402
from tests.eval.image_layouts import make_pope_parquet  # noqa: E402
from tests.eval.layouts import _json, make_longvideobench, make_mvbench  # noqa: E402

QUESTIONS = 6
# what differs between runs by design: how the answering went (engine timings, which replica answered)
RUN_ONLY = ("engine", "replicas")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """MVBench in its layout: two questions on one video, two bounded ones (the official random frame draw, seeded
    per question), a frame folder, and a question whose video is missing (a recorded failure)."""
    root = make_mvbench(tmp_path_factory.mktemp("mvbench"))
    path = root / "json" / "action_antonym.json"
    rows = json.loads(path.read_text())
    rows.append({"video": "missing.mp4", "question": "Where?", "candidates": ["here", "there"], "answer": "here"})
    _json(path, rows)
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dataset, tiny_owl3_dirs, tiny_owl3_models) -> Path:
    """The single-process run, in this process."""
    out = tmp_path_factory.mktemp("reference") / "run"
    results = run("mvbench", dataset, tiny_owl3_models["241101"], out, max_batch=2, progress=False)
    assert (results["scored"], results["failed"]) == (QUESTIONS - 1, 1)
    return out


def prediction_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def assert_same_run(out: Path, reference: Path) -> dict:
    """The same prediction lines (as a set: completion order differs) and the same results.json but for how the
    answering went; each question answered once."""
    got, want = prediction_lines(out), prediction_lines(reference)
    assert sorted(json.dumps(line, sort_keys=True) for line in got) == \
        sorted(json.dumps(line, sort_keys=True) for line in want)
    assert len({line["qid"] for line in got}) == QUESTIONS == len(got)
    results, expected = (json.loads((folder / "results.json").read_text()) for folder in (out, reference))
    assert {k: v for k, v in results.items() if k not in RUN_ONLY} == \
        {k: v for k, v in expected.items() if k not in RUN_ONLY}
    assert json.loads((out / "run.json").read_text()) == json.loads((reference / "run.json").read_text())
    return results


@pytest.mark.slow
def test_two_replicas_give_the_single_process_predictions_and_results(ray_address, dataset, reference,
                                                                       tiny_owl3_dirs, tmp_path):
    out = tmp_path / "run"
    results = owlvid.ray_eval.run("mvbench", dataset, tiny_owl3_dirs["241101"], out, num_replicas=2, device="cpu",
                                  dtype="float32", max_batch=2, progress=False)
    assert results == json.loads((out / "results.json").read_text())
    assert_same_run(out, reference)
    replicas = results["replicas"]
    assert (replicas["count"], replicas["gpus_per_replica"]) == (2, 0)
    assert len(replicas["answered"]) == 2, "one replica answered every question"
    assert sum(replicas["answered"].values()) == QUESTIONS
    engines = results["engine"]["per_replica"]
    assert sum(e["requests_completed"] + sum(e["requests_failed"].values()) for e in engines.values()) == QUESTIONS


@pytest.mark.slow
def test_an_image_table_on_two_replicas_gives_the_single_process_results(ray_address, tiny_owl3_dirs,
                                                                          tiny_owl3_models, tmp_path):
    """POPE (images embedded in the parquet: they travel to the replicas with the questions)."""
    data = make_pope_parquet(tmp_path / "pope")
    expected = run_images("pope", data, tiny_owl3_models["241101"], tmp_path / "reference", max_batch=1,
                          progress=False)
    results = owlvid.ray_eval.run("pope", data, tiny_owl3_dirs["241101"], tmp_path / "ray", num_replicas=2,
                                  device="cpu", dtype="float32", max_batch=1, progress=False)
    got, want = (sorted(json.dumps(line, sort_keys=True) for line in prediction_lines(tmp_path / folder))
                 for folder in ("ray", "reference"))
    assert got == want and len(got) == 3
    assert {k: v for k, v in results.items() if k not in RUN_ONLY} == \
        {k: v for k, v in expected.items() if k not in RUN_ONLY}
    assert results["scored"] == 3 and len(results["replicas"]["answered"]) == 2


@pytest.mark.slow
def test_slowfast_replicas_evaluate_with_its_training_frame_count(ray_address, tmp_path):
    """The driver reads the frame count a Slow-Fast checkpoint was trained with from its config (no weights), as
    the single process reads it from the loaded model: the same protocol settings and lines. The replicas here
    split their model in two CPU stages (`device_map`, as a replica of several GPUs does): the same lines."""
    import owlvid

    model_dir = make_tiny_slowfast(tmp_path / "sf", training_frames=6)
    data = make_longvideobench(tmp_path / "lvb")
    expected = run("longvideobench", data, owlvid.load(model_dir, device="cpu", dtype="float32"),
                   tmp_path / "reference", max_batch=1, progress=False)
    results = owlvid.ray_eval.run("longvideobench", data, model_dir, tmp_path / "ray", num_replicas=2, device="cpu",
                                  dtype="float32", max_batch=1, progress=False,
                                  device_map={"": "cpu", "llm.layers.1": "cpu:1", "lm_head": "cpu:1"})
    assert results["settings"]["num_frames"] == 6 and results["protocol"] == "slowfast"
    assert {k: v for k, v in results.items() if k not in RUN_ONLY} == \
        {k: v for k, v in expected.items() if k not in RUN_ONLY}
    assert sorted(map(json.dumps, prediction_lines(tmp_path / "ray"))) == \
        sorted(map(json.dumps, prediction_lines(tmp_path / "reference")))


def test_a_replica_refuses_a_model_other_than_the_runs(tiny_owl3_dirs):
    """Every line must be of the model run.json records: a replica that loads something else stops the job."""
    model_dir = tiny_owl3_dirs["241101"]
    expected = ModelFacts(str(model_dir), model_dir, "mplug-owl3", "float32", "cpu")
    predictor = owlvid.ray_eval.QuestionPredictor(str(model_dir), None, expected, device="cpu", dtype="float32")
    assert predictor.model.runtime.architecture == "mplug-owl3"
    for other in (ModelFacts(str(model_dir), model_dir, "mplug-owl3", "bfloat16", "cpu"),
                  ModelFacts(str(model_dir), model_dir, "slowfast", "float32", "cpu", 64)):
        with pytest.raises(OwlvidError, match="a Ray replica loaded .* the run expects"):
            owlvid.ray_eval.QuestionPredictor(str(model_dir), None, other, device="cpu", dtype="float32")


@pytest.mark.slow
def test_cli_resumes_a_partial_run_answering_only_the_missing_questions(ray_address, dataset, reference,
                                                                        tiny_owl3_dirs, tmp_path):
    """`owlvid eval --ray` joining the cluster: the answered lines are kept byte for byte, a torn last line is cut,
    only the other questions are answered (each once); a second run has nothing to do and writes nothing."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(reference / "run.json", out / "run.json")
    answered = [line for line in (reference / "predictions.jsonl").read_text().splitlines()
                if json.loads(line)["error"] is None][:2]
    kept = "".join(line + "\n" for line in answered)
    (out / "predictions.jsonl").write_text(kept + answered[0][:40])  # killed while writing
    args = ["eval", "mvbench", "--data", str(dataset), "-o", str(out), "--model", str(tiny_owl3_dirs["241101"]),
            "--device", "cpu", "--dtype", "float32", "--max-batch", "2", "--no-progress", "--ray", "--ray-address",
            ray_address, "--num-replicas", "2"]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    text = (out / "predictions.jsonl").read_text()
    assert text.startswith(kept) and len(text.splitlines()) == QUESTIONS
    results = assert_same_run(out, reference)
    assert sum(results["replicas"]["answered"].values()) == QUESTIONS - 2  # only the missing ones
    assert "mvbench" in proc.stdout and f"{results['accuracy']}" in proc.stdout  # the results table
    # the failed question is tried again on a rerun (as the single-process run does); nothing else
    rerun = run_cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    lines = prediction_lines(out)
    assert len(lines) == QUESTIONS + 1 and lines[-1]["qid"] == "action_antonym/2" and lines[-1]["error"]


def test_the_output_lock_refuses_a_ray_run_before_ray_starts(dataset, tiny_owl3_dirs, tmp_path):
    """A folder another run holds: `owlvid eval --ray` exits at once with one line naming it, touching nothing."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "predictions.jsonl").write_text("")
    args = ["eval", "mvbench", "--data", str(dataset), "-o", str(out), "--model", str(tiny_owl3_dirs["241101"]),
            "--device", "cpu", "--ray", "--ray-address", "127.0.0.1:1", "--num-replicas", "2"]
    with records.exclusive(out / "predictions.jsonl"):
        t0 = time.monotonic()
        proc = run_cli(*args)
        elapsed = time.monotonic() - t0
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert f"is being written by another owlvid run (PID {os.getpid()})" in proc.stderr
    assert elapsed < 60 and sorted(p.name for p in out.iterdir()) == ["predictions.jsonl"]


def test_without_ray_one_line_says_what_to_install(dataset, tiny_owl3_dirs, tmp_path):
    out = tmp_path / "run"
    argv = ["eval", "mvbench", "--data", str(dataset), "-o", str(out), "--model", str(tiny_owl3_dirs["241101"]),
            "--ray"]
    code = f"import sys; sys.modules['ray'] = None; from owlvid.cli import main; sys.exit(main({argv!r}))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 1 and proc.stderr.strip() == "owlvid: error: Ray jobs need Ray: pip install 'owlvid[ray]'"
    assert not out.exists()  # the folder it created is removed again


@pytest.mark.parametrize("flags, message", [
    (["--ray", "--num-replicas", "0"], "argument --num-replicas: '0' must be at least 1"),
    (["--ray", "--gpus-per-replica", "-1"], "argument --gpus-per-replica: '-1' must not be negative"),
    (["--num-replicas", "2"], "--num-replicas, --gpus-per-replica and --cpus-per-replica need --ray"),
], ids=["zero-replicas", "negative-gpus", "replicas-without-ray"])
def test_bad_replica_flags_are_one_line_usage_errors(dataset, tmp_path, flags, message):
    out = tmp_path / "run"
    proc = run_cli("eval", "mvbench", "--data", str(dataset), "-o", str(out), "--model", "no/such-model", *flags)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not out.exists()


def test_more_replicas_than_the_cluster_holds_is_refused_in_one_line(ray_address, dataset, tiny_owl3_dirs, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(InputError, match=r"^8 replica\(s\) x 1 CPU need 8 CPUs; the Ray cluster has 4$"):
        owlvid.ray_eval.run("mvbench", dataset, tiny_owl3_dirs["241101"], out, num_replicas=8, progress=False)
    with pytest.raises(InputError, match=r"^1 replica\(s\) x 1 GPU need 1 GPUs; the Ray cluster has 0$"):
        owlvid.ray_eval.run("mvbench", dataset, tiny_owl3_dirs["241101"], out, gpus_per_replica=1, progress=False)
    with pytest.raises(InputError, match=r"^--device cuda needs --gpus-per-replica"):
        owlvid.ray_eval.run("mvbench", dataset, tiny_owl3_dirs["241101"], out, device="cuda", gpus_per_replica=0,
                            progress=False)
    with pytest.raises(InputError, match="num-replicas must be at least 1"):
        owlvid.ray_eval.run("mvbench", dataset, tiny_owl3_dirs["241101"], out, num_replicas=0, progress=False)
    assert not out.exists()


def test_automatic_replicas_one_per_gpu_or_one_on_cpus(ray_address, monkeypatch):
    """No counts given: a replica per GPU of the cluster (per G GPUs with --gpus-per-replica G); on a cluster
    without GPUs, one replica on CPUs."""
    import ray

    with owlvid.ray.cluster(None, None, None, 1) as placement:
        assert placement == owlvid.ray.Placement(1, 0.0, 1)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 4.0})
    for gpus, expected in ((None, (4, 1.0)), (2, (2, 2)), (0.5, (8, 0.5)), (0, (1, 0))):
        with owlvid.ray.cluster(None, None, gpus, 1) as placement:
            assert (placement.replicas, placement.gpus) == expected
    with owlvid.ray.cluster(None, 3, None, 1) as placement:
        assert (placement.replicas, placement.gpus) == (3, 1.0)


def test_a_replica_of_several_gpus_splits_its_model():
    """--gpus-per-replica 2: each replica loads with device_map="balanced" over the GPUs Ray gives it; a map given
    by the user goes through as it is; one GPU or none: one device, no map."""
    from owlvid.ray_eval import _replica_options

    base = {"device": "auto", "dtype": "float32", "device_map": None, "max_memory": None}
    two = _replica_options(base, 2)
    assert (two["device"], two["device_map"], two["dtype"]) == ("cuda", "balanced", "float32")
    given = {**base, "device_map": "auto", "max_memory": {"cuda:0": "10GiB"}}
    assert _replica_options(given, 2)["device_map"] == "auto"
    one = _replica_options(base, 1)
    assert (one["device"], one["device_map"]) == ("cuda", None)
    on_cpus = _replica_options({**base, "device_map": "auto"}, 0)
    assert (on_cpus["device"], on_cpus["device_map"]) == ("cpu", "auto")


def test_a_replica_loads_with_the_device_map(tiny_owl3_dirs):
    """The map reaches `owlvid.load` in the replica (the run still records the replica's device and dtype)."""
    model_dir = tiny_owl3_dirs["241101"]
    facts = ModelFacts(str(model_dir), model_dir, "mplug-owl3", "float32", "cpu")
    predictor = owlvid.ray_eval.QuestionPredictor(str(model_dir), None, facts, device="cpu", dtype="float32",
                                                  device_map={"": "cpu", "llm.layers.1": "cpu:1"})
    assert "layers 1-1: cpu:1" in " ".join(predictor.model.describe()["device_map"])
