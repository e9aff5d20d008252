"""Run a benchmark under a protocol: questions -> frames -> model -> scored prediction lines -> results.

    OUTDIR/run.json           what this folder is a run of (benchmark, protocol, settings, checkpoint)
    OUTDIR/predictions.jsonl  one line per question, fsync'd as each answer arrives (resumable)
    OUTDIR/results.json       accuracy overall and per category, unparsed answers, settings, model

Questions go through `jobs.generate_each` (continuous batching; a job's frames are decoded when it is
admitted, so a missing or broken video fails that question only), on this process's model or spread over
model replicas (an `answering.Answerer`: `owlvid.ray_eval`); either way this process writes the lines, under
the lock, as they arrive. Rerunning the same command continues:
questions already answered in predictions.jsonl are skipped (a torn last line is cut away first), failed
ones are tried again, and results are computed from the file, so an interrupted run ends as an
uninterrupted one would. A run locks its folder (`records.exclusive` on predictions.jsonl) before it loads
the model: a second run on the same folder exits at once, naming the first.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from functools import partial
from pathlib import Path
from typing import Any

from .. import records as records_mod
from ..errors import InputError, OwlvidError
from ..metrics import EngineMetrics
from . import results as results_mod
from .answering import Answerer, ModelFacts, answer_lines, answerer_of, write_lines
from .datasets import Question, load_questions
from .frames import DecodedFrames, decode_frames, question_seed, reuse_key
from .protocols import Protocol, get_protocol

PREDICTIONS = "predictions.jsonl"
RESULTS = "results.json"
RUN = "run.json"


def checkpoint_fingerprint(folder: str | os.PathLike) -> str:
    """A digest of config.json, the safetensors index and every safetensors header (tensor names, dtypes,
    shapes, offsets): the same checkpoint gives the same value wherever it lies, without reading the weights."""
    folder = Path(folder)
    h = hashlib.blake2b(digest_size=12)
    for name in ("config.json", "model.safetensors.index.json"):
        if (folder / name).is_file():
            h.update(name.encode() + b"\0" + (folder / name).read_bytes())
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            h.update(path.name.encode() + b"\0" + f.read(min(size, 100 << 20)))
    return h.hexdigest()


def run(benchmark: str, data_dir: str | os.PathLike, model: Any | Callable[[], Any] | Answerer,
        outdir: str | os.PathLike, *,
        protocol: str | None = None, limit: int | None = None, tasks: Sequence[str] | None = None,
        num_frames: int | None = None, max_batch: int = 8, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Evaluate `model` (an `owlvid.Model`, an `Answerer`, or a function returning either, called only once the
    data is found and the folder locked) on `benchmark` read from `data_dir`; writes OUTDIR files and returns
    the results dict.

    `protocol`: "official" | "lmms_eval" | "slowfast" (default: the model family's). `limit`: the first N
    questions (after `tasks`). `num_frames`: overrides the protocol's frame count (default: the protocol's;
    for a Slow-Fast model under its authors' settings or lmms-eval, the frame count it was trained with, as
    their scripts' TEST_FRAMES: 64 or 96). `seed`: seeds the official random frame draw of bounded MVBench
    questions and the lmms-eval random fallback answers."""
    if limit is not None and limit < 1:
        raise InputError("--limit must be at least 1")
    if max_batch < 1:
        raise InputError("--max-batch must be at least 1")
    questions = load_questions(benchmark, data_dir, tasks)[:limit]
    with run_folder(outdir) as out:
        return _run_locked(benchmark, questions, model, out, protocol=protocol, limit=limit, tasks=tasks,
                           num_frames=num_frames, max_batch=max_batch, seed=seed, progress=progress)


@contextmanager
def run_folder(outdir: str | os.PathLike) -> Iterator[Path]:
    """The output folder of a run, created if needed and locked (one run per folder, taken before the model
    loads); a run that fails before writing anything leaves no folder behind."""
    out = Path(outdir).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"-o {outdir} exists and is not a folder")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with records_mod.exclusive(out / PREDICTIONS, shown=out):
            yield out
    except BaseException:
        if created:
            with suppress(OSError):
                out.rmdir()
        raise


def _run_locked(benchmark: str, questions: list[Question], model: Any, out: Path, *, protocol: str | None,
                limit: int | None, tasks: Sequence[str] | None, num_frames: int | None, max_batch: int, seed: int,
                progress: bool) -> dict[str, Any]:
    """`run` once the folder is locked."""
    with answerer_of(model) as answerer:
        return _run_with(benchmark, questions, answerer, out, protocol=protocol, limit=limit, tasks=tasks,
                         num_frames=num_frames, max_batch=max_batch, seed=seed, progress=progress)


def _run_with(benchmark: str, questions: list[Question], answerer: Answerer, out: Path, *, protocol: str | None,
              limit: int | None, tasks: Sequence[str] | None, num_frames: int | None, max_batch: int, seed: int,
              progress: bool) -> dict[str, Any]:
    facts = answerer.facts
    if num_frames is None and facts.family == "slowfast" and protocol != "official":
        num_frames = facts.training_frames
    proto = get_protocol(benchmark, protocol, facts.family, num_frames=num_frames)
    run_info = _run_info(proto, facts, seed)
    records = _read_predictions(out / PREDICTIONS)  # first: a file that is not ours gets no run.json beside it
    _check_same_run(out / RUN, run_info)
    done = {r["qid"] for r in records if r.get("error") is None}
    todo = _video_groups([q for q in questions if q.qid not in done])
    if todo:
        lines = partial(prediction_lines, proto=proto, max_batch=max_batch, seed=seed)
        write_lines(out / PREDICTIONS, answerer.answer(lines, todo, max_batch), sum(map(len, todo)),
                    benchmark=proto.benchmark, progress=progress)
        records = _read_predictions(out / PREDICTIONS)
    summary = results_mod.summarize(proto, questions, records, run_info,
                                    {"limit": limit, "tasks": sorted(tasks) if tasks else None})
    summary.update(answerer.summary())
    _write_json(out / RESULTS, summary)
    return summary


def _run_info(proto: Protocol, facts: ModelFacts, seed: int) -> dict[str, Any]:
    from ..version import __version__

    return {"benchmark": proto.benchmark, "protocol": proto.name, "protocol_source": proto.source,
            "settings": {"num_frames": proto.num_frames, "frame_choice": proto.frame_choice,
                         "frames_as": proto.frames_as, "bound": proto.bound, "generation": dict(proto.generation),
                         "seed": seed},
            "notes": list(proto.notes),
            "model": {"name": facts.name, "folder": str(facts.folder), "architecture": facts.architecture,
                      "fingerprint": checkpoint_fingerprint(facts.folder), "dtype": facts.dtype,
                      "device": facts.device},
            "owlvid_version": __version__}


def _check_same_run(path: Path, info: dict[str, Any]) -> None:
    """A folder holds one run: continuing it with another benchmark, protocol, setting or checkpoint would
    mix answers of different runs in one file."""
    keys = ("benchmark", "protocol", "settings")
    mine = {k: info[k] for k in keys} | {"fingerprint": info["model"]["fingerprint"]}
    if path.exists():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            theirs = {k: saved.get(k) for k in keys} | {"fingerprint": saved.get("model", {}).get("fingerprint")}
        except (OSError, ValueError, AttributeError):
            raise InputError(f"{path} is not an owlvid run file; use another output folder") from None
        if theirs != mine:
            differ = ", ".join(k for k in mine if mine[k] != theirs[k])
            raise InputError(f"{path.parent} holds another run (its {differ} differ); use another output folder "
                             "(-o) to start a new run")
        return
    _write_json(path, info)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_predictions(path: Path) -> list[dict]:
    """The prediction lines (a torn last line from a killed run is cut away first; a file that is not
    predictions is refused untouched)."""
    records_mod.read_done(path, "qid", "predictions", _is_prediction)  # validates every line, repairs the tail
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _is_prediction(item: dict) -> bool:
    return "error" in item  # every line `_record` writes has it (None when answered)


def _video_groups(questions: list[Question]) -> list[list[Question]]:
    """The questions about each video, in dataset order of their first one (a video is decoded once)."""
    groups: dict[str, list[Question]] = {}
    for q in questions:
        groups.setdefault(str(q.video), []).append(q)
    return list(groups.values())


# -- answering ---------------------------------------------------------------------------------------------


def prompt_text(template: list[dict], runtime: Any, n_frames: int, as_images: bool) -> list[dict]:
    """The conversation as the model's processor receives it (the model's placeholders), for the record."""
    media = runtime.image_placeholder * n_frames if as_images else runtime.video_placeholder
    out = []
    for message in template:
        content = message["content"]
        if isinstance(content, list):
            text, after_media = "", False
            for part in content:
                if part.get("type") == "text":
                    text += ("\n" if after_media else "") + part["text"]
                    after_media = False
                else:
                    text += media
                    after_media = True
            content = text
        out.append({"role": message["role"], "content": content})
    return out


def _question_text(q: Question, proto: Protocol) -> list[dict]:
    return proto.messages(q.question, list(q.options), **q.fields)


def prediction_lines(model: Any, todo: list[Question], metrics: EngineMetrics | None = None, *, proto: Protocol,
                     max_batch: int, seed: int) -> Iterator[dict]:
    """The predictions.jsonl line of each question of `todo` answered by `model` (an `owlvid.Model`), in
    completion order (this process's run, and each Ray replica's share)."""
    from ..cache import content_key, file_identity
    from ..video_plan import FrameList

    as_images = proto.frames_as == "images"
    # the official pipeline hands the frames over as images without cutting (no cut_cfg for video tasks)
    options = dict(proto.generation) | ({"cut_enable": False} if as_images else {})
    audits: dict[str, dict] = {}
    last: list[Any] = [None, None]  # (reuse key, DecodedFrames): questions on one video decode it once

    def job(q: Question) -> Callable[[], tuple[list[dict], dict]]:
        def build() -> tuple[list[dict], dict]:
            key = reuse_key(q, proto)
            if last[0] != key:
                last[:] = [None, None]  # free the previous video's frames before decoding the next
                last[:] = [key, decode_frames(q, proto, seed=seed)]
            decoded: DecodedFrames = last[1]
            audits[q.qid] = decoded.audit()
            messages = proto.with_frames(_question_text(q, proto), decoded.frames)
            if not as_images:  # the frames with their identity: the visual cache encodes a shared video once
                cache_key = content_key("eval-frames", file_identity(decoded.source), decoded.indices,
                                        decoded.decoder)
                frames = FrameList(decoded.frames, cache_key, decoded.indices, decoded.timestamps)
                for message in messages:
                    for part in message["content"]:
                        if part.get("type") == "video":
                            part["video"] = frames
            return messages, dict(options)

        return build

    return answer_lines(model, todo, job, lambda q, result: _record(q, proto, model.runtime, result,
                                                                    audits.pop(q.qid, None), seed),
                        max_batch=max_batch, metrics=metrics)


def _record(q: Question, proto: Protocol, runtime: Any, result: Any, audit: dict | None, seed: int
            ) -> dict[str, Any]:
    """One predictions.jsonl line."""
    base = {"qid": q.qid, "task": q.task, **{f"category_{k}": v for k, v in q.categories.items()},
            "video": str(q.video), "answer": q.answer, "options": list(q.options)}
    n_frames = len(audit["indices"]) if audit else proto.num_frames
    base["prompt"] = prompt_text(_question_text(q, proto), runtime, n_frames, proto.frames_as == "images")
    if isinstance(result, Exception):
        reason = " ".join(str(result).split()) or type(result).__name__
        return {**base, "response": None, "predicted": None, "correct": False, "parsed": False,
                "frames": audit, "error": f"{type(result).__name__}: {reason}"}
    rng = random.Random(question_seed(q.qid, seed))  # the lmms-eval random fallback, the same on every run
    answered = {"response": result.text, "finish_reason": result.finish_reason,
                "completion_tokens": result.completion_tokens, "frames": audit}
    try:
        score = proto.score(result.text, list(q.options), q.answer, rng=rng)
    except OwlvidError as e:  # e.g. a ground truth that is not among the options: the question cannot be scored
        return {**base, **answered, "predicted": None, "correct": False, "parsed": False,
                "error": f"cannot score: {e}"}
    return {**base, **answered, "predicted": score.predicted, "correct": bool(score.correct),
            "parsed": bool(score.parsed), "note": score.note, "error": None}

