"""Video files: frames decoded chunk by chunk on a worker thread while the model encodes, identical to
decoding everything first; a second question about the same file decodes nothing."""

from __future__ import annotations

import numpy as np
import pytest

import owlvid
from owlvid.pipeline import Prefetcher
from owlvid.video_plan import CachedVideo, StreamedVideo

av = pytest.importorskip("av")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=24)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for i in range(192):  # 8 s: 8 one-per-second candidates, 6 kept
            frame = av.VideoFrame.from_ndarray(np.roll(base, 9 * i, axis=1), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return str(path)


def video_message(source, question="What happens?"):
    return [{"role": "user", "content": [{"type": "video", "video": source, "max_frames": 6},
                                         {"type": "text", "text": question}]}]


def test_streamed_video_equals_eager_decoding(tiny_owl3_dirs, clip):
    from owlvid.media import load_video

    model = owlvid.load(tiny_owl3_dirs["241101"], dtype="float32", device="cpu")
    request, _ = model.prepare(video_message(clip))
    (item,) = request["media_items"]
    assert isinstance(item["stream"], StreamedVideo) and item["pixels"] is None and item["crops"] == 6
    streamed = model.generate(video_message(clip), max_new_tokens=10)

    eager_frames = load_video(clip, sampling="owl3", max_frames=6).frames
    plain = owlvid.load(tiny_owl3_dirs["241101"], dtype="float32", device="cpu", cache_bytes=0)
    eager = plain.generate(video_message(eager_frames), max_new_tokens=10)
    assert streamed.token_ids == eager.token_ids
    assert streamed.prompt_tokens == eager.prompt_tokens


def test_second_question_decodes_and_encodes_nothing(tiny_owl3_dirs, clip):
    model = owlvid.load(tiny_owl3_dirs["240728"], dtype="float32", device="cpu")
    model.runtime.prefix_slots = 0
    first = model.generate(video_message(clip), max_new_tokens=6)
    encoded = model.runtime.stats["encoded_crops"]
    assert encoded == 6
    request, _ = model.prepare(video_message(clip, "Is it raining?"))
    assert request["media_items"][0]["pixels"] is None and "stream" not in request["media_items"][0]
    second = model.generate(video_message(clip, "Is it raining?"), max_new_tokens=6)
    assert model.runtime.stats["encoded_crops"] == encoded and model.runtime.stats["cached_crops"] == 6
    assert second.prompt_tokens > 0 and first.prompt_tokens > 0
    assert isinstance(model.runtime.cached_video(request["media_items"][0]["key"]), CachedVideo)


def test_prefetcher_surfaces_worker_errors():
    def broken():
        yield 1
        raise ValueError("decoder failed")

    seen = []
    with pytest.raises(ValueError, match="decoder failed"):
        for item in Prefetcher(broken()):
            seen.append(item)
    assert seen == [1]
