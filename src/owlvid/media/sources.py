"""Turn a media *source* (path, URL, data URL, bytes, file-like) into readable bytes, safely.

Everything here is about getting bytes, never about decoding them: :mod:`owlvid.media.image` and
:mod:`owlvid.media.video` decide what the bytes are. Nothing is ever handed to a shell, and only
``http``/``https`` URLs are fetched (with http.client from the standard library), with a size limit and a
deadline, so that a request cannot make the process read a local file it did not name or hang forever.
Fetching, and which hosts a URL may reach (:class:`UrlPolicy`), is in :mod:`owlvid.media.fetch`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import re
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any

from owlvid.errors import MediaError

from .fetch import (
    LIBRARY_URL_POLICY,
    MediaFetchError,
    MediaForbiddenUrlError,
    MediaTimeoutError,
    MediaTooLargeError,
    UrlPolicy,
    check_limit,
    copy_limited,
    describe_url,
    fetch_url,
    shorten,
)

__all__ = [
    "DEFAULT_IMAGE_MAX_BYTES",
    "DEFAULT_VIDEO_MAX_BYTES",
    "DEFAULT_IMAGE_TIMEOUT",
    "DEFAULT_VIDEO_TIMEOUT",
    "LIBRARY_URL_POLICY",
    "MediaFetchError",
    "MediaForbiddenUrlError",
    "MediaTimeoutError",
    "MediaTooLargeError",
    "NamedPath",
    "OpenedMedia",
    "UrlPolicy",
    "describe_source",
    "file_sha256",
    "is_bytes_source",
    "open_media",
    "open_source",
    "sniff_kind",
]

DEFAULT_IMAGE_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_VIDEO_MAX_BYTES = 2 * 1024 * 1024 * 1024
DEFAULT_IMAGE_TIMEOUT = 30.0
DEFAULT_VIDEO_TIMEOUT = 120.0

_SCHEME_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")


class NamedPath(os.PathLike):
    """A local file that messages name ``name`` instead of its real path: a server passes the path as its
    client wrote it, so that errors never reveal the server's folders or where a symlink points."""

    def __init__(self, path: str | os.PathLike, name: str) -> None:
        self.path = os.fspath(path)
        self.name = name

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return f"NamedPath({self.name!r})"


def is_bytes_source(source: Any) -> bool:
    """True for the sources :func:`open_media` handles (paths, URLs, bytes, binary file-likes)."""
    return isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)) or _is_filelike(source)


def _is_filelike(source: Any) -> bool:
    return callable(getattr(source, "read", None))


def _describe_data_url(url: str) -> str:
    header = url[5 : url.find(",")] if "," in url else url[5:40]
    return f"data:{shorten(header, 48)} URL ({len(url)} chars)"


def describe_source(source: Any) -> str:
    """A short, safe, one-line description of ``source`` for error messages and ``VideoClip.source``."""
    if isinstance(source, NamedPath):
        return shorten(source.name)
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, bytes) and not isinstance(source, str):
        return f"<{len(source)} bytes>"
    if isinstance(source, str):
        low = source[:8].lower()
        if low.startswith(("http://", "https://")):
            return describe_url(source)
        if low.startswith("data:"):
            return _describe_data_url(source)
        return shorten(source)
    if isinstance(source, (bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if _is_filelike(source):
        name = getattr(source, "name", None)
        if isinstance(name, str) and name:
            return shorten(name)
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


_HASH_BLOCK = 1 << 20
_file_hashes: dict[tuple, str] = {}  # (real path, size, mtime) -> sha256 hex digest
_file_hashes_lock = threading.Lock()
_FILE_HASHES_KEPT = 4096


def _sha256_stream(read: Any) -> str:
    h = hashlib.sha256()
    while True:
        block = read(_HASH_BLOCK)
        if not block:
            return h.hexdigest()
        h.update(block)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a local file's bytes (what `sha256sum` prints). Remembered per (path, size, mtime), so a
    file asked about many times is read once per process."""
    real = os.path.realpath(os.fspath(path))
    st = os.stat(real)
    identity = (real, st.st_size, st.st_mtime_ns)
    with _file_hashes_lock:
        known = _file_hashes.get(identity)
    if known is not None:
        return known
    with open(real, "rb") as f:
        digest = _sha256_stream(f.read)
    with _file_hashes_lock:
        if len(_file_hashes) >= _FILE_HASHES_KEPT:
            _file_hashes.clear()
        _file_hashes[identity] = digest
    return digest


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

    def sha256(self) -> str:
        """SHA-256 of the bytes (the file's, the download's, the data URL's payload), without moving the read
        position of a file object."""
        if self.path is not None:
            return file_sha256(self.path)
        assert self.fileobj is not None
        pos = self.fileobj.tell()
        try:
            self.fileobj.seek(0)
            return _sha256_stream(self.fileobj.read)
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
def open_media(source: Any, *, max_bytes: int | None, timeout: float | None,
               url_policy: UrlPolicy | None = None) -> Iterator[OpenedMedia]:
    """Open a path / URL / data URL / bytes / file-like as a local path or a seekable file object.

    ``max_bytes`` limits what has to be copied (downloads, data URLs, bytes, file-likes); local files
    are read in place and are not limited (a server that accepts untrusted sources should refuse local
    paths itself). ``timeout`` is the deadline in seconds for a whole download. ``url_policy``: which
    hosts http(s) URLs may reach (default :data:`LIBRARY_URL_POLICY`: any host, as the caller is the
    program itself; a server passes a stricter :class:`UrlPolicy`).
    Raises :class:`MediaError` (or a subclass) with a one-line message naming the source.
    """
    opened = open_source(source, max_bytes=max_bytes, timeout=timeout, url_policy=url_policy)
    try:
        yield opened
    finally:
        opened.close()


def open_source(source: Any, *, max_bytes: int | None, timeout: float | None,
                url_policy: UrlPolicy | None = None) -> OpenedMedia:
    """Like :func:`open_media` without the context manager: the caller must call ``close()``."""
    return _open(source, max_bytes=max_bytes, timeout=timeout, url_policy=url_policy or LIBRARY_URL_POLICY)


def _open(source: Any, *, max_bytes: int | None, timeout: float | None, url_policy: UrlPolicy) -> OpenedMedia:
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
            spool = fetch_url(source, desc, policy=url_policy, max_bytes=max_bytes, timeout=timeout)
            return _spooled(desc, spool)
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
        check_limit(desc, len(data), max_bytes)
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

    return _spooled(desc, copy_limited(read, desc, max_bytes))


def _open_data_url(url: str, desc: str, *, max_bytes: int | None) -> OpenedMedia:
    comma = url.find(",")
    if comma < 0:
        raise MediaError(f"{desc}: malformed data URL (no ',')")
    header, payload = url[5:comma], url[comma + 1 :]
    if header.lower().endswith(";base64"):
        # Estimate before decoding: a 2 GB base64 string must not be decoded just to be refused.
        check_limit(desc, len(payload) * 3 // 4 - 2, max_bytes)
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
    check_limit(desc, len(data), max_bytes)
    if not data:
        raise MediaError(f"{desc}: empty data URL")
    return OpenedMedia(desc, fileobj=io.BytesIO(data), size=len(data))


def _spooled(desc: str, spool: Any) -> OpenedMedia:
    size = spool.seek(0, io.SEEK_END)
    spool.seek(0)
    return OpenedMedia(desc, fileobj=spool, size=size, _owned=[spool])
