"""score_response on tricky answers, for every benchmark × protocol, against what the upstream code decides.

Every expectation below was derived by reading the upstream function named in the comment above its table
(and then checked against the pinned sources). Sources:
  official  = X-PLUG/mPLUG-Owl@0f3068f mPLUG-Owl3/evaluation/tasks/task_define/{mvbench,next_qa}.py
  lmms_eval = EvolvingLMMs-Lab/lmms-eval@75571cf lmms_eval/tasks/*/utils.py, _task_utils/mcq_extract.py
  slowfast  = SHI-Labs/Slow-Fast-Video-Multimodal-LLM@69676a1 lmms_eval/tasks/*/utils.py
Rows: response -> (predicted, correct, parsed); the truth is always "B". Random fallbacks use rng=Random(0),
whose first choice among A-D (and A-E) is "D".
"""

from __future__ import annotations

import random

import pytest

from owlvid.errors import InputError
from owlvid.eval import score_response
from owlvid.eval.scoring import Score, _official_nextqa

OPTIONS = ["he opens the door", "she picks up the cup", "they sit down", "it runs away"]
NEXTQA_OPTIONS = OPTIONS + ["a dog barks"]
LONG = ("Based on the video, the person walks into the kitchen, looks around for a while, and finally she "
        "picks up the cup from the table.")

EXPECTED: dict[tuple[str, str], dict[str, tuple[str | None, bool, bool]]] = {
    # official check_answer (mvbench.py): pred_option = first " "-separated word of the lowercased answer;
    # `if pred_option.replace('.', '').strip() in gt_option` (gt_option = "b.") decides most rows;
    # `elif gt_content.strip() in pred_content` (option text after the first word) decides LONG and "b. she ...".
    # The answer was .strip()-ed by generate(decode_text=True) first (so " B" is "B").
    ("mvbench", "official"): {
        "(B)": (None, False, False),  # "(b)" not in "b."
        "The answer is B": (None, False, False),  # "the" not in "b."; "she picks up the cup" not in "answer is b"
        "B": ("B", True, True),
        "b": ("B", True, True),
        "B.": ("B", True, True),  # dots removed: "b" in "b."
        "": (None, True, False),  # "" in "b." is True: the empty-answer quirk
        " B": ("B", True, True),
        "b. she picks up the cup": ("B", True, True),
        "B。": (None, False, False),  # "b。" not in "b."
        "（B）": (None, False, False),
        LONG: ("B", True, True),  # first word "based" fails, the option text occurs after it
        "she picks up the cup": (None, False, False),  # the option text minus its first word is searched
        "Answer: C": (None, False, False),
    },
    # lmms-eval mvbench/utils.py mcq_acc: process() returns the letter of r"^([A-E])\.\s*(.+)$", else after
    # punctuation removal and lowercasing the first r"\b([A-E])\b" (IGNORECASE), else the text itself.
    ("mvbench", "lmms_eval"): {
        "(B)": ("B", True, True),  # parentheses stripped, \bb\b
        "The answer is B": ("B", True, True),
        "B": ("B", True, True),
        "b": ("B", True, True),  # IGNORECASE
        "B.": ("B", True, True),
        "": (None, False, False),  # "" != "B" (and left out of the accuracy: Protocol.overall)
        " B": ("B", True, True),
        "b. she picks up the cup": ("B", True, True),  # option_regex
        "B。": ("B", True, True),  # \b between B and 。
        "（B）": ("B", True, True),
        LONG: ("A", False, True),  # "... for a while ..." -> the standalone "a" wins
        "she picks up the cup": (None, False, False),  # no standalone A-E: the text itself
        "Answer: C": ("C", False, True),
    },
    # official next_qa.py NextQATask.evaluate: prediction = pred[0].strip().lower()[0]; postprocess maps an
    # empty answer to "X".
    ("nextqa_mc", "official"): {
        "(B)": ("(", False, False),
        "The answer is B": ("T", False, False),
        "B": ("B", True, True),
        "b": ("B", True, True),
        "B.": ("B", True, True),
        "": (None, False, False),  # "X"
        " B": ("B", True, True),  # stripped by generate(decode_text=True) before evaluate
        "b. she picks up the cup": ("B", True, True),
        "B。": ("B", True, True),
        "（B）": ("（", False, False),
        LONG: ("B", True, True),  # "Based": first character b
        "she picks up the cup": ("S", False, False),
        "Answer: C": ("A", False, True),  # first character a: the official predicts A
    },
    # lmms-eval nextqa/utils.py parse_multi_choice_response (MMMU): "(B)", then "B ", then "B." in
    # " " + response + " " (case-sensitive), then option texts if more than 5 words, else random.choice.
    ("nextqa_mc", "lmms_eval"): {
        "(B)": ("B", True, True),
        "The answer is B": ("B", True, True),  # "B " in " The answer is B "
        "B": ("B", True, True),
        "b": ("D", False, False),  # lowercase: nothing matches -> random
        "B.": ("B", True, True),  # "." stripped first -> "B "
        "": ("D", False, False),
        " B": ("B", True, True),
        "b. she picks up the cup": ("B", True, True),  # 6 words: the option text is found
        "B。": ("D", False, False),
        "（B）": ("D", False, False),
        LONG: ("B", True, True),  # option text
        "she picks up the cup": ("D", False, False),  # 5 words: option texts not searched
        "Answer: C": ("C", False, True),
    },
    # official next_qa.py VideoMMEBench.extract_characters_regex: strip, remove prefixes (two of them
    # accidentally concatenated), `re.search(r'[ABCD]', s)`, "A" when none (fallback -> unparsed).
    ("videomme", "official"): {
        "(B)": ("B", True, True),
        "The answer is B": ("B", True, True),
        "B": ("B", True, True),
        "b": ("A", False, False),  # no capital: fallback "A"
        "B.": ("B", True, True),
        "": ("A", False, False),
        " B": ("B", True, True),
        "b. she picks up the cup": ("A", False, False),
        "B。": ("B", True, True),
        "（B）": ("B", True, True),
        LONG: ("B", True, True),  # the B of "Based"
        "she picks up the cup": ("A", False, False),
        "Answer: C": ("C", False, True),  # "Answer:" is a prefix there
    },
    # lmms-eval videomme/utils.py -> mcq_extract.extract_mcq_answer(choices A-D): highest-priority format
    # (start 10, end 9, phrase 7, "(B)" 6, "B." 5, ...), "" when no capital choice letter at all.
    ("videomme", "lmms_eval"): {
        "(B)": ("B", True, True),
        "The answer is B": ("B", True, True),  # end
        "B": ("B", True, True),  # start
        "b": (None, False, False),
        "B.": ("B", True, True),
        "": (None, False, False),
        " B": ("B", True, True),
        "b. she picks up the cup": (None, False, False),
        "B。": ("B", True, True),  # start: "。" is not alphabetic
        "（B）": ("B", True, True),  # fallback: any occurrence
        LONG: ("B", True, True),  # fallback: the B of "Based"
        "she picks up the cup": (None, False, False),
        "Answer: C": ("C", False, True),  # end
    },
    # official check_answer again, gt = "B. " + candidates[correct_choice] (LongVideoBenchDataset).
    ("longvideobench", "official"): {
        "(B)": (None, False, False),
        "The answer is B": (None, False, False),
        "B": ("B", True, True),
        "b": ("B", True, True),
        "B.": ("B", True, True),
        "": (None, True, False),
        " B": ("B", True, True),
        "b. she picks up the cup": ("B", True, True),
        "B。": (None, False, False),
        "（B）": (None, False, False),
        LONG: ("B", True, True),
        "she picks up the cup": (None, False, False),
        "Answer: C": (None, False, False),
    },
    # lmms-eval longvideobench/utils.py parse_multi_choice_response: strip, remove prefixes,
    # `re.search(r"[ABCDE]", s)`, random.choice when none.
    ("longvideobench", "lmms_eval"): {
        "(B)": ("B", True, True),
        "The answer is B": ("B", True, True),
        "B": ("B", True, True),
        "b": ("D", False, False),
        "B.": ("B", True, True),
        "": ("D", False, False),
        " B": ("B", True, True),
        "b. she picks up the cup": ("D", False, False),
        "B。": ("B", True, True),
        "（B）": ("B", True, True),
        LONG: ("B", True, True),
        "she picks up the cup": ("D", False, False),
        "Answer: C": ("A", False, True),  # "Answer:" is no prefix there: the A of "Answer"
    },
    # lmms-eval mlvu/utils.py -> extract_mcq_answer(choices A-D), exact comparison.
    ("mlvu", "lmms_eval"): {
        "(B)": ("B", True, True),
        "The answer is B": ("B", True, True),
        "B": ("B", True, True),
        "b": (None, False, False),
        "B.": ("B", True, True),
        "": (None, False, False),
        " B": ("B", True, True),
        "b. she picks up the cup": (None, False, False),
        "B。": ("B", True, True),
        "（B）": ("B", True, True),
        LONG: ("B", True, True),
        "she picks up the cup": (None, False, False),
        "Answer: C": ("C", False, True),
    },
    # Slow-Fast fork mvbench/utils.py: the same mcq_acc as lmms-eval (answers not stripped by the wrapper,
    # process() strips itself).
    ("mvbench", "slowfast"): {},  # filled below from ("mvbench", "lmms_eval")
    # Slow-Fast fork nextqa/utils.py: the same parse_multi_choice_response.
    ("nextqa_mc", "slowfast"): {},  # filled below from ("nextqa_mc", "lmms_eval")
    # Slow-Fast fork videomme/utils.py extract_characters_regex: the official prefix list (without
    # "Answer:"/"Option:"...) and "" instead of "A".
    ("videomme", "slowfast"): {
        "(B)": ("B", True, True),
        "The answer is B": ("B", True, True),
        "B": ("B", True, True),
        "b": (None, False, False),
        "B.": ("B", True, True),
        "": (None, False, False),
        " B": ("B", True, True),
        "b. she picks up the cup": (None, False, False),
        "B。": ("B", True, True),
        "（B）": ("B", True, True),
        LONG: ("B", True, True),
        "she picks up the cup": (None, False, False),
        "Answer: C": ("A", False, True),  # the A of "Answer"
    },
    # Slow-Fast fork longvideobench/utils.py: MMMU-style parse_multi_choice_response (like NExT-QA).
    ("longvideobench", "slowfast"): {
        "(B)": ("B", True, True),
        "The answer is B": ("B", True, True),
        "B": ("B", True, True),
        "b": ("D", False, False),
        "B.": ("B", True, True),
        "": ("D", False, False),
        " B": ("B", True, True),
        "b. she picks up the cup": ("B", True, True),
        "B。": ("D", False, False),
        "（B）": ("D", False, False),
        LONG: ("B", True, True),
        "she picks up the cup": ("D", False, False),
        "Answer: C": ("C", False, True),
    },
    # Slow-Fast fork mlvu/utils.py extract_characters_regex: s.strip(); the character before the first ")"
    # if any, else s[0]; exact comparison (IndexError on "" upstream).
    ("mlvu", "slowfast"): {
        "(B)": ("B", True, True),
        "The answer is B": ("T", False, False),
        "B": ("B", True, True),
        "b": ("b", False, False),  # "b" != "B"
        "B.": ("B", True, True),
        "": (None, False, False),  # upstream IndexError: recorded as a crash
        " B": ("B", True, True),
        "b. she picks up the cup": ("b", False, False),
        "B。": ("B", True, True),
        "（B）": ("（", False, False),  # a full-width ")" is not ")"
        LONG: ("B", True, True),
        "she picks up the cup": ("s", False, False),
        "Answer: C": ("A", False, True),
    },
}
EXPECTED[("mvbench", "slowfast")] = EXPECTED[("mvbench", "lmms_eval")]
EXPECTED[("nextqa_mc", "slowfast")] = EXPECTED[("nextqa_mc", "lmms_eval")]

CASES = [(benchmark, protocol, response, expected)
         for (benchmark, protocol), table in EXPECTED.items() for response, expected in table.items()]


def test_every_benchmark_protocol_pair_is_covered():
    pairs = {(b, p) for b in ("mvbench", "nextqa_mc", "videomme", "longvideobench", "mlvu")
             for p in ("official", "lmms_eval", "slowfast")} - {("mlvu", "official")}
    assert set(EXPECTED) == pairs
    assert all(len(table) == 13 for table in EXPECTED.values())


@pytest.mark.parametrize("benchmark,protocol,response,expected", CASES,
                         ids=[f"{b}-{p}-{r[:12]!r}" for b, p, r, _ in CASES])
def test_score_response_matches_upstream(benchmark, protocol, response, expected):
    options = NEXTQA_OPTIONS if benchmark == "nextqa_mc" else OPTIONS
    score = score_response(benchmark=benchmark, protocol=protocol, response=response, options=options,
                           answer="B", rng=random.Random(0))
    assert (score.predicted, score.correct, score.parsed) == expected


def test_official_nextqa_leading_whitespace_is_recorded_as_a_crash():
    # next_qa.py evaluate: `line['pred'][0].strip().lower()[0]` raises IndexError when pred starts with
    # whitespace. score_response strips first (generate(decode_text=True) did), so only the raw
    # evaluate step shows it; it is recorded as unparsed and wrong, with the reason.
    score = _official_nextqa(" B", NEXTQA_OPTIONS, "B")
    assert (score.predicted, score.correct, score.parsed) == (None, False, False)
    assert "IndexError" in score.note
    assert _official_nextqa("", NEXTQA_OPTIONS, "B").note.endswith('"X"')


def test_slowfast_mlvu_crashes_are_recorded():
    for response in ("", ")B", "  "):
        score = score_response(benchmark="mlvu", protocol="slowfast", response=response, options=OPTIONS, answer="B")
        assert score == Score(predicted=None, correct=False, parsed=False, note=score.note)
        assert "IndexError" in score.note


def test_official_check_answer_crashes_on_an_empty_option_text():
    score = score_response(benchmark="mvbench", protocol="official", response="B", options=["x", ""], answer="B")
    assert (score.correct, score.parsed) == (False, False) and "IndexError" in score.note


def test_official_check_answer_drops_one_trailing_dot_of_the_option():
    # gt_content "she picks up the cup." loses its final "." before the content search
    options = ["he opens the door", "she picks up the cup.", "they sit down"]
    score = score_response(benchmark="longvideobench", protocol="official", response="So she picks up the cup",
                           options=options, answer="B")
    assert score.correct and score.predicted == "B"


def test_official_videomme_fallback_a_counts_when_the_truth_is_a():
    score = score_response(benchmark="videomme", protocol="official", response="no idea", options=OPTIONS, answer="A")
    assert (score.predicted, score.correct, score.parsed) == ("A", True, False)
    # more than 10 words and no A-D: the same fallback
    long_no_letter = "the man in the video is clearly doing something quite unusual over there"
    score = score_response(benchmark="videomme", protocol="official", response=long_no_letter, options=OPTIONS,
                           answer="C")
    assert (score.predicted, score.correct, score.parsed) == ("A", False, False)


@pytest.mark.parametrize("benchmark,protocol", [("nextqa_mc", "lmms_eval"), ("longvideobench", "lmms_eval"),
                                                ("nextqa_mc", "slowfast"), ("longvideobench", "slowfast")])
def test_random_fallbacks_are_seedable_and_unparsed(benchmark, protocol):
    options = NEXTQA_OPTIONS if benchmark == "nextqa_mc" else OPTIONS

    def pick(seed):
        return score_response(benchmark=benchmark, protocol=protocol, response="no idea", options=options,
                              answer="B", rng=random.Random(seed))

    assert pick(5) == pick(5)
    picks = {pick(seed).predicted for seed in range(40)}
    assert picks == set("ABCDE"[:len(options)])  # a uniform choice over the options, as random.choice
    assert not any(pick(seed).parsed for seed in range(10))
    assert {pick(seed).correct for seed in range(40)} == {True, False}  # a lucky pick still counts


def test_lmms_eval_nextqa_prefers_the_last_bracketed_letter():
    # several "(X)" candidates: the one with the largest rfind wins (np.argmax)
    score = score_response(benchmark="nextqa_mc", protocol="lmms_eval", response="(A) is wrong, (B) is right",
                           options=NEXTQA_OPTIONS, answer="B")
    assert (score.predicted, score.correct, score.parsed) == ("B", True, True)


def test_mcq_extract_phrase_and_chinese():
    cases = {"我选B": "B", "答案是C": "C", "The best answer is: (D)": "D", "I choose A because": "A"}
    for response, letter in cases.items():
        score = score_response(benchmark="videomme", protocol="lmms_eval", response=response, options=OPTIONS,
                               answer=letter)
        assert (score.predicted, score.correct) == (letter, True), response


def test_bad_calls_are_one_line_input_errors():
    with pytest.raises(InputError, match="official mPLUG-Owl3 evaluation defines no MLVU task; use --protocol "
                                         "lmms_eval") as info:
        score_response(benchmark="mlvu", protocol="official", response="B", options=OPTIONS, answer="B")
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="unknown benchmark"):
        score_response(benchmark="egoschema", protocol="official", response="B", options=OPTIONS, answer="B")
    with pytest.raises(InputError, match="unknown protocol"):
        score_response(benchmark="mvbench", protocol="vlmevalkit", response="B", options=OPTIONS, answer="B")
    with pytest.raises(InputError, match="option letters ABCD"):
        score_response(benchmark="mvbench", protocol="official", response="B", options=OPTIONS, answer="E")
    with pytest.raises(InputError, match="non-empty list"):
        score_response(benchmark="mvbench", protocol="official", response="B", options=[], answer="A")
