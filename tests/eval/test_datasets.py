"""Dataset loaders on each real layout, and the protocols' frame choice decoded exactly (frames show their index)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from owlvid.errors import InputError, MediaError
from owlvid.eval.datasets import load_questions
from owlvid.eval.frames import decode_frames, official_bounded_indices, official_frame_folder_indices
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
    assert q.fields["lettered_options"] == ["A. 1.", "B. 2.", "C. 8.", "D. 9."]
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


def test_official_middle_of_the_whole_video_decoded_exactly(data):
    q = by_id(load_questions("mvbench", data["mvbench"]))["action_antonym/0"]
    d = decode_frames(q, "middle", 8)
    # 40 frames in 8 segments [0,4], [5,9], ...: (a + b) // 2
    assert d.indices == [2, 7, 12, 17, 22, 27, 32, 37]
    assert frame_numbers(d.frames) == d.indices
    assert d.timestamps == pytest.approx([i / 10 for i in d.indices])
    assert d.decoder == "pyav"
    # more frames asked than the video has: every frame, padded with the last (get_frame_indices)
    d = decode_frames(q, "middle", 44)
    assert d.indices == list(range(40)) + [39] * 4


def test_official_bounded_draw_is_a_seeded_random_frame_per_segment():
    # the official get_frame_indices_start_end: segments of [int(fps*start), min(int(fps*end), vlen))
    picks = official_bounded_indices(4, 40, 10.0, 1.0, 3.0, random.Random(1), np.random.RandomState(1))
    for pick, (a, b) in zip(picks, [(10, 14), (15, 19), (20, 24), (25, 29)]):
        assert a <= pick < b  # random.choice(range(a, b - 1 + 1 - 1)): the segment's last frame is never drawn
    assert picks == official_bounded_indices(4, 40, 10.0, 1.0, 3.0, random.Random(1), np.random.RandomState(1))
    draws = {tuple(official_bounded_indices(4, 40, 10.0, 1.0, 3.0, random.Random(s), np.random.RandomState(s)))
             for s in range(20)}
    assert len(draws) > 1
    # 16 segments of 20 frames: some segment holds one frame, so the official fallback (a sorted random
    # permutation of the bound's frames) runs
    picks = official_bounded_indices(16, 40, 10.0, 1.0, 3.0, random.Random(0), np.random.RandomState(0))
    assert picks == sorted(picks) and len(set(picks)) == 16 and all(10 <= p < 30 for p in picks)
    with pytest.raises(MediaError, match="holds no frame"):
        official_bounded_indices(4, 40, 10.0, 5.0, 6.0, random.Random(0), np.random.RandomState(0))


def test_official_bound_in_the_pipeline_and_a_bound_starting_at_zero_is_the_whole_video(data):
    qs = by_id(load_questions("mvbench", data["mvbench"]))
    d = decode_frames(qs["action_sequence/0"], "middle", 16, seed=5)
    assert all(10 <= i < 30 for i in d.indices) and frame_numbers(d.frames) == d.indices
    assert d.audit()["seed"] == decode_frames(qs["action_sequence/0"], "middle", 16, seed=5).audit()["seed"]
    assert decode_frames(qs["action_sequence/0"], "middle", 16, seed=5).indices == d.indices
    # start 0: the official `if start_time and end_time` is false: middles of the whole video
    d0 = decode_frames(qs["action_sequence/1"], "middle", 8)
    assert d0.indices == [2, 7, 12, 17, 22, 27, 32, 37] and "seed" not in d0.audit()


def test_official_frame_folder_get_index(data):
    q = by_id(load_questions("mvbench", data["mvbench"]))["episodic_reasoning/0"]
    # get_index(bound=(2, 8), fps=3, max_frame=30 files, first_idx=1): start 6, end 24, segments of 18/16
    expected = [6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17, 18, 20, 21, 22, 23]
    assert official_frame_folder_indices(16, 30, (2.0, 8.0), 3.0) == expected
    d = decode_frames(q, "middle", 16)
    assert d.indices == expected and d.decoder == "frames"
    assert frame_numbers(d.frames) == expected  # file 0000k.jpg shows k
    assert d.audit()["files"][:2] == ["00006.jpg", "00007.jpg"]


def test_linspace_over_the_video_and_inside_the_bound(data):
    qs = by_id(load_questions("mvbench", data["mvbench"]))
    d = decode_frames(qs["action_antonym/0"], "linspace", 8)
    assert d.indices == [0, 5, 11, 16, 22, 27, 33, 39]  # np.linspace(0, 39, 8).astype(int)
    assert frame_numbers(d.frames) == d.indices
    d = decode_frames(qs["action_sequence/0"], "linspace", 5)  # window [1, 3) s = frames 10..29
    assert d.indices == [10 + int(x) for x in np.linspace(0, 19, 5)]
    assert frame_numbers(d.frames) == d.indices
    d = decode_frames(qs["episodic_reasoning/0"], "linspace", 4)  # window [2, 8) s at 3 fps: files 7..24
    assert frame_numbers(d.frames) == [7 + int(x) for x in np.linspace(0, 17, 4)]


def test_missing_video_is_a_media_error_naming_it(data, tmp_path):
    from dataclasses import replace

    q = by_id(load_questions("nextqa_mc", data["nextqa_mc"]))["5325126093_1"]
    gone = replace(q, video=tmp_path / "nope.mp4")
    with pytest.raises(MediaError, match="video not found: .*nope.mp4"):
        decode_frames(gone, "middle", 8)
