"""Multiple-choice answers of the image and multi-image tables, as each protocol extracts and judges them.

Reproduced from (facts and strings carried over, the code is ours):

* ``official``  — X-PLUG/mPLUG-Owl@0f3068f ``mPLUG-Owl3/evaluation/tasks/task_define/``: ``mmbench.py``
  (``extract_answer`` for MMBench, ``AI2DBench.evaluate``), ``qbench.py`` (``extract_answer``: Q-Bench2),
  ``llava_interleave_bench.py`` (``LlavaInterleaveBenchTask.process`` / ``judge_multi_choice``: the LLaVA-Interleave
  out-domain set, whose Mantis, BLINK, MathVerse and SciVerse subsets are the model card's columns).
* ``lmms_eval``  — EvolvingLMMs-Lab/lmms-eval@75571cf ``lmms_eval/tasks/``: ``ai2d`` (yaml ``MultiChoiceRegexFilter``
  + ``exact_match``), ``mmbench/mmbench_evals.py`` (``can_infer``; the GPT matcher it falls back to is replaced by
  the static ``extract_mcq_answer``, lmms-eval's own no-API method), ``qbench/utils.py``
  (``parse_multi_choice_response``), ``llava_interleave_bench/utils.py`` (``mcq_acc``), ``mantis/utils.py``
  (``get_prediction``), ``blink/utils.py`` (``_extract_answer_letter``).

Each function returns ``(predicted letter or None, correct, note)``; the response arrives stripped.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Sequence

from .scoring import _COMMA_STRIP, _PERIOD_STRIP, _PUNCT, _mcq_acc_process, _mmmu_parse, extract_mcq_answer, letters

Result = tuple[str | None, bool, str]
RANDOM_NOTE = "lmms-eval random choice (nothing parsed)"  # a random letter is a prediction, but not a parsed one


def _letter(text: str | None, n: int) -> str | None:
    return text if text is not None and len(text) == 1 and text in letters(n) else None


# -------------------------------------------------------------------------------------------- official

def _extract_choice(output: str, choices: str) -> str | None:
    """mmbench.py / qbench.py ``extract_choice``: the first of ``choices`` (tried from E down to A) followed by
    one of . , : ) after a word boundary; later letters win ("A. no, B." -> B)."""
    for choice in choices:
        if re.search(rf"\b{choice}[.,:)]", output) or re.search(rf"\b{choice}[.,:)]\b", output):
            return choice
    return None


def official_mmbench(response: str, options: Sequence[str], answer: str) -> Result:
    """mmbench.py ``extract_answer(prediction, options)``: extract_choice, again with a "." appended, then the
    first option whose text contains the answer or is contained in it (an empty answer is in every option: "A"),
    else "X". The options are the ones ``mapping_to_annotation`` keeps: A-D."""
    res = _extract_choice(response, "EDCBA") or _extract_choice(response + ".", "EDCBA")
    note = ""
    if res is None:
        for i, option in enumerate(options[:4]):
            if response.lower() in option.lower() or option.lower() in response.lower():
                res, note = "ABCDEFG"[i], "official extract_answer matched an option text"
                break
    if res is None:
        return None, False, 'official extract_answer: nothing found ("X")'
    return _letter(res, len(options)) or res, res == answer, note


def official_qbench2(response: str, options: Sequence[str], answer: str) -> Result:
    """qbench.py ``extract_answer``: extract_choice (E..A), again with "." appended, else "X"."""
    res = _extract_choice(response, "EDCBA") or _extract_choice(response + ".", "EDCBA")
    if res is None:
        return None, False, 'official extract_answer: nothing found ("X")'
    return res, res == answer, ""


def official_ai2d(response: str, options: Sequence[str], answer: str) -> Result:
    """mmbench.py ``AI2DBench.evaluate`` (use_number False in plans/all.yaml): ``pred[0] == ground_truth[0]``, the
    answer's first character against the letter, case-sensitive ("b" and "(B)" are wrong). An empty answer
    raises IndexError upstream: recorded as wrong."""
    if response == "":
        return None, False, "official AI2D evaluate raises IndexError on an empty answer"
    first = response[0]
    return _letter(first, len(options)), first == answer[0], ""


def _interleave_process(text: str) -> str:
    """llava_interleave_bench.py ``process``."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or re.search(_COMMA_STRIP, text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out, re.UNICODE)
    return out.strip("'").strip('"').strip(")").strip("(").strip().lower()


def official_interleave(response: str, options: Sequence[str], answer: str) -> Result:
    """llava_interleave_bench.py ``evaluate_multichoice``: ``process_sample`` processes both sides, then
    ``judge_multi_choice`` processes them again; a processed answer with ":" becomes its last one-letter piece
    a-h ("answer: b" -> "b"); equal strings are correct. ("B. cat" -> "b cat": wrong.)"""
    gt = _interleave_process(_interleave_process(answer))
    pred = _interleave_process(_interleave_process(response))
    if ":" in pred:
        for piece in (a.strip() for a in pred.split(":")):
            if len(piece) == 1 and piece[-1] in "abcdefgh":
                pred = piece
    return _letter(pred.upper(), len(options)), pred == gt, ""


# ------------------------------------------------------------------------------------------- lmms-eval

_OPTION_START = re.compile(r"^\s*([A-Z])\.")


def lmms_ai2d(response: str, options: Sequence[str], answer: str) -> Result:
    """ai2d.yaml: ``MultiChoiceRegexFilter`` keeps the letter of a leading "X." (else the whole answer), then
    ``exact_match`` with ignore_case and ignore_punctuation against the letter ("(B)" and "b" are right, "B cat"
    is wrong)."""
    match = _OPTION_START.match(response)
    filtered = match.group(1) if match else response
    table = str.maketrans("", "", string.punctuation)
    pred = filtered.strip().lower().translate(table)
    return _letter(pred.upper(), len(options)), pred == answer.lower().translate(table), ""


def _can_infer_option(answer: str) -> str | None:
    """mmbench_evals.py ``can_infer_option`` (num_choice 5: A-E)."""
    choices = "ABCDE"
    if "Failed to obtain answer via API" in answer:
        return None
    splits = [x.strip() for x in answer.split()]

    def count(prefix: str = "", suffix: str = "") -> int:
        return sum(prefix + c + suffix in splits for c in choices)

    if count() == 1:
        for ch in choices:
            if "A" in splits and len(splits) > 3:
                break  # "A might be a quantifier"
            if ch in splits:
                return ch
    for prefix, suffix in (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."),
                           (":", ""), (":", ","), (":", "."), (":", ")"), (":", ").")):
        if count(prefix, suffix) == 1:
            for ch in choices:
                if prefix + ch + suffix in splits:
                    return ch
    return None


def _can_infer_text(answer: str, choices: dict[str, str]) -> str | None:
    answer = answer.lower()
    cands = [k for k, text in choices.items() if str(text).lower() in answer]
    return cands[0] if len(cands) == 1 else None


def lmms_mmbench(response: str, options: Sequence[str], answer: str) -> Result:
    """mmbench_evals.py ``eval_sub_data``: ``prefetch_answer`` = ``can_infer`` (a lone letter token, or one of
    the letter forms "B." "(B)" ":B" ..., else exactly one option text inside the answer; choices A-D); when that
    finds nothing, the static method's ``extract_mcq_answer`` (the API method asks GPT instead)."""
    choices = dict(zip("ABCD", options[:4]))
    pred = _can_infer_option(response) or _can_infer_text(response, choices)
    note = ""
    if pred is None:
        pred = extract_mcq_answer(response, sorted(choices)) or None
        note = "lmms-eval can_infer found nothing: static extract_mcq_answer (the GPT matcher is not run)"
    return pred, pred is not None and pred == answer, note


def lmms_qbench2(response: str, options: Sequence[str], answer: str, rng: random.Random | None) -> Result:
    """qbench/utils.py ``q_bench_process_results``: MMMU ``parse_multi_choice_response`` (random letter when
    nothing matches: pass ``rng``) against ``correct_choice``."""
    letter, parsed = _mmmu_parse(response, list(options), rng)
    return letter, letter == answer, "" if parsed else RANDOM_NOTE


def lmms_interleave(response: str, options: Sequence[str], answer: str) -> Result:
    """llava_interleave_bench/utils.py ``mcq_acc``: both sides through ``process`` (a leading "B." gives "B", else
    the punctuation cleanup and the first standalone letter A-E); equal strings are correct."""
    pred, gt = _mcq_acc_process(response), _mcq_acc_process(answer)
    return _letter(pred, len(options)), pred == gt, ""


def _mantis_parse_answer(raw: str) -> str:
    low = raw.lower()
    for key in ("final answer:", "the answer is", "answer:"):
        if key in low:
            return raw[low.index(key) + len(key):].strip()
    return raw


def lmms_mantis(response: str, options: Sequence[str], answer: str) -> Result:
    """mantis/utils.py ``get_prediction`` (multi-choice): the text after "Final Answer:" / "the answer is" /
    "answer:", then its first letter character, uppercased ("I think B" -> "I"); a letter beyond the options
    falls back to comparing the whole answer with the right option's text."""
    parsed = _mantis_parse_answer(response)
    if re.match(r"Answer: [A-Z]", parsed):
        selected: str | None = parsed[8]
    else:
        selected = next((c.upper() for c in parsed if c.isalpha()), None)
    if selected and ord(selected) - ord("A") < len(options):
        return selected, selected == answer.upper(), ""
    text = options[ord(answer) - ord("A")]
    correct = response.strip() == text.strip()
    return None, correct, "lmms-eval Mantis compared the whole answer with the option text"


def lmms_blink(response: str, options: Sequence[str], answer: str) -> Result:
    """blink/utils.py ``_extract_answer_letter``: ``re.match(r"[\\(\\s]*([A-Z])[\\)\\.\\s]*")`` on the stripped
    answer, case-insensitive: the *first* letter of the answer ("The answer is B" -> "T"); against the truth with
    its parentheses stripped."""
    match = re.match(r"[\(\s]*([A-Z])[\)\.\s]*", response.strip(), flags=re.IGNORECASE)
    pred = match.group(1).upper() if match else ""
    return _letter(pred, len(options)), pred == answer.strip("()"), ""
