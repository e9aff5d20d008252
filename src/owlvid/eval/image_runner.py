"""Run an image-table benchmark under a protocol: questions -> prompt + images -> model -> scored lines -> results.

Same folder contract as the video runner (runner.py): OUTDIR/run.json, predictions.jsonl (one fsync'd line per
question, resumable), results.json, plus the submission file of a split whose answers only a server or a judge
holds. Questions go through the normal model path (``jobs.generate_each`` with ``images=`` and ``cut_enable`` as
request options); each line records the images the model saw and the cut grid the processor chose for them.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from ..errors import InputError, OwlvidError
from ..metrics import EngineMetrics
from .answering import Answerer, ModelFacts, answer_lines, answerer_of, write_lines
from .frames import question_seed
from .image_datasets import ImageQuestion, load_image_questions
from .image_protocols import IMAGE, ImageProtocol, get_image_protocol
from .image_results import summarize_images, write_submission
from .runner import (
    PREDICTIONS,
    RESULTS,
    RUN,
    _check_same_run,
    _read_predictions,
    _write_json,
    checkpoint_fingerprint,
    run_folder,
)
from .scores import score_response


def run_images(benchmark: str, data_dir: str | os.PathLike, model: Any | Callable[[], Any] | Answerer,
               outdir: str | os.PathLike, *, protocol: str | None = None, limit: int | None = None,
               tasks: Sequence[str] | None = None, split: str | None = None, max_batch: int = 8, seed: int = 0,
               progress: bool = True) -> dict[str, Any]:
    """Evaluate ``model`` (an ``owlvid.Model``, an ``Answerer``, or a function returning either) on an image-table
    benchmark read from ``data_dir``; writes OUTDIR and returns the results.
    ``protocol``: "official" (default) | "lmms_eval"; ``split``: the parquet split (default: the model card's);
    ``seed``: lmms-eval's random fallback answers and Mantis-Eval's sampling."""
    if limit is not None and limit < 1:
        raise InputError("--limit must be at least 1")
    if max_batch < 1:
        raise InputError("--max-batch must be at least 1")
    proto = get_image_protocol(benchmark, protocol)
    questions = load_image_questions(benchmark, data_dir, tasks, split, proto.name)[:limit]
    with run_folder(outdir) as out:
        return _run_locked(proto, questions, model, out, limit=limit, tasks=tasks, split=split, max_batch=max_batch,
                           seed=seed, progress=progress)


def _run_locked(proto: ImageProtocol, questions: list[ImageQuestion], model: Any, out: Path, *, limit: int | None,
                tasks: Sequence[str] | None, split: str | None, max_batch: int, seed: int,
                progress: bool) -> dict[str, Any]:
    with answerer_of(model) as answerer:
        return _run_with(proto, questions, answerer, out, limit=limit, tasks=tasks, split=split, max_batch=max_batch,
                         seed=seed, progress=progress)


def _run_with(proto: ImageProtocol, questions: list[ImageQuestion], answerer: Answerer, out: Path, *,
              limit: int | None, tasks: Sequence[str] | None, split: str | None, max_batch: int, seed: int,
              progress: bool) -> dict[str, Any]:
    benchmark, facts = proto.benchmark, answerer.facts
    if facts.family != "owl3":
        raise InputError(f"{benchmark} is a table of the mPLUG-Owl3 model card; this model is {facts.architecture}")
    info = _run_info(proto, facts, seed, split)
    records = _read_predictions(out / PREDICTIONS)  # first: a file that is not ours gets no run.json beside it
    _check_same_run(out / RUN, info)
    done = {r["qid"] for r in records if r.get("error") is None}
    todo = [q for q in questions if q.qid not in done]
    if todo:
        lines = partial(image_lines, proto=proto, max_batch=max_batch, seed=seed)
        write_lines(out / PREDICTIONS, answerer.answer(lines, [[q] for q in todo], max_batch), len(todo),
                    benchmark=benchmark, progress=progress)
        records = _read_predictions(out / PREDICTIONS)
    summary = summarize_images(proto, questions, records, info, {"limit": limit, "tasks": sorted(tasks) if tasks
                                                                   else None, "split": split})
    submission = write_submission(proto, questions, records, out)
    if submission:
        summary["submission_file"] = submission
    summary.update(answerer.summary())  # this run's answering: tokens, latencies
    _write_json(out / RESULTS, summary)
    return summary


def _run_info(proto: ImageProtocol, facts: ModelFacts, seed: int, split: str | None) -> dict[str, Any]:
    from ..version import __version__

    return {"benchmark": proto.benchmark, "protocol": proto.name, "protocol_source": proto.source,
            "settings": {"generation": dict(proto.generation), "cut": "official plan (cut_cfg)" if proto.name ==
                         "official" else "single image cut, several not", "split": split, "seed": seed},
            "notes": list(proto.notes),
            "model": {"name": facts.name, "folder": str(facts.folder), "architecture": facts.architecture,
                      "fingerprint": checkpoint_fingerprint(facts.folder), "dtype": facts.dtype,
                      "device": facts.device},
            "owlvid_version": __version__}


def _image_source(q: ImageQuestion, k: int) -> str:
    image = q.images[k]
    return str(image) if isinstance(image, (str, Path)) else f"embedded:{q.benchmark}/{q.qid}#{k}"


def image_lines(model: Any, todo: list[ImageQuestion], metrics: EngineMetrics | None = None, *,
                proto: ImageProtocol, max_batch: int, seed: int) -> Iterator[dict]:
    """The predictions.jsonl line of each question of `todo` answered by `model`, in completion order."""
    placeholder = model.runtime.image_placeholder

    def job(q: ImageQuestion) -> Callable[[], tuple[list[dict], dict]]:
        def build() -> tuple[list[dict], dict]:
            text = proto.prompt(q).replace(IMAGE, placeholder)
            options = dict(proto.generation) | {"images": [str(i) if isinstance(i, Path) else i for i in q.images],
                                                "cut_enable": proto.cut(len(q.images))}
            if options.get("temperature"):
                options["seed"] = question_seed(q.qid, seed)
            return [{"role": "user", "content": text}], options

        return build

    image_size = model.runtime.describe().get("image_size")
    return answer_lines(model, todo, job, lambda q, result: _record(q, proto, result, image_size, seed),
                        max_batch=max_batch, metrics=metrics)


def image_audit(q: ImageQuestion, media: list[dict], cut: bool, image_size: int | None) -> list[dict]:
    """Per image: where it came from, its hash and size, and the cut grid [rows, cols] the processor used (None:
    not cut; the global view is the extra crop)."""
    from ..models.owl3.processor import select_grid

    out = []
    for k, m in enumerate(media):
        grid = None
        if cut and image_size and m.get("width") and m.get("crops", 1) > 1:
            grid = list(select_grid(m["width"], m["height"], image_size))
        out.append({"source": _image_source(q, k) if k < len(q.images) else None, "sha256": m.get("sha256"),
                    "width": m.get("width"), "height": m.get("height"), "crops": m.get("crops"), "cut_grid": grid})
    return out


def _record(q: ImageQuestion, proto: ImageProtocol, result: Any, image_size: int | None, seed: int) -> dict[str, Any]:
    cut = proto.cut(len(q.images))
    answer = q.fields.get("official_answer", q.answer) if proto.name == "official" else q.answer
    base = {"qid": q.qid, "task": q.task, **{f"category_{k}": v for k, v in q.categories.items()},
            "group": q.group, "options": list(q.options), "answer": answer,
            "answers": list(q.answers) if q.answers else None, "cut_enable": cut}
    try:
        base["prompt"] = proto.prompt(q)
    except OwlvidError as e:
        base["prompt"] = None
        result = result if isinstance(result, Exception) else e
    if isinstance(result, Exception):
        reason = " ".join(str(result).split()) or type(result).__name__
        return {**base, "response": None, "predicted": None, "correct": False, "score": None, "parsed": False,
                "images": [{"source": _image_source(q, k)} for k in range(len(q.images))],
                "error": f"{type(result).__name__}: {reason}"}
    answered = {"response": result.text, "finish_reason": result.finish_reason,
                "completion_tokens": result.completion_tokens,
                "images": image_audit(q, [m for m in result.media if m.get("type") == "image"], cut, image_size)}
    if not q.has_truth:  # a test split: scored by a server or a judge from the submission file
        return {**base, **answered, "predicted": None, "correct": None, "score": None, "parsed": None, "note": "",
                "error": None}
    try:
        s = score_response(benchmark=q.benchmark, protocol=proto.name, response=result.text,
                           options=list(q.options) or None, answer=answer,
                           answers=list(q.answers) if q.answers else None,
                           rng=random.Random(question_seed(q.qid, seed)))
    except OwlvidError as e:
        return {**base, **answered, "predicted": None, "correct": False, "score": None, "parsed": False,
                "error": f"cannot score: {e}"}
    return {**base, **answered, "predicted": s.predicted, "correct": s.correct, "score": s.score,
            "parsed": s.parsed, "note": s.note, "error": None}
