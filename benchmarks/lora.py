"""Decoding speed with LoRA adapters, mPLUG-Owl3 at the real 1B shape with random weights (no download).

    PYTHONPATH=src python benchmarks/lora.py                       # CPU (or the GPU if there is one)
    PYTHONPATH=src python benchmarks/lora.py --rank 64 --tokens 64 --device cuda --dtype bfloat16

Rows (decode tokens/s summed over the requests; the same text prompt for every request, prefilled first):
  (a) base: one request on the base model;
  (b) merged: one request after `merge_adapter` (what `owlvid.load(adapter=...)` does): the same shapes, so it
      should equal (a);
  (d) 4 on base: four requests decoded as one batch (`decode_batch`), all on the base model;
  (c) 4 adapters: the same four requests, each on its own unmerged adapter (`lora_modules`): the base GEMM is
      shared, each row adds its own low-rank delta (gathered factors, one bmm per layer). Target: (c) >= 0.8 x (d);
  (e) 4 on one adapter: the four requests on the same unmerged adapter (plain matmuls, no gather).
Adapters: random factors of rank `--rank` on every linear layer of the decoder (q/k/v/o, gate/up/down and the
hyper layers' v_kv_proj: ms-swift's default target modules for mPLUG-Owl3), lora_alpha = 2 x rank.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from perf import build_model, table

import owlvid
from owlvid.adapters import Adapter, LoraWeights
from owlvid.lora import UNMERGED_SUFFIXES, install_adapters, merge_adapter
from owlvid.testing import write_tiny_tokenizer

PROMPT = [{"role": "user", "content": "Write a long story about a family of owls living in an old oak tree."}]


def random_adapter(model: torch.nn.Module, name: str, rank: int, seed: int) -> Adapter:
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for module_name, module in model.named_modules():
        if module_name.startswith("llm.layers.") and module_name.endswith(UNMERGED_SUFFIXES):
            out_features, in_features = module.weight.shape
            a = torch.randn(rank, in_features, generator=gen) / in_features**0.5
            b = torch.randn(out_features, rank, generator=gen) * 0.01
            modules[module_name] = LoraWeights(module_name, a, b, 2.0)
    return Adapter(name, Path(name), rank, 2.0 * rank, False, modules, sha256=f"random-{seed}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def stepper(model: owlvid.Model, adapters: list[str | None]):
    """(rows, one decoding step of these requests as one batch; a single request: `decode`)."""
    runtime = model.runtime
    states = []
    for name in adapters:
        request, _ = model.prepare(PROMPT, adapter=name)
        states.append(runtime.prefill(request)[1])
    if len(states) == 1:
        return 1, lambda: runtime.decode(states[0], 100)
    batch = runtime.start_batch(states)
    ids = torch.full((len(states),), 100, device=runtime.device)
    return len(states), lambda: runtime.decode_batch(batch, ids)


@torch.inference_mode()
def rates(cases: dict, device: torch.device, steps: int, rounds: int) -> dict[str, float]:
    """Tokens/s of each case: the cases take turns (`rounds` times `steps` steps each, after a warm-up), so
    that load from other processes hits them alike; the best round counts."""
    best = dict.fromkeys(cases, float("inf"))
    for _, step in cases.values():
        step()
    for _ in range(rounds):
        for name, (_, step) in cases.items():
            sync(device)
            t = time.perf_counter()
            for _ in range(steps):
                step()
            sync(device)
            best[name] = min(best[name], (time.perf_counter() - t) / steps)
    return {name: rows / best[name] for name, (rows, _) in cases.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1b", help="1b, 2b (241014) or 7b (241101)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on a GPU or a CPU with bf16 hardware, else fp32")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=8, help="decoding steps per timing")
    ap.add_argument("--repeats", type=int, default=4, help="timings per case, taking turns; the best counts")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (fewer: a smoke run)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = owlvid.checkpoint.resolve_device(args.device)
    dtype = owlvid.checkpoint.resolve_dtype(args.dtype, device)
    tok_dir = Path(tempfile.mkdtemp())
    write_tiny_tokenizer(tok_dir)
    model = build_model(args.shape, dtype, tok_dir, device, layers=args.layers)
    net = model.runtime.model
    adapters = [random_adapter(net, f"lora{i}", args.rank, seed=i) for i in range(4)]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    print(f"{args.shape} shape, {str(dtype).replace('torch.', '')}, {where}, torch {torch.__version__}; "
          f"rank {args.rank} on {len(adapters[0].modules)} layers; best of {args.repeats} x {args.tokens} steps")

    # rows on slot 0 (the base) skip every LoRA op: the base model's cost
    model.runtime.lora_layout = install_adapters(net, adapters)
    model.runtime.adapters = adapters
    names = [a.name for a in adapters]
    cases = {"(a) base, 1 request": stepper(model, [None]), "(d) base, 4 requests": stepper(model, [None] * 4),
             "(c) 4 requests, 4 unmerged adapters": stepper(model, names),
             "(e) 4 requests, 1 unmerged adapter": stepper(model, [names[0]] * 4)}
    measured = rates(cases, device, args.tokens, args.repeats)
    merge_adapter(net, adapters[0])  # what owlvid.load(adapter=...) does; slot-0 rows now run the merged weights
    measured.update(rates({"(b) merged adapter, 1 request": stepper(model, [None])}, device, args.tokens,
                          args.repeats))
    rows = [{"case": name, "tok_s": measured[name]} for name in sorted(measured)]
    base_4 = measured["(d) base, 4 requests"]
    for row in rows:
        row["vs_(a)"] = row["tok_s"] / measured["(a) base, 1 request"]
        row["vs_(d)"] = row["tok_s"] / base_4
    table(f"LoRA decoding, owl3 {args.shape} (target: (c) >= 0.8 x (d))", rows)


if __name__ == "__main__":
    main()
