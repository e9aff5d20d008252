"""Offline batch jobs on one machine: OpenAI batch request lines in, OpenAI batch output lines out.

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", "body": {...chat completion...}}
 -> {"id": "batch_req_...", "custom_id": "q1", "response": {"status_code": 200, "request_id": "...",
     "body": {...chat.completion...}}, "error": null}

Bodies are parsed and checked by the server's own code (`owlvid.requests`: schemas, `RequestBuilder`),
so a line answers what `POST /v1/chat/completions` would. The whole input is checked before any work; a
request that fails (bad media, over a limit) gets its 4xx line and the job goes on. Each output line is
flushed and fsync'd as its request completes; a rerun skips the custom_ids already in the output (a torn
last line, from a killed run, is cut away first), so an interrupted job resumes without duplicates or losses.
A job holds a lock on its output (`records.exclusive`) from before it reads it until it ends: a second job
on the same output exits at once, naming the first.

Requests decode together through the one engine (`engine.Engine`: continuous batching, chunked prefill);
those sharing a video run next to each other, so the visual cache decodes and encodes it once.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from . import records
from .errors import InputError, OwlvidError
from .metrics import EngineMetrics
from .requests import ServerConfig, schemas

CHAT_COMPLETIONS_URL = "/v1/chat/completions"


@dataclass
class BatchRequest:
    line: int  # 1-based line number in the input
    custom_id: str
    body: Any  # requests.schemas.ChatCompletionRequest


def _schema_error(e: Any) -> str:
    """A pydantic ValidationError as one line naming the first offending field (as the server's 422)."""
    errors = e.errors()
    first = errors[0] if errors else {}
    param = ".".join(str(x) for x in first.get("loc", ())) or "body"
    more = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
    return f"body.{param}: {first.get('msg', 'invalid request')}{more}"


def read_requests(input_path: str | os.PathLike) -> list[BatchRequest]:
    """Every request line of the input, checked; the first problem is an InputError naming its line.
    Blank lines are ignored."""
    from pydantic import ValidationError

    path = Path(input_path)
    name = str(input_path)
    out: list[BatchRequest] = []
    seen: dict[str, int] = {}
    with open(path, "rb") as f:
        raw_lines = f.read().split(b"\n")
    for number, raw in enumerate(raw_lines, 1):
        if not raw.strip():
            continue

        def fail(message: str, number: int = number) -> InputError:
            return InputError(f"{name} line {number}: {message}")

        try:
            item = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise fail(f"not valid JSON ({getattr(e, 'msg', e)})") from None
        if not isinstance(item, dict):
            raise fail("a request line must be a JSON object")
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            raise fail("custom_id must be a non-empty string")
        if custom_id in seen:
            raise fail(f"duplicate custom_id {custom_id!r} (first on line {seen[custom_id]})")
        seen[custom_id] = number
        if item.get("method") != "POST":
            raise fail(f"method must be POST, got {item.get('method')!r}")
        if item.get("url") != CHAT_COMPLETIONS_URL:
            raise fail(f"url must be {CHAT_COMPLETIONS_URL!r}, got {item.get('url')!r}")
        if not isinstance(item.get("body"), dict):
            raise fail("body must be a JSON object (a chat completions request)")
        try:
            body = schemas.ChatCompletionRequest.model_validate(item["body"])
        except ValidationError as e:
            raise fail(_schema_error(e)) from None
        out.append(BatchRequest(number, custom_id, body))
    return out


def read_done(output_path: str | os.PathLike) -> set[str]:
    """custom_ids already answered in an existing output (`records.read_done`: a torn last line after valid
    ones is cut away; a file that is not batch output is refused untouched). Hold the output's lock."""
    return records.read_done(output_path, "custom_id", "batch output", _is_output_line)


def _is_output_line(item: dict) -> bool:
    """An output line, not a request line (which has a custom_id too): it carries a response or an error."""
    return "response" in item or "error" in item


def job_order(requests: list[BatchRequest]) -> list[BatchRequest]:
    """Input order, except that requests about the same video follow the first one that asks about it
    (the visual cache then decodes and encodes that video once, while it is still cached)."""
    return [r for group in job_groups(requests) for r in group]


def job_groups(requests: list[BatchRequest]) -> list[list[BatchRequest]]:
    """The requests in groups about the same (first) video, in the order `job_order` runs them; a request
    without a video is a group of its own. Whoever splits a job (Ray) keeps a group together."""
    groups: dict[Any, list[BatchRequest]] = {}
    for r in requests:
        key = _first_video(r.body) or ("request", r.line)
        groups.setdefault(key, []).append(r)
    return list(groups.values())


def anchor_relative_paths(body: Any, base: Path) -> None:
    """Plain relative media paths of a request become absolute under `base` (in place)."""
    for message in body.messages:
        if isinstance(message.content, list):
            for part in message.content:
                ref = part.video_url if part.type == "video_url" else part.image_url if part.type == "image_url" \
                    else None
                if ref is None:
                    continue
                url = ref.url.strip()
                if not _SCHEME_RE.match(url) and not Path(url).expanduser().is_absolute():
                    ref.url = str(base / url)


_SCHEME_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]+:")  # data:, http(s):, file: (one letter is a drive)


def _first_video(body: Any) -> str | None:
    for message in body.messages:
        if isinstance(message.content, list):
            for part in message.content:
                if part.type == "video_url":
                    return _video_key(part.video_url.url)
    return None


def _video_key(url: str) -> str:
    """The same local video however it is written (path, file:// URL); other URLs as they are."""
    url = url.strip()
    if url[:7].lower() == "file://":
        url = url2pathname(unquote(urlparse(url).path))
    elif _SCHEME_RE.match(url):
        return url
    try:
        return str(Path(url).expanduser().resolve())
    except (OSError, RuntimeError):
        return url


class OutputFile:
    """The output file, appended one complete line at a time, each flushed and fsync'd (`records.RecordWriter`)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.lines = records.RecordWriter(path)

    def write(self, custom_id: str, status: int, body: dict) -> None:
        self.lines.write({"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
                          "response": {"status_code": status, "request_id": uuid.uuid4().hex, "body": body},
                          "error": None})

    def close(self) -> None:
        self.lines.close()


def run(input_path: str | os.PathLike, output_path: str | os.PathLike, model: Any | Callable[[], Any], *,
        allowed_local_media_path: str | os.PathLike | None = None, max_batch: int = 8,
        progress: bool = True, json_progress: bool = False, media_timeout: float | None = None,
        prefetch: int = 2) -> dict[str, Any]:
    """Answer every request line of `input_path` into `output_path` (appending; resumable).

    `model` is an `owlvid.Model`, or a function returning one (called only after the input is checked and
    only if something is left to do). Local paths and file:// URLs are allowed anywhere unless
    `allowed_local_media_path` restricts them to a folder (relative paths are then taken under that
    folder; without it, under the working directory); http(s) media may come from private hosts too (it
    is the user's own job). `media_timeout`: seconds one image or video may take to load and decode; past
    it that request gets a 408 `media_timeout` line and the job goes on. `prefetch`: requests prepared
    (media decoded, vision encoded) ahead of the engine on a background thread.
    Progress goes to stderr: a bar, or with `json_progress` one JSON object per line (done, failed, total,
    requests_per_s, eta_s, elapsed_s).
    Returns {"requests", "skipped" (already in the output), "completed", "failed", "output"}.
    """
    with open_job(input_path, output_path, allowed_local_media_path, max_batch, media_timeout) as plan:
        if not plan.todo:
            Path(output_path).touch()
            return plan.summary()
        from .api import Model

        if not isinstance(model, Model):
            model = model()
        config = job_config(model.name, plan.root, max_batch, media_timeout=media_timeout)
        metrics = EngineMetrics()
        summary = write_answers(plan, answer_requests(model, config, plan.todo, prefetch=prefetch, metrics=metrics),
                                progress, json_progress)
        summary["engine"] = metrics.summary()  # tokens, latencies, visual cache, media and vision time
        return summary


def write_answers(plan: JobPlan, answers: Iterable[tuple[str, int, dict]], progress: bool = True,
                  json_progress: bool = False) -> dict[str, Any]:
    """Append each (custom_id, status, body) to the plan's output as it arrives (`OutputFile`), with the
    progress on stderr (`BarProgress`, or `JsonProgress`); an answer for a custom_id that is not to do, or
    already written, is dropped (a retried remote task must not write a line twice). Returns `run`'s
    summary."""
    summary = plan.summary()
    waiting = {r.custom_id for r in plan.todo}
    out = OutputFile(plan.output)
    bar = JsonProgress(len(plan.todo)) if json_progress else BarProgress(len(plan.todo), progress)
    try:
        for custom_id, status, body in answers:
            if custom_id not in waiting:
                continue
            waiting.discard(custom_id)
            out.write(custom_id, status, body)
            summary["completed" if status == 200 else "failed"] += 1
            bar.update(summary["completed"], summary["failed"])
    finally:
        bar.close()
        out.close()
    return summary


@dataclass
class JobPlan:
    """A checked job: every request of the input, and those still to answer (in job order)."""

    requests: list[BatchRequest]
    todo: list[BatchRequest]
    root: Path  # local media allowed under this folder ("/": anywhere)
    output: Path

    def summary(self) -> dict[str, Any]:
        """The summary `run` returns, before any work."""
        return {"requests": len(self.requests), "skipped": len(self.requests) - len(self.todo), "completed": 0,
                "failed": 0, "output": str(self.output)}


@contextmanager
def open_job(input_path: str | os.PathLike, output_path: str | os.PathLike,
             allowed_local_media_path: str | os.PathLike | None = None, max_batch: int = 8,
             media_timeout: float | None = None) -> Iterator[JobPlan]:
    """Everything `run` checks before loading a model: the arguments, the whole input (`read_requests`;
    relative media paths anchored as `run` says), the output (not the input, `read_done`: a torn last line
    is cut). InputError on the first problem. The output stays locked until the block ends (another run on
    it is refused at once): the job is planned and written inside it."""
    if max_batch < 1:
        raise InputError("max_batch must be at least 1")
    if media_timeout is not None and not media_timeout > 0:
        raise InputError("media_timeout must be a positive number of seconds")
    if not Path(output_path).expanduser().parent.is_dir():
        raise InputError(f"the folder of the output file {output_path} does not exist")
    root = Path(allowed_local_media_path).expanduser() if allowed_local_media_path is not None else Path("/")
    if not root.is_dir():
        raise InputError(f"allowed local media path {allowed_local_media_path} is not a directory")
    if _same_file(input_path, output_path):  # a hard link too: its "answered" lines would be the requests
        raise InputError(f"the output file {output_path} is the input file {input_path}; write the answers "
                         "to another file")
    with records.exclusive(output_path):
        requests = read_requests(input_path)
        if allowed_local_media_path is None:  # unrestricted: relative paths are the user's, from here
            for r in requests:
                anchor_relative_paths(r.body, Path.cwd())
        done = read_done(output_path)
        todo = job_order([r for r in requests if r.custom_id not in done])
        yield JobPlan(requests, todo, root, Path(output_path))


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(Path(a).expanduser(), Path(b).expanduser())
    except OSError:  # one does not exist (yet)
        return False


def job_config(model_name: str, allowed_local_media_path: str | os.PathLike, max_batch: int, *,
               media_timeout: float | None = None) -> Any:
    """The request policy (`ServerConfig`, as the server's) for a batch job: local media under the given
    folder ("/" for anywhere), http(s) media from private hosts too (it is the user's own job),
    `media_timeout` seconds per image or video (None: no limit beyond the download timeout)."""
    return ServerConfig(served_model_name=model_name, allowed_local_media_path=str(allowed_local_media_path),
                        allow_private_media_hosts=True, max_batch=max_batch, media_timeout=media_timeout)


class BarProgress:
    """The tqdm bar on stderr: done, failed, requests per second, ETA."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, disable=not enabled, file=sys.stderr, unit="req", dynamic_ncols=True,
                        desc="owlvid batch", postfix={"done": 0, "failed": 0})

    def update(self, done: int, failed: int) -> None:
        self.bar.set_postfix(done=done, failed=failed, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class JsonProgress:
    """Progress for machines: one JSON object per line on stderr, at the start and after each request:
    {"done", "failed", "total", "requests_per_s", "eta_s", "elapsed_s"} (`done`: answered, `failed`: error
    lines, `total`: requests this run has to answer; `eta_s` is null until a rate is known)."""

    def __init__(self, total: int, stream: Any = None) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self.update(0, 0)

    def update(self, done: int, failed: int) -> None:
        elapsed = time.monotonic() - self.started
        finished = done + failed
        rate = finished / elapsed if finished and elapsed > 0 else 0.0
        eta = (self.total - finished) / rate if rate else (0.0 if finished >= self.total else None)
        line = {"done": done, "failed": failed, "total": self.total, "requests_per_s": round(rate, 4),
                "eta_s": None if eta is None else round(eta, 2), "elapsed_s": round(elapsed, 3)}
        self.stream.write(json.dumps(line) + "\n")
        self.stream.flush()

    def close(self) -> None:
        pass


def answer_requests(model: Any, config: Any, todo: list[BatchRequest], *, prefetch: int = 2,
                    metrics: EngineMetrics | None = None) -> Iterator[tuple[str, int, dict]]:
    """(custom_id, status, response body) of each request as it completes; `config` is the server's
    `ServerConfig` (media policy, limits, `media_timeout`). Bodies become conversations just in time (media
    loaded when the request is prepared, `prefetch` requests ahead of the engine), so a failing one becomes
    its own error line. A 200 body carries the audit of the request in `body["owlvid"]` (see `audit`)."""
    from .jobs import generate_each
    from .requests import RequestBuilder

    builder = RequestBuilder(model, config)
    created = schemas.now()

    def job(body: Any) -> Callable[[], tuple[list[dict], dict]]:
        def build() -> tuple[list[dict], dict]:
            options, video = builder.options(body)
            return builder.messages(body, video), dict(options)

        return build

    # the name a line's answer carries: the adapter its `model` picked, else the base model's
    answered_as = {r.custom_id: builder.adapter_for(r.body.model) or config.served_model_name for r in todo}
    for custom_id, result in generate_each(model, ((r.custom_id, job(r.body)) for r in todo),
                                           max_batch=config.max_batch, prefetch=prefetch,
                                           media_timeout=config.media_timeout, metrics=metrics):
        if isinstance(result, Exception):
            yield (custom_id, *_error(result))
        else:
            body = schemas.completion(schemas.new_completion_id(), created, answered_as[custom_id], result.text,
                                      result.finish_reason, result.prompt_tokens, result.completion_tokens)
            body["owlvid"] = audit(result)
            yield custom_id, 200, body


def audit(result: Any) -> dict:
    """The `owlvid` extension object of a 200 body: `media` (per image/video: source, sha256, decoder,
    frames, indices, timestamps, visual_cache, decode_s, encode_s; see `engine.Generation`) and `timings`
    (seconds: media_s, vision_s, prefill_s, decode_s, decode_steps, prepare_s, queue_s)."""
    def rounded(value: Any) -> Any:
        return round(value, 4) if isinstance(value, float) else value

    media = [{k: rounded(v) for k, v in m.items()} for m in result.media]
    return {"media": media, "timings": {k: rounded(v) for k, v in result.timings.items()}}


def _error(e: BaseException) -> tuple[int, dict]:
    """(status, OpenAI error JSON) of a failed request, as the server would answer it; never a traceback."""
    from .requests import APIError, to_api_error

    if isinstance(e, APIError | OwlvidError):
        api = to_api_error(e)
    else:  # an unforeseen failure: the user's own job, so the message is shown
        text = " ".join(str(e).split()) or type(e).__name__
        api = APIError(500, f"{type(e).__name__}: {text}", "server_error", code="internal_error")
    return api.status, schemas.error_body(api.message, api.type, api.param, api.code)
