"""Tiny benchmark folders in each dataset's real on-disk layout, with videos whose frames carry their index.

Videos are 10 fps index videos (tests/media/synth.py); the MVBench episodic_reasoning frame folder holds
`00001.jpg`... where file k shows index k, as the TVQA frames at 3 fps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from tests.media.synth import index_frame, write_video

FPS = 10
VIDEO_FRAMES = 40  # 4 s


def _video(path: Path, n: int = VIDEO_FRAMES) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, n, fps=FPS, gop=8)
    return path


def _json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False))
    return path


def _parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def make_mvbench(root: Path) -> Path:
    """Three tasks: an unbounded video task (2 questions on one video), a bounded one (start/end, one with
    start 0), and the frame-folder task episodic_reasoning (30 TVQA-style frames)."""
    _json(root / "json" / "action_antonym.json", [
        {"video": "clip_a.mp4", "question": "What is the person doing?", "candidates": ["opening", "closing", "none"],
         "answer": "closing"},
        {"video": "clip_a.mp4", "question": "Which way?", "candidates": ["left", "right"], "answer": "left"},
    ])
    _video(root / "video" / "ssv2_video" / "clip_a.mp4")
    _json(root / "json" / "action_sequence.json", [
        {"video": "seq.mp4", "question": "What happened after the cup?", "candidates": ["sat", "stood", "ran", "ate"],
         "answer": "ran", "start": 1.0, "end": 3.0},
        {"video": "seq.mp4", "question": "What happened first?", "candidates": ["sat", "stood"], "answer": "sat",
         "start": 0.0, "end": 2.5},
    ])
    _video(root / "video" / "star" / "Charades_v1_480" / "seq.mp4")
    _json(root / "json" / "episodic_reasoning.json", [
        {"video": "s01e01_seg01", "question": "Why did he leave?", "candidates": ["late", "angry", "bored"],
         "answer": "bored", "start": 2.0, "end": 8.0},
    ])
    folder = root / "video" / "tvqa" / "frames_fps3_hq" / "s01e01_seg01"
    folder.mkdir(parents=True)
    for k in range(1, 31):
        Image.fromarray(index_frame(k)).save(folder / f"{k:05d}.jpg", quality=95)
    return root


NEXTQA_ROWS = [
    {"video": 4010069381, "frame_count": 40, "width": 128, "height": 96, "question": "why did the boy wave",
     "answer": 2, "qid": 4, "type": "CW", "a0": "to call", "a1": "to dance", "a2": "to greet", "a3": "to run",
     "a4": "to eat"},
    {"video": 4010069381, "frame_count": 40, "width": 128, "height": 96, "question": "what did the boy do after",
     "answer": 0, "qid": 7, "type": "TP", "a0": "sit", "a1": "jump", "a2": "cry", "a3": "sing", "a4": "walk"},
    {"video": 5325126093, "frame_count": 40, "width": 128, "height": 96, "question": "how many dogs are there",
     "answer": 1, "qid": 1, "type": "DC", "a0": "one", "a1": "two", "a2": "three", "a3": "four", "a4": "five"},
]


def make_nextqa(root: Path) -> Path:
    _parquet(root / "MC" / "test-00000-of-00001.parquet", NEXTQA_ROWS)
    for video in ("4010069381", "5325126093"):
        _video(root / "NExTVideo" / f"{video}.mp4")
    return root


def make_videomme(root: Path) -> Path:
    base = {"duration": "short", "domain": "Knowledge", "sub_category": "Astronomy", "url": "https://youtu.be/x"}
    rows = [
        {**base, "video_id": "001", "videoID": "fFjv93ACGo8", "question_id": "001-1", "task_type": "Counting Problem",
         "question": "How many planets?", "options": ["A. 1.", "B. 2.", "C. 8.", "D. 9."], "answer": "C"},
        {**base, "video_id": "001", "videoID": "fFjv93ACGo8", "question_id": "001-2", "task_type": "OCR Problems",
         "question": "What is written?", "options": ["A. Sun", "B. Moon", "C. Mars", "D. Venus"], "answer": "A"},
        {**base, "duration": "long", "domain": "Sports Competition", "sub_category": "Football", "video_id": "601",
         "videoID": "zZzz0000aaa", "question_id": "601-1", "task_type": "Action Reasoning",
         "question": "Who scored?", "options": ["A. red", "B. blue", "C. none", "D. both"], "answer": "B"},
    ]
    _parquet(root / "videomme" / "test-00000-of-00001.parquet", rows)
    _video(root / "data" / "fFjv93ACGo8.mp4")
    _video(root / "data" / "zZzz0000aaa.mp4", 60)
    return root


def make_longvideobench(root: Path) -> Path:
    rows = [
        {"video_id": "86CxyhFV9MI", "question": "What colour is the car?", "question_wo_referring_query": "x",
         "candidates": ["red", "blue", "green", "white"], "correct_choice": 3, "position": [1, 2],
         "topic_category": "NP-News-Programs", "question_category": "TOS", "level": "L2-Relation", "id": "86Cx_0",
         "video_path": "86CxyhFV9MI.mp4", "subtitle_path": "86CxyhFV9MI_en.json", "duration_group": 15,
         "starting_timestamp_for_subtitles": 0, "duration": 4.0, "view_count": 1},
        {"video_id": "86CxyhFV9MI", "question": "Who speaks first?", "candidates": ["man", "woman", "child"],
         "correct_choice": 0, "question_category": "S2E", "id": "86Cx_1", "video_path": "86CxyhFV9MI.mp4",
         "subtitle_path": "86CxyhFV9MI_en.json", "duration_group": 15, "starting_timestamp_for_subtitles": 0,
         "duration": 4.0},
    ]
    _json(root / "lvb_val.json", rows)
    _video(root / "videos" / "86CxyhFV9MI.mp4")
    return root


def make_mlvu(root: Path) -> Path:
    _json(root / "json" / "1_plotQA.json", [
        {"video": "movie101_66.mp4", "duration": 4, "question": "What does the hero find?",
         "candidates": ["a key", "a map", "a dog", "a car"], "answer": "a map", "question_type": "plotQA"},
    ])
    _json(root / "json" / "4_count.json", [
        {"video": "count_1.mp4", "duration": 4, "question": "How many jumps?", "candidates": ["1", "2", "3", "4"],
         "answer": "3", "question_type": "count"},
        {"video": "count_1.mp4", "duration": 4, "question": "How many claps?", "candidates": ["0", "5", "6", "7"],
         "answer": "0", "question_type": "count"},
    ])
    _json(root / "json" / "9_summary.json", [{"video": "sum.mp4", "duration": 4, "question": "Summarize.",
                                              "answer": "A story.", "question_type": "summary"}])
    _video(root / "video" / "1_plotQA" / "movie101_66.mp4")
    _video(root / "video" / "4_count" / "count_1.mp4")
    return root


MAKERS = {"mvbench": make_mvbench, "nextqa_mc": make_nextqa, "videomme": make_videomme,
          "longvideobench": make_longvideobench, "mlvu": make_mlvu}


def frame_numbers(frames) -> list[int]:
    """The index each decoded frame shows."""
    from tests.media.synth import read_index

    return [read_index(np.asarray(f)) for f in frames]
