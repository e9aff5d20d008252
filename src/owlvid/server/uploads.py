"""Uploads of the web page: media files streamed to disk, referred to in chat requests as `owlvid-upload://ID`.

`POST /v1/uploads` takes the raw file as the request body (`?filename=clip.mp4`): it is written to disk as it
arrives (never held whole in memory), refused past `--max-media-bytes` (413) or when the uploads on disk
would pass `max_upload_storage_bytes` (503), then checked to be an image or a video that can be read (415
for other types, 400 for an unreadable file). `POST /v1/uploads/url` fetches an http(s) URL into the store
under the server's URL policy. `DELETE /v1/uploads/ID` removes one. No route ever sends a stored file back:
an ID (unguessable, 144 random bits) is only good for chat requests and frame previews, behind the API key
like every /v1 route. A file is deleted `--upload-ttl` seconds after its last use.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from ..errors import MediaError
from ..media import NamedPath, load_image, probe_video, sniff_kind
from ..media.sources import open_source
from ..requests import APIError, ServerConfig
from ..requests.builder import UPLOAD_SCHEME

UPLOADS_PATH = "/v1/uploads"  # POST bodies on this path are streamed by the route, not buffered
_ID_PREFIX = "upl-"
_WRITE_CHUNK = 1 << 20


@dataclass
class Upload:
    """One stored file: what the client called it, what it is, and when it was last used."""

    id: str
    path: Path
    filename: str
    kind: str  # "image" or "video"
    size: int
    info: dict[str, Any]  # video: total_frames, fps, duration; image: width, height
    last_used: float = field(default_factory=time.monotonic)

    @property
    def url(self) -> str:
        return f"{UPLOAD_SCHEME}://{self.id}"

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "object": "upload", "url": self.url, "filename": self.filename, "kind": self.kind,
                "bytes": self.size, **self.info}


def _upload_error(status: int, message: str, code: str, **kw: Any) -> APIError:
    return APIError(status, message, code=code, **kw)


def _check_content(path: Path, filename: str, config: ServerConfig) -> tuple[str, dict[str, Any]]:
    """("image" | "video", facts) of a stored file; APIError 415 for another type, 400 if unreadable."""
    with open(path, "rb") as f:
        head = f.read(64)
    named = NamedPath(path, filename)  # errors name the client's file, never the server's folder
    sniffed = sniff_kind(head) or ""
    if sniffed.endswith("image"):
        try:
            img = load_image(named, max_pixels=config.max_image_pixels, max_bytes=config.max_media_bytes)
        except MediaError as e:
            raise _upload_error(400, f"the image could not be read: {e}", "invalid_media") from None
        return "image", {"width": img.width, "height": img.height}
    if sniffed.endswith(("audio", "document")):
        raise _upload_error(415, f"{filename} is not an image or a video ({sniffed})", "unsupported_media_type")
    try:
        info = probe_video(named, max_bytes=config.max_media_bytes)
    except MediaError as e:
        if sniffed:  # it looks like a video (or a container) but FFmpeg cannot read it
            raise _upload_error(400, f"the video could not be read: {e}", "invalid_media") from None
        raise _upload_error(415, f"{filename} is not an image or a video that this server can read",
                            "unsupported_media_type") from None
    if not info["total_frames"]:
        raise _upload_error(400, f"the video could not be read: {filename} has no frames", "invalid_media")
    return "video", {"total_frames": info["total_frames"], "fps": info["fps"], "duration": info["duration"]}


class UploadStore:
    """Uploaded files on disk with their metadata in memory, and the frames a preview decoded last.

    Thread-safe: routes call it from the event loop and from worker threads. `take_frames` hands frames
    the frame preview decoded (at the model's resolution) to the next chat request about the same video
    and settings, so that it is not decoded twice; at most `frames_budget` bytes of them are kept."""

    def __init__(self, config: ServerConfig, frames_budget: int = 256 << 20) -> None:
        self.config = config
        parent = Path(config.upload_dir).expanduser() if config.upload_dir else None
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        # a folder of this process alone: several servers may share --upload-dir
        self.directory = Path(tempfile.mkdtemp(prefix="owlvid-uploads-", dir=parent))
        self._uploads: dict[str, Upload] = {}
        self._stored = 0  # bytes on disk, uploads being written included
        self._lock = threading.Lock()
        self.frames_budget = frames_budget
        self._frames: OrderedDict[str, tuple[str, Any, int]] = OrderedDict()  # key -> (upload id, frames, bytes)
        self._frames_bytes = 0

    # -- storage -----------------------------------------------------------------------------------

    def _reserve(self, size: int) -> None:
        limit = self.config.max_upload_storage_bytes
        with self._lock:
            if self._stored + size > limit:
                raise _upload_error(503, "the server's upload storage is full; retry later", "upload_storage_full",
                                    type_="server_error", headers={"Retry-After": "5"})
            self._stored += size

    def _unreserve(self, size: int) -> None:
        with self._lock:
            self._stored = max(self._stored - size, 0)

    def _too_large(self, filename: str) -> APIError:
        limit = self.config.max_media_bytes
        return _upload_error(413, f"{filename} is larger than this server's limit of {limit} bytes "
                             "(--max-media-bytes)", "media_too_large")

    async def receive(self, chunks: AsyncIterator[bytes], filename: str, declared: int | None) -> Upload:
        """Write a streamed body to disk under the size limits, then check what it is."""
        limit = self.config.max_media_bytes
        if declared is not None and declared > limit:
            raise self._too_large(filename)
        upload_id = _ID_PREFIX + secrets.token_urlsafe(18)
        path = self.directory / upload_id
        reserved = 0
        try:
            with open(path, "wb") as f:
                async for chunk in chunks:
                    if not chunk:
                        continue
                    if reserved + len(chunk) > limit:
                        raise self._too_large(filename)
                    self._reserve(len(chunk))
                    reserved += len(chunk)
                    f.write(chunk)  # local disk: short enough to do on the event loop
            if reserved == 0:
                raise _upload_error(400, f"{filename} is empty (0 bytes)", "invalid_media")
            kind, info = await run_in_threadpool(_check_content, path, filename, self.config)
        except BaseException:
            path.unlink(missing_ok=True)
            self._unreserve(reserved)
            raise
        return self._add(Upload(upload_id, path, filename, kind, reserved, info))

    def fetch(self, url: str, policy: Any) -> Upload:
        """Download an http(s) URL into the store (blocking: run in a thread)."""
        cfg = self.config
        filename = Path(url.split("?", 1)[0].rstrip("/")).name or "download"
        upload_id = _ID_PREFIX + secrets.token_urlsafe(18)
        path = self.directory / upload_id
        opened = open_source(url, max_bytes=cfg.max_media_bytes, timeout=cfg.download_timeout, url_policy=policy)
        size = 0
        try:
            self._reserve(opened.size or 0)
            size = opened.size or 0
            assert opened.fileobj is not None  # an http(s) download is a spooled file
            with open(path, "wb") as f:
                shutil.copyfileobj(opened.fileobj, f, _WRITE_CHUNK)
            kind, info = _check_content(path, filename, cfg)
        except BaseException:
            path.unlink(missing_ok=True)
            self._unreserve(size)
            raise
        finally:
            opened.close()
        return self._add(Upload(upload_id, path, filename, kind, size, info))

    def _add(self, upload: Upload) -> Upload:
        with self._lock:
            self._uploads[upload.id] = upload
        return upload

    def get(self, upload_id: str) -> Upload:
        """The upload (its time-to-live starts again), or a 404."""
        with self._lock:
            upload = self._uploads.get(upload_id)
            if upload is not None:
                upload.last_used = time.monotonic()
        if upload is None:
            raise _upload_error(404, "upload not found: it expired (--upload-ttl) or was deleted; upload the "
                                "file again", "upload_not_found")
        return upload

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._uploads)

    def delete(self, upload_id: str) -> None:
        with self._lock:
            upload = self._uploads.pop(upload_id, None)
            for key in [k for k, (owner, _, _) in self._frames.items() if owner == upload_id]:
                self._frames_bytes -= self._frames.pop(key)[2]
        if upload is None:
            raise _upload_error(404, "upload not found", "upload_not_found")
        upload.path.unlink(missing_ok=True)
        self._unreserve(upload.size)

    def sweep(self, now: float | None = None) -> int:
        """Delete the uploads unused for `upload_ttl` seconds; returns how many."""
        now = time.monotonic() if now is None else now
        with self._lock:
            expired = [u.id for u in self._uploads.values() if now - u.last_used > self.config.upload_ttl]
        for upload_id in expired:
            with contextlib.suppress(APIError):  # deleted by a client meanwhile
                self.delete(upload_id)
        return len(expired)

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        with self._lock:
            self._uploads.clear()
            self._frames.clear()
            self._frames_bytes = self._stored = 0

    # -- use in requests -------------------------------------------------------------------------------

    def resolve(self, url: str, kind: str, param: str) -> NamedPath:
        """The stored file of `owlvid-upload://ID` for a chat request's image_url / video_url."""
        upload_id = url.split("://", 1)[-1].strip("/")
        try:
            upload = self.get(upload_id)
        except APIError as e:
            raise APIError(400, e.message, param=param, code=e.code) from None
        if upload.kind != kind:
            raise APIError(400, f"upload {upload.filename} is an {upload.kind}, not a {kind}: send it as "
                           f"{upload.kind}_url", param=param, code="invalid_media")
        return NamedPath(upload.path, upload.filename)

    def keep_frames(self, upload: Upload, key: str, frames: Any, nbytes: int) -> None:
        """Keep frames a preview decoded for the next chat request about them (within the budget)."""
        if nbytes > self.frames_budget:
            return
        with self._lock:
            if upload.id not in self._uploads:
                return
            for old in [k for k, (owner, _, _) in self._frames.items() if owner == upload.id]:
                self._frames_bytes -= self._frames.pop(old)[2]  # only the latest settings of a video
            self._frames[key] = (upload.id, frames, nbytes)
            self._frames_bytes += nbytes
            while self._frames_bytes > self.frames_budget:
                self._frames_bytes -= self._frames.popitem(last=False)[1][2]

    def take_frames(self, key: str) -> Any:
        """Frames kept under `key` (handed over once: the model's visual cache has them next), or None."""
        with self._lock:
            entry = self._frames.pop(key, None)
            if entry is None:
                return None
            self._frames_bytes -= entry[2]
            return entry[1]

    async def sweep_forever(self) -> None:
        interval = min(max(self.config.upload_ttl / 4, 0.5), 60.0)
        while True:
            await asyncio.sleep(interval)
            await run_in_threadpool(self.sweep)


def upload_routes(store: UploadStore, url_policy: Any) -> APIRouter:
    router = APIRouter()

    @router.get(UPLOADS_PATH)
    async def limits() -> dict:
        """What the page checks before sending a file."""
        cfg = store.config
        return {"object": "upload_limits", "max_bytes": cfg.max_media_bytes, "ttl": cfg.upload_ttl}

    @router.post(UPLOADS_PATH)
    async def upload(request: Request, filename: str = "upload") -> dict:
        declared = request.headers.get("content-length")
        try:
            size = int(declared) if declared is not None else None
        except ValueError:
            size = None
        name = os.path.basename(filename.replace("\\", "/"))[:200] or "upload"
        return (await store.receive(request.stream(), name, size)).describe()

    @router.post(UPLOADS_PATH + "/url")
    async def upload_url(request: Request) -> dict:
        try:
            url = (await request.json()).get("url")
        except (ValueError, AttributeError):
            url = None
        if not isinstance(url, str) or not url.strip().lower().startswith(("http://", "https://")):
            raise APIError(400, "send {\"url\": \"https://...\"} with an http(s) URL", param="url",
                           code="invalid_value")
        # media errors (unreachable, refused host, too large) are answered by the app's error handler
        return (await run_in_threadpool(store.fetch, url.strip(), url_policy)).describe()

    @router.delete(UPLOADS_PATH + "/{upload_id}")
    async def delete(upload_id: str) -> dict:
        store.delete(upload_id)
        return {"id": upload_id, "object": "upload", "deleted": True}

    return router
