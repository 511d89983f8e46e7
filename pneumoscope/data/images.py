"""Read JPEG, PNG and DICOM files into the one checked intensity range of the project.

An image is a float32 numpy array HxW (one channel) with finite values in [0, 1]: 0 = black (air on a
MONOCHROME2 radiograph), 1 = white (bone). ``check_intensity`` enforces it.

Two paths:

- ``read_image`` / ``read_image_bytes``: exact, full resolution, every bit kept (16-bit PNGs are scaled by /65535,
  never through 8 bits). DICOM goes to ``dicom.read_dicom``.
- the model's input, decoded once with everything else derived from it: ``data/intake.py``.
"""
from __future__ import annotations

import errno
import io
import logging
import re
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pneumoscope.data.dicom import read_dicom
from pneumoscope.errors import ImageReadError, ImageTooLargeError, IntensityRangeError

log = logging.getLogger(__name__)

# THE decompression-bomb limit of the project (CLI, training decode, service): pixels per image (6000 x 6000),
# checked from the header (PNG/JPEG size, DICOM Rows x Columns) before any pixel is decoded.
MAX_IMAGE_PIXELS = 36_000_000
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
DICOM_EXTENSIONS = (".dcm", ".dicom")

_PIL_FORMATS = ("JPEG", "PNG")
_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# What Pillow raises on corrupt/truncated data (UnidentifiedImageError is an OSError). Never catch our own
# ImageReadError (a ValueError) with this tuple: the blocks it guards do not raise it.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError)
PIL_ERRORS = _PIL_ERRORS  # what Pillow raises on corrupt or truncated files (public, for callers that open files)


def os_error_message(name: str | Path, e: OSError) -> str:
    """A clear message (naming ``name`` and the fix) for what the OS said when a file could not be opened."""
    if isinstance(e, FileNotFoundError):
        return f"{name}: no such file or folder; check the path (relative paths start in the current folder)"
    if isinstance(e, PermissionError):
        return f"{name}: permission denied; make the file readable (chmod a+r) or run as a user who can read it"
    if isinstance(e, IsADirectoryError):
        return f"{name}: is a folder where a file was expected"
    if e.errno == errno.ELOOP:
        return f"{name}: symbolic link loop; point the link at a real file"
    return f"{name}: cannot be read ({e.strerror or type(e).__name__}); check the file and its disk"


def is_dicom_path(path: str | Path) -> bool:
    """True when ``path`` has a DICOM extension (.dcm, .dicom); the name only, the file is not opened."""
    return Path(path).suffix.lower() in DICOM_EXTENSIONS


def is_dicom_file(path: str | Path) -> bool:
    """True when ``path`` has a DICOM extension or the 'DICM' magic at byte 128."""
    if is_dicom_path(path):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return _has_dicom_magic(head)


def _has_dicom_magic(head: bytes) -> bool:
    return len(head) >= 132 and head[128:132] == b"DICM"


def check_intensity(arr: np.ndarray, name: str = "image") -> np.ndarray:
    """Return ``arr`` as float32 after checking it is a finite 2-D float array in [0, 1].

    Raises ``IntensityRangeError`` naming ``name`` otherwise.
    """
    if not isinstance(arr, np.ndarray):
        raise IntensityRangeError(f"{name}: expected a numpy array, got {type(arr).__name__}")
    if arr.dtype not in (np.float32, np.float64):
        raise IntensityRangeError(
            f"{name}: dtype {arr.dtype}, expected float32 or float64 in [0, 1] (scale uint8 by /255, uint16 by /65535)"
        )
    if arr.ndim != 2:
        raise IntensityRangeError(f"{name}: shape {arr.shape}, expected a 2-D HxW single-channel image")
    if arr.size == 0:
        raise IntensityRangeError(f"{name}: empty image of shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise IntensityRangeError(f"{name}: contains {int((~np.isfinite(arr)).sum())} NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        raise IntensityRangeError(f"{name}: values in [{lo:.6g}, {hi:.6g}], expected [0, 1]")
    return arr.astype(np.float32, copy=False)


def read_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[np.ndarray, dict]:
    """Read a JPEG, PNG or DICOM file as a float32 HxW image in [0, 1] and its metadata.

    Colour images become one channel by the ITU-R BT.601 luma rule, L = 0.299 R + 0.587 G + 0.114 B
    (Pillow's "L" conversion, rounded to 8 bits); alpha is dropped. The EXIF orientation is honoured.
    8-bit images are scaled by /255, 16-bit ones by /65535 (not by their own maximum; all 16 bits kept).
    Images with more than ``max_pixels`` pixels are refused before their pixels are decoded.

    meta: ``{"format": "JPEG"|"PNG"|"DICOM", "original_size": (h, w), "bit_depth": int, "warnings": [str]}``,
    plus the DICOM fields of ``dicom.read_dicom`` for DICOM files. ``original_size`` is the size of the
    returned array (after the EXIF rotation).
    """
    path = Path(path)
    if is_dicom_file(path):
        return read_dicom(path, max_pixels=max_pixels)
    with open(path, "rb") as f:  # a missing file raises FileNotFoundError, not ImageReadError
        return _read_pil(f, str(path), max_pixels)


def read_image_bytes(data: bytes, name: str = "upload", max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[np.ndarray, dict]:
    """``read_image`` from memory (no filesystem access); ``name`` is used in messages and to spot ``.dcm``."""
    if is_dicom_path(name) or _has_dicom_magic(data[:132]):
        return read_dicom(bytes(data), name=name, max_pixels=max_pixels)
    return _read_pil(io.BytesIO(data), name, max_pixels)


def _open_pil(fp: BinaryIO, name: str, max_pixels: int):
    """Open (headers only) a JPEG or PNG and refuse it when it has too many pixels."""

    fp.seek(0, io.SEEK_END)
    if fp.tell() == 0:
        raise ImageReadError(f"{name}: empty file (0 bytes); re-export or re-download it")
    fp.seek(0)
    try:
        im = Image.open(fp, formats=_PIL_FORMATS)
    except Image.DecompressionBombError as e:  # Pillow's own guard (over twice its limit): the same message as ours
        m = re.search(r"\((\d+) pixels\)", str(e))
        raise ImageTooLargeError.of(name, int(m.group(1)) if m else None, max_pixels) from None
    except UnidentifiedImageError as e:
        head = fp.seek(0) or fp.read(8)
        if head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")):  # the magic is right, the header is not
            kind = "PNG" if head.startswith(b"\x89PNG") else "JPEG"
            raise ImageReadError(f"{name}: corrupt {kind} header (a {kind} file, but Pillow cannot read its header: "
                                 "damaged in transfer?); re-export or re-download it") from e
        raise ImageReadError(
            f"{name}: not a JPEG, PNG or DICOM image (Pillow cannot identify it); "
            "convert it to PNG, or give a DICOM file a .dcm extension"
        ) from e
    except _PIL_ERRORS as e:
        raise ImageReadError(f"{name}: corrupt image header ({type(e).__name__}: {e}); the file is truncated or "
                             "damaged: re-export or re-download it") from e
    w, h = im.size
    # Pillow only warns (DecompressionBombWarning) above Image.MAX_IMAGE_PIXELS: refuse those too. Checking the
    # size ourselves instead of turning the warning into an error keeps this thread-safe (no warnings filters).
    limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
    if w * h > limit:
        im.close()
        raise ImageTooLargeError.of(name, w * h, limit, (w, h))
    return im



def _read_pil(fp: BinaryIO, name: str, max_pixels: int) -> tuple[np.ndarray, dict]:
    src = _open_pil(fp, name, max_pixels)
    fmt = "PNG" if src.format == "PNG" else "JPEG"  # Pillow calls some camera JPEGs "MPO"
    mode, has_alpha = src.mode, "A" in src.mode or "transparency" in src.info
    warnings: list[str] = []
    im = src
    try:
        orientation = src.getexif().get(0x0112, 1)
        im = ImageOps.exif_transpose(src)  # decodes the pixels
        if im.mode in _16BIT_MODES:
            arr, depth = np.asarray(im).astype(np.float32) / np.float32(65535.0), 16
        elif im.mode == "I":
            raw, depth = np.asarray(im), 16
        else:
            arr = np.asarray(im.convert("L"), dtype=np.float32) / np.float32(255.0)
            depth = 1 if mode == "1" else 8
    except _PIL_ERRORS as e:
        raise ImageReadError(
            f"{name}: cannot decode the {fmt} pixels ({type(e).__name__}: {e}); the file is truncated or corrupt"
        ) from e
    finally:
        src.close()
        im.close()
    if mode == "I":  # 32-bit integers: accepted when they fit the 16-bit range (16-bit PNGs in old Pillow)
        if raw.min() < 0 or raw.max() > 65535:
            raise ImageReadError(f"{name}: 32-bit integer pixels in [{raw.min()}, {raw.max()}] do not fit 0..65535")
        arr = raw.astype(np.float32) / np.float32(65535.0)
    if orientation not in (1, None):
        warnings.append(f"EXIF orientation {orientation} applied")
    if has_alpha:
        warnings.append(f"alpha channel of the {mode} image dropped")
    meta = {"format": fmt, "original_size": tuple(arr.shape), "bit_depth": depth, "warnings": warnings}
    return check_intensity(arr, name), meta


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """float image in [0, 1] -> uint8 by round(arr * 255)."""
    return np.clip(np.rint(np.asarray(arr, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def resize_uint8(arr_u8: np.ndarray, size: int) -> np.ndarray:
    """Resize a uint8 HxW image to ``size``x``size`` (aspect not kept) with Pillow bilinear resampling."""

    if arr_u8.shape == (size, size):
        return np.ascontiguousarray(arr_u8, dtype=np.uint8)
    im = Image.fromarray(np.ascontiguousarray(arr_u8, dtype=np.uint8), mode="L")
    return np.asarray(im.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def fit(u8: np.ndarray, side: int) -> np.ndarray:
    """Downscale (area filter) so the longest side is at most ``side``; aspect kept."""
    h, w = u8.shape
    if max(h, w) <= side:
        return u8
    s = side / max(h, w)
    im = Image.fromarray(u8, mode="L").resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BOX)
    return np.asarray(im, dtype=np.uint8)
