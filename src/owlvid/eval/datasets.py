"""The five benchmarks read from their folders as users download them (layouts in docs/evaluation.md).

Each loader returns `Question`s in dataset order. A folder that is not the benchmark's layout is one
`InputError` saying what was expected; a question whose video is missing still loads (the runner
records it as a failure with the reason), so one absent file never stops a run.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError, OwlvidError
from .protocols import MVBENCH_FRAME_FPS, MVBENCH_TASKS, unletter_option

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# NExT-QA question types and the official groups (TP is counted with TN, as the official accuracy_metric)
NEXTQA_TYPE_GROUP = {"CW": "CW", "CH": "CH", "TN": "TN", "TP": "TN", "TC": "TC", "DC": "DC", "DL": "DL", "DO": "DO"}
# MLVU dev multiple-choice tasks (8_sub_scene and 9_summary are open-ended: not multiple choice)
MLVU_GENERATION_TASKS = ("sub_scene", "summary")


@dataclass(frozen=True)
class Question:
    """One multiple-choice question and where its video is.

    `options` are the raw option texts (no letters), `answer` the ground-truth letter. `video` is a
    video file or, for `video_kind == "frames"`, a folder of frame images (`frame_fps` per second).
    `bound` is the (start, end) seconds the dataset gives, None when it gives none. `task` is the primary
    category (what --tasks filters); `categories` every category field reported in the results."""

    qid: str
    benchmark: str
    task: str
    question: str
    options: tuple[str, ...]
    answer: str
    video: Path
    video_kind: str = "video"
    bound: tuple[float, float] | None = None
    frame_fps: float | None = None
    categories: dict[str, str] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)  # dataset fields for Protocol.messages (raw_question)


def load_questions(benchmark: str, data_dir: str | os.PathLike, tasks: Sequence[str] | None = None) -> list[Question]:
    """Every question of `benchmark` under `data_dir`, in dataset order; `tasks` keeps only those whose
    `task` is listed (an unknown name is an InputError listing the known ones)."""
    loader = _LOADERS.get(benchmark)
    if loader is None:
        raise InputError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(_LOADERS)}")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise InputError(f"--data {data_dir} is not a folder ({_EXPECTED[benchmark]})")
    questions = loader(root, set(tasks) if tasks else None)
    known = sorted(MVBENCH_TASKS) if benchmark == "mvbench" else None
    return with_tasks(questions, tasks, benchmark, data_dir, _EXPECTED[benchmark], known)


def with_tasks(questions: list, tasks: Sequence[str] | None, benchmark: str, data_dir: Any, expected: str,
               known: list[str] | None = None) -> list:
    """The questions of the `tasks` asked for (all without); an unknown task (of `known`, default: those the
    questions have) or no question at all is one InputError (video and image benchmarks alike)."""
    if tasks:
        known = known or sorted({q.task for q in questions})
        unknown = [t for t in tasks if t not in known]
        if unknown:
            raise InputError(f"unknown {benchmark} task(s) {', '.join(unknown)}; choose from {', '.join(known)}")
        questions = [q for q in questions if q.task in tasks]
    if not questions:
        raise InputError(f"--data {data_dir} has no {benchmark} questions ({expected})")
    return questions


_EXPECTED = {
    "mvbench": "expected json/<task>.json (e.g. json/action_sequence.json) and video/ as in HF OpenGVLab/MVBench",
    "nextqa_mc": "expected MC/test-*.parquet and NExTVideo/<video>.mp4 as in HF lmms-lab/NExTQA (config MC)",
    "videomme": "expected videomme/test-*.parquet and data/<videoID>.mp4 as in HF lmms-lab/Video-MME",
    "longvideobench": "expected lvb_val.json and videos/ as in HF longvideobench/LongVideoBench",
    "mlvu": "expected json/<n>_<task>.json (e.g. json/1_plotQA.json) and video/<n>_<task>/ as in MLVU dev",
}


def _layout_error(root: Path, benchmark: str, detail: str = "") -> InputError:
    return InputError(f"--data {root} is not a {benchmark} folder{detail}: {_EXPECTED[benchmark]}")


def _read_json(path: Path, benchmark: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable {benchmark} annotation file ({e})") from None


def read_parquet(path: Path) -> list[dict]:
    """The rows of a parquet file as dicts (needs pyarrow: the `eval` extra)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise OwlvidError("reading parquet datasets needs pyarrow: pip install 'owlvid[eval]'") from None
    try:
        return pq.read_table(path).to_pylist()
    except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError
        raise InputError(f"{path}: not a readable parquet file ({' '.join(str(e).split())})") from None


def _parquet(root: Path, pattern: str, benchmark: str) -> list[dict]:
    files = sorted(root.glob(pattern))
    if not files:
        raise _layout_error(root, benchmark, f" (no {pattern})")
    return [row for path in files for row in read_parquet(path)]


def _require(row: dict, keys: Sequence[str], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise InputError(f"{where}: missing field(s) {', '.join(missing)}")


def _options(value: Any, where: str, name: str = "candidates") -> tuple[str, ...]:
    """The option texts of a question: a non-empty list, at most 26 (lettered A to Z; past Z the prompt would
    letter them "[", "\\" ...)."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence) or not value:
        raise InputError(f"{where}: {name} must be a non-empty list of option texts, got {_short(value)}")
    if len(value) > len(LETTERS):
        raise InputError(f"{where}: {len(value)} {name}; at most {len(LETTERS)} can be lettered A to Z")
    return tuple(value)


def _choice_letter(value: Any, n_options: int, where: str, name: str) -> str:
    """The letter of a ground truth given as an option index (an int, or a string of digits as some copies
    store it)."""
    index = None
    if isinstance(value, int) and not isinstance(value, bool):
        index = value
    elif isinstance(value, float) and value.is_integer():
        index = int(value)
    elif isinstance(value, str) and value.strip().isdecimal():
        index = int(value.strip())
    if index is None or not 0 <= index < n_options:
        raise InputError(f"{where}: {name} must be the index of one of the {n_options} candidates "
                         f"(0 to {n_options - 1}), got {_short(value)}")
    return LETTERS[index]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# -- MVBench ---------------------------------------------------------------------------------------------


def _mvbench_answer(candidates: Sequence[str], answer: str) -> str:
    """The letter of `answer` among the candidates; as the official qa_template, a missing one is
    index -1 (the letter before "A", "@")."""
    idx = next((i for i, c in enumerate(candidates) if c == answer), -1)
    return chr(ord("A") + idx)


def load_mvbench(root: Path, tasks: set[str] | None) -> list[Question]:
    json_dir = root / "json"
    if not json_dir.is_dir() or not any((json_dir / spec.json_file).is_file() for spec in MVBENCH_TASKS.values()):
        raise _layout_error(root, "mvbench")
    out: list[Question] = []
    for task, spec in MVBENCH_TASKS.items():  # the official task order
        path, bounded = json_dir / spec.json_file, spec.bounded
        if (tasks and task not in tasks) or not path.is_file():
            continue
        rows = _read_json(path, "mvbench")
        for i, row in enumerate(rows):
            where = f"{path} item {i}"
            _require(row, ("video", "question", "candidates", "answer", *(("start", "end") if bounded else ())),
                     where)
            frames = spec.kind == "frame"
            options = _options(row["candidates"], where)
            out.append(Question(
                qid=f"{task}/{i}", benchmark="mvbench", task=task, question=row["question"],
                options=options, answer=_mvbench_answer(options, row["answer"]),
                video=root / "video" / spec.video_folder / row["video"], video_kind="frames" if frames else "video",
                bound=(float(row["start"]), float(row["end"])) if bounded else None,
                frame_fps=float(MVBENCH_FRAME_FPS) if frames else None, categories={"task": task}))
    return out


# -- NExT-QA (multiple choice) -----------------------------------------------------------------------------


def load_nextqa_mc(root: Path, tasks: set[str] | None) -> list[Question]:
    rows = _parquet(root, "MC/test-*.parquet", "nextqa_mc")
    out = []
    for i, row in enumerate(rows):
        where = f"NExT-QA row {i}"
        _require(row, ("video", "qid", "type", "question", "answer", "a0"), where)
        options = tuple(row[f"a{k}"] for k in range(10) if f"a{k}" in row)  # a0..a4, as the official loop
        qtype = str(row["type"])
        group = NEXTQA_TYPE_GROUP.get(qtype, qtype)
        out.append(Question(
            qid=f"{row['video']}_{row['qid']}", benchmark="nextqa_mc", task=qtype, question=row["question"],
            options=options, answer=_choice_letter(row["answer"], len(options), where, "answer"),
            video=root / "NExTVideo" / f"{row['video']}.mp4",
            categories={"type": group, "group": group[0]}))
    return out


# -- Video-MME -------------------------------------------------------------------------------------------


def _first_existing(candidates: Sequence[Path]) -> Path:
    return next((p for p in candidates if p.exists()), candidates[0])


def load_videomme(root: Path, tasks: set[str] | None) -> list[Question]:
    rows = _parquet(root, "videomme/test-*.parquet", "videomme")
    out = []
    for i, row in enumerate(rows):
        where = f"Video-MME row {i}"
        _require(row, ("videoID", "duration", "domain", "sub_category", "task_type", "question", "options",
                       "answer"), where)
        stem = root / "data" / row["videoID"]
        # .mp4 as downloaded; .MP4 / .mkv as lmms-eval also accepts
        video = _first_existing([stem.with_name(stem.name + ext) for ext in (".mp4", ".MP4", ".mkv")])
        lettered = list(_options(row["options"], where, "options"))
        out.append(Question(
            qid=str(row.get("question_id") or f"{row['videoID']}-{i}"), benchmark="videomme", task=row["duration"],
            question=row["question"], options=tuple(unletter_option(o, k) for k, o in enumerate(lettered)),
            answer=row["answer"], video=video,
            categories={"duration": row["duration"], "domain": row["domain"], "sub_category": row["sub_category"],
                        "task_type": row["task_type"]}))
    return out


# -- LongVideoBench ----------------------------------------------------------------------------------------


def load_longvideobench(root: Path, tasks: set[str] | None) -> list[Question]:
    path = root / "lvb_val.json"
    if not path.is_file():
        raise _layout_error(root, "longvideobench", " (no lvb_val.json)")
    rows = _read_json(path, "longvideobench")
    out = []
    for i, row in enumerate(rows):
        where = f"{path} item {i}"
        _require(row, ("id", "video_path", "duration", "question", "candidates", "correct_choice"), where)
        category = str(row.get("question_category", ""))
        options = _options(row["candidates"], where)
        out.append(Question(
            qid=str(row["id"]), benchmark="longvideobench", task=category, question=row["question"],
            options=options, answer=_choice_letter(row["correct_choice"], len(options), where, "correct_choice"),
            # the official loader's bound [0, duration] starts at 0, so it reads the whole video: no bound
            video=root / "videos" / row["video_path"],
            categories={"question_category": category, "duration_group": str(row.get("duration_group", ""))}))
    return out


# -- MLVU (dev) --------------------------------------------------------------------------------------------


def load_mlvu(root: Path, tasks: set[str] | None) -> list[Question]:
    def number(path: Path) -> tuple[int, str]:  # 1_plotQA ... 9_summary, by their number
        m = re.match(r"(\d+)_", path.stem)
        return (int(m.group(1)) if m else 1 << 30), path.stem

    files = sorted((root / "json").glob("*.json"), key=number)
    if not files:
        raise _layout_error(root, "mlvu")
    out = []
    for path in files:
        task = re.sub(r"^\d+_", "", path.stem)
        if task in MLVU_GENERATION_TASKS:
            continue
        for i, row in enumerate(_read_json(path, "mlvu")):
            where = f"{path} item {i}"
            _require(row, ("video", "question", "candidates", "answer"), where)
            candidates = list(_options(row["candidates"], where))
            idx = candidates.index(row["answer"]) if row["answer"] in candidates else -1
            out.append(Question(
                qid=f"{task}/{i}", benchmark="mlvu", task=task, question=row["question"], options=tuple(candidates),
                answer=chr(ord("A") + idx),
                # video/<n>_<task>/ as the MLVU download; video/<task>/ as some copies
                video=_first_existing([root / "video" / path.stem / row["video"],
                                       root / "video" / task / row["video"]]),
                categories={"task": task}))
    return out


_LOADERS: dict[str, Callable[[Path, set[str] | None], list[Question]]] = {
    "mvbench": load_mvbench, "nextqa_mc": load_nextqa_mc, "videomme": load_videomme,
    "longvideobench": load_longvideobench, "mlvu": load_mlvu,
}
