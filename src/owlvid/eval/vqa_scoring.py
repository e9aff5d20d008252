"""Open-ended and yes/no answers of the image tables: VQA score, GQA, POPE, NLVR2, as each protocol scores them.

Reproduced from (facts and strings carried over, the code is ours):

* ``official``  — X-PLUG/mPLUG-Owl@0f3068f ``mPLUG-Owl3/evaluation/``: ``tasks/task_define/vqa.py``
  (``ds_collections[*]["ds_post_process"]``, ``VQATask.evaluate``: GQA's rules, POPE's
  ``calculate_metrics_from_lists``), ``vqa_utils/vqa_eval.py`` (``VQAEval``: the VQA score),
  ``vqa_utils/evalai_processor.py`` (``EvalAIAnswerProcessor``), ``tasks/task_define/mmbench.py``
  (``NLVR2Bench.evaluate``).
* ``lmms_eval``  — EvolvingLMMs-Lab/lmms-eval@75571cf ``lmms_eval/tasks/{vqav2,ok_vqa,textvqa,vizwiz_vqa,gqa,
  pope}/utils.py`` + yaml, ``_task_utils/vqa_eval_metric.py``, ``api/metrics.py`` (``exact_match_hf_evaluate``).

Every function takes the response as the protocol's generation path hands it over (already stripped: the official
``generate(decode_text=True)`` and lmms-eval's ``process_results`` both strip).
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence

# EvalAI's contraction table (identical in vqa_eval.py, evalai_processor.py and lmms-eval's vqa_eval_metric.py)
_CONTRACTIONS = dict(pair.split("=", 1) for pair in (
    "aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've "
    "couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've "
    "hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd "
    "howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've "
    "it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've "
    "mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've "
    "oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't "
    "shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't "
    "shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've "
    "somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd "
    "someoned've=someone'd've someone'dve=someone'd've someonell=someone'll someones=someone's "
    "somethingd=something'd somethingd've=something'd've something'dve=something'd've "
    "somethingll=something'll thats=that's thered=there'd thered've=there'd've there'dve=there'd've "
    "therere=there're theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll "
    "theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've "
    "werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's whered=where'd "
    "wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's "
    "whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't "
    "wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll "
    "yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've "
    "you'dve=you'd've youll=you'll youre=you're youve=you've").split())
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = ("a", "an", "the")
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: a lookahead where a lookbehind was meant, in every copy
_COMMA_VQAEVAL = re.compile(r"(\d)(,)(\d)")  # vqa_eval.py
_COMMA_EVALAI = re.compile(r"(?<=\d)(\,)+(?=\d)")  # evalai_processor.py / vqa_eval_metric.py ("1,,2" matches too)


def process_punctuation(text: str, comma: re.Pattern = _COMMA_EVALAI) -> str:
    """``processPunctuation``: a mark next to a space (or any text with a digit,digit comma) is deleted, else
    replaced by a space; then every "." not followed by a digit goes (``re.UNICODE`` lands in ``sub``'s count
    argument upstream: at most 32 periods are removed)."""
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or comma.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, re.UNICODE)


def process_digit_article(text: str) -> str:
    """``processDigitArticle``: lowercased words, number words 0-10 as digits, articles dropped, contractions
    restored."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def evalai_process(text: str) -> str:
    """``EvalAIAnswerProcessor.__call__``: lowercase, "," and "?" removed, "'s" -> " 's", then punctuation and
    digits/articles."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(predicted: str, answers: Sequence[str]) -> float:
    """The VQA score: the mean over the annotators of min(1, matches among the *other* annotators / 3). Every
    upstream copy leaves out one annotator by position (official: answer dicts differ by ``answer_id``; lmms-eval
    OK-VQA/TextVQA/VizWiz: ``i != j``; lmms-eval VQAv2: dicts with ``answer_id``)."""
    if not answers:
        return 0.0  # lmms-eval OK-VQA/VizWiz: an empty list scores 0
    accs = [min(1.0, sum(1 for j, a in enumerate(answers) if j != i and a == predicted) / 3)
            for i in range(len(answers))]
    return sum(accs) / len(accs)


# -------------------------------------------------------------------------------------------- VQA score

# official ds_post_process of each dataset (vqa.py ds_collections)
_OFFICIAL_POST = {
    "vqav2": evalai_process,  # vqav2_test: answer_processor(x)
    "okvqa": lambda x: x.strip(),
    "textvqa": lambda x: x.strip(),  # textvqa_val_ocr_v2 (the plan's textvqa_val has no ds_collections entry)
    "vizwiz_vqa": lambda x: x.split(".")[0].split(",")[0].strip(),
}


def official_vqa(benchmark: str, response: str, answers: Sequence[str]) -> tuple[str, float]:
    """vqa.py post-processing, then ``VQAEval.evaluate`` (vqa_eval.py): the answer through processPunctuation and
    processDigitArticle; the annotators' answers through processPunctuation only, and only when they are not all
    the same string (so "Two" never matches "2", and ten identical "yes." never match "yes")."""
    res = _OFFICIAL_POST[benchmark](response)
    res = process_digit_article(process_punctuation(_clean(res), _COMMA_VQAEVAL))
    gts = list(answers)
    if len(set(gts)) > 1:
        gts = [process_punctuation(a, _COMMA_VQAEVAL) for a in gts]
    return res, vqa_accuracy(res, gts)


def lmms_vqa(benchmark: str, response: str, answers: Sequence[str]) -> tuple[str, float]:
    """lmms-eval: VQAv2 (``vqav2_process_results``) cleans and runs process_punctuation + process_digit_article on
    both sides; OK-VQA, TextVQA and VizWiz (``*_process_results``) run the whole EvalAI processor on both."""
    if benchmark == "vqav2":
        def norm(x: str) -> str:
            return process_digit_article(process_punctuation(_clean(x)))
    else:
        norm = evalai_process
    res = norm(response)
    return res, vqa_accuracy(res, [norm(a) for a in answers])


# ------------------------------------------------------------------------------------------------- GQA

def official_gqa(response: str, answer: str) -> tuple[str, bool]:
    """vqa.py ``VQATask.evaluate`` for gqa_testdev ("Accuracy"): first piece before "." "," "!", lowercased, then
    the text after the first "is " / "are " / "a " / "an " / "the " (each a *substring* test: "tea cup" loses its
    "tea"), the text before " of", stripped; case-insensitive exact match."""
    r = response.strip().split(".")[0].split(",")[0].split("!")[0].lower()
    for marker in ("is ", "are ", "a ", "an ", "the "):
        if marker in r:
            r = r.split(marker)[1]
    if " of" in r:
        r = r.split(" of")[0]
    r = r.strip()
    return r, r.strip().lower() == answer.strip().lower()


_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def lmms_gqa(response: str, answer: str) -> tuple[str, bool]:
    """gqa.yaml ``exact_match`` (api/metrics.py ``exact_match_hf_evaluate``): lowercase, ASCII punctuation
    deleted, equal strings."""
    pred = response.lower().translate(_PUNCT_TABLE)
    return pred, pred == answer.lower().translate(_PUNCT_TABLE)


# -------------------------------------------------------------------------------------- POPE and NLVR2

def official_pope_label(response: str) -> str | None:
    """vqa.py: ``x.strip().split('.')[0].split(',')[0]`` then ``.strip().lower()``; "yes"/"no" or None (the
    official label 2, neither)."""
    text = response.strip().split(".")[0].split(",")[0].strip().lower()
    return text if text in ("yes", "no") else None


def lmms_pope_label(response: str) -> str:
    """pope/utils.py ``pope_process_results``: ``results[0].lower().strip()`` (so "Yes." is not "yes")."""
    return response.lower().strip()


def official_nlvr2(response: str) -> str:
    """mmbench.py ``NLVR2Bench.evaluate``: ``pred.split('.')[0].split(',')[0].lower().strip()``."""
    return response.split(".")[0].split(",")[0].lower().strip()


def _div(a: float, b: float) -> float:
    return a / b if b else math.nan


def pope_metrics(protocol: str, responses: Sequence[str], answers: Sequence[str]) -> dict[str, float]:
    """accuracy, precision, recall, f1, yes_ratio (fractions) as the protocol computes them.

    official (vqa.py ``calculate_metrics_from_lists``): answers that are neither yes nor no count in no cell of the
    confusion matrix, so they leave the accuracy's denominator; yes_ratio = predicted yes / all questions. A zero
    denominator raises ZeroDivisionError upstream: NaN here.
    lmms_eval (pope/utils.py): accuracy = exact matches / all; precision and recall from the yes/no cells
    (a "no" answer to a "yes" question is a false negative, anything else is nothing); 0 for a zero
    denominator; yes_ratio is the share of *ground-truth* yes (pope_aggregate_yes_ratio)."""
    gts = [a.strip().lower() for a in answers]
    if protocol == "official":
        preds = [official_pope_label(r) for r in responses]
        tp = sum(p == "yes" and g == "yes" for p, g in zip(preds, gts))
        fp = sum(p == "yes" and g == "no" for p, g in zip(preds, gts))
        fn = sum(p == "no" and g == "yes" for p, g in zip(preds, gts))
        tn = sum(p == "no" and g == "no" for p, g in zip(preds, gts))
        recall, precision = _div(tp, tp + fn), _div(tp, tp + fp)
        f1 = _div(2 * precision * recall, precision + recall)
        return {"accuracy": _div(tp + tn, tp + tn + fp + fn), "precision": precision, "recall": recall, "f1": f1,
                "yes_ratio": _div(sum(p == "yes" for p in preds), len(preds))}
    preds = [lmms_pope_label(r) for r in responses]
    tp = sum(p == "yes" and g == "yes" for p, g in zip(preds, gts))
    fp = sum(p == "yes" and g == "no" for p, g in zip(preds, gts))
    fn = sum(p == "no" and g == "yes" for p, g in zip(preds, gts))
    precision = tp / (tp + fp) if tp + fp > 0 else 0
    recall = tp / (tp + fn) if tp + fn > 0 else 0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0
    yes, no = sum(g == "yes" for g in gts), sum(g == "no" for g in gts)
    return {"accuracy": sum(p == g for p, g in zip(preds, gts)) / len(preds) if preds else 0.0,
            "precision": float(precision), "recall": float(recall), "f1": float(f1),
            "yes_ratio": yes / (yes + no) if yes + no > 0 else 0.0}
