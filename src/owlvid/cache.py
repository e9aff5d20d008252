"""Visual feature cache: encode an image or video once, ask many questions about it.

Entries are keyed by content (a hash of the preprocessed pixels, or of a media file's identity plus
the sampling settings) and the model, kept in memory under an LRU byte budget and, optionally, on disk
as safetensors files (atomic renames, so concurrent processes can share a cache directory).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

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


IMAGE_SOURCE = "owlvid.source"  # Image.info keys set by `messages.load_image_source`
IMAGE_DECODE_S = "owlvid.decode_s"


def image_record(image: Any) -> dict:
    """The audit record of an image a request used (see `Generation.media`): its source, the SHA-256 of
    the bytes it was decoded from (of its RGB pixels when it came as pixels: `hashed` says which), size and
    loading time."""
    from PIL import Image

    from .media.image import SHA256_INFO

    if not isinstance(image, Image.Image):
        return {"type": "image", "source": None, "sha256": None, "hashed": None, "decode_s": 0.0}
    info = image.info
    digest, hashed = info.get(SHA256_INFO), "bytes"
    if digest is None:
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        digest, hashed = hashlib.sha256(rgb.tobytes()).hexdigest(), "pixels"
    return {"type": "image", "source": info.get(IMAGE_SOURCE), "sha256": digest, "hashed": hashed,
            "width": image.width, "height": image.height, "decode_s": info.get(IMAGE_DECODE_S, 0.0)}


class VisualCache:
    """LRU cache of tensors (image embeddings per media item) with an optional disk tier."""

    def __init__(self, max_bytes: int = 2 << 30, cache_dir: str | os.PathLike | None = None,
                 disk_max_bytes: int = 20 << 30) -> None:
        self.max_bytes = max_bytes
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.disk_max_bytes = disk_max_bytes
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._notes: dict[str, dict] = {}  # key -> small JSON-able facts kept with the entry (see `note`)
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
        value, note = self._disk_get(key)
        with self._lock:
            if value is None:
                self.misses += 1
                return None
            self.hits += 1
        self._memory_put(key, value, note)
        return value

    def put(self, key: str, value: torch.Tensor, note: dict | None = None) -> None:
        """Keep `value` under `key`, with an optional `note` (JSON-able facts about it, kept as long as the
        entry, on disk too)."""
        self._memory_put(key, value, note)
        self._disk_put(key, value, note)

    def note(self, key: str) -> dict | None:
        """The note stored with an entry (after `get` found it), or None."""
        with self._lock:
            return self._notes.get(key)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._notes.clear()
            self._bytes = 0

    def _memory_put(self, key: str, value: torch.Tensor, note: dict | None = None) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.numel() * old.element_size()
            self._items[key] = value
            if note is not None:
                self._notes[key] = note
            self._bytes += size
            while self._bytes > self.max_bytes and self._items:
                gone, evicted = self._items.popitem(last=False)
                self._notes.pop(gone, None)
                self._bytes -= evicted.numel() * evicted.element_size()

    # -- disk tier ---------------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        return self.cache_dir / f"{key}.safetensors"

    def _disk_get(self, key: str) -> tuple[torch.Tensor | None, dict | None]:
        if not self.cache_dir:
            return None, None
        from safetensors import safe_open

        path = self._path(key)
        try:
            with safe_open(str(path), framework="pt") as f:
                value = f.get_tensor("value")
                note_text = (f.metadata() or {}).get("owlvid_note")
            note = json.loads(note_text) if note_text else None
        except FileNotFoundError:  # not cached (or evicted by another process)
            return None, None
        except (OSError, KeyError, ValueError, RuntimeError, SafetensorError) as e:
            # Writers rename complete files into place, so this is damage from outside: drop the entry.
            log.warning("visual cache: ignoring and deleting corrupt entry %s (%s)", path, e or type(e).__name__)
            try:
                path.unlink()
            except OSError:
                pass
            return None, None
        try:
            os.utime(path)  # recently used: evicted last
        except OSError:  # evicted by another process meanwhile: the value is still good
            pass
        return value, note if isinstance(note, dict) else None

    def _disk_put(self, key: str, value: torch.Tensor, note: dict | None = None) -> None:
        if not self.cache_dir:
            return
        from safetensors.torch import save_file

        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, suffix=".tmp")
        os.close(fd)
        try:
            metadata = {"owlvid_note": json.dumps(note)} if note is not None else None
            save_file({"value": value.detach().contiguous().cpu()}, tmp, metadata=metadata)
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
