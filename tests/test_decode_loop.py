"""The batched decode loop: sampling on the device, the preallocated ragged KV cache, no device reads.

The decode step must never read a value back from the device (on a GPU each read stalls the pipeline):
the tests run the step on PyTorch's `meta` device, where every such read raises.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from owlvid.engine import SamplingParams, run_batch
from owlvid.kv_cache import KVCache, RaggedKVCache
from owlvid.sampling import Sampler, sample

META = torch.device("meta")
MIXED = [SamplingParams(), SamplingParams(repetition_penalty=1.3),
         SamplingParams(temperature=0.8, top_k=5, seed=1), SamplingParams(temperature=1.2, top_p=0.7, seed=2),
         SamplingParams(temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.1, seed=3),
         SamplingParams(temperature=1.0, seed=4)]


# -- sampling ------------------------------------------------------------------------------------------


def test_a_batch_samples_what_each_row_samples_alone():
    """Rows with different settings in one call: each row's tokens over several steps equal that row
    sampled on its own (its own generator and penalty history; nothing leaks between rows)."""
    gen = torch.Generator().manual_seed(0)
    steps = [torch.randn(len(MIXED), 300, generator=gen) * 3 for _ in range(6)]
    together = [Sampler(p, history=[7, 8]) for p in MIXED]
    alone = [Sampler(p, history=[7, 8]) for p in MIXED]
    for logits in steps:
        batch = sample(logits.clone(), together).tolist()
        single = [s(logits[b]) for b, s in enumerate(alone)]
        assert batch == single
        for s, t in zip(together, batch):
            s.observe(t)
        for s, u in zip(alone, single):
            s.observe(u)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    def logits():
        return torch.tensor([[2.0, 1.9, -0.5, -0.6, 0.1]])

    assert sample(logits(), [Sampler(SamplingParams())]).tolist() == [0]
    # 2.0 / 1.1 = 1.82 < 1.9: the seen best token loses its place
    assert sample(logits(), [Sampler(SamplingParams(repetition_penalty=1.1), history=[0])]).tolist() == [1]
    # both seen: 1.82 vs 1.73, token 0 wins again; a seen negative logit moves further down
    both = Sampler(SamplingParams(repetition_penalty=1.1), history=[0, 0, 99])  # 99: past the vocabulary
    both.observe(1)
    penalized = logits()
    assert sample(penalized, [both]).tolist() == [0]
    torch.testing.assert_close(penalized, torch.tensor([[2.0 / 1.1, 1.9 / 1.1, -0.5, -0.6, 0.1]]))
    only_negative = torch.tensor([[-0.5, -0.6, -3.0]])
    assert sample(only_negative, [Sampler(SamplingParams(repetition_penalty=1.5), history=[0])]).tolist() == [1]
    torch.testing.assert_close(only_negative, torch.tensor([[-0.75, -0.6, -3.0]]))


def test_seeded_sampling_repeats_and_different_seeds_differ():
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(2))
    draws = [[Sampler(SamplingParams(temperature=1.0, seed=s))(logits[0]) for _ in range(3)] for s in (5, 5, 6)]
    assert draws[0] == draws[1]
    runs = {tuple(sample(logits.expand(1, -1), [Sampler(SamplingParams(temperature=1.0, seed=s))]).tolist())
            for s in range(20)}
    assert len(runs) > 5


# -- the ragged KV cache -------------------------------------------------------------------------------


def _filled_cache(length: int, seed: int) -> KVCache:
    cache = KVCache(2, 1, 2, 4, length + 3, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(seed)
    for entry in cache.layers:
        entry.k[:, :, :length] = torch.randn(1, 2, length, 4, generator=gen)
        entry.v[:, :, :length] = torch.randn(1, 2, length, 4, generator=gen)
    cache.length = length
    return cache


def _row(cache: RaggedKVCache, b: int, layer: int = 0) -> torch.Tensor:
    return cache.layers[layer].k[b, :, : cache.host_lengths[b]]


def test_rows_join_and_leave_in_place_without_reallocating():
    caches = [_filled_cache(n, seed) for seed, n in enumerate((5, 9, 3, 7))]
    ragged = RaggedKVCache.from_caches(caches[:2], rows=4)
    storage = ragged.layers[0].k.data_ptr()
    ragged.add(caches[2:])
    assert ragged.host_lengths == [5, 9, 3, 7] and ragged.lengths.tolist() == [5, 9, 3, 7]
    ragged.keep([1, 3])  # rows 1 and 3 move down to 0 and 1
    assert ragged.layers[0].k.data_ptr() == storage
    assert ragged.host_lengths == [9, 7]
    assert torch.equal(_row(ragged, 0), caches[1].layers[0].k[0, :, :9])
    assert torch.equal(_row(ragged, 1, layer=1), caches[3].layers[1].k[0, :, :7])
    new = torch.full((2, 2, 1, 4), 5.0)
    k, _ = ragged.append(0, new, new)
    assert k.shape == (2, 2, 10, 4)
    assert torch.equal(ragged.layers[0].k[1, :, 7], torch.full((2, 4), 5.0))
    assert ragged.valid_mask()[:, 0, 0].tolist() == [[True] * 10, [True] * 8 + [False] * 2]
    ragged.advance(1)
    assert ragged.host_lengths == [10, 8] and ragged.lengths.tolist() == [10, 8]


def test_the_cache_grows_when_the_batch_outgrows_it():
    caches = [_filled_cache(n, seed) for seed, n in enumerate((4, 6, 2))]
    ragged = RaggedKVCache.from_caches(caches[:1], rows=1, extra=1)
    ragged.add(caches[1:])  # more rows and a longer row than allocated
    assert ragged.rows >= 3 and ragged.capacity >= 7
    for b, c in enumerate(caches):
        assert torch.equal(_row(ragged, b), c.layers[0].k[0, :, : c.length])
    for _ in range(10):  # decoding past the capacity
        one = torch.ones(3, 2, 1, 4)
        ragged.append(1, one, one)
        ragged.advance(1)
    assert ragged.host_lengths == [14, 16, 12]
    assert torch.equal(_row(ragged, 2, layer=1)[:, :2], caches[2].layers[1].k[0, :, :2])


# -- the whole step on the meta device ---------------------------------------------------------------


def _to_meta(obj):
    """A prefilled decoding state (dataclasses, dicts, lists, tensors) moved to the meta device."""
    if isinstance(obj, torch.Tensor):
        return obj.to(META)
    if isinstance(obj, KVCache):
        for entry in obj.layers:
            entry.k, entry.v = entry.k.to(META), entry.v.to(META)
        return obj
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            setattr(obj, f.name, _to_meta(getattr(obj, f.name)))
        return obj
    if isinstance(obj, dict):
        return {k: _to_meta(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_meta(v) for v in obj)
    return obj


def _runtime_on_meta(model, states):
    runtime = model.runtime
    runtime.model.to(META)
    rope = runtime.model.rope
    rope.inv_freq, rope._cos, rope._sin = rope.inv_freq.to(META), rope._cos.to(META), rope._sin.to(META)
    runtime.device = META
    return runtime, [_to_meta(s) for s in states]


@pytest.mark.parametrize("family", ["owl3", "slowfast"])
@pytest.mark.parametrize("lora", [False, True])
def test_decode_steps_read_nothing_back_from_the_device(family, lora, tmp_path, tiny_owl3_dirs):
    """Batched steps, sampling (greedy and penalised), requests joining and leaving: all on the meta
    device, where reading a value back (`int(t)`, `.item()`, `.tolist()`, `bool(t)`) raises. With `lora`,
    the rows are on two unmerged LoRA adapters and the base model (per-row deltas)."""
    import owlvid
    from owlvid.testing import make_lora_adapter
    from owlvid.testing.slowfast import make_tiny_slowfast

    folder = tiny_owl3_dirs["241101"] if family == "owl3" else make_tiny_slowfast(tmp_path / "sf")
    under = "language_model" if family == "owl3" else "model.layers"
    adapters = {name: make_lora_adapter(tmp_path / name, folder, seed=i, under=under)
                for i, name in enumerate("ab")} if lora else None
    model = owlvid.load(folder, dtype="float32", device="cpu", lora_modules=adapters)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    states = []
    for i, with_image in enumerate((True, False, True)):
        content = [{"type": "text", "text": "describe " * (i + 1)}]
        if with_image:
            content.insert(0, {"type": "image", "image": image})
        adapter = ("a", None, "b")[i] if lora else None
        request, _ = model.prepare([{"role": "user", "content": content}], adapter=adapter)
        states.append(model.runtime.prefill(request)[1])
    runtime, states = _runtime_on_meta(model, states)
    samplers = [Sampler(SamplingParams()), Sampler(SamplingParams(repetition_penalty=1.2), history=[3, 4])]
    batch = runtime.start_batch(states[:2], max_rows=4)
    tokens: list[int] | torch.Tensor = [11, 12]
    for _ in range(3):
        tokens = sample(runtime.decode_batch(batch, tokens), samplers)
        assert tokens.device == META and tokens.shape == (2,)
    runtime.join_batch(batch, states[2:])
    samplers.append(Sampler(SamplingParams(repetition_penalty=1.1)))
    tokens = sample(runtime.decode_batch(batch, torch.zeros(3, dtype=torch.long, device=META)), samplers)
    runtime.keep_rows(batch, [0, 2])
    logits = runtime.decode_batch(batch, tokens[[0, 2]])
    assert logits.shape[0] == 2 and logits.dtype == torch.float32
    first = [s.position for s in states]
    assert batch.host_positions == [first[0] + 5, first[2] + 2]
    assert (batch.adapters.host if lora else batch.adapters) == ([1, 2] if lora else None)


def test_batched_results_are_unchanged_with_sampling_and_early_finishes(tiny_owl3_models):
    """The engine end to end: mixed sampling settings and lengths, batch of 3 with joins as rows finish;
    each result equals the request generated alone."""
    model = tiny_owl3_models["241101"]
    runtime = model.runtime
    items = []
    for i, params in enumerate(MIXED):
        request, ids = model.prepare([{"role": "user", "content": f"Tell me about {i} cats."}])
        items.append((request, ids, dataclasses.replace(params, max_new_tokens=4 + 3 * i)))
    batched = run_batch(runtime, items, max_batch=3)
    for (request, ids, params), got in zip(items, batched):
        alone = run_batch(runtime, [(request, ids, params)], max_batch=1)[0]
        assert got.token_ids == alone.token_ids and got.text == alone.text
    assert all(g.token_ids for g in batched)


def _visual(n: int, seed: int, layers=(1, 3)):
    from owlvid.models.owl3.language import VisualMemory

    gen = torch.Generator().manual_seed(seed)
    kv = {layer: (torch.randn(1, 2, n, 4, generator=gen), torch.randn(1, 2, n, 4, generator=gen)) for layer in layers}
    return VisualMemory(starts=torch.tensor([0]), tokens_per_item=n, kv=kv)


def test_owl3_visual_memory_rows_join_and_leave_in_place():
    """The batched visual memory: newcomers are copied into free rows (storage reused once it is big
    enough), leaving rows are compacted in place, and the views equal a memory built from the rows kept."""
    from owlvid.models.owl3.language import BatchedVisualMemory

    layers = [1, 3]
    memories = [_visual(6, 0), None, _visual(9, 1), _visual(3, 2)]
    batch = BatchedVisualMemory.from_memories(memories[:2], layers)
    batch = BatchedVisualMemory.concat(batch, 2, BatchedVisualMemory.from_memories(memories[2:], layers), 2)
    kept = batch.keep([0, 2])  # rows 1 (no media) and 3 leave
    storage = kept.storage[3][0].data_ptr()
    expected = BatchedVisualMemory.from_memories([memories[0], memories[2]], layers)
    for layer in layers:
        for got, want in zip(kept.kv[layer], expected.kv[layer]):
            assert got.shape == want.shape and torch.equal(got[expected.key_mask[:, None, :, None].expand_as(got)],
                                                           want[expected.key_mask[:, None, :, None].expand_as(want)])
    assert torch.equal(kept.key_mask, expected.key_mask) and kept.has_media.tolist() == [True, True]
    joined = BatchedVisualMemory.concat(kept, 2, BatchedVisualMemory.from_memories([memories[3]], layers), 1)
    assert joined is kept and joined.storage[3][0].data_ptr() == storage  # no reallocation
    assert joined.sizes == [6, 9, 3] and joined.key_mask.sum(1).tolist() == [6, 9, 3]
    assert torch.equal(joined.kv[1][1][2, :, :3], memories[3].kv[1][1][0])
    assert BatchedVisualMemory.concat(joined, 3, None, 1).sizes == [6, 9, 3, 0]  # a text-only newcomer
    assert joined.keep([3]) is None


def test_greedy_takes_the_first_largest_logit_as_torch_argmax_does():
    """Greedy rows on the CPU go through NumPy's argmax: the same index as torch's, ties and NaN included."""
    logits = torch.randn(5, 1000, generator=torch.Generator().manual_seed(3))
    logits[1, [10, 500]] = 50.0  # a tie: the first wins
    logits[2, 7] = float("nan")  # NaN counts as the largest
    logits[3] = 0.0  # all equal
    want = logits.argmax(-1)
    got = sample(logits.clone(), [Sampler(SamplingParams()) for _ in range(5)])
    assert got.dtype == torch.long and got.tolist() == want.tolist() == [want[0].item(), 10, 7, 0, want[4].item()]
