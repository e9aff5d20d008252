"""Scores of the image tables from prediction lines, the submission files of server/judge splits, the printed table,
and the model card's published numbers.

Headline score per benchmark (percent):
* VQAv2, OK-VQA, TextVQA, VizWiz: the mean VQA score;
* POPE: official, the mean F1 over the splits run (random, popular, adversarial: three tasks in its plan);
  lmms_eval, the F1 over the whole test split (one task); each split's five metrics alongside;
* MMBench: circular accuracy — a question counts when every circular copy of it (same ``index % 1e6``) is right
  (the official groups by (image, question), which are the same copies);
* LLaVA-Interleave: the mean of its sub-task accuracies; every other benchmark: the accuracy.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .image_datasets import ImageQuestion
from .image_protocols import ImageProtocol
from .image_scoring import GENERAL, MULTI_IMAGE, OPEN_VQA, VQA, aggregate_metrics
from .vqa_scoring import evalai_process

# mPLUG-Owl3 model card (X-PLUG/mPLUG-Owl@0f3068f mPLUG-Owl3/README.md, "The comparison between ...")
PUBLISHED_IMAGES = {
    "mPLUG-Owl3-7B-240728": {"nlvr2": 90.8, "mantis_eval": 63.1, "mathverse_mv": 65.0, "sciverse_mv": 86.2,
                             "blink": 50.3, "qbench2": 74.0, "vqav2": 82.1, "okvqa": 60.1, "gqa": 65.0,
                             "vizwiz_vqa": 63.5, "textvqa": 69.0, "mmbench_en": 77.6, "mmbench_cn": 74.3,
                             "mmvet": 40.1, "pope": 88.2, "ai2d": 73.8},
    "mPLUG-Owl3-7B-241101": {"nlvr2": 92.7, "mantis_eval": 67.3, "mathverse_mv": 65.1, "sciverse_mv": 82.7,
                             "blink": 53.8, "qbench2": 77.7, "vqav2": 83.2, "okvqa": 61.4, "gqa": 64.7,
                             "vizwiz_vqa": 62.9, "textvqa": 71.4, "mmbench_en": 80.4, "mmbench_cn": 79.1,
                             "mmvet": 39.8, "pope": 88.1, "ai2d": 77.8},
}
IMAGE_TITLES = {"nlvr2": "NLVR2", "mantis_eval": "Mantis-Eval", "mathverse_mv": "MathVerse-mv",
                "sciverse_mv": "SciVerse-mv", "blink": "BLINK", "qbench2": "Q-Bench2", "vqav2": "VQAv2",
                "okvqa": "OK-VQA", "gqa": "GQA", "vizwiz_vqa": "VizWizQA", "textvqa": "TextVQA", "mmbench_en": "MMB-EN",
                "mmbench_cn": "MMB-CN", "mmvet": "MM-Vet", "pope": "POPE", "ai2d": "AI2D",
                "llava_interleave": "LLaVA-Interleave out-domain"}
TABLES = {"multi-image": MULTI_IMAGE, "VQA": VQA, "general": GENERAL}


def _pct(x: float | None) -> float | None:
    """Percent, two decimals; None for a value the protocol cannot compute (official POPE's zero denominators)."""
    return None if x is None or x != x else round(100.0 * x, 2)


def summarize_images(proto: ImageProtocol, questions: Sequence[ImageQuestion], records: Sequence[dict],
                     run_info: dict[str, Any], selection: dict[str, Any]) -> dict[str, Any]:
    """results.json for the selected questions (the last line of a question counts)."""
    selected = {q.qid for q in questions}
    latest = {r["qid"]: r for r in records if r.get("qid") in selected}
    answered = [r for r in latest.values() if r.get("error") is None]
    failed = [r for r in latest.values() if r.get("error") is not None]
    scored = [r for r in answered if r.get("correct") is not None or r.get("score") is not None]
    benchmark = proto.benchmark
    per_task: dict[str, list[dict]] = {}
    for r in scored:
        per_task.setdefault(str(r.get("task", "")), []).append(r)
    tasks = {t: {"score": _pct(_mean_score(rs)), "total": len(rs)} for t, rs in sorted(per_task.items())}
    extra: dict[str, Any] = {}
    score = rule = None
    if scored:
        if benchmark == "pope":
            metrics = {t: aggregate_metrics(benchmark="pope", protocol=proto.name,
                                            responses=[r["response"] for r in rs], answers=[r["answer"] for r in rs])
                       for t, rs in sorted(per_task.items())}
            if proto.name == "lmms_eval":  # one task over the whole test split: its metrics over every question
                metrics["all"] = aggregate_metrics(benchmark="pope", protocol=proto.name,
                                                   responses=[r["response"] for r in scored],
                                                   answers=[r["answer"] for r in scored])
                score, rule = _pct(metrics["all"]["f1"]), "F1 over the whole split (lmms-eval pope)"
            else:  # three tasks in the official plan, each with its own metrics
                score = _pct(sum(m["f1"] for m in metrics.values()) / len(metrics))
                rule = "mean F1 over the POPE splits"
            extra["pope"] = {t: {k: _pct(v) for k, v in m.items()} for t, m in metrics.items()}
            if score is None:
                rule += " (undefined: no yes/no answer to count)"
        elif benchmark in ("mmbench_en", "mmbench_cn"):
            groups: dict[str, bool] = {}
            for r in scored:
                key = str(r.get("group") or r["qid"])
                groups[key] = groups.get(key, True) and bool(r["correct"])
            score, rule = _pct(sum(groups.values()) / len(groups)), "circular accuracy (every copy right)"
            extra["circular_groups"] = len(groups)
        elif benchmark == "llava_interleave":
            score = _pct(sum(_mean_score(rs) for rs in per_task.values()) / len(per_task))
            rule = "mean of the sub-task accuracies"
        elif benchmark in OPEN_VQA:
            score, rule = _pct(_mean_score(scored)), "mean VQA score"
        else:
            score, rule = _pct(_mean_score(scored)), "accuracy"
    return {**run_info, "selection": selection, "questions": len(questions), "answered": len(answered),
            "scored": len(scored), "failed": len(failed), "not_run": len(selected) - len(latest),
            "unscored": len(answered) - len(scored), "score": score, "score_rule": rule,
            "unparsed": sum(r.get("parsed") is False for r in scored), "tasks": tasks, **extra,
            "failures": [{"qid": r["qid"], "error": r["error"]} for r in failed][:50]}


def _mean_score(rs: Sequence[dict]) -> float:
    return sum(float(r["score"] if r.get("score") is not None else bool(r["correct"])) for r in rs) / len(rs)


def write_submission(proto: ImageProtocol, questions: Sequence[ImageQuestion], records: Sequence[dict],
                     out: Path) -> str | None:
    """The file a server or a judge scores, for the answered questions without a public answer: VQAv2 (EvalAI:
    [{"question_id", "answer"}]), VizWiz (EvalAI: [{"image", "answer"}]), MMBench test (the official columns index,
    question, prediction, A-D; tab-separated: save as .xlsx for the MMBench server), MM-Vet ({"v1_0": answer} for the
    GPT-4 judge). The answers are post-processed as each protocol submits them. None when there is nothing to send."""
    by_id = {q.qid: q for q in questions}
    rows = [r for r in records if r.get("error") is None and r.get("qid") in by_id and not by_id[r["qid"]].has_truth]
    latest = list({r["qid"]: r for r in rows}.values())
    if not latest:
        return None
    b = proto.benchmark
    if b == "vqav2":
        post = evalai_process if proto.name == "official" else _lmms_vqav2
        data: Any = [{"question_id": int(by_id[r["qid"]].fields.get("question_id", r["qid"])),
                      "answer": post(r["response"].strip())} for r in latest]
        path = out / "vqav2_test_submission.json"
    elif b == "vizwiz_vqa":
        if proto.name == "official":  # postprocess: {'image': question_id, 'answer': ds_post_process(x)}
            data = [{"image": by_id[r["qid"]].fields.get("question_id", r["qid"]),
                     "answer": r["response"].strip().split(".")[0].split(",")[0].strip()} for r in latest]
        else:
            data = [{"image": f"{by_id[r['qid']].fields.get('question_id', r['qid'])}.jpg",
                     "answer": evalai_process(r["response"].strip())} for r in latest]
        path = out / "vizwiz_test_submission.json"
    elif b == "mmvet":
        data = {r["qid"]: r["response"].strip() for r in latest}
        path = out / "mmvet_submission.json"
    elif b in ("mmbench_en", "mmbench_cn"):
        path = out / f"{b}_test_submission.tsv"
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, delimiter="\t")
            w.writerow(["index", "question", "prediction", "A", "B", "C", "D"])
            for r in latest:
                q = by_id[r["qid"]]
                opts = list(q.options) + [""] * 4
                w.writerow([q.fields.get("index", q.qid), q.question, r["response"].strip(), *opts[:4]])
        return str(path)
    else:
        return None
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)
    return str(path)


def _lmms_vqav2(text: str) -> str:
    from .vqa_scoring import process_digit_article, process_punctuation

    return process_digit_article(process_punctuation(text.replace("\n", " ").replace("\t", " ").strip()))


def format_image_table(results: dict[str, Any]) -> str:
    """The printed summary of one image-table run."""
    model = results["model"]
    lines = [f"{IMAGE_TITLES.get(results['benchmark'], results['benchmark'])} - protocol {results['protocol']} "
             f"({results['protocol_source']})",
             f"model {model['name']} [{model['architecture']}, fingerprint {model['fingerprint']}, {model['dtype']} on "
             f"{model['device']}], owlvid {results['owlvid_version']}", ""]
    if results["score_rule"] is not None:
        lines.append(f"score {_num(results['score'])}  ({results['score_rule']}); {results['scored']} scored, "
                     f"{results['unparsed']} unparsed, {results['failed']} failed")
    if results.get("submission_file"):
        lines.append(f"{results['unscored']} answer(s) without a public answer: submit {results['submission_file']} "
                     "(server / judge score, not computed here)")
    tasks = results.get("tasks", {})
    for task, cell in tasks.items() if len(tasks) > 1 else ():
        lines.append(f"  {task}: {_num(cell['score'])} ({cell['total']})")
    for split, m in results.get("pope", {}).items():
        lines.append(f"  POPE {split}: " + ", ".join(f"{k} {_num(v)}" for k, v in m.items()))
    lines += [f"note: {note}" for note in results.get("notes", [])]
    lines += [f"failed {f['qid']}: {f['error']}" for f in results["failures"][:5]]
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"
