"""A model split between a GPU and the CPU (owlvid.load(device_map=...)) against the same model on the GPU alone:
greedy tokens and timings, for both families, alone, batched (generate_batch) and with chunked prefill.

Random-weight checkpoints (owlvid.testing) at a small but real-width shape, float32 so that the two runs may be
compared token for token (the split's CPU layers compute in another order: a tie between two logits may still
flip, so the logits' largest difference is printed too). Every request carries media, so the visual K/V,
the per-layer caches and the batched visual memory all cross devices.

    python benchmarks/split_gpu.py                       # on the GPU machine: cuda:0 vs cuda:0 + cpu (~2 minutes)
    python benchmarks/split_gpu.py --gpu cpu --other cpu:1 --hidden 64 --layers 4   # a CPU smoke run of the script

Prints a table and writes JSON (--json). Not run yet: no GPU was lent to the session that wrote it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import owlvid
from owlvid.engine import run_batch
from owlvid.testing import make_tiny_owl3
from owlvid.testing.slowfast import make_tiny_slowfast


def picture(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def conversations(frames: int) -> list[list[dict]]:
    video = [picture(10 + i) for i in range(frames)]
    image = {"type": "image", "image": picture(1)}
    return [
        [{"role": "user", "content": [image, {"type": "text", "text": "What is it?"}]}],
        [{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": "What happens?"}]}],
        [{"role": "user", "content": "A question without any picture, answered at some length."}],
    ]


def split_map(layers: int, gpu: str, other: str) -> dict[str, str]:
    """Vision, embedding and the first half of the layers on `gpu`; the rest and the head on `other`."""
    mapping = {"": gpu, "lm_head": other}
    mapping.update({f"llm.layers.{i}": other for i in range(layers // 2, layers)})
    return mapping


def measure(model: owlvid.Model, convs: list[list[dict]], tokens: int) -> dict:
    """Tokens and seconds: each conversation alone, all as one batch, and the batch with 64-token prefill chunks."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    out: dict = {"alone": [], "ttft_s": [], "decode_tok_s": []}
    for c in convs:
        model.generate(c, max_new_tokens=2)  # warm-up (kernels; no visual cache, no prefix reuse)
        sync()
        g = model.generate(c, max_new_tokens=tokens)
        sync()
        out["alone"].append(g.token_ids)
        out["ttft_s"].append(round(g.timings.get("prefill_s", 0.0), 4))
        steps = g.timings.get("decode_steps", 0)
        out["decode_tok_s"].append(round(steps / g.timings["decode_s"], 1) if steps else None)
    t0 = time.perf_counter()
    out["batched"] = [g.token_ids for g in model.generate_batch(convs, max_new_tokens=tokens)]
    sync()
    out["batched_s"] = round(time.perf_counter() - t0, 3)
    tickets = [model.ticket(c, {"max_new_tokens": tokens}) for c in convs]
    t0 = time.perf_counter()
    out["chunked"] = [g.token_ids for g in run_batch(model.runtime, tickets, max_batch=4, prefill_chunk=64)]
    sync()
    out["chunked_s"] = round(time.perf_counter() - t0, 3)
    return out


def last_logits_gap(a: owlvid.Model, b: owlvid.Model, conv: list[dict]) -> float:
    return float((a.next_token_logits(conv) - b.next_token_logits(conv)).abs().max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", default="cuda:0")
    p.add_argument("--other", default="cpu", help="where the second half of the layers and the head go")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {
            "owl3-241101": make_tiny_owl3(Path(tmp) / "owl3", "241101", hidden=args.hidden, layers=args.layers,
                                          hyper_layers=tuple(range(2, args.layers + 1, 2))),
            "slowfast": make_tiny_slowfast(Path(tmp) / "slowfast", hidden=args.hidden, layers=args.layers,
                                           heads=max(4, args.hidden // 128), kv_heads=max(2, args.hidden // 512)),
        }
        for family, folder in folders.items():
            convs = conversations(args.frames)
            common = {"dtype": "float32", "cache_bytes": 0}
            single = owlvid.load(folder, device=args.gpu if not args.gpu.startswith("cpu") else "cpu", **common)
            split = owlvid.load(folder, device_map=split_map(args.layers, args.gpu, args.other), **common)
            stages = split.runtime.model.llm.stages
            if family.startswith("owl3"):  # no prefix reuse: the warm-up's prompt is the measured one
                single.runtime.prefix_slots = split.runtime.prefix_slots = 0
            a, b = measure(single, convs, args.tokens), measure(split, convs, args.tokens)
            moves = stages.transfers
            results[family] = {
                "single": a, "split": b, "device_map": split.describe()["device_map"], "transfers": moves,
                "logits_max_gap": [last_logits_gap(single, split, c) for c in convs],
                "same_tokens": {k: a[k] == b[k] for k in ("alone", "batched", "chunked")},
                "split_consistent": b["alone"] == b["batched"] == b["chunked"],
            }
            del single, split
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    for family, r in results.items():
        a, b = r["single"], r["split"]
        print(f"\n{family}: {args.gpu} alone vs split {args.gpu} + {args.other} ({args.layers} layers, hidden "
              f"{args.hidden}, float32, {args.frames} frames); {r['transfers']} boundary moves")
        print(f"  same tokens: {r['same_tokens']}, split alone == batched == chunked: {r['split_consistent']}, "
              f"last-token logits max gap {max(r['logits_max_gap']):.2e}")
        print(f"  {'':<22}{'image':>10}{'video':>10}{'text':>10}")
        print(f"  {'first token s, alone':<22}" + "".join(f"{x:>10}" for x in a["ttft_s"]))
        print(f"  {'first token s, split':<22}" + "".join(f"{x:>10}" for x in b["ttft_s"]))
        print(f"  {'decode tok/s, alone':<22}" + "".join(f"{x!s:>10}" for x in a["decode_tok_s"]))
        print(f"  {'decode tok/s, split':<22}" + "".join(f"{x!s:>10}" for x in b["decode_tok_s"]))
        print(f"  batch of 3: {a['batched_s']} s alone, {b['batched_s']} s split; chunked: {a['chunked_s']} s, "
              f"{b['chunked_s']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
