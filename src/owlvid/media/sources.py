"""Turn a media *source* (path, URL, data URL, bytes, file-like) into readable bytes, safely.

Everything here is about getting bytes, never about decoding them: :mod:`owlvid.media.image` and
:mod:`owlvid.media.video` decide what the bytes are. Nothing is ever handed to a shell, and only
``http``/``https`` URLs are fetched (with urllib from the standard library), with a size limit and a
deadline, so that a request cannot make the process read a local file it did not name or hang forever.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import os
import re
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any

from owlvid.errors import MediaError

__all__ = [
    "DEFAULT_IMAGE_MAX_BYTES",
    "DEFAULT_VIDEO_MAX_BYTES",
    "DEFAULT_IMAGE_TIMEOUT",
    "DEFAULT_VIDEO_TIMEOUT",
    "MediaFetchError",
    "MediaTimeoutError",
    "MediaTooLargeError",
    "OpenedMedia",
    "describe_source",
    "is_bytes_source",
    "open_media",
    "open_source",
    "sniff_kind",
]

DEFAULT_IMAGE_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_VIDEO_MAX_BYTES = 2 * 1024 * 1024 * 1024
DEFAULT_IMAGE_TIMEOUT = 30.0
DEFAULT_VIDEO_TIMEOUT = 120.0

# Downloads and file-like sources are spooled: kept in memory up to this size, then in a temp file,
# so a 1 GB video download does not sit in RAM.
_SPOOL_MEMORY_LIMIT = 32 * 1024 * 1024
_CHUNK = 1024 * 1024
_USER_AGENT = "owlvid-media/0.1 (+urllib)"
_SCHEME_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")


class MediaTooLargeError(MediaError):
    """The input is larger than the configured limit (bytes or pixels)."""


class MediaFetchError(MediaError):
    """A URL could not be fetched (HTTP error, DNS failure, refused connection, ...)."""


class MediaTimeoutError(MediaFetchError):
    """Fetching a URL took longer than the ``timeout``."""


def is_bytes_source(source: Any) -> bool:
    """True for the sources :func:`open_media` handles (paths, URLs, bytes, binary file-likes)."""
    return isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)) or _is_filelike(source)


def _is_filelike(source: Any) -> bool:
    return callable(getattr(source, "read", None))


def _shorten(text: str, limit: int = 96) -> str:
    # Keep both ends: the end of a path (file name) is usually the informative part.
    if len(text) <= limit:
        return text
    keep = (limit - 3) // 2
    return text[:keep] + "..." + text[-keep:]


def _describe_url(url: str) -> str:
    # Never echo credentials or query strings (signed URLs carry tokens) into messages and logs.
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        tail = "?..." if parts.query else ""
        return _shorten(f"{parts.scheme}://{host}{parts.path}") + tail
    except ValueError:
        return _shorten(url.split("?", 1)[0])


def _describe_data_url(url: str) -> str:
    header = url[5 : url.find(",")] if "," in url else url[5:40]
    return f"data:{_shorten(header, 48)} URL ({len(url)} chars)"


def describe_source(source: Any) -> str:
    """A short, safe, one-line description of ``source`` for error messages and ``VideoClip.source``."""
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, bytes) and not isinstance(source, str):
        return f"<{len(source)} bytes>"
    if isinstance(source, str):
        low = source[:8].lower()
        if low.startswith(("http://", "https://")):
            return _describe_url(source)
        if low.startswith("data:"):
            return _describe_data_url(source)
        return _shorten(source)
    if isinstance(source, (bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if _is_filelike(source):
        name = getattr(source, "name", None)
        if isinstance(name, str) and name:
            return _shorten(name)
        return f"<file-like {type(source).__name__}>"
    try:  # PIL images, arrays, tensors: type and shape are enough to recognise them
        from PIL import Image

        if isinstance(source, Image.Image):
            return f"<PIL image {source.width}x{source.height} {source.mode}>"
    except ImportError:  # pragma: no cover - pillow is a dependency
        pass
    shape = getattr(source, "shape", None)
    if shape is not None:
        return f"<{type(source).__name__} {tuple(shape)} {getattr(source, 'dtype', '')}>"
    if isinstance(source, (list, tuple)):
        return f"<{type(source).__name__} of {len(source)} frames>"
    return f"<{type(source).__name__}>"


def sniff_kind(head: bytes) -> str | None:
    """Guess what the first bytes of a file are ("PNG image", "MP4/MOV video", ...), or None.

    Only used to write helpful error messages and to refuse an image passed as a video: the real
    format detection is done by Pillow and FFmpeg, which both look at the content, never the name.
    """
    h = bytes(head[:64])
    if h.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG image"
    if h.startswith(b"\xff\xd8\xff"):
        return "JPEG image"
    if h.startswith((b"GIF87a", b"GIF89a")):
        return "GIF image"
    if h.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF image"
    if h.startswith(b"RIFF") and len(h) >= 12:
        return {b"WEBP": "WebP image", b"AVI ": "AVI video", b"WAVE": "WAV audio"}.get(h[8:12], "RIFF file")
    if h.startswith(b"BM") and len(h) >= 14 and h[6:10] == b"\x00\x00\x00\x00":
        return "BMP image"
    if h[4:8] == b"ftyp":
        brand = h[8:12]
        if brand in (b"heic", b"heix", b"mif1", b"msf1", b"avif", b"avis"):
            return "HEIF/AVIF image"
        if brand in (b"M4A ", b"M4B "):
            return "M4A audio"
        return "MP4/MOV video"
    if h[4:8] in (b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot"):
        return "MP4/MOV video"
    if h.startswith(b"\x1aE\xdf\xa3"):
        return "Matroska/WebM video"
    if h.startswith(b"FLV"):
        return "FLV video"
    if h.startswith(b"OggS"):
        return "Ogg media"
    if h.startswith(b"fLaC"):
        return "FLAC audio"
    if h.startswith(b"ID3") or (len(h) > 1 and h[0] == 0xFF and (h[1] & 0xE6) in (0xE2, 0xE4, 0xE6)):
        return "MP3 audio"
    if h.startswith(b"\x00\x00\x01\xba"):
        return "MPEG-PS video"
    if h.startswith(b"%PDF"):
        return "PDF document"
    stripped = h.lstrip().lower()
    if stripped.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        return "HTML/XML document"
    if stripped.startswith((b"{", b"[")):
        return "JSON/text document"
    return None


@dataclass
class OpenedMedia:
    """An opened byte source: a local ``path`` or a seekable binary ``fileobj`` (exactly one is set)."""

    description: str
    path: str | None = None
    fileobj: IO[bytes] | None = None
    size: int | None = None
    _owned: list[IO[bytes]] = field(default_factory=list, repr=False)

    def head(self, n: int = 64) -> bytes:
        """The first ``n`` bytes (for sniffing), without moving the read position of a file object."""
        if self.path is not None:
            with open(self.path, "rb") as f:
                return f.read(n)
        assert self.fileobj is not None
        pos = self.fileobj.tell()
        try:
            self.fileobj.seek(0)
            return self.fileobj.read(n)
        finally:
            self.fileobj.seek(pos)

    def rewind(self) -> None:
        if self.fileobj is not None:
            self.fileobj.seek(0)

    def close(self) -> None:
        for f in self._owned:
            try:
                f.close()
            except Exception:  # noqa: BLE001 - closing a temp file must never mask the real error
                pass
        self._owned.clear()


@contextmanager
def open_media(source: Any, *, max_bytes: int | None, timeout: float | None) -> Iterator[OpenedMedia]:
    """Open a path / URL / data URL / bytes / file-like as a local path or a seekable file object.

    ``max_bytes`` limits what has to be copied (downloads, data URLs, bytes, file-likes); local files
    are read in place and are not limited (a server that accepts untrusted sources should refuse local
    paths itself). ``timeout`` is the deadline in seconds for a whole download.
    Raises :class:`MediaError` (or a subclass) with a one-line message naming the source.
    """
    opened = open_source(source, max_bytes=max_bytes, timeout=timeout)
    try:
        yield opened
    finally:
        opened.close()


def open_source(source: Any, *, max_bytes: int | None, timeout: float | None) -> OpenedMedia:
    """Like :func:`open_media` without the context manager: the caller must call ``close()``."""
    return _open(source, max_bytes=max_bytes, timeout=timeout)


def _check_limit(desc: str, size: int, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise MediaTooLargeError(f"{desc}: {size} bytes is more than the limit max_bytes={max_bytes}")


def _open(source: Any, *, max_bytes: int | None, timeout: float | None) -> OpenedMedia:
    desc = describe_source(source)
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
        if isinstance(source, bytes):
            source = os.fsdecode(source)
        return _open_path(source, desc)
    if isinstance(source, str):
        m = _SCHEME_RE.match(source)
        scheme = m.group(1).lower() if m else ""
        if scheme in ("http", "https"):
            return _open_url(source, desc, max_bytes=max_bytes, timeout=timeout)
        if scheme == "data":
            return _open_data_url(source, desc, max_bytes=max_bytes)
        if scheme == "file":
            parts = urllib.parse.urlsplit(source)
            if parts.netloc not in ("", "localhost"):
                raise MediaError(f"{desc}: file:// URLs must point to this machine")
            return _open_path(urllib.request.url2pathname(parts.path), desc)
        # "C:\\x" is a Windows path, not a URL; anything else with "scheme://" is a URL we do not fetch.
        if m and source[m.end() : m.end() + 2] == "//" and len(scheme) > 1:
            raise MediaError(f"{desc}: unsupported URL scheme '{scheme}' (only http, https, data and file)")
        return _open_path(source, desc)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        _check_limit(desc, len(data), max_bytes)
        if not data:
            raise MediaError(f"{desc}: empty input (0 bytes)")
        return OpenedMedia(desc, fileobj=io.BytesIO(data), size=len(data))
    if _is_filelike(source):
        return _open_filelike(source, desc, max_bytes=max_bytes)
    raise MediaError(f"{desc}: unsupported source type {type(source).__name__}")


def _open_path(path: str, desc: str) -> OpenedMedia:
    path = os.path.expanduser(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MediaError(f"{desc}: file not found") from None
    except OSError as e:
        raise MediaError(f"{desc}: cannot access file ({e.strerror or e})") from None
    if os.path.isdir(path):
        raise MediaError(f"{desc}: is a directory, not a file")
    if not os.access(path, os.R_OK):
        raise MediaError(f"{desc}: permission denied")
    if st.st_size == 0:
        raise MediaError(f"{desc}: empty file (0 bytes)")
    return OpenedMedia(desc, path=os.path.abspath(path), size=st.st_size)


def _copy_limited(read, desc: str, max_bytes: int | None, deadline: float | None = None,
                  timeout: float | None = None) -> tempfile.SpooledTemporaryFile:
    out = tempfile.SpooledTemporaryFile(max_size=_SPOOL_MEMORY_LIMIT)
    total = 0
    try:
        while True:
            chunk = read(_CHUNK)
            if not chunk:
                break
            total += len(chunk)
            _check_limit(desc, total, max_bytes)
            out.write(chunk)
            if deadline is not None and time.monotonic() > deadline:
                raise MediaTimeoutError(f"{desc}: download did not finish within timeout={timeout} s")
    except BaseException:
        out.close()
        raise
    if total == 0:
        out.close()
        raise MediaError(f"{desc}: empty input (0 bytes)")
    out.seek(0)
    return out


def _open_filelike(source: Any, desc: str, *, max_bytes: int | None) -> OpenedMedia:
    # Copy instead of using the caller's object: it may be non-seekable (a socket, a pipe, an HTTP
    # body), and FFmpeg/Pillow need to seek. The caller's object is never closed.
    try:
        first = source.read(0)
    except Exception as e:  # noqa: BLE001 - any failure of a foreign object is an input error
        raise MediaError(f"{desc}: cannot read from file-like object ({e})") from None
    if isinstance(first, str):
        raise MediaError(f"{desc}: file-like object is in text mode; open it in binary mode ('rb')")

    def read(n: int) -> bytes:
        try:
            return source.read(n)
        except Exception as e:  # noqa: BLE001
            raise MediaError(f"{desc}: reading failed ({e})") from None

    spool = _copy_limited(read, desc, max_bytes)
    size = spool.seek(0, io.SEEK_END)
    spool.seek(0)
    return OpenedMedia(desc, fileobj=spool, size=size, _owned=[spool])


def _open_data_url(url: str, desc: str, *, max_bytes: int | None) -> OpenedMedia:
    comma = url.find(",")
    if comma < 0:
        raise MediaError(f"{desc}: malformed data URL (no ',')")
    header, payload = url[5:comma], url[comma + 1 :]
    if header.lower().endswith(";base64"):
        # Estimate before decoding: a 2 GB base64 string must not be decoded just to be refused.
        _check_limit(desc, len(payload) * 3 // 4 - 2, max_bytes)
        compact = re.sub(r"\s+", "", urllib.parse.unquote(payload) if "%" in payload else payload)
        compact += "=" * (-len(compact) % 4)
        try:
            if "-" in compact or "_" in compact:
                data = base64.urlsafe_b64decode(compact)
            else:
                data = base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError):
            raise MediaError(f"{desc}: invalid base64 payload in data URL") from None
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    _check_limit(desc, len(data), max_bytes)
    if not data:
        raise MediaError(f"{desc}: empty data URL")
    return OpenedMedia(desc, fileobj=io.BytesIO(data), size=len(data))


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    # urllib follows redirects to ftp:// too; a fetched URL must never turn into another protocol.
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in ("http", "https"):
            raise MediaFetchError(f"{_describe_url(req.full_url)}: redirect to unsupported scheme '{scheme}'")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _open_url(url: str, desc: str, *, max_bytes: int | None, timeout: float | None) -> OpenedMedia:
    opener = urllib.request.build_opener(_HttpOnlyRedirects())
    req = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"})
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        resp = opener.open(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        raise MediaFetchError(f"{desc}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise MediaTimeoutError(f"{desc}: no answer within timeout={timeout} s") from None
        raise MediaFetchError(f"{desc}: cannot fetch ({e.reason})") from None
    except TimeoutError:
        raise MediaTimeoutError(f"{desc}: no answer within timeout={timeout} s") from None
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise MediaFetchError(f"{desc}: cannot fetch ({e})") from None
    with resp:
        length = resp.headers.get("Content-Length")
        if length and length.isdigit():
            _check_limit(desc, int(length), max_bytes)

        def read(n: int) -> bytes:
            try:
                # read1: whatever arrives (one recv), so the deadline is checked while data trickles in;
                # read(n) would loop until n bytes and could run far past the deadline.
                return resp.read1(n)
            except TimeoutError:
                raise MediaTimeoutError(f"{desc}: download stalled for more than timeout={timeout} s") \
                    from None
            except (OSError, http.client.HTTPException) as e:
                raise MediaFetchError(f"{desc}: download failed ({e})") from None

        spool = _copy_limited(read, desc, max_bytes, deadline=deadline, timeout=timeout)
    size = spool.seek(0, io.SEEK_END)
    spool.seek(0)
    return OpenedMedia(desc, fileobj=spool, size=size, _owned=[spool])

