"""The official evaluation folder of mPLUG-Owl3 (its README "Evaluation"): ``dataset/`` with the annotation files the
task classes read, ``images/`` beside it (X-PLUG/mPLUG-Owl@0f3068f ``tasks/task_define/{vqa,mmbench,
llava_interleave_bench}.py``: ``ds_collections`` paths, ``get_vqa_image_name``). ``--data`` is the folder that holds
``dataset/``. AI2D, NLVR2 and Q-Bench2 are HF parquet there too (``dataset/ai2d``, ``dataset/NLVR2``,
``dataset/qbench2``): the parquet loaders read them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import InputError
from .image_datasets import ImageQuestion, interleave_options
from .image_scoring import INTERLEAVE_SUBSETS

_VQA_FILES = {  # benchmark -> (questions file, annotation file or None), under dataset/
    "vqav2": ("vqav2/vqav2_test.json", None),
    "okvqa": ("okvqa/okvqa_val.json", "okvqa/mscoco_val2014_annotations.json"),
    "textvqa": ("textvqa/textvqa_val.json", "textvqa/textvqa_val_annotations.json"),
    "vizwiz_vqa": ("vizwiz/vizwiz_test.jsonl", None),
    "gqa": ("gqa/testdev_balanced.jsonl", None),
}
POPE_SPLITS = ("random", "popular", "adversarial")
_HF_FOLDERS = {"ai2d": "ai2d", "nlvr2": "NLVR2", "qbench2": "qbench2"}
INTERLEAVE_JSON = "LLaVA-NeXT-Interleave-Bench/multi_image_out_domain.json"
INTERLEAVE_IMAGES = "LLaVA-NeXT-Interleave-Bench/eval_images_fix"


def _load(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        return json.loads(text)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable annotation file ({' '.join(str(e).split())})") from None


def vqa_image_path(image: str, benchmark: str) -> str:
    """vqa.py ``get_vqa_image_name``: where the official code looks for a question's image, relative to the
    evaluation folder (the checks in its order: test2015, val2014, ocrvqa, gqa, then VizWiz test, textvqa)."""
    base = image.split("/")[-1]
    if "test2015" in image:
        return f"images/mscoco/images/test2015/{base}"
    if "val2014" in image:
        return f"images/mscoco/images/val2014/{base}"
    if "ocrvqa" in image:
        return f"images/ocrvqa/{image}"
    if "gqa" in image:
        return f"images/gqa/images/{base}"
    if benchmark == "vizwiz_vqa":
        return f"images/vizwiz/test/{base}"
    if "textvqa" in image:
        return f"images/textvqa/text_vqa/{base}"
    return image


def _annotations(path: Path) -> dict[int, list[str]]:
    data = _load(path)
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise InputError(f"{path}: expected a VQA annotation file ({{'annotations': [...]}})")
    return {int(a["question_id"]): [x["answer"] for x in a["answers"]] for a in anns}


def _vqa(benchmark: str, root: Path) -> list[ImageQuestion]:
    qfile, afile = _VQA_FILES[benchmark]
    rows = _load(root / "dataset" / qfile)
    answers = _annotations(root / "dataset" / afile) if afile else {}
    out = []
    for row in rows:
        if "images" in row:  # the other record form vqa.py accepts
            image, question, qid, annotation = row["images"], row["query"], row["data_id"], row.get("answer")
        else:
            image, question, qid, annotation = row["image"], row["question"], row["question_id"], row.get("answer")
        path = root / vqa_image_path(image, benchmark)
        if benchmark == "gqa":
            out.append(ImageQuestion(qid=str(qid), benchmark=benchmark, task="all", question=question, images=(path,),
                                     answer=annotation, fields={"question_id": qid}))
            continue
        gts = answers.get(int(qid)) if answers else None
        out.append(ImageQuestion(qid=str(qid), benchmark=benchmark, task="all", question=question, images=(path,),
                                 answers=tuple(gts) if gts else None, fields={"question_id": qid, "image": image}))
    return out


def _pope(root: Path) -> list[ImageQuestion]:
    out = []
    for split in POPE_SPLITS:
        path = root / "dataset" / "pope" / f"ImageQA_POPE_{split}.jsonl"
        if not path.is_file():
            continue
        for row in _load(path):
            out.append(ImageQuestion(qid=f"{split}/{row['question_id']}", benchmark="pope", task=split,
                                     question=row["question"], images=(root / vqa_image_path(row["image"], "pope"),),
                                     answer=str(row["answer"]).strip().lower(),
                                     fields={"question_id": row["question_id"]}))
    return out


def _mmbench(benchmark: str, root: Path) -> list[ImageQuestion]:
    lang = "en" if benchmark == "mmbench_en" else "cn"
    path = root / "dataset" / "mmbench" / f"mmbench_test_{lang}_20231003.jsonl"
    out = []
    for row in _load(path):
        answer = row.get("answer")
        letter = "ABCDE"[answer] if isinstance(answer, int) else None
        index = int(row["index"])
        out.append(ImageQuestion(qid=str(index), benchmark=benchmark, task=str(row.get("category") or "all"),
                                 question=row["question"], images=(root / "images" / row["image"],),
                                 options=tuple(row["choices"]), answer=letter, group=str(index % 1_000_000),
                                 fields={"hint": row.get("hint"), "index": index}))
    return out


def _mmvet(root: Path) -> list[ImageQuestion]:
    data = _load(root / "dataset" / "mmvet" / "mm-vet.json")
    out = []
    for i in range(len(data)):  # MMVetBench.__getitem__: key f"v1_{index}"
        d = data[f"v1_{i}"]
        out.append(ImageQuestion(qid=f"v1_{i}", benchmark="mmvet", task=str(d.get("capability", "all")),
                                 question=d["question"],
                                 images=(root / "images" / "mmvet" / "images" / d["imagename"],),
                                 fields={"answer": d.get("answer")}))
    return out


def _interleave(benchmark: str, root: Path) -> list[ImageQuestion]:
    """multi_image_out_domain.json: ``conversations[0].value`` (with ``<image>``), ``conversations[1].value`` (the
    truth), ``image`` (paths under eval_images_fix), ``metadata.dataset`` / ``question_type``."""
    wanted = INTERLEAVE_SUBSETS.get(benchmark)
    out = []
    for row in _load(root / "dataset" / INTERLEAVE_JSON):
        meta = row.get("metadata", {})
        if (wanted and meta.get("dataset") != wanted) or meta.get("question_type") != "multi-choice":
            continue
        question, truth = row["conversations"][0]["value"], str(row["conversations"][1]["value"])
        answer = truth.strip().strip("()")
        out.append(ImageQuestion(
            qid=str(row["sample_id"]), benchmark=benchmark, task=meta.get("dataset", ""), question=question,
            images=tuple(root / "dataset" / INTERLEAVE_IMAGES / p for p in row["image"]),
            options=interleave_options(question, answer), answer=answer,
            fields={"raw_answer": truth, "question_type": meta.get("question_type")}))
    return out


def find_official(benchmark: str, root: Path) -> Callable[[], list[ImageQuestion]] | None:
    """A loader for the official evaluation folder at ``root`` when it holds ``benchmark``'s files, else None."""
    dataset = root / "dataset"
    if not dataset.is_dir():
        return None
    if benchmark in _VQA_FILES and (dataset / _VQA_FILES[benchmark][0]).is_file():
        if _VQA_FILES[benchmark][1] and not (dataset / _VQA_FILES[benchmark][1]).is_file():
            raise InputError(f"{dataset / _VQA_FILES[benchmark][1]} is missing (the official {benchmark} answers)")
        return lambda: _vqa(benchmark, root)
    if benchmark == "pope" and any((dataset / "pope" / f"ImageQA_POPE_{s}.jsonl").is_file() for s in POPE_SPLITS):
        return lambda: _pope(root)
    if benchmark in ("mmbench_en", "mmbench_cn"):
        lang = "en" if benchmark == "mmbench_en" else "cn"
        if (dataset / "mmbench" / f"mmbench_test_{lang}_20231003.jsonl").is_file():
            return lambda: _mmbench(benchmark, root)
    if benchmark == "mmvet" and (dataset / "mmvet" / "mm-vet.json").is_file():
        return lambda: _mmvet(root)
    if benchmark in ("llava_interleave", *INTERLEAVE_SUBSETS) and (dataset / INTERLEAVE_JSON).is_file():
        return lambda: _interleave(benchmark, root)
    if benchmark in _HF_FOLDERS and (dataset / _HF_FOLDERS[benchmark]).is_dir():
        from .image_datasets import _LOADERS, DEFAULT_SPLITS

        folder = dataset / _HF_FOLDERS[benchmark]
        return lambda: _LOADERS[benchmark](folder, DEFAULT_SPLITS[benchmark])
    return None

