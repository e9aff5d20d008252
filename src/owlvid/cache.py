"""Visual feature cache: encode an image or video once, ask many questions about it.

Entries are keyed by content (a hash of the preprocessed pixels, or of a media file's identity plus
the sampling settings) and the model, kept in memory under an LRU byte budget and, optionally, on disk
as safetensors files (atomic renames, so concurrent processes can share a cache directory).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import SafetensorError

log = logging.getLogger("owlvid.cache")


def content_key(*parts: object) -> str:
    """A stable hex digest of tensors, bytes and plain values."""
    h = hashlib.blake2b(digest_size=20)
    for part in parts:
        if isinstance(part, torch.Tensor):
            t = part.detach().contiguous().cpu()
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(part, (bytes, bytearray, memoryview)):
            h.update(bytes(part))
        else:
            h.update(repr(part).encode())
        h.update(b"\x00")
    return h.hexdigest()


def file_identity(path: str | os.PathLike) -> tuple:
    """Cheap identity of a local file (no full read): resolved path, size and modification time."""
    st = os.stat(path)
    return (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


class PreparedVideo:
    """What every prepared video offers, whatever holds its pixels: decoded frames (`FrameList`), frames
    decoded later while the model encodes them (`owlvid.pipeline.StreamedVideo`), or embeddings already
    in the visual cache (`CachedVideo`). Code that handles videos uses these attributes, never `len()`.

    `num_frames`: frames the model sees; `cache_key`: file identity + sampling settings (None when
    unknown); `indices` / `timestamps`: source frame numbers and their times in seconds, where known."""

    cache_key: str | None = None
    indices: list[int] | None = None
    timestamps: list[float] | None = None

    @property
    def num_frames(self) -> int:
        raise NotImplementedError


class FrameList(list, PreparedVideo):
    """Decoded video frames (PIL images) with their cache key and, from a decoder, their source indices."""

    def __init__(self, frames, cache_key: str | None = None, indices: list[int] | None = None,
                 timestamps: list[float] | None = None) -> None:
        super().__init__(frames)
        self.cache_key = cache_key
        self.indices = None if indices is None else list(indices)
        self.timestamps = None if timestamps is None else list(timestamps)

    @property
    def num_frames(self) -> int:
        return len(self)


class CachedVideo(PreparedVideo):
    """A video whose image embeddings are already in the visual cache: nothing to decode or encode."""

    def __init__(self, cache_key: str, num_frames: int) -> None:
        self.cache_key = cache_key
        self._num_frames = num_frames

    @property
    def num_frames(self) -> int:
        return self._num_frames

    def __repr__(self) -> str:
        return f"CachedVideo({self.cache_key!r}, num_frames={self._num_frames})"


class VisualCache:
    """LRU cache of tensors (image embeddings per media item) with an optional disk tier."""

    def __init__(self, max_bytes: int = 2 << 30, cache_dir: str | os.PathLike | None = None,
                 disk_max_bytes: int = 20 << 30) -> None:
        self.max_bytes = max_bytes
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.disk_max_bytes = disk_max_bytes
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        if self.cache_dir:
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return value
        value = self._disk_get(key)
        with self._lock:
            if value is None:
                self.misses += 1
                return None
            self.hits += 1
        self._memory_put(key, value)
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        self._memory_put(key, value)
        self._disk_put(key, value)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def _memory_put(self, key: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.numel() * old.element_size()
            self._items[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes and self._items:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.numel() * evicted.element_size()

    # -- disk tier ---------------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        return self.cache_dir / f"{key}.safetensors"

    def _disk_get(self, key: str) -> torch.Tensor | None:
        if not self.cache_dir:
            return None
        from safetensors.torch import load_file

        path = self._path(key)
        try:
            value = load_file(str(path))["value"]
        except FileNotFoundError:  # not cached (or evicted by another process)
            return None
        except (OSError, KeyError, ValueError, RuntimeError, SafetensorError) as e:
            # Writers rename complete files into place, so this is damage from outside: drop the entry.
            log.warning("visual cache: ignoring and deleting corrupt entry %s (%s)", path, e or type(e).__name__)
            try:
                path.unlink()
            except OSError:
                pass
            return None
        try:
            os.utime(path)  # recently used: evicted last
        except OSError:  # evicted by another process meanwhile: the value is still good
            pass
        return value

    def _disk_put(self, key: str, value: torch.Tensor) -> None:
        if not self.cache_dir:
            return
        from safetensors.torch import save_file

        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, suffix=".tmp")
        os.close(fd)
        try:
            save_file({"value": value.detach().contiguous().cpu()}, tmp)
            os.replace(tmp, self._path(key))  # atomic: readers see the old file or the whole new one
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._disk_evict()

    def _disk_evict(self) -> None:
        files = []
        for p in self.cache_dir.glob("*.safetensors"):
            try:
                st = p.stat()
                files.append((st.st_mtime, st.st_size, p))
            except OSError:  # removed by another process meanwhile
                continue
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.disk_max_bytes:
                break
            try:
                path.unlink()
            except OSError:
                pass
            total -= size
