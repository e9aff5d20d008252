"""The model card's image tables (multi-image, VQA, general): which protocol defines which benchmark, and the
scoring entry points ``score_image_response`` / ``aggregate_metrics`` (owlvid.eval.score_response dispatches here).

What each protocol defines (the official plan ``tasks/plans/all.yaml`` at X-PLUG/mPLUG-Owl@0f3068f, lmms-eval's
task folders at 75571cf):

* official: MMBench EN/CN (test: submission only), MM-Vet (submission only), POPE random/popular/adversarial,
  AI2D, OK-VQA val, TextVQA val (the plan names ``textvqa_val``, which ``vqa.py`` does not define: owlvid uses the
  defined ``textvqa_val_ocr_v2`` settings), VizWiz test and VQAv2 test (submission only), GQA testdev, NLVR2,
  Q-Bench2 and the LLaVA-Interleave out-domain set, whose Mantis, BLINK, MathVerse and SciVerse subsets are the
  model card's multi-image columns.
* lmms_eval: every one of them except NLVR2 (no task) ; MathVerse-mv and SciVerse-mv are the subsets of its
  ``llava_interleave_bench_out_domain`` (its own ``mathverse`` task is the single-image testmini).
* slowfast: no image benchmark.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from owlvid.errors import InputError

from . import choice_scoring as mc
from . import vqa_scoring as vqa

MULTI_IMAGE = ("nlvr2", "mantis_eval", "mathverse_mv", "sciverse_mv", "blink", "qbench2")
VQA = ("vqav2", "okvqa", "gqa", "vizwiz_vqa", "textvqa")
GENERAL = ("mmbench_en", "mmbench_cn", "mmvet", "pope", "ai2d")
IMAGE_BENCHMARKS = MULTI_IMAGE + VQA + GENERAL + ("llava_interleave",)
OPEN_VQA = ("vqav2", "okvqa", "textvqa", "vizwiz_vqa")
YES_NO = ("pope", "nlvr2")
CHOICE = ("ai2d", "mmbench_en", "mmbench_cn", "qbench2", "llava_interleave", "mantis_eval", "blink", "mathverse_mv",
          "sciverse_mv")
# LLaVA-Interleave out-domain subsets (metadata.dataset / sub_task) behind the multi-image columns
INTERLEAVE_SUBSETS = {"mantis_eval": "Mantis", "blink": "BLINK", "mathverse_mv": "MathVerse", "sciverse_mv": "SciVerse"}

UNDEFINED = {
    ("nlvr2", "lmms_eval"): "lmms-eval@75571cf defines no NLVR2 task; use --protocol official",
    ("mmvet", "official"): "MM-Vet is scored by a GPT-4 judge (official: submission file only); owlvid eval writes "
                           "the submission file, score_response has nothing to compute",
    ("mmvet", "lmms_eval"): "MM-Vet is scored by a GPT-4 judge (lmms-eval mmvet/utils.py); owlvid eval writes the "
                            "answers for the judge, score_response has nothing to compute",
}
# test splits whose answers only a server holds: owlvid eval writes the submission file
SUBMISSION_ONLY = {"vqav2": "VQAv2 test-dev/test (EvalAI server)", "vizwiz_vqa": "VizWiz test (EvalAI server)",
                   "mmvet": "MM-Vet (GPT-4 judge)"}


def check_image_protocol(benchmark: str, protocol: str) -> None:
    """One-line InputError for a protocol that does not define ``benchmark`` (an image benchmark)."""
    if protocol == "slowfast":
        raise InputError(f"the Slow-Fast protocol defines no image benchmark ({benchmark}); use --protocol official "
                         "or lmms_eval")
    if protocol not in ("official", "lmms_eval"):
        raise InputError(f"unknown protocol {protocol!r}; choose official or lmms_eval")
    reason = UNDEFINED.get((benchmark, protocol))
    if reason is not None and benchmark != "mmvet":
        raise InputError(reason)


def _choice(benchmark: str, protocol: str, response: str, options: Sequence[str], answer: str,
            rng: random.Random | None) -> mc.Result:
    if protocol == "official":
        if benchmark in ("mmbench_en", "mmbench_cn"):
            return mc.official_mmbench(response, options, answer)
        if benchmark == "ai2d":
            return mc.official_ai2d(response, options, answer)
        if benchmark == "qbench2":
            return mc.official_qbench2(response, options, answer)
        return mc.official_interleave(response, options, answer)  # llava_interleave and its four subsets
    if benchmark in ("mmbench_en", "mmbench_cn"):
        return mc.lmms_mmbench(response, options, answer)
    if benchmark == "ai2d":
        return mc.lmms_ai2d(response, options, answer)
    if benchmark == "qbench2":
        return mc.lmms_qbench2(response, options, answer, rng)
    if benchmark == "mantis_eval":
        return mc.lmms_mantis(response, options, answer)
    if benchmark == "blink":
        return mc.lmms_blink(response, options, answer)
    return mc.lmms_interleave(response, options, answer)  # llava_interleave, mathverse_mv, sciverse_mv


def score_image_response(*, benchmark: str, protocol: str, response: str, options: Sequence[str] | None = None,
                         answer: str | None = None, answers: Sequence[str] | None = None,
                         rng: random.Random | None = None):  # -> scoring.Score
    """See ``owlvid.eval.score_response``; ``response`` arrives as the model decoded it and is stripped here (both
    protocols strip before scoring)."""
    from .scoring import Score, letters

    check_image_protocol(benchmark, protocol)
    if benchmark == "mmvet":
        raise InputError(UNDEFINED[("mmvet", protocol)])
    if not isinstance(response, str):
        raise InputError(f"response must be a string, got {type(response).__name__}")
    text = response.strip()
    if benchmark in OPEN_VQA:
        if isinstance(answers, str) or not isinstance(answers, Sequence) or not answers \
                or not all(isinstance(a, str) for a in answers):
            raise InputError(f"{benchmark} needs answers=[the annotators' answer strings]")
        fn = vqa.official_vqa if protocol == "official" else vqa.lmms_vqa
        predicted, value = fn(benchmark, text, list(answers))
        note = "" if benchmark not in SUBMISSION_ONLY else \
            f"{SUBMISSION_ONLY[benchmark]} scores the test split; this is the local VQA score of the same answer"
        return Score(predicted=predicted, correct=None, parsed=predicted != "", note=note, score=value)
    if not isinstance(answer, str):
        raise InputError(f"{benchmark} needs answer=<the ground truth>")
    if benchmark == "gqa":
        predicted, correct = (vqa.official_gqa if protocol == "official" else vqa.lmms_gqa)(text, answer)
        return Score(predicted=predicted, correct=correct, parsed=predicted != "", score=float(correct))
    if benchmark in YES_NO:
        if answer.strip().lower() not in ("yes", "no"):
            raise InputError(f"{benchmark} answer must be 'yes' or 'no', got {answer!r}")
        gt = answer.strip().lower()
        if benchmark == "pope":
            label = vqa.official_pope_label(text) if protocol == "official" else vqa.lmms_pope_label(text)
        else:
            label = vqa.official_nlvr2(text)
        parsed = label in ("yes", "no")
        return Score(predicted=label if parsed else None, correct=label == gt, parsed=parsed, score=float(label == gt))
    if isinstance(options, str) or not isinstance(options, Sequence) or not options \
            or not all(isinstance(o, str) for o in options):
        raise InputError("options must be a non-empty list of option texts")
    if answer not in letters(len(options)):
        raise InputError(f"answer must be one of the option letters {''.join(letters(len(options)))}, got {answer!r}")
    predicted, correct, note = _choice(benchmark, protocol, text, list(options), answer, rng)
    return Score(predicted=predicted, correct=bool(correct), parsed=predicted is not None and note != mc.RANDOM_NOTE,
                 note=note,
                 score=float(bool(correct)))


def aggregate_metrics(*, benchmark: str = "pope", protocol: str, responses: Sequence[str],
                      answers: Sequence[str]) -> dict[str, float]:
    """POPE's five numbers as fractions: accuracy, precision, recall, f1, yes_ratio, by the protocol's own formulas
    (see vqa_scoring.pope_metrics for how they differ)."""
    if benchmark != "pope":
        raise InputError(f"aggregate_metrics computes POPE's metrics; {benchmark!r} has none of its own")
    check_image_protocol(benchmark, protocol)
    if isinstance(responses, str) or isinstance(answers, str) or len(responses) != len(answers):
        raise InputError("responses and answers must be lists of the same length")
    if not responses:
        raise InputError("responses is empty")
    for a in answers:
        if not isinstance(a, str) or a.strip().lower() not in ("yes", "no"):
            raise InputError(f"POPE answers must be 'yes' or 'no', got {a!r}")
    if not all(isinstance(r, str) for r in responses):
        raise InputError("responses must be strings")
    return vqa.pope_metrics(protocol, [r.strip() for r in responses], list(answers))
