"""Answer extraction and scoring, one function per published protocol, quirks included.

Each ``_<protocol>_<benchmark>`` scorer reproduces the decision of the named upstream function byte for
byte (read, not copied: the facts and strings carry over, the code is ours):

* ``official``  — X-PLUG/mPLUG-Owl@0f3068f ``mPLUG-Owl3/evaluation/tasks/task_define/``: ``mvbench.py``
  ``check_answer`` (MVBench), ``next_qa.py`` ``NextQATask.postprocess/evaluate`` (NExT-QA),
  ``VideoMMEBench.extract_characters_regex`` (Video-MME), ``check_answer`` (LongVideoBench).
* ``lmms_eval`` — EvolvingLMMs-Lab/lmms-eval@75571cf ``lmms_eval/tasks/{mvbench,nextqa,videomme,
  longvideobench,mlvu}/utils.py`` and ``_task_utils/mcq_extract.py``.
* ``slowfast``  — the Slow-Fast authors' lmms-eval fork, SHI-Labs/Slow-Fast-Video-Multimodal-LLM@69676a1
  ``lmms_eval/tasks/*/utils.py``.

A :class:`Score` says what the protocol decided (``correct``), which letter it extracted (``predicted``)
and whether the extraction really parsed the answer (``parsed``). ``parsed`` is False for every protocol
fallback — Video-MME official's "A", lmms-eval's random pick (NExT-QA, LongVideoBench; pass ``rng`` to
make it reproducible), an empty extraction — and where the upstream code would crash: then the question
is recorded as ``predicted=None, correct=False, parsed=False`` with the reason in ``note`` (upstream the
whole evaluation would stop with an IndexError instead).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from owlvid.errors import InputError

__all__ = ["Score", "score_response", "letters"]

BENCHMARKS = ("mvbench", "nextqa_mc", "videomme", "longvideobench", "mlvu")
PROTOCOLS = ("official", "lmms_eval", "slowfast")
MLVU_OFFICIAL_ERROR = ("the official mPLUG-Owl3 evaluation defines no MLVU task; use --protocol lmms_eval "
                       "(or slowfast)")


@dataclass(frozen=True)
class Score:
    predicted: str | None  # the extracted letter ("A".."E"...), None where the protocol produces none
    correct: bool | None  # the protocol's own verdict, quirks included (None only for open-ended VQA)
    parsed: bool  # False for fallbacks (official Video-MME "A", lmms-eval random pick), empty extractions, crashes
    note: str = ""  # why a verdict is unusual (quirk or upstream crash), empty otherwise
    score: float | None = None  # image tables: the VQA score in [0, 1] (open-ended VQA), else 1.0/0.0


def letters(n: int) -> list[str]:
    """The option letters of ``n`` options: A, B, C, ..."""
    return [chr(ord("A") + i) for i in range(n)]


def _check_options(options: list[str], answer: str) -> int:
    if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
        raise InputError("options must be a non-empty list of option texts")
    if answer not in letters(len(options)):
        raise InputError(f"answer must be one of the option letters {''.join(letters(len(options)))}, got {answer!r}")
    return ord(answer) - ord("A")


def _crash(note: str) -> Score:
    return Score(predicted=None, correct=False, parsed=False, note=note)


# ---------------------------------------------------------------------------------------------- official

def _official_check_answer(response: str, options: list[str], answer: str) -> Score:
    """mvbench.py / next_qa.py ``check_answer(predict, gt_answer)`` with gt_answer = "B. <option text>"
    (``qa_template`` for MVBench, ``LongVideoBenchDataset.__getitem__`` for LongVideoBench).

    Correct when the first space-separated word of the lowercased answer, without dots, is a *substring*
    of "b." (so "", ".", "b", "b." are correct and "(b)", "b。", "answer:" are not), or else when the option
    text (one trailing dot removed) occurs in the rest of the answer after its first word."""
    index = ord(answer) - ord("A")
    gt_answer = f"{answer}. {options[index]}".lower()
    words = response.lower().split(" ")
    pred_option, pred_content = words[0], " ".join(words[1:])
    gt_words = gt_answer.split(" ")
    gt_option, gt_content = gt_words[0], " ".join(gt_words[1:])
    if gt_content == "":
        return _crash("official check_answer raises IndexError (gt_content[-1]) on an empty option text")
    if gt_content[-1] == ".":
        gt_content = gt_content[:-1]
    first = pred_option.replace(".", "").strip()
    if first in gt_option:
        if first == "":
            # Quirk: the empty string is a substring of everything, so an empty first word is "correct".
            return Score(predicted=None, correct=True, parsed=False,
                         note="official check_answer counts an empty first word as correct")
        return Score(predicted=answer, correct=True, parsed=True)
    if gt_content.strip() in pred_content:
        return Score(predicted=answer, correct=True, parsed=True,
                     note="official check_answer matched the option text after the first word")
    other = first.upper()
    if other in letters(len(options)):
        return Score(predicted=other, correct=False, parsed=True)
    return Score(predicted=None, correct=False, parsed=False)


def _official_nextqa(response: str, options: list[str], answer: str) -> Score:
    """next_qa.py: ``postprocess`` turns an empty answer into "X"; ``evaluate`` predicts
    ``pred[0].strip().lower()[0]`` (the first character, lowercased) and compares it with the lowercased
    letter. A first character that is whitespace makes that expression raise IndexError."""
    if len(response) == 0:
        return Score(predicted=None, correct=False, parsed=False, note='official postprocess: empty answer -> "X"')
    first = response[0].strip().lower()
    if first == "":
        return _crash("official NExT-QA evaluate raises IndexError on an answer starting with whitespace")
    char = first[0]
    predicted = char.upper() if char in "abcdefghijklmnopqrstuvwxyz" else char
    return Score(predicted=predicted, correct=char == answer.lower(),
                 parsed=predicted in letters(len(options)))


_OFFICIAL_VIDEOMME_PREFIXES = [
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    # Two missing commas upstream: these two entries are each one concatenated string.
    "The best option is" "The correct option is",
    "Best answer:" "Best option:",
    "Answer:",
    "Option:",
    "The correct answer",
    "The correct option",
]


def _official_videomme(response: str, options: list[str], answer: str) -> Score:
    """next_qa.py ``VideoMMEBench.extract_characters_regex``: strip, remove the answer prefixes, then the
    first capital A-D anywhere; "A" when there is none (or more than 10 words without one). That "A" is a
    fallback: scored as the official code does (correct when the truth is A) but counted as unparsed."""
    s = response.strip()
    for prefix in _OFFICIAL_VIDEOMME_PREFIXES:
        s = s.replace(prefix, "")
    if len(s.split()) > 10 and not re.search("[ABCD]", s):
        return Score(predicted="A", correct=answer == "A", parsed=False,
                     note='official Video-MME fallback "A" (more than 10 words, no A-D)')
    match = re.search(r"[ABCD]", s)
    if match is None:
        return Score(predicted="A", correct=answer == "A", parsed=False, note='official Video-MME fallback "A"')
    return Score(predicted=match[0], correct=match[0] == answer, parsed=True)


# --------------------------------------------------------------------------------------------- lmms-eval

_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: upstream's lookbehind typo is a lookahead
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_OPTION_LINE = re.compile(r"^([A-E])\.\s*(.+)$", re.IGNORECASE)


def _mcq_acc_process(text: str) -> str:
    """mvbench/utils.py ``mcq_acc.process`` (same in the Slow-Fast fork)."""
    match = _OPTION_LINE.match(text.strip())
    if match:
        return match.group(1).upper()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or (re.search(_COMMA_STRIP, text) is not None):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out, re.UNICODE)  # sic: re.UNICODE (32) lands in sub()'s count argument
    out = out.strip("'").strip('"').strip(")").strip("(").strip().lower()
    letter = re.search(r"\b([A-E])\b", out, re.IGNORECASE)
    return letter.group(1).upper() if letter else out


def _lmms_mvbench(response: str, options: list[str], answer: str) -> Score:
    """mvbench/utils.py ``mvbench_process_results`` -> ``mcq_acc(gt_letter, pred)``: both sides go through
    ``process``; equal strings score 1. (The aggregate skips raw-empty answers: Protocol.overall.)"""
    pred = _mcq_acc_process(response)
    gt = _mcq_acc_process(answer)
    parsed = len(pred) == 1 and pred in "ABCDE"
    return Score(predicted=pred if parsed else None, correct=pred == gt, parsed=parsed,
                 note="" if response != "" else "lmms-eval MVBench leaves empty answers out of the accuracy")


def _mmmu_parse(response: str, options: list[str], rng: random.Random | None) -> tuple[str, bool]:
    """nextqa/utils.py ``parse_multi_choice_response`` (MMMU style; the Slow-Fast fork uses the same one for
    LongVideoBench). Returns (letter, parsed); a random choice when nothing matches."""
    all_choices = letters(len(options))
    index2ans = {letter: text for letter, text in zip(all_choices, options)}
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    response = " " + response + " "
    index_ans, ans_with_brack = True, False
    candidates: list[str] = []
    for choice in all_choices:
        if f"({choice})" in response:
            candidates.append(choice)
            ans_with_brack = True
    if not candidates:
        candidates = [c for c in all_choices if f"{c} " in response]
    if not candidates:
        candidates = [c for c in all_choices if f"{c}." in response]
    if not candidates and len(response.split()) > 5:
        for index, ans in index2ans.items():
            if ans.lower() in response.lower():
                candidates.append(index)
                index_ans = False
    if not candidates:
        return (rng or random).choice(all_choices), False
    if len(candidates) == 1:
        return candidates[0], True
    if index_ans and ans_with_brack:
        starts = [response.rfind(f"({c})") for c in candidates]
    elif index_ans:
        starts = [response.rfind(f" {c} ") for c in candidates]
    else:
        starts = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    return candidates[starts.index(max(starts))], True  # np.argmax: the first of the maxima


def _lmms_nextqa(response: str, options: list[str], answer: str, rng: random.Random | None) -> Score:
    """nextqa/utils.py ``nextqa_mc_process_results``: options are ``a{i}.strip()``; exact letter match."""
    letter, parsed = _mmmu_parse(response, [o.strip() for o in options], rng)
    return Score(predicted=letter, correct=letter == answer, parsed=parsed,
                 note="" if parsed else "lmms-eval random choice (nothing parsed)")


_ANSWER_PHRASES = [
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
    "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
    "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select",
    "i pick", "my answer is", "my choice is",
    "옵션", "정답은", "답은", "답:",
    "答案是", "答案为", "选",
    "答えは",
]
_FORMAT_PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4,
                    "right_paren": 3, "space": 2, "fallback": 0}


def extract_mcq_answer(response: str, choices: list[str]) -> str:
    """_task_utils/mcq_extract.py ``extract_mcq_answer``: every candidate format found, the one with the
    highest priority wins, the last position within a format; "" when no choice letter occurs at all."""
    if not response or not response.strip():
        return ""
    text = response.strip()
    for char in [",", ".", "!", "?", ";", ":", "'", '"']:
        text = text.strip(char)
    text = " " + text + " "
    found: list[tuple[str, int, str]] = []
    for pattern, kind in (("({})", "parentheses"), ("{}.", "period"), ("{}:", "colon"), ("{})", "right_paren"),
                          ("{} ", "space")):
        for ch in choices:
            if pattern.format(ch) in text:
                found.append((ch, text.rfind(pattern.format(ch)), kind))
    lower = text.lower()
    for phrase in _ANSWER_PHRASES:
        idx = lower.find(phrase)
        if idx != -1:
            for ch in choices:
                pos = text.find(ch, idx + len(phrase))
                if pos != -1:
                    found.append((ch, pos, "phrase"))
    stripped = text.strip()
    for ch in choices:
        if stripped.startswith(ch) and (len(stripped) == 1 or not stripped[1].isalpha()):
            found.append((ch, 0, "start"))
    for ch in choices:
        if stripped.endswith(ch) and (len(stripped) == 1 or not stripped[-2].isalpha()):
            found.append((ch, len(text) - 1, "end"))
    if not found:
        found = [(ch, text.rfind(ch), "fallback") for ch in choices if ch in text]
    if not found:
        return ""
    found.sort(key=lambda c: (_FORMAT_PRIORITY[c[2]], c[1]), reverse=True)  # stable, as upstream
    return found[0][0]


def _lmms_videomme(response: str, options: list[str], answer: str) -> Score:
    """videomme/utils.py ``videomme_process_results``: ``extract_mcq_answer(pred, ["A","B","C","D"])``,
    case-insensitive comparison with the truth; "" (nothing found) is wrong and unparsed."""
    pred = extract_mcq_answer(response, ["A", "B", "C", "D"])
    return Score(predicted=pred or None, correct=pred.lower() == answer.lower(), parsed=pred != "")


def _lmms_mlvu(response: str, options: list[str], answer: str) -> Score:
    """mlvu/utils.py ``mlvu_process_results``: ``extract_mcq_answer(pred, ["A","B","C","D"])``, exact
    comparison with the truth letter."""
    pred = extract_mcq_answer(response, ["A", "B", "C", "D"])
    return Score(predicted=pred or None, correct=pred == answer, parsed=pred != "")


_LVB_PREFIXES = ["The best answer is", "The correct answer is", "The answer is", "The answer",
                 "The best option is", "The correct option is", "Best answer:", "Best option:"]


def _lmms_longvideobench(response: str, options: list[str], answer: str, rng: random.Random | None) -> Score:
    """longvideobench/utils.py ``parse_multi_choice_response``: strip, remove the prefixes, a random choice
    when more than 10 words and no A-E, else the first capital A-E anywhere (E even with 4 options), else a
    random choice."""
    s = response.strip()
    for prefix in _LVB_PREFIXES:
        s = s.replace(prefix, "")
    match = None if (len(s.split()) > 10 and not re.search("[ABCDE]", s)) else re.search(r"[ABCDE]", s)
    if match is None:
        letter = (rng or random).choice(letters(len(options)))
        return Score(predicted=letter, correct=letter == answer, parsed=False,
                     note="lmms-eval random choice (nothing parsed)")
    return Score(predicted=match[0], correct=match[0] == answer, parsed=True)


# ---------------------------------------------------------------------------------- Slow-Fast lmms fork

_SLOWFAST_VIDEOMME_PREFIXES = [
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option is" "The correct option is",  # sic: implicit concatenation upstream
    "Best answer:" "Best option:",
]


def _slowfast_videomme(response: str, options: list[str], answer: str) -> Score:
    """Fork videomme/utils.py ``extract_characters_regex``: like the official one but "" instead of "A"
    when nothing matches; exact comparison with the truth letter."""
    s = response.strip()
    for prefix in _SLOWFAST_VIDEOMME_PREFIXES:
        s = s.replace(prefix, "")
    if len(s.split()) > 10 and not re.search("[ABCD]", s):
        return Score(predicted=None, correct=False, parsed=False)
    match = re.search(r"[ABCD]", s)
    if match is None:
        return Score(predicted=None, correct=False, parsed=False)
    return Score(predicted=match[0], correct=match[0] == answer, parsed=True)


def _slowfast_longvideobench(response: str, options: list[str], answer: str, rng: random.Random | None) -> Score:
    """Fork longvideobench/utils.py: the MMMU-style ``parse_multi_choice_response`` (random when nothing)."""
    letter, parsed = _mmmu_parse(response, options, rng)
    return Score(predicted=letter, correct=letter == answer, parsed=parsed,
                 note="" if parsed else "random choice (nothing parsed)")


def _slowfast_mlvu(response: str, options: list[str], answer: str) -> Score:
    """Fork mlvu/utils.py ``extract_characters_regex``: strip; the character before the first ")" if there
    is one, else the first character. Raises IndexError upstream on an empty answer or a leading ")"."""
    s = response.strip()
    if ")" in s:
        index = s.index(")")
        before = s[index - 1:index]
        if before == "":
            return _crash('Slow-Fast MLVU extractor raises IndexError on an answer starting with ")"')
        pred = before[0]
    elif s == "":
        return _crash("Slow-Fast MLVU extractor raises IndexError on an empty answer")
    else:
        pred = s[0]
    return Score(predicted=pred, correct=pred == answer, parsed=pred in letters(len(options)))


_Scorer = Callable[[str, list[str], str, "random.Random | None"], Score]

_SCORERS: dict[tuple[str, str], _Scorer] = {
    ("mvbench", "official"): lambda r, o, a, g: _official_check_answer(r, o, a),
    ("longvideobench", "official"): lambda r, o, a, g: _official_check_answer(r, o, a),
    ("nextqa_mc", "official"): lambda r, o, a, g: _official_nextqa(r, o, a),
    ("videomme", "official"): lambda r, o, a, g: _official_videomme(r, o, a),
    ("mvbench", "lmms_eval"): lambda r, o, a, g: _lmms_mvbench(r, o, a),
    ("nextqa_mc", "lmms_eval"): _lmms_nextqa,
    ("videomme", "lmms_eval"): lambda r, o, a, g: _lmms_videomme(r, o, a),
    ("longvideobench", "lmms_eval"): _lmms_longvideobench,
    ("mlvu", "lmms_eval"): lambda r, o, a, g: _lmms_mlvu(r, o, a),
    ("mvbench", "slowfast"): lambda r, o, a, g: _lmms_mvbench(r, o, a),  # same mcq_acc in the fork
    ("nextqa_mc", "slowfast"): _lmms_nextqa,  # same parse_multi_choice_response in the fork
    ("videomme", "slowfast"): lambda r, o, a, g: _slowfast_videomme(r, o, a),
    ("longvideobench", "slowfast"): _slowfast_longvideobench,
    ("mlvu", "slowfast"): lambda r, o, a, g: _slowfast_mlvu(r, o, a),
}

# What the protocol's generation path does to the decoded text before scoring: the official
# `generate(decode_text=True)` ends with `.strip()`; owlvid's lmms-eval wrapper strips like lmms-eval's
# llava_vid; the Slow-Fast fork's wrapper returns `batch_decode(...)[0]` unstripped.
STRIPS_RESPONSE = {"official": True, "lmms_eval": True, "slowfast": False}


def check_benchmark_protocol(benchmark: str, protocol: str) -> None:
    """One-line InputError for an unknown benchmark/protocol or the combination that does not exist."""
    if benchmark not in BENCHMARKS:
        raise InputError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if (benchmark, protocol) == ("mlvu", "official"):
        raise InputError(MLVU_OFFICIAL_ERROR)


def score_response(*, benchmark: str, protocol: str, response: str, options: list[str] | None = None,
                   answer: str | None = None, answers: list[str] | None = None,
                   rng: random.Random | None = None) -> Score:
    """Score one model answer as ``protocol`` scores ``benchmark`` questions.

    Image tables (``image_scoring.IMAGE_BENCHMARKS``): open-ended VQA (vqav2, okvqa, textvqa, vizwiz_vqa) take
    ``answers`` (the annotators' answers) and return ``.score`` in [0, 1] with ``.predicted`` the normalised answer
    (``correct`` None); gqa takes ``answer`` (the ground truth), pope and nlvr2 ``answer`` "yes"/"no"; the
    multiple-choice ones take ``options`` and the letter ``answer``. VQAv2 and VizWiz score their test split on a
    server: the local VQA score of the same post-processed answer is returned (what VQAEval computes on val).

    ``response``: the model's decoded answer text (owlvid's ``Generation.text``); the protocol's own
    post-processing (``STRIPS_RESPONSE``) is applied here. ``options``: the option texts without letters,
    in order. ``answer``: the ground-truth letter. ``rng``: the random source of lmms-eval's "random
    choice" fallbacks (Python's global ``random`` when None, as upstream)."""
    if benchmark not in BENCHMARKS:
        from .image_scoring import IMAGE_BENCHMARKS, score_image_response  # imports this module: no cycle at load

        if benchmark in IMAGE_BENCHMARKS:
            return score_image_response(benchmark=benchmark, protocol=protocol, response=response, options=options,
                                        answer=answer, answers=answers, rng=rng)
        raise InputError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS + IMAGE_BENCHMARKS)}")
    check_benchmark_protocol(benchmark, protocol)
    _check_options(options, answer)
    if not isinstance(response, str):
        raise InputError(f"response must be a string, got {type(response).__name__}")
    text = response.strip() if STRIPS_RESPONSE[protocol] else response
    return _SCORERS[(benchmark, protocol)](text, options, answer, rng)
