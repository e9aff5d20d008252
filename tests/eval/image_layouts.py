"""Tiny image-table datasets in their real layouts: HF parquet with embedded PNGs (lmms-lab and the other repos
lmms-eval reads) and the official mPLUG-Owl3 evaluation folder (dataset/ json files, images/ beside them)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from tests.eval.layouts import _json, _parquet


def png(width: int, height: int, shade: int = 0) -> bytes:
    image = Image.new("RGB", (width, height), (shade, 255 - shade, (3 * shade) % 256))
    for x in range(0, width, 7):
        image.putpixel((x, (x * 3) % height), (255, 0, 0))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def cell(data: bytes, name: str = "x.png") -> dict:
    return {"bytes": data, "path": name}


def make_pope_parquet(root: Path) -> Path:
    """lmms-lab/POPE default config: data/test-*.parquet with a category column."""
    rows = [{"id": str(i), "question_id": str(i), "question": q, "answer": a, "image_source": f"COCO_{i}",
             "image": cell(png(300 + 40 * i, 200, 30 * i)), "category": cat}
            for i, (q, a, cat) in enumerate([("Is there a dog in the image?", "yes", "random"),
                                             ("Is there a car in the image?", "no", "random"),
                                             ("Is there a cup in the image?", "no", "adversarial")])]
    _parquet(root / "data" / "test-00000-of-00001.parquet", rows)
    return root


def make_okvqa_parquet(root: Path) -> Path:
    rows = [{"question_id": 2971475, "question": "What sport can you use this for?", "image": cell(png(500, 375)),
             "answers": ["racing"] * 5 + ["motocross"] * 5, "question_type": "one", "answer_type": "other"},
            {"question_id": 57585, "question": "How many wheels?", "image": cell(png(240, 640, 60)),
             "answers": ["two"] * 6 + ["2"] * 4, "question_type": "how", "answer_type": "number"}]
    _parquet(root / "data" / "val2014-00000-of-00001.parquet", rows)
    return root


def make_vqav2_test_parquet(root: Path) -> Path:
    rows = [{"question_id": 262144005 + i, "question": q, "image": cell(png(640, 480, 10 * i)), "answers": None,
             "question_type": "what", "answer_type": None}
            for i, q in enumerate(["What is the man holding?", "Is it raining?"])]
    _parquet(root / "data" / "test-00000-of-00001.parquet", rows)
    return root


def make_mmbench_parquet(root: Path) -> Path:
    """lmms-lab/MMBench en/dev: question 7 with a circular copy (index + 1e6, options rotated)."""
    base = {"question": "What is the color of the sky?", "hint": None, "category": "attribute_recognition",
            "L2-category": "finegrained_perception", "source": "x", "split": "dev", "E": None}
    rows = [dict(base, index=7, A="blue", B="green", C="red", D="black", answer="A", image=cell(png(512, 512))),
            dict(base, index=1_000_007, A="green", B="red", C="black", D="blue", answer="D", image=cell(png(512, 512))),
            dict(base, index=12, question="Which animal?", hint="A farm.", A="cow", B="cat", C=None, D=None,
                 answer="A", category="object_localization", image=cell(png(200, 420, 90)))]
    _parquet(root / "en" / "dev-00000-of-00001.parquet", rows)
    return root


def make_interleave_parquet(root: Path) -> Path:
    """lmms-lab/LLaVA-NeXT-Interleave-Bench out_of_domain/test-*.parquet (Mantis, MathVerse, BLINK rows)."""
    def row(sid: str, sub: str, question: str, answer: str, n: int) -> dict:
        out = {"sample_id": sid, "sub_task": sub, "question": question, "answer": answer,
               "question_type": "multi-choice"}
        for k in range(16):
            out[f"image_{k}"] = cell(png(100 + 20 * k, 120, 40 * k)) if k < n else None
        return out

    rows = [row("m1", "Mantis", "<image> <image> Which image shows a cat?\n(A) first\n(B) second\n"
                "Answer with the option's letter from the given choices directly.", "B", 2),
            row("v1", "MathVerse", "<image><image>Which view is the top view?\nA. left\nB. right\nC. none", "A", 2),
            row("b1", "BLINK", "<image> <image> Which is closer?\n(A) the box\n(B) the ball", "(A)", 2)]
    _parquet(root / "out_of_domain" / "test-00000-of-00001.parquet", rows)
    return root


def make_official_folder(root: Path) -> Path:
    """The official evaluation folder: POPE jsonl + COCO val2014 images, NLVR2 (HF parquet under dataset/), MM-Vet,
    and the LLaVA-Interleave out-domain json with its images."""
    images = root / "images" / "mscoco" / "images" / "val2014"
    images.mkdir(parents=True)
    for i in range(2):
        (images / f"COCO_val2014_00000000000{i}.jpg").write_bytes(png(640, 360 + 100 * i, 20 * i))
    lines = [{"question_id": i, "image": f"COCO_val2014_00000000000{i}.jpg", "question": q, "answer": a,
              "label": a} for i, (q, a) in enumerate([("Is there a person in the image?", "yes"),
                                                       ("Is there a zebra in the image?", "no")])]
    path = root / "dataset" / "pope" / "ImageQA_POPE_random.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    _parquet(root / "dataset" / "NLVR2" / "data" / "unbalanced_test_public-00000-of-00001.parquet",
             [{"identifier": "test1-0-1-0", "question": "The left image contains twice the number of dogs.",
               "left_image": cell(png(320, 240)), "right_image": cell(png(200, 300, 80)), "answer": "False"},
              {"identifier": "test1-0-1-1", "question": "One image shows a beach.",
               "left_image": cell(png(300, 300, 40)), "right_image": cell(png(260, 180, 120)), "answer": "True"}])
    mm = root / "images" / "mmvet" / "images"
    mm.mkdir(parents=True)
    (mm / "v1_0.png").write_bytes(png(400, 300))
    _json(root / "dataset" / "mmvet" / "mm-vet.json",
          {"v1_0": {"imagename": "v1_0.png", "question": " What is x in the equation? ", "answer": "-1 <AND> -5",
                    "capability": ["ocr", "math"]}})
    il = root / "dataset" / "LLaVA-NeXT-Interleave-Bench" / "eval_images_fix"
    il.mkdir(parents=True)
    for name in ("b0.jpg", "b1.jpg", "s0.jpg"):
        (il / name).write_bytes(png(150, 150, len(name) * 9))
    _json(root / "dataset" / "LLaVA-NeXT-Interleave-Bench" / "multi_image_out_domain.json", [
        {"sample_id": 1, "image": ["b0.jpg", "b1.jpg"], "metadata": {"dataset": "BLINK", "question_type":
                                                                      "multi-choice"},
         "conversations": [{"from": "human", "value": "<image><image>Which image is brighter?\n(A) first\n(B) second"},
                           {"from": "gpt", "value": "(B)"}]},
        {"sample_id": 2, "image": ["s0.jpg"], "metadata": {"dataset": "SciVerse", "question_type": "multi-choice"},
         "conversations": [{"from": "human", "value": "<image>Which diagram matches?\nA. 1\nB. 2\nC. 3\nD. 4\n"
                            "Answer with the option's letter from the given choices directly."},
                           {"from": "gpt", "value": "C"}]},
    ])
    return root


def make_gqa_parquet(root: Path) -> Path:
    """lmms-lab/GQA: questions in testdev_balanced_instructions, images in testdev_balanced_images."""
    _parquet(root / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet",
             [{"id": "201307251", "imageId": "n435808", "question": "Is it a table or a chair?", "answer": "table",
               "fullAnswer": "It is a table."}])
    _parquet(root / "testdev_balanced_images" / "testdev-00000-of-00001.parquet",
             [{"id": "n435808", "image": cell(png(500, 333))}, {"id": "n000001", "image": cell(png(10, 10))}])
    return root


def make_official_okvqa(root: Path) -> Path:
    """dataset/okvqa/okvqa_val.json + the VQA-format annotations; images under images/mscoco/images/val2014."""
    _json(root / "dataset" / "okvqa" / "okvqa_val.json",
          [{"image": "val2014/COCO_val2014_000000297147.jpg", "question": "What sport can you use this for?",
            "question_id": 2971475}])
    _json(root / "dataset" / "okvqa" / "mscoco_val2014_annotations.json",
          {"annotations": [{"question_id": 2971475, "answers": [{"answer": "racing", "answer_id": i + 1}
                                                                  for i in range(10)]}]})
    _json(root / "dataset" / "okvqa" / "OpenEnded_mscoco_val2014_questions.json", {"questions": []})
    return root
