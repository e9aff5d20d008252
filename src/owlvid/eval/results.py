"""Accuracy from prediction lines: overall, per category, the protocol's headline score, and the table.

The headline score is the number the protocol reports (`Protocol.overall_accuracy`: the share of correct
answers, except lmms-eval's MVBench, which leaves empty answers out, and MLVU, the mean of the task
accuracies). Questions that failed (a missing video ...) are not scored; their number is reported next to
the accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .datasets import Question
from .protocols import Protocol
from .scoring import Score

# the categories reported per benchmark (fields of Question.categories)
CATEGORY_FIELDS = {
    "mvbench": ("task",),
    "nextqa_mc": ("type", "group"),
    "videomme": ("duration", "domain", "task_type"),
    "longvideobench": ("question_category", "duration_group"),
    "mlvu": ("task",),
}

# mPLUG-Owl3 model card (docs/evaluation.md): benchmark -> score
PUBLISHED = {
    "mPLUG-Owl3-7B-240728": {"nextqa_mc": 78.6, "mvbench": 54.5, "videomme": 53.5, "longvideobench": 52.1,
                             "mlvu": 63.7},
    "mPLUG-Owl3-7B-241101": {"nextqa_mc": 82.3, "mvbench": 59.5, "videomme": 59.3, "longvideobench": 59.7,
                             "mlvu": 70.0},
}
BENCHMARK_TITLES = {"nextqa_mc": "NExT-QA (MC)", "mvbench": "MVBench", "videomme": "Video-MME w/o sub",
                    "longvideobench": "LongVideoBench val", "mlvu": "MLVU dev"}


def _pct(correct: int, total: int) -> float | None:
    return round(100.0 * correct / total, 2) if total else None


def summarize(proto: Protocol, questions: Sequence[Question], records: Sequence[dict], run_info: dict[str, Any],
              selection: dict[str, Any]) -> dict[str, Any]:
    """results.json for the selected `questions` from the prediction `records` (the last line of a question
    counts: a failed question answered on a later run is scored)."""
    selected = {q.qid for q in questions}
    latest: dict[str, dict] = {}
    for r in records:
        if r.get("qid") in selected:
            latest[r["qid"]] = r
    scored = [r for r in latest.values() if r.get("error") is None]
    failed = [r for r in latest.values() if r.get("error") is not None]
    benchmark = run_info["benchmark"]
    correct = sum(bool(r["correct"]) for r in scored)
    categories: dict[str, dict[str, dict]] = {}
    for name in CATEGORY_FIELDS[benchmark]:
        table: dict[str, list[int]] = {}
        for r in scored:
            cell = table.setdefault(str(r.get(f"category_{name}", "")), [0, 0])
            cell[0] += bool(r["correct"])
            cell[1] += 1
        categories[name] = {k: {"accuracy": _pct(c, n), "correct": c, "total": n}
                            for k, (c, n) in sorted(table.items())}
    scores = [Score(r["predicted"], bool(r["correct"]), bool(r["parsed"])) for r in scored]
    score = round(proto.overall_accuracy(scores, [r["response"] for r in scored], [r["task"] for r in scored]), 2) \
        if scored else None
    return {**run_info, "selection": selection, "questions": len(questions), "scored": len(scored),
            "failed": len(failed),
            "not_run": len(selected) - len(latest), "correct": correct, "accuracy": _pct(correct, len(scored)),
            "score": score, "score_rule": _RULES[proto.overall],
            "unparsed": sum(not r.get("parsed", False) for r in scored),
            "categories": categories,
            "failures": [{"qid": r["qid"], "error": r["error"]} for r in failed][:50]}


_RULES = {"micro": "accuracy over the scored questions", "answered": "accuracy over non-empty answers",
          "task_mean": "mean of the task accuracies"}


def format_table(results: dict[str, Any]) -> str:
    """The printed summary of one run."""
    model = results["model"]
    settings = results["settings"]
    lines = [
        f"{BENCHMARK_TITLES.get(results['benchmark'], results['benchmark'])} - protocol {results['protocol']} "
        f"({results['protocol_source']})",
        f"model {model['name']} [{model['architecture']}, fingerprint {model['fingerprint']}, {model['dtype']} on "
        f"{model['device']}], owlvid {results['owlvid_version']}",
        f"frames: {settings['num_frames']} by {settings['frame_choice']} (as {settings['frames_as']}); "
        f"generation: {_options(settings['generation'])}",
        "",
        f"score {_num(results['score'])}  ({results['score_rule']})",
        f"accuracy {_num(results['accuracy'])}: {results['correct']} / {results['scored']} scored; "
        f"{results['unparsed']} unparsed answer(s); {results['failed']} failed question(s)"
        + (f"; {results['not_run']} not run" if results["not_run"] else ""),
    ]
    for name, table in results["categories"].items():
        if not table:
            continue
        width = max(len(k) for k in table)
        lines += ["", f"{name:<{width}}  accuracy  correct/total"]
        lines += [f"{k:<{width}}  {_num(v['accuracy']):>8}  {v['correct']}/{v['total']}" for k, v in table.items()]
    lines += [f"note: {note}" for note in results.get("notes", [])]
    for f in results["failures"][:5]:
        lines.append(f"failed {f['qid']}: {f['error']}")
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _options(generation: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in generation.items()) or "model defaults"
