"""Protocols: the full prompt text per benchmark × protocol, frame counts and frame choice, generation
settings, defaults and errors. Expected strings are written out from the pinned upstream sources (see
owlvid/eval/protocols.py); note the typographic apostrophe (U+2019) of the official post-prompt and the
ASCII one of lmms-eval and the Slow-Fast fork."""

from __future__ import annotations

import random

import numpy as np
import pytest

from owlvid.errors import InputError
from owlvid.eval.protocols import (
    MLVU_DEV_TASK_TYPES,
    MVBENCH_LMMS_EVAL_FOLDERS,
    MVBENCH_TASKS,
    VIDEO,
    get_protocol,
    middle_indices,
    mlvu_question_text,
    mvbench_get_index,
    split_mlvu_question,
    unletter_option,
)
from owlvid.eval.scoring import Score

Q = "What does the man do after he opens the door"
OPTS = ["he sits down", "he picks up the cup", "he leaves", "he waves"]
NEXTQA_OPTS = OPTS + ["he sings"]
OFFICIAL_POST = "Answer with the option\u2019s letter from the given choices directly."
LMMS_POST = "Answer with the option's letter from the given choices directly."
SELECT = "Select the best answer to the following multiple-choice question based on the video."

# (benchmark, protocol) -> (text before the video, text after it); the video part comes in between.
PROMPTS = {
    ("mvbench", "official"): ("", (
        "Question: What does the man do after he opens the door\nOptions:\nA. he sits down\nB. he picks up the cup\n"
        "C. he leaves\nD. he waves\nAnswer with the option’s letter from the given choices directly.")),
    ("nextqa_mc", "official"): ("", (
        "Question: What does the man do after he opens the door\nOptions: A. he sits down\nB. he picks up the cup\n"
        "C. he leaves\nD. he waves\nE. he sings\nAnswer with the option’s letter from the given choices directly.")),
    ("videomme", "official"): ("", (
        "Question: What does the man do after he opens the door\nOptions: A. he sits down\nB. he picks up the cup\n"
        "C. he leaves\nD. he waves\nAnswer with the option’s letter from the given choices directly.")),
    ("longvideobench", "official"): ("Question: ", (
        "What does the man do after he opens the door\nOptions: A. he sits down\nB. he picks up the cup\n"
        "C. he leaves\nD. he waves\nAnswer with the option’s letter from the given choices directly.")),
    ("mvbench", "lmms_eval"): ("", (
        "Question:What does the man do after he opens the door\nOption:\n(A) he sits down\n(B) he picks up the cup\n"
        "(C) he leaves\n(D) he waves\nOnly give the best option.\n")),
    ("nextqa_mc", "lmms_eval"): ("", (
        "What does the man do after he opens the door\nA. he sits down\nB. he picks up the cup\nC. he leaves\n"
        "D. he waves\nE. he sings")),
    ("videomme", "lmms_eval"): ("", (
        "Select the best answer to the following multiple-choice question based on the video and the subtitles. "
        "Respond with only the letter (A, B, C, or D) of the correct option.\n"
        "What does the man do after he opens the door\nA. he sits down\nB. he picks up the cup\nC. he leaves\n"
        "D. he waves\n\nAnswer with the option's letter from the given choices directly.")),
    ("longvideobench", "lmms_eval"): ("", (
        "What does the man do after he opens the door\nA. he sits down\nB. he picks up the cup\nC. he leaves\n"
        "D. he waves\nAnswer with the option's letter from the given choices directly.\n")),
    ("mlvu", "lmms_eval"): ("", (
        "What does the man do after he opens the door\n(A) he sits down\n(B) he picks up the cup\n(C) he leaves\n"
        "(D) he waves\nOnly give the best option.\nBest option: (")),
    ("mvbench", "slowfast"): ("", (
        "Select the best answer to the following multiple-choice question based on the video. Respond with only "
        "the letter (A, B, C, or D) of the correct option.\nWhat does the man do after he opens the door\n"
        "A. he sits down\nB. he picks up the cup\nC. he leaves\nD. he waves\n"
        "Answer with the option's letter from the given choices directly.")),
    ("nextqa_mc", "slowfast"): ("", (
        "Select the best answer to the following multiple-choice question based on the video.\n"
        "What does the man do after he opens the door?\nA. he sits down\nB. he picks up the cup\nC. he leaves\n"
        "D. he waves\nE. he sings\nAnswer with the option's letter from the given choices directly.")),
    ("videomme", "slowfast"): ("", (
        "Select the best answer to the following multiple-choice question based on the video.\n"
        "What does the man do after he opens the door\nA. he sits down\nB. he picks up the cup\nC. he leaves\n"
        "D. he waves\nAnswer with the option's letter from the given choices directly.")),
    ("longvideobench", "slowfast"): ("", (
        "Select the best answer to the following multiple-choice question based on the video.\n"
        "What does the man do after he opens the door\nA. he sits down\nB. he picks up the cup\nC. he leaves\n"
        "D. he waves\nAnswer with the option's letter from the given choices directly.\n")),
    ("mlvu", "slowfast"): ("", (
        "Select the best answer to the following multiple-choice question based on the video.\n"
        "What does the man do after he opens the door?\nA. he sits down\nB. he picks up the cup\nC. he leaves\n"
        "D. he waves\nAnswer with the option's letter from the given choices directly.")),
}


@pytest.mark.parametrize("benchmark,protocol", list(PROMPTS), ids=[f"{b}-{p}" for b, p in PROMPTS])
def test_prompt_text_byte_for_byte(benchmark, protocol):
    before, after = PROMPTS[(benchmark, protocol)]
    options = NEXTQA_OPTS if benchmark == "nextqa_mc" else OPTS
    messages = get_protocol(benchmark, protocol).messages(Q, options)
    expected = ([{"type": "text", "text": before}] if before else []) + [
        {"type": "video", "video": VIDEO}, {"type": "text", "text": after}]
    assert messages == [{"role": "user", "content": expected}]
    assert ("\u2019" in after) == (protocol == "official")


def test_option_whitespace_follows_each_protocol():
    # official qa_template rstrips the whole block (the last option's trailing space goes), NExT-QA keeps
    # a{i} as is; lmms-eval and the fork strip NExT-QA options (doc[f'a{i}'].strip()).
    text = get_protocol("mvbench", "official").messages("Q?", [" x ", "y "])[0]["content"][-1]["text"]
    assert text == "Question: Q?\nOptions:\nA.  x \nB. y\n" + OFFICIAL_POST
    text = get_protocol("nextqa_mc", "official").messages("Q ", [" x ", "y "])[0]["content"][-1]["text"]
    assert text == "Question: Q \nOptions: A.  x \nB. y \n" + OFFICIAL_POST
    text = get_protocol("nextqa_mc", "lmms_eval").messages(" Q ", [" x ", "y "])[0]["content"][-1]["text"]
    assert text == "Q\nA. x\nB. y"
    # the fork appends "?" unless the stripped question ends with "."
    text = get_protocol("nextqa_mc", "slowfast").messages("why is it so.", ["x"])[0]["content"][-1]["text"]
    assert text == SELECT + "\nwhy is it so.\nA. x\n" + LMMS_POST


def test_longvideobench_official_drops_the_dataset_video_placeholder():
    text = get_protocol("longvideobench", "official").messages("<|video|>Why?", ["x"])[0]["content"][-1]["text"]
    assert text == "Why?\nOptions: A. x\n" + OFFICIAL_POST


def test_mlvu_raw_question_is_sent_verbatim_or_parsed_back():
    raw = "Why?\n(A) x\n(B) y\n(C) z\n(D) w"
    assert mlvu_question_text("Why?", ["x", "y", "z", "w"]) == raw
    assert split_mlvu_question(raw + "\n") == ("Why?", ["A. x", "B. y", "C. z", "D. w"])
    lmms = get_protocol("mlvu", "lmms_eval").messages("ignored", ["o"], raw_question="Q\n\n(A)a")
    assert lmms[0]["content"][-1]["text"] == "Q\n\n(A)a\nOnly give the best option.\nBest option: ("
    fork = get_protocol("mlvu", "slowfast").messages("ignored", ["o"], raw_question="Q.\n\n(A)a\n(B) b")
    assert fork[0]["content"][-1]["text"] == SELECT + "\nQ.\nA.a\nB. b\n" + LMMS_POST
    with pytest.raises(InputError, match="MLVU option line"):
        split_mlvu_question("Q\nno letter here")


def test_videomme_options_round_trip_through_unletter():
    stored = ["A. Red.", "B. Blue.", "C. A green one.", "D. None"]
    texts = [unletter_option(s, i) for i, s in enumerate(stored)]
    assert texts == ["Red.", "Blue.", "A green one.", "None"]
    text = get_protocol("videomme", "official").messages("Color?", texts)[0]["content"][-1]["text"]
    assert text == "Question: Color?\nOptions: " + "\n".join(stored) + "\n" + OFFICIAL_POST
    with pytest.raises(InputError, match="should start with 'B. '"):
        unletter_option("B.Blue", 1)


FRAMES_AND_GENERATION = {
    # official: plans/all.yaml counts, general_task_pipeline2.py generation (top_k=1 sampling = greedy)
    ("mvbench", "official"): (16, "middle", {"max_new_tokens": 100, "temperature": 0.0}),
    ("nextqa_mc", "official"): (8, "middle", {"max_new_tokens": 100, "temperature": 0.0}),
    ("videomme", "official"): (128, "middle", {"max_new_tokens": 100, "temperature": 0.0}),
    ("longvideobench", "official"): (64, "middle", {"max_new_tokens": 100, "temperature": 0.0}),
    # lmms-eval yaml generation_kwargs + until ["\n\n"]; frames: owlvid's mPLUG-Owl3 wrapper
    ("mvbench", "lmms_eval"): (16, "middle", {"max_new_tokens": 16, "temperature": 0.0, "stop": ["\n\n"]}),
    ("nextqa_mc", "lmms_eval"): (8, "middle", {"max_new_tokens": 1024, "temperature": 0.0, "stop": ["\n\n"]}),
    ("videomme", "lmms_eval"): (128, "middle", {"max_new_tokens": 16, "temperature": 0.0, "stop": ["\n\n"]}),
    ("longvideobench", "lmms_eval"): (64, "middle", {"max_new_tokens": 32, "temperature": 0.0, "stop": ["\n\n"]}),
    ("mlvu", "lmms_eval"): (128, "middle", {"max_new_tokens": 16, "temperature": 0.0, "stop": ["\n\n"]}),
}


@pytest.mark.parametrize("benchmark,protocol", list(FRAMES_AND_GENERATION))
def test_frames_and_generation(benchmark, protocol):
    num_frames, choice, generation = FRAMES_AND_GENERATION[(benchmark, protocol)]
    p = get_protocol(benchmark, protocol)
    assert (p.num_frames, p.frame_choice, p.generation) == (num_frames, choice, generation)
    assert p.frames_as == ("images" if protocol == "official" else "video")
    assert p.source.startswith("X-PLUG/mPLUG-Owl@0f3068fdb47b77aedc71fc39f5735cd7aa35e8f9" if protocol == "official"
                               else "EvolvingLMMs-Lab/lmms-eval@75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3")


@pytest.mark.parametrize("benchmark", ["mvbench", "nextqa_mc", "videomme", "longvideobench", "mlvu"])
def test_slowfast_protocol_settings(benchmark):
    # scripts/lmms_eval_evaluate/*.sh: pyav backend, TEST_FRAMES (64 for frame64); the wrapper ignores the
    # task's generation_kwargs: greedy, 256 new tokens, no stop strings.
    p = get_protocol(benchmark, family="slowfast")
    assert (p.name, p.num_frames, p.frame_choice, p.frames_as, p.bound) == (
        "slowfast", 64, "slowfast_pyav", "video", "ignored")
    assert p.generation == {"max_new_tokens": 256, "temperature": 0.0}
    assert not p.strips_response
    assert get_protocol(benchmark, "slowfast", num_frames=96).num_frames == 96
    lmms = get_protocol(benchmark, "lmms_eval", family="slowfast")
    assert (lmms.num_frames, lmms.frame_choice) == (64, "slowfast_pyav")
    if benchmark != "mlvu":  # the official prompts on a Slow-Fast model: the frames as its one video
        official = get_protocol(benchmark, "official", family="slowfast")
        assert (official.frames_as, official.generation) == ("video", {"max_new_tokens": 100, "temperature": 0.0})


def test_defaults_and_errors():
    assert get_protocol("mvbench").name == "official"
    assert get_protocol("mlvu").name == "lmms_eval"  # the official code has no MLVU task
    assert get_protocol("videomme", family="slowfast").name == "slowfast"
    with pytest.raises(InputError) as info:
        get_protocol("mlvu", "official")
    assert str(info.value) == ("the official mPLUG-Owl3 evaluation defines no MLVU task; use --protocol lmms_eval "
                               "(or slowfast)")
    with pytest.raises(InputError, match="unknown model family"):
        get_protocol("mvbench", family="llava")
    with pytest.raises(InputError, match="num_frames must be a positive integer"):
        get_protocol("mvbench", num_frames=0)
    with pytest.raises(InputError, match="unknown benchmark"):
        get_protocol("egoschema")


def test_protocol_score_is_score_response():
    p = get_protocol("videomme", "official")
    assert p.score("  The answer is C ", OPTS, "C") == Score(predicted="C", correct=True, parsed=True)


# ------------------------------------------------------------------------------------------ frames

def test_middle_frames_are_segment_middles():
    # linspace(0, 100, 17).astype(int) = 0, 6, 12, 18, 25, ...; frame (a + b - 1) // 2 of each segment
    expected = [2, 8, 14, 21, 27, 33, 39, 46, 52, 58, 64, 71, 77, 83, 89, 96]
    assert middle_indices(100, 16) == expected
    assert get_protocol("mvbench", "official").frame_indices(100, 30.0) == expected
    assert middle_indices(5, 8) == [0, 1, 2, 3, 4, 4, 4, 4]  # padded with the last index


def test_official_bound_draws_randomly_inside_each_segment_unless_it_starts_at_zero():
    p = get_protocol("mvbench", "official")
    first = p.frame_indices(300, 30.0, bound=(2.0, 6.0), rng=random.Random(1))
    assert first == p.frame_indices(300, 30.0, bound=(2.0, 6.0), rng=random.Random(1))
    edges = np.linspace(60, 180, 17).astype(int)  # [int(30*2), min(int(30*6), 300))
    for k, index in enumerate(first):
        assert edges[k] <= index <= edges[k + 1] - 2  # random.choice(range(a, b - 1))
    draws = {tuple(p.frame_indices(300, 30.0, bound=(2.0, 6.0), rng=random.Random(s))) for s in range(5)}
    assert len(draws) > 1
    # `if start_time and end_time`: a 0 start means no bound, middles over the whole video
    assert p.frame_indices(300, 30.0, bound=(0, 6.0), rng=random.Random(1)) == middle_indices(300, 16)
    lvb = get_protocol("longvideobench", "official")
    assert lvb.frame_indices(3000, 30.0, bound=(0, 100.0)) == middle_indices(3000, 64)


def test_official_frame_folder_uses_get_index():
    # episodic_reasoning: fps 3, files numbered from 1; start_idx = max(1, round(6.0)) = 6,
    # end_idx = min(round(60.0), 90) = 60, seg = 3.375, int(6 + 1.6875 + np.round(3.375 k))
    numbers = [7, 10, 14, 17, 21, 24, 27, 31, 34, 37, 41, 44, 47, 51, 54, 58]
    assert mvbench_get_index((2.0, 20.0), 3, 90, 16, first_idx=1) == numbers
    p = get_protocol("mvbench", "official")
    assert p.frame_indices(90, 3.0, bound=(2.0, 20.0), frame_folder=True) == [n - 1 for n in numbers]


def test_lmms_eval_cuts_the_clip_and_slowfast_ignores_the_bound():
    lmms = get_protocol("mvbench", "lmms_eval")
    assert lmms.frame_indices(300, 30.0, bound=(2.0, 6.0)) == [60 + i for i in middle_indices(120, 16)]
    assert lmms.frame_indices(90, 25.0, bound=(2.0, 20.0), frame_folder=True) == [
        6 + i for i in middle_indices(54, 16)]  # the folder as a 3 fps clip
    fork = get_protocol("mvbench", "slowfast")
    assert fork.frame_indices(3000, 30.0, bound=(2.0, 6.0)) == fork.frame_indices(3000, 30.0)
    # frame images: all of them, then linspace(0, len - 1, 64) when there are more
    assert fork.frame_indices(200, 3.0, frame_folder=True) == np.linspace(0, 199, 64).astype(int).tolist()
    assert fork.frame_indices(40, 3.0, frame_folder=True) == list(range(40))
    with pytest.raises(InputError, match="selects no frame"):
        lmms.frame_indices(30, 30.0, bound=(5.0, 6.0))


def test_slowfast_pyav_sampling():
    p = get_protocol("videomme", "slowfast")
    # 30 fps: step round(30 / 2) = 15, 200 candidates, candidate round((i + 1) * 3.125 - 1)
    picked = p.frame_indices(3000, 30.0)
    assert len(picked) == 64
    assert picked[:4] == [30, 75, 120, 180] and picked[-1] == 2985  # round(11.5) = 12: half to even
    # fewer candidates than frames: all candidates, fewer than 64 frames
    assert p.frame_indices(300, 30.0) == list(range(0, 300, 15))
    assert p.frame_indices(250, 25.0) == list(range(0, 250, 12))  # round(12.5) = 12


def test_with_frames_images_or_one_video():
    frames = ["f0", "f1", "f2"]
    official = get_protocol("mvbench", "official")
    content = official.with_frames(official.messages("Q", ["x"]), frames)[0]["content"]
    assert [part["type"] for part in content] == ["image", "image", "image", "text"]
    assert [part["image"] for part in content[:3]] == frames
    lvb = get_protocol("longvideobench", "official")
    content = lvb.with_frames(lvb.messages("Q", ["x"]), frames)[0]["content"]
    assert [part["type"] for part in content] == ["text", "image", "image", "image", "text"]
    lmms = get_protocol("mvbench", "lmms_eval")
    content = lmms.with_frames(lmms.messages("Q", ["x"]), frames)[0]["content"]
    assert content[0] == {"type": "video", "video": frames}


def test_overall_accuracy_rules():
    right, wrong = Score("B", True, True), Score("A", False, True)
    micro = get_protocol("mvbench", "official")
    assert micro.overall_accuracy([right, wrong, Score(None, False, False)], ["B", "A", ""]) == pytest.approx(100 / 3)
    answered = get_protocol("mvbench", "lmms_eval")  # mvbench_aggregate_results skips pred == ""
    assert answered.overall_accuracy([right, wrong, Score(None, False, False)], ["B", "A", " "]) == 50.0
    mlvu = get_protocol("mlvu", "lmms_eval")  # mean over the 7 dev task types, an absent one counting 0
    score = mlvu.overall_accuracy([right, wrong, right], ["B", "A", "B"], tasks=["count", "count", "ego"])
    assert score == pytest.approx((50 + 100) / len(MLVU_DEV_TASK_TYPES))
    assert get_protocol("mlvu", "slowfast").overall_accuracy([right, wrong], ["B", "A"]) == 50.0


def test_mvbench_task_table():
    assert len(MVBENCH_TASKS) == 20
    assert list(MVBENCH_TASKS)[:3] == ["action_sequence", "action_prediction", "action_antonym"]
    bounded = sorted(name for name, task in MVBENCH_TASKS.items() if task.bounded)
    assert bounded == ["action_localization", "action_prediction", "action_sequence", "episodic_reasoning",
                       "object_interaction"]
    episodic = MVBENCH_TASKS["episodic_reasoning"]
    assert (episodic.kind, episodic.video_folder) == ("frame", "tvqa/frames_fps3_hq/")
    assert all(task.json_file == f"{name}.json" for name, task in MVBENCH_TASKS.items())
    assert {task.kind for task in MVBENCH_TASKS.values()} == {"video", "frame"}
    json_file, folder, kind, bounded = MVBENCH_TASKS["action_localization"]  # unpacks as the official 4-tuple
    assert (json_file, folder, kind, bounded) == ("action_localization.json", "sta/sta_video/", "video", True)
    assert set(MVBENCH_LMMS_EVAL_FOLDERS) == set(MVBENCH_TASKS)
    assert MVBENCH_LMMS_EVAL_FOLDERS["action_localization"] == "sta/sta_video_segment"


# --------------------------------------------------------------------- through the models' templates

@pytest.fixture(scope="module")
def tiny_slowfast_model(tmp_path_factory):
    import owlvid
    from owlvid.testing.slowfast import make_tiny_slowfast

    return owlvid.load(make_tiny_slowfast(tmp_path_factory.mktemp("sf") / "sf"), dtype="float32", device="cpu")


FRAMES = [np.full((32, 32, 3), 40 * i, np.uint8) for i in range(3)]


@pytest.mark.parametrize("release", ["240728", "241101"])
@pytest.mark.parametrize("benchmark", ["mvbench", "longvideobench"])
def test_official_prompt_tokens_equal_the_official_pipeline(tiny_owl3_models, release, benchmark):
    """general_task_pipeline2.py: the messages' <|video|> becomes <|image|> x T, the frames go in as images
    (cut_enable False) and the conversation ends with an empty assistant turn — same prompt ids on both the
    240728 and the 241101 processor (no video span tokens)."""
    model = tiny_owl3_models[release]
    protocol = get_protocol(benchmark, "official")
    messages = protocol.with_frames(protocol.messages("Why?", ["x y", "z"]), FRAMES)
    _, ids = model.prepare(messages, cut_enable=False)  # frames_as == "images": no cutting, as the official run
    images = "<|image|>" * len(FRAMES)
    body = "Why?\nOptions:\nA. x y\nB. z" if benchmark == "mvbench" else "Why?\nOptions: A. x y\nB. z"
    text = (f"{images}\nQuestion: {body}" if benchmark == "mvbench" else f"Question: {images}\n{body}")
    official = [{"role": "user", "content": text + "\n" + OFFICIAL_POST}, {"role": "assistant", "content": ""}]
    _, expected = model.prepare(official, images=FRAMES, cut_enable=False)
    assert ids == expected


def test_lmms_eval_prompt_is_a_video_after_the_template(tiny_owl3_models):
    model = tiny_owl3_models["241101"]
    protocol = get_protocol("mvbench", "lmms_eval")
    _, ids = model.prepare(protocol.with_frames(protocol.messages("Why?", ["x", "y"]), FRAMES))
    text = model.runtime.tokenizer.decode(ids)
    assert text.endswith("user\n<|start_video_frame|>" + "<|image|>" * 3 + "<|end_video_frame|>\n"
                         "Question:Why?\nOption:\n(A) x\n(B) y\nOnly give the best option.\n\nassistant\n")


def test_slowfast_prompt_equals_the_fork_wrapper(tiny_slowfast_model):
    """slowfast_videomllm.generate_until: "<image>\\n" + the task context in the qwen_1_5 template."""
    protocol = get_protocol("videomme", "slowfast")
    messages = protocol.messages("Why?", ["x y", "z"])
    _, ids = tiny_slowfast_model.prepare(protocol.with_frames(messages, FRAMES))
    wrapper = [{"role": "user", "content": "<image>\n" + messages[0]["content"][1]["text"]}]
    _, expected = tiny_slowfast_model.prepare(wrapper, videos=[FRAMES])
    assert ids == expected
