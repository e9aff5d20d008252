"""Dataset loaders on each real layout, and the protocols' frame choice decoded exactly (frames show their index)."""

from __future__ import annotations

from pathlib import Path

import pytest

from owlvid.errors import InputError, MediaError
from owlvid.eval import get_protocol
from owlvid.eval.datasets import load_questions
from owlvid.eval.frames import decode_frames
from tests.eval.layouts import MAKERS, frame_numbers

pytest.importorskip("pyarrow")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-data")
    return {name: make(root / name) for name, make in MAKERS.items()}


def by_id(questions) -> dict:
    return {q.qid: q for q in questions}


def test_mvbench_layout_tasks_bounds_and_frame_folder(data):
    qs = by_id(load_questions("mvbench", data["mvbench"]))
    assert list(qs) == ["action_sequence/0", "action_sequence/1", "action_antonym/0", "action_antonym/1",
                        "episodic_reasoning/0"]  # the official task table's order
    a = qs["action_antonym/0"]
    assert (a.options, a.answer, a.bound, a.video_kind) == (("opening", "closing", "none"), "B", None, "video")
    assert a.video == data["mvbench"] / "video/ssv2_video/clip_a.mp4"
    s = qs["action_sequence/0"]
    assert (s.answer, s.bound, s.categories) == ("C", (1.0, 3.0), {"task": "action_sequence"})
    assert s.video == data["mvbench"] / "video/star/Charades_v1_480/seq.mp4"
    e = qs["episodic_reasoning/0"]
    assert (e.video_kind, e.frame_fps, e.bound, e.answer) == ("frames", 3.0, (2.0, 8.0), "C")
    assert e.video == data["mvbench"] / "video/tvqa/frames_fps3_hq/s01e01_seg01"
    only = load_questions("mvbench", data["mvbench"], tasks=["episodic_reasoning"])
    assert [q.qid for q in only] == ["episodic_reasoning/0"]
    with pytest.raises(InputError, match="unknown mvbench task.*nope.*action_antonym"):
        load_questions("mvbench", data["mvbench"], tasks=["nope"])


def test_nextqa_videomme_longvideobench_mlvu_layouts(data):
    n = by_id(load_questions("nextqa_mc", data["nextqa_mc"]))
    assert list(n) == ["4010069381_4", "4010069381_7", "5325126093_1"]
    q = n["4010069381_7"]
    assert (q.options, q.answer, q.categories) == (("sit", "jump", "cry", "sing", "walk"), "A",
                                                   {"type": "TN", "group": "T"})  # TP counted with TN
    assert q.video == data["nextqa_mc"] / "NExTVideo/4010069381.mp4"

    v = by_id(load_questions("videomme", data["videomme"]))
    q = v["001-1"]
    assert (q.options, q.answer, q.task) == (("1.", "2.", "8.", "9."), "C", "short")
    assert q.categories == {"duration": "short", "domain": "Knowledge", "sub_category": "Astronomy",
                            "task_type": "Counting Problem"}
    assert q.video == data["videomme"] / "data/fFjv93ACGo8.mp4"
    assert [x.qid for x in load_questions("videomme", data["videomme"], tasks=["long"])] == ["601-1"]

    lv = by_id(load_questions("longvideobench", data["longvideobench"]))
    q = lv["86Cx_0"]
    assert (q.answer, q.bound, q.categories) == ("D", None, {"question_category": "TOS", "duration_group": "15"})
    assert q.video == data["longvideobench"] / "videos/86CxyhFV9MI.mp4"

    m = by_id(load_questions("mlvu", data["mlvu"]))
    assert list(m) == ["plotQA/0", "count/0", "count/1"]  # 9_summary is open-ended: not loaded
    assert (m["plotQA/0"].answer, m["count/1"].answer) == ("B", "A")
    assert m["count/0"].video == data["mlvu"] / "video/4_count/count_1.mp4"


@pytest.mark.parametrize("benchmark, fragment", [
    ("mvbench", "expected json/<task>.json"), ("nextqa_mc", "no MC/test-*.parquet"),
    ("videomme", "no videomme/test-*.parquet"), ("longvideobench", "no lvb_val.json"),
    ("mlvu", "expected json/<n>_<task>.json")])
def test_wrong_data_folder_is_one_line_saying_what_was_expected(tmp_path, benchmark, fragment):
    (tmp_path / "something.txt").write_text("x")
    with pytest.raises(InputError, match=f"is not a {benchmark} folder") as e:
        load_questions(benchmark, tmp_path)
    assert fragment in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(InputError, match="is not a folder"):
        load_questions(benchmark, tmp_path / "absent")


# -- frame choice ---------------------------------------------------------------------------------------------


def official(benchmark: str, n: int):
    return get_protocol(benchmark, "official", "owl3", num_frames=n)


def test_official_middle_of_the_whole_video_decoded_exactly(data):
    q = by_id(load_questions("mvbench", data["mvbench"]))["action_antonym/0"]
    d = decode_frames(q, official("mvbench", 8))
    # 40 frames in 8 segments [0,4], [5,9], ...: (a + b) // 2
    assert d.indices == [2, 7, 12, 17, 22, 27, 32, 37]
    assert frame_numbers(d.frames) == d.indices
    assert d.timestamps == pytest.approx([i / 10 for i in d.indices])
    assert d.decoder == "pyav" and d.audit()["total_frames"] == 40
    # more frames asked than the video has: every frame, padded with the last (get_frame_indices)
    assert decode_frames(q, official("mvbench", 44)).indices == list(range(40)) + [39] * 4


def test_official_bound_draws_seeded_random_frames_and_a_zero_start_is_the_whole_video(data):
    qs = by_id(load_questions("mvbench", data["mvbench"]))
    proto = official("mvbench", 4)
    d = decode_frames(qs["action_sequence/0"], proto, seed=5)  # bound [1, 3] s at 10 fps: frames 10..29
    for pick, (a, b) in zip(d.indices, [(10, 14), (15, 19), (20, 24), (25, 29)]):
        assert a <= pick < b  # random.choice(range(a, b)): a segment's last frame is never drawn
    assert frame_numbers(d.frames) == d.indices
    assert d.audit()["seed"] == decode_frames(qs["action_sequence/0"], proto, seed=5).audit()["seed"]
    assert decode_frames(qs["action_sequence/0"], proto, seed=5).indices == d.indices  # reproducible
    draws = {tuple(decode_frames(qs["action_sequence/0"], proto, seed=s).indices) for s in range(8)}
    assert len(draws) > 1
    # start 0: the official `if start_time and end_time` is false: middles of the whole video, no draw
    d0 = decode_frames(qs["action_sequence/1"], official("mvbench", 8))
    assert d0.indices == [2, 7, 12, 17, 22, 27, 32, 37] and "seed" not in d0.audit()


def test_official_frame_folder_get_index(data):
    q = by_id(load_questions("mvbench", data["mvbench"]))["episodic_reasoning/0"]
    # get_index(bound=(2, 8), fps=3, max_frame=30 files, first_idx=1): start 6, end 24, segments of 18/16
    expected = [6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17, 18, 20, 21, 22, 23]
    d = decode_frames(q, official("mvbench", 16))
    assert d.decoder == "frames"
    assert frame_numbers(d.frames) == expected  # file 0000k.jpg shows k
    assert d.audit()["files"] == [f"{k:05d}.jpg" for k in expected]


def test_slowfast_pyav_rule_and_the_lmms_eval_clip(data):
    qs = by_id(load_questions("mvbench", data["mvbench"]))
    sf = get_protocol("mvbench", "slowfast", "slowfast", num_frames=4)
    # read_video_pyav2(target_fps=2) on 10 fps: every 5th frame (8 candidates), candidate round(2(i+1) - 1)
    d = decode_frames(qs["action_antonym/0"], sf)
    assert d.indices == [5, 15, 25, 35] and frame_numbers(d.frames) == d.indices
    assert decode_frames(qs["action_sequence/0"], sf).indices == [5, 15, 25, 35]  # the fork ignores bounds
    # lmms-eval on the main-revision layout: the bound is cut out ([1, 3] s = frames 10..29), middles inside
    lm = get_protocol("mvbench", "lmms_eval", "owl3", num_frames=4)
    d = decode_frames(qs["action_sequence/0"], lm)
    assert d.indices == [12, 17, 22, 27] and frame_numbers(d.frames) == d.indices


def test_missing_video_is_a_media_error_naming_it(data, tmp_path):
    from dataclasses import replace

    q = by_id(load_questions("nextqa_mc", data["nextqa_mc"]))["5325126093_1"]
    gone = replace(q, video=tmp_path / "nope.mp4")
    with pytest.raises(MediaError, match="video not found: .*nope.mp4"):
        decode_frames(gone, official("nextqa_mc", 8))


def _lvb_folder(root: Path, **fields) -> Path:
    from tests.eval.layouts import _json

    good = {"id": "x_ok", "video_path": "x.mp4", "duration": 4.0, "question": "Which?",
            "candidates": ["red", "blue", "green", "white"], "correct_choice": 1}
    _json(root / "lvb_val.json", [good, dict(good, id="x_1", **fields)])  # item 1 carries the fields
    return root


@pytest.mark.parametrize("choice", ["two", "1.5", 4, -1, 2.5, None, True, [1]])
def test_longvideobench_correct_choice_must_index_an_option(tmp_path, choice):
    """A correct_choice that is not an index of the options is one InputError naming the file and item
    (it was a bare ValueError / IndexError, or silently the letter "Z" for -1)."""
    root = _lvb_folder(tmp_path, correct_choice=choice)
    with pytest.raises(InputError, match=r"lvb_val.json item 1: correct_choice must be the index of one of the 4 "
                                         r"candidates \(0 to 3\), got ") as e:
        load_questions("longvideobench", root)
    assert "\n" not in str(e.value)


def test_longvideobench_integer_strings_are_indices(tmp_path):
    qs = load_questions("longvideobench", _lvb_folder(tmp_path, correct_choice="3"))
    assert [q.answer for q in qs] == ["B", "D"]


@pytest.mark.parametrize("candidates, fragment", [
    ([f"option {i}" for i in range(27)], "27 candidates; at most 26 can be lettered A to Z"),
    ([], "candidates must be a non-empty list"),
    ("red, blue", "candidates must be a non-empty list"),
])
def test_options_must_be_a_list_of_at_most_26(tmp_path, candidates, fragment):
    root = _lvb_folder(tmp_path, candidates=candidates, correct_choice=0)
    with pytest.raises(InputError, match=f"lvb_val.json item 1: {fragment}"):
        load_questions("longvideobench", root)


def test_mlvu_and_mvbench_refuse_more_than_26_options(tmp_path):
    from tests.eval.layouts import _json

    many = [f"o{i}" for i in range(30)]
    _json(tmp_path / "mlvu" / "json" / "1_plotQA.json",
          [{"video": "v.mp4", "question": "?", "candidates": many, "answer": "o29"}])
    with pytest.raises(InputError, match="1_plotQA.json item 0: 30 candidates; at most 26"):
        load_questions("mlvu", tmp_path / "mlvu")
    _json(tmp_path / "mvbench" / "json" / "action_antonym.json",
          [{"video": "v.mp4", "question": "?", "candidates": many, "answer": "o29"}])
    with pytest.raises(InputError, match="action_antonym.json item 0: 30 candidates; at most 26"):
        load_questions("mvbench", tmp_path / "mvbench")
