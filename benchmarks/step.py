"""Per-step host overhead of the decoding loop at tiny model shapes.

At tiny shapes the model's forward pass costs almost nothing, so what a decoding step costs is the
engine around it: sampling over the full 151,851-token vocabulary, penalties, the KV cache's
bookkeeping, detokenisation and stop strings. This is the time a GPU would sit idle between steps.

    PYTHONPATH=src python benchmarks/step.py            # batch 1, 4, 8; greedy and sampled
    PYTHONPATH=src python benchmarks/step.py --tokens 256 --batch-sizes 1,8

Per batch size and sampling mode it prints the median over the steps of: the whole `Engine.step`
(ms), the model's `decode_batch` inside it, and the rest (the engine's own work), per step and per step
per request. The checkpoint is the tiny random mPLUG-Owl3 of the parity fixtures (tests/fixtures/owl3/
tiny-241101: hidden 16, 4 layers, the real 151,851-row vocabulary and Qwen2 tokenizer).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import owlvid
from owlvid.engine import Engine, SamplingParams

FIXTURES = Path(os.environ.get("OWLVID_FIXTURES", Path(__file__).resolve().parents[1] / "tests" / "fixtures")) / "owl3"

MODES = {
    "greedy": dict(temperature=0.0),
    "sampled": dict(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05),
    "stop strings": dict(temperature=0.0, stop=["</answer>", "\n\nQuestion:"]),
}


def measure(model: owlvid.Model, batch: int, tokens: int, mode: str) -> dict:
    runtime = model.runtime
    engine = Engine(runtime, max_batch=batch)
    forward: list[float] = []
    inner = runtime.decode_batch

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        forward.append(time.perf_counter() - t0)
        return out

    runtime.decode_batch = timed
    try:
        for i in range(batch):
            messages = [{"role": "user", "content": f"Tell me a long story number {i}."}]
            request, prompt_ids = model.prepare(messages)
            params = SamplingParams(max_new_tokens=tokens, seed=i, **MODES[mode])
            engine.add(request, prompt_ids, params)
        steps = []
        while engine.active:
            n = len(forward)
            t0 = time.perf_counter()
            engine.step()
            if len(forward) > n and len(engine.decoding) == batch:
                steps.append((time.perf_counter() - t0, forward[-1]))
    finally:
        del runtime.decode_batch
    # Medians per step; the engine's share is taken within each step (step - its forward), which keeps a
    # shared VM's slow phases out of the difference.
    total = statistics.median(s for s, _ in steps)
    fwd = statistics.median(f for _, f in steps)
    engine = statistics.median(s - f for s, f in steps)
    return {"batch": batch, "mode": mode, "steps": len(steps), "step_ms": 1e3 * total, "forward_ms": 1e3 * fwd,
            "engine_ms": 1e3 * engine, "engine_ms_per_request": 1e3 * engine / batch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="1,4,8")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = owlvid.load(FIXTURES / "tiny-241101", tokenizer=FIXTURES / "tokenizer", dtype="float32", device="cpu")
    rows = [measure(model, b, args.tokens, mode) for mode in args.modes.split(",")
            for b in map(int, args.batch_sizes.split(","))]
    print(f"\n## Decoding step overhead (tiny Owl3, vocabulary 151,851, float32, {args.threads} threads, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__})\n")
    print("| batch | sampling | step ms | model forward ms | engine ms | engine ms per request |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['mode']} | {r['step_ms']:.2f} | {r['forward_ms']:.2f} | {r['engine_ms']:.2f} | "
              f"{r['engine_ms_per_request']:.2f} |")


if __name__ == "__main__":
    main()
