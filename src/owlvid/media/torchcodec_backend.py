"""Optional ``backend="torchcodec"``: frames decoded by TorchCodec, numbered exactly like the PyAV backend.

The frame count, frame rate and per-frame times come from the same PyAV time model as the default backend
(:class:`~owlvid.media.pyav_backend.PyAVStream`: MP4 sample table or a demux-only packet scan, no decoder
set up, nothing decoded), so both backends select the same frames;
TorchCodec (``seek_mode="exact"``) only decodes them. TorchCodec is imported lazily: without it, asking
for this backend raises a :class:`MediaError` that says how to install it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from owlvid.errors import MediaError

from .pyav_backend import PyAVStream
from .sources import OpenedMedia

_BATCH = 16  # frames per get_frames_at call: bounds the uint8 batch tensor TorchCodec allocates


def _import_decoder():
    try:
        from torchcodec.decoders import VideoDecoder
    except Exception as e:  # noqa: BLE001 - ImportError, or OSError/RuntimeError when its FFmpeg/torch libs mismatch
        raise MediaError(
            "backend='torchcodec' needs the torchcodec package and FFmpeg shared libraries "
            f"(pip install torchcodec; see https://github.com/pytorch/torchcodec): {type(e).__name__}: "
            + " ".join(str(e).split())[:200]
        ) from None
    return VideoDecoder


class TorchCodecReader:
    """Same interface as the PyAV reader (``total_frames``, ``avg_fps``, ``duration``,
    ``variable_frame_rate``, ``frame_times()``, ``read(wanted)``, ``close()``)."""

    backend = "torchcodec"

    def __init__(self, opened: OpenedMedia, *, size_fn, skip_bad: bool) -> None:
        video_decoder = _import_decoder()
        probe = PyAVStream(opened, skip_bad=skip_bad)  # the time model only: nothing is decoded by PyAV
        try:
            self.description = probe.description
            self.total_frames = probe.total_frames
            self.avg_fps = probe.avg_fps
            self.duration = probe.duration
            self._times = probe.frame_times()
            self.variable_frame_rate = probe.variable_frame_rate
        finally:
            probe.close()
        self._size_fn, self._skip = size_fn, skip_bad
        if opened.path is not None:
            src: Any = opened.path
        else:
            assert opened.fileobj is not None
            opened.rewind()
            src = opened.fileobj.read()  # TorchCodec takes bytes or real files, not spooled temp files
        try:
            self._decoder = video_decoder(src, seek_mode="exact", dimension_order="NHWC",
                                          num_ffmpeg_threads=0)
        except Exception as e:  # noqa: BLE001 - TorchCodec raises RuntimeError/ValueError for bad input
            raise MediaError(f"{self.description}: torchcodec cannot open the video ({_reason(e)})") from None
        meta = self._decoder.metadata
        self._t0 = float(meta.begin_stream_seconds or 0.0)
        if meta.num_frames is not None and meta.num_frames != self.total_frames:
            warnings.warn(f"{self.description}: torchcodec counts {meta.num_frames} frames, the probe "
                          f"{self.total_frames}", stacklevel=3)
            self.total_frames = min(self.total_frames, int(meta.num_frames))
        self._rotation = int(round(meta.rotation or 0)) % 360

    def frame_times(self) -> np.ndarray | None:
        return self._times

    def read(self, wanted: list[int]) -> Iterator[tuple[int, float, Image.Image]]:
        for start in range(0, len(wanted), _BATCH):
            chunk = wanted[start : start + _BATCH]
            try:
                batch = self._decoder.get_frames_at(indices=chunk)
                items = list(zip(chunk, batch.data.numpy(), batch.pts_seconds.tolist(), strict=True))
            except Exception as e:  # noqa: BLE001
                if not self._skip:
                    raise MediaError(f"{self.description}: torchcodec failed to decode frames "
                                     f"{chunk[0]}..{chunk[-1]} ({_reason(e)})") from None
                items = list(self._one_by_one(chunk))
            for idx, arr, pts in items:
                yield idx, pts - self._t0, self._to_image(arr)

    def _one_by_one(self, chunk: list[int]):
        for idx in chunk:
            try:
                frame = self._decoder.get_frame_at(idx)
            except Exception as e:  # noqa: BLE001
                warnings.warn(f"{self.description}: frame {idx} could not be decoded ({_reason(e)}) "
                              "(skipped: skip_bad_frames=True)", stacklevel=4)
                continue
            yield idx, frame.data.numpy(), float(frame.pts_seconds)

    def _to_image(self, arr: np.ndarray) -> Image.Image:
        img = Image.fromarray(np.ascontiguousarray(arr), "RGB")
        # TorchCodec (0.13 checked) returns frames in display orientation and reports display width/height;
        # should a version return the coded orientation, turn it here (counter-clockwise degrees, as
        # FFmpeg's display matrix).
        meta = self._decoder.metadata
        coded = (meta.height, meta.width)
        if self._rotation in (90, 270) and meta.width != meta.height and img.size == coded:
            turn = Image.Transpose.ROTATE_90 if self._rotation == 90 else Image.Transpose.ROTATE_270
            img = img.transpose(turn)
        if self._size_fn is not None:
            target = self._size_fn(img.width, img.height)
            if target != img.size:
                img = img.resize(target, Image.Resampling.BICUBIC)
        return img

    def close(self) -> None:
        self._decoder = None


def _reason(e: Exception) -> str:
    return f"{type(e).__name__}: " + " ".join(str(e).split())[:200]
