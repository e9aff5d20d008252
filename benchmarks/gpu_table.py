"""The README's GPU table from the JSON files that benchmarks/gpu.sh writes (benchmarks/perf.py --json).

    python benchmarks/gpu_table.py OUT/ttft.json OUT/decode.json OUT/batch.json OUT/long.json

Any subset will do: a run stopped part-way gives the rows it measured, and "–" for the rest.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# The vision throughput the performance issue compares against: the paper's ~400 images/s on one A100.
PAPER_CROPS_PER_S = 400


def merge(paths: list[str]) -> tuple[dict, dict]:
    """(machine facts, {model label: {section: result}}) over every readable file, later files adding rows."""
    machine, models = {}, {}
    for path in paths:
        try:
            report = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            print(f"skipping {path}: {e}", file=sys.stderr)
            continue
        facts = report.pop("machine", {})
        machine = machine or facts
        for label, sections in report.items():
            into = models.setdefault(label, {})
            for name, result in sections.items():
                if name == "ttft" and "ttft" in into:  # the 128-frame rows come from their own run
                    known = {r["frames"] for r in into["ttft"]}
                    into["ttft"] += [r for r in result if r["frames"] not in known]
                else:
                    into.setdefault(name, result)
    return machine, models


def num(v, unit: str = "", digits: int = 3) -> str:
    if isinstance(v, (int, float)):
        return f"{v:.{digits}g}{unit}" if abs(v) < 1000 else f"{v:.0f}{unit}"
    return "–" if v is None else str(v)


def rows_for(res: dict) -> list[tuple[str, str]]:
    out = []
    v = res.get("vision")
    if v:
        out.append(("vision encoder: crops/s (GFLOP/s, share of the measured GEMM rate)",
                    f"**{num(v['crops_per_s'])}** ({num(v['gflops'])}, {num(v['pct_of_gemm'], '%')}); "
                    f"paper: {PAPER_CROPS_PER_S} images/s on an A100 = {num(v['crops_per_s'] / PAPER_CROPS_PER_S)}x"))
    ttft = {r["frames"]: r for r in res.get("ttft", [])}
    for n, r in sorted(ttft.items()):
        if n < 8 and len(ttft) > 1 and any(k >= 8 for k in ttft):
            continue  # 0/1-frame rows warm the run up; the table shows 8 frames and more
        text = f"{num(r['ttft_s'], ' s')} ({r['prompt_tokens']} prompt tokens, peak {num(r['peak_mem_gb'], ' GB')})"
        if "concat_ttft_s" in r:
            text += (f" vs in context {num(r['concat_ttft_s'], ' s')} ({r['concat_context']} tokens, peak "
                     f"{num(r['concat_peak_mem_gb'], ' GB')}) = **{num(r['speedup_vs_concat'], 'x')}**")
        elif "concat_llm_prefill_s" in r:
            text += f" vs in context: {r['concat_llm_prefill_s']}"
        out.append((f"first token, {n} frame{'s' * (n != 1)}: owlvid vs visual tokens in context", text))
    for r in res.get("prefill", []):
        out.append((f"LLM prefill alone over {r['frames']} frames of visual memory",
                    f"{num(r['prefill_s'], ' s')}, peak {num(r['peak_mem_gb'], ' GB')}"))
    dec = res.get("decode")
    if dec:
        out.append(("decoding tokens/s: " + " / ".join("text only" if r["frames"] == 0 else f"{r['frames']} frames"
                                                       for r in dec),
                    " / ".join(num(r["tokens_per_s"]) for r in dec)
                    + " (" + " / ".join(num(r["vs_text_only"], "x") for r in dec) + " of text only)"))
    batch = res.get("batch")
    if batch:
        out.append((" / ".join(str(r["requests"]) for r in batch)
                    + " concurrent requests: total tokens/s batched (vs one after another)",
                    " / ".join(f"{num(r['batched_tok_s'])} ({num(r['speedup'], 'x')})" for r in batch)))
    return out


def main(paths: list[str]) -> None:
    machine, models = merge(paths)
    if machine:
        gemm = ", ".join(f"{dt} {num(r / 1000)} TFLOP/s" for dt, r in machine.get("gemm_gflops", {}).items())
        print(f"{machine.get('gpu', machine.get('device'))}, torch {machine.get('torch')} (CUDA "
              f"{machine.get('cuda')}), measured GEMM {gemm}")
    for label, res in models.items():
        print(f"\n| measure | {label} |\n|---|---|")
        for name, value in rows_for(res):
            print(f"| {name} | {value} |")


if __name__ == "__main__":
    main(sys.argv[1:])
