"""README "What fits where": `owlvid plan` for the published checkpoints on common GPU sets.

Each cell is the most frames (of 16 / 64 / 128) that fit with one request at a time / with 8 decoded together
(`--max-batch 1` / `8`), with 4096 tokens of context, owlvid's default 2 GiB visual cache (mPLUG-Owl3) and no CPU
offload; "-" when not even 16 frames fit. A 16 GB card is given 14 GiB, a 24 GB card 22 GiB, an 80 GB card 78 GiB
(the rest is the CUDA context and allocator slack). Computed from config.json values only
(tests/plan/published.py), nothing is loaded.

    PYTHONPATH=src:. python benchmarks/plan_table.py
"""

from __future__ import annotations

from owlvid.errors import InputError
from owlvid.plan import GiB, plan_memory
from tests.plan.published import PUBLISHED

GPU_SETS = {"1x16 GB": [14], "1x24 GB": [22], "2x16 GB": [14, 14], "4x16 GB": [14] * 4, "1x80 GB": [78]}
FRAMES = (16, 64, 128)


def most_frames(config: dict, gpus: list[int], quantize: str | None, batch: int) -> str:
    memory = {f"cuda:{i}": g * GiB for i, g in enumerate(gpus)}
    best = "-"
    for frames in FRAMES:
        try:
            plan_memory(config, max_memory=memory, quantize=quantize, max_frames=frames, max_batch=batch)
        except InputError:
            break
        best = str(frames)
    return best


def main() -> None:
    print("| checkpoint | weights | " + " | ".join(GPU_SETS) + " |")
    print("|---|---|" + "---|" * len(GPU_SETS))
    for name, config in PUBLISHED.items():
        for quantize in (None, "int8", "int4"):
            cells = [f"{most_frames(config, gpus, quantize, 1)} / {most_frames(config, gpus, quantize, 8)}"
                     for gpus in GPU_SETS.values()]
            weights = plan_memory(config, max_memory={"cpu": 1 << 50}, quantize=quantize).weights
            print(f"| {name} | {quantize or 'bf16'} {weights / GiB:.1f} GiB | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
