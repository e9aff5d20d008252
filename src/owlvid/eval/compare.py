"""`owlvid eval compare OUTDIR...`: runs side by side, with the published numbers of their checkpoints."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError
from .image_results import IMAGE_TITLES, PUBLISHED_IMAGES
from .results import BENCHMARK_TITLES, PUBLISHED

TITLES = {**BENCHMARK_TITLES, **IMAGE_TITLES}
NUMBERS = {name: {**PUBLISHED.get(name, {}), **PUBLISHED_IMAGES.get(name, {})} for name in PUBLISHED}

RESULTS = "results.json"


def read_results(outdir: str | os.PathLike) -> dict[str, Any]:
    path = Path(outdir).expanduser() / RESULTS
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{outdir} has no {RESULTS} (not an owlvid eval output folder, or the run has not "
                         "finished once)") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not readable ({e})") from None


def published_name(model_name: str) -> str | None:
    """The model-card checkpoint a run's model is (by the hub id's or folder's last part), or None."""
    base = Path(str(model_name).rstrip("/")).name.lower()
    return next((name for name in PUBLISHED if name.lower() == base), None)


def compare_table(outdirs: Sequence[str | os.PathLike]) -> str:
    """One row per benchmark, one column per run (its headline score, protocol, questions scored), then a
    column per published checkpoint among the runs' models."""
    runs = [read_results(d) for d in outdirs]
    if not runs:
        raise InputError("give at least one output folder")
    columns = [f"{Path(str(r['model']['name'])).name} / {r['protocol']} ({r['model']['fingerprint'][:8]})"
               for r in runs]
    published = sorted({p for r in runs if (p := published_name(r["model"]["name"]))})
    columns += [f"published {p}" for p in published]
    benchmarks = [b for b in TITLES if any(r["benchmark"] == b for r in runs)]
    rows = []
    for b in benchmarks:
        cells = []
        for r in runs:
            if r["benchmark"] != b:
                cells.append("")
                continue
            subset = r["selection"]["limit"] is not None or r["selection"]["tasks"]
            partial = f" of {r['scored']}/{r['questions']}" if r["scored"] < r["questions"] or subset else ""
            cells.append(f"{r['score']:.2f}{partial}" if r["score"] is not None
                         else "submitted" if r.get("submission_file") else "-")
        cells += [f"{NUMBERS[p][b]:.1f}" if b in NUMBERS[p] else "" for p in published]
        rows.append([TITLES[b], *cells])
    header = ["benchmark", *columns]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    if any(c == "submitted" for row in rows for c in row[1:]):
        lines.append("'submitted': a test split without public answers; its submission file (results.json "
                     "submission_file) is scored by the benchmark's server or judge")
    if any("of " in c for row in rows for c in row[1:]):
        lines.append("'of s/n': s questions scored of the n selected; a partial run (--limit, --tasks, failures) "
                     "is not comparable with a published number")
    return "\n".join(lines)
