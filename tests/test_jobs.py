"""`jobs.generate_each`: the engine under batch jobs, evaluation and Ray. Results equal `model.generate`
alone; a failing job is that job's exception, the others go on."""

from __future__ import annotations

import pytest

import owlvid
from owlvid.errors import InputError
from owlvid.jobs import generate_each
from owlvid.models.slowfast.testing import make_tiny_slowfast
from tests.owl3.test_caching_and_batching import conversations


@pytest.mark.parametrize("max_batch", [1, 3])
def test_results_equal_generate_alone_and_failures_are_isolated(tiny_owl3_dirs, max_batch):
    model = owlvid.load(tiny_owl3_dirs["241101"], dtype="float32", device="cpu", cache_bytes=0)
    model.runtime.prefix_slots = 0
    convs = conversations()
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
             ("bad-option", (convs[1], {"no_such_option": 1})), (2, later(2)), (3, later(3))]
    results = dict(generate_each(model, items, max_batch=max_batch))
    assert set(results) == {0, 1, 2, 3, "bad", "bad-option"}
    assert isinstance(results["bad"], InputError) and "clip.mp4" in str(results["bad"])
    assert isinstance(results["bad-option"], InputError)
    assert {i: results[i].token_ids for i in range(4)} == alone
    assert calls == [0, 2, 3]


def test_models_without_batching_answer_one_by_one(tmp_path):
    model = owlvid.load(make_tiny_slowfast(tmp_path / "sf"), dtype="float32", device="cpu")
    model.runtime.supports_batching = False  # every family batches today: a runtime without the capability
    conv = [{"role": "user", "content": "Hello there"}]
    alone = model.generate(conv, max_new_tokens=5).token_ids
    results = list(generate_each(model, [("a", (conv, {"max_new_tokens": 5})), ("b", (conv, {"oops": 1}))]))
    assert results[0][0] == "a" and results[0][1].token_ids == alone
    assert results[1][0] == "b" and isinstance(results[1][1], InputError)
