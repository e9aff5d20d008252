"""Image loading: formats, mode conversions, EXIF orientation, limits."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from owlvid.errors import MediaError
from owlvid.media import MediaTooLargeError, load_image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def px(img: Image.Image, xy) -> tuple[int, int, int]:
    assert img.mode == "RGB"
    return img.getpixel(xy)


def gradient(w: int = 40, h: int = 30) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 6, y * 8, (x + y) * 3], axis=-1).astype(np.uint8)


# ------------------------------------------------------------------------------------- formats

@pytest.mark.parametrize(("fmt", "kw"), [("PNG", {}), ("WEBP", {"lossless": True}), ("BMP", {}), ("TIFF", {}),
                                         ("TIFF", {"compression": "tiff_lzw"})])
def test_lossless_formats_round_trip_exactly(fmt, kw):
    a = gradient()
    img = load_image(encode(Image.fromarray(a), fmt, **kw))
    assert img.mode == "RGB" and np.array_equal(np.asarray(img), a)


def test_jpeg():
    a = gradient()
    img = load_image(encode(Image.fromarray(a), "JPEG", quality=95))
    assert img.size == (40, 30)
    assert np.abs(np.asarray(img, np.int16) - a).mean() < 3


def test_gif_first_frame():
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    data = encode(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert px(load_image(data), (4, 4)) == (255, 0, 0)


def test_wrong_extension_is_ignored(tmp_path):
    path = tmp_path / "picture.jpg"
    path.write_bytes(encode(Image.fromarray(gradient()), "PNG"))
    assert np.array_equal(np.asarray(load_image(path)), gradient())
    assert np.array_equal(np.asarray(load_image(str(path))), gradient())


# --------------------------------------------------------------------------------- conversions

def test_rgba_is_composited_on_white():
    a = np.zeros((2, 3, 4), np.uint8)
    a[0, 0] = (255, 0, 0, 255)  # opaque red
    a[0, 1] = (255, 0, 0, 0)  # fully transparent red -> white
    a[0, 2] = (0, 0, 0, 128)  # half-transparent black -> mid gray
    a[1, :] = (0, 0, 255, 0)  # transparent blue -> white
    img = load_image(encode(Image.fromarray(a, "RGBA"), "PNG"))
    assert px(img, (0, 0)) == (255, 0, 0)
    assert px(img, (1, 0)) == (255, 255, 255)
    assert px(img, (2, 0)) == (127, 127, 127)
    assert px(img, (0, 1)) == (255, 255, 255)


def test_palette_with_transparency():
    p = Image.new("P", (4, 1))
    p.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    p.putdata([0, 1, 2, 1])
    p.info["transparency"] = 1  # palette entry 1 (red) is transparent
    for fmt in ("PNG", "GIF"):
        img = load_image(encode(p, fmt, transparency=1))
        white = (255, 255, 255)
        assert [px(img, (x, 0)) for x in range(4)] == [(0, 0, 0), white, (0, 255, 0), white]


def test_la_l_and_1():
    la = Image.fromarray(np.array([[[100, 255], [100, 0]]], np.uint8), "LA")
    img = load_image(encode(la, "PNG"))
    assert px(img, (0, 0)) == (100, 100, 100) and px(img, (1, 0)) == (255, 255, 255)
    gray = load_image(encode(Image.fromarray(np.array([[0, 77, 255]], np.uint8), "L"), "PNG"))
    assert [px(gray, (x, 0)) for x in range(3)] == [(0, 0, 0), (77, 77, 77), (255, 255, 255)]
    bw = Image.new("1", (2, 1))
    bw.putpixel((1, 0), 1)
    img = load_image(encode(bw, "PNG"))
    assert [px(img, (x, 0)) for x in range(2)] == [(0, 0, 0), (255, 255, 255)]


def test_cmyk_matches_pillow_conversion():
    cmyk = Image.fromarray(np.array([[[0, 255, 255, 0], [0, 0, 0, 255], [0, 0, 0, 0]]], np.uint8), "CMYK")
    img = load_image(encode(cmyk, "JPEG", quality=100))
    ref = Image.open(io.BytesIO(encode(cmyk, "JPEG", quality=100))).convert("RGB")
    assert np.array_equal(np.asarray(img), np.asarray(ref))
    r, g, b = px(img, (0, 0))
    assert r > 200 and g < 50 and b < 50  # C=0 M=255 Y=255 K=0 is red


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grayscale_is_scaled_not_clipped(fmt):
    a = np.array([[0, 257, 32896, 65535, 1000]], np.uint16)
    src = Image.fromarray(a)
    assert src.mode == "I;16"
    img = load_image(encode(src, fmt))
    # round(v * 255 / 65535): 257 -> 1, 32896 -> 128, 1000 -> 4; Pillow's convert would clip to 255
    assert [px(img, (x, 0)) for x in range(5)] == [(0,) * 3, (1,) * 3, (128,) * 3, (255,) * 3, (4,) * 3]


def test_16_bit_rgb_png():
    # a hand-made 16-bit RGB PNG: Pillow keeps the high byte of each sample
    w, h = 2, 1
    raw = b"".join(b"\x00" + struct.pack(">HHH", 65535, 32768, 0) * w for _ in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    assert px(load_image(png), (0, 0)) == (255, 128, 0)


def test_exif_orientation_6_is_applied():
    a = np.zeros((32, 64, 3), np.uint8)
    a[:, :32] = (255, 0, 0)  # stored: left half red, right half blue
    a[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(Image.fromarray(a), "JPEG", quality=95, exif=exif.tobytes())
    img = load_image(data)
    assert img.size == (32, 64)  # portrait after rotation
    r, g, b = px(img, (16, 8))  # stored left (red) is now on top
    assert r > 200 and b < 60
    r, g, b = px(img, (16, 56))
    assert b > 200 and r < 60
    # a PIL image that still carries the tag is oriented too
    img2 = load_image(Image.open(io.BytesIO(data)))
    assert img2.size == (32, 64)


def test_array_and_tensor_inputs():
    a = gradient()
    assert np.array_equal(np.asarray(load_image(a)), a)
    assert np.array_equal(np.asarray(load_image(np.moveaxis(a, -1, 0))), a)  # CHW
    assert np.array_equal(np.asarray(load_image(a.astype(np.float32) / 255.0)), a)
    gray = load_image(a[..., 0])
    assert px(gray, (1, 0)) == (6, 6, 6)
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(np.moveaxis(a, -1, 0).copy())
    assert np.array_equal(np.asarray(load_image(t)), a)
    assert np.array_equal(np.asarray(load_image(t.float() / 255.0)), a)
    with pytest.raises(MediaError, match=r"float image array must be in \[0, 1\]"):
        load_image(a.astype(np.float32))
    with pytest.raises(MediaError, match="expected an image array"):
        load_image(np.zeros((2, 3, 4, 5), np.uint8))


def test_pil_input_is_converted_and_not_aliased():
    src = Image.new("RGB", (3, 3), (1, 2, 3))
    out = load_image(src)
    assert out is not src and px(out, (0, 0)) == (1, 2, 3)
    assert px(load_image(Image.new("RGBA", (2, 2), (0, 0, 0, 0))), (0, 0)) == (255, 255, 255)


# -------------------------------------------------------------------------------------- errors

def test_decompression_bomb_limits():
    big = encode(Image.new("L", (2000, 1000)), "PNG")
    with pytest.raises(MediaTooLargeError, match=r"2000x1000 = 2000000 pixels > max_pixels=1000000"):
        load_image(big, max_pixels=1_000_000)
    assert load_image(big, max_pixels=2_000_000).size == (2000, 1000)


def test_pillow_decompression_bomb_error_becomes_media_error():
    # a PNG header that claims 20000 x 20000 pixels (over Pillow's own hard limit), with no real data
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))
    with pytest.raises(MediaTooLargeError, match="too large"):
        load_image(png)  # our default limit
    with pytest.raises(MediaTooLargeError, match="too large"):
        load_image(png, max_pixels=None)  # Pillow's own DecompressionBombError, turned into a MediaError


def test_truncated_and_non_image_inputs(tmp_path):
    jpeg = encode(Image.fromarray(gradient(200, 200)), "JPEG")
    with pytest.raises(MediaError, match="corrupt or truncated JPEG image"):
        load_image(jpeg[: len(jpeg) // 2])
    with pytest.raises(MediaError, match="a MP4/MOV video"):
        load_image(b"\x00\x00\x00\x18ftypisom" + b"\0" * 100)
    with pytest.raises(MediaError, match="not a recognised image"):
        load_image(b"hello world, not an image")
    with pytest.raises(MediaError, match="file not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(MediaError, match="is a directory"):
        load_image(tmp_path)
    with pytest.raises(MediaTooLargeError, match="max_bytes=10"):
        load_image(jpeg, max_bytes=10)
    with pytest.raises(MediaError, match="unsupported image source type"):
        load_image(12345)
