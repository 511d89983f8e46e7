"""ONE intake for an image: bytes, a path, a parsed DICOM dataset or an array -> ``Intake``, decoded exactly once.

Everything else derives from that one decode: the model's input (``model_u8``, S x S), the model-free quality flags
(``quality``), the viewer copy (``view_u8``) and the metadata. Training decodes through the same function
(``data.cache.decode_all`` -> ``images.load_uint8`` -> here), so training and inference see identical pixels.

The decode is at a **working resolution** of ``WORKING`` px on the short side at least (or the original when it is
smaller): a large JPEG is decoded by libjpeg at a reduced DCT scale (``Image.draft``: 1/2, 1/4, 1/8) straight to its
luma channel (Y of YCbCr, which is what libjpeg's grey output is), so a 3000 px film costs a fraction of a full
decode. PNG and DICOM are decoded in full (DICOM: Modality LUT, VOI LUT, MONOCHROME1, see data/dicom.py).
Errors are the package's own types (``ImageReadError`` and subclasses); callers map them to exit codes or HTTP.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from pneumoscope.data.dicom import read_dicom
from pneumoscope.data.images import (
    _16BIT_MODES,
    _PIL_ERRORS,
    MAX_IMAGE_PIXELS,
    _open_pil,
    check_intensity,
    fit,
    is_dicom_path,
    read_image_bytes,
    resize_uint8,
    to_uint8,
)
from pneumoscope.data.quality import image_warnings
from pneumoscope.errors import ImageReadError

WORKING = 1024  # px: the working resolution (also the viewer copy's longest side)
DECODES = {"n": 0}  # how many images were decoded (tests count that each is decoded exactly once)


@dataclass
class Intake:
    """One decoded image and everything derived from it."""

    name: str
    format: str  # JPEG | PNG | DICOM | ARRAY
    model_u8: np.ndarray  # (S, S) uint8: the model's input
    view_u8: np.ndarray  # grey uint8, longest side <= WORKING: the viewer copy
    quality: list[str]  # reader warnings + model-free flags (data/quality.py)
    meta: dict = field(default_factory=dict)  # original_size (h, w), DICOM fields, ...


def _counted() -> None:
    DECODES["n"] += 1


def _pil(data: bytes, name: str, size: int, max_pixels: int, quality: bool) -> Intake:
    """JPEG or PNG bytes -> Intake (one decode; JPEG at a reduced DCT scale when large)."""
    src = _open_pil(io.BytesIO(data), name, max_pixels)
    fmt = "PNG" if src.format == "PNG" else "JPEG"
    mode, has_alpha = src.mode, "A" in src.mode or "transparency" in src.info
    warnings: list[str] = []
    im = src
    try:
        orientation = src.getexif().get(0x0112, 1)
        if fmt == "JPEG":
            src.draft("YCbCr" if mode == "RGB" else "L", (WORKING, WORKING))  # >= WORKING px on each side, or all
        _counted()
        im = ImageOps.exif_transpose(src)  # decodes the pixels
        original = (im.height, im.width) if fmt == "PNG" else _oriented(src.size, orientation)
        if im.mode == "YCbCr":
            grey, colour = im.getchannel(0), np.asarray(im.convert("RGB"))
        elif im.mode in _16BIT_MODES or im.mode == "I":
            raw = np.asarray(im)
            if raw.min() < 0 or raw.max() > 65535:
                raise ImageReadError(f"{name}: 32-bit integer pixels in [{raw.min()}, {raw.max()}] do not fit 0..65535")
            grey, colour = Image.fromarray(to_uint8(raw.astype(np.float32) / 65535.0), mode="L"), None
        elif im.mode in ("L", "1", "P") and not has_alpha and (im.mode != "P" or _palette_is_grey(im)):
            grey, colour = im.convert("L"), None
        else:
            rgb = im.convert("RGB")
            grey, colour = rgb.convert("L"), np.asarray(rgb)
        grey_u8 = np.asarray(grey, dtype=np.uint8)
    except _PIL_ERRORS as e:
        raise ImageReadError(f"{name}: cannot decode the {fmt} pixels ({type(e).__name__}: {e}); the file is "
                             "truncated or corrupt: re-export or re-download it") from e
    finally:
        src.close()
        im.close()
    if orientation not in (1, None):
        warnings.append(f"EXIF orientation {orientation} applied")
    if has_alpha:
        warnings.append(f"alpha channel of the {mode} image dropped")
    meta = {"format": fmt, "original_size": original, "warnings": warnings}
    flags = warnings + (image_warnings(colour if colour is not None else grey_u8, meta) if quality else [])
    return Intake(name, fmt, resize_uint8(grey_u8, size), fit(grey_u8, WORKING), flags, meta)


def _oriented(size: tuple[int, int], orientation) -> tuple[int, int]:
    """(h, w) of a (w, h) header size after its EXIF orientation (5-8 swap the sides)."""
    w, h = size
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def _palette_is_grey(im) -> bool:
    pal = np.asarray(im.getpalette() or [], dtype=np.int16).reshape(-1, 3)
    return bool(len(pal) == 0 or (np.abs(pal[:, 0] - pal[:, 1]).max() == 0 and np.abs(pal[:, 1] - pal[:, 2]).max() == 0))


def _from_float(img: np.ndarray, meta: dict, name: str, fmt: str, size: int, quality: bool = True) -> Intake:
    full = to_uint8(img)
    flags = list(meta.get("warnings", [])) + (image_warnings(img, meta) if quality else [])
    return Intake(name, fmt, resize_uint8(full, size), fit(full, WORKING), flags, meta)


def from_bytes(data: bytes, name: str, size: int, max_pixels: int = MAX_IMAGE_PIXELS, quality: bool = True) -> Intake:
    """An uploaded or read file's bytes (JPEG, PNG or DICOM, told apart by content or the .dcm name).
    ``quality=False`` skips the model-free flags (training's decode: only the pixels are used)."""
    if not data:
        raise ImageReadError(f"{name}: empty file (0 bytes); re-export or re-download it")
    if is_dicom_path(name) or data[128:132] == b"DICM":
        _counted()
        img, meta = read_dicom(bytes(data), name=name, max_pixels=max_pixels)
        return _from_float(img, meta, name, "DICOM", size, quality)
    if data[:2] not in (b"\xff\xd8", b"\x89P"):
        _counted()  # neither JPEG nor PNG by its first bytes: the reader of every format says what it is (or isn't)
        img, meta = read_image_bytes(data, name, max_pixels=max_pixels)
        return _from_float(img, meta, name, meta["format"], size, quality)
    return _pil(data, name, size, max_pixels, quality)


def from_path(path: str | Path, size: int, max_pixels: int = MAX_IMAGE_PIXELS, quality: bool = True) -> Intake:
    """A file on disk (read once; a missing or unreadable file raises OSError, for the caller to report)."""
    with open(path, "rb") as f:
        data = f.read()
    return from_bytes(data, str(path), size, max_pixels, quality)


def load_uint8(path: str | Path, size: int, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """The model's uint8 ``size`` x ``size`` input of a file: what training (``cache.decode_all``), ``predict``,
    the service and the DICOM node all feed the model."""
    return from_path(path, size, max_pixels, quality=False).model_u8


def from_dataset(ds, name: str, size: int, max_pixels: int = MAX_IMAGE_PIXELS) -> Intake:
    """A DICOM dataset already parsed (received by the DICOM node): decoded without being encoded again."""
    _counted()
    img, meta = read_dicom(ds, name=name, max_pixels=max_pixels)
    return _from_float(img, meta, name, "DICOM", size)


def from_array_u8(arr: np.ndarray, size: int, name: str = "array") -> np.ndarray:
    """The model's input of an array: uint8 as it is, a float image checked to be in [0, 1]; resized to S x S."""
    a = np.asarray(arr)
    return resize_uint8(a if a.dtype == np.uint8 else to_uint8(check_intensity(a, name)), size)


def from_array(arr: np.ndarray, size: int, name: str = "array") -> Intake:
    """A uint8 image, or a float image in [0, 1] (checked), grey HxW (or RGB, for the colour flag only)."""
    a = np.asarray(arr)
    grey = a if a.ndim == 2 else np.asarray(Image.fromarray(a).convert("L"))
    u8 = grey if grey.dtype == np.uint8 else to_uint8(check_intensity(grey, name))
    return Intake(name, "ARRAY", resize_uint8(u8, size), fit(u8, WORKING), image_warnings(a), {"original_size": a.shape})
