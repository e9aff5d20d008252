"""Fetching bytes: URLs (local HTTP server), data URLs, file-likes, limits and timeouts."""

from __future__ import annotations

import base64
import io
import time

import pytest

from owlvid.errors import MediaError
from owlvid.media import (
    MediaFetchError,
    MediaTimeoutError,
    MediaTooLargeError,
    load_image,
    load_video,
    sniff_kind,
)
from owlvid.media.sources import describe_source, open_media

from .synth import index_frame, png_bytes, read_index


def test_http_image_and_video(http_server):
    img = load_image(f"{http_server}/frame.png")
    assert read_index(img) == 7
    clip = load_video(f"{http_server}/video.mp4?token=SECRET", indices=[3, 64])
    assert [read_index(f) for f in clip.frames] == [3, 64]
    assert "SECRET" not in clip.source and clip.source.endswith("/video.mp4?...")


def test_http_errors(http_server):
    with pytest.raises(MediaFetchError, match="HTTP 404"):
        load_image(f"{http_server}/missing.png")
    with pytest.raises(MediaFetchError, match="redirect to unsupported scheme 'ftp'"):
        load_image(f"{http_server}/redirect-ftp")
    with pytest.raises(MediaFetchError, match="cannot fetch"):
        load_image("http://127.0.0.1:9/nothing-listens-here.png", timeout=2)


def test_http_timeout_no_answer(http_server):
    t0 = time.monotonic()
    with pytest.raises(MediaTimeoutError) as e:
        load_video(f"{http_server}/slow", timeout=0.5)
    assert time.monotonic() - t0 < 3
    assert "timeout=0.5" in str(e.value) and "/slow" in str(e.value)


def test_http_timeout_slow_download(http_server):
    # every read returns within the timeout, but the whole download does not finish in time
    t0 = time.monotonic()
    with pytest.raises(MediaTimeoutError):
        load_image(f"{http_server}/drip", timeout=0.6)
    assert time.monotonic() - t0 < 3


def test_http_size_limits(http_server):
    with pytest.raises(MediaTooLargeError, match="max_bytes=1000"):  # refused from Content-Length
        load_video(f"{http_server}/video.mp4", max_bytes=1000)
    with pytest.raises(MediaTooLargeError, match="max_bytes=100000"):  # no Content-Length: counted
        load_image(f"{http_server}/big-no-length", max_bytes=100_000)


def test_data_urls():
    png = png_bytes(index_frame(9))
    b64 = base64.b64encode(png).decode()
    assert read_index(load_image(f"data:image/png;base64,{b64}")) == 9
    # whitespace / line breaks and the URL-safe alphabet are accepted
    wrapped = "\n".join(b64[i : i + 60] for i in range(0, len(b64), 60))
    assert read_index(load_image(f"data:image/png;base64,{wrapped}")) == 9
    urlsafe = base64.urlsafe_b64encode(png).decode().rstrip("=")
    assert read_index(load_image(f"data:;base64,{urlsafe}")) == 9
    with pytest.raises(MediaError, match="invalid base64"):
        load_image("data:image/png;base64,@@@@")
    with pytest.raises(MediaError, match="malformed data URL"):
        load_image("data:image/png;base64")
    with pytest.raises(MediaTooLargeError):
        load_image(f"data:image/png;base64,{b64}", max_bytes=50)


def test_file_like_sources(tmp_path):
    png = png_bytes(index_frame(4))
    assert read_index(load_image(io.BytesIO(png))) == 4
    path = tmp_path / "x.png"
    path.write_bytes(png)
    with open(path, "rb") as f:
        assert read_index(load_image(f)) == 4
        assert not f.closed  # the caller's object is never closed
    with open(path) as f, pytest.raises(MediaError, match="text mode"):
        load_image(f)
    assert read_index(load_image(path.as_uri())) == 4  # file:// URL
    assert read_index(load_image(bytearray(png))) == 4


def test_unsupported_schemes_and_empty_inputs():
    with pytest.raises(MediaError, match="unsupported URL scheme 'ftp'"):
        load_image("ftp://example.com/x.png")
    with pytest.raises(MediaError, match="unsupported URL scheme 's3'"):
        load_video("s3://bucket/x.mp4")
    with pytest.raises(MediaError, match="empty input"):
        load_image(b"")
    with pytest.raises(MediaError, match="empty input"):
        load_image(io.BytesIO(b""))


def test_descriptions_are_short_and_safe():
    assert describe_source("https://user:pw@example.com/a/b.mp4?sig=xyz") == "https://example.com/a/b.mp4?..."
    long = "/data/" + "x" * 300 + "/clip.mp4"
    d = describe_source(long)
    assert len(d) <= 96 and d.endswith("clip.mp4")
    assert describe_source(b"abc") == "<3 bytes>"
    assert describe_source("data:image/png;base64,AAAA").startswith("data:image/png;base64 URL")
    with open_media(b"xyz", max_bytes=None, timeout=None) as m:
        assert m.head(2) == b"xy" and m.fileobj.tell() == 0


@pytest.mark.parametrize(
    ("head", "kind"),
    [(b"\x89PNG\r\n\x1a\n....", "PNG image"), (b"\xff\xd8\xff\xe0", "JPEG image"),
     (b"\x00\x00\x00\x20ftypisom", "MP4/MOV video"), (b"\x1aE\xdf\xa3", "Matroska/WebM video"),
     (b"RIFF\0\0\0\0WEBPVP8 ", "WebP image"), (b"RIFF\0\0\0\0AVI LIST", "AVI video"),
     (b"  <!DOCTYPE html><html>", "HTML/XML document"), (b"ID3\x04", "MP3 audio"), (b"random", None)],
)
def test_sniff_kind(head, kind):
    assert sniff_kind(head) == kind
