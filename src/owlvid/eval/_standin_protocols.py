"""TEMPORARY stand-in for h-evalproto's protocols.py/scoring.py: the same names and signatures, minimal
behaviour (a placeholder prompt and scorer). Deleted as soon as the real modules land on main; nothing but
`owlvid.eval._protocol_api` imports it."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from owlvid.errors import InputError

BENCHMARKS = ("mvbench", "nextqa_mc", "videomme", "longvideobench", "mlvu")
PROTOCOLS = ("official", "lmms_eval", "slowfast")
MVBENCH_FRAME_FPS = 3
MLVU_DEV_TASK_TYPES = ("anomaly_reco", "count", "ego", "needle", "order", "plotQA", "topic_reasoning")


class _VideoPlaceholder:
    def __repr__(self) -> str:
        return "VIDEO"


VIDEO = _VideoPlaceholder()


@dataclass(frozen=True)
class MVBenchTask:
    name: str
    json_file: str
    video_folder: str
    kind: str
    bounded: bool
    lmms_eval_folder: str = ""


MVBENCH_TASKS = {t.name: t for t in (
    MVBenchTask("action_sequence", "action_sequence.json", "star/Charades_v1_480/", "video", True),
    MVBenchTask("action_prediction", "action_prediction.json", "star/Charades_v1_480/", "video", True),
    MVBenchTask("action_antonym", "action_antonym.json", "ssv2_video/", "video", False),
    MVBenchTask("fine_grained_action", "fine_grained_action.json", "Moments_in_Time_Raw/videos/", "video", False),
    MVBenchTask("unexpected_action", "unexpected_action.json", "FunQA_test/test/", "video", False),
    MVBenchTask("object_existence", "object_existence.json", "clevrer/video_validation/", "video", False),
    MVBenchTask("object_interaction", "object_interaction.json", "star/Charades_v1_480/", "video", True),
    MVBenchTask("object_shuffle", "object_shuffle.json", "perception/videos/", "video", False),
    MVBenchTask("moving_direction", "moving_direction.json", "clevrer/video_validation/", "video", False),
    MVBenchTask("action_localization", "action_localization.json", "sta/sta_video/", "video", True),
    MVBenchTask("scene_transition", "scene_transition.json", "scene_qa/video/", "video", False),
    MVBenchTask("action_count", "action_count.json", "perception/videos/", "video", False),
    MVBenchTask("moving_count", "moving_count.json", "clevrer/video_validation/", "video", False),
    MVBenchTask("moving_attribute", "moving_attribute.json", "clevrer/video_validation/", "video", False),
    MVBenchTask("state_change", "state_change.json", "perception/videos/", "video", False),
    MVBenchTask("fine_grained_pose", "fine_grained_pose.json", "nturgbd/", "video", False),
    MVBenchTask("character_order", "character_order.json", "perception/videos/", "video", False),
    MVBenchTask("egocentric_navigation", "egocentric_navigation.json", "vlnqa/", "video", False),
    MVBenchTask("episodic_reasoning", "episodic_reasoning.json", "tvqa/frames_fps3_hq/", "frame", True),
    MVBenchTask("counterfactual_inference", "counterfactual_inference.json", "clevrer/video_validation/", "video",
                False),
)}


def unletter_option(text: str, index: int) -> str:
    prefix = f"{chr(ord('A') + index)}. "
    if not text.startswith(prefix):
        raise InputError(f"Video-MME option {index} should start with {prefix!r}, got {text[:20]!r}")
    return text[len(prefix):]


@dataclass(frozen=True)
class Score:
    predicted: str | None
    correct: bool
    parsed: bool
    note: str = ""


def score_response(*, benchmark: str, protocol: str, response: str, options: list[str], answer: str,
                   rng: random.Random | None = None) -> Score:
    if answer not in [chr(ord("A") + i) for i in range(len(options))]:
        raise InputError(f"answer must be an option letter, got {answer!r}")
    m = re.search(r"[A-E]", response)
    letter = m.group(0) if m else None
    return Score(letter, letter == answer, letter is not None)


def middle_indices(total_frames: int, num_frames: int) -> list[int]:
    acc = min(num_frames, total_frames)
    edges = np.linspace(0, total_frames, acc + 1).astype(int)
    picked = [int((edges[k] + edges[k + 1] - 1) // 2) for k in range(acc)]
    return picked + [picked[-1]] * (num_frames - acc)


def official_bounded_indices(total_frames: int, avg_fps: float, num_frames: int, start: float, end: float,
                             rng: random.Random | None) -> list[int]:
    source = rng or random
    start_idx, end_idx = max(int(avg_fps * start), 0), min(int(avg_fps * end), total_frames)
    acc = min(num_frames, end_idx - start_idx)
    edges = np.linspace(start_idx, end_idx, max(acc, 0) + 1).astype(int)
    ranges = [(int(edges[k]), int(edges[k + 1]) - 1) for k in range(max(acc, 0))]
    if ranges and all(b > a for a, b in ranges):
        picked = [source.choice(range(a, b)) for a, b in ranges]
    else:
        picked = sorted(source.sample(range(start_idx, end_idx), max(acc, 0)))
    if not picked:
        raise InputError(f"bound [{start}, {end}] s selects no frame of a {total_frames}-frame video")
    return picked + [picked[-1]] * (num_frames - len(picked))


def mvbench_get_index(bound, fps: float, max_frame: int, num_segments: int, first_idx: int = 0) -> list[int]:
    start, end = bound if bound else (-100000, 100000)
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    return [int(start_idx + seg_size / 2 + np.round(seg_size * k)) for k in range(num_segments)]


def slowfast_pyav_indices(total_frames: int, avg_fps: float, num_frames: int, target_fps: float = 2) -> list[int]:
    step = max(round(avg_fps / target_fps), 1)
    candidates = list(range(0, total_frames, step))
    if len(candidates) < num_frames:
        return candidates
    scale = len(candidates) / num_frames
    return [candidates[round((i + 1) * scale - 1)] for i in range(num_frames)]


_FRAMES = {"mvbench": 16, "nextqa_mc": 8, "videomme": 128, "longvideobench": 64, "mlvu": 128}


@dataclass(frozen=True)
class Protocol:
    benchmark: str
    name: str
    num_frames: int
    frame_choice: str
    generation: dict
    source: str
    family: str = "owl3"
    frames_as: str = "video"
    bound: str = "clip"
    strips_response: bool = True
    overall: str = "micro"
    notes: tuple[str, ...] = field(default_factory=tuple)

    def messages(self, question: str, options: list[str], **fields: Any) -> list[dict]:
        lettered = "\n".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(options))
        text = (f"Question: {question}\nOptions:\n{lettered}\n"
                "Answer with the option’s letter from the given choices directly.")
        return [{"role": "user", "content": [{"type": "video", "video": VIDEO}, {"type": "text", "text": text}]}]

    def with_frames(self, messages: list[dict], frames: list) -> list[dict]:
        out = []
        for message in messages:
            content = []
            for part in message["content"]:
                if part.get("type") == "video" and part.get("video") is VIDEO:
                    if self.frames_as == "images":
                        content.extend({"type": "image", "image": frame} for frame in frames)
                    else:
                        content.append({"type": "video", "video": list(frames)})
                else:
                    content.append(dict(part))
            out.append({"role": message["role"], "content": content})
        return out

    def score(self, response: str, options: list[str], answer: str, rng: random.Random | None = None) -> Score:
        return score_response(benchmark=self.benchmark, protocol=self.name, response=response, options=options,
                              answer=answer, rng=rng)

    def frame_indices(self, total_frames: int, avg_fps: float, *, bound: tuple[float, float] | None = None,
                      frame_folder: bool = False, rng: random.Random | None = None) -> list[int]:
        n = self.num_frames
        if frame_folder:
            if self.name == "official":
                return [k - 1 for k in mvbench_get_index(bound, MVBENCH_FRAME_FPS, total_frames, n, first_idx=1)]
            if self.bound == "ignored":
                if total_frames <= n:
                    return list(range(total_frames))
                return np.linspace(0, total_frames - 1, n).astype(int).tolist()
            avg_fps = MVBENCH_FRAME_FPS
        offset, length = 0, total_frames
        if bound is not None and self.bound == "official_random":
            if bound[0] and bound[1]:
                return official_bounded_indices(total_frames, avg_fps, n, bound[0], bound[1], rng)
        elif bound is not None and self.bound == "clip":
            offset = max(int(avg_fps * bound[0]), 0)
            length = min(int(avg_fps * bound[1]), total_frames) - offset
        if self.frame_choice == "middle":
            picked = middle_indices(length, n)
        else:
            picked = slowfast_pyav_indices(length, avg_fps, n)
        return [offset + i for i in picked]

    def overall_accuracy(self, scores, responses, tasks=None) -> float:
        if self.overall == "task_mean":
            per_task = []
            for task in MLVU_DEV_TASK_TYPES:
                hits = [s.correct for s, t in zip(scores, tasks) if t == task]
                per_task.append(100 * sum(hits) / len(hits) if hits else 0.0)
            return sum(per_task) / len(per_task)
        kept = [s for s, r in zip(scores, responses) if self.overall != "answered" or r.strip() != ""]
        return 100 * sum(s.correct for s in kept) / len(kept) if kept else 0.0


def get_protocol(benchmark: str, protocol: str | None = None, family: str = "owl3", *,
                 num_frames: int | None = None) -> Protocol:
    if benchmark not in BENCHMARKS:
        raise InputError(f"unknown benchmark {benchmark!r}")
    if protocol is None:
        protocol = "slowfast" if family == "slowfast" else "lmms_eval" if benchmark == "mlvu" else "official"
    if protocol == "official" and benchmark == "mlvu":
        raise InputError("the official mPLUG-Owl3 evaluation defines no MLVU task; use --protocol lmms_eval")
    if protocol == "official":
        return Protocol(benchmark, protocol, num_frames or _FRAMES[benchmark], "middle",
                        {"max_new_tokens": 100, "temperature": 0.0, "cut_enable": False}, "stand-in", family,
                        frames_as="images", bound="official_random")
    slowfast = protocol == "slowfast" or family == "slowfast"
    return Protocol(benchmark, protocol, num_frames or (64 if slowfast else _FRAMES[benchmark]),
                    "slowfast_pyav" if slowfast else "middle", {"max_new_tokens": 16, "temperature": 0.0},
                    "stand-in", family, bound="ignored" if protocol == "slowfast" else "clip",
                    overall={"mvbench": "answered", "mlvu": "task_mean"}.get(benchmark, "micro"))
