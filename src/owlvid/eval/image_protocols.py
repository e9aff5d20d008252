"""The image-table protocols as data: prompt text (byte for byte), image cutting, generation settings.

* ``official`` — X-PLUG/mPLUG-Owl@0f3068f ``mPLUG-Owl3/evaluation/``: prompts from ``tasks/task_define/vqa.py``
  (``ds_prompt``), ``mmbench.py`` (``MultiOptionTask.prompt``, AI2D ``ds_prompt_2`` as ``use_number: False`` in the
  plan, NLVR2, MM-Vet), ``qbench.py`` (Q-Bench2), ``llava_interleave_bench.py`` (``<image>`` -> "Image n: <|image|> ",
  BLINK "the first image: <|image|> ", ``format_question``); cutting from ``tasks/plans/all.yaml``: every task with a
  ``cut_cfg`` (grid_squ_6 anchors, docowl selection, cut prompt v2, global view) is run with ``cut_enable=True``,
  the others (NLVR2, Q-Bench2, LLaVA-Interleave) without; ``general_task_pipeline2.py``: max_new_tokens 100,
  ``do_sample`` with ``top_k=1`` (greedy), batch size 1. The system turn is empty (``enable_system_prompt`` False)
  and the final assistant turn is the prompt end, which is what owlvid's mPLUG-Owl3 chat template builds.
* ``lmms_eval`` — EvolvingLMMs-Lab/lmms-eval@75571cf task yaml (``lmms_eval_specific_kwargs.default``,
  ``generation_kwargs``) and ``doc_to_text``. lmms-eval has no mPLUG-Owl3 wrapper; owlvid's puts the images
  first, one ``<|image|>`` each, then "\\n" and the text (the official README's layout), or in place of the text's
  own ``<image>`` markers when their number matches; it cuts a single image (the model's default) and never cuts
  several (as the official plan does for multi-image tasks).

The cut grid is the model's: 240728 writes the v2 cut prompt, 241014/241101 the v3 one (``<|start_cut|>``); the
grid the processor chose for each image is in predictions.jsonl.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError
from .image_datasets import ImageQuestion
from .image_scoring import CHOICE, UNDEFINED, check_image_protocol

IMAGE = "<|image|>"  # mPLUG-Owl3's placeholder; the runner swaps in the model's own
_OWL3_POST = "Answer with the option’s letter from the given choices directly."  # U+2019, official
_LMMS_POST = "Answer with the option's letter from the given choices directly."
_SHORT = "Answer the question using a single word or phrase."
_UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."
_ORDINALS = {1: "the first image: ", 2: "the second image: ", 3: "the third image: ", 4: "the fourth image: "}
_OFFICIAL_CUT = {"vqav2", "okvqa", "textvqa", "vizwiz_vqa", "gqa", "pope", "ai2d", "mmbench_en", "mmbench_cn",
                 "mmvet"}
_OFFICIAL_SOURCE = "X-PLUG/mPLUG-Owl@0f3068fdb47b77aedc71fc39f5735cd7aa35e8f9 mPLUG-Owl3/evaluation/"
_LMMS_SOURCE = "EvolvingLMMs-Lab/lmms-eval@75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3 lmms_eval/tasks/"
_OFFICIAL_FILES = {
    **{b: "tasks/task_define/vqa.py (VQATask), vqa_utils/" for b in ("vqav2", "okvqa", "textvqa", "vizwiz_vqa", "gqa",
                                                                       "pope")},
    "mmbench_en": "tasks/task_define/mmbench.py (MMBenchTask)",
    "mmbench_cn": "tasks/task_define/mmbench.py (MMBenchTask)",
    "ai2d": "tasks/task_define/mmbench.py (AI2DBench)", "nlvr2": "tasks/task_define/mmbench.py (NLVR2Bench)",
    "mmvet": "tasks/task_define/mmbench.py (MMVetBench)", "qbench2": "tasks/task_define/qbench.py (QbenchTask)",
    **{b: "tasks/task_define/llava_interleave_bench.py (LlavaInterleaveBenchTask out_domain)"
       for b in ("llava_interleave", "mantis_eval", "blink", "mathverse_mv", "sciverse_mv")},
}
_LMMS_FILES = {"vqav2": "vqav2/", "okvqa": "ok_vqa/", "textvqa": "textvqa/", "vizwiz_vqa": "vizwiz_vqa/", "gqa": "gqa/",
               "pope": "pope/", "ai2d": "ai2d/", "mmbench_en": "mmbench/ (en)", "mmbench_cn": "mmbench/ (cn)",
               "mmvet": "mmvet/", "qbench2": "qbench/qbench2_dev.yaml", "mantis_eval": "mantis/", "blink": "blink/",
               **{b: "llava_interleave_bench/out_of_domain.yaml" for b in ("llava_interleave", "mathverse_mv",
                                                                           "sciverse_mv")}}
# lmms-eval generation_kwargs; a task without `until` gets "\n\n" (api/task.py), without max_new_tokens the
# wrapper's default (llava's 1024)
_LMMS_GENERATION = {
    "vqav2": (16, ["\n\n"]), "okvqa": (1024, ["ASSISTANT:"]), "textvqa": (1024, ["ASSISTANT:"]),
    "vizwiz_vqa": (1024, ["ASSISTANT:"]), "gqa": (16, ["\n\n"]), "pope": (128, ["\n\n"]), "ai2d": (16, ["\n\n"]),
    "mmbench_en": (1024, ["ASSISTANT:"]), "mmbench_cn": (256, ["\n\n"]), "mmvet": (1024, ["\n\n"]),
    "qbench2": (32, ["\n\n"]), "mantis_eval": (64, ["\n\n"]), "blink": (1024, ["\n\n"]),
    "llava_interleave": (16, ["\n\n"]), "mathverse_mv": (16, ["\n\n"]), "sciverse_mv": (16, ["\n\n"]),
}


def _lettered(options: tuple[str, ...] | list[str], sep: str = "\n") -> str:
    return sep.join(f"{'ABCDEFGH'[i]}. {o}" for i, o in enumerate(options))


# ---------------------------------------------------------------------------------------------- official

def official_text(q: ImageQuestion) -> str:
    """The official user turn, ``<|image|>`` placeholders included."""
    b = q.benchmark
    if b in ("vqav2", "okvqa", "textvqa", "gqa", "pope"):
        return f"{IMAGE}{q.question} {_SHORT}"
    if b == "vizwiz_vqa":
        return f"{IMAGE}{q.question} {_UNANSWERABLE} {_SHORT}"
    if b in ("mmbench_en", "mmbench_cn"):
        hint = q.fields.get("hint")
        hint = str(hint) if hint else "N/A"  # `data['hint'] if data['hint'] else 'N/A'`: a NaN hint prints "nan"
        return f"{IMAGE}Context: {hint}\nQuestion: {q.question}\nOptions: {_lettered(q.options)}\n{_OWL3_POST}"
    if b == "ai2d":
        return f"{IMAGE}\nQuestion: {q.question}\nOptions:\n{_lettered(q.options)}\n{_OWL3_POST}"
    if b == "nlvr2":
        return (f"Left image: {IMAGE} Right image: {IMAGE}\n{q.question}\nyes or no? Answer the question using a "
                "single word.")
    if b == "mmvet":
        return f"{IMAGE}\n{q.question.strip()}"
    if b == "qbench2":
        return (f"Image 1: {IMAGE}\nImage 2: {IMAGE}\nQuestion: {q.question}\nOptions: {_lettered(q.options)}\n"
                f"{_OWL3_POST}")
    return _official_interleave(q)


def _official_interleave(q: ImageQuestion) -> str:
    """``__getitem__`` with image_index True, then ``format_question``."""
    text, n = q.question, 1
    dataset = q.task
    while "<image>" in text:
        if dataset == "BLINK":
            if n not in _ORDINALS:
                raise InputError(f"BLINK question {q.qid} has more than 4 images (the official code has no 5th name)")
            text = text.replace("<image>", _ORDINALS[n] + IMAGE + " ", 1)
        else:
            text = text.replace("<image>", f"Image {n}: {IMAGE} ", 1)
        n += 1
    if dataset == "SciVerse":
        text = text.replace(_LMMS_POST, "\nPlease select the correct paired scientific diagram from four given "
                            "images. " + _LMMS_POST)
    elif q.fields.get("question_type") == "multi-choice" and dataset not in ("Mantis", "MathVerse", "SciVerse"):
        text = text + "\n" + _OWL3_POST
    return text


# --------------------------------------------------------------------------------------------- lmms-eval

def lmms_text(q: ImageQuestion) -> str:
    """lmms-eval's ``doc_to_text`` with the task's default ``lmms_eval_specific_kwargs``."""
    b = q.benchmark
    if b in ("vqav2", "gqa"):
        return f"{q.question}\n{_SHORT}"
    if b == "okvqa":  # sic: OK-VQA's post_prompt carries VizWiz's 'Unanswerable' sentence
        return f"{q.question}\n{_UNANSWERABLE}\n{_SHORT}"
    if b == "vizwiz_vqa":
        return f"{q.question.capitalize()}\n{_UNANSWERABLE}\n{_SHORT}"
    if b == "textvqa":  # str.capitalize lowercases the rest of the question
        return f"{q.question.capitalize()}\n{_SHORT}"
    if b == "pope":
        return f"{q.question.strip()}\n{_SHORT}"
    if b == "ai2d":
        return f"{q.question}\n{_lettered(q.options)}\n{_LMMS_POST}"
    if b in ("mmbench_en", "mmbench_cn"):
        options = "There are several options:\n" + "".join(f"{'ABCDE'[i]}. {o}\n" for i, o in enumerate(q.options))
        options = options.rstrip("\n")
        hint = q.fields.get("hint")
        has_hint = hint is not None and hint == hint and (b == "mmbench_cn" or hint != "nan")  # CN lacks != "nan"
        query = f"{hint} {q.question} {options}" if has_hint else f"{q.question} {options}"
        post = "\n" + _LMMS_POST if b == "mmbench_en" else "\n请直接使用所提供的选项字母作为答案回答。"
        return f"{query}\n{post}"
    if b == "mmvet":
        return ("First please perform reasoning, and think step by step to provide best answer to the following "
                f"question: \n\n{q.question}")
    if b == "qbench2":
        return f"{q.question}\n{_lettered(q.options)}\n{_LMMS_POST}\n"
    if b == "mantis_eval":  # sic: the options list is appended as its Python repr
        return f"{q.question}\n{_LMMS_POST}{q.fields.get('raw_options', list(q.options))}"
    if b == "blink":
        letters = ", ".join("ABCDEFGH"[i] for i in range(len(q.options)))
        return f"Note: You only need to respond with {letters} without providing any additional information.\n" \
               + q.fields.get("prompt", q.question)
    return q.question  # LLaVA-Interleave (and its MathVerse / SciVerse subsets): the question verbatim


def lmms_layout(text: str, n_images: int) -> str:
    """owlvid's lmms-eval wrapper: images in place of the text's ``<image>`` markers when their number matches,
    else all images first and "\\n" before the text."""
    if n_images and text.count("<image>") == n_images:
        return text.replace("<image>", IMAGE)
    return IMAGE * n_images + ("\n" if n_images else "") + text


@dataclass(frozen=True)
class ImageProtocol:
    """How ``name`` runs ``benchmark``: :meth:`prompt` (the user turn with placeholders), :meth:`cut` (cut_enable
    for a question with n images), ``generation`` (Model.generate options), ``source`` and ``notes``."""

    benchmark: str
    name: str
    generation: dict
    source: str
    notes: tuple[str, ...] = field(default_factory=tuple)

    def prompt(self, q: ImageQuestion) -> str:
        if self.name == "official":
            text = official_text(q)
        else:
            text = lmms_layout(lmms_text(q), len(q.images))
        if text.count(IMAGE) != len(q.images):
            raise InputError(f"{self.benchmark} question {q.qid}: the prompt has {text.count(IMAGE)} image "
                             f"placeholder(s) for {len(q.images)} image(s)")
        return text

    def cut(self, n_images: int) -> bool:
        if self.name == "official":
            return self.benchmark in _OFFICIAL_CUT
        return n_images == 1

    def messages(self, q: ImageQuestion) -> list[dict[str, Any]]:
        return [{"role": "user", "content": self.prompt(q)}]

    @property
    def multiple_choice(self) -> bool:
        return self.benchmark in CHOICE


_NOTES = {
    ("textvqa", "official"): ("the plan's textvqa_val has no ds_collections entry upstream (KeyError): the defined "
                              "textvqa_val_ocr_v2 settings are used (prompt, strip, VQAEval)",),
    ("vqav2", "official"): ("test split: answers go to the EvalAI server (submission file)",),
    ("vizwiz_vqa", "official"): ("test split: answers go to the EvalAI server (submission file); the answer is cut "
                                 "at its first '.' and ','",),
    ("mmbench_en", "official"): ("test split: submission file (MMBench server); with answers, circular accuracy",),
    ("mmbench_cn", "official"): ("test split: submission file (MMBench server); with answers, circular accuracy",),
    ("pope", "official"): ("answers that are neither yes nor no leave the accuracy's denominator",),
    ("pope", "lmms_eval"): ("'Yes.' is not 'yes'; yes_ratio is the ground truth's",),
    ("okvqa", "lmms_eval"): ("the post prompt carries the 'Unanswerable' sentence (upstream yaml)",),
    ("mantis_eval", "lmms_eval"): ("upstream samples (do_sample, temperature 0.2): owlvid samples with a seed per "
                                   "question", "the options are appended as a Python list repr (upstream)"),
    ("blink", "lmms_eval"): ("the first letter of the answer is the prediction ('The answer is B' -> T)",),
    ("llava_interleave", "official"): ("multiple-choice questions only: open-ended ones (ROUGE-L upstream) are not "
                                       "loaded",),
    ("llava_interleave", "lmms_eval"): ("multiple-choice questions only: open-ended ones (ROUGE-L upstream) are not "
                                        "loaded",),
    ("mmbench_en", "lmms_eval"): ("can_infer, then the static extract_mcq_answer instead of the GPT matcher",),
    ("mmbench_cn", "lmms_eval"): ("can_infer, then the static extract_mcq_answer instead of the GPT matcher",),
}


def get_image_protocol(benchmark: str, protocol: str | None = None) -> ImageProtocol:
    """The protocol for an image benchmark (default: official). A combination a protocol does not define is a
    one-line InputError (NLVR2 under lmms_eval)."""
    protocol = protocol or "official"
    check_image_protocol(benchmark, protocol)
    if (benchmark, protocol) in UNDEFINED and benchmark != "mmvet":
        raise InputError(UNDEFINED[(benchmark, protocol)])
    notes = _NOTES.get((benchmark, protocol), ())
    if protocol == "official":
        return ImageProtocol(benchmark, protocol, {"max_new_tokens": 100, "temperature": 0.0},
                             _OFFICIAL_SOURCE + _OFFICIAL_FILES[benchmark] + ", tasks/plans/all.yaml, "
                             "tasks/general_task_pipeline2.py", notes)
    max_new, until = _LMMS_GENERATION[benchmark]
    temperature = 0.2 if benchmark == "mantis_eval" else 0.0
    return ImageProtocol(benchmark, protocol, {"max_new_tokens": max_new, "temperature": temperature, "stop": until},
                         _LMMS_SOURCE + _LMMS_FILES[benchmark], notes)
