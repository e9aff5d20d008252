"""owlvid on a Ray cluster (needs the `ray` extra: `pip install 'owlvid[ray]'`): batch jobs on Ray Data,
the OpenAI-compatible server on Ray Serve.

Batch jobs (`owlvid batch ... --ray`, or `owlvid.ray.run`): the driver checks the whole input and reads
the output for resuming exactly as `owlvid.batch.run` does (`batch.open_job`, which also locks the output
until the job ends), sends the requests still to answer through a Ray Dataset (one block per group of
requests about the same videos, so each video is decoded and encoded once, by one replica), and writes
each answer as it streams back with
`batch.write_answers` (fsync'd appends; a custom_id is never written twice). Model replicas are Ray actors
(`BatchPredictor`, one model each) that answer with `batch.answer_requests`: the same continuous batching,
error lines and output bodies as the single-process job. `owlvid eval --ray` (`owlvid.ray_eval`) runs on the
same path (`cluster`, `blocks_dataset`, `replicas_map`, `stream_rows`).

For a Ray Data pipeline of your own:

    import ray, owlvid.ray
    requests = ray.data.read_text("requests.jsonl").rename_columns({"text": "request"})
    answers = owlvid.ray.answers_dataset(requests, "mPLUG/mPLUG-Owl3-7B-241101", num_replicas=4,
                                         gpus_per_replica=1)
    for row in answers.iter_rows(): ...   # custom_id, status_code, body (JSON text), replica

Media decoding stays inside the model replicas (where the batch job prefetches the next video beside the
model work): decoded frames are much larger than the video file, and shipping them between separate
decode tasks and the replicas through the object store costs more than it saves on a machine whose cores
the replicas already use. On a cluster, add replicas (each decodes its own videos).

Ray Serve (`owlvid serve --ray`, or `serve_deployment` in your own Serve application): each replica loads
the model and serves `server.app.create_app`, the very app of `owlvid serve` (API key, limits, streaming),
behind Ray Serve's router; every response names its replica in the `x-owlvid-replica` header.

This module is `owlvid.ray`; inside it, `import ray` is Ray itself (absolute imports).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import signal
import socket
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import batch
from .errors import InputError, OwlvidError

REQUEST_COLUMN = "request"
REPLICA_HEADER = "x-owlvid-replica"
REPLICA_START_TIMEOUT_S = 1800  # loading (and downloading) a model on each replica, new nodes included


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise OwlvidError("Ray jobs need Ray: pip install 'owlvid[ray]'") from None
    return ray


# -- Ray Data: batch jobs --------------------------------------------------------------------------------


class BatchPredictor:
    """A callable class for `ray.data.Dataset.map_batches`: each Ray actor loads one model and answers
    batches of OpenAI batch request lines.

    Input column `request`: request lines as in a batch input file (JSON text; blank ones are skipped).
    They must be valid (check a file first with `owlvid.batch.read_requests`); a request that fails on
    its own (missing or corrupt media, an option over a limit) gets its error answer, as in `owlvid batch`.
    Output columns, one row per request: `custom_id`, `status_code`, `body` (the response body as JSON
    text) and `replica` (the actor that answered). `owlvid.batch.OutputFile.write(custom_id, status_code,
    json.loads(body))` makes the output line of the single-process job.

    Model options are those of `owlvid.load`; media policy, `max_batch`, `media_timeout` and `prefetch` as
    `owlvid.batch.run`: local files anywhere unless `allowed_local_media_path` restricts them, relative paths
    under that folder or else under `relative_to` (default: the actor's working directory)."""

    def __init__(self, model: str | os.PathLike, *, device: str = "auto", dtype: str = "auto",
                 tokenizer: str | os.PathLike | None = None, revision: str | None = None,
                 quantize: str | None = None, allowed_local_media_path: str | os.PathLike | None = None,
                 relative_to: str | os.PathLike | None = None, max_batch: int = 8,
                 media_timeout: float | None = None, prefetch: int = 2, adapter: str | None = None,
                 lora_modules: dict[str, str] | None = None, **split: Any) -> None:
        from .api import load

        self.model = load(model, device=device, dtype=dtype, tokenizer=tokenizer, revision=revision,
                          quantize=quantize, adapter=adapter, lora_modules=lora_modules, **split)  # device_map
        restricted = allowed_local_media_path is not None
        self.relative_to = None if restricted else Path(relative_to or os.getcwd())
        self.config = batch.job_config(self.model.name, allowed_local_media_path if restricted else "/", max_batch,
                                       media_timeout=media_timeout)
        self.prefetch = prefetch
        self.replica = _replica_name()

    def __call__(self, rows: dict[str, Any]) -> dict[str, list]:
        requests = [self._request(number, text) for number, text in enumerate(rows[REQUEST_COLUMN], 1)
                    if str(text).strip()]
        out: dict[str, list] = {"custom_id": [], "status_code": [], "body": [], "replica": []}
        for custom_id, status, body in batch.answer_requests(self.model, self.config, batch.job_order(requests),
                                                             prefetch=self.prefetch):
            out["custom_id"].append(custom_id)
            out["status_code"].append(status)
            out["body"].append(json.dumps(body, ensure_ascii=False))
            out["replica"].append(self.replica)
        return out

    def _request(self, number: int, text: Any) -> batch.BatchRequest:
        from pydantic import ValidationError

        from .requests import schemas

        item = json.loads(text)
        custom_id = item.get("custom_id") if isinstance(item, dict) else None
        try:
            body = schemas.ChatCompletionRequest.model_validate(item["body"])
        except (ValidationError, KeyError, TypeError):
            raise InputError(f"request {custom_id!r} is not a valid chat completions request "
                             "(check the input with owlvid.batch.read_requests)") from None
        if self.relative_to is not None:
            batch.anchor_relative_paths(body, self.relative_to)
        return batch.BatchRequest(number, str(custom_id), body)


def requests_dataset(groups: Iterable[list[str]], requests_per_batch: int) -> Any:
    """A Ray Dataset of request lines (column `request`), one block per Ray batch: groups of lines about
    the same video (`batch.job_groups`) are packed whole into blocks of up to `requests_per_batch` lines
    (a larger group is cut into full blocks), so a video is decoded and encoded by one replica, once."""
    return blocks_dataset(groups, requests_per_batch, REQUEST_COLUMN)


def blocks_dataset(groups: Iterable[list[Any]], per_batch: int, column: str) -> Any:
    """A Ray Dataset of one column, one block per Ray batch of up to `per_batch` items: each group (the
    items about one video) packed whole into a block, a larger group cut into full blocks."""
    import pyarrow

    ray = _ray()
    blocks: list[list[Any]] = [[]]
    for group in groups:
        if blocks[-1] and len(blocks[-1]) + len(group) > per_batch:
            blocks.append([])
        for item in group:
            if len(blocks[-1]) >= per_batch:
                blocks.append([])
            blocks[-1].append(item)
    return ray.data.from_arrow([pyarrow.table({column: items}) for items in blocks if items])


def answers_dataset(requests: Any, model: str | os.PathLike, *, num_replicas: int = 1, gpus_per_replica: float = 0,
                    cpus_per_replica: float = 1, batch_size: int | None = None, **predictor_options: Any) -> Any:
    """`requests` (a Dataset with a `request` column) answered by `num_replicas` `BatchPredictor` actors,
    one model each, with `gpus_per_replica` GPUs and `cpus_per_replica` CPUs (its torch threads). Each
    block is one batch unless `batch_size` says otherwise. `predictor_options`: `BatchPredictor`'s."""
    return replicas_map(requests, BatchPredictor, (str(model),), predictor_options, num_replicas=num_replicas,
                        gpus_per_replica=gpus_per_replica, cpus_per_replica=cpus_per_replica, batch_size=batch_size)


def replicas_map(dataset: Any, predictor: type, args: tuple, options: dict[str, Any], *, num_replicas: int,
                 gpus_per_replica: float, cpus_per_replica: float, batch_size: int | None = None) -> Any:
    """`dataset` mapped by a pool of `num_replicas` `predictor(*args, **options)` actors (each loads a model),
    batch by batch: the Ray path of batch jobs and of evaluation (`owlvid.ray_eval`)."""
    ray = _ray()
    # one Ray batch in flight per replica: a replica that is free takes the next batch (none waits queued
    # behind a busy replica while another idles; a batch is long, its hand-over short)
    pool = ray.data.ActorPoolStrategy(size=num_replicas, max_tasks_in_flight_per_actor=1)
    mapped = dataset.map_batches(predictor, batch_size=batch_size, compute=pool, num_gpus=gpus_per_replica,
                                 num_cpus=cpus_per_replica, fn_constructor_args=args, fn_constructor_kwargs=options)
    # work is handed out once every replica has loaded its model, so the first one does not take it all
    mapped.context.wait_for_min_actors_s = REPLICA_START_TIMEOUT_S
    return mapped


def _absolute(path: str | os.PathLike | None) -> str | None:
    """Adapter folders as absolute paths: replicas may run in another working directory."""
    return None if path is None else str(Path(path).expanduser().resolve())


def run(input_path: str | os.PathLike, output_path: str | os.PathLike, model: str | os.PathLike, *,
        device: str = "auto", dtype: str = "auto", tokenizer: str | os.PathLike | None = None,
        revision: str | None = None, quantize: str | None = None,
        allowed_local_media_path: str | os.PathLike | None = None, max_batch: int = 8,
        media_timeout: float | None = None, prefetch: int = 2, num_replicas: int = 1,
        gpus_per_replica: float = 0, cpus_per_replica: float = 1, requests_per_batch: int | None = None,
        ray_address: str | None = None, progress: bool = True, json_progress: bool = False,
        adapter: str | os.PathLike | None = None, lora_modules: dict[str, str] | None = None,
        **split: Any) -> dict[str, Any]:
    """`owlvid.batch.run` on a Ray cluster: same checks before work, same output lines, same resuming, same
    options (`max_batch`, `media_timeout`, `prefetch` apply in each replica; `split`: `device_map` / `max_memory`).

    `model` is a checkpoint folder or hub id that every replica loads (local paths and media must be
    reachable from every node). Uses the Ray connection of this process if there is one, else
    `ray.init(address=ray_address)` (None: `RAY_ADDRESS`, or a new local cluster), closed at the end.
    `requests_per_batch` is the size of a Ray batch (default: about 4 batches per replica, from max_batch to
    16 x max_batch requests): smaller spreads the work more evenly; larger keeps batching fuller and lets a
    replica decode the next videos of its batch while it answers (with at most 4 x max_batch, a replica
    waited for each new video: +23% on a 1024-request job against one process; +6% with 16 x).
    Returns `batch.run`'s summary."""
    if num_replicas < 1:
        raise InputError("num_replicas must be at least 1")
    if gpus_per_replica < 0 or cpus_per_replica < 0:
        raise InputError("gpus_per_replica and cpus_per_replica must not be negative")
    with batch.open_job(input_path, output_path, allowed_local_media_path, max_batch, media_timeout) as plan:
        if not plan.todo:
            Path(output_path).touch()
            return plan.summary()
        model = _model_source(model)
        # replicas run elsewhere: folders as absolute paths
        root = str(plan.root.resolve()) if allowed_local_media_path is not None else None
        lines = Path(input_path).read_bytes().split(b"\n")  # as read_requests numbers them
        groups = [[lines[r.line - 1].decode("utf-8") for r in group] for group in batch.job_groups(plan.todo)]
        per_batch = requests_per_batch or max(max_batch, min(16 * max_batch,
                                                              math.ceil(len(plan.todo) / (4 * num_replicas))))
        with cluster(ray_address, num_replicas, gpus_per_replica, cpus_per_replica):
            answers = answers_dataset(requests_dataset(groups, per_batch), model, num_replicas=num_replicas,
                                      gpus_per_replica=gpus_per_replica, cpus_per_replica=cpus_per_replica,
                                      device=device, dtype=dtype, tokenizer=tokenizer, revision=revision,
                                      quantize=quantize, adapter=_absolute(adapter), lora_modules=lora_modules and {
                                          name: _absolute(path) for name, path in lora_modules.items()},
                                      allowed_local_media_path=root, relative_to=os.getcwd(),
                                      max_batch=max_batch, media_timeout=media_timeout, prefetch=prefetch, **split)
            summary = batch.write_answers(plan, _rows(answers), progress, json_progress)
        missing = len(plan.todo) - summary["completed"] - summary["failed"]
        if missing:  # not expected: Ray retries failed tasks; the output stays valid for a rerun
            raise OwlvidError(f"{missing} request(s) got no answer from the Ray job; rerun the same command to "
                              "answer them")
        return summary


def _rows(answers: Any) -> Iterator[tuple[str, int, dict]]:
    """(custom_id, status, body) of each answer as Ray Data streams it back."""
    for row in stream_rows(answers):
        yield str(row["custom_id"]), int(row["status_code"]), json.loads(row["body"])


@dataclasses.dataclass(frozen=True)
class Placement:
    """How many model replicas a job runs and what each reserves."""

    replicas: int
    gpus: float
    cpus: float


@contextmanager
def cluster(address: str | None, replicas: int | None, gpus: float | None, cpus: float) -> Iterator[Placement]:
    """Ray connected (or started) for a job of `replicas` x (`gpus`, `cpus`), None: automatic (one GPU per
    replica when the cluster has GPUs, else none; a replica per `gpus` GPUs of the cluster, or one on CPUs). A
    job the cluster cannot place is refused at once; Ray Data's notes and tracebacks are quieted (failures are
    ours to report, in one line); a cluster started here is stopped at the end."""
    ray = _ray()
    started = _connect(ray, address)
    import ray.data  # configures its logger: quieted below, after that

    data_log = logging.getLogger("ray.data")
    data_log_level = data_log.level
    try:
        have = ray.cluster_resources().get("GPU", 0)
        gpus = (1.0 if have >= 1 else 0.0) if gpus is None else gpus
        replicas = (int(have // gpus) if gpus else 1) if replicas is None else replicas
        _check_resources(ray, max(replicas, 1), gpus, cpus)
        data_log.setLevel(logging.CRITICAL)
        yield Placement(replicas, gpus, cpus)
    finally:
        data_log.setLevel(data_log_level)
        if started:
            ray.shutdown()


def stream_rows(mapped: Any) -> Iterator[dict[str, Any]]:
    """The rows of a `replicas_map` dataset as they stream back; Ray's errors as one line."""
    ray = _ray()
    mapped.context.enable_progress_bars = False  # ours is on stderr
    try:
        yield from mapped.iter_rows()
    except ray.exceptions.RayError as e:
        raise OwlvidError(f"the Ray job failed: {_root_cause(e)}") from None


def _root_cause(e: BaseException) -> str:
    """The innermost error of a Ray failure (a replica that could not load the model, ...), one line: the
    original exception of a failed task, else the last line of Ray's message (which ends with it)."""
    while isinstance(getattr(e, "cause", None), BaseException):  # RayTaskError: the task's own exception
        e = e.cause
    if isinstance(e, OwlvidError | OSError) and not isinstance(e, _ray().exceptions.RayError):
        return " ".join(str(e).split())
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


def _model_source(model: str | os.PathLike) -> str:
    """What the replicas load: a local checkpoint folder, checked here before Ray starts (a replica failing
    to load it would be reported by Ray at length) and made absolute; a hub id as it is (each replica
    downloads it)."""
    from .checkpoint import is_hub_id, resolve_checkpoint

    return str(model) if is_hub_id(model) else str(resolve_checkpoint(model).resolve())


def _connect(ray: Any, address: str | None) -> bool:
    """Connect to (or start) a Ray cluster unless this process already is; True when this call did."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False,
                 **({} if address else {"include_dashboard": False}))
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise OwlvidError(f"cannot connect to the Ray cluster at {address or 'RAY_ADDRESS / a new local one'}: "
                          f"{' '.join(str(e).split())}") from None
    return True


def _check_resources(ray: Any, replicas: int, gpus: float, cpus: float) -> None:
    """Refuse a job the cluster cannot place (Ray would wait for the resources for ever)."""
    available = ray.cluster_resources()
    for name, each in (("GPU", gpus), ("CPU", cpus)):
        have = available.get(name, 0)
        if each and have < replicas * each:
            raise InputError(f"{replicas} replica(s) x {each:g} {name} need {replicas * each:g} {name}s; the Ray "
                             f"cluster has {have:g}")


# -- Ray Serve: the server ---------------------------------------------------------------------------------


class ReplicaHeader:
    """Pure ASGI: names the replica in a response header of every HTTP response."""

    def __init__(self, app: Any, replica: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica.encode("latin-1", "replace"))

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, named)


def _replica_name() -> str:
    """The Ray actor's id (a Serve replica or a Ray Data actor), or host:pid outside Ray."""
    try:
        import ray

        actor = ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None
    except ImportError:
        actor = None
    return actor or f"{socket.gethostname()}:{os.getpid()}"


def serve_deployment(model: str | os.PathLike, config: Any = None, *, num_replicas: int = 1,
                     gpus_per_replica: float = 0, cpus_per_replica: float = 1, name: str = "owlvid",
                     **load_options: Any) -> Any:
    """A Ray Serve deployment of `owlvid serve`'s app: each replica loads `model` (`owlvid.load` with
    `load_options`: device, dtype, tokenizer, revision, quantize) and serves `create_app(model, config)` (a
    `owlvid.server.ServerConfig`: API key, limits, media policy, defaults). Bind and run it in your
    application:

        from ray import serve
        serve.run(owlvid.ray.serve_deployment("mPLUG/mPLUG-Owl3-7B-241101", ServerConfig(api_key="KEY"),
                                              num_replicas=4, gpus_per_replica=1).bind(), route_prefix="/")

    A replica takes up to max_batch + max_queued_requests requests (its own queue answers 503 beyond
    that, as `owlvid serve`); Serve's router holds at most max_queued_requests more. `.options(...)` on the
    result changes anything else (autoscaling, placement)."""
    from ray import serve

    from .requests import ServerConfig

    limits = config or ServerConfig()
    source = str(model)

    def build_app() -> Any:  # runs in each replica
        from .api import load
        from .server.app import create_app

        app = create_app(load(source, **load_options), config)  # config None: named after the model
        app.add_middleware(ReplicaHeader, replica=_replica_name())
        return app

    return serve.deployment(serve.ingress(build_app)(), name=name, num_replicas=num_replicas,
                            ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
                            max_ongoing_requests=limits.max_batch + limits.max_queued_requests,
                            max_queued_requests=limits.max_queued_requests)


def serve(model: str | os.PathLike, config: Any, *, host: str = "127.0.0.1", port: int = 8000,
          num_replicas: int = 1, gpus_per_replica: float = 0, cpus_per_replica: float = 1,
          ray_address: str | None = None, log_level: str = "info", ready_message: bool = True,
          **load_options: Any) -> None:
    """`owlvid serve --ray`: `serve_deployment(model, config, ...)` on `num_replicas` replicas behind Serve's
    HTTP proxy on host:port (port 0 picks a free one) until SIGINT/SIGTERM; then the application is deleted
    (and a Ray cluster this call started is stopped). `config` is the `ServerConfig` (named model, limits)."""
    if num_replicas < 1:
        raise InputError("num_replicas must be at least 1")
    ray = _ray()
    from ray import serve as ray_serve

    model = _model_source(model)
    if config.bind_host is None:  # the Host check accepts the names of the address served on
        config = dataclasses.replace(config, bind_host=host)
    if port == 0:
        port = _free_port(host)
    started = _connect(ray, ray_address)
    logging.getLogger("ray.serve").setLevel(log_level.upper())
    stop = threading.Event()  # handlers set after ray.init, which installs its own
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        _check_resources(ray, num_replicas, gpus_per_replica, cpus_per_replica)
        ray_serve.start(http_options={"host": host, "port": port})
        deployment = serve_deployment(model, config, num_replicas=num_replicas, gpus_per_replica=gpus_per_replica,
                                      cpus_per_replica=cpus_per_replica, **load_options)
        try:
            ray_serve.run(deployment.bind(), name="owlvid", route_prefix="/")
        except ray.exceptions.RayError as e:
            raise OwlvidError(f"the Ray Serve replicas did not start: {_root_cause(e)}") from None
        except RuntimeError as e:  # a deployment that failed to become healthy
            raise OwlvidError(f"the Ray Serve replicas did not start: {' '.join(str(e).split())}") from None
        if ready_message:
            shown = f"[{host}]" if ":" in host else host
            print(f"owlvid: serving {config.served_model_name!r} on http://{shown}:{port} (OpenAI API at /v1) "
                  f"from {num_replicas} Ray Serve replica(s)", file=sys.stderr, flush=True)
        stop.wait()
        ray_serve.delete("owlvid")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if started:
            ray.shutdown()


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
