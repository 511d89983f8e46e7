"""JPEG/PNG reader, the fast uint8 path and the intensity check, on a real shared JPEG and generated files."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscope.data.images import (
    MAX_IMAGE_PIXELS,
    check_intensity,
    is_dicom_file,
    read_image,
    read_image_bytes,
    resize_uint8,
    to_uint8,
)
from pneumoscope.data.intake import load_uint8
from pneumoscope.errors import ImageReadError, ImageTooLargeError, IntensityRangeError

REAL_JPEG = Path("chest_xray/train/NORMAL/IM-0115-0001.jpeg")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature + IHDR (8-bit grey) + IEND: claims a size, holds no pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def save(im: Image.Image, path: Path, **kw) -> Path:
    im.save(path, **kw)
    return path


def test_real_shared_jpeg(shared_data):
    path = shared_data / REAL_JPEG
    img, meta = read_image(path)
    assert img.shape == (224, 224) and img.dtype == np.float32
    assert 0.0 <= img.min() < 0.1 and 0.9 < img.max() <= 1.0
    with Image.open(path) as im:
        expected = np.asarray(im.convert("L"), dtype=np.float64) / 255
    np.testing.assert_allclose(img, expected, atol=1e-7)
    assert meta == {"format": "JPEG", "original_size": (224, 224), "bit_depth": 8, "warnings": []}


def test_16bit_png_keeps_values(tmp_path):
    pixels = np.array([[0, 1000, 256], [257, 40000, 65535]], dtype=np.uint16)
    path = save(Image.fromarray(pixels), tmp_path / "x16.png")
    with Image.open(path) as im:
        assert im.mode == "I;16"
    img, meta = read_image(path)
    np.testing.assert_allclose(img, pixels / 65535, rtol=1e-6)
    assert img[0, 1] == np.float32(1000) / np.float32(65535)
    assert img[0, 2] != img[1, 0]  # 256 and 257 stay apart: no trip through 8 bits
    assert meta["bit_depth"] == 16 and meta["format"] == "PNG" and meta["original_size"] == (2, 3)


def test_colour_modes_to_luma(tmp_path):
    rgb = Image.new("RGB", (5, 4), (200, 100, 50))
    img, meta = read_image(save(rgb, tmp_path / "rgb.png"))
    # BT.601: 0.299*200 + 0.587*100 + 0.114*50 = 124.2 -> 124 (Pillow's 8-bit "L")
    assert img.shape == (4, 5) and np.all(img == np.float32(124) / np.float32(255))
    assert meta["bit_depth"] == 8 and meta["warnings"] == []

    rgba = Image.new("RGBA", (5, 4), (200, 100, 50, 10))  # nearly transparent: alpha is dropped, not blended
    img, meta = read_image(save(rgba, tmp_path / "rgba.png"))
    assert np.all(img == np.float32(124) / np.float32(255)) and "alpha" in meta["warnings"][0]

    la = Image.new("LA", (3, 3), (77, 0))
    assert np.all(read_image(save(la, tmp_path / "la.png"))[0] == np.float32(77) / np.float32(255))

    pal = Image.new("P", (3, 3), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)  # index 1 = pure green
    assert np.all(read_image(save(pal, tmp_path / "p.png"))[0] == np.float32(150) / np.float32(255))  # 0.587*255

    bw = Image.new("1", (4, 2), 0)
    bw.putpixel((1, 1), 1)
    img, meta = read_image(save(bw, tmp_path / "bw.png"))
    assert img.sum() == 1.0 and img[1, 1] == 1.0 and meta["bit_depth"] == 1


def test_exif_orientation(tmp_path):
    stored = np.zeros((20, 40), np.uint8)  # h=20, w=40
    stored[:6, :6] = 255  # bright top-left corner as stored
    im = Image.fromarray(stored)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = save(im, tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    img, meta = read_image(path)
    assert img.shape == (40, 20) and meta["original_size"] == (40, 20)
    assert img[:6, -6:].mean() > 0.8 and img[:6, :6].mean() < 0.2  # the corner moved to the top right
    assert "EXIF orientation 6" in meta["warnings"][0]
    fast = load_uint8(path, 16)  # the fast path honours it too
    assert fast[:2, -2:].mean() > 150 and fast[:2, :2].mean() < 50


def test_broken_files(tmp_path, shared_data):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty.png: empty file"):
        read_image(empty)

    data = (shared_data / REAL_JPEG).read_bytes()
    cut = tmp_path / "cut.jpeg"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cut.jpeg.*truncated or corrupt"):
        read_image(cut)
    with pytest.raises(ImageReadError, match="cut.jpeg"):
        load_uint8(cut, 32)

    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    with pytest.raises(ImageReadError, match="notes.png: not a JPEG, PNG or DICOM image"):
        read_image(text)

    gif = save(Image.new("L", (4, 4)), tmp_path / "x.gif")  # other formats are not opened (smaller attack surface)
    with pytest.raises(ImageReadError, match="x.gif"):
        read_image(gif)

    with pytest.raises(ImageReadError, match="upload"):
        read_image_bytes(b"")
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "missing.png")


def test_too_large_refused_before_decoding(tmp_path, shared_data):
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header_only(9000, 9000))  # 81 M pixels > 64 M; holds no pixel data at all
    with pytest.raises(ImageTooLargeError, match=r"huge.png: 9000x9000 = 81,000,000 pixels exceeds .* 36,000,000"):
        read_image(huge)
    with pytest.raises(ImageTooLargeError, match="huge.png"):
        load_uint8(huge, 64)
    bomb = png_header_only(20000, 20000)  # beyond Pillow's own DecompressionBombError threshold
    with pytest.raises(ImageTooLargeError, match="bomb.png"):
        read_image_bytes(bomb, name="bomb.png", max_pixels=10**12)
    # between Pillow's warning threshold (~89 M) and a caller's larger limit: refused as well
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ImageTooLargeError, match="100,000,000 pixels"):
        read_image_bytes(png_header_only(10000, 10000), max_pixels=150_000_000)
    with pytest.raises(ImageTooLargeError, match="IM-0115-0001.jpeg: 224x224"):
        read_image(shared_data / REAL_JPEG, max_pixels=224 * 224 - 1)
    assert read_image(shared_data / REAL_JPEG, max_pixels=224 * 224)[0].shape == (224, 224)
    assert MAX_IMAGE_PIXELS == 36_000_000  # one limit for the CLI and the service (#18)


def test_check_intensity():
    ok = np.array([[0.0, 0.5], [1.0, 0.25]])
    out = check_intensity(ok)
    assert out.dtype == np.float32 and np.array_equal(out, ok.astype(np.float32))
    bad = {
        "nan": np.array([[0.0, np.nan]]),
        "inf": np.array([[0.0, np.inf]], np.float32),
        "above": np.array([[0.0, 1.0001]]),
        "below": np.array([[-0.01, 0.5]], np.float32),
        "3d": np.zeros((2, 2, 3), np.float32),
        "uint8": np.zeros((2, 2), np.uint8),
        "1d": np.zeros(4, np.float32),
    }
    for label, arr in bad.items():
        with pytest.raises(IntensityRangeError, match=f"scan-{label}"):
            check_intensity(arr, name=f"scan-{label}")


def test_bytes_equal_path(tmp_path, shared_data):
    for path in [shared_data / REAL_JPEG,
                 save(Image.fromarray(np.arange(1200, dtype=np.uint16).reshape(30, 40) * 50), tmp_path / "a.png")]:
        a, meta_a = read_image(path)
        b, meta_b = read_image_bytes(path.read_bytes(), name=path.name)
        np.testing.assert_array_equal(a, b)
        assert meta_a == meta_b


def test_is_dicom_file(tmp_path, shared_data):
    assert is_dicom_file(tmp_path / "x.DCM") and is_dicom_file("a/b.dicom")
    renamed = tmp_path / "noext"
    renamed.write_bytes((shared_data / "dicom" / "chest_cr_jpeg_baseline_siim.dcm").read_bytes())
    assert is_dicom_file(renamed)
    assert read_image(renamed)[1]["format"] == "DICOM"
    assert not is_dicom_file(shared_data / REAL_JPEG) and not is_dicom_file(tmp_path / "missing")


def test_to_uint8_and_resize():
    assert to_uint8(np.array([[0.0, 0.5 / 255, 0.51 / 255, 1.0]])).tolist() == [[0, 0, 1, 255]]
    flat = np.full((30, 50), 99, np.uint8)
    out = resize_uint8(flat, 16)
    assert out.shape == (16, 16) and out.dtype == np.uint8 and np.all(out == 99)
    ramp = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))  # 32x32, columns 0..248
    small = resize_uint8(ramp, 8)
    assert small.shape == (8, 8) and np.all(np.diff(small[0].astype(int)) > 0) and np.all(small == small[0])


def test_load_uint8_matches_read_image(tmp_path, shared_data):
    path = shared_data / REAL_JPEG
    for size in (224, 100, 64):  # 224 and 100: no DCT scale reduction (the image is < 4x larger)
        fast = load_uint8(path, size)
        exact = resize_uint8(to_uint8(read_image(path)[0]), size)
        assert fast.shape == (size, size) and fast.dtype == np.uint8
        assert np.abs(fast.astype(int) - exact).max() <= 2
    # a large JPEG decoded at a reduced DCT scale: close, not identical (see the load_uint8 docstring)
    rng = np.random.default_rng(0)
    grad = np.linspace(0, 200, 1600)[None, :] * np.linspace(0.3, 1, 1200)[:, None]
    big = save(Image.fromarray((grad + rng.normal(0, 4, grad.shape)).clip(0, 255).astype(np.uint8)),
               tmp_path / "big.jpg", quality=90)
    fast = load_uint8(big, 128)
    exact = resize_uint8(to_uint8(read_image(big)[0]), 128)
    diff = np.abs(fast.astype(int) - exact)
    assert diff.max() <= 3 and diff.mean() < 1.0
    # non-JPEG inputs take the exact path: identical results
    png = save(Image.fromarray((np.arange(4800, dtype=np.uint16).reshape(60, 80) * 13)), tmp_path / "p16.png")
    assert np.array_equal(load_uint8(png, 32), resize_uint8(to_uint8(read_image(png)[0]), 32))
    dcm = shared_data / "dicom" / "chest_cr_jpeg_baseline_siim.dcm"
    assert np.array_equal(load_uint8(dcm, 64), resize_uint8(to_uint8(read_image(dcm)[0]), 64))


def test_read_image_bytes_needs_no_filesystem(shared_data, monkeypatch):
    data = (shared_data / REAL_JPEG).read_bytes()

    def no_open(*a, **k):
        raise AssertionError("read_image_bytes touched the filesystem")

    monkeypatch.setattr("builtins.open", no_open)
    img, meta = read_image_bytes(data, name="upload.jpeg")
    assert img.shape == (224, 224) and meta["format"] == "JPEG"


def test_bytes_decode_equals_file_decode(chest_xray, tmp_path):
    """The service decodes uploads from bytes; the pixels and flags must equal training's decode of the same file."""
    from PIL import Image

    from pneumoscope.data.intake import from_bytes, from_path, load_uint8

    f = sorted((chest_xray / "train" / "PNEUMONIA").glob("*.jpeg"))[0]
    for size in (64, 150):
        assert np.array_equal(from_bytes(f.read_bytes(), f.name, size).model_u8, load_uint8(f, size))
    png = tmp_path / "x.png"
    Image.fromarray(load_uint8(f, 64)).save(png)
    a, b = from_bytes(png.read_bytes(), png.name, 32), from_path(png, 32)
    assert np.array_equal(a.model_u8, b.model_u8) and a.quality == b.quality and a.format == "PNG"


