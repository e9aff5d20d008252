"""owlvid.eval.score_response / aggregate_metrics on the image tables: tricky answers whose expected verdicts were
computed by running the upstream functions themselves (X-PLUG/mPLUG-Owl@0f3068f mPLUG-Owl3/evaluation: VQAEval,
EvalAIAnswerProcessor, vqa.py, mmbench.py, qbench.py, llava_interleave_bench.py; lmms-eval@75571cf task utils)."""

from __future__ import annotations

import math
import random

import pytest

from owlvid.errors import InputError
from owlvid.eval import IMAGE_BENCHMARKS, aggregate_metrics, score_response

A1 = ["2"] * 3 + ["two"] * 7
A2 = ["Two"] * 6 + ["2"] * 4
A3 = ["yes."] * 10
A4 = ["red car"] * 2 + ["a red car"] * 2 + ["the red car"] + ["car"] * 5
THOUSAND = ["1000"] * 5 + ["1,000"] * 5
ITS = ["it's red"] * 3 + ["red"] * 7

# (response, answers, lmms-eval {benchmark: (score, submitted answer)}, official VQAEval {benchmark: score x100})
VQA_CASES = [
    # official VQAEval lowercases only the answer: "two" annotations stay "two", the answer becomes "2"
    ("Two", A1, {"vqav2": (1.0, "2"), "okvqa": (1.0, "2"), "vizwiz_vqa": (1.0, "2")},
     {"okvqa": 90.0, "vizwiz_vqa": 90.0, "vqav2": 90.0}),
    ("Two.", A2, {"vqav2": (1.0, "2"), "textvqa": (1.0, "2")}, {"okvqa": 100.0, "vqav2": 100.0}),
    # ten identical annotations are not processed at all by VQAEval: "yes." never equals "yes"
    ("Yes", A3, {"vqav2": (1.0, "yes"), "okvqa": (1.0, "yes")}, {"okvqa": 0.0, "vizwiz_vqa": 0.0, "vqav2": 0.0}),
    ("A red car.", A4, {"vqav2": (1.0, "red car"), "textvqa": (1.0, "red car")}, {"okvqa": 60.0, "vqav2": 60.0}),
    ("The red-car", A4, {"vizwiz_vqa": (1.0, "red car")}, {"okvqa": 60.0}),
    ("Dont", ["don't"] * 4 + ["dont"] * 6, {"okvqa": (1.0, "don't")}, {"okvqa": 100.0}),
    # official VizWiz keeps the text before the first comma: "1"
    ("1,000", THOUSAND, {"vqav2": (1.0, "1000"), "vizwiz_vqa": (1.0, "1000")},
     {"okvqa": 100.0, "vizwiz_vqa": 0.0, "vqav2": 100.0}),
    # the EvalAI processor splits "'s" off (OK-VQA/TextVQA/VizWiz); lmms-eval VQAv2 does not run that step
    ("It's red", ITS, {"vqav2": (0.9, "it's red"), "okvqa": (0.9, "it 's red"), "textvqa": (0.9, "it 's red")},
     {"okvqa": 90.0, "vqav2": 0.0}),
]


@pytest.mark.parametrize("response,answers,lmms,official", VQA_CASES)
def test_vqa_score_matches_upstream(response: str, answers: list[str], lmms: dict, official: dict) -> None:
    for benchmark, (value, submitted) in lmms.items():
        s = score_response(benchmark=benchmark, protocol="lmms_eval", response=response, answers=answers)
        assert (round(s.score, 6), s.predicted, s.correct) == (value, submitted, None), benchmark
    for benchmark, value in official.items():
        s = score_response(benchmark=benchmark, protocol="official", response=response, answers=answers)
        assert round(100 * s.score, 2) == value, benchmark


def test_vqa_needs_answers() -> None:
    with pytest.raises(InputError, match="answers="):
        score_response(benchmark="okvqa", protocol="official", response="x", answer="x")


def test_gqa_official_substring_rules_and_lmms_punctuation() -> None:
    # "is " then "a " are substring tests: "it is a tea cup" -> "a tea cup" -> "te"
    s = score_response(benchmark="gqa", protocol="official", response="It is a tea cup.", answer="cup")
    assert (s.predicted, s.correct) == ("te", False)
    s = score_response(benchmark="gqa", protocol="official", response="The color of the shirt", answer="color")
    assert (s.predicted, s.correct) == ("color", True)
    assert score_response(benchmark="gqa", protocol="official", response="Left, I think", answer="left").correct
    s = score_response(benchmark="gqa", protocol="lmms_eval", response="Man's.", answer="mans")
    assert (s.predicted, s.correct) == ("mans", True)
    assert not score_response(benchmark="gqa", protocol="lmms_eval", response="left side", answer="left").correct


def test_pope_yes_no_handling_per_protocol() -> None:
    off = score_response(benchmark="pope", protocol="official", response="Yes, there is a dog.", answer="yes")
    lmms = score_response(benchmark="pope", protocol="lmms_eval", response="Yes, there is a dog.", answer="yes")
    assert (off.predicted, off.correct) == ("yes", True)
    assert (lmms.predicted, lmms.correct, lmms.parsed) == (None, False, False)
    assert not score_response(benchmark="pope", protocol="lmms_eval", response="Yes.", answer="yes").correct
    assert score_response(benchmark="pope", protocol="lmms_eval", response="YES", answer="yes").correct


def test_pope_metrics_formulas_differ_as_upstream() -> None:
    responses, answers = ["Yes", "No", "maybe", "yes", "No."], ["yes", "yes", "no", "no", "no"]
    off = aggregate_metrics(benchmark="pope", protocol="official", responses=responses, answers=answers)
    # official: "maybe" is in no confusion cell (accuracy over 4), yes_ratio = predicted yes / 5
    assert off == pytest.approx({"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.4})
    lmms = aggregate_metrics(benchmark="pope", protocol="lmms_eval", responses=responses, answers=answers)
    # lmms-eval: only "Yes" matches (1 of 5: "No." is not "no"); yes_ratio is the share of ground-truth yes
    assert lmms == pytest.approx({"accuracy": 0.2, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.4})
    zero = aggregate_metrics(benchmark="pope", protocol="official", responses=["no"], answers=["no"])
    assert math.isnan(zero["precision"]) and zero["accuracy"] == 1.0  # ZeroDivisionError upstream
    assert aggregate_metrics(benchmark="pope", protocol="lmms_eval", responses=["no"], answers=["no"])["f1"] == 0


def test_nlvr2_official_and_refused_under_lmms_eval() -> None:
    assert score_response(benchmark="nlvr2", protocol="official", response="Yes, it is.", answer="yes").correct
    assert not score_response(benchmark="nlvr2", protocol="official", response="True", answer="yes").correct
    with pytest.raises(InputError, match="lmms-eval@75571cf defines no NLVR2 task"):
        score_response(benchmark="nlvr2", protocol="lmms_eval", response="yes", answer="yes")


OPTS = ["cat", "dog", "red car", "bird"]
# response -> upstream verdicts with truth "B": official MMBench extract_answer letter, official Q-Bench2 letter,
# official LLaVA-Interleave judge, lmms-eval mcq_acc, lmms-eval MMBench (can_infer or static), Mantis, BLINK letter
MC_CASES = [
    ("", "A", "X", False, False, None, False, ""),  # official MMBench: "" is inside every option -> A
    ("B", "B", "B", True, True, "B", True, "B"),
    ("b", "D", "X", True, True, None, True, "B"),  # official MMBench: "b" is inside "bird" -> D
    ("(B)", "B", "B", True, True, "B", True, "B"),
    ("A. cat, or B.", "B", "B", False, False, "A", False, "A"),  # extract_choice tries E..A: B wins
    ("The answer is B", "B", "B", False, True, "B", True, "T"),  # BLINK takes the first letter: T
    ("I think B", "B", "B", False, True, "B", False, "I"),
    ("Answer: c", "X", "X", False, False, "A", False, "A"),
    ("dog", "B", "X", False, False, "B", False, "D"),
    ("B) dog", "B", "B", False, True, "B", True, "B"),
    ("Final Answer: (C)", "C", "C", False, False, "C", False, "F"),
    ("选 C", "C", "C", False, False, "C", False, ""),
]


@pytest.mark.parametrize("response,mmb,qb,il_off,il_lmms,mmb_lmms,mantis,blink", MC_CASES)
def test_multiple_choice_extractors_match_upstream(response: str, mmb: str, qb: str, il_off: bool, il_lmms: bool,
                                                   mmb_lmms: str | None, mantis: bool, blink: str) -> None:
    def run(benchmark: str, protocol: str):
        return score_response(benchmark=benchmark, protocol=protocol, response=response, options=OPTS, answer="B")

    for benchmark in ("mmbench_en", "mmbench_cn"):
        s = run(benchmark, "official")
        assert (s.predicted or "X", s.correct) == (mmb, mmb == "B")
        s = run(benchmark, "lmms_eval")
        assert (s.predicted, s.correct) == (mmb_lmms, mmb_lmms == "B")
    s = run("qbench2", "official")
    assert (s.predicted or "X", s.correct) == (qb, qb == "B")
    for benchmark in ("llava_interleave", "mantis_eval", "blink", "mathverse_mv", "sciverse_mv"):
        assert run(benchmark, "official").correct is il_off
    for benchmark in ("llava_interleave", "mathverse_mv", "sciverse_mv"):
        assert run(benchmark, "lmms_eval").correct is il_lmms
    assert run("mantis_eval", "lmms_eval").correct is mantis
    s = run("blink", "lmms_eval")
    assert s.correct is (blink == "B") and s.predicted == (blink if blink in "ABCD" and blink else None)


def test_ai2d_first_character_vs_filter_and_exact_match() -> None:
    def run(response: str, protocol: str):
        return score_response(benchmark="ai2d", protocol=protocol, response=response, options=OPTS, answer="B")

    assert run("B. dog", "official").correct and run("B. dog", "lmms_eval").correct
    assert not run("(B)", "official").correct and run("(B)", "lmms_eval").correct
    assert not run("b", "official").correct and run("b", "lmms_eval").correct
    assert run("Bird", "official").correct and not run("Bird", "lmms_eval").correct  # first character "B"
    empty = run("", "official")
    assert (empty.correct, "IndexError" in empty.note) == (False, True)


def test_qbench2_lmms_random_fallback_is_seedable() -> None:
    a = score_response(benchmark="qbench2", protocol="lmms_eval", response="no idea", options=OPTS, answer="B",
                       rng=random.Random(3))
    b = score_response(benchmark="qbench2", protocol="lmms_eval", response="no idea", options=OPTS, answer="B",
                       rng=random.Random(3))
    assert a == b and not a.parsed and a.predicted in "ABCD"


def test_refusals_are_one_line_input_errors() -> None:
    cases = [
        dict(benchmark="mmvet", protocol="official", response="x"),
        dict(benchmark="mmvet", protocol="lmms_eval", response="x"),
        dict(benchmark="pope", protocol="slowfast", response="yes", answer="yes"),
        dict(benchmark="coco_caption", protocol="official", response="x"),
        dict(benchmark="ai2d", protocol="official", response="x", options=OPTS, answer="F"),
        dict(benchmark="pope", protocol="official", response="yes", answer="maybe"),
    ]
    for kwargs in cases:
        with pytest.raises(InputError) as e:
            score_response(**kwargs)
        assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="POPE"):
        aggregate_metrics(benchmark="gqa", protocol="official", responses=["x"], answers=["yes"])


def test_every_benchmark_of_the_three_tables_is_known() -> None:
    for benchmark in ("nlvr2", "mantis_eval", "mathverse_mv", "sciverse_mv", "blink", "qbench2", "vqav2", "okvqa",
                      "gqa", "vizwiz_vqa", "textvqa", "mmbench_en", "mmbench_cn", "mmvet", "pope", "ai2d"):
        assert benchmark in IMAGE_BENCHMARKS


def test_video_calls_unchanged() -> None:
    s = score_response(benchmark="mvbench", protocol="official", response="B.", options=["a", "b"], answer="B")
    assert (s.predicted, s.correct, s.parsed) == ("B", True, True)
