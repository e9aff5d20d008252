"""Self-contained Slow-Fast tests on a tiny random checkpoint written in the official layout."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import owlvid
from owlvid.errors import CheckpointError, InputError
from owlvid.kv_cache import KVCache
from owlvid.layers import Qwen2Config
from owlvid.models.slowfast.config import ConvNextConfig, SlowFastConfig
from owlvid.models.slowfast.language import SlowMemory
from owlvid.models.slowfast.vision import fast_plan, sample_fast_frames, split_fast_tokens, token_counts
from owlvid.testing.slowfast import make_tiny_slowfast, reference_logits


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_slowfast(tmp_path_factory.mktemp("tiny_slowfast"))


@pytest.fixture(scope="module")
def model(folder):
    return owlvid.load(folder, device="cpu", dtype="float32")


def frames(n: int, seed: int = 0, size: tuple[int, int] = (64, 36)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def video_message(video, text: str = "Describe the video.") -> list[dict]:
    return [{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": text}]}]


# ----------------------------------------------------------------------------------------------- fast tokens


def cfg_with(**kw) -> SlowFastConfig:
    llm = Qwen2Config(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=1, num_key_value_heads=1)
    base = SlowFastConfig(llm=llm,
                          vision=ConvNextConfig(), projector="mlp2x_gelu", hybrid_layers=[0],
                          video_pooling_stride=2, fast_temporal_sampling_stride=1, fast_temporal_stride=4,
                          fast_spatial_stride=1, min_fast_frames=16)
    return dataclasses.replace(base, **kw)


def reference_fast(v: torch.Tensor, s: int, t: int, p: int, m: int) -> torch.Tensor:
    """A loop-by-loop restatement of the official fast-token rules (notes §5)."""
    total, n, c = v.shape
    side = math.isqrt(n)
    if total == 1:
        frames_ = [v[0]]
    else:
        if s > 1 and total >= m:
            k = max(total // s, m)
            idx = [min(int(i * (total / k)), total - 1) for i in range(k)]
        else:
            idx = list(range(total))
        sel = [v[i] for i in idx]
        k = len(sel)
        if t > 1 and k // t >= m:
            frames_ = [torch.stack(sel[j * t:(j + 1) * t]).mean(0) for j in range(k // t)]
        elif t > 1:
            f = min(k, m)
            frames_ = [torch.stack(sel[(i * k) // f: -((-(i + 1) * k) // f)]).mean(0) for i in range(f)]
        else:
            frames_ = sel
    out = []
    for fr in frames_:
        grid = fr.reshape(side, side, c)
        if p > 1:
            q = side // p
            cells = [[grid[r * p:(r + 1) * p, k * p:(k + 1) * p].reshape(-1, c).mean(0) for k in range(q)]
                     for r in range(q)]
            grid = torch.stack([torch.stack(row) for row in cells])
        out.append(grid.reshape(-1, c))
    return torch.cat(out)


@pytest.mark.parametrize("frames_, s, t, p, expect_frames", [
    (64, 1, 4, 1, 16),  # released frame64-s1t4: groups of 4 frames
    (66, 1, 4, 1, 16),  # floor mode: the trailing 2 frames are dropped
    (96, 1, 6, 1, 16),  # released frame96-s1t6
    (128, 1, 4, 1, 32),  # 128 // 4 = 32 >= 16: plain pooling
    (40, 1, 4, 1, 16),  # short video: adaptive pooling with overlapping bins
    (16, 1, 4, 1, 16),  # adaptive to 16 frames = identity in time
    (8, 1, 4, 1, 8),  # fewer frames than min_fast_frames: identity
    (64, 2, 4, 1, 16),  # sampling stride 2 (32 frames) then adaptive to 16
    (10, 2, 4, 1, 10),  # sampling needs at least min_fast_frames
    (64, 1, 4, 3, 16),  # spatial stride 3 on the 9x9 grid
    (1, 1, 4, 1, 1),  # an image: nothing temporal
    (1, 1, 4, 2, 1),  # an image with spatial stride 2
])
def test_split_fast_tokens(frames_, s, t, p, expect_frames):
    cfg = cfg_with(fast_temporal_sampling_stride=s, fast_temporal_stride=t, fast_spatial_stride=p)
    n = 324 if frames_ == 1 else 81
    v = torch.randn(frames_, n, 5, generator=torch.Generator().manual_seed(frames_))
    got = split_fast_tokens(v, cfg)
    want = reference_fast(v, s, t, p, cfg.min_fast_frames)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-6)
    assert fast_plan(frames_, cfg).out_frames == expect_frames
    n_fast, n_slow = token_counts(frames_, cfg)
    assert n_fast == got.shape[0] and n_slow == frames_ * n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("frames_", [64, 40, 8])  # plain temporal pooling, adaptive pooling, identity
def test_split_fast_tokens_low_precision(frames_, dtype):
    """Every dtype `dtype="auto"` can pick runs the fast-token pooling (the CPU has no bf16/fp16 avg_pool3d)."""
    cfg = cfg_with()
    v = torch.randn(frames_, 81, 5, generator=torch.Generator().manual_seed(frames_))
    got = split_fast_tokens(v.to(dtype), cfg)
    assert got.dtype == dtype
    want = split_fast_tokens(v.to(dtype).float(), cfg)
    assert torch.allclose(got.float(), want, atol=2e-2, rtol=1e-2)


def test_sample_fast_frames():
    assert sample_fast_frames(10, 2, 16) == list(range(10))
    assert sample_fast_frames(64, 2, 16) == list(range(0, 64, 2))
    assert sample_fast_frames(20, 2, 16) == [min(int(i * 1.25), 19) for i in range(16)]


# ----------------------------------------------------------------------------------------------- API


def test_checkpoint_loads_and_truncates_vocab(model, folder):
    rt = model.runtime
    assert rt.architecture == "slowfast" and rt.video_placeholder == "<image>"
    assert rt.default_video_sampling == "slowfast"
    assert rt.video_options({}) == {"max_frames": 64, "sampling": "slowfast"}
    n = len(model.tokenizer)
    stored = json.loads((folder / "config.json").read_text())["vocab_size"]
    assert stored > n and rt.model.llm.embed_tokens.weight.shape[0] == n
    assert rt.model.hybrid_attentions()[0].layer_index == 0
    assert [a.layer_index for a in rt.model.hybrid_attentions()] == [0, 2]
    logits = model.next_token_logits(video_message(frames(2)))
    assert logits.shape == (n,) and logits.dtype == torch.float32


def test_64_frames_chat(model):
    """64 frames with temporal stride 4: 16 pooled fast frames (1296 tokens) and 5184 slow tokens,
    through owlvid.load(...).chat with a list of PIL frames."""
    rt, net = model.runtime, model.runtime.model
    captured = {}
    original = net.fast_and_slow

    def spy(features):
        captured["features"] = features
        captured["fast"], captured["slow"] = original(features)
        return captured["fast"], captured["slow"]

    net.fast_and_slow = spy
    try:
        text = model.chat(video_message(frames(64)), max_new_tokens=4)
    finally:
        del net.fast_and_slow
    assert isinstance(text, str)
    v = captured["features"]
    assert v.shape == (64, 81, 32)
    assert captured["slow"].shape == (5184, 32)
    fast = captured["fast"].reshape(16, 81, 32)
    assert torch.allclose(fast, v.reshape(16, 4, 81, 32).mean(1), atol=1e-5)
    inputs, ids = model.prepare(video_message(frames(64)))
    assert inputs["num_fast_tokens"] == 1296 and inputs["num_slow_tokens"] == 5184
    n_text = inputs["input_ids"].shape[1] - 1
    assert inputs.seq_len == len(ids) == n_text + 1296
    assert ids.count(rt.fast_token_id) == 1296


def test_64_frames_bfloat16(folder, model):
    """The default 64-frame path in bfloat16 (what dtype="auto" picks on AVX512-BF16 CPUs): runs, and the
    last-position logits stay close to float32 (measured max |diff| 0.095, cosine 0.99998; logits std ~4)."""
    bf16 = owlvid.load(folder, device="cpu", dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    messages = video_message(frames(64))
    got, want = bf16.next_token_logits(messages), model.next_token_logits(messages)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got - want).abs().max().item() < 0.25
    assert torch.nn.functional.cosine_similarity(got, want, dim=0).item() > 0.999


def test_slow_kv_computed_once_per_request(model):
    rt = model.runtime
    calls = {}
    hooks = [a.cross_attn_kv_proj.register_forward_hook(
        lambda m, a_, o, i=a.layer_index: calls.__setitem__(i, calls.get(i, 0) + 1))
        for a in rt.model.hybrid_attentions()]
    try:
        out = model.generate(video_message(frames(4)), max_new_tokens=6, stop=None)
        assert len(out.token_ids) + (out.finish_reason == "stop") >= 1
        assert calls == {0: 1, 2: 1}
        model.generate(video_message(frames(4, seed=1)), max_new_tokens=3)
        assert calls == {0: 2, 2: 2}
    finally:
        for h in hooks:
            h.remove()


def test_decode_matches_official_full_recompute(model):
    """Cached decoding == a no-cache recompute of prompt + generated ids in which the generated ids are
    text tokens that do not cross-attend (official decode semantics); letting them cross-attend differs."""
    rt = model.runtime
    inputs, _ = model.prepare(video_message(frames(6, seed=3), "What happens?"))
    logits, state = rt.prefill(inputs)
    steps, generated = [logits], []
    for _ in range(6):
        generated.append(int(torch.argmax(steps[-1])))
        steps.append(rt.decode(state, generated[-1]))
    ref = reference_logits(rt, inputs, generated)
    assert ref.shape == (7, len(model.tokenizer))
    for i, step in enumerate(steps):
        assert (step - ref[i]).abs().max().item() <= 1e-4, i
        assert int(torch.argmax(step)) == int(torch.argmax(ref[i]))
    # Counter-check: generated tokens that also query the slow tokens change the logits.
    seq = rt.sequence(inputs)
    extra = rt.model.llm.embed_tokens(torch.tensor([generated]))
    embeds = torch.cat([seq.embeds, extra], dim=1)
    length = seq.embeds.shape[1]
    rows = torch.cat([seq.text_rows, torch.arange(length, length + len(generated))])
    kv = rt.model.slow_memory(seq.slow, rows).kv
    cfg = rt.cfg.llm
    cache = KVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, cfg.head_dim, embeds.shape[1],
                    rt.dtype, rt.device)
    h = rt.run_decoder(embeds, 0, cache, SlowMemory(rows, kv))
    wrong = rt.model.logits(h[0, length - 1:])
    assert (wrong[0] - ref[0]).abs().max().item() <= 1e-5  # the prompt itself is unchanged
    assert (wrong[1:] - ref[1:]).abs().max().item() > 1e-3


def test_image_input(model):
    parts = [{"type": "image", "image": frames(1, size=(50, 80))[0]}, {"type": "text", "text": "What is it?"}]
    out = model.generate([{"role": "user", "content": parts}], max_new_tokens=3)
    inputs, _ = model.prepare([{"role": "user", "content": "<image>\nWhat is it?"}], images=frames(1))
    assert inputs["num_fast_tokens"] == inputs["num_slow_tokens"] == 324 and inputs["modality"] == "image"
    assert out.completion_tokens <= 3


@contextlib.contextmanager
def counting_slow_kv(layers):
    """Count `slow_kv` calls per hybrid layer: a wrapper set on each layer instance, removed on exit."""
    counts = [0] * len(layers)

    def wrap(i, original):
        def slow_kv(normed_slow):
            counts[i] += 1
            return original(normed_slow)
        return slow_kv

    for i, attn in enumerate(layers):
        attn.slow_kv = wrap(i, attn.slow_kv)
    try:
        yield counts
    finally:
        for attn in layers:
            del attn.slow_kv


def test_text_only_runs_as_plain_qwen2(model):
    """No visual: the cross-attention of the hybrid layers is off (official zeroing of pure-text samples)."""
    rt = model.runtime
    with counting_slow_kv(rt.model.hybrid_attentions()) as slow_kv_calls:
        before = list(slow_kv_calls)
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
        inputs, ids = model.prepare(msgs)
        assert inputs["pixel_values"] is None and -200 not in ids
        assert inputs["prompt"] == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                                    "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n")
        logits, _ = rt.prefill(inputs)
        assert torch.allclose(logits, reference_logits(rt, inputs, [])[0], atol=1e-5)
        out = model.generate(msgs, max_new_tokens=3)
        assert out.prompt_tokens == len(ids)
        assert slow_kv_calls == before


def test_frame_arrays_and_default_system(model):
    stack = np.stack([np.asarray(f) for f in frames(3)])
    a = model.runtime.processor([{"role": "user", "content": "<image>\nHi"}], videos=[stack])
    b = model.runtime.processor([{"role": "user", "content": "<image>\nHi"}], videos=[frames(3)])
    assert torch.equal(a["pixel_values"], b["pixel_values"])
    assert a["prompt"].startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


# ----------------------------------------------------------------------------------------------- truncation


def test_truncation_official_and_disabled(model, monkeypatch):
    rt = model.runtime
    msgs = video_message(frames(2), "What is in it? Answer in detail please.")
    full_inputs, full_ids = model.prepare(msgs)
    limit = full_inputs.seq_len - 10
    monkeypatch.setattr(rt.cfg, "model_max_length", limit)
    with pytest.warns(UserWarning, match="tokenizer_model_max_length"):
        inputs, ids = model.prepare(msgs)
    assert inputs["truncated"] and inputs.seq_len == limit and ids == full_ids[:limit]
    logits, state = rt.prefill(inputs)
    assert state.position == limit
    # the official cut keeps the first `limit` positions: same as position limit-1 of the whole prompt
    seq = rt.sequence(full_inputs)
    cfg = rt.cfg.llm
    cache = KVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, cfg.head_dim, seq.embeds.shape[1],
                    rt.dtype, rt.device)
    h = rt.run_decoder(seq.embeds, 0, cache, rt.model.slow_memory(seq.slow, seq.text_rows))
    assert torch.allclose(logits, rt.model.logits(h[0, limit - 1]), atol=1e-5)
    # disabled: the whole prompt is kept, without a warning
    rt.truncation = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            kept, kept_ids = model.prepare(msgs)
        assert not kept["truncated"] and kept.seq_len == full_inputs.seq_len and kept_ids == full_ids
    finally:
        rt.truncation = True
    # a cut before the placeholder leaves no fast token: the request runs as text, like the official code
    monkeypatch.setattr(rt.cfg, "model_max_length", 10)
    with pytest.warns(UserWarning):
        short, _ = model.prepare(msgs)
    seq = rt.sequence(short)
    assert seq.num_fast == 0 and seq.slow is None and seq.embeds.shape[1] == 10
    assert rt.prefill(short)[1].position == 10


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, content, match", [
    ({"videos": [frames(2), frames(2)]}, "<image>\n<image>\nHi", "one video or one image"),
    ({"images": frames(2)}, "<image><image> Hi", "one video or one image"),
    ({"images": frames(1), "videos": [frames(2)]}, "<image>\n<image>\nHi", "one video or one image"),
    ({}, "<image>\nHi", "placeholder"),
    ({"videos": [frames(2)]}, "Hi, no placeholder", "placeholder"),
    ({"images": frames(1)}, "<image> and <image>", "placeholder"),
    ({"videos": [[]]}, "<image>\nHi", "no frames"),
    ({"images": [np.zeros((4, 4), dtype=np.float32)]}, "<image>\nHi", "uint8"),
])
def test_bad_input(model, kwargs, content, match):
    with pytest.raises(InputError, match=match):
        model.generate([{"role": "user", "content": content}], max_new_tokens=1, **kwargs)


def test_bad_video_object(model):
    with pytest.raises(InputError, match="list of frames"):
        model.runtime.processor([{"role": "user", "content": "<image>\nHi"}], videos=[object()])


def test_bad_roles(model):
    with pytest.raises(InputError, match="role"):
        model.generate([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
                       max_new_tokens=1)
    with pytest.raises(InputError, match="role"):
        model.generate([{"role": "tool", "content": "a"}], max_new_tokens=1)


def test_unsupported_checkpoint(folder, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["cross_attn_implementation"] = "vanilla"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="cross_attn_implementation"):
        owlvid.load(bad, dtype="float32")
    cfg["cross_attn_implementation"] = "text-only-vanilla-flashattn"
    cfg["cross_attn_every_n_layers"] = 1  # layer 1 has no cross-attention weights
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="hybrid layer 1"):
        owlvid.load(bad, dtype="float32")


def _copy_with_config(folder, dst, **changes):
    shutil.copytree(folder, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_unreadable_generation_config_is_an_error(folder, tmp_path):
    """Its eos_token_id list decides where generation stops: never dropped silently."""
    bad = _copy_with_config(folder, tmp_path / "bad")
    for text in ("{not json", "[151645]"):
        (bad / "generation_config.json").write_text(text)
        with pytest.raises(CheckpointError, match="cannot read .*generation_config.json"):
            owlvid.load(bad, dtype="float32")
    (bad / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643, 7]}))
    assert owlvid.load(bad, dtype="float32").runtime.stop_token_ids[-1] == 7


@pytest.mark.parametrize(("changes", "match"), [
    ({"mm_patch_merge_type": "spatial_unpad"}, "mm_patch_merge_type"),
    ({"mm_resampler_type": "spatial_pool"}, "mm_resampler_type"),
    ({"use_sliding_window": True, "sliding_window": 4096}, "sliding window"),
])
def test_settings_that_make_skipped_tensors_used_are_rejected(folder, tmp_path, changes, match):
    """image_newline / vision_resampler.* are skipped only because of the flat merge and no resampler."""
    from owlvid.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match=match):
        owlvid.load(_copy_with_config(folder, tmp_path / "bad", **changes), dtype="float32")


def test_released_config_values_still_load(folder, model, tmp_path):
    """rope_scaling is forced to None by the official Slow-Fast model; an inactive sliding window is
    harmless; explicit flat merge / no resampler are the released values."""
    ok = _copy_with_config(folder, tmp_path / "ok", rope_scaling={"type": "linear", "factor": 2.0},
                           sliding_window=32768, use_sliding_window=False, mm_patch_merge_type="flat",
                           mm_resampler_type=None)
    messages = video_message(frames(2))
    assert torch.equal(owlvid.load(ok, dtype="float32").next_token_logits(messages),
                       model.next_token_logits(messages))


def test_tied_config_with_stored_lm_head_warns(folder, tmp_path, caplog):
    import logging

    tied = _copy_with_config(folder, tmp_path / "tied", tie_word_embeddings=True)
    with caplog.at_level(logging.WARNING, logger="owlvid.models.slowfast"):
        owlvid.load(tied, dtype="float32")
    assert any("lm_head.weight is ignored" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("arch", ["owl3", "slowfast"])
def test_float16_smoke(arch, folder, model, tiny_owl3_dirs, tiny_owl3_models):
    """dtype="auto" picks float16 on GPUs without bf16: every op of both families runs in float16 (here on
    the CPU, where owlvid.load refuses float16, by casting a loaded model) and stays close to float32
    (measured max |diff| 0.004 / 0.01, logits std 1 / 4)."""
    if arch == "owl3":
        half, ref = owlvid.load(tiny_owl3_dirs["241101"], dtype="float32", device="cpu"), tiny_owl3_models["241101"]
        messages = [{"role": "user", "content": [{"type": "image", "image": frames(1)[0]},
                                                 {"type": "text", "text": "What is it?"}]}]
    else:
        half, ref, messages = owlvid.load(folder, dtype="float32", device="cpu"), model, video_message(frames(4))
    half.runtime.model.to(torch.float16)
    half.runtime.dtype = torch.float16
    got, want = half.next_token_logits(messages), ref.next_token_logits(messages)
    assert next(half.runtime.model.parameters()).dtype == torch.float16
    assert (got - want).abs().max().item() < 0.1
    assert torch.nn.functional.cosine_similarity(got, want, dim=0).item() > 0.9999
