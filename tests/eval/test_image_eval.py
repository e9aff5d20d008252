"""The image tables: prompts byte for byte against the upstream templates, loaders on tiny datasets in each real
layout, and `owlvid eval` end to end with a tiny mPLUG-Owl3 (answers equal `model.generate` on the same prompt,
images and cut setting; the recorded cut grid is the processor's)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from owlvid.errors import InputError
from owlvid.eval.image_datasets import ImageQuestion, load_image_questions
from owlvid.eval.image_protocols import get_image_protocol
from owlvid.eval.image_runner import run_images
from owlvid.models.owl3.processor import select_grid
from tests.eval.image_layouts import (
    make_gqa_parquet,
    make_interleave_parquet,
    make_mmbench_parquet,
    make_official_folder,
    make_official_okvqa,
    make_okvqa_parquet,
    make_pope_parquet,
    make_vqav2_test_parquet,
)
from tests.eval.test_end_to_end import run_cli

pytest.importorskip("pyarrow")

OWL = "Answer with the option’s letter from the given choices directly."  # upstream U+2019
ASCII = "Answer with the option's letter from the given choices directly."


def q(benchmark: str, question: str, **kw) -> ImageQuestion:
    return ImageQuestion(qid="1", benchmark=benchmark, task=kw.pop("task", "all"), question=question,
                         images=kw.pop("images", (b"x",)), **kw)


def test_official_prompts_byte_for_byte() -> None:
    def text(item: ImageQuestion) -> str:
        return get_image_protocol(item.benchmark, "official").prompt(item)

    # vqa.py ds_prompt "<|image|>{} Answer the question using a single word or phrase."
    assert text(q("okvqa", "What sport can you use this for?")) == \
        "<|image|>What sport can you use this for? Answer the question using a single word or phrase."
    assert text(q("vizwiz_vqa", "what is this?")) == ("<|image|>what is this? When the provided information is "
                                                      "insufficient, respond with 'Unanswerable'. Answer the question "
                                                      "using a single word or phrase.")
    # MultiOptionTask.prompt '<|image|>Context: {}\nQuestion: {}\nOptions: {}\nAnswer with the option’s letter ...'
    assert text(q("mmbench_en", "Which animal?", options=("cow", "cat"), fields={"hint": None})) == \
        f"<|image|>Context: N/A\nQuestion: Which animal?\nOptions: A. cow\nB. cat\n{OWL}"
    assert text(q("ai2d", "What eats grass?", options=("cow", "cat", "owl"))) == \
        f"<|image|>\nQuestion: What eats grass?\nOptions:\nA. cow\nB. cat\nC. owl\n{OWL}"
    assert text(q("nlvr2", "Two dogs.", images=(b"l", b"r"))) == \
        "Left image: <|image|> Right image: <|image|>\nTwo dogs.\nyes or no? Answer the question using a single word."
    assert text(q("qbench2", "Which is sharper?", images=(b"1", b"2"), options=("first", "second"))) == \
        f"Image 1: <|image|>\nImage 2: <|image|>\nQuestion: Which is sharper?\nOptions: A. first\nB. second\n{OWL}"
    assert text(q("mmvet", " What is x? ")) == "<|image|>\nWhat is x?"
    # llava_interleave_bench.py: BLINK ordinals, others "Image n: ", then format_question
    blink = q("blink", "<image><image>Which?\n(A) a\n(B) b", task="BLINK", images=(b"1", b"2"), options=("a", "b"),
              fields={"question_type": "multi-choice"})
    assert text(blink) == f"the first image: <|image|> the second image: <|image|> Which?\n(A) a\n(B) b\n{OWL}"
    mantis = q("mantis_eval", f"<image> <image> Which?\n(A) a\n(B) b\n{ASCII}", task="Mantis", images=(b"1", b"2"),
               options=("a", "b"), fields={"question_type": "multi-choice"})
    assert text(mantis) == f"Image 1: <|image|>  Image 2: <|image|>  Which?\n(A) a\n(B) b\n{ASCII}"
    sci = q("sciverse_mv", f"<image>Which?\nA. 1\nB. 2\n{ASCII}", task="SciVerse", options=("1", "2"),
            fields={"question_type": "multi-choice"})
    assert text(sci) == ("Image 1: <|image|> Which?\nA. 1\nB. 2\n\nPlease select the correct paired scientific "
                         f"diagram from four given images. {ASCII}")


def test_lmms_eval_prompts_byte_for_byte() -> None:
    def text(item: ImageQuestion) -> str:
        return get_image_protocol(item.benchmark, "lmms_eval").prompt(item)

    assert text(q("vqav2", "What is this?")) == \
        "<|image|>\nWhat is this?\nAnswer the question using a single word or phrase."
    # ok_vqa post_prompt carries the 'Unanswerable' sentence; textvqa/vizwiz capitalize() the question
    assert text(q("okvqa", "Why?")) == ("<|image|>\nWhy?\nWhen the provided information is insufficient, respond "
                                        "with 'Unanswerable'.\nAnswer the question using a single word or phrase.")
    assert text(q("textvqa", "what is the Brand name?")) == \
        "<|image|>\nWhat is the brand name?\nAnswer the question using a single word or phrase."
    assert text(q("pope", " Is there a dog? ")) == \
        "<|image|>\nIs there a dog?\nAnswer the question using a single word or phrase."
    assert text(q("ai2d", "What eats grass?", options=("cow", "cat"))) == \
        f"<|image|>\nWhat eats grass?\nA. cow\nB. cat\n{ASCII}"
    assert text(q("mmbench_en", "Which animal?", options=("cow", "cat"), fields={"hint": "A farm."})) == \
        f"<|image|>\nA farm. Which animal? There are several options:\nA. cow\nB. cat\n\n{ASCII}"
    assert text(q("mmbench_cn", "哪个?", options=("牛", "猫"), fields={"hint": None})) == \
        "<|image|>\n哪个? There are several options:\nA. 牛\nB. 猫\n\n请直接使用所提供的选项字母作为答案回答。"
    assert text(q("qbench2", "Which?", images=(b"1", b"2"), options=("first", "second"))) == \
        f"<|image|><|image|>\nWhich?\nA. first\nB. second\n{ASCII}\n"
    mantis = q("mantis_eval", "<image> <image> Which?", images=(b"1", b"2"), options=("a", "b"),
               fields={"raw_options": ["(A) a", "(B) b"]})
    assert text(mantis) == f"<|image|> <|image|> Which?\n{ASCII}['(A) a', '(B) b']"
    blink = q("blink", "", images=(b"1", b"2"), options=("(A)", "(B)", "(C)"), fields={"prompt": "Which is closer?"})
    assert text(blink) == ("<|image|><|image|>\nNote: You only need to respond with A, B, C without providing any "
                           "additional information.\nWhich is closer?")


def test_cut_settings_follow_the_official_plan() -> None:
    assert get_image_protocol("pope", "official").cut(1) and get_image_protocol("ai2d", "official").cut(1)
    assert not get_image_protocol("nlvr2", "official").cut(2) and not get_image_protocol("qbench2", "official").cut(2)
    assert not get_image_protocol("blink", "official").cut(2)
    assert get_image_protocol("pope", "lmms_eval").cut(1) and not get_image_protocol("blink", "lmms_eval").cut(2)
    with pytest.raises(InputError, match="defines no NLVR2"):
        get_image_protocol("nlvr2", "lmms_eval")


def test_loaders_read_each_layout(tmp_path) -> None:
    pope = load_image_questions("pope", make_pope_parquet(tmp_path / "pope"))
    assert [(x.qid, x.task, x.answer) for x in pope] == [("random/0", "random", "yes"), ("random/1", "random", "no"),
                                                          ("adversarial/2", "adversarial", "no")]
    assert isinstance(pope[0].images[0], bytes) and pope[0].images[0][:4] == b"\x89PNG"
    ok = load_image_questions("okvqa", make_okvqa_parquet(tmp_path / "okvqa"))
    assert ok[1].answers == ("two",) * 6 + ("2",) * 4 and ok[1].task == "number"
    mmb = load_image_questions("mmbench_en", make_mmbench_parquet(tmp_path / "mmb"), split="dev")
    assert [(x.qid, x.group, x.options, x.answer) for x in mmb][:2] == [
        ("7", "7", ("blue", "green", "red", "black"), "A"), ("1000007", "7", ("green", "red", "black", "blue"), "D")]
    assert mmb[2].options == ("cow", "cat")
    inter = make_interleave_parquet(tmp_path / "il")
    assert [x.qid for x in load_image_questions("mathverse_mv", inter)] == ["v1"]
    blink = load_image_questions("blink", inter, protocol="official")  # the out-domain BLINK subset
    assert [(x.qid, x.answer, len(x.images), x.options) for x in blink] == [("b1", "A", 2, ("the box", "the ball"))]
    official = make_official_folder(tmp_path / "evaluation")
    pope = load_image_questions("pope", official)
    assert pope[0].images[0] == official / "images/mscoco/images/val2014/COCO_val2014_000000000000.jpg"
    nlvr2 = load_image_questions("nlvr2", official)
    assert [x.answer for x in nlvr2] == ["no", "yes"] and len(nlvr2[0].images) == 2
    sci = load_image_questions("sciverse_mv", official)
    assert [(x.qid, x.answer, x.options) for x in sci] == [("2", "C", ("1", "2", "3", "4"))]
    gqa = load_image_questions("gqa", make_gqa_parquet(tmp_path / "gqa"))
    assert [(x.qid, x.answer, x.question) for x in gqa] == [("201307251", "table", "Is it a table or a chair?")]
    assert gqa[0].images[0][:4] == b"\x89PNG"
    okvqa = load_image_questions("okvqa", make_official_okvqa(tmp_path / "ev2"))
    assert okvqa[0].answers == ("racing",) * 10
    assert okvqa[0].images[0] == tmp_path / "ev2/images/mscoco/images/val2014/COCO_val2014_000000297147.jpg"
    with pytest.raises(InputError) as e:
        load_image_questions("gqa", tmp_path / "pope")
    assert "\n" not in str(e.value) and "testdev_balanced_instructions/testdev-*.parquet" in str(e.value)


@pytest.fixture(scope="module")
def owl3(tiny_owl3_models):
    return tiny_owl3_models["241101"]


def by_qid(outdir: Path) -> dict[str, dict]:
    return {r["qid"]: r for r in map(json.loads, (outdir / "predictions.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_pope_official_end_to_end_answers_as_generate_and_records_the_cut_grid(owl3, tmp_path) -> None:
    data = make_pope_parquet(tmp_path / "pope")
    results = run_images("pope", data, owl3, tmp_path / "out", progress=False)
    records = by_qid(tmp_path / "out")
    proto = get_image_protocol("pope", "official")
    size = owl3.runtime.describe()["image_size"]
    for k, question in enumerate(load_image_questions("pope", data)):
        r = records[question.qid]
        if k == 0:  # one reference generation (CPU time): the same prompt, image and cut setting
            expected = owl3.generate([{"role": "user", "content": proto.prompt(question)}],
                                     images=list(question.images), cut_enable=True, **proto.generation)
            assert r["response"] == expected.text
        assert r["cut_enable"] is True
        image = r["images"][0]
        rows, cols = select_grid(image["width"], image["height"], size)
        assert image["cut_grid"] == [rows, cols] and image["crops"] == rows * cols + 1
        assert image["source"] == f"embedded:pope/{question.qid}#0" and len(image["sha256"]) == 64
        assert r["prompt"] == f"<|image|>{question.question} Answer the question using a single word or phrase."
    assert set(results["pope"]) == {"random", "adversarial"}
    assert results["score_rule"].startswith("mean F1 over the POPE")
    assert results["scored"] == 3 and results["unparsed"] == sum(r["parsed"] is False for r in records.values())
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == results


@pytest.mark.slow
def test_multi_image_subsets_and_mmbench_circular(owl3, tmp_path) -> None:
    inter = make_interleave_parquet(tmp_path / "il")
    out = tmp_path / "mantis"
    results = run_images("mantis_eval", inter, owl3, out, progress=False)  # official: the out-domain Mantis rows
    r = by_qid(out)["m1"]
    assert r["cut_enable"] is False and [i["cut_grid"] for i in r["images"]] == [None, None]
    assert [i["crops"] for i in r["images"]] == [1, 1] and results["scored"] == 1
    mmb = make_mmbench_parquet(tmp_path / "mmb")
    results = run_images("mmbench_en", mmb, owl3, tmp_path / "mmbo", split="dev", progress=False)
    records = by_qid(tmp_path / "mmbo")
    hit7 = records["7"]["correct"] and records["1000007"]["correct"]
    assert results["circular_groups"] == 2
    assert results["score"] == round(100 * (hit7 + bool(records["12"]["correct"])) / 2, 2)


@pytest.mark.slow
def test_test_splits_write_submission_files(owl3, tmp_path) -> None:
    data = make_vqav2_test_parquet(tmp_path / "vqav2")
    results = run_images("vqav2", data, owl3, tmp_path / "v", progress=False)
    submission = json.loads(Path(results["submission_file"]).read_text())
    records = by_qid(tmp_path / "v")
    assert [s["question_id"] for s in submission] == [262144005, 262144006]
    assert results["score"] is None and results["unscored"] == 2 and records["262144005"]["correct"] is None
    from owlvid.eval.vqa_scoring import evalai_process

    assert submission[0]["answer"] == evalai_process(records["262144005"]["response"].strip())
    official = make_official_folder(tmp_path / "evaluation")
    results = run_images("mmvet", official, owl3, tmp_path / "mmvet", progress=False)
    judged = json.loads(Path(results["submission_file"]).read_text())
    assert list(judged) == ["v1_0"]
    assert by_qid(tmp_path / "mmvet")["v1_0"]["prompt"] == "<|image|>\nWhat is x in the equation?"


@pytest.mark.slow
def test_cli_runs_image_benchmarks_and_compares_with_the_card(tmp_path, tiny_owl3_dirs) -> None:
    named = tmp_path / "mPLUG-Owl3-7B-240728"
    shutil.copytree(tiny_owl3_dirs["240728"], named)
    official = make_official_folder(tmp_path / "evaluation")
    outs = []
    for benchmark, extra in (("nlvr2", []), ("pope", []), ("okvqa", ["--protocol", "lmms_eval"])):
        data = official if benchmark != "okvqa" else make_okvqa_parquet(tmp_path / "okvqa")
        out = tmp_path / benchmark
        p = run_cli("eval", benchmark, "--data", str(data), "--model", str(named), "--device", "cpu", "--dtype",
                    "float32", "-o", str(out), "--no-progress", *extra)
        assert p.returncode == 0, p.stderr
        score = json.loads((out / "results.json").read_text())["score"]
        assert ("score -" if score is None else f"score {score:.2f}") in p.stdout
        outs.append(out)
    assert by_qid(tmp_path / "pope")["random/0"]["images"][0]["cut_grid"] is not None  # 240728: v2 cut prompt
    p = run_cli("eval", "compare", *map(str, outs))
    assert p.returncode == 0, p.stderr
    table = p.stdout.splitlines()
    assert "published mPLUG-Owl3-7B-240728" in table[0]
    assert next(x for x in table if x.startswith("NLVR2")).rstrip().endswith("90.8")
    assert next(x for x in table if x.startswith("POPE")).rstrip().endswith("88.2")
    assert next(x for x in table if x.startswith("OK-VQA")).rstrip().endswith("60.1")
    p = run_cli("eval", "nlvr2", "--protocol", "lmms_eval", "--data", str(official), "--model", str(named), "-o",
                str(tmp_path / "x"))
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "owlvid: error: lmms-eval@75571cf defines no NLVR2 task; use --protocol official"]


def test_pope_headline_per_protocol_from_prediction_lines() -> None:
    from owlvid.eval.image_results import summarize_images

    answers = [("random", "Yes", "yes"), ("random", "no", "yes"), ("popular", "yes", "no"), ("popular", "Yes.", "yes")]
    questions = [q("pope", "x", task=t) for t, _, _ in answers]
    questions = [ImageQuestion(**{**x.__dict__, "qid": str(i)}) for i, x in enumerate(questions)]
    records = [{"qid": str(i), "task": t, "response": r, "answer": a, "error": None, "correct": r.lower() == a,
                "score": float(r.lower() == a), "parsed": True} for i, (t, r, a) in enumerate(answers)]
    official = summarize_images(get_image_protocol("pope", "official"), questions, records, {"benchmark": "pope"}, {})
    # random: tp 1, fn 1 -> P 1, R .5, F1 2/3; popular: tp 1, fp 1 -> P .5, R 1, F1 2/3
    assert official["score"] == 66.67 and set(official["pope"]) == {"random", "popular"}
    lmms = summarize_images(get_image_protocol("pope", "lmms_eval"), questions, records, {"benchmark": "pope"}, {})
    # all four: "Yes." is no answer to lmms-eval: tp 1, fp 1, fn 1 -> F1 1/2; yes_ratio = ground-truth yes 3/4
    assert lmms["score"] == 50.0 and lmms["pope"]["all"]["yes_ratio"] == 75.0
    assert lmms["pope"]["random"]["accuracy"] == 50.0


def test_qbench2_official_truth_is_the_first_option_with_the_right_text(tmp_path) -> None:
    from tests.eval.image_layouts import _parquet, cell, png

    _parquet(tmp_path / "qb" / "data" / "dev-00000-of-00001.parquet", [
        {"id": 0, "image1": cell(png(50, 50)), "image2": cell(png(60, 40)), "question": "Which is sharper?",
         "question_type": 0, "question_concern": 1, "option0": "the first", "option1": "the second",
         "option2": "the first", "option3": "N/A", "correct_choice": "C"}])
    (question,) = load_image_questions("qbench2", tmp_path / "qb")
    assert question.options == ("the first", "the second", "the first") and question.answer == "C"
    assert question.fields["official_answer"] == "A"  # qbench.py maps the text back to its first letter


@pytest.mark.parametrize("release", ["240728", "241101"])
def test_official_image_prompt_tokens_equal_the_official_messages(tiny_owl3_models, release) -> None:
    """VQATask.__getitem__ gives [system "", user, assistant "None"] and general_task_pipeline2 cuts (cut_cfg):
    the same prompt ids as owlvid's one user turn with cut_enable True; the cut prompt is the checkpoint's."""
    from tests.eval.image_layouts import png

    model = tiny_owl3_models[release]
    item = q("pope", "Is there a dog in the image?", images=(png(600, 300),))
    proto = get_image_protocol("pope", "official")
    _, ids = model.prepare(proto.messages(item), images=list(item.images), cut_enable=proto.cut(1))
    official = [{"role": "system", "content": ""},
                {"role": "user", "content": "<|image|>Is there a dog in the image? Answer the question using a single "
                                            "word or phrase."},
                {"role": "assistant", "content": "None"}]
    _, expected = model.prepare(official, images=list(item.images), cut_enable=True)
    assert ids == expected
    text = model.runtime.tokenizer.decode(ids)
    rows, cols = select_grid(600, 300, model.runtime.describe()["image_size"])
    v2 = f"Cut to {rows} rows {cols} columns with a global view"
    cut = v2 if release == "240728" else f"<|start_cut|>{rows}*{cols}"
    assert cut in text and text.endswith("Is there a dog in the image? Answer the question using a single word or "
                                         "phrase.\nassistant\n")


def test_image_runs_share_the_video_runs_folder_safety(owl3, tmp_path) -> None:
    """One run per folder (the lock of the video runs), and a predictions file that is not ours is refused
    untouched: the image tables write through the same records code."""
    from owlvid import records

    data = make_pope_parquet(tmp_path / "pope")
    out = tmp_path / "out"
    out.mkdir()
    with records.exclusive(out / "predictions.jsonl"), pytest.raises(InputError, match="another owlvid run"):
        run_images("pope", data, owl3, out, progress=False)
    config = '{"not": "predictions"}'
    (out / "predictions.jsonl").write_text(config)
    with pytest.raises(InputError, match="not"):
        run_images("pope", data, owl3, out, progress=False)
    assert (out / "predictions.jsonl").read_text() == config and not (out / "run.json").exists()
