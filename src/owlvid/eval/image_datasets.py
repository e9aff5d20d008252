"""The image-table benchmarks read from their folders as users download them.

Two kinds of folder, told apart by their content:

* the Hugging Face dataset repos lmms-eval reads (parquet with embedded images: ``lmms-lab/VQAv2``, ``OK-VQA``,
  ``textvqa``, ``VizWiz-VQA``, ``GQA``, ``POPE``, ``ai2d``, ``MMBench``, ``MMVet``, ``LLaVA-NeXT-Interleave-Bench``,
  ``NLVR2``, ``q-future/Q-Bench2-HF``, ``TIGER-Lab/Mantis-Eval``, ``BLINK-Benchmark/BLINK``): ``--data`` is the repo
  folder; the split file is ``[<config>/]<split>-*.parquet`` anywhere below it (``data/`` in most repos);
* the official evaluation folder (README of mPLUG-Owl3 "Evaluation": ``dataset/`` with the json files and
  ``images/`` beside it): ``--data`` is the folder holding ``dataset/`` (see image_official_data.py).

Every loader returns :class:`ImageQuestion` in dataset order; a folder that is neither layout is one InputError
saying what was expected. Images stay as bytes (parquet) or paths (json layouts) until the model loads them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError
from .datasets import read_parquet, with_tasks
from .image_official_data import find_official
from .image_questions import LETTERS, ImageQuestion, interleave_options
from .image_scoring import IMAGE_BENCHMARKS, INTERLEAVE_SUBSETS

# the split each benchmark is read from by default (the model card's: test-server splits where it reports them)
DEFAULT_SPLITS = {"vqav2": "test", "okvqa": "val2014", "textvqa": "validation", "vizwiz_vqa": "test",
                  "gqa": "testdev", "pope": "test", "ai2d": "test", "mmbench_en": "test", "mmbench_cn": "test",
                  "mmvet": "test", "nlvr2": "unbalanced_test_public", "qbench2": "dev", "llava_interleave": "test",
                  "mantis_eval": "test", "blink": "val", "mathverse_mv": "test", "sciverse_mv": "test"}
HF_REPOS = {"vqav2": "lmms-lab/VQAv2", "okvqa": "lmms-lab/OK-VQA", "textvqa": "lmms-lab/textvqa",
            "vizwiz_vqa": "lmms-lab/VizWiz-VQA", "gqa": "lmms-lab/GQA", "pope": "lmms-lab/POPE",
            "ai2d": "lmms-lab/ai2d",
            "mmbench_en": "lmms-lab/MMBench (config en)", "mmbench_cn": "lmms-lab/MMBench (config cn)",
            "mmvet": "lmms-lab/MMVet", "nlvr2": "lmms-lab/NLVR2", "qbench2": "q-future/Q-Bench2-HF",
            "llava_interleave": "lmms-lab/LLaVA-NeXT-Interleave-Bench (config out_of_domain)",
            "mantis_eval": "TIGER-Lab/Mantis-Eval", "blink": "BLINK-Benchmark/BLINK",
            "mathverse_mv": "lmms-lab/LLaVA-NeXT-Interleave-Bench (config out_of_domain)",
            "sciverse_mv": "lmms-lab/LLaVA-NeXT-Interleave-Bench (config out_of_domain)"}
_CONFIGS = {"mmbench_en": "en", "mmbench_cn": "cn", "gqa": "testdev_balanced_instructions",
            "llava_interleave": "out_of_domain", "mathverse_mv": "out_of_domain", "sciverse_mv": "out_of_domain"}


def expected(benchmark: str, split: str) -> str:
    config = _CONFIGS.get(benchmark)
    where = f"{config}/{split}-*.parquet" if config else f"{split}-*.parquet (e.g. data/{split}-00000-of-00001.parquet)"
    return f"expected {where} as in HF {HF_REPOS[benchmark]}, or the official evaluation folder (dataset/, images/)"


def parquet_rows(root: Path, benchmark: str, split: str, config: str | None = None) -> list[dict]:
    """The rows of ``<split>-*.parquet`` below ``root`` (under a folder named ``config``: the benchmark's own config
    by default)."""
    config = config or _CONFIGS.get(benchmark)
    files = sorted(p for p in root.rglob(f"{split}-*.parquet") if config is None or config in p.parent.parts)
    if not files:
        raise InputError(f"--data {root} has no {benchmark} split {split!r}: {expected(benchmark, split)}")
    return [row for path in files for row in read_parquet(path)]


def image_bytes(value: Any, where: str) -> Any:
    """An HF ``Image`` cell ({"bytes", "path"}) -> bytes (or the path when the bytes are absent)."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path"):
            return Path(value["path"])
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise InputError(f"{where}: no embedded image")


def _need(row: dict, keys: Sequence[str], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise InputError(f"{where}: missing field(s) {', '.join(missing)}")


def _answers(value: Any) -> tuple[str, ...] | None:
    """VQA annotator answers: strings, or dicts with "answer" (VQAv2); None when the split has none."""
    if not value:
        return None
    return tuple(a["answer"] if isinstance(a, dict) else str(a) for a in value)


# -- per-benchmark rows -> questions -------------------------------------------------------------------------


def _vqa(benchmark: str, rows: list[dict], where: str) -> list[ImageQuestion]:
    out = []
    for i, row in enumerate(rows):
        _need(row, ("question", "image"), f"{where} row {i}")
        qid = str(row.get("question_id", i))
        out.append(ImageQuestion(qid=qid, benchmark=benchmark, task=str(row.get("answer_type") or "all"),
                                 question=row["question"], images=(image_bytes(row["image"], f"{where} {qid}"),),
                                 answers=_answers(row.get("answers")),
                                 fields={"question_id": row.get("question_id", i),
                                         "ocr_tokens": list(row.get("ocr_tokens") or [])}))
    return out


def _gqa(root: Path, split: str) -> list[ImageQuestion]:
    rows = parquet_rows(root, "gqa", split, "testdev_balanced_instructions")
    images = {r["id"]: r["image"] for r in parquet_rows(root, "gqa", split, "testdev_balanced_images")}
    out = []
    for i, row in enumerate(rows):
        _need(row, ("id", "imageId", "question", "answer"), f"GQA row {i}")
        if row["imageId"] not in images:
            raise InputError(f"GQA question {row['id']}: image {row['imageId']} not in testdev_balanced_images")
        out.append(ImageQuestion(qid=str(row["id"]), benchmark="gqa", task="all", question=row["question"],
                                 images=(image_bytes(images[row["imageId"]], f"GQA image {row['imageId']}"),),
                                 answer=row["answer"]))
    return out


def _pope(root: Path, split: str) -> list[ImageQuestion]:
    """lmms-lab/POPE: the default config's ``test`` (a ``category`` column) or the ``Full`` config's three splits."""
    full = [(cat, parquet_rows(root, "pope", cat, "Full")) for cat in ("random", "popular", "adversarial")
            if any(root.rglob(f"{cat}-*.parquet"))]
    groups = full or [(None, parquet_rows(root, "pope", split))]
    out = []
    for cat, rows in groups:
        for i, row in enumerate(rows):
            _need(row, ("question", "answer", "image"), f"POPE row {i}")
            category = cat or str(row.get("category", "all"))
            qid = f"{category}/{row.get('question_id', i)}"
            out.append(ImageQuestion(qid=qid, benchmark="pope", task=category, question=row["question"],
                                     images=(image_bytes(row["image"], f"POPE {qid}"),),
                                     answer=str(row["answer"]).strip().lower()))
    return out


def _ai2d(rows: list[dict]) -> list[ImageQuestion]:
    out = []
    for i, row in enumerate(rows):
        _need(row, ("question", "options", "answer", "image"), f"AI2D row {i}")
        options = tuple(row["options"])
        out.append(ImageQuestion(qid=str(i), benchmark="ai2d", task="all", question=row["question"],
                                 images=(image_bytes(row["image"], f"AI2D row {i}"),), options=options,
                                 answer=LETTERS[int(row["answer"])]))
    return out


def mmbench_options(row: dict) -> list[str]:
    """The option texts A.. of an MMBench row: lmms-eval ``create_options_prompt`` keeps the truthy, non-NaN,
    non-"nan" ones."""
    out = []
    for letter in "ABCDE":
        value = row.get(letter)
        if value is None or value == "nan" or (isinstance(value, float) and value != value) or not value:
            continue
        out.append(str(value))
    return out


def _mmbench(benchmark: str, rows: list[dict]) -> list[ImageQuestion]:
    out = []
    for i, row in enumerate(rows):
        _need(row, ("index", "question", "image"), f"MMBench row {i}")
        index = int(row["index"])
        answer = row.get("answer")
        out.append(ImageQuestion(
            qid=str(index), benchmark=benchmark, task=str(row.get("category") or "all"), question=row["question"],
            images=(image_bytes(row["image"], f"MMBench {index}"),), options=tuple(mmbench_options(row)),
            answer=answer if answer in LETTERS else None, group=str(index % 1_000_000),
            categories={"l2_category": str(row.get("L2-category") or "")},
            fields={"hint": row.get("hint"), "index": index, "row": {k: row.get(k) for k in "ABCDE"}}))
    return out


def _mmvet(rows: list[dict]) -> list[ImageQuestion]:
    return [ImageQuestion(qid=str(row.get("question_id", i)), benchmark="mmvet", task=str(row.get("capability", "all")),
                          question=row["question"], images=(image_bytes(row["image"], f"MM-Vet row {i}"),),
                          fields={"answer": row.get("answer")})
            for i, row in enumerate(rows)]


def _nlvr2(rows: list[dict]) -> list[ImageQuestion]:
    out = []
    for i, row in enumerate(rows):
        _need(row, ("left_image", "right_image", "question", "answer"), f"NLVR2 row {i}")
        qid = str(row.get("identifier", row.get("id", i)))
        out.append(ImageQuestion(qid=qid, benchmark="nlvr2", task="all", question=row["question"],
                                 images=(image_bytes(row["left_image"], f"NLVR2 {qid}"),
                                         image_bytes(row["right_image"], f"NLVR2 {qid}")),
                                 answer="no" if row["answer"] == "False" else "yes"))  # official rule, quirk included
    return out


def _qbench2(rows: list[dict]) -> list[ImageQuestion]:
    out = []
    for i, row in enumerate(rows):
        _need(row, ("image1", "image2", "question", "correct_choice", "option0"), f"Q-Bench2 row {i}")
        options = tuple(row[f"option{k}"] for k in range(4) if row.get(f"option{k}") not in (None, "N/A"))
        qid = str(row.get("id", i))
        out.append(ImageQuestion(
            qid=qid, benchmark="qbench2", task=str(row.get("question_concern", "all")), question=row["question"],
            images=(image_bytes(row["image1"], f"Q-Bench2 {qid}"), image_bytes(row["image2"], f"Q-Bench2 {qid}")),
            options=options, answer=row["correct_choice"],
            categories={"question_type": str(row.get("question_type", ""))},
            fields={"official_answer": _first_same_text(options, row["correct_choice"])}))
    return out


def _first_same_text(options: Sequence[str], letter: str) -> str:
    """qbench.py ``__getitem__``: the truth is the option *text* of ``correct_choice``, turned back into the letter
    of the first option with that text (two equal options: the first one's letter)."""
    index = LETTERS.index(letter) if letter in LETTERS[:len(options)] else -1
    if index < 0:
        return letter
    return LETTERS[next(i for i, o in enumerate(options) if o == options[index])]


def _interleave(benchmark: str, rows: list[dict]) -> list[ImageQuestion]:
    wanted = INTERLEAVE_SUBSETS.get(benchmark)
    out = []
    for i, row in enumerate(rows):
        _need(row, ("sample_id", "sub_task", "question", "answer"), f"LLaVA-Interleave row {i}")
        if (wanted and row["sub_task"] != wanted) or row.get("question_type", "multi-choice") != "multi-choice":
            continue
        images = tuple(image_bytes(row[f"image_{k}"], f"LLaVA-Interleave {row['sample_id']}")
                       for k in range(16) if row.get(f"image_{k}") is not None)
        answer = str(row["answer"]).strip().strip("()")
        out.append(ImageQuestion(qid=str(row["sample_id"]), benchmark=benchmark, task=row["sub_task"],
                                 question=row["question"], images=images,
                                 options=interleave_options(row["question"], answer), answer=answer,
                                 fields={"raw_answer": row["answer"], "question_type": row.get("question_type")}))
    return out


def _mantis(rows: list[dict]) -> list[ImageQuestion]:
    out = []
    for i, row in enumerate(rows):
        _need(row, ("id", "question", "options", "answer", "images", "question_type"), f"Mantis-Eval row {i}")
        if row["question_type"] != "multi-choice":
            continue  # short-answer questions: not multiple choice (the model card's Mantis-Eval is the MC set)
        raw = list(row["options"])
        options = tuple(_unletter(o) for o in raw)
        answer = str(row["answer"]).strip("()\n ")
        out.append(ImageQuestion(qid=str(row["id"]), benchmark="mantis_eval", task=str(row.get("category", "all")),
                                 question=row["question"],
                                 images=tuple(image_bytes(im, f"Mantis-Eval {row['id']}") for im in row["images"]),
                                 options=options, answer=answer, fields={"raw_options": raw}))
    return out


def _unletter(option: str) -> str:
    import re

    return re.sub(r"^\s*(\([A-Z]\)|[A-Z][\.:])\s*", "", option)


def _blink(root: Path, split: str) -> list[ImageQuestion]:
    files = sorted(root.rglob(f"{split}-*.parquet"))
    if not files:
        raise InputError(f"--data {root} has no BLINK split {split!r}: expected <Subtask>/{split}-*.parquet as in "
                         "HF BLINK-Benchmark/BLINK")
    out = []
    for path in files:
        for i, row in enumerate(read_parquet(path)):
            _need(row, ("idx", "choices", "answer", "prompt"), f"{path} row {i}")
            images = tuple(image_bytes(row[k], f"BLINK {row['idx']}") for k in sorted(row)
                           if k.startswith("image_") and k[6:].isdigit() and row[k] is not None)
            task = str(row.get("sub_task", path.parent.name))
            out.append(ImageQuestion(qid=str(row["idx"]), benchmark="blink", task=task,
                                     question=row.get("question", ""), images=images, options=tuple(row["choices"]),
                                     answer=str(row["answer"]).strip("()"), fields={"prompt": row["prompt"]}))
    return out


def load_image_questions(benchmark: str, data_dir: str | os.PathLike, tasks: Sequence[str] | None = None,
                         split: str | None = None, protocol: str = "official") -> list[ImageQuestion]:
    """Every question of ``benchmark`` under ``data_dir`` (either layout), in dataset order; ``tasks`` keeps those
    whose ``task`` is listed; ``split`` overrides :data:`DEFAULT_SPLITS` (parquet layouts). Mantis-Eval and BLINK
    come from the LLaVA-Interleave out-domain set under ``official`` (its subsets are what the official code
    scores) and from their own repos under ``lmms_eval``."""


    if benchmark not in IMAGE_BENCHMARKS:
        raise InputError(f"unknown image benchmark {benchmark!r}; choose one of {', '.join(IMAGE_BENCHMARKS)}")
    root = Path(data_dir).expanduser()
    interleave_subset = protocol == "official" and benchmark in ("mantis_eval", "blink")
    split = split or ("test" if interleave_subset else DEFAULT_SPLITS[benchmark])
    if not root.is_dir():
        raise InputError(f"--data {data_dir} is not a folder ({expected(benchmark, split)})")
    if interleave_subset:
        official = find_official(benchmark, root, _LOADERS, DEFAULT_SPLITS)
        questions = official() if official is not None else \
            _interleave(benchmark, parquet_rows(root, benchmark, split, "out_of_domain"))
    else:
        official = find_official(benchmark, root, _LOADERS, DEFAULT_SPLITS)
        questions = official() if official is not None else _LOADERS[benchmark](root, split)
    return with_tasks(questions, tasks, benchmark, data_dir, expected(benchmark, split))


_Loader = Callable[[Path, str], list[ImageQuestion]]


def _rows_loader(benchmark: str, convert: Callable[[str, list[dict]], list[ImageQuestion]]) -> _Loader:
    def load(root: Path, split: str) -> list[ImageQuestion]:
        return convert(benchmark, parquet_rows(root, benchmark, split))

    return load


_LOADERS: dict[str, _Loader] = {
    **{b: _rows_loader(b, lambda name, rows: _vqa(name, rows, name)) for b in ("vqav2", "okvqa", "textvqa",
                                                                           "vizwiz_vqa")},
    "gqa": _gqa,
    "pope": _pope,
    "ai2d": _rows_loader("ai2d", lambda name, rows: _ai2d(rows)),
    "mmbench_en": _rows_loader("mmbench_en", _mmbench),
    "mmbench_cn": _rows_loader("mmbench_cn", _mmbench),
    "mmvet": _rows_loader("mmvet", lambda name, rows: _mmvet(rows)),
    "nlvr2": _rows_loader("nlvr2", lambda name, rows: _nlvr2(rows)),
    "qbench2": _rows_loader("qbench2", lambda name, rows: _qbench2(rows)),
    **{b: _rows_loader(b, _interleave) for b in ("llava_interleave", "mathverse_mv", "sciverse_mv")},
    "mantis_eval": _rows_loader("mantis_eval", lambda name, rows: _mantis(rows)),
    "blink": _blink,
}
