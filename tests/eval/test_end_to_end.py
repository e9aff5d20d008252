"""`owlvid eval` end to end on tiny datasets in their real layouts, with tiny checkpoints of both families.

The tiny random models answer random tokens: each answer is checked against `model.generate` on the same
protocol messages and the same frames decoded independently, and the frame audit against hand-computed indices.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import owlvid
from owlvid.errors import InputError
from owlvid.eval import get_protocol, load_questions, run
from owlvid.media import load_video
from owlvid.testing.slowfast import make_tiny_slowfast
from tests.eval.layouts import MAKERS

pytest.importorskip("pyarrow")

# 16 official segment middles of a 40-frame video: linspace(0, 40, 17).astype(int) -> (a + b - 1) // 2
MIDDLES_16_OF_40 = [0, 3, 5, 8, 10, 13, 15, 18, 20, 23, 25, 28, 30, 33, 35, 38]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-e2e")
    return {name: make(root / name) for name, make in MAKERS.items()}


@pytest.fixture(scope="module")
def owl3_dir(tiny_owl3_dirs) -> Path:
    return tiny_owl3_dirs["241101"]


@pytest.fixture(scope="module")
def owl3(owl3_dir):
    return owlvid.load(owl3_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def slowfast(tmp_path_factory):
    # trained with 6 frames: its authors' evaluation uses that many (their TEST_FRAMES = 64 / 96 for the real ones)
    return owlvid.load(make_tiny_slowfast(tmp_path_factory.mktemp("sf") / "tiny-sf", training_frames=6),
                       device="cpu", dtype="float32")


def lines(outdir: Path) -> list[dict]:
    return [json.loads(raw) for raw in (outdir / "predictions.jsonl").read_text().splitlines()]


def by_qid(outdir: Path) -> dict[str, dict]:
    records = lines(outdir)
    ids = [r["qid"] for r in records if r["error"] is None]
    assert len(ids) == len(set(ids)), f"a question answered twice: {ids}"
    return {r["qid"]: r for r in records}


def test_mvbench_official_owl3_answers_as_generate_with_the_official_frames(owl3, data, tmp_path):
    out = tmp_path / "mv"
    results = run("mvbench", data["mvbench"], owl3, out, progress=False)
    records = by_qid(out)
    assert sorted(records) == sorted(q.qid for q in load_questions("mvbench", data["mvbench"]))
    proto = get_protocol("mvbench", "official", "owl3")
    r = records["action_antonym/0"]
    assert r["frames"]["indices"] == MIDDLES_16_OF_40 and r["frames"]["decoder"] == "pyav"
    assert r["frames"]["timestamps"] == pytest.approx([i / 10 for i in MIDDLES_16_OF_40])
    assert r["prompt"][0]["content"].startswith("<|image|>" * 16 + "\n")  # frames as images, as the official run
    assert (r["category_task"], r["answer"], r["options"]) == ("action_antonym", "B", ["opening", "closing", "none"])
    q = load_questions("mvbench", data["mvbench"], tasks=["action_antonym"])[0]
    frames = load_video(q.video, indices=MIDDLES_16_OF_40).frames
    expected = owl3.generate(proto.with_frames(proto.messages(q.question, list(q.options), **q.fields), frames),
                             cut_enable=False, **proto.generation)
    assert r["response"] == expected.text
    # the official check_answer, written out for this question (answer "B. closing"): correct when the first
    # word without dots is a substring of "b.", or "closing" follows it; else a first word A/C is the prediction
    words = expected.text.lower().split(" ")
    first, rest = words[0].replace(".", "").strip(), " ".join(words[1:])
    correct = first in "b." or "closing" in rest
    predicted = ("B" if first else None) if correct else (first.upper() if first.upper() in ("A", "C") else None)
    assert (r["predicted"], r["correct"]) == (predicted, correct)
    assert records["episodic_reasoning/0"]["frames"]["files"] == [
        f"{k:05d}.jpg" for k in (6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17, 18, 20, 21, 22, 23)]
    assert records["action_sequence/0"]["frames"]["seed"] > 0
    # results.json agrees with the lines
    saved = json.loads((out / "results.json").read_text())
    assert saved == results
    correct = sum(r["correct"] for r in records.values())
    assert (results["scored"], results["failed"], results["correct"]) == (5, 0, correct)
    assert results["categories"]["task"]["action_antonym"]["total"] == 2
    assert results["model"]["fingerprint"] and results["owlvid_version"] == owlvid.__version__
    assert results["settings"]["frames_as"] == "images" and results["protocol"] == "official"
    assert results["unparsed"] == sum(not r["parsed"] for r in records.values())
    # the engine's counts of this run: five questions, the tokens of their answers
    assert results["engine"]["requests_completed"] == 5 and results["engine"]["requests_failed"] == {}
    assert results["engine"]["generation_tokens"] == sum(r["completion_tokens"] for r in records.values())


def test_resume_after_limit_and_a_torn_line_gives_the_uninterrupted_run(owl3, data, tmp_path):
    whole = run("nextqa_mc", data["nextqa_mc"], owl3, tmp_path / "whole", progress=False)
    part = tmp_path / "part"
    run("nextqa_mc", data["nextqa_mc"], owl3, part, limit=2, progress=False)
    assert len(lines(part)) == 2
    with open(part / "predictions.jsonl", "ab") as f:
        f.write(b'{"qid": "5325126093_1", "respo')  # killed while writing
    resumed = run("nextqa_mc", data["nextqa_mc"], owl3, part, progress=False)
    assert len(lines(part)) == 3
    a, b = by_qid(tmp_path / "whole"), by_qid(part)
    assert {k: v["response"] for k, v in a.items()} == {k: v["response"] for k, v in b.items()}
    for key in ("accuracy", "score", "correct", "categories", "unparsed", "scored"):
        assert resumed[key] == whole[key]
    assert set(whole["categories"]["group"]) == {"C", "T", "D"}
    # nothing left: the same command is a no-op
    run("nextqa_mc", data["nextqa_mc"], owl3, part, progress=False)
    assert len(lines(part)) == 3


def test_missing_video_is_a_recorded_failure_and_a_rerun_answers_it(owl3, data, tmp_path):
    root = tmp_path / "vm"
    shutil.copytree(data["videomme"], root)
    hidden = root / "data" / "zZzz0000aaa.mp4"
    hidden.rename(root / "elsewhere.mp4")
    out = tmp_path / "out"
    results = run("videomme", root, owl3, out, progress=False)
    r = by_qid(out)["601-1"]
    assert r["error"].startswith("MediaError: video not found:") and "zZzz0000aaa.mp4" in r["error"]
    assert (results["failed"], results["scored"]) == (1, 2)
    assert results["failures"][0]["qid"] == "601-1"
    assert len(by_qid(out)["001-1"]["frames"]["indices"]) == 128  # the official 128 frames (padded)
    (root / "elsewhere.mp4").rename(hidden)
    results = run("videomme", root, owl3, out, progress=False)
    assert (results["failed"], results["scored"]) == (0, 3)
    assert by_qid(out)["601-1"]["error"] is None


def test_slowfast_defaults_to_the_authors_settings_and_their_pyav_frames(slowfast, data, tmp_path):
    out = tmp_path / "lvb"
    results = run("longvideobench", data["longvideobench"], slowfast, out, progress=False)
    proto = get_protocol("longvideobench", None, "slowfast", num_frames=6)
    assert results["protocol"] == "slowfast" and results["settings"]["frames_as"] == "video"
    assert results["settings"]["num_frames"] == 6
    records = by_qid(out)
    # the fork's read_video_pyav2: every 5th frame at 10 fps (8 candidates), candidate round((i + 1) * 8/6 - 1)
    expected_indices = [0, 10, 15, 20, 30, 35]
    r = records["86Cx_0"]
    assert r["frames"]["indices"] == expected_indices
    q = load_questions("longvideobench", data["longvideobench"])[0]
    frames = load_video(q.video, indices=expected_indices).frames
    expected = slowfast.generate(proto.with_frames(proto.messages(q.question, list(q.options), **q.fields), frames),
                                 **proto.generation)
    assert r["response"] == expected.text
    assert set(results["categories"]["question_category"]) == {"TOS", "S2E"}
    # --num-frames: more than the video has candidates at 2 fps: the fork's reader returns all 8
    results = run("longvideobench", data["longvideobench"], slowfast, tmp_path / "lvb64", num_frames=64,
                  progress=False)
    assert results["settings"]["num_frames"] == 64
    assert by_qid(tmp_path / "lvb64")["86Cx_1"]["frames"]["indices"] == [0, 5, 10, 15, 20, 25, 30, 35]


def test_a_folder_holds_one_run_and_official_mlvu_is_refused(owl3, data, tmp_path):
    run("mlvu", data["mlvu"], owl3, tmp_path / "m", limit=1, progress=False)
    with pytest.raises(InputError, match="holds another run"):
        run("mlvu", data["mlvu"], owl3, tmp_path / "m", protocol="slowfast", progress=False)
    with pytest.raises(InputError, match="official mPLUG-Owl3 evaluation defines no MLVU"):
        run("mlvu", data["mlvu"], owl3, tmp_path / "m2", protocol="official", progress=False)
    assert not (tmp_path / "m2").exists()  # created to hold the lock, removed with it: a refused run leaves none


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONIOENCODING="utf-8", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "owlvid", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_cli_wrong_data_folder_is_one_line(tmp_path, owl3_dir):
    p = run_cli("eval", "nextqa_mc", "--data", str(tmp_path), "--model", str(owl3_dir), "-o", str(tmp_path / "o"))
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        f"owlvid: error: --data {tmp_path} is not a nextqa_mc folder (no MC/test-*.parquet): expected "
        "MC/test-*.parquet and NExTVideo/<video>.mp4 as in HF lmms-lab/NExTQA (config MC)"]
    assert not (tmp_path / "o").exists()


def test_cli_run_and_compare_with_the_published_numbers(tmp_path, owl3_dir, data):
    named = tmp_path / "mPLUG-Owl3-7B-241101"  # a folder named as the model card's checkpoint
    shutil.copytree(owl3_dir, named)
    outs = []
    for benchmark, extra in (("mlvu", ["--limit", "2"]), ("mvbench", ["--tasks", "action_antonym"])):
        out = tmp_path / benchmark
        p = run_cli("eval", benchmark, "--data", str(data[benchmark]), "--model", str(named), "--device", "cpu",
                    "--dtype", "float32", "-o", str(out), "--no-progress", *extra)
        assert p.returncode == 0, p.stderr
        results = json.loads((out / "results.json").read_text())
        assert f"score {results['score']:.2f}" in p.stdout and "protocol" in p.stdout
        outs.append(out)
    p = run_cli("eval", "compare", *map(str, outs))
    assert p.returncode == 0, p.stderr
    table = p.stdout.splitlines()
    assert "published mPLUG-Owl3-7B-241101" in table[0]
    mlvu_row = next(line for line in table if line.startswith("MLVU dev"))
    assert mlvu_row.rstrip().endswith("70.0") and "of 2/2" in mlvu_row
    mvbench_row = next(line for line in table if line.startswith("MVBench"))
    assert mvbench_row.rstrip().endswith("59.5") and "of 2/2" in mvbench_row
    p = run_cli("eval", "compare", str(tmp_path))
    assert p.returncode == 2 and "has no results.json" in p.stderr
