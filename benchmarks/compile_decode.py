"""Trial: does `torch.compile` speed up the decoding step? (It is not used by owlvid: see the table.)

Times the batched decoding step (`Engine.step`: forward + sampling + bookkeeping) eagerly and with
the decoder (`model.llm.forward`) compiled by `torch.compile(dynamic=True)` (inductor, the CPU C++
backend here), at the tiny Owl3 shape (where the step is all host overhead) and at the real 1B-241014
shape (random weights, text only, where the step reads 2 GB of weights), and reports the compile time.

    PYTHONPATH=src python benchmarks/compile_decode.py            # tiny B=1,4 and 1B B=1
    PYTHONPATH=src python benchmarks/compile_decode.py --shapes tiny
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from perf import build_model

import owlvid
from owlvid.engine import Engine, SamplingParams
from owlvid.testing import make_tiny_owl3, write_tiny_tokenizer


def step_ms(model: owlvid.Model, batch: int, steps: int) -> float:
    """Median ms of a decoding step of `batch` text requests (after a few warm-up steps)."""
    engine = Engine(model.runtime, max_batch=batch)
    for i in range(batch):
        request, ids = model.prepare([{"role": "user", "content": f"Tell me a long story number {i}."}])
        engine.add(request, ids, SamplingParams(max_new_tokens=steps + 10))
    for _ in range(3):
        engine.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def trial(model: owlvid.Model, label: str, batches: list[int], steps: int) -> list[dict]:
    eager = {b: step_ms(model, b, steps) for b in batches}
    llm = model.runtime.model.llm
    llm.forward = torch.compile(llm.forward, dynamic=True)
    t0 = time.perf_counter()
    step_ms(model, batches[0], 2)  # the first steps compile
    compile_s = time.perf_counter() - t0
    rows = []
    for b in batches:
        compiled = step_ms(model, b, steps)
        rows.append({"shape": label, "batch": b, "eager_ms": eager[b], "compiled_ms": compiled,
                     "speedup": eager[b] / compiled, "compile_s": compile_s})
    del llm.forward
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="tiny,1b")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            if shape == "tiny":
                model = owlvid.load(make_tiny_owl3(Path(tmp) / "tiny", "241101"), dtype="float32", device="cpu")
                rows += trial(model, "tiny Owl3 (hidden 16, 4 layers)", [1, 4], args.steps)
            else:
                tok = Path(tmp) / "tok"
                write_tiny_tokenizer(tok)
                model = build_model(shape, torch.float32, tok)
                rows += trial(model, f"{shape} shape, float32", [1], args.steps)
            torch._dynamo.reset()
    print(f"\n## torch.compile on the decoding step ({platform.machine()}, {args.threads} threads, "
          f"torch {torch.__version__})\n")
    print("| model | batch | eager ms/step | compiled ms/step | speed-up | compile s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['batch']} | {r['eager_ms']:.2f} | {r['compiled_ms']:.2f} | "
              f"{r['speedup']:.2f}x | {r['compile_s']:.0f} |")


if __name__ == "__main__":
    main()
