"""An evaluation folder is resumed safely: a predictions file that is not ours is refused untouched, and two
real `owlvid eval` processes on one folder never both answer (issue 20, items 2 and 3)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import owlvid
from owlvid.errors import InputError
from owlvid.eval import run
from tests.eval.layouts import _json, _video
from tests.second_run import assert_second_run_refused

pytest.importorskip("pyarrow")

N_QUESTIONS = 12


@pytest.fixture(scope="module")
def owl3_dir(tiny_owl3_dirs) -> Path:
    return tiny_owl3_dirs["241101"]


@pytest.fixture(scope="module")
def owl3(owl3_dir):
    return owlvid.load(owl3_dir, device="cpu", dtype="float32")


def make_lvb(root: Path) -> Path:
    """A LongVideoBench folder: N_QUESTIONS questions on one short video."""
    rows = [{"id": f"q{i}", "video_path": "v.mp4", "duration": 4.0,
             "question": f"Question {i}?", "candidates": ["red", "blue", "green", "white"], "correct_choice": i % 4,
             "question_category": "TOS", "duration_group": 15} for i in range(N_QUESTIONS)]
    _json(root / "lvb_val.json", rows)
    _video(root / "videos" / "v.mp4")
    return root


@pytest.fixture(scope="module")
def lvb(tmp_path_factory) -> Path:
    return make_lvb(tmp_path_factory.mktemp("lvb"))


@pytest.mark.parametrize("content", [b'{"model":"x","temperature":0.5}', b'{"model": "x"}\n', b"text"],
                         ids=["minified-config", "json-line", "text"])
def test_a_predictions_file_that_is_not_ours_is_refused_untouched(owl3, lvb, tmp_path, content):
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.jsonl").write_bytes(content)
    with pytest.raises(InputError, match="predictions.jsonl is not a predictions file"):
        run("longvideobench", lvb, owl3, out, limit=1, num_frames=2, progress=False)
    assert (out / "predictions.jsonl").read_bytes() == content


def test_a_second_run_on_the_same_folder_exits_at_once_naming_the_first(owl3, owl3_dir, tmp_path):
    """Two real `owlvid eval` processes: while the first is mid-run (stopped with SIGSTOP once it has written
    a line, so it stays there), the second refuses at once with the first's PID and writes nothing; after
    the first is killed with SIGKILL, the next run takes the lock and answers each question once."""
    lvb = make_lvb(tmp_path / "lvb")
    out = tmp_path / "out"
    args = ["eval", "longvideobench", "--data", str(lvb), "--model", str(owl3_dir), "--device", "cpu", "--dtype",
            "float32", "-o", str(out), "--num-frames", "4", "--max-batch", "1", "--no-progress"]
    env = dict(os.environ, PYTHONIOENCODING="utf-8", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    predictions = out / "predictions.jsonl"
    assert_second_run_refused(args, env, predictions, 1, out, pause=True)
    assert 1 <= predictions.read_bytes().count(b"\n") < N_QUESTIONS, "the first run was not stopped mid-way"
    results = run("longvideobench", lvb, owl3, out, num_frames=4, max_batch=4, progress=False)  # not blocked
    assert results["scored"] == N_QUESTIONS
    qids = [json.loads(line)["qid"] for line in predictions.read_text().splitlines()]
    assert sorted(qids) == sorted(f"q{i}" for i in range(N_QUESTIONS))  # each answered once
    assert sorted(p.name for p in out.iterdir()) == ["predictions.jsonl", "results.json", "run.json"]
