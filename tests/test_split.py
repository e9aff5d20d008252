"""One model across several devices (owlvid.stages) on the CPU: every stage on the CPU (`cpu`, `cpu:1`, `cpu:2`
name three stages there), so no tensor changes device, but the whole stage machinery runs: the placement from
the memory plan, weights loaded per group, per-layer caches and visual K/V, the staged decoder loop and its
boundary count. Greedy tokens equal the unsplit model's for both families, alone, batched and chunked."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

import owlvid
from owlvid.checkpoint import checkpoint_shapes, read_config
from owlvid.cli import main
from owlvid.engine import run_batch
from owlvid.errors import InputError
from owlvid.plan import GiB, parse_max_memory, plan_memory
from owlvid.stages import Stages, plan_stages

from .plan.published import OWL3_7B_241101
from .quantize_cases import CASES, OWL3_CASES, SLOWFAST_CHECKPOINT, case_inputs, checkpoint_folder

TIED = "tiny-241014"  # a tied LM head: the final norm runs beside the embedding (one more boundary)
STEPS = 10


def three_stages(layers: int) -> dict[str, str]:
    """A device map with three CPU stages: the first third of the layers with the embedding, the second with
    the vision side, the last with the head."""
    a, b = max(1, layers // 3), max(2, 2 * layers // 3)
    mapping = {"": "cpu", "vision": "cpu:1", "lm_head": "cpu:2"}
    mapping.update({f"llm.layers.{i}": "cpu:1" for i in range(a, b)})
    mapping.update({f"llm.layers.{i}": "cpu:2" for i in range(b, layers)})
    return mapping


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """checkpoint -> (unsplit, split) models, float32 on the CPU, loaded on first use."""
    loaded: dict[str, tuple[owlvid.Model, owlvid.Model]] = {}

    def get(checkpoint: str) -> tuple[owlvid.Model, owlvid.Model]:
        if checkpoint not in loaded:
            if checkpoint == TIED:
                from owlvid.testing import make_tiny_owl3

                folder, tokenizer = make_tiny_owl3(tmp_path_factory.mktemp("tied") / "tiny", "241014"), None
            else:
                folder, tokenizer = checkpoint_folder(checkpoint)
                if not folder.exists():
                    pytest.skip(f"fixture checkpoint {folder} is absent")
            layers = read_config(folder)["num_hidden_layers"]
            base = owlvid.load(folder, tokenizer=tokenizer, dtype="float32", device="cpu")
            split = owlvid.load(folder, tokenizer=tokenizer, dtype="float32", device_map=three_stages(layers))
            loaded[checkpoint] = base, split
        return loaded[checkpoint]

    return get


def stages_of(model: owlvid.Model) -> Stages:
    stages = model.runtime.model.llm.stages
    assert stages is not None
    return stages


@contextlib.contextmanager
def forward_calls(model: owlvid.Model):
    """The number of decoder forward calls (prefill chunks and decoding steps) made inside the block."""
    calls: list[int] = []
    hook = model.runtime.model.llm.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        yield calls
    finally:
        hook.remove()


def case_kwargs(checkpoint: str, case: str) -> tuple[list[dict], dict]:
    messages, images, videos, cut = case_inputs(SLOWFAST_CHECKPOINT if checkpoint == SLOWFAST_CHECKPOINT else
                                                "tiny-240728" if checkpoint == TIED else checkpoint, case)
    return messages, {"images": images, "videos": videos, "cut_enable": cut, "max_new_tokens": STEPS}


def test_the_split_is_three_stages_with_the_groups_where_the_map_puts_them(models):
    for checkpoint, layers in (("tiny-241101", 4), (SLOWFAST_CHECKPOINT, 7)):
        base, split = models(checkpoint)
        stages = stages_of(split)
        a, b = max(1, layers // 3), max(2, 2 * layers // 3)
        assert [(s.name, s.start, s.end) for s in stages.stages] == [("cpu", 0, a), ("cpu:1", a, b),
                                                                     ("cpu:2", b, layers)]
        assert (stages.vision, stages.embed, stages.head) == ("cpu:1", "cpu", "cpu:2")
        assert split.describe()["device_map"] == ["vision: cpu:1", "embedding: cpu", f"layers 0-{a - 1}: cpu",
                                                  f"layers {a}-{b - 1}: cpu:1", f"layers {b}-{layers - 1}: cpu:2",
                                                  "head: cpu:2"]
        assert "device_map" not in base.describe()
        # the same weights, every parameter loaded (none left on the meta device)
        ours = dict(split.runtime.model.named_parameters())
        for name, p in base.runtime.model.named_parameters():
            assert ours[name].device.type == "cpu" and torch.equal(ours[name], p), name
    assert stages_of(models(TIED)[1]).head == "cpu"  # tied: the head follows the embedding


def check_greedy(models, checkpoint: str, case: str, logits: bool = False) -> None:
    """The same greedy tokens (and with `logits`, bitwise the same prefill logits) as the unsplit model; the
    hidden states crossed every stage boundary once per forward call (embedding -> stages -> head)."""
    base, split = models(checkpoint)
    messages, kwargs = case_kwargs(checkpoint, case)
    expected = base.generate(messages, **kwargs)
    stages = stages_of(split)
    before = stages.transfers
    with forward_calls(split) as calls:
        got = split.generate(messages, **kwargs)
    assert got.token_ids == expected.token_ids and got.text == expected.text
    boundaries = 3 if checkpoint == TIED else 2  # cpu -> cpu:1 -> cpu:2 (-> cpu: the tied head)
    assert calls and stages.transfers - before == boundaries * len(calls)
    if logits:
        options = {k: v for k, v in kwargs.items() if k != "max_new_tokens"}
        assert torch.equal(split.next_token_logits(messages, **options), base.next_token_logits(messages, **options))


@pytest.mark.parametrize("checkpoint,case", [("tiny-240728", "text_only"), ("tiny-240728", "single_image_nocut"),
                                             ("tiny-241101", "single_image_nocut"), (TIED, "single_image_nocut"),
                                             (SLOWFAST_CHECKPOINT, "image_single_turn")])
def test_greedy_tokens_equal_the_unsplit_model(models, checkpoint, case):
    check_greedy(models, checkpoint, case, logits=case == "single_image_nocut")


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint,case", CASES + [(TIED, "video_8_frames")])
def test_every_fixture_case_equals_the_unsplit_model(models, checkpoint, case):
    check_greedy(models, checkpoint, case, logits=True)


BATCHES = {"tiny-240728": OWL3_CASES["tiny-240728"], "tiny-241101": ["single_image_nocut", "two_images_cut"],
           SLOWFAST_CHECKPOINT: ["image_single_turn", "video_8f_single_turn"]}


@pytest.mark.parametrize("checkpoint", list(BATCHES))
def test_batched_and_chunked_tokens_equal_the_unsplit_model_alone(models, checkpoint, monkeypatch):
    """Cases of a checkpoint (with and without media) and a text-only question decoded as one batch, joining
    as their chunked prefills finish, and generate_batch: each row gets what the unsplit model gives it alone.
    Without stop tokens every row decodes all its tokens, so the rows overlap."""
    base, split = models(checkpoint)
    for model in (base, split):
        monkeypatch.setattr(model.runtime, "stop_token_ids", [])
    text = [{"role": "user", "content": "A text-only question, with no picture at all."}]
    inputs = [case_kwargs(checkpoint, c) for c in BATCHES[checkpoint]] + [(text, {"max_new_tokens": STEPS})]
    alone = [base.generate(m, **kw).token_ids for m, kw in inputs]
    tickets = [split.ticket(m, kw) for m, kw in inputs]
    with forward_calls(split) as calls:
        results = run_batch(split.runtime, tickets, max_batch=4, prefill_chunk=64)
    assert [g.token_ids for g in results] == alone
    assert max(calls) >= 2  # rows really decoded together
    chunks = sum(-(-len(t.prompt_ids) // 64) for t in tickets)
    assert len(calls) >= chunks + STEPS - 1 and len(calls) < chunks + len(tickets) * (STEPS - 1)
    # generate_batch, the media given as message parts (the same kwargs for every conversation)
    image = inputs[0][1]["images"][0]
    convs = [text, [{"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": "What is it?"}]}]]
    expected = [base.generate(c, max_new_tokens=STEPS).token_ids for c in convs]
    with forward_calls(split) as calls:
        assert [g.token_ids for g in split.generate_batch(convs, max_new_tokens=STEPS)] == expected
    assert calls == [1, 1] + [2] * (STEPS - 1)


def test_visual_cache_and_prefix_reuse_on_a_split_model(models):
    base, split = models("tiny-241101")
    messages, kwargs = case_kwargs("tiny-241101", "single_image_nocut")
    first = split.generate(messages, **kwargs)
    split.generate([{"role": "user", "content": "Something else."}], max_new_tokens=2)  # takes the prefix slot
    cached = split.runtime.stats["cached_crops"]
    again = split.generate(messages, **kwargs)
    assert split.runtime.stats["cached_crops"] > cached  # the second answer's crops came from the cache
    assert again.token_ids == first.token_ids == base.generate(messages, **kwargs).token_ids


def test_quantized_split_equals_quantized_unsplit():
    pytest.importorskip("torchao")
    folder, tokenizer = checkpoint_folder("tiny-241101")
    if not folder.exists():
        pytest.skip("fixture checkpoint absent")
    base = owlvid.load(folder, tokenizer=tokenizer, dtype="float32", device="cpu", quantize="int8")
    split = owlvid.load(folder, tokenizer=tokenizer, dtype="float32", quantize="int8", device_map=three_stages(4))
    assert split.describe()["quantize"] == "int8"
    assert split.describe()["language_model_bytes"] == base.describe()["language_model_bytes"]
    messages, kwargs = case_kwargs("tiny-241101", "two_images_cut")
    assert split.generate(messages, **kwargs).token_ids == base.generate(messages, **kwargs).token_ids


# -- the placement is the memory plan's --------------------------------------------------------------------


@pytest.mark.parametrize("device_map,memory", [
    ("auto", "cuda:0=12GiB,cpu=64GiB"),
    ("balanced", "cuda:0=14GiB,cuda:1=14GiB,cuda:2=14GiB,cuda:3=14GiB"),
])
def test_auto_and_balanced_are_the_plans_placement(device_map, memory):
    plan = plan_memory(OWL3_7B_241101, max_memory=parse_max_memory(memory), device_map=device_map)
    stages = plan_stages(OWL3_7B_241101, None, device_map, memory, dtype=torch.bfloat16, quantize=None,
                         cache_bytes=2 * GiB)
    placed = plan.device_of()
    assert stages.groups == placed  # untied: the head where the plan puts it
    assert [stages.device_of(f"llm.layers.{i}.mlp.up_proj.weight") for i in range(28)] == [
        torch.device(placed[f"llm.layers.{i}"]) if placed[f"llm.layers.{i}"] != "cpu" else torch.device("cpu")
        for i in range(28)]
    assert stages.device_of("vision.encoder.layers.0.mlp.fc1.weight") == torch.device(placed["vision"])
    assert stages.device_of("projector.weight") == torch.device(placed["vision"])
    assert stages.device_of("llm.norm.weight") == stages.device_of("lm_head.weight")
    used = [d.device for d in plan.devices if any(g.name.startswith("llm.layers.") for g in d.groups)]
    assert [s.name for s in stages.stages] == used and len(used) >= 2
    assert stages.stages[0].start == 0 and stages.stages[-1].end == 28
    assert all(a.end == b.start for a, b in zip(stages.stages, stages.stages[1:]))


def test_max_memory_is_respected_and_a_refusal_is_one_line(models):
    folder, tokenizer = checkpoint_folder("tiny-241101")
    with pytest.raises(InputError) as e:
        owlvid.load(folder, tokenizer=tokenizer, dtype="float32", device_map="auto", max_memory={"cpu": "1MiB"})
    assert "\n" not in str(e.value) and "does not fit on cpu=0.00GiB" in str(e.value)
    raw, shapes = read_config(folder), checkpoint_shapes(folder)
    stages = plan_stages(raw, shapes, "auto", "cpu=4GiB", dtype=torch.float32, quantize=None, cache_bytes=0)
    assert [s.name for s in stages.stages] == ["cpu"]  # one device: one stage
    for bad, fragment in [({"": "tpu"}, "use cuda:N"), ({}, "empty"), ("everywhere", "must be 'auto'")]:
        with pytest.raises(InputError, match=fragment):
            plan_stages(raw, shapes, bad, None, dtype=torch.float32, quantize=None, cache_bytes=0)
    with pytest.raises(InputError, match="max_memory needs device_map"):
        owlvid.load(folder, tokenizer=tokenizer, device="cpu", max_memory="cpu=1GiB")
    with pytest.raises(InputError, match="not both"):
        owlvid.load(folder, tokenizer=tokenizer, device="cpu", device_map="auto")
    if not torch.cuda.is_available():
        with pytest.raises(owlvid.errors.UnsupportedError, match="no CUDA GPUs"):
            owlvid.load(folder, tokenizer=tokenizer, device_map={"": "cuda:1"})


# -- the command line ------------------------------------------------------------------------------------


def test_cli_device_map_and_max_memory(capsys):
    folder = checkpoint_folder(SLOWFAST_CHECKPOINT)[0]
    if not folder.exists():
        pytest.skip("fixture checkpoint absent")
    assert main(["info", str(folder), "--json", "--dtype", "float32", "--device-map", "balanced",
                 "--max-memory", "cpu=8GiB"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["device_map"] == ["vision: cpu", "embedding: cpu", "layers 0-6: cpu", "head: cpu"]
    for argv, fragment in [(["--device-map", "auto", "--max-memory", "cpu=1KiB"], "does not fit on cpu"),
                           (["--max-memory", "cpu=8GiB"], "needs --device-map"),
                           (["--device-map", "auto", "--device", "cpu"], "not both"),
                           (["--device-map", "auto", "--max-memory", "gpu=3GiB"], "argument --max-memory"),
                           (["--device-map", "auto", "--max-memory", "cuda:0=lots"], "not a memory size"),
                           (["--device-map", "everywhere"], "invalid choice")]:
        try:
            code = main(["info", str(folder), "--dtype", "float32", *argv])
        except SystemExit as e:  # argparse's own errors
            code = e.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code in (1, 2) and len(err) == 1 and err[0].startswith("owlvid: error: ") and fragment in err[0], err


# -- a stage on another device -------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpoint,case", [("tiny-241101", "two_images_cut"), ("tiny-240728", "video_8_frames"),
                                             (SLOWFAST_CHECKPOINT, "image_single_turn")])
def test_a_stage_on_another_device_gets_every_tensor_it_needs(checkpoint, case):
    """CI has no second device, but PyTorch's `meta` device refuses to meet a CPU tensor in any operation, as a
    GPU does: with the last layers and the head on `meta`, a prefill in chunks (visual K/V on their layer's
    device), a batch of two rows decoding (the ragged cache's lengths and the batched visual memory copied to
    that device), a row joining and one leaving run without a device mismatch. (Meta tensors hold no values,
    so nothing is sampled: the tokens are fed.)"""
    folder, tokenizer = checkpoint_folder(checkpoint)
    if not folder.exists():
        pytest.skip("fixture checkpoint absent")
    raw = read_config(folder)
    layers = raw["num_hidden_layers"]
    groups = {"vision": "cpu", "llm.embed_tokens": "cpu", "lm_head": "meta"}
    groups.update({f"llm.layers.{i}": "cpu" if i < layers // 2 else "meta" for i in range(layers)})
    stages = Stages(groups, layers, tied=False)
    model = owlvid.load(folder, tokenizer=tokenizer, dtype="float32", device="cpu")  # tokenizer and processor
    runtime = type(model.runtime).load(folder, raw, model.tokenizer, torch.device("cpu"), torch.float32,
                                       stages=stages)
    assert {p.device.type for n, p in runtime.model.named_parameters() if n.startswith("llm.layers.")} == {
        "cpu", "meta"}
    messages, kwargs = case_kwargs(checkpoint, case)
    text = [{"role": "user", "content": "A question without media."}]
    states = []
    for conv, options in ((messages, kwargs), (text, {})):
        request, ids = runtime.prepare(*_prepared(model, conv, options))
        job = runtime.begin_prefill(request)
        logits = None
        while logits is None:
            logits = runtime.prefill_step(job, 32)
        assert logits.device.type == "meta" and logits.shape[-1] > 1000
        states.append(job.state)
        cache = job.state.cache
        assert [entry.k.device.type for entry in cache.layers] == [d.type for d in stages.layer_devices]
    moves = stages.transfers
    batch = runtime.start_batch(states[:1], max_rows=2)
    out = runtime.decode_batch(batch, torch.tensor([5]))
    runtime.join_batch(batch, states[1:])
    for _ in range(2):
        out = runtime.decode_batch(batch, torch.tensor([5, 6]))
    assert out.shape[0] == 2 and out.device.type == "meta"
    runtime.keep_rows(batch, [1])
    runtime.decode_batch(batch, torch.tensor([7]))
    assert stages.transfers - moves == 4  # one boundary (cpu -> meta; the head is on meta), four steps
    if batch.visual is not None:  # mPLUG-Owl3's batched visual memory: K/V per layer device, the mask beside
        assert {k.device.type for k, _ in batch.visual.storage.values()} == {"cpu", "meta"}


def _prepared(model: owlvid.Model, messages: list[dict], options: dict) -> tuple[list[dict], list, list, bool | None]:
    """The runtime's prepare arguments of a conversation (media loaded as owlvid.messages loads them)."""
    from owlvid.messages import normalize_messages

    msgs, images, videos = normalize_messages(messages, model.runtime, options.get("images"), options.get("videos"),
                                              {}, None)
    return msgs, images, videos, options.get("cut_enable")
