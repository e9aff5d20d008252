"""TEMPORARY stand-in for h-evalproto's protocols.py/scoring.py (same signatures, minimal behaviour).

Deleted as soon as the real modules land on main; nothing but `owlvid.eval._protocol_api` imports it.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from owlvid.errors import InputError

BENCHMARKS = ("mvbench", "nextqa_mc", "videomme", "longvideobench", "mlvu")
PROTOCOLS = ("official", "lmms_eval", "slowfast")


class _VideoPlaceholder:
    def __repr__(self) -> str:
        return "VIDEO"


VIDEO = _VideoPlaceholder()

# task -> (json file, video folder under video/, kind, bounded): the official MVBench dataset table
MVBENCH_TASKS = {
    "action_sequence": ("action_sequence.json", "star/Charades_v1_480/", "video", True),
    "action_prediction": ("action_prediction.json", "star/Charades_v1_480/", "video", True),
    "action_antonym": ("action_antonym.json", "ssv2_video/", "video", False),
    "fine_grained_action": ("fine_grained_action.json", "Moments_in_Time_Raw/videos/", "video", False),
    "unexpected_action": ("unexpected_action.json", "FunQA_test/test/", "video", False),
    "object_existence": ("object_existence.json", "clevrer/video_validation/", "video", False),
    "object_interaction": ("object_interaction.json", "star/Charades_v1_480/", "video", True),
    "object_shuffle": ("object_shuffle.json", "perception/videos/", "video", False),
    "moving_direction": ("moving_direction.json", "clevrer/video_validation/", "video", False),
    "action_localization": ("action_localization.json", "sta/sta_video/", "video", True),
    "scene_transition": ("scene_transition.json", "scene_qa/video/", "video", False),
    "action_count": ("action_count.json", "perception/videos/", "video", False),
    "moving_count": ("moving_count.json", "clevrer/video_validation/", "video", False),
    "moving_attribute": ("moving_attribute.json", "clevrer/video_validation/", "video", False),
    "state_change": ("state_change.json", "perception/videos/", "video", False),
    "fine_grained_pose": ("fine_grained_pose.json", "nturgbd/", "video", False),
    "character_order": ("character_order.json", "perception/videos/", "video", False),
    "egocentric_navigation": ("egocentric_navigation.json", "vlnqa/", "video", False),
    "episodic_reasoning": ("episodic_reasoning.json", "tvqa/frames_fps3_hq/", "frame", True),
    "counterfactual_inference": ("counterfactual_inference.json", "clevrer/video_validation/", "video", False),
}


@dataclass(frozen=True)
class Score:
    predicted: str | None
    correct: bool
    parsed: bool


def score_response(*, benchmark: str, protocol: str, response: str, options: list[str], answer: str,
                   rng: random.Random | None = None) -> Score:
    m = re.search(r"[A-E]", response)
    letter = m.group(0) if m else None
    return Score(letter, letter == answer, letter is not None)


_FRAMES = {"mvbench": 16, "nextqa_mc": 8, "videomme": 128, "longvideobench": 64, "mlvu": 16}


@dataclass(frozen=True)
class Protocol:
    benchmark: str
    name: str
    num_frames: int
    frame_choice: str
    generation: dict = field(default_factory=dict)
    source: str = "stand-in"

    def messages(self, question: str, options: list[str], **fields) -> list[dict]:
        lettered = "\n".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(options))
        text = (f"Question: {question}\nOptions:\n{lettered}\n"
                "Answer with the option’s letter from the given choices directly.")
        return [{"role": "user", "content": [{"type": "video", "video": VIDEO}, {"type": "text", "text": text}]}]

    def score(self, response: str, options: list[str], answer: str, rng: random.Random | None = None) -> Score:
        return score_response(benchmark=self.benchmark, protocol=self.name, response=response, options=options,
                              answer=answer, rng=rng)


def get_protocol(benchmark: str, protocol: str | None = None, family: str = "owl3") -> Protocol:
    if benchmark not in BENCHMARKS:
        raise InputError(f"unknown benchmark {benchmark!r}")
    if protocol is None:
        protocol = "slowfast" if family == "slowfast" else "lmms_eval" if benchmark == "mlvu" else "official"
    if protocol == "official" and benchmark == "mlvu":
        raise InputError("the official mPLUG-Owl3 evaluation defines no MLVU task; use --protocol lmms_eval")
    choice = {"official": "middle", "slowfast": "linspace"}.get(protocol, "uniform")
    frames = 64 if protocol == "slowfast" else _FRAMES[benchmark]
    return Protocol(benchmark, protocol, frames, choice, {"max_new_tokens": 100, "temperature": 0.0})
