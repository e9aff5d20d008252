"""Image loading: any supported source → an RGB ``PIL.Image.Image`` in display orientation."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from owlvid.errors import MediaError

from .sources import (
    DEFAULT_IMAGE_MAX_BYTES,
    DEFAULT_IMAGE_TIMEOUT,
    MediaTooLargeError,
    UrlPolicy,
    describe_source,
    is_bytes_source,
    open_media,
    sniff_kind,
)

__all__ = ["DEFAULT_MAX_PIXELS", "IMAGE_FORMATS", "load_image", "to_rgb", "array_to_image"]

# Pillow's own hard limit (2 * Image.MAX_IMAGE_PIXELS): a 13k x 13k image, far beyond any model input.
DEFAULT_MAX_PIXELS = 178_956_970
# Formats we let Pillow open. Pillow knows ~40 formats; the rarely used ones are attack surface only.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG includes MPO (phone photos)
_WHITE = (255, 255, 255)
SHA256_INFO = "owlvid.sha256"  # Image.info key: SHA-256 of the bytes an image was decoded from


def load_image(
    source: Any,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_bytes: int | None = DEFAULT_IMAGE_MAX_BYTES,
    timeout: float | None = DEFAULT_IMAGE_TIMEOUT,
    url_policy: UrlPolicy | None = None,
) -> Image.Image:
    """Load an image as RGB with EXIF orientation applied.

    ``source``: a path (str / ``pathlib.Path``), ``http(s)://`` URL, ``data:`` URL, ``bytes``, binary
    file-like, ``PIL.Image.Image``, numpy array or torch tensor (HxW, HxWxC or CxHxW; uint8, or float in
    [0, 1]). ``url_policy``: which hosts an http(s) URL may reach (see :class:`UrlPolicy`; default: any).
    Transparent images are composited on white; 16-bit images are scaled to 8 bits.
    Raises :class:`owlvid.errors.MediaError` with a one-line reason.
    """
    desc = describe_source(source)
    if isinstance(source, Image.Image):
        _check_pixels(desc, source.width, source.height, max_pixels)
        return _finish(source, desc)
    if _is_array(source):
        img = array_to_image(source, desc)
        _check_pixels(desc, img.width, img.height, max_pixels)
        return img
    if not is_bytes_source(source):
        raise MediaError(f"{desc}: unsupported image source type {type(source).__name__}")
    with open_media(source, max_bytes=max_bytes, timeout=timeout, url_policy=url_policy) as opened:
        target = opened.path if opened.path is not None else opened.fileobj
        img = _decode(target, desc, max_pixels, opened.head)
        img.info[SHA256_INFO] = opened.sha256()  # what the image's bytes were (audits, reproducibility)
        return img


def _decode(target: Any, desc: str, max_pixels: int | None, head) -> Image.Image:
    with warnings.catch_warnings():
        # Our max_pixels check below is the single authority; Pillow's warning band (89M-179M
        # pixels) would otherwise leak a warning for images the caller explicitly allowed.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(target, formats=IMAGE_FORMATS)
        except Image.DecompressionBombError as e:
            raise MediaTooLargeError(f"{desc}: image too large ({e})") from None
        except UnidentifiedImageError:
            kind = sniff_kind(head())
            what = f"a {kind}" if kind else "not a recognised image"
            raise MediaError(
                f"{desc}: cannot read image ({what}; supported: JPEG, PNG, WebP, GIF, BMP, TIFF)"
            ) from None
        except (OSError, ValueError, SyntaxError) as e:
            raise MediaError(f"{desc}: cannot read image ({e})") from None
    with img:
        _check_pixels(desc, img.width, img.height, max_pixels)
        try:
            img.load()  # decode now, inside the try: truncation shows up here, not later in a model
        except Image.DecompressionBombError as e:
            raise MediaTooLargeError(f"{desc}: image too large ({e})") from None
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise MediaError(f"{desc}: corrupt or truncated {img.format or ''} image ({e})") from None
        return _finish(img, desc)


def _check_pixels(desc: str, width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise MediaTooLargeError(
            f"{desc}: image too large: {width}x{height} = {width * height} pixels > max_pixels={max_pixels}"
        )


def _finish(img: Image.Image, desc: str) -> Image.Image:
    try:
        oriented = ImageOps.exif_transpose(img)
    except Exception as e:  # noqa: BLE001 - a broken EXIF block must not make the image unusable
        warnings.warn(f"{desc}: ignoring unreadable EXIF orientation ({e})", stacklevel=3)
        oriented = img
    out = to_rgb(oriented if oriented is not None else img, desc)
    if out is img:  # never hand back the caller's own object: they may mutate or close it
        out = out.copy()
    return out


def to_rgb(img: Image.Image, desc: str = "image") -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Alpha (RGBA, LA, PA, P/L/RGB with a ``transparency`` key) is composited on white, which is how a
    transparent image looks on a page; Pillow's plain ``convert("RGB")`` would instead expose whatever
    colour the transparent pixels happen to store (often black). 16-bit and 32-bit integer modes are
    scaled (65535 → 255) instead of clipped; float images are taken as 0..1 when all values are within
    [0, 1], else as 0..255.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(img).astype(np.int64)
        # 16-bit data (PNG/TIFF); "I" (int32) from a 16-bit PNG holds the same 0..65535 range.
        a = np.clip(a, 0, 65535)
        g = ((a * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)
        return Image.fromarray(np.repeat(g[..., None], 3, axis=2), "RGB")
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        finite = a[np.isfinite(a)]
        scale = 255.0 if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0 else 1.0
        g = np.clip(np.nan_to_num(a * scale), 0, 255).round().astype(np.uint8)
        return Image.fromarray(np.repeat(g[..., None], 3, axis=2), "RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        try:
            rgba = img.convert("RGBA")
        except (ValueError, OSError) as e:
            raise MediaError(f"{desc}: cannot convert image mode {mode} to RGB ({e})") from None
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        # 1, L, P, CMYK, YCbCr, LAB, HSV: Pillow's conversion is the reference (and what the official
        # model code does with .convert("RGB")), so stay identical to it.
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise MediaError(f"{desc}: cannot convert image mode {mode} to RGB ({e})") from None


def _is_array(x: Any) -> bool:
    if isinstance(x, np.ndarray):
        return True
    mod = type(x).__module__
    return mod.startswith("torch") and hasattr(x, "detach")


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    t = x.detach()
    if getattr(t, "device", None) is not None and t.device.type != "cpu":
        t = t.cpu()
    if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16
        t = t.float()
    return t.numpy()


def array_to_image(x: Any, desc: str | None = None) -> Image.Image:
    """A numpy array / torch tensor image to RGB PIL.

    Layouts: HxW (gray), HxWxC or CxHxW with C in {1, 3, 4} (channels-last wins when both fit).
    dtypes: uint8 as is; bool; float in [0, 1] (scaled by 255 and rounded); uint16 scaled to 8 bits.
    4 channels are RGBA and composited on white.
    """
    desc = desc or describe_source(x)
    a = _as_numpy(x)
    if a.ndim == 3 and a.shape[-1] not in (1, 3, 4) and a.shape[0] in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # CHW -> HWC
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise MediaError(f"{desc}: expected an image array HxW, HxWx3/4 or 3/4xHxW, got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise MediaError(f"{desc}: empty image array {a.shape}")
    a = _to_uint8(a, desc)
    if a.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(a), "L").convert("RGB")
    if a.shape[-1] == 4:
        return to_rgb(Image.fromarray(np.ascontiguousarray(a), "RGBA"), desc)
    return Image.fromarray(np.ascontiguousarray(a), "RGB")


def _to_uint8(a: np.ndarray, desc: str) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype == np.uint16:
        return ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise MediaError(f"{desc}: image array contains NaN or infinity")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0.0 or hi > 1.0:
            raise MediaError(
                f"{desc}: float image array must be in [0, 1] (got {lo:.3g}..{hi:.3g}); pass uint8 for 0..255"
            )
        return np.round(a.astype(np.float64) * 255.0).astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer):
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 255:
            raise MediaError(f"{desc}: integer image array must be in 0..255 (got {lo}..{hi})")
        return a.astype(np.uint8)
    raise MediaError(f"{desc}: unsupported image array dtype {a.dtype}")

