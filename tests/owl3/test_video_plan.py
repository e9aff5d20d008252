"""A request's video is resolved once (owlvid.video_plan): one open and one probe of the file per request,
the frames chosen once and handed to the decoder unchanged, and the frame cap applied in one place."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest

import owlvid
from owlvid.errors import MediaError
from owlvid.media import MAX_FRAMES_HARD_CAP, load_video, pyav_timing, sampling, video
from owlvid.video_plan import FrameList, StreamedVideo, load_video_frames, plan_video, resolve_plan

av = pytest.importorskip("av")


def write_clip(path, frames: int, container: str | None = None, size=(64, 48)) -> str:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream("mpeg4", rate=24)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.roll(base, 3 * i, axis=1), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return str(path)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan-videos")
    return {"mp4": write_clip(d / "clip.mp4", 192), "mkv": write_clip(d / "clip.mkv", 192, "matroska")}


@pytest.fixture
def media_calls(monkeypatch):
    """Counts, per request: opens of a source by the media layer, probes (time models built), FFmpeg
    container opens, and frame selections, with the VideoSampling objects built with explicit indices."""
    calls: Counter = Counter()

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(video, "open_source", counting("open_source", video.open_source))
    monkeypatch.setattr(pyav_timing.PyAVTimeModel, "_probe", counting("probe", pyav_timing.PyAVTimeModel._probe))
    monkeypatch.setattr(av, "open", counting("av.open", av.open))
    monkeypatch.setattr(sampling.VideoSampling, "select", counting("select", sampling.VideoSampling.select))
    post_init = sampling.VideoSampling.__post_init__

    def checked(self):
        calls["spec from indices"] += self.indices is not None
        post_init(self)

    monkeypatch.setattr(sampling.VideoSampling, "__post_init__", checked)
    return calls


def ask(source, question="What happens?", **frames):
    return [{"role": "user", "content": [{"type": "video", "video": source, **frames},
                                         {"type": "text", "text": question}]}]


@pytest.mark.parametrize("kind", ["mp4", "mkv"])
def test_one_open_and_one_probe_per_video_request(tiny_owl3_dirs, clips, media_calls, kind):
    """Model.generate on a local file (decoded while encoded): the file is opened and probed once, the frames
    chosen once; the answer is that of the frames decoded beforehand. Asked again, it comes from the visual
    cache: nothing is opened."""
    model = owlvid.load(tiny_owl3_dirs["241101"], dtype="float32", device="cpu")
    streamed = model.generate(ask(clips[kind], max_frames=6), max_new_tokens=6)
    assert media_calls["open_source"] == 1 and media_calls["probe"] == 1
    assert media_calls["select"] == 1 and media_calls["spec from indices"] == 0
    if kind == "mp4":  # the MP4 sample table: no packet scan, so FFmpeg opens the file once
        assert media_calls["av.open"] == 1
    (audit,) = streamed.media
    assert audit["frames"] == 6 and audit["decoder"] == "pyav" and len(audit["timestamps"]) == 6

    eager = load_video(clips[kind], sampling="owl3", max_frames=6)
    assert audit["indices"] == eager.indices
    plain = owlvid.load(tiny_owl3_dirs["241101"], dtype="float32", device="cpu", cache_bytes=0)
    assert plain.generate(ask(eager.frames), max_new_tokens=6).token_ids == streamed.token_ids

    media_calls.clear()
    model.generate(ask(clips[kind], "Again?", max_frames=6), max_new_tokens=6)
    assert media_calls["open_source"] == 0 and media_calls["probe"] == 0


def test_frames_decoded_at_once_also_open_once(tiny_owl3_models, clips, media_calls):
    """A decoder option the streamed path has never covered (a download timeout, as the server sets): the
    frames are decoded at once, from the video opened to plan them."""
    runtime = tiny_owl3_models["241101"].runtime
    frames = load_video_frames(clips["mkv"], runtime, {"max_frames": 6, "timeout": 30.0})
    assert isinstance(frames, FrameList) and frames.num_frames == 6
    assert media_calls["open_source"] == 1 and media_calls["probe"] == 1 and media_calls["select"] == 1
    assert frames.indices == load_video(clips["mkv"], sampling="owl3", max_frames=6).indices


def test_the_plan_is_frozen_and_the_decoder_follows_it(tiny_owl3_models, clips):
    runtime = tiny_owl3_models["241101"].runtime
    plan = plan_video(clips["mp4"], runtime, {"max_frames": 6})
    assert plan.info is None and plan.indices is None and plan.cache_key  # no I/O but a stat
    resolved, opened = resolve_plan(plan)
    opened.close()
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.indices = (0,)
    assert resolved.info.total_frames == 192 and resolved.info.fps == pytest.approx(24)
    assert resolved.cache_key == plan.cache_key and resolved.sampling == plan.sampling
    prepared = load_video_frames(clips["mp4"], runtime, {"max_frames": 6})
    assert isinstance(prepared, StreamedVideo)
    assert prepared.plan.indices == resolved.indices and prepared.indices == list(resolved.indices)


def test_a_streamed_video_read_twice_is_opened_again(tiny_owl3_dirs, clips, media_calls):
    """`owlvid chat` keeps a prepared video across turns; without a visual cache each turn encodes it again:
    the second reading opens the file again for the same frames (and the answers agree)."""
    model = owlvid.load(tiny_owl3_dirs["241101"], dtype="float32", device="cpu", cache_bytes=0)
    model.runtime.prefix_slots = 0  # no prefix cache either: the second turn encodes the video again
    prepared = load_video_frames(clips["mp4"], model.runtime, {"max_frames": 6})
    assert isinstance(prepared, StreamedVideo)
    first = model.generate(ask(prepared), max_new_tokens=6)
    assert media_calls["open_source"] == 1
    second = model.generate(ask(prepared), max_new_tokens=6)
    assert media_calls["open_source"] == 2 and media_calls["select"] == 1
    assert first.token_ids == second.token_ids and first.media[0]["indices"] == second.media[0]["indices"]


def test_the_frame_cap_is_applied_in_one_place(tiny_owl3_models, clips):
    """`plan_video` is where a frame cap applies: `fps` / `all` take it as their max_frames (unless the caller
    gave one), every other preset keeps at most `cap` of its frames, evenly."""
    runtime = tiny_owl3_models["241101"].runtime
    fps = plan_video(clips["mp4"], runtime, {"sampling": "fps", "fps": 12}, frame_cap=8)
    assert fps.sampling.max_frames == 8 and fps.frame_cap == 8
    assert plan_video(clips["mp4"], runtime, {"sampling": "fps", "fps": 12}).sampling.max_frames is None
    assert plan_video(clips["mp4"], runtime, {"sampling": "fps", "fps": 12, "max_frames": 4},
                      frame_cap=8).sampling.max_frames == 4
    capped = load_video_frames(clips["mp4"], runtime, {"num_frames": 20}, frame_cap=8)
    every = load_video(clips["mp4"], sampling="owl3-eval", num_frames=20).indices
    assert capped.indices == [every[int(i * 20 / 8)] for i in range(8)]
    with pytest.raises(MediaError, match="more than max_frames=8"):
        load_video_frames(clips["mp4"], runtime, {"sampling": "all"}, frame_cap=8)


def test_the_hard_frame_limit_holds_for_streamed_videos_too(tiny_owl3_models, tmp_path):
    """More frames than MAX_FRAMES_HARD_CAP are refused on the model's path whether the video would be
    decoded at once or while encoding (the streamed path used to take them all)."""
    long = write_clip(tmp_path / "long.mp4", MAX_FRAMES_HARD_CAP + 4, size=(16, 16))
    runtime = tiny_owl3_models["241101"].runtime
    message = f"{MAX_FRAMES_HARD_CAP + 4} frames requested, more than the limit of {MAX_FRAMES_HARD_CAP}"
    with pytest.raises(MediaError, match=message):
        load_video(long, sampling="all")
    with pytest.raises(MediaError, match=message):
        load_video_frames(long, runtime, {"sampling": "all"})
