"""`owlvid ask --stop`: the answer printed (streamed) ends before the stop string, as `generate()`."""

from __future__ import annotations

import pytest

from .test_cli import common, model, model_dir, run_cli  # noqa: F401 - session fixtures

QUESTION = "Tell me about owls."


def test_ask_with_stop_prints_the_cut_answer(model_dir, model):  # noqa: F811
    messages = [{"role": "user", "content": QUESTION}]
    full = model.generate(messages, max_new_tokens=12).text
    candidates = [full[i:i + 2] for i in range(2, len(full) - 2)
                  if "\x00" not in full[i:i + 2] and full[i:i + 2].isprintable()]
    if not candidates:
        pytest.skip("the greedy answer has no printable stop string")
    stop = candidates[len(candidates) // 2]
    ref = model.generate(messages, max_new_tokens=12, stop=[stop])
    assert ref.finish_reason == "stop" and ref.text == full[: full.index(stop)]
    proc = run_cli("ask", QUESTION, *common(model_dir), "--stop", stop)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ref.text + "\n"
