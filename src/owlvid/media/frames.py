"""Frame sources read as a video: a directory of images, a list of frames, or a T x H x W x C array."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from PIL import Image

from owlvid.errors import MediaError

from .base import warn_or_raise
from .image import array_to_image, load_image
from .sources import UrlPolicy

__all__ = ["FRAME_IMAGE_EXTENSIONS", "FrameListReader", "frame_list_reader", "list_frame_files"]

FRAME_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _natural_key(name: str) -> tuple:
    # "frame_2" < "frame_10": digit runs compare as numbers, the rest case-insensitively.
    return tuple((0, int(p), p) if p.isdigit() else (1, p.lower(), p) for p in re.split(r"(\d+)", name) if p)


def list_frame_files(directory: str | os.PathLike) -> list[str]:
    """Frame image files of a directory in natural order (``frame_2`` before ``frame_10``)."""
    names = [n for n in os.listdir(directory)
             if not n.startswith(".") and os.path.splitext(n)[1].lower() in FRAME_IMAGE_EXTENSIONS]
    names.sort(key=_natural_key)
    return [os.path.join(directory, n) for n in names if os.path.isfile(os.path.join(directory, n))]



class FrameListReader:
    """A directory of images, a list of frames or a T x H x W x C array, read lazily as a video."""

    backend = "frames"
    variable_frame_rate = False

    def __init__(self, items: Sequence[Any], loader: Callable[[Any], Image.Image], fps: float,
                 description: str, size_fn, skip_bad: bool) -> None:
        self._items, self._loader, self._size_fn, self._skip = items, loader, size_fn, skip_bad
        self.description = description
        self.total_frames = len(items)
        self.avg_fps = fps
        self.duration = self.total_frames / fps

    def frame_times(self) -> None:
        return None

    def read(self, wanted: list[int]) -> Iterator[tuple[int, float, Image.Image]]:
        for idx in wanted:
            try:
                img = self._loader(self._items[idx])
            except MediaError as e:
                warn_or_raise(self._skip, f"{self.description}: frame {idx}: {e}")
                continue
            if self._size_fn is not None:
                target = self._size_fn(img.width, img.height)
                if target != img.size:
                    img = img.resize(target, Image.Resampling.BICUBIC)
            yield idx, idx / self.avg_fps, img

    def close(self) -> None:
        pass


def frame_list_reader(source: Any, desc: str, fps: float, size_fn, skip_bad: bool,
                       max_pixels: int | None, max_bytes: int | None,
                       timeout: float | None, url_policy: UrlPolicy | None) -> FrameListReader:
    def load_item(item: Any) -> Image.Image:
        return load_image(item, max_pixels=max_pixels, max_bytes=max_bytes, timeout=timeout,
                          url_policy=url_policy)

    if isinstance(source, (str, os.PathLike)):
        files = list_frame_files(source)
        if not files:
            exts = ", ".join(FRAME_IMAGE_EXTENSIONS)
            raise MediaError(f"{desc}: directory contains no frame images ({exts})")
        return FrameListReader(files, load_item, fps, f"{desc} ({len(files)} frames)", size_fn, skip_bad)
    if isinstance(source, (list, tuple)):
        if not source:
            raise MediaError(f"{desc}: empty frame list")
        return FrameListReader(list(source), load_item, fps, desc, size_fn, skip_bad)
    # numpy array / torch tensor: T x H x W x C (or T x C x H x W)
    shape = tuple(getattr(source, "shape", ()))
    if len(shape) != 4:
        raise MediaError(f"{desc}: a video array must be T x H x W x 3 (or T x 3 x H x W), got shape {shape}")
    if shape[0] == 0:
        raise MediaError(f"{desc}: video array has no frames")
    return FrameListReader(source, lambda a: array_to_image(a, desc), fps, desc, size_fn, skip_bad)
