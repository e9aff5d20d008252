"""The published evaluation protocols as data: frames, prompt text, generation settings, scoring.

Three protocols, each pinned to the code that produced published numbers (facts and strings carried over
byte for byte; the code is ours):

* ``official``  — mPLUG-Owl3's evaluation, X-PLUG/mPLUG-Owl@0f3068f ``mPLUG-Owl3/evaluation/``
  (``tasks/task_define/{mvbench,next_qa,base,video_utils}.py``, ``tasks/plans/all.yaml``,
  ``tasks/general_task_pipeline2.py``). No MLVU task exists there.
* ``lmms_eval`` — EvolvingLMMs-Lab/lmms-eval@75571cf ``lmms_eval/tasks/{mvbench,nextqa,videomme,
  longvideobench,mlvu}/`` (yaml + utils.py) and ``_task_utils/mcq_extract.py``.
* ``slowfast``  — the Slow-Fast authors' lmms-eval fork inside SHI-Labs/Slow-Fast-Video-Multimodal-LLM@69676a1
  (``lmms_eval/tasks/*``, ``lmms_eval/models/slowfast_videomllm.py``, ``model_utils/load_video.py``,
  ``scripts/lmms_eval_evaluate/*.sh``): the settings behind the Slow-Fast README table.

Where the frames come from (``Protocol.frame_choice``; :meth:`Protocol.frame_indices` is the index math):

* ``"middle"`` — official ``read_frames_decord(sample="middle")`` via ``ImageIO._load_video``: n =
  min(N, total) equal segments of ``np.linspace(0, total, n+1).astype(int)``, frame ``(a + b - 1) // 2`` of
  each, padded with the last index up to N (owlvid's ``owl3-eval`` sampling preset). Counts from
  ``plans/all.yaml``: Video-MME 128, LongVideoBench 64, MVBench 16, NExT-QA 8 (class default).
  With a bound (MVBench's four ``start/end`` tasks) the official reader draws **randomly** inside each
  segment of ``[int(fps·start), min(int(fps·end), total))`` — but only when ``start and end`` are both
  truthy: a bound starting at 0 (and LongVideoBench's ``[0, duration]``) falls back to the middle rule
  over the whole video. ``frame_indices(rng=...)`` reproduces that, seedably. MVBench's frame-folder
  task (``episodic_reasoning``, TVQA frames at 3 fps) uses ``MVBench_dataset.get_index`` instead:
  ``seg = (end_idx - start_idx) / N``, frame ``int(start_idx + seg/2 + round(seg·k))`` with
  ``start_idx = max(1, round(3·start))``, ``end_idx = min(round(3·end), number of files)``, files
  ``{k:05d}.jpg`` numbered from 1 — passed to the model as N separate images (``frames_as="images"``).
* ``"slowfast_pyav"`` — the fork's wrapper with ``video_decode_backend=pyav`` (all their scripts):
  ``read_video_pyav2(num_frm=N, target_fps=2)``: step ``max(round(avg_fps / 2), 1)``, candidates
  ``range(0, total, step)``; fewer candidates than N -> all of them (fewer than N frames!), else
  candidate ``round((i+1)·len/N - 1)``. N = the command line's TEST_FRAMES: 64 for the frame64
  checkpoint, 96 for frame96 (``get_protocol(..., num_frames=96)``). Frame images (MVBench
  ``episodic_reasoning`` frame folder) are all loaded, then ``np.linspace(0, len-1, N).astype(int)``
  of them when there are more than N. (owlvid's ``slowfast`` sampling preset, ``np.linspace`` over all
  frames, is the README demo's rule and the fork's decord backend — not what the published runs used.)
* lmms-eval itself leaves frame sampling to the model wrapper, and has no mPLUG-Owl3 wrapper. owlvid's
  wrapper samples as the model family's own evaluation does: ``"middle"`` with the official counts for
  mPLUG-Owl3 (MLVU, which the official code lacks, gets Video-MME's 128), ``"slowfast_pyav"`` with 64
  frames for Slow-Fast. lmms-eval's MVBench reads the HF ``video`` revision, whose bounded tasks are
  pre-cut segments (``star/Charades_segment``...): with the main-revision layout owlvid cuts the clip to
  ``[start, end]`` (``bound="clip"``) and samples inside it.

Prompts: :meth:`Protocol.messages` returns the user turn as owlvid message parts — ONE video part holding
the placeholder :data:`VIDEO`, then the text — so each model family's chat template wraps it as its own
evaluation did (mPLUG-Owl3: ``<|im_start|>system\\n<|im_end|>\\n<|im_start|>user\\n<|video|>\\n{text}``;
Slow-Fast: ``qwen_1_5`` with "You are a helpful assistant." and ``<image>\\n{text}``). None of the protocols
adds a system message of its own. :meth:`Protocol.with_frames` puts the decoded frames in.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from owlvid.errors import InputError
from owlvid.eval.scoring import (
    BENCHMARKS,
    PROTOCOLS,
    STRIPS_RESPONSE,
    Score,
    check_benchmark_protocol,
    letters,
    score_video_response,
)
from owlvid.eval.video_facts import (
    MLVU_DEV_TASK_TYPES,
    MVBENCH_FRAME_FPS,
    MVBENCH_LMMS_EVAL_FOLDERS,
    MVBENCH_TASKS,
    MVBenchTask,
    middle_indices,
    mlvu_question_text,
    mvbench_get_index,
    official_bounded_indices,
    slowfast_pyav_indices,
    split_mlvu_question,
    unletter_option,
)

__all__ = [
    "BENCHMARKS", "PROTOCOLS", "FAMILIES", "VIDEO", "Protocol", "get_protocol", "MVBenchTask", "MVBENCH_TASKS",
    "MVBENCH_LMMS_EVAL_FOLDERS", "MVBENCH_FRAME_FPS", "MLVU_DEV_TASK_TYPES", "unletter_option",
    "mlvu_question_text", "split_mlvu_question",
]

FAMILIES = ("owl3", "slowfast")


class _VideoPlaceholder:
    """The video slot of a protocol's prompt; the runner replaces it with the frames (``with_frames``)."""

    def __repr__(self) -> str:
        return "owlvid.eval.protocols.VIDEO"


VIDEO = _VideoPlaceholder()

# ------------------------------------------------------------------------------------------- prompts

_OWL3_POST = "Answer with the option’s letter from the given choices directly."  # U+2019, official
_LMMS_POST = "Answer with the option's letter from the given choices directly."  # ASCII apostrophe
_SELECT = "Select the best answer to the following multiple-choice question based on the video."
_SELECT_LETTER = _SELECT + " Respond with only the letter (A, B, C, or D) of the correct option."
_SELECT_SUBS_LETTER = ("Select the best answer to the following multiple-choice question based on the video and "
                       "the subtitles. Respond with only the letter (A, B, C, or D) of the correct option.")


def _lettered(options: Sequence[str], style: str = "{}. {}") -> list[str]:
    return [style.format(letter, option) for letter, option in zip(letters(len(options)), options)]


def _text_official(benchmark: str, question: str, options: list[str], fields: dict) -> tuple[str, str]:
    """(text before the video, text after it) of the official user turn."""
    if benchmark == "mvbench":
        # qa_template: "Question: ...\nOptions:\nA. ...\n" rstripped, then ds_prompt "{question}\nAnswer ..."
        body = f"Question: {question}\nOptions:\n" + "".join(f"{line}\n" for line in _lettered(options))
        return "", body.rstrip() + "\n" + _OWL3_POST
    listed = "\n".join(_lettered(options))
    if benchmark == "longvideobench":
        # ds_prompt "Question: {question}\nOptions: ..." with question = "<|video|>\n" + the question
        # (its own <|video|> removed): the video sits after "Question: ".
        return "Question: ", f"{question.replace('<|video|>', '')}\nOptions: {listed}\n{_OWL3_POST}"
    return "", f"Question: {question}\nOptions: {listed}\n{_OWL3_POST}"  # nextqa_mc, videomme


def _text_lmms_eval(benchmark: str, question: str, options: list[str], fields: dict) -> str:
    if benchmark == "mvbench":  # mvbench_doc_to_text, post_prompt of every mvbench_*.yaml
        return "Question:" + question + "\nOption:\n" + "".join(
            f"{line}\n" for line in _lettered(options, "({}) {}")) + "Only give the best option.\n"
    if benchmark == "nextqa_mc":  # nextqa_doc_to_text_mc, no lmms_eval_specific_kwargs in nextqa_mc_test.yaml
        return "\n".join([question.strip()] + _lettered([o.strip() for o in options]))
    if benchmark == "videomme":  # videomme_doc_to_text with videomme.yaml default post_prompt
        return (_SELECT_SUBS_LETTER + "\n" + question + "\n" + "\n".join(_lettered(options)) + "\n"
                + "\n" + _LMMS_POST)
    if benchmark == "longvideobench":  # longvideobench_doc_to_text, val_v yaml (pre_prompt "")
        return question + "\n" + "\n".join(_lettered(options)) + "\n" + _LMMS_POST + "\n"
    # mlvu: mlvu_doc_to_text, pre_prompt "" + the question field (options embedded) + post_prompt
    raw = fields.get("raw_question") or mlvu_question_text(question, options)
    return raw + "\nOnly give the best option.\nBest option: ("


def _text_slowfast(benchmark: str, question: str, options: list[str], fields: dict) -> str:
    if benchmark == "mvbench":  # fork mvbench_doc_to_text + post_prompt of its mvbench_*.yaml
        return (_SELECT_LETTER + "\n" + question + "\n" + "".join(f"{line}\n" for line in _lettered(options))
                + _LMMS_POST)
    if benchmark == "nextqa_mc":  # fork nextqa_doc_to_text_mc: "?" appended unless it ends with "."
        q = question if question.strip().endswith(".") else question + "?"
        return _SELECT + "\n" + "\n".join([q] + _lettered([o.strip() for o in options])) + "\n" + _LMMS_POST
    if benchmark == "videomme":  # fork videomme_doc_to_text, post_prompt from videomme.yaml default
        return _SELECT + "\n" + question + "\n" + "\n".join(_lettered(options)) + "\n" + _LMMS_POST
    if benchmark == "longvideobench":  # same doc_to_text, fork yaml pre/post prompts
        return _SELECT + "\n" + question + "\n" + "\n".join(_lettered(options)) + "\n" + _LMMS_POST + "\n"
    # mlvu: fork mlvu_doc_to_text parses the HF question field back into question + "A. ..." lines
    q, lines = split_mlvu_question(fields.get("raw_question") or mlvu_question_text(question, options))
    if not q.endswith(".") and not q.endswith("?"):
        q = q + "?"
    return _SELECT + "\n" + q + "\n" + "\n".join(lines) + "\n" + _LMMS_POST


# ------------------------------------------------------------------------------------------ protocol

@dataclass(frozen=True)
class Protocol:
    """One benchmark under one protocol for one model family. Everything the runner needs, as data.

    * ``num_frames`` / ``frame_choice`` (``"middle"`` or ``"slowfast_pyav"``, see the module docstring) /
      ``frames_as`` (``"images"``: the official pipeline writes ``<|image|>`` × T and hands the frames
      over as images with ``cut_enable=False``, which the runner passes with them — no video span tokens
      even on 241101; ``"video"``: one video) / ``bound`` (what MVBench's ``start``/``end`` do:
      ``"official_random"``, ``"clip"``, ``"ignored"``). :meth:`frame_indices` computes them.
    * ``generation``: keyword arguments for ``Model.generate`` (max_new_tokens, temperature, stop, ...).
    * ``strips_response``: the protocol's generation path strips the decoded answer before scoring
      (applied inside :meth:`score`; record the raw text, score it as is).
    * ``overall``: how the headline accuracy is computed: ``"micro"`` (all questions), ``"answered"``
      (lmms-eval MVBench: questions whose answer is empty are left out of numerator and denominator),
      ``"task_mean"`` (lmms-eval MLVU dev: the mean of the per-task accuracies over
      :data:`MLVU_DEV_TASK_TYPES`, a task without questions counting 0). See :meth:`overall_accuracy`.
    """

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
        """The conversation: one user message, ONE video part holding :data:`VIDEO`, the text byte for
        byte. ``options``: option texts without letters. ``fields``: ``raw_question`` (MLVU: the dataset's
        question string with its "(A) ..." lines, sent verbatim by lmms-eval)."""
        if not options or not all(isinstance(o, str) for o in options):
            raise InputError("options must be a non-empty list of option texts")
        video = {"type": "video", "video": VIDEO}
        if self.name == "official":
            before, after = _text_official(self.benchmark, question, options, fields)
            parts = ([{"type": "text", "text": before}] if before else []) + [video, {"type": "text", "text": after}]
        elif self.name == "lmms_eval":
            parts = [video, {"type": "text", "text": _text_lmms_eval(self.benchmark, question, options, fields)}]
        else:
            parts = [video, {"type": "text", "text": _text_slowfast(self.benchmark, question, options, fields)}]
        return [{"role": "user", "content": parts}]

    def with_frames(self, messages: list[dict], frames: list) -> list[dict]:
        """``messages`` with :data:`VIDEO` replaced by ``frames``: one video part of them, or one image part
        per frame where the protocol passes frames as images (``frames_as == "images"``)."""
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
        return score_video_response(benchmark=self.benchmark, protocol=self.name, response=response, options=options,
                              answer=answer, rng=rng)

    def frame_indices(self, total_frames: int, avg_fps: float, *, bound: tuple[float, float] | None = None,
                      frame_folder: bool = False, rng: random.Random | None = None) -> list[int]:
        """0-based indices (into the video, or into the sorted frame files of a frame folder) of the frames
        this protocol shows the model. ``bound``: MVBench ``(start, end)`` seconds; ``frame_folder``: MVBench
        ``episodic_reasoning`` (3 fps); ``rng``: the official random in-bound choice (seed it)."""
        if total_frames < 1:
            raise InputError("the video has no frames")
        n = self.num_frames
        if frame_folder:
            if self.name == "official":  # get_index over files numbered from 1
                return [k - 1 for k in mvbench_get_index(bound, MVBENCH_FRAME_FPS, total_frames, n, first_idx=1)]
            if self.bound == "ignored":  # fork: every frame image, then linspace when more than N
                if total_frames <= n:
                    return list(range(total_frames))
                return np.linspace(0, total_frames - 1, n).astype(int).tolist()
            avg_fps = MVBENCH_FRAME_FPS  # lmms-eval's video revision: the folder is a 3 fps clip
        offset, length = 0, total_frames
        if bound is not None and self.bound == "official_random":
            start, end = bound
            if start and end:  # upstream `if start_time and end_time`: a 0 start is no bound at all
                return official_bounded_indices(total_frames, avg_fps, n, start, end, rng)
        elif bound is not None and self.bound == "clip":
            offset = max(int(avg_fps * bound[0]), 0)
            length = min(int(avg_fps * bound[1]), total_frames) - offset
            if length < 1:
                raise InputError(f"bound [{bound[0]}, {bound[1]}] s selects no frame of a {total_frames}-frame video")
        if self.frame_choice == "middle":
            picked = middle_indices(length, n)
        else:
            picked = slowfast_pyav_indices(length, avg_fps, n)
        return [offset + i for i in picked]

    def overall_accuracy(self, scores: Sequence[Score], responses: Sequence[str],
                         tasks: Sequence[str] | None = None) -> float:
        """The protocol's headline accuracy in percent (see ``overall``); ``responses``: the raw answers,
        ``tasks``: MLVU task types (``task_mean`` only)."""
        if self.overall == "task_mean":
            if tasks is None:
                raise InputError("MLVU's lmms-eval accuracy needs the task type of every question")
            per_task = []
            for task in MLVU_DEV_TASK_TYPES:
                hits = [s.correct for s, t in zip(scores, tasks) if t == task]
                per_task.append(100 * sum(hits) / len(hits) if hits else 0.0)
            return sum(per_task) / len(per_task)
        kept = [s for s, r in zip(scores, responses)
                if self.overall != "answered" or (r.strip() if self.strips_response else r) != ""]
        return 100 * sum(s.correct for s in kept) / len(kept) if kept else 0.0


_OFFICIAL_SOURCE = "X-PLUG/mPLUG-Owl@0f3068fdb47b77aedc71fc39f5735cd7aa35e8f9 mPLUG-Owl3/evaluation/"
_LMMS_SOURCE = "EvolvingLMMs-Lab/lmms-eval@75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3 lmms_eval/tasks/"
_SLOWFAST_SOURCE = "SHI-Labs/Slow-Fast-Video-Multimodal-LLM@69676a1a5c3e343391a312b511932757af422478 lmms_eval/"

_OFFICIAL_FILES = {
    "mvbench": "tasks/task_define/mvbench.py (MvBenchTask, MVBench_dataset.qa_template, check_answer)",
    "nextqa_mc": "tasks/task_define/next_qa.py (NextQATask: ds_prompt, postprocess, evaluate)",
    "videomme": "tasks/task_define/next_qa.py (VideoMMEBench: ds_prompt, extract_characters_regex)",
    "longvideobench": "tasks/task_define/next_qa.py (LongVideoBenchTask, LongVideoBenchDataset, check_answer)",
}
# Official counts: tasks/plans/all.yaml (NextQATask has no num_frames there: its class default 8).
_OFFICIAL_FRAMES = {"mvbench": 16, "nextqa_mc": 8, "videomme": 128, "longvideobench": 64}
_OWL3_LMMS_FRAMES = dict(_OFFICIAL_FRAMES, mlvu=128)
_SLOWFAST_FRAMES = 64  # README "frame64" checkpoint = TEST_FRAMES of scripts/lmms_eval_evaluate/*.sh

# lmms-eval task yaml generation_kwargs; `until` defaults to the fewshot delimiter "\n\n" (api/task.py);
# nextqa_mc_test.yaml sets none, so the wrapper's default applies: owlvid uses llava_vid's 1024.
_LMMS_MAX_NEW_TOKENS = {"mvbench": 16, "nextqa_mc": 1024, "videomme": 16, "longvideobench": 32, "mlvu": 16}
_LMMS_FILES = {
    "mvbench": "mvbench/{_default_template_yaml, mvbench_*.yaml, utils.py}",
    "nextqa_mc": "nextqa/{nextqa_mc_test.yaml, utils.py}",
    "videomme": "videomme/{videomme.yaml, utils.py} + _task_utils/mcq_extract.py",
    "longvideobench": "longvideobench/{longvideobench_val_v.yaml, utils.py}",
    "mlvu": "mlvu/{mlvu_dev.yaml, utils.py} + _task_utils/mcq_extract.py",
}
_SLOWFAST_FILES = {
    "mvbench": "tasks/mvbench/{_default_template.yaml, mvbench_*.yaml, utils.py}",
    "nextqa_mc": "tasks/nextqa/{nextqa_mc_test.yaml, utils.py}",
    "videomme": "tasks/videomme/{videomme.yaml, utils.py}",
    "longvideobench": "tasks/longvideobench/{longvideobench_val_v.yaml, utils.py}",
    "mlvu": "tasks/mlvu/{mlvu.yaml, utils.py}",
}

_NOTES = {
    ("mvbench", "official"): (
        "check_answer: the answer's first word (dots removed) only has to be a substring of 'b.': an empty "
        "answer counts as correct, '(B)' and 'B。' as wrong",
        "bounded tasks draw a random frame per segment (seed it); a bound starting at 0 samples the whole video",
        "episodic_reasoning frames are sent as 16 images, the other tasks as 16 frames written <|image|>x16",
    ),
    ("nextqa_mc", "official"): (
        "prediction = first character of the answer, lowercased; an empty answer becomes 'X'",
        "an answer starting with whitespace crashes upstream (IndexError); unreachable after the official "
        ".strip() of generate(decode_text=True), recorded as unparsed and wrong if it happens",
    ),
    ("videomme", "official"): ("an answer without A-D becomes 'A' (counted correct when the truth is A, "
                               "reported as unparsed)",),
    ("longvideobench", "official"): (
        "same check_answer quirks as MVBench",
        "bound [0, duration]: the 0 start disables the random in-bound draw, frames are segment middles",
        "the video placeholder comes after 'Question: ' in the official prompt",
    ),
    ("mvbench", "lmms_eval"): ("the accuracy leaves empty answers out",),
    ("nextqa_mc", "lmms_eval"): ("nothing parsed -> random option (seedable; counted as unparsed)",),
    ("videomme", "lmms_eval"): ("the pre-prompt mentions subtitles although none are given (upstream text)",),
    ("longvideobench", "lmms_eval"): ("nothing parsed -> random option (seedable; counted as unparsed)",
                                      "the first capital A-E anywhere in the answer wins"),
    ("mlvu", "lmms_eval"): ("the overall score is the mean of the 7 per-task accuracies",),
    ("mvbench", "slowfast"): ("bounds are ignored: the fork reads whole videos",
                              "the accuracy leaves empty answers out"),
    ("nextqa_mc", "slowfast"): ("'?' is appended to the question unless it ends with '.'",
                                "nothing parsed -> random option (seedable; counted as unparsed)"),
    ("videomme", "slowfast"): ("nothing parsed -> '' (wrong, unparsed)",),
    ("longvideobench", "slowfast"): ("MMMU-style parsing; nothing parsed -> random option",),
    ("mlvu", "slowfast"): ("prediction = the character before the first ')' or the first character; an empty "
                           "answer crashes upstream (recorded as unparsed and wrong)",),
}


def _build(benchmark: str, protocol: str, family: str) -> Protocol:
    notes = _NOTES.get((benchmark, protocol), ())
    if protocol == "official":
        # general_task_pipeline2.py: max_new_tokens 100, do_sample True with top_k 1 (= greedy), batch size 1;
        # frames handed over as images with cut_enable False (no cut_cfg). A Slow-Fast model gets them as
        # its one video: it has no per-image placeholder form of a video.
        return Protocol(
            benchmark=benchmark, name=protocol, family=family, num_frames=_OFFICIAL_FRAMES[benchmark],
            frame_choice="middle", frames_as="images" if family == "owl3" else "video", bound="official_random",
            strips_response=True,
            generation={"max_new_tokens": 100, "temperature": 0.0},
            source=_OFFICIAL_SOURCE + _OFFICIAL_FILES[benchmark] + ", tasks/plans/all.yaml, "
            "tasks/task_define/{base.py, video_utils.py}, tasks/general_task_pipeline2.py", notes=notes)
    if protocol == "lmms_eval":
        slowfast_model = family == "slowfast"
        generation: dict = {"max_new_tokens": _LMMS_MAX_NEW_TOKENS[benchmark], "temperature": 0.0, "stop": ["\n\n"]}
        return Protocol(
            benchmark=benchmark, name=protocol, family=family,
            num_frames=_SLOWFAST_FRAMES if slowfast_model else _OWL3_LMMS_FRAMES[benchmark],
            frame_choice="slowfast_pyav" if slowfast_model else "middle", frames_as="video", bound="clip",
            strips_response=STRIPS_RESPONSE[protocol],
            overall={"mvbench": "answered", "mlvu": "task_mean"}.get(benchmark, "micro"),
            generation=generation, source=_LMMS_SOURCE + _LMMS_FILES[benchmark], notes=notes)
    # slowfast: the fork's wrapper ignores every task generation_kwargs (getattr on a dict) -> greedy, 256.
    return Protocol(
        benchmark=benchmark, name=protocol, family=family, num_frames=_SLOWFAST_FRAMES,
        frame_choice="slowfast_pyav", frames_as="video", bound="ignored", strips_response=STRIPS_RESPONSE[protocol],
        overall="answered" if benchmark == "mvbench" else "micro",
        generation={"max_new_tokens": 256, "temperature": 0.0},
        source=_SLOWFAST_SOURCE + _SLOWFAST_FILES[benchmark] + ", models/slowfast_videomllm.py, "
        "models/model_utils/load_video.py, scripts/lmms_eval_evaluate/", notes=notes)


def get_protocol(benchmark: str, protocol: str | None = None, family: str = "owl3", *,
                 num_frames: int | None = None) -> Protocol:
    """The protocol for ``benchmark``. ``protocol`` None -> the model family's own: ``official`` for
    mPLUG-Owl3 (``lmms_eval`` for MLVU, which the official code lacks), ``slowfast`` for Slow-Fast.
    ``official`` + ``mlvu`` is a one-line InputError. ``num_frames`` overrides the frame count (e.g. 96 for
    the Slow-Fast frame96 checkpoint, whose authors evaluated with TEST_FRAMES=96)."""
    if family not in FAMILIES:
        raise InputError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    if protocol is None:
        protocol = "slowfast" if family == "slowfast" else ("lmms_eval" if benchmark == "mlvu" else "official")
    check_benchmark_protocol(benchmark, protocol)
    built = _build(benchmark, protocol, family)
    if num_frames is not None:
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise InputError(f"num_frames must be a positive integer, got {num_frames!r}")
        built = replace(built, num_frames=num_frames)
    return built

