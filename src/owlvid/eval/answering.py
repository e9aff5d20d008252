"""Who answers an evaluation run's questions, and how their lines reach predictions.jsonl.

The runners (runner.py, image_runner.py) lock the folder, decide which questions are left, and write what an
`Answerer` yields with `write_lines` (fsync'd, with a progress bar). The answerer runs the runner's own line
function (`lines(model, todo=..., metrics=...)`: frames, prompts, engine, scoring) on this process's model
(`LocalAnswerer`) or on model replicas elsewhere (`owlvid.ray_eval.RayAnswerer`), so that both give the same
lines.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import records as records_mod
from ..metrics import EngineMetrics

Lines = Callable[..., Iterator[dict]]  # lines(model, todo=[questions], metrics=EngineMetrics | None)


@dataclass(frozen=True)
class ModelFacts:
    """What a run needs to know of its model before answering (the protocol's defaults, run.json), whether
    the model is loaded in this process or in replicas elsewhere."""

    name: str
    folder: Path
    architecture: str
    dtype: str
    device: str
    training_frames: int | None = None  # Slow-Fast: the frame count its authors evaluated with

    @property
    def family(self) -> str:
        """"owl3" or "slowfast": which protocol defaults apply."""
        return "slowfast" if self.architecture == "slowfast" else "owl3"

    @classmethod
    def of(cls, model: Any) -> ModelFacts:
        """The facts of a loaded `owlvid.Model`."""
        return cls(model.name, Path(model.runtime.folder), model.runtime.architecture,
                   str(model.dtype).replace("torch.", ""), str(model.device),
                   model.runtime.describe().get("training_frames"))


class Answerer:
    """Who answers a run's questions: this process's model (`LocalAnswerer`), or model replicas elsewhere
    (`owlvid.ray_eval`). Held (`with`) for the whole run."""

    facts: ModelFacts

    def answer(self, lines: Lines, groups: list[list[Any]], max_batch: int) -> Iterator[dict]:
        """`lines` of every question in `groups` (questions sharing media: answered together, by one model), in
        completion order; `lines` decodes up to `max_batch` questions together."""
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        """What results.json adds about the answering (the engine's numbers)."""
        return {}

    def __enter__(self) -> Answerer:
        return self

    def __exit__(self, *exc: object) -> None:
        """Replicas elsewhere are let go here."""


class LocalAnswerer(Answerer):
    """The questions answered by one `owlvid.Model` in this process."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.facts = ModelFacts.of(model)
        self.metrics = EngineMetrics()

    def answer(self, lines: Lines, groups: list[list[Any]], max_batch: int) -> Iterator[dict]:
        return lines(self.model, todo=[q for group in groups for q in group], metrics=self.metrics)

    def summary(self) -> dict[str, Any]:
        return {"engine": self.metrics.summary()}  # this run's answering: tokens, latencies, visual cache


def answerer_of(model: Any) -> Answerer:
    """An `owlvid.Model` or an `Answerer`, or a function returning either (called now: the folder is locked)."""
    from ..api import Model

    if not isinstance(model, Model | Answerer):
        model = model()
    return model if isinstance(model, Answerer) else LocalAnswerer(model)


def answer_lines(model: Any, todo: Sequence[Any], job: Callable[[Any], Callable[[], tuple]],
                 record: Callable[[Any, Any], dict], *, max_batch: int, metrics: EngineMetrics | None
                 ) -> Iterator[dict]:
    """Answer the questions through the engine (`job(q)` builds a question's conversation when it is prepared),
    one `record(q, result)` line each as it completes (the video and the image tables alike)."""
    from ..jobs import generate_each

    by_id = {q.qid: q for q in todo}
    for qid, result in generate_each(model, ((q.qid, job(q)) for q in todo), max_batch=max_batch, metrics=metrics):
        yield record(by_id[qid], result)


def write_lines(path: Path, lines: Iterable[dict], total: int, *, benchmark: str, progress: bool) -> None:
    """Append each prediction line to the file as it arrives (fsync'd), with a progress bar of `total`."""
    bar = _progress(total, progress, benchmark)
    counts = {"answered": 0, "failed": 0}
    try:
        with records_mod.RecordWriter(path) as f:
            for line in lines:
                f.write(line)
                counts["failed" if line["error"] else "answered"] += 1
                bar.set_postfix(counts, refresh=False)
                bar.update(1)
    finally:
        bar.close()


def _progress(total: int, enabled: bool, benchmark: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, file=sys.stderr, unit="q", dynamic_ncols=True,
                desc=f"owlvid eval {benchmark}")
