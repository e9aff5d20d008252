"""`jobs.generate_each`: the engine under batch jobs, evaluation and Ray. Results equal `model.generate`
alone; a failing job is that job's exception, the others go on."""

from __future__ import annotations

import time

import pytest

import owlvid
from owlvid.errors import InputError
from owlvid.jobs import generate_each
from tests.media.synth import write_video
from tests.owl3.test_caching_and_batching import conversations


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("jobs") / "clip.mp4"
    write_video(path, 30)
    return path


@pytest.mark.parametrize(("max_batch", "prefetch", "cache_bytes"), [(1, 0, 0), (3, 0, 0), (3, 2, 0), (2, 2, 1 << 30)])
def test_results_equal_generate_alone_and_failures_are_isolated(tiny_owl3_dirs, clip, max_batch, prefetch,
                                                                 cache_bytes):
    """With prefetching, jobs are prepared (media decoded, vision encoded) on a background thread while the
    engine decodes others: the tokens stay those of `model.generate` alone."""
    model = owlvid.load(tiny_owl3_dirs["241101"], dtype="float32", device="cpu", cache_bytes=cache_bytes)
    model.runtime.prefix_slots = 0
    video = [{"role": "user", "content": [{"type": "video", "video": str(clip), "max_frames": 3},
                                          {"type": "text", "text": "What happens here?"}]}]
    convs = conversations() + [video, video]
    alone = {i: model.generate(c, max_new_tokens=8, stop=["zz"]).token_ids for i, c in enumerate(convs)}
    calls = []

    def later(i):  # built only when admitted
        def build():
            calls.append(i)
            return convs[i], {"max_new_tokens": 8, "stop": ["zz"]}
        return build

    missing = [{"role": "user", "content": [{"type": "video", "video": "/nonexistent/clip.mp4"},
                                            {"type": "text", "text": "?"}]}]
    items = [(0, later(0)), ("bad", (missing, {})), (1, (convs[1], {"max_new_tokens": 8, "stop": ["zz"]})),
             ("bad-option", (convs[1], {"no_such_option": 1})), (2, later(2)), (3, later(3)), (4, later(4)),
             (5, later(5))]
    if cache_bytes:
        model.runtime.visual_cache.clear()
    results = dict(generate_each(model, items, max_batch=max_batch, prefetch=prefetch))
    assert set(results) == {0, 1, 2, 3, 4, 5, "bad", "bad-option"}
    assert isinstance(results["bad"], InputError) and "clip.mp4" in str(results["bad"])
    assert isinstance(results["bad-option"], InputError)
    assert {i: results[i].token_ids for i in range(6)} == alone
    assert calls == [0, 2, 3, 4, 5]
    if cache_bytes:  # prepared in order: the second question finds the first one's encoding
        assert [results[i].media[0]["visual_cache"] for i in (4, 5)] == ["miss", "hit"]
    assert results[5].media[0]["indices"] == results[4].media[0]["indices"]
    assert all(results[i].timings["prepare_s"] > 0 for i in range(6))


def test_prefetching_is_bounded(tiny_owl3_models):
    """10 jobs, prefetch 2: when the first answer comes, at most the admitted job, the two waiting and the one
    being prepared have been built."""
    model = tiny_owl3_models["241101"]
    built = []

    def job(i):
        def build():
            built.append(i)
            return [{"role": "user", "content": f"Question {i}"}], {"max_new_tokens": 2}
        return build

    results = generate_each(model, ((i, job(i)) for i in range(10)), max_batch=1, prefetch=2)
    first_key, _ = next(results)
    time.sleep(0.3)  # the producer has had time to run as far ahead as it may
    assert first_key == 0 and len(built) <= 4
    assert [key for key, _ in results] == list(range(1, 10)) and built == list(range(10))
