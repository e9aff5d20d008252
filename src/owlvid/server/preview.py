"""Frame preview: the frames the model will see of an uploaded video, as small JPEG thumbnails with their
timestamps, under the same sampling options a chat request carries (an uploaded image: its thumbnail).

`POST /v1/uploads/ID/frames` with `{"mm_processor_kwargs": {...}, "media_io_kwargs": {...}}` (the chat
request's own fields, checked by the same code) plans the frames with `owlvid.video_plan` (`plan_video`,
`resolve_plan`), the plan `load_video_frames` follows for the model, and decodes them from the video it
opened to plan them. The decoded frames are handed to the next chat request about that video and settings
(`UploadStore.keep_frames`), so asking after looking does not decode the video again.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from collections import OrderedDict
from typing import Any

from fastapi import APIRouter, Request
from PIL import Image
from starlette.concurrency import run_in_threadpool

from ..media import NamedPath, load_image
from ..requests import APIError, RequestBuilder
from ..video_plan import CachedVideo, FrameList, PreparedVideo, plan_video, resolve_plan
from .uploads import UPLOADS_PATH, Upload, UploadStore

THUMBNAIL_BOX = (192, 108)  # largest thumbnail width, height (aspect kept)
_PREVIEWS_KEPT = 4  # answers kept per upload: switching back to earlier settings is instant


def thumbnail_data_url(frame: Image.Image, box: tuple[int, int] = THUMBNAIL_BOX) -> str:
    small = frame.convert("RGB")
    small.thumbnail(box, Image.BILINEAR)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


class FramePreviewer:
    """Computes previews; remembers the last few per upload (the upload's file never changes)."""

    def __init__(self, store: UploadStore, builder: RequestBuilder, concurrency: int = 2) -> None:
        self.store = store
        self.builder = builder
        self._answers: OrderedDict[tuple[str, str], dict] = OrderedDict()
        self._lock = threading.Lock()
        self._slots = asyncio.Semaphore(concurrency)  # decoding previews must not starve the model

    async def preview(self, upload_id: str, body: Any) -> dict:
        if not isinstance(body, dict):
            raise APIError(400, "send a JSON object (with mm_processor_kwargs / media_io_kwargs)", code="invalid_json")
        for name in ("mm_processor_kwargs", "media_io_kwargs"):
            if not isinstance(body.get(name) or {}, dict):
                raise APIError(422, f"{name}: must be an object", param=name, code="invalid_value")
        upload = self.store.get(upload_id)
        if upload.kind == "image":
            async with self._slots:
                return await run_in_threadpool(self._image_preview, upload)
        video, _ = self.builder.video_options(body.get("media_io_kwargs"), body.get("mm_processor_kwargs"))
        async with self._slots:
            return await run_in_threadpool(self._preview, upload, video)

    def _image_preview(self, upload: Upload) -> dict:
        cfg = self.builder.config
        image = load_image(NamedPath(upload.path, upload.filename), max_pixels=cfg.max_image_pixels,
                           max_bytes=cfg.max_media_bytes)
        return {"object": "image_preview", "upload": upload.id,
                "frames": [{"index": 0, "time": None, "image": thumbnail_data_url(image)}]}

    def _preview(self, upload: Upload, video: dict) -> dict:
        builder = self.builder
        source = NamedPath(upload.path, upload.filename)
        opts = builder.decode_options(source, video)
        plan = plan_video(source, builder.model.runtime, opts, frame_cap=builder.config.max_frames)
        key = plan.cache_key
        assert key is not None  # a local file always has one
        with self._lock:
            answer = self._answers.get((upload.id, key))
            if answer is not None:
                self._answers.move_to_end((upload.id, key))
                return answer
        frames: list[Image.Image] = []
        indices: list[int] = []
        times: list[float] = []
        thumbnails: list[str] = []
        held = 0
        keep = True
        plan, video = resolve_plan(plan)
        with video:  # opened once, to plan the frames and to decode them
            for clip in video.chunks(plan.indices, plan.sampling.name, chunk_size=16):
                for frame in clip.frames:
                    thumbnails.append(thumbnail_data_url(frame))
                indices += clip.indices
                times += clip.timestamps
                if keep:  # the model's frames, for the chat request that follows, while they fit the budget
                    frames += clip.frames
                    held += sum(f.width * f.height * 3 for f in clip.frames)
                    keep = held <= self.store.frames_budget
                    if not keep:
                        frames = []
        if keep and frames:
            self.store.keep_frames(upload, key, FrameList(frames, key, indices, times), held)
        answer = {"object": "frame_preview", "upload": upload.id, "sampling": plan.sampling.name,
                  "num_frames": len(indices), "total_frames": upload.info["total_frames"],
                  "fps": upload.info["fps"], "duration": upload.info["duration"],
                  "frames": [{"index": i, "time": round(t, 3), "image": img}
                             for i, t, img in zip(indices, times, thumbnails)]}
        known = set(self.store.ids())
        with self._lock:
            self._answers[(upload.id, key)] = answer
            mine = [k for k in self._answers if k[0] == upload.id]
            for old in mine[:-_PREVIEWS_KEPT]:
                del self._answers[old]
            for stale in [k for k in self._answers if k[0] not in known]:  # expired or deleted uploads
                del self._answers[stale]
        return answer


def media_headers(messages: list[dict]) -> dict[str, str]:
    """What the model sees of a request's media, as response headers for the web page: video frames
    (`X-Owlvid-Frames`), images (`X-Owlvid-Images`) and, with videos, whether all of them were already in
    the visual cache (`X-Owlvid-Visual-Cache: hit`, else `miss`)."""
    parts = [p for m in messages if isinstance(m.get("content"), list) for p in m["content"]]
    videos = [p["video"] for p in parts if p.get("type") == "video"]
    headers = {"X-Owlvid-Frames": str(sum(v.num_frames if isinstance(v, PreparedVideo) else len(v) for v in videos)),
               "X-Owlvid-Images": str(sum(p.get("type") == "image" for p in parts))}
    if videos:
        headers["X-Owlvid-Visual-Cache"] = "hit" if all(isinstance(v, CachedVideo) for v in videos) else "miss"
    return headers


def preview_routes(previewer: FramePreviewer) -> APIRouter:
    router = APIRouter()

    @router.post(UPLOADS_PATH + "/{upload_id}/frames")
    async def frames(upload_id: str, request: Request) -> dict:
        try:
            body = await request.json()
        except ValueError:
            raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
        return await previewer.preview(upload_id, body)

    return router
