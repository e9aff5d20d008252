"""Facts of the video benchmarks' data and the official frame choices: MVBench's tasks and folders, MLVU's
option lettering, and the frame-index math of each protocol (the official mPLUG-Owl3 code, lmms-eval, the
Slow-Fast authors' scripts), each from the pinned upstream file named in its docstring."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from ..errors import InputError
from .scoring import letters

# ------------------------------------------------------------------------------------- dataset facts

MVBENCH_FRAME_FPS = 3  # official MVBench_dataset.read_frame / __getitem__: TVQA frame folders are 3 fps


class MVBenchTask(NamedTuple):
    """One MVBench task as the official ``data_list`` (mvbench.py) defines it; unpacks as the 4-tuple
    ``(json_file, video_folder, kind, bounded)``.

    ``json_file``: under ``json/`` of HF ``OpenGVLab/MVBench``. ``video_folder``: the official prefix under
    ``video/`` (``dataset/mvbench/video/`` + the ``your_data_path/...`` folder), joined with the row's
    ``video`` field; the Slow-Fast fork uses the same folders (and ignores the bounds). ``kind``:
    ``"video"`` (a file) or ``"frame"`` (a folder of ``{k:05d}.jpg`` at :data:`MVBENCH_FRAME_FPS`, numbered
    from 1). ``bounded``: rows carry ``start``/``end`` seconds."""

    json_file: str
    video_folder: str
    kind: str
    bounded: bool


# Official data_list order (the ConcatDataset order of the official run), names lowercased with "_".
MVBENCH_TASKS: dict[str, MVBenchTask] = {
    "action_sequence": MVBenchTask("action_sequence.json", "star/Charades_v1_480/", "video", True),
    "action_prediction": MVBenchTask("action_prediction.json", "star/Charades_v1_480/", "video", True),
    "action_antonym": MVBenchTask("action_antonym.json", "ssv2_video/", "video", False),
    "fine_grained_action": MVBenchTask("fine_grained_action.json", "Moments_in_Time_Raw/videos/", "video", False),
    "unexpected_action": MVBenchTask("unexpected_action.json", "FunQA_test/test/", "video", False),
    "object_existence": MVBenchTask("object_existence.json", "clevrer/video_validation/", "video", False),
    "object_interaction": MVBenchTask("object_interaction.json", "star/Charades_v1_480/", "video", True),
    "object_shuffle": MVBenchTask("object_shuffle.json", "perception/videos/", "video", False),
    "moving_direction": MVBenchTask("moving_direction.json", "clevrer/video_validation/", "video", False),
    "action_localization": MVBenchTask("action_localization.json", "sta/sta_video/", "video", True),
    "scene_transition": MVBenchTask("scene_transition.json", "scene_qa/video/", "video", False),
    "action_count": MVBenchTask("action_count.json", "perception/videos/", "video", False),
    "moving_count": MVBenchTask("moving_count.json", "clevrer/video_validation/", "video", False),
    "moving_attribute": MVBenchTask("moving_attribute.json", "clevrer/video_validation/", "video", False),
    "state_change": MVBenchTask("state_change.json", "perception/videos/", "video", False),
    "fine_grained_pose": MVBenchTask("fine_grained_pose.json", "nturgbd/", "video", False),
    "character_order": MVBenchTask("character_order.json", "perception/videos/", "video", False),
    "egocentric_navigation": MVBenchTask("egocentric_navigation.json", "vlnqa/", "video", False),
    "episodic_reasoning": MVBenchTask("episodic_reasoning.json", "tvqa/frames_fps3_hq/", "frame", True),
    "counterfactual_inference": MVBenchTask("counterfactual_inference.json", "clevrer/video_validation/", "video",
                                            False),
}

# lmms-eval mvbench/utils.py DATA_LIST: its folders in the HF ``video`` revision of MVBench, where the bounded
# tasks are pre-cut segments and episodic_reasoning is a video (for users who downloaded that revision).
MVBENCH_LMMS_EVAL_FOLDERS = {
    "object_interaction": "star/Charades_segment", "action_sequence": "star/Charades_segment",
    "action_prediction": "star/Charades_segment", "action_localization": "sta/sta_video_segment",
    "moving_count": "clevrer/video_validation", "fine_grained_pose": "nturgbd_convert",
    "character_order": "perception/videos", "object_shuffle": "perception/videos", "egocentric_navigation": "vlnqa",
    "moving_direction": "clevrer/video_validation", "episodic_reasoning": "tvqa/video_fps3_hq_segment",
    "fine_grained_action": "Moments_in_Time_Raw/videos", "scene_transition": "scene_qa/video",
    "state_change": "perception/videos", "moving_attribute": "clevrer/video_validation",
    "action_antonym": "ssv2_video_mp4", "unexpected_action": "FunQA_test/test",
    "counterfactual_inference": "clevrer/video_validation", "object_existence": "clevrer/video_validation",
    "action_count": "perception/videos",
}

# lmms-eval mlvu_aggregate_results_dev: the overall score is the mean over these task types.
MLVU_DEV_TASK_TYPES = ("anomaly_reco", "count", "ego", "needle", "order", "plotQA", "topic_reasoning")


def unletter_option(text: str, index: int) -> str:
    """A Video-MME option as the parquet stores it ("B. text") -> "text"; one-line InputError when it does
    not start with exactly its letter, a dot and a space (then re-lettering would not give the same bytes
    the official and lmms-eval prompts show)."""
    prefix = f"{letters(index + 1)[index]}. "
    if not text.startswith(prefix):
        raise InputError(f"Video-MME option {index} should start with {prefix!r}, got {text[:20]!r}")
    return text[len(prefix):]


def mlvu_question_text(question: str, options: Sequence[str]) -> str:
    """MLVU's question field in the HF ``MLVU_dev`` form: the question, then one "(A) option" line per
    option. lmms-eval sends this field verbatim; pass the dataset's own string as ``raw_question`` to
    :meth:`Protocol.messages` when the loader has it."""
    return question + "".join(f"\n({letter}) {option}" for letter, option in zip(letters(len(options)), options))


def split_mlvu_question(raw: str) -> tuple[str, list[str]]:
    """The Slow-Fast fork's ``extract_question_and_options``: non-empty lines, the first is the question,
    the next four are options whose "(A)".."(D)" becomes "A.".."D." (an option line without one raises
    upstream; here a one-line InputError). Returns (question, lettered option lines)."""
    lines = [line for line in raw.split("\n") if line != ""]
    question, options = lines[0], lines[1:5]
    out = []
    for line in options:
        for letter in "ABCD":
            if f"({letter})" in line:
                out.append(line.replace(f"({letter})", f"{letter}."))
                break
        else:
            raise InputError(f"MLVU option line without (A)-(D): {line[:40]!r}")
    return question, out


# --------------------------------------------------------------------------------------- frame math

def middle_indices(total_frames: int, num_frames: int) -> list[int]:
    """Official ``get_frame_indices(sample="middle")`` (owlvid's ``owl3-eval`` preset)."""
    acc = min(num_frames, total_frames)
    edges = np.linspace(0, total_frames, acc + 1).astype(int)
    picked = [int((edges[k] + edges[k + 1] - 1) // 2) for k in range(acc)]
    return picked + [picked[-1]] * (num_frames - acc)


def official_bounded_indices(total_frames: int, avg_fps: float, num_frames: int, start: float, end: float,
                             rng: random.Random | None) -> list[int]:
    """Official ``get_frame_indices_start_end``: a random frame inside each segment (random.choice over
    ``range(a, b - 1)``, so a segment's last frame is never drawn), a sorted random subset of the clip when
    a segment is too short, padded with the last index."""
    source = rng or random
    start_idx = max(int(avg_fps * start), 0)
    end_idx = min(int(avg_fps * end), total_frames)
    acc = min(num_frames, end_idx - start_idx)
    edges = np.linspace(start_idx, end_idx, acc + 1).astype(int)
    ranges = [(int(edges[k]), int(edges[k + 1]) - 1) for k in range(acc)]
    if ranges and all(b > a for a, b in ranges):
        picked = [source.choice(range(a, b)) for a, b in ranges]
    else:  # upstream: np.random.permutation(range(start_idx, end_idx))[:acc], sorted
        picked = sorted(source.sample(range(start_idx, end_idx), max(acc, 0)))
    if not picked:
        raise InputError(f"bound [{start}, {end}] s selects no frame of a {total_frames}-frame video")
    return picked + [picked[-1]] * (num_frames - len(picked))


def mvbench_get_index(bound: tuple[float, float] | None, fps: float, max_frame: int, num_segments: int,
                      first_idx: int = 0) -> list[int]:
    """Official ``MVBench_dataset.get_index`` (frame folders: fps 3, first_idx 1, max_frame = file count)."""
    start, end = bound if bound else (-100000, 100000)
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    return [int(start_idx + seg_size / 2 + np.round(seg_size * k)) for k in range(num_segments)]


def slowfast_pyav_indices(total_frames: int, avg_fps: float, num_frames: int, target_fps: float = 2) -> list[int]:
    """The fork's ``load_video.get_frame_indices`` used by ``read_video_pyav2`` (may return fewer frames)."""
    step = max(round(avg_fps / target_fps), 1)
    candidates = list(range(0, total_frames, step))
    if len(candidates) < num_frames:
        return candidates
    scale = len(candidates) / num_frames
    return [candidates[round((i + 1) * scale - 1)] for i in range(num_frames)]
