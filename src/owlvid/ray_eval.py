"""`owlvid eval BENCHMARK ... --ray`: a benchmark's questions spread over model replicas on a Ray cluster (needs
the `ray` extra).

The driver is `owlvid.eval.run` (`run_images` for the image tables) itself: it reads the questions, locks the
output folder, checks run.json, skips what predictions.jsonl already answers and writes every line (fsync'd) and
results.json, exactly as the single-process run. Only the answering differs (`RayAnswerer`): the questions still
to answer go through the batch job's Ray path (`owlvid.ray.replicas_map`: one Ray batch per group of questions
about one video, so a video is decoded once, by one replica; a free replica takes the next batch), each replica
(`QuestionPredictor`, one model) answers its batches with the single-process code (the runner's line function,
e.g. `eval.runner.prediction_lines`: same frames, same prompts, same scoring), and the lines stream back to the
driver, which writes each question once.

Every replica runs with the same dtype (`auto` is resolved once, on the driver: bfloat16 on GPUs, this
machine's choice on CPUs) and checks that it loaded the checkpoint the run records.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from .errors import InputError, OwlvidError
from .eval.answering import Answerer, Lines, ModelFacts
from .metrics import EngineMetrics
from .ray import _model_source, _replica_name, blocks_dataset, cluster, replicas_map, stream_rows

QUESTION_COLUMN = "question"  # the driver's questions, pickled: replicas need not read the dataset again


class QuestionPredictor:
    """A callable class for `ray.data.Dataset.map_batches`: each Ray actor loads one model and answers batches
    of questions (column `question`: pickled questions) with `lines` (an `eval.answering.Lines`: the runner's,
    its protocol bound). Output columns, one row per question: `line` (its predictions.jsonl line, JSON text),
    `replica`, and `engine` (on a batch's last row: the replica's engine numbers so far, JSON text; else
    empty)."""

    def __init__(self, model: str, lines: Lines, expected: ModelFacts, *, relative_to: str | None = None,
                 **load_options: Any) -> None:
        from .api import load

        if relative_to and Path(relative_to).is_dir():
            os.chdir(relative_to)  # relative paths (videos, tokenizer, adapter) mean what they mean to the driver
        if load_options.get("device_map") is not None:
            load_options = {**load_options, "device": "auto"}  # the map places the model
        self.model = load(model, **load_options)
        facts = ModelFacts.of(self.model)
        mine = (facts.architecture, facts.training_frames, facts.dtype)
        theirs = (expected.architecture, expected.training_frames, expected.dtype)
        if mine != theirs:  # the run records the driver's view: every line must be of that model
            raise OwlvidError(f"a Ray replica loaded {model} as (architecture, training frames, dtype) {mine}; the "
                              f"run expects {theirs}")
        self.lines = lines
        self.metrics = EngineMetrics()
        self.replica = _replica_name()

    def __call__(self, rows: dict[str, Any]) -> dict[str, list]:
        questions = [pickle.loads(raw) for raw in rows[QUESTION_COLUMN]]
        lines = [json.dumps(line, ensure_ascii=False)
                 for line in self.lines(self.model, todo=questions, metrics=self.metrics)]
        engine = [""] * len(lines)
        if engine:
            engine[-1] = json.dumps(self.metrics.summary())
        return {"line": lines, "replica": [self.replica] * len(lines), "engine": engine}


class RayAnswerer(Answerer):
    """`owlvid.eval.run`'s questions answered by model replicas on a Ray cluster (connected, or started, when
    this is made; stopped when it closes, if started here). `num_replicas` / `gpus_per_replica` None:
    automatic (`owlvid.ray.cluster`). `load_options`: `owlvid.load`'s (device, dtype, tokenizer, revision,
    quantize, adapter)."""

    def __init__(self, model: str | os.PathLike, *, num_replicas: int | None = None,
                 gpus_per_replica: float | None = None, cpus_per_replica: float = 1, ray_address: str | None = None,
                 **load_options: Any) -> None:
        source = _model_source(model)  # a local folder is checked before Ray starts
        self.stack = ExitStack()
        try:
            self.placement = self.stack.enter_context(cluster(ray_address, num_replicas, gpus_per_replica,
                                                              cpus_per_replica))
            self.load_options = _replica_options(load_options, self.placement.gpus)
            self.facts = _checkpoint_facts(model, self.load_options)
        except BaseException:
            self.stack.close()
            raise
        self.source = source
        self.answered_by: dict[str, int] = {}
        self.engines: dict[str, dict] = {}

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    def answer(self, lines: Lines, groups: list[list[Any]], max_batch: int) -> Iterator[dict]:
        todo = [q for group in groups for q in group]
        # about 4 Ray batches per replica, from max_batch to 16 x max_batch questions (as batch jobs)
        per_batch = max(max_batch, min(16 * max_batch, math.ceil(len(todo) / (4 * self.placement.replicas))))
        questions = blocks_dataset([[pickle.dumps(q) for q in group] for group in groups], per_batch, QUESTION_COLUMN)
        mapped = replicas_map(questions, QuestionPredictor, (self.source, lines, self.facts),
                              {"relative_to": os.getcwd(), **self.load_options},
                              num_replicas=self.placement.replicas, gpus_per_replica=self.placement.gpus,
                              cpus_per_replica=self.placement.cpus)
        wanted = {q.qid for q in todo}
        for row in stream_rows(mapped):
            line = json.loads(row["line"])
            if line["qid"] not in wanted:  # a question is written once, even if Ray ran a batch again
                continue
            wanted.discard(line["qid"])
            self.answered_by[row["replica"]] = self.answered_by.get(row["replica"], 0) + 1
            if row["engine"]:
                self.engines[row["replica"]] = json.loads(row["engine"])
            yield line
        if wanted:  # not expected: Ray retries failed tasks; the predictions stay valid for a rerun
            raise OwlvidError(f"{len(wanted)} question(s) got no answer from the Ray replicas; rerun the same "
                              "command to answer them")

    def summary(self) -> dict[str, Any]:
        return {"replicas": {"count": self.placement.replicas, "gpus_per_replica": self.placement.gpus,
                             "cpus_per_replica": self.placement.cpus, "answered": dict(self.answered_by)},
                "engine": {"per_replica": dict(self.engines)}}


def _replica_options(options: dict[str, Any], gpus: float) -> dict[str, Any]:
    """What every replica passes to `owlvid.load`: one device and one dtype for all (`auto` decided here). A
    replica of several GPUs splits its model over them (`device_map="balanced"` unless a map is given)."""
    import torch

    from .checkpoint import resolve_dtype

    out = dict(options)
    if gpus > 1 and out.get("device_map") is None:
        out["device_map"] = "balanced"
    device = out.get("device", "auto")
    if device == "auto":
        device = "cuda" if gpus else "cpu"
    elif device.startswith("cuda") and not gpus:  # Ray gives a replica the GPUs it reserves, no others
        raise InputError(f"--device {device} needs --gpus-per-replica (the replicas reserve no GPU)")
    out["device"] = device  # with a device map, what the run records (the replica loads with the map)
    dtype = out.get("dtype", "auto")
    if dtype == "auto" and device.startswith("cuda") and not torch.cuda.is_available():
        dtype = "bfloat16"  # no GPU here to ask: what owlvid picks on every GPU since Ampere
    out["dtype"] = str(resolve_dtype(dtype, torch.device(device))).replace("torch.", "")
    return out


def _checkpoint_facts(name: str | os.PathLike, options: dict[str, Any]) -> ModelFacts:
    """The run's model, from its config.json (no weights read here): the replicas check it when they load."""
    from .checkpoint import read_config, resolve_checkpoint
    from .models import runtime_class

    folder = resolve_checkpoint(name, revision=options.get("revision"))  # as `owlvid.load` names it
    raw = read_config(folder)
    architecture = runtime_class(raw.get("model_type", "")).architecture
    frames = None
    if architecture == "slowfast":
        from .models.slowfast.config import SlowFastConfig

        frames = int(raw.get("mm_training_video_frames", SlowFastConfig.training_frames))
    return ModelFacts(str(name), folder, architecture, options["dtype"], options["device"], frames)


def run(benchmark: str, data_dir: str | os.PathLike, model: str | os.PathLike, outdir: str | os.PathLike, *,
        num_replicas: int | None = None, gpus_per_replica: float | None = None, cpus_per_replica: float = 1,
        ray_address: str | None = None, device: str = "auto", dtype: str = "auto",
        tokenizer: str | os.PathLike | None = None, revision: str | None = None, quantize: str | None = None,
        adapter: str | os.PathLike | None = None, device_map: str | dict | None = None,
        max_memory: dict[str, str] | None = None, **run_options: Any) -> dict[str, Any]:
    """`owlvid.eval.run` (or `run_images` for an image table) with the questions spread over `num_replicas`
    replicas of `model` (a checkpoint folder or hub id every node can reach, as the dataset's media) on a Ray
    cluster: the same predictions file, resuming, lock and results. `device_map` / `max_memory`: how each replica
    splits its model over the devices it holds (default: "balanced" for a replica of several GPUs).
    `run_options`: the runner's (protocol, limit, tasks, num_frames or split, max_batch, seed, progress). Uses
    the Ray connection of this process if there is one, else `ray.init(address=ray_address)` (None:
    `RAY_ADDRESS`, or a new local cluster)."""
    from .eval.image_runner import run_images
    from .eval.image_scoring import IMAGE_BENCHMARKS
    from .eval.runner import run as run_video

    if num_replicas is not None and num_replicas < 1:
        raise InputError("--num-replicas must be at least 1")
    if (gpus_per_replica is not None and gpus_per_replica < 0) or cpus_per_replica < 0:
        raise InputError("--gpus-per-replica and --cpus-per-replica must not be negative")
    load_options = {"device": device, "dtype": dtype, "tokenizer": tokenizer, "revision": revision,
                    "quantize": quantize, "adapter": adapter, "device_map": device_map, "max_memory": max_memory}

    def answerer() -> RayAnswerer:  # made once the folder is locked (a second run is refused before Ray starts)
        return RayAnswerer(model, num_replicas=num_replicas, gpus_per_replica=gpus_per_replica,
                           cpus_per_replica=cpus_per_replica, ray_address=ray_address, **load_options)

    runner = run_images if benchmark in IMAGE_BENCHMARKS else run_video
    return runner(benchmark, data_dir, answerer, outdir, **run_options)
