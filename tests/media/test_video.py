"""Video decoding on synthetic videos whose pixels carry the frame index."""

from __future__ import annotations

import base64
import io
import warnings

import av
import numpy as np
import pytest
from PIL import Image

from owlvid.errors import MediaError
from owlvid.media import (
    MediaTooLargeError,
    MediaWarning,
    VideoSampling,
    iter_video_chunks,
    load_video,
    probe_video,
    sample_indices,
)

from .conftest import N_CFR, VFR_PTS_MS
from .synth import H, W, index_frame, read_index

STRATEGIES = ("auto", "seek", "sequential")
CFR_FILES = {"cfr_mp4": N_CFR, "cfr_mkv": N_CFR, "faststart_mp4": N_CFR, "mpeg4_avi": 50, "intra_mp4": 30,
             "with_audio_mp4": 50, "hevc_mp4": 60}


def idx_of(clip) -> list[int]:
    return [read_index(f) for f in clip.frames]


# ------------------------------------------------------------------------------- counting & order

@pytest.mark.parametrize("name", [*CFR_FILES, "vfr_mp4", "vfr_mkv"])
def test_frame_count_without_decoding_matches_decoded_count(videos, name):
    expected = CFR_FILES.get(name, len(VFR_PTS_MS))
    info = probe_video(videos[name])
    assert info["total_frames"] == expected
    with av.open(str(videos[name])) as c:  # ground truth: a full decode
        assert sum(1 for _ in c.decode(video=0)) == expected


@pytest.mark.parametrize("name", [*CFR_FILES, "vfr_mp4", "vfr_mkv"])
def test_every_frame_in_presentation_order(videos, name):
    clip = load_video(videos[name], sampling="all")
    n = CFR_FILES.get(name, len(VFR_PTS_MS))
    assert clip.indices == list(range(n))
    assert idx_of(clip) == list(range(n))
    assert clip.total_frames == n
    assert all(f.size == (W, H) and f.mode == "RGB" for f in clip.frames)


@pytest.mark.parametrize("name", ["cfr_mp4", "cfr_mkv", "vfr_mp4", "vfr_mkv", "mpeg4_avi", "faststart_mp4",
                                  "hevc_mp4"])
def test_seek_and_sequential_decoding_return_identical_frames(videos, name):
    n = probe_video(videos[name])["total_frames"]
    rng = np.random.default_rng(42)
    sets = [sorted(rng.choice(n, size=k, replace=False).tolist()) for k in (1, 3, 7, 15)]
    sets += [[n - 1], [0, n - 1], list(range(5, n, 11)), [8, 9, 10, 19, 29]]  # 9, 19, 29: before keyframes
    for wanted in sets:
        clips = {s: load_video(videos[name], indices=wanted, decode_strategy=s) for s in STRATEGIES}
        for s, clip in clips.items():
            assert clip.indices == wanted, s
            assert idx_of(clip) == wanted, (s, wanted)
        ref = [np.asarray(f) for f in clips["sequential"].frames]
        for s in ("seek", "auto"):
            assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(ref, clips[s].frames, strict=True)), s
            assert clips[s].timestamps == clips["sequential"].timestamps


def test_decoded_pixels_match_source_frames(videos):
    clip = load_video(videos["cfr_mp4"], indices=[0, 37, 119])
    for i, f in zip(clip.indices, clip.frames, strict=True):
        diff = np.abs(np.asarray(f, np.int16) - index_frame(i).astype(np.int16))
        assert diff.mean() < 2.0  # crf 10: the picture, not just the bits, survives


def test_unsorted_and_repeated_indices(videos):
    clip = load_video(videos["cfr_mp4"], indices=[90, 3, 3, 50])
    assert clip.indices == [90, 3, 3, 50]
    assert idx_of(clip) == [90, 3, 3, 50]
    assert clip.frames[1] is clip.frames[2]


def test_timestamps_and_metadata_cfr(videos):
    clip = load_video(videos["cfr_mp4"], indices=[0, 1, 25, 119])
    assert clip.timestamps == pytest.approx([0.0, 0.04, 1.0, 4.76])
    assert clip.fps == 25.0 and clip.duration == pytest.approx(4.8) and clip.total_frames == N_CFR
    assert clip.backend == "pyav" and clip.sampling == "indices" and clip.source.endswith("cfr.mp4")


# ------------------------------------------------------------------------------------- presets

@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"sampling": "owl3"}, [0, 25, 50, 75, 100]),
        ({"sampling": "owl3", "max_frames": 3, "fps": 25}, [20, 60, 100]),
        ({"sampling": "owl3-eval", "num_frames": 4}, [14, 44, 74, 104]),
        ({"sampling": "slowfast", "max_frames": 5}, [0, 29, 59, 89, 119]),
        ({"sampling": "fps", "fps": 2, "max_frames": 4}, [15, 45, 75, 105]),
        ({"sampling": "fps", "fps": 0.5}, [0, 50, 100]),
        ({"timestamps": [0.0, 0.5, 4.79]}, [0, 12, 119]),
        ({"sampling": "slowfast", "max_frames": 4, "start": 1.0, "end": 2.0}, [25, 33, 41, 49]),
        ({"sampling": "all", "start": 4.7}, [118, 119]),
        ({"indices": [0, 5], "start": 2.0}, [50, 55]),
        ({"sampling": VideoSampling(preset="owl3-eval", num_frames=2)}, [29, 89]),
    ],
)
def test_presets_pick_exact_frames(videos, options, expected):
    for name in ("cfr_mp4", "cfr_mkv"):
        clip = load_video(videos[name], **options)
        assert clip.indices == expected
        assert idx_of(clip) == expected


def test_presets_agree_with_pure_index_math(videos):
    for preset in ("owl3", "owl3-eval", "slowfast", "fps"):
        clip = load_video(videos["cfr_mp4"], sampling=preset)
        assert clip.indices == sample_indices(preset, N_CFR, 25.0)
        assert idx_of(clip) == clip.indices
        assert clip.sampling == preset


def test_slowfast_repeats_frames_of_short_videos(videos):
    clip = load_video(videos["intra_mp4"], sampling="slowfast", max_frames=64)
    assert len(clip) == 64
    assert idx_of(clip) == np.linspace(0, 29, 64).astype(int).tolist()


# --------------------------------------------------------------------------- variable frame rate

@pytest.mark.parametrize("name", ["vfr_mp4", "vfr_mkv"])
def test_variable_frame_rate_uses_real_timestamps(videos, name):
    pts = VFR_PTS_MS / 1000.0
    info = probe_video(videos[name])
    assert info["variable_frame_rate"] is True
    clip = load_video(videos[name], sampling="all")
    assert clip.timestamps == pytest.approx(pts.tolist(), abs=1e-3)

    def shown_at(t: float) -> int:
        return int(np.searchsorted(pts, t + 1e-9, side="right") - 1)

    ts = [0.0, 0.25, 1.0, 2.5, float(pts[-1])]
    clip = load_video(videos[name], timestamps=ts)
    assert clip.indices == [shown_at(t) for t in ts]
    assert idx_of(clip) == clip.indices
    clip = load_video(videos[name], sampling="fps", fps=2)
    expected = [shown_at(i / 2) for i in range(int(np.ceil(info["duration"] * 2 - 1e-6)))]
    assert clip.indices == expected and idx_of(clip) == expected
    clip = load_video(videos[name], sampling="all", start=1.0, end=2.0)
    expected = [i for i, t in enumerate(pts) if 1.0 <= t < 2.0]
    assert clip.indices == expected and idx_of(clip) == expected


# ------------------------------------------------------------------------------------ rotation

@pytest.mark.parametrize(("name", "turns"), [("rot90_mp4", 1), ("rot270_mp4", -1)])
def test_rotation_metadata_gives_display_orientation(videos, name, turns):
    clip = load_video(videos[name], indices=[0, 5, 19])
    for i, f in zip(clip.indices, clip.frames, strict=True):
        assert f.size == (H, W)  # portrait: width and height swapped
        expected = np.rot90(index_frame(i), turns)  # display = stored frame turned counter-clockwise
        assert np.abs(np.asarray(f, np.int16) - expected).mean() < 2.0
        assert read_index(np.rot90(np.asarray(f), -turns)) == i


def test_size_is_in_display_orientation(videos):
    clip = load_video(videos["rot90_mp4"], indices=[3], size=(48, 64))
    assert clip.frames[0].size == (48, 64)
    assert read_index(np.rot90(np.asarray(clip.frames[0]), -1)) == 3


# -------------------------------------------------------------------------------- resize in decoder

@pytest.mark.parametrize(("size", "expected"), [((64, 48), (64, 48)), (48, (64, 48)), (192, (256, 192)),
                                               (lambda w, h: (w // 4, h // 4), (32, 24))])
def test_size_option(videos, size, expected):
    clip = load_video(videos["cfr_mp4"], indices=[7, 77], size=size)
    assert [f.size for f in clip.frames] == [expected, expected]
    assert idx_of(clip) == [7, 77]


def test_bad_size_rule(videos):
    with pytest.raises(MediaError, match="size must be"):
        load_video(videos["cfr_mp4"], size=(0, 10))
    with pytest.raises(MediaError, match="size rule returned"):
        load_video(videos["cfr_mp4"], size=lambda w, h: "big")


# ---------------------------------------------------------------------------------- streaming

def test_iter_video_chunks_streams_every_frame_in_order(videos):
    chunks = list(iter_video_chunks(videos["cfr_mp4"], chunk_size=32, sampling="all"))
    assert [len(c) for c in chunks] == [32, 32, 32, 24]
    assert [i for c in chunks for i in c.indices] == list(range(N_CFR))
    assert [i for c in chunks for i in idx_of(c)] == list(range(N_CFR))
    assert all(c.total_frames == N_CFR and c.sampling == "all" for c in chunks)


def test_iter_video_chunks_is_lazy_and_closes(videos):
    gen = iter_video_chunks(videos["cfr_mp4"], chunk_size=4, sampling="fps", fps=5, size=32)
    first = next(gen)
    assert first.indices == [0, 5, 10, 15] and idx_of(first) == [0, 5, 10, 15]
    gen.close()  # must release the container without decoding the rest


def test_iter_video_chunks_repeats_and_rejects_unsorted(videos):
    chunks = list(iter_video_chunks(videos["intra_mp4"], chunk_size=5, sampling="slowfast", max_frames=8,
                                    start=0.0, end=0.2))
    assert [i for c in chunks for i in c.indices] == [0, 0, 1, 1, 2, 2, 3, 4]
    with pytest.raises(MediaError, match="ascending"):
        list(iter_video_chunks(videos["cfr_mp4"], indices=[5, 1]))
    with pytest.raises(TypeError):
        list(iter_video_chunks(videos["cfr_mp4"], bogus=1))


# ------------------------------------------------------------------------------ other sources

def test_bytes_filelike_data_url_and_wrong_extension(videos):
    data = videos["cfr_mp4"].read_bytes()
    expected = [0, 25, 50, 75, 100]
    assert idx_of(load_video(data)) == expected
    assert idx_of(load_video(io.BytesIO(data))) == expected
    url = "data:video/mp4;base64," + base64.b64encode(data).decode()
    clip = load_video(url)
    assert idx_of(clip) == expected and clip.source.startswith("data:video/mp4;base64")
    assert idx_of(load_video(videos["mp4_as_jpg"])) == expected  # content decides, not the name
    assert idx_of(load_video(str(videos["cfr_mp4"]))) == expected


def test_frame_directory_natural_order(frame_dir):
    clip = load_video(frame_dir, sampling="all")
    assert idx_of(clip) == list(range(12))  # frame_2 before frame_10, no hidden/non-image files
    assert clip.backend == "frames" and clip.fps == 1.0 and clip.duration == 12.0
    assert clip.timestamps == [float(i) for i in range(12)]
    clip = load_video(str(frame_dir), sampling="slowfast", max_frames=4)
    assert clip.indices == [0, 3, 7, 11] and idx_of(clip) == [0, 3, 7, 11]
    # owl3 on a 1 fps frame list: one candidate per frame, uniform_sample to max_frames
    clip = load_video(frame_dir, sampling="owl3", max_frames=4)
    assert clip.indices == [1, 4, 7, 10]
    clip = load_video(frame_dir, sampling="fps", fps=1, source_fps=4.0)
    assert clip.indices == [0, 4, 8] and clip.timestamps == [0.0, 1.0, 2.0]


def test_frame_list_sources(frame_dir, tmp_path):
    arrays = [index_frame(i) for i in range(10)]
    pil = [Image.fromarray(a) for a in arrays]
    paths = sorted(frame_dir.glob("frame_*.png"), key=lambda p: int(p.stem.split("_")[1]))[:10]
    for source in (arrays, pil, paths, np.stack(arrays)):
        clip = load_video(source, sampling="slowfast", max_frames=3)
        assert clip.indices == [0, 4, 9]
        assert idx_of(clip) == [0, 4, 9]
    torch = pytest.importorskip("torch")
    clip = load_video(torch.from_numpy(np.stack(arrays)), indices=[2, 3])
    assert idx_of(clip) == [2, 3]
    clip = load_video(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2), indices=[6])  # T x C x H x W
    assert idx_of(clip) == [6]
    clip = load_video(pil, indices=[1], size=(64, 48))
    assert clip.frames[0].size == (64, 48) and idx_of(clip) == [1]


# ------------------------------------------------------------------------------------- errors

def one_line_error(exc_info, *needles: str) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_missing_file(tmp_path):
    with pytest.raises(MediaError) as e:
        load_video(tmp_path / "nope.mp4")
    one_line_error(e, "nope.mp4", "file not found")


def test_truncated_file_without_index(videos):
    with pytest.raises(MediaError) as e:
        load_video(videos["truncated_mp4"])
    one_line_error(e, "truncated.mp4", "cannot open as a video", "truncated")


def test_truncated_file_with_index(videos):
    path = videos["truncated_faststart_mp4"]
    with pytest.raises(MediaError) as e:
        load_video(path, sampling="all")
    one_line_error(e, "truncated_faststart.mp4", "ends after frame", "truncated")
    with pytest.warns(MediaWarning, match="ends after frame"):
        clip = load_video(path, sampling="all", skip_bad_frames=True)
    assert 10 < len(clip) < N_CFR
    assert idx_of(clip) == list(range(len(clip)))


def test_truncated_matroska(videos):
    with pytest.raises(MediaError) as e:
        load_video(videos["truncated_mkv"])
    one_line_error(e, "truncated.mkv", "truncated file")
    with pytest.warns(MediaWarning, match="truncated"):
        clip = load_video(videos["truncated_mkv"], sampling="all", skip_bad_frames=True)
    assert idx_of(clip) == clip.indices == list(range(len(clip)))


def test_random_bytes_with_video_extension(videos):
    with pytest.raises(MediaError) as e:
        load_video(videos["random_mp4"])
    one_line_error(e, "random.mp4", "cannot open as a video")


def test_audio_only_file(videos):
    with pytest.raises(MediaError) as e:
        load_video(videos["audio_only"])
    one_line_error(e, "audio_only.m4a", "no video stream", "audio-only")


def test_unsupported_codec(videos):
    with pytest.raises(MediaError) as e:
        load_video(videos["unknown_codec_avi"])
    one_line_error(e, "unknown_codec.avi", "unsupported video codec")


def test_zero_frame_video(videos):
    with pytest.raises(MediaError) as e:
        load_video(videos["empty_mkv"])
    one_line_error(e, "empty.mkv", "no frames")


def test_image_passed_as_video(videos):
    with pytest.raises(MediaError) as e:
        load_video(videos["png_as_mp4"])
    one_line_error(e, "image.mp4", "PNG image, not a video")
    with pytest.raises(MediaError, match="a single image is not a video"):
        load_video(Image.new("RGB", (4, 4)))


def test_over_limit_bytes(videos):
    data = videos["cfr_mp4"].read_bytes()
    with pytest.raises(MediaTooLargeError) as e:
        load_video(data, max_bytes=1000)
    one_line_error(e, f"{len(data)} bytes", "max_bytes=1000")


def test_bad_options(videos):
    with pytest.raises(MediaError, match="unknown video backend"):
        load_video(videos["cfr_mp4"], backend="decord")
    with pytest.raises(MediaError, match="unknown decode_strategy"):
        load_video(videos["cfr_mp4"], decode_strategy="fast")
    with pytest.raises(MediaError, match="source_fps only applies"):
        load_video(videos["cfr_mp4"], source_fps=5)
    with pytest.raises(MediaError, match="out of range"):
        load_video(videos["cfr_mp4"], indices=[N_CFR])
    with pytest.raises(MediaError, match="empty frame list"):
        load_video([])
    with pytest.raises(MediaError, match="T x H x W x 3"):
        load_video(np.zeros((4, 4, 3), np.uint8))


def test_bad_frame_in_list_is_skipped_with_warning(tmp_path):
    frames = [index_frame(0), tmp_path / "missing.png", index_frame(2)]
    with pytest.raises(MediaError, match="frame 1"):
        load_video(frames, sampling="all")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clip = load_video(frames, sampling="all", skip_bad_frames=True)
    assert clip.indices == [0, 2] and idx_of(clip) == [0, 2]
    assert any(issubclass(w.category, MediaWarning) and "missing.png" in str(w.message) for w in caught)


def test_skipping_non_reference_frames_never_loses_a_wanted_frame(videos, monkeypatch):
    """Non-reference frames nobody asked for are not decoded. If a wanted frame were skipped (here
    forced by hiding the wanted packet timestamps) the reader must notice and decode again."""
    from owlvid.media import pyav_backend

    fallbacks = []
    original = pyav_backend.PyAVReader._stop_skipping_nonref

    def record(self):
        fallbacks.append(original(self))
        return fallbacks[-1]

    monkeypatch.setattr(pyav_backend.PyAVReader, "_packet_pts_of", lambda self, indices: set())
    monkeypatch.setattr(pyav_backend.PyAVReader, "_stop_skipping_nonref", record)
    wanted = list(range(20, 50))  # consecutive frames: B-frames (non-reference) among them
    for strategy in STRATEGIES:
        fallbacks.clear()
        clip = load_video(videos["cfr_mp4"], indices=wanted, decode_strategy=strategy)
        assert idx_of(clip) == wanted
        assert True in fallbacks, strategy  # the skip happened and was caught
    clip = load_video(videos["cfr_mp4"], indices=[N_CFR - 1])  # missing at the very end of the file
    assert idx_of(clip) == [N_CFR - 1]
