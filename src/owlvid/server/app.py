"""The OpenAI-compatible HTTP server: `create_app(model, ServerConfig(...))` returns a FastAPI app.

Routes: `POST /v1/chat/completions` (streaming or not), `GET /v1/models`, `GET /health`.
Every error is OpenAI's error JSON `{"error": {"message", "type", "param", "code"}}` with the status:
400 bad input, 401 bad API key, 404 unknown model or route, 413 body or media over the limits,
422 schema violation, 503 queue full, 504 request timeout, 500 only for bugs.

Media (`image_url` / `video_url`) may be `data:` URLs, http(s) URLs, or local files (`file://` URLs or
plain paths) under `--allowed-local-media-path` only. They are fetched and decoded outside the engine
worker, before the request joins the queue, under the configured byte, pixel, frame and time limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api import Model, check_seed, check_text
from ..engine import Generation, TokenEvent
from ..errors import InputError, MediaError, OwlvidError
from ..media import MediaTooLargeError, NamedPath, UrlPolicy
from . import schemas
from .scheduler import BatchingScheduler, Job, JobTimeout, QueueFullError, Scheduler

log = logging.getLogger("owlvid.server")

MiB = 1 << 20


@dataclass
class ServerConfig:
    """Everything the server needs besides the model; the CLI flags map one to one."""

    served_model_name: str = "owlvid"
    api_key: str | None = None
    allowed_local_media_path: str | None = None
    max_request_bytes: int = 100 * MiB
    max_media_bytes: int = 256 * MiB
    download_timeout: float = 60.0
    # http(s) media: only public hosts unless opted in; checked after DNS and on every redirect
    allowed_media_domains: list[str] | None = None
    allow_private_media_hosts: bool = False
    media_connect_timeout: float = 10.0
    max_frames: int = 128
    max_image_pixels: int = 40_000_000
    max_media_per_request: int = 32
    max_queued_requests: int = 64
    max_pending_media_bytes: int | None = None  # decoded media held by queued requests (None: no budget)
    max_batch: int = 8  # requests decoded together (continuous batching), where the model supports it
    request_timeout: float = 600.0
    # defaults of a request that does not say
    default_max_tokens: int = 512
    default_temperature: float = 0.0
    default_top_p: float = 1.0
    default_seed: int | None = None
    video_options: dict[str, Any] = field(default_factory=dict)  # max_frames / fps / sampling
    cut_enable: bool | None = None


class APIError(Exception):
    """An error answered to the client as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(schemas.error_body(self.message, self.type, self.param, self.code),
                            status_code=self.status, headers=self.headers)


def to_api_error(e: BaseException) -> APIError:
    """Map an exception from request preparation or generation to the HTTP answer."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, MediaTooLargeError):  # bytes or pixels over the limits
        message = str(e)
        for key, flag in (("max_pixels", "--max-image-pixels"), ("max_bytes", "--max-media-bytes")):
            if key in message and flag not in message:
                message += f" ({flag})"
        return APIError(413, message, code="media_too_large")
    if isinstance(e, QueueFullError):
        return APIError(503, str(e), "server_error", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(e, JobTimeout):
        return APIError(504, str(e), "timeout_error", code="timeout")
    if isinstance(e, MediaError):
        return APIError(400, str(e), code="invalid_media")
    if isinstance(e, OwlvidError):  # InputError, UnsupportedError, ... : the request cannot be served
        return APIError(400, str(e), code="invalid_request")
    log.error("internal error", exc_info=(type(e), e, e.__traceback__))
    # The exception text may carry server paths or internals: the client gets a generic line.
    return APIError(500, "internal server error (the server log has the details)", "server_error",
                    code="internal_error")


# -- request guard: API key and body size -------------------------------------------------------------


class GuardMiddleware:
    """Pure ASGI: checks the bearer key on /v1 routes, then reads the body under the size limit."""

    def __init__(self, app: Any, config: ServerConfig) -> None:
        self.app = app
        self.config = config

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cfg = self.config
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if cfg.api_key and scope.get("path", "").startswith("/v1"):
            auth = headers.get(b"authorization", b"").decode("latin-1").strip()
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode("utf-8", "replace"), cfg.api_key.encode()):
                message = ("Incorrect API key provided." if token else
                           "Missing API key: send it as 'Authorization: Bearer KEY'.")
                await _send_json(send, 401, schemas.error_body(message, "invalid_request_error",
                                                               code="invalid_api_key"),
                                 extra=[(b"www-authenticate", b"Bearer")])
                return
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        too_large = schemas.error_body(f"the request body is over the limit of {cfg.max_request_bytes} bytes "
                                       "(--max-request-bytes)", code="request_too_large")
        try:
            declared = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            declared = 0
        if declared > cfg.max_request_bytes:
            await _send_json(send, 413, too_large, extra=[(b"connection", b"close")])
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > cfg.max_request_bytes:
                await _send_json(send, 413, too_large, extra=[(b"connection", b"close")])
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _send_json(send: Any, status: int, body: dict, extra: list | None = None) -> None:
    raw = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(raw)).encode()), *(extra or [])]})
    await send({"type": "http.response.body", "body": raw})


# -- media --------------------------------------------------------------------------------------------


_VIDEO_KEYS = {"num_frames", "fps", "max_frames", "sampling", "start", "end"}
_PROCESSOR_KEYS = _VIDEO_KEYS | {"cut_enable"}


class MediaSources:
    """Checks an `image_url` / `video_url` against the server's policy and returns what to hand to
    `owlvid.media`: the URL itself for `data:` and http(s) (media enforces the byte limit, the download
    deadline and `url_policy`), or the resolved path of a local file under the allowed root, named in
    messages as the client wrote it (errors never show the server's folders or symlink targets)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        root = config.allowed_local_media_path
        self.root = Path(root).expanduser().resolve() if root else None
        domains = config.allowed_media_domains
        self.url_policy = UrlPolicy(allow_private_hosts=config.allow_private_media_hosts,
                                    allowed_domains=tuple(domains) if domains is not None else None,
                                    connect_timeout=config.media_connect_timeout)

    @staticmethod
    def is_url(source: Any) -> bool:
        return isinstance(source, str) and source[:8].lower().startswith(("http://", "https://"))

    def resolve(self, url: str, kind: str, param: str) -> str | NamedPath:
        url = url.strip()
        match = _SCHEME_RE.match(url)
        scheme = match.group(1).lower() if match else ""
        if len(scheme) == 1:  # a Windows drive letter, not a scheme
            scheme = ""
        if scheme in ("data", "http", "https"):
            return url
        if scheme in ("file", ""):
            return self._local_path(url, scheme, param)
        raise APIError(400, f"unsupported {kind} URL scheme {scheme!r}: use http(s), data: or a local path",
                       param=param, code="invalid_media")

    def _local_path(self, url: str, scheme: str, param: str) -> str:
        if self.root is None:
            raise APIError(400, "local media paths are disabled on this server: send a data: or http(s) "
                           "URL, or start the server with --allowed-local-media-path", param=param,
                           code="local_media_disabled")
        if scheme == "file":
            parsed = urlparse(url)
            if parsed.netloc not in ("", "localhost"):
                raise APIError(400, f"file URL with a remote host {parsed.netloc!r} is not supported",
                               param=param, code="invalid_media")
            raw = url2pathname(unquote(parsed.path))
        else:
            raw = url
        path = Path(raw).expanduser()
        if not path.is_absolute():
            path = self.root / path
        name = self._client_name(path, raw)
        try:
            real = path.resolve()  # symlinks and '..' resolved before the check
            inside = real == self.root or self.root in real.parents
            found = inside and real.is_file()
            size = real.stat().st_size if found else 0
        except (OSError, RuntimeError) as e:  # symlink loop, permission denied: the OS message names the path
            reason = getattr(e, "strerror", None) or "symlink loop"
            raise APIError(400, f"cannot access media file {name} ({reason})", param=param,
                           code="invalid_media") from None
        if not inside:
            raise APIError(400, f"{name} is outside the allowed local media path (--allowed-local-media-path)",
                           param=param, code="local_media_forbidden")
        if not found:
            raise APIError(400, f"media file not found: {name}", param=param, code="invalid_media")
        if size > self.config.max_media_bytes:
            limit = self.config.max_media_bytes
            raise MediaTooLargeError(f"{name}: {size} bytes is more than the limit of {limit} bytes "
                                     "(--max-media-bytes)")
        return NamedPath(real, name)

    def _client_name(self, path: Path, raw: str) -> str:
        """The path as the client wrote it, relative to the root where it lies there (lexically: a
        symlink's target is never shown), else just the file name."""
        assert self.root is not None
        try:
            return Path(os.path.normpath(path)).relative_to(self.root).as_posix() or "."
        except ValueError:
            return raw if not Path(raw).is_absolute() else Path(raw).name or "file"


_SCHEME_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")


# -- request conversion --------------------------------------------------------------------------------


def _check_keys(options: dict, allowed: set[str], param: str) -> dict:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise APIError(400, f"unsupported option(s) {', '.join(unknown)} in {param}; supported: "
                       f"{', '.join(sorted(allowed))}", param=param, code="unsupported_option")
    return dict(options)


def _checked(check: Any, *args: Any, param: str) -> None:
    """Run a shared request check (owlvid.api); its InputError becomes a 400 naming the field."""
    try:
        check(*args)
    except InputError as e:
        raise APIError(400, str(e), param=param, code="invalid_value") from None


def _refuse_unsupported(body: schemas.ChatCompletionRequest) -> None:
    if body.n not in (None, 1):
        raise APIError(400, "only n=1 is supported", param="n", code="unsupported_option")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name) not in (None, 0, 0.0):
            raise APIError(400, f"{name} is not supported (use repetition_penalty)", param=name,
                           code="unsupported_option")
    if body.logprobs or body.top_logprobs:
        raise APIError(400, "logprobs are not supported", param="logprobs", code="unsupported_option")
    for name in ("tools", "functions", "logit_bias"):
        if getattr(body, name):
            raise APIError(400, f"{name} is not supported", param=name, code="unsupported_option")
    for name in ("tool_choice", "function_call"):
        if getattr(body, name) not in (None, "none", "auto"):
            raise APIError(400, f"{name} is not supported", param=name, code="unsupported_option")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format",
                       code="unsupported_option")


class RequestBuilder:
    """Validated request -> (owlvid messages with decoded media, generation options)."""

    def __init__(self, model: Any, config: ServerConfig) -> None:
        self.model = model
        self.config = config
        self.sources = MediaSources(config)

    def options(self, body: schemas.ChatCompletionRequest) -> tuple[dict, dict]:
        """(generation kwargs, video options) of a request; cheap, runs first."""
        cfg = self.config
        _refuse_unsupported(body)
        asked = body.max_completion_tokens or body.max_tokens
        gen: dict[str, Any] = {
            # an explicit max_tokens must fit the context (400 otherwise, as vLLM); the default just stops there
            "max_new_tokens": asked or cfg.default_max_tokens,
            "shorten_to_context": not asked,
            "temperature": cfg.default_temperature if body.temperature is None else body.temperature,
            "top_p": cfg.default_top_p if body.top_p is None else body.top_p,
            "top_k": max(body.top_k or 0, 0),
            "repetition_penalty": 1.0 if body.repetition_penalty is None else body.repetition_penalty,
            "seed": cfg.default_seed if body.seed is None else body.seed,
        }
        if body.stop:
            gen["stop"] = [body.stop] if isinstance(body.stop, str) else list(body.stop)
        _checked(check_seed, gen["seed"], param="seed")
        for i, text in enumerate(gen.get("stop", [])):
            _checked(check_text, text, f"stop string {i}", param="stop")
        io_kwargs = body.media_io_kwargs or {}
        _check_keys(io_kwargs, {"video", "image"}, "media_io_kwargs")
        _check_keys(io_kwargs.get("image") or {}, set(), "media_io_kwargs.image")
        requested = _check_keys(io_kwargs.get("video") or {}, _VIDEO_KEYS, "media_io_kwargs.video")
        proc = _check_keys(body.mm_processor_kwargs or {}, _PROCESSOR_KEYS, "mm_processor_kwargs")
        cut = proc.pop("cut_enable", cfg.cut_enable)
        requested.update(proc)
        # the server's defaults apply where the request says nothing: a frame count or rate in the request
        # replaces the server's (never both, which presets refuse as disagreeing)
        framing = {"num_frames", "max_frames", "fps"}
        video = {k: v for k, v in cfg.video_options.items() if not (k in framing and framing & set(requested))}
        video.update(requested)
        for key in ("num_frames", "max_frames"):
            value = video.get(key)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise APIError(400, f"{key} must be a positive integer", param=key, code="invalid_value")
            if value > cfg.max_frames:
                raise APIError(400, f"{key}={value} is over this server's limit of {cfg.max_frames} frames "
                               "per video (--max-frames)", param=key, code="too_many_frames")
        fps = video.get("fps")
        if fps is not None and (not isinstance(fps, int | float) or isinstance(fps, bool) or fps <= 0):
            raise APIError(400, "fps must be a positive number", param="fps", code="invalid_value")
        if cut is not None:
            if not isinstance(cut, bool):
                raise APIError(400, "cut_enable must be true or false", param="cut_enable",
                               code="invalid_value")
            gen["cut_enable"] = cut
        return gen, video

    def messages(self, body: schemas.ChatCompletionRequest, video_options: dict) -> list[dict]:
        """Convert messages and fetch/decode their media (blocking: run in a thread)."""
        count = sum(1 for m in body.messages if isinstance(m.content, list)
                    for p in m.content if p.type != "text")
        if count > self.config.max_media_per_request:
            raise APIError(400, f"the request has {count} images/videos; this server accepts at most "
                           f"{self.config.max_media_per_request} (--max-media-per-request)", param="messages",
                           code="too_many_media")
        out = []
        for i, m in enumerate(body.messages):
            role = "system" if m.role == "developer" else m.role
            if not isinstance(m.content, list):
                _checked(check_text, m.content or "", f"messages.{i}.content", param=f"messages.{i}.content")
                out.append({"role": role, "content": m.content or ""})
                continue
            parts = []
            for j, p in enumerate(m.content):
                param = f"messages.{i}.content.{j}"
                if p.type == "text":
                    _checked(check_text, p.text, param, param=param)
                    parts.append({"type": "text", "text": p.text})
                elif p.type == "image_url":
                    parts.append({"type": "image", "image": self._image(p.image_url.url, param)})
                else:
                    frames = self._video(p.video_url.url, video_options, param)
                    parts.append({"type": "video", "video": frames})
            out.append({"role": role, "content": parts})
        return out

    def _image(self, url: str, param: str):
        from ..media import load_image

        cfg = self.config
        source = self.sources.resolve(url, "image", param)
        return load_image(source, max_pixels=cfg.max_image_pixels, max_bytes=cfg.max_media_bytes,
                          timeout=cfg.download_timeout, url_policy=self.sources.url_policy)

    def _video(self, url: str, options: dict, param: str) -> Any:
        """The video as the model's PreparedVideo: at most --max-frames frames, chosen before decoding."""
        from ..api import load_video_frames

        cfg = self.config
        opts = dict(options)
        if opts.get("sampling") in ("fps", "all"):
            opts.setdefault("max_frames", cfg.max_frames)  # fps spreads, all refuses, past the cap
        opts.update(max_bytes=cfg.max_media_bytes, timeout=cfg.download_timeout,
                    max_pixels=cfg.max_image_pixels)
        source = self.sources.resolve(url, "video", param)
        if self.sources.is_url(source):  # only then: other options would turn off streamed decoding
            opts["url_policy"] = self.sources.url_policy
        return load_video_frames(source, self.model.runtime, opts, frame_cap=cfg.max_frames)


# -- the app ---------------------------------------------------------------------------------------------


def create_app(model: Model, config: ServerConfig | None = None, scheduler: Scheduler | None = None) -> FastAPI:
    cfg = config or ServerConfig(served_model_name=model.name)
    if scheduler is None and model.runtime.supports_batching:
        scheduler = BatchingScheduler(model, max_queued=cfg.max_queued_requests, max_batch=cfg.max_batch,
                                      max_pending_media_bytes=cfg.max_pending_media_bytes)
    sched = scheduler or Scheduler(model, max_queued=cfg.max_queued_requests,
                                   max_pending_media_bytes=cfg.max_pending_media_bytes)
    builder = RequestBuilder(model, cfg)
    started = schemas.now()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        sched.start()
        try:
            yield
        finally:
            await run_in_threadpool(sched.stop)

    app = FastAPI(title="owlvid", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler = sched
    app.state.config = cfg
    app.add_middleware(GuardMiddleware, config=cfg)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return APIError(400, "the request body is not valid JSON", code="invalid_json").response()
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        more = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
        return APIError(422, f"{param or 'body'}: {msg}{more}", param=param,
                        code=first.get("type", "invalid_value")).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail), code=exc.status_code,
                        headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        return to_api_error(exc).response()

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = sched.alive
        return JSONResponse({"status": "ok" if alive else "unavailable", **sched.stats()},
                            status_code=200 if alive else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        card = schemas.model_card(cfg.served_model_name, model.name, model.runtime.max_positions, started)
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: schemas.ChatCompletionRequest, request: Request) -> Response:
        if body.model and body.model != cfg.served_model_name:
            raise APIError(404, f"The model `{body.model}` does not exist: this server serves "
                           f"`{cfg.served_model_name}`", param="model", code="model_not_found")
        gen, video = builder.options(body)
        deadline = time.monotonic() + cfg.request_timeout
        try:
            sched.reserve()
        except QueueFullError as e:
            raise to_api_error(e) from None
        submitted = False
        try:
            try:
                messages = await run_in_threadpool(builder.messages, body, video)
            except Exception as e:
                raise to_api_error(e) from None
            job = Job(messages, gen, timeout=max(deadline - time.monotonic(), 0.001))
            sched.submit(job, reserved=True)
            submitted = True
        finally:
            if not submitted:
                sched.release()
        try:
            first = await _next_event(job, request, deadline)
        except BaseException:
            job.cancel()
            raise
        if first is None:  # the client went away while the request waited
            job.cancel()
            return Response(status_code=499)
        if isinstance(first, BaseException):
            raise to_api_error(first)
        cid, created = schemas.new_completion_id(), schemas.now()
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            events = _sse(job, first, cid, created, cfg.served_model_name, usage, request, deadline)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            event = first
            while not isinstance(event, Generation):
                event = await _next_event(job, request, deadline)
                if event is None:
                    job.cancel()
                    return Response(status_code=499)
                if isinstance(event, BaseException):
                    raise to_api_error(event)
        finally:
            if not job.done:
                job.cancel()
        answer = schemas.completion(cid, created, cfg.served_model_name, event.text, event.finish_reason,
                                    event.prompt_tokens, event.completion_tokens)
        return JSONResponse(answer)

    return app


async def _next_event(job: Job, request: Request, deadline: float, poll: float = 0.5) -> Any:
    """The job's next event; None when the client disconnected; JobTimeout past the deadline.

    The client's connection is checked at least every `poll` seconds, also while events flow."""
    while True:
        now = time.monotonic()
        if now - job.client_checked_at >= poll:
            job.client_checked_at = now
            if await request.is_disconnected():
                return None
        remaining = deadline - now
        if remaining <= 0:
            job.cancel()
            return JobTimeout("the request timed out (--request-timeout)")
        try:
            return await job.next_event(timeout=min(remaining, poll))
        except asyncio.TimeoutError:
            continue


async def _sse(job: Job, first: Any, cid: str, created: int, model: str, include_usage: bool,
               request: Request, deadline: float) -> AsyncIterator[str]:
    def data(obj: dict) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    try:
        yield data(schemas.chunk(cid, created, model, {"role": "assistant", "content": ""},
                                 with_usage_field=include_usage))
        event = first
        while True:
            if isinstance(event, TokenEvent):
                if event.text:
                    yield data(schemas.chunk(cid, created, model, {"content": event.text},
                                             with_usage_field=include_usage))
            elif isinstance(event, Generation):
                yield data(schemas.chunk(cid, created, model, {}, event.finish_reason,
                                         with_usage_field=include_usage))
                if include_usage:
                    yield data(schemas.usage_chunk(cid, created, model, event.prompt_tokens,
                                                   event.completion_tokens))
                break
            elif event is None:  # client gone
                return
            else:
                err = to_api_error(event)
                yield data(schemas.error_body(err.message, err.type, err.param, err.code))
                break
            event = await _next_event(job, request, deadline)
        yield "data: [DONE]\n\n"
    finally:
        if not job.done:
            job.cancel()


def _version() -> str:
    try:
        from .. import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "0"
