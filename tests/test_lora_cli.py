"""LoRA adapters through the front doors: `--adapter`, `owlvid serve --lora-modules` (a real server process, the
official `openai` client), `owlvid batch --lora-modules` (each line's `model`)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import owlvid
from owlvid.cli import main
from owlvid.testing import make_lora_adapter, make_tiny_owl3

QUESTIONS = ["Tell me a story about owls.", "What is the capital of France?", "Count to five."]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-cli")
    base = make_tiny_owl3(root / "base", "241101", dtype=torch.float32)
    return {"base": base, "a": make_lora_adapter(root / "a", base, seed=1),
            "b": make_lora_adapter(root / "b", base, seed=2, r=2, use_rslora=True)}


@pytest.fixture(scope="module")
def answers(folders):
    """The in-process reference: per model (None: base, or an adapter merged at load), per question, the greedy
    answer of 12 tokens."""
    out = {}
    for name in (None, "a", "b"):
        model = owlvid.load(folders["base"], device="cpu", dtype="float32",
                            adapter=None if name is None else folders[name])
        out[name] = [model.chat([{"role": "user", "content": q}], max_new_tokens=12) for q in QUESTIONS]
    assert out[None] != out["a"] != out["b"]  # the adapters change the answers
    return out


def test_ask_with_adapter_prints_the_merged_answer(folders, answers, capsys):
    code = main(["ask", QUESTIONS[0], "--model", str(folders["base"]), "--dtype", "float32", "--device", "cpu",
                 "--adapter", str(folders["a"]), "--max-new-tokens", "12"])
    assert code == 0
    assert capsys.readouterr().out.strip() == answers["a"][0].strip()


@pytest.mark.parametrize("argv, fragment", [
    (["--lora-modules", "a"], "--lora-modules takes NAME=DIR, got 'a'"),
    (["--lora-modules", "a=x", "a=y"], "names 'a' twice"),
    (["--lora-modules", "a=x", "b=y", "--max-loras", "1"], "gives 2 adapters but --max-loras is 1"),
    (["--max-loras", "2"], "--max-loras needs --lora-modules"),
    (["--lora-modules", "tiny=x", "--served-model-name", "tiny"], "is the base model's name"),
])
def test_lora_flag_usage_errors(folders, tmp_path, argv, fragment, capsys):
    lines = tmp_path / "in.jsonl"
    lines.write_text("")
    code = main(["serve", "--model", str(folders["base"]), "--device", "cpu", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and fragment in err and len(err.splitlines()) == 1


def test_batch_lines_pick_their_adapter(folders, answers, tmp_path):
    lines = []
    for i, name in enumerate([None, "a", "b", "a", None, "b"]):
        body = {"messages": [{"role": "user", "content": QUESTIONS[i % 3]}], "max_tokens": 12}
        if name is not None:
            body["model"] = name
        elif i:
            body["model"] = "gpt-4o"  # another name: the base model answers, as before (batch files)
        lines.append({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    code = main(["batch", "--model", str(folders["base"]), "--dtype", "float32", "--device", "cpu", "-i", str(src),
                 "-o", str(out), "--no-progress", "--lora-modules", f"a={folders['a']}", f"b={folders['b']}"])
    assert code == 0
    bodies = {r["custom_id"]: r["response"]["body"] for r in map(json.loads, out.read_text().splitlines())}
    base_name = bodies["r0"]["model"]
    for i, name in enumerate([None, "a", "b", "a", None, "b"]):
        assert bodies[f"r{i}"]["choices"][0]["message"]["content"] == answers[name][i % 3], i
        assert bodies[f"r{i}"]["model"] == (name or base_name), i  # the answer names the adapter that gave it
    assert base_name not in ("a", "b")


def test_server_lists_and_routes_adapters(folders, answers, tmp_path):
    pytest.importorskip("openai")
    import openai

    from .server.helpers import ServerProcess, running_servers

    server = ServerProcess(folders["base"], tmp_path, "--lora-modules", f"a={folders['a']}", f"b={folders['b']}",
                           "--max-loras", "2", "--max-batch", "8")
    with running_servers(main=server):
        client = server.client()
        listed = {m.id: m for m in client.models.list().data}
        assert set(listed) == {"tiny-owl3", "a", "b"}
        assert listed["a"].model_extra["parent"] == "tiny-owl3"
        assert listed["b"].model_extra["root"] == str(folders["b"])

        def ask(job):
            name, i = job
            reply = client.chat.completions.create(model=name, max_tokens=12,
                                                   messages=[{"role": "user", "content": QUESTIONS[i]}])
            return reply.model, reply.choices[0].message.content

        jobs = [(name, i) for i in range(3) for name in ("tiny-owl3", "a", "b")]
        with ThreadPoolExecutor(len(jobs)) as pool:  # together: rows of all three decode in one batch
            replies = list(pool.map(ask, jobs))
        for (name, i), (model, text) in zip(jobs, replies):
            assert model == name
            assert text == answers[None if name == "tiny-owl3" else name][i], (name, i)
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model="c", messages=[{"role": "user", "content": "hi"}])
        assert e.value.body["code"] == "model_not_found" and "`a`, `b`" in e.value.body["message"]
