"""The OpenAI-compatible HTTP server: `create_app(model, ServerConfig(...))` returns a FastAPI app.

Routes: `POST /v1/chat/completions` (streaming or not), `GET /v1/models`, `GET /health`, and the web page:
`GET /` (static files from `web/`), `POST /v1/uploads` (+ `/url`, `DELETE /v1/uploads/ID`: `uploads.py`),
`POST /v1/uploads/ID/frames` (frame preview: `preview.py`).
Every error is OpenAI's error JSON `{"error": {"message", "type", "param", "code"}}` with the status:
400 bad input, 401 bad API key, 404 unknown model or route, 413 body or media over the limits,
422 schema violation, 503 queue full, 504 request timeout, 500 only for bugs.

Media (`image_url` / `video_url`) may be `data:` URLs, http(s) URLs, or local files (`file://` URLs or
plain paths) under `--allowed-local-media-path` only. Requests are parsed by `owlvid.requests`;
media are fetched and decoded outside the engine worker, before the request joins the queue, under the
configured byte, pixel, frame and time limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from ..api import Model
from ..engine import Generation, TokenEvent
from ..errors import OwlvidError
from ..requests import APIError, RequestBuilder, ServerConfig, public_model_name, schemas, to_api_error
from .origins import OriginHostMiddleware, OriginHostPolicy
from .preview import FramePreviewer, media_headers, preview_routes
from .scheduler import Job, JobTimeout, QueueFullError, Scheduler
from .uploads import UPLOADS_PATH, UploadStore, upload_routes

__all__ = ["create_app", "ServerConfig", "APIError", "RequestBuilder", "to_api_error"]

log = logging.getLogger("owlvid.server")
WEB_DIR = Path(__file__).parent / "web"  # the web page: plain static files, no build step


def error_response(error: APIError) -> JSONResponse:
    """An APIError as the HTTP answer."""
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


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
        if scope.get("method") not in ("POST", "PUT", "PATCH") or scope.get("path") == UPLOADS_PATH:
            await self.app(scope, receive, send)  # an upload is streamed to disk by its route, under its own limit
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


# -- the app ---------------------------------------------------------------------------------------------


def _metrics_registry(sched: Scheduler, model_name: str) -> Any:
    from prometheus_client import CollectorRegistry

    from ..metrics import prometheus_collector

    registry = CollectorRegistry()
    registry.register(prometheus_collector(sched.metrics, model_name))
    return registry


def create_app(model: Model, config: ServerConfig | None = None, scheduler: Scheduler | None = None) -> FastAPI:
    cfg = config or ServerConfig(served_model_name=public_model_name(model.name))
    sched = scheduler or Scheduler(model, max_queued=cfg.max_queued_requests, max_batch=cfg.max_batch,
                                   max_pending_media_bytes=cfg.max_pending_media_bytes)
    uploads = UploadStore(cfg)
    builder = RequestBuilder(model, cfg, uploads)
    started = schemas.now()
    root = public_model_name(model.name)  # /v1/models' `root`: a hub id or a folder's name, never a path

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        sched.start()
        sweeper = asyncio.get_running_loop().create_task(uploads.sweep_forever())
        try:
            yield
        finally:
            sweeper.cancel()
            await run_in_threadpool(sched.stop)
            uploads.close()

    app = FastAPI(title="owlvid", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler = sched
    app.state.config = cfg
    app.state.uploads = uploads
    app.add_middleware(GuardMiddleware, config=cfg)
    policy = OriginHostPolicy(cfg.bind_host, cfg.allowed_hosts, cfg.allowed_origins)
    if policy.origins:  # pages allowed by name may read answers: CORS, outside the API key check (preflights)
        app.add_middleware(CORSMiddleware, allow_origins=sorted(policy.origins), allow_headers=["*"],
                           allow_methods=["GET", "POST", "DELETE"], max_age=600,
                           expose_headers=["X-Owlvid-Frames", "X-Owlvid-Images", "X-Owlvid-Visual-Cache"])
    app.add_middleware(OriginHostMiddleware, policy=policy)  # added last: runs first
    app.include_router(upload_routes(uploads, builder.sources.url_policy))
    app.include_router(preview_routes(FramePreviewer(uploads, builder)))
    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        # the page's own files only: answers are inserted as text, never as markup
        return FileResponse(WEB_DIR / "index.html", headers={
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; "
                                       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
            "Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:  # what browsers ask for by themselves (the page links the same icon)
        return FileResponse(WEB_DIR / "icon.svg", media_type="image/svg+xml",
                            headers={"Cache-Control": "max-age=86400"})

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return error_response(APIError(400, "the request body is not valid JSON", code="invalid_json"))
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        more = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
        return error_response(APIError(422, f"{param or 'body'}: {msg}{more}", param=param,
                        code=first.get("type", "invalid_value")))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(APIError(exc.status_code, str(exc.detail), code=exc.status_code,
                        headers=getattr(exc, "headers", None)))

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    # Client errors are answered here, by the ExceptionMiddleware; only what reaches the `Exception` handler
    # (bugs) is re-raised by Starlette and logged with its traceback.
    @app.exception_handler(OwlvidError)
    async def _owlvid_error(request: Request, exc: OwlvidError) -> JSONResponse:
        err = to_api_error(exc)
        log.info("%s %s: %d %s", request.method, request.url.path, err.status, err.message)
        return error_response(err)

    @app.exception_handler(ClientDisconnect)
    async def _client_left(request: Request, exc: ClientDisconnect) -> Response:
        return Response(status_code=499)  # nobody reads it: the client hung up (an upload's body cut short)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(to_api_error(exc))

    registry = _metrics_registry(sched, cfg.served_model_name)

    @app.get("/metrics")
    async def metrics() -> Response:
        """The engine's counts in the Prometheus text format (vLLM's names, `owlvid:` prefix)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = sched.alive
        return JSONResponse({"status": "ok" if alive else "unavailable", **sched.stats()},
                            status_code=200 if alive else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        card = schemas.model_card(cfg.served_model_name, root, model.runtime.max_positions, started)
        return {"object": "list", "data": [card] + builder.adapter_cards(started)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: schemas.ChatCompletionRequest, request: Request) -> Response:
        answered_as = builder.check_model(body.model)  # 404 for an unknown model (or adapter) name
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
            seen = media_headers(messages)
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
            events = _sse(job, first, cid, created, answered_as, usage, request, deadline)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **seen})
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
        answer = schemas.completion(cid, created, answered_as, event.text, event.finish_reason,
                                    event.prompt_tokens, event.completion_tokens)
        return JSONResponse(answer, headers=seen)

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
        from ..version import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "0"
