"""The bad-input corpus of issue #18, generated from real shared images: one ``Item`` per input, with the outcome
that is right for it. ``ok=True`` items are real images that must be predicted (``warn``: a warning that must be
given); ``ok=False`` items must be refused with a message holding ``msg`` (naming the file: checked by the tests)."""
from __future__ import annotations

import io
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

REAL_JPEG = "train/NORMAL/IM-0115-0001.jpeg"
REAL_DICOM = "chest_dx_nih_no_finding.dcm"


@dataclass
class Item:
    name: str          # file name (what the CLI gets on disk, what the service gets as the upload's name)
    data: bytes
    ok: bool           # True: a real image, predicted; False: refused
    msg: str = ""      # a part of the message (error, or the warning when ok)
    status: int = 0    # HTTP status of the service when refused (415 / 422); 0: same file is not sent there


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header_only(w: int, h: int) -> bytes:
    """A valid PNG signature + IHDR claiming w x h, and no pixel data (~60 bytes)."""
    import zlib

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8)) + chunk(b"IEND", b"")


def jpeg_claiming(w: int, h: int) -> bytes:
    """A small real JPEG whose SOF header is patched to claim w x h."""
    data = bytearray(_save(Image.new("L", (16, 16), 128), "JPEG"))
    i = data.index(b"\xff\xc0")
    data[i + 5:i + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def _dicom(src: Path, change) -> bytes:
    import pydicom

    ds = pydicom.dcmread(src)
    change(ds)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def image_items(chest_xray: Path, dicom_dir: Path) -> list[Item]:
    """Files for ``predict`` and ``POST /predict`` alike."""
    jpeg = (chest_xray / REAL_JPEG).read_bytes()
    with Image.open(chest_xray / REAL_JPEG) as im:
        grey = im.convert("L")
    rgb = grey.convert("RGB")
    dcm = (dicom_dir / REAL_DICOM).read_bytes()
    g16 = Image.fromarray(np.asarray(grey, np.uint16) * 257)
    exif = Image.Exif()
    exif[0x0112] = 6
    rgba = rgb.convert("RGBA")
    rgba.putalpha(200)
    small = grey.resize((64, 64))
    rng = np.random.default_rng(0)

    def no_pixels(ds):
        del ds.PixelData

    def absurd_rows(ds):
        ds.Rows, ds.Columns = 65535, 65535

    def ct(ds):
        ds.Modality = "CT"

    bad_crc = bytearray(_save(small, "PNG"))
    bad_crc[40] ^= 0xFF
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        z.writestr("image.jpeg", jpeg)
    E, T, L = "empty file", "truncated", "not a JPEG, PNG or DICOM"
    return [
        Item("good.jpeg", jpeg, True),
        Item("good.dcm", dcm, True),
        Item("zero.jpeg", b"", False, E, 422),
        Item("zero.png", b"", False, E, 422),
        Item("zero.dcm", b"", False, E, 422),
        Item("cut600.jpeg", jpeg[:600], False, "corrupt", 422),
        Item("cut_half.jpeg", jpeg[:len(jpeg) // 2], False, T, 422),
        Item("cut_half.png", _save(grey, "PNG")[:5000], False, T, 422),
        Item("png_named.jpeg", _save(small, "PNG"), True),
        Item("jpeg_named.png", _save(small, "JPEG"), True),
        Item("jpeg_named.dcm", jpeg, False, "DICOM", 422),
        Item("text.jpeg", b"hello, this is not an image\n" * 20, False, L, 415),
        Item("html.png", b"<!doctype html><html><body>image</body></html>", False, L, 415),
        Item("pdf.jpeg", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\n" * 10, False, L, 415),
        Item("random.jpeg", rng.bytes(3000), False, L, 415),
        Item("zip.dcm", zbuf.getvalue(), False, "DICOM", 422),
        Item("sixteen_bit.png", _save(g16, "PNG"), True),
        Item("rgba.png", _save(rgba, "PNG"), True, "alpha channel"),
        Item("grey_alpha.png", _save(small.convert("LA"), "PNG"), True, "alpha channel"),
        Item("cmyk.jpeg", _save(rgb.convert("CMYK"), "JPEG"), True),
        Item("rgb.jpeg", _save(rgb, "JPEG"), True),
        Item("palette.png", _save(rgb.convert("P"), "PNG"), True),
        Item("one_bit.png", _save(small.convert("1"), "PNG"), True),
        Item("progressive.jpeg", _save(grey, "JPEG", progressive=True), True),
        Item("exif_rotated.jpeg", _save(grey, "JPEG", exif=exif), True, "EXIF orientation 6"),
        Item("trailing_garbage.jpeg", jpeg + b"\0garbage" * 100, True),
        Item("one_pixel.png", _save(Image.new("L", (1, 1), 100), "PNG"), True),
        Item("one_pixel.jpeg", _save(Image.new("L", (1, 1), 100), "JPEG"), True),
        Item("eight_pixels.jpeg", _save(grey.resize((8, 8)), "JPEG"), True),
        Item("black.png", _save(Image.new("L", (256, 256), 0), "PNG"), True, "blank"),
        Item("gif.gif", _save(small, "GIF"), False, L, 415),
        Item("gif_named.jpeg", _save(small, "GIF"), False, L, 415),
        Item("tiff.tiff", _save(small, "TIFF"), False, L, 415),
        Item("tiff_named.png", _save(small, "TIFF"), False, L, 415),
        Item("webp.webp", _save(small, "WEBP"), False, L, 415),
        Item("webp_named.jpeg", _save(small, "WEBP"), False, L, 415),
        Item("bmp_named.png", _save(small, "BMP"), False, L, 415),
        Item("bad_crc.png", bytes(bad_crc), False, "corrupt", 422),
        Item("huge_declared.png", png_header_only(7000, 7000), False, "exceeds the limit of 36,000,000", 422),
        Item("huge_declared.jpeg", jpeg_claiming(7000, 7000), False, "exceeds the limit of 36,000,000", 422),
        Item("huge_wide.png", png_header_only(60000, 1000), False, "exceeds the limit", 422),
        # over twice Pillow's own limit: Pillow refuses it first, with the project's message all the same
        Item("huge_pillow_bomb.png", png_header_only(100000, 100000), False,
             "10,000,000,000 pixels exceeds the limit of 36,000,000 pixels", 422),
        Item("dicom_no_pixels.dcm", _dicom(dicom_dir / REAL_DICOM, no_pixels), False, "no pixel data", 422),
        Item("dicom_absurd_rows.dcm", _dicom(dicom_dir / REAL_DICOM, absurd_rows), False, "exceeds the limit", 422),
        Item("dicom_ct.dcm", _dicom(dicom_dir / REAL_DICOM, ct), False, "modality CT is not a radiograph", 422),
        Item("dicom_scout_ot.dcm", (dicom_dir / "abdomen_ot_scout.dcm").read_bytes(), False,
             "modality OT is not a radiograph", 422),
        Item("dicom_header_cut.dcm", dcm[:200], False, "DICOM", 422),
        Item("dicom_pixels_cut.dcm", dcm[:len(dcm) // 2], False, "DICOM", 422),
        Item("dicom_preamble_only.dcm", b"\0" * 128 + b"DICM", False, "DICOM", 422),
        Item("Röntgen_胸部_😀.jpeg", jpeg, True),
        Item("spaces and 'quotes' \"x\".jpeg", jpeg, True),
        Item("long_" + "n" * 240 + ".jpeg", jpeg, True),
    ]


def write_items(items: list[Item], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for it in items:
        p = folder / it.name
        p.write_bytes(it.data)
        out.append(p)
    return out


def path_items(folder: Path, good: Path) -> dict[str, str]:
    """Paths the CLI gets that are no readable file -> a part of the message their error row must hold."""
    folder.mkdir(parents=True, exist_ok=True)
    loop = folder / "loop.jpeg"
    os.symlink(loop.name, loop)
    dangling = folder / "dangling.jpeg"
    os.symlink("gone.jpeg", dangling)
    sub = folder / "with_broken_links"
    sub.mkdir()
    os.symlink("nowhere.png", sub / "broken.png")
    os.symlink("self.dcm", sub / "self.dcm")
    (sub / "real.jpeg").write_bytes(good.read_bytes())
    (sub / "notes.txt").write_text("skipped: not an image extension")
    (sub / ".hidden.jpeg").write_bytes(b"skipped: hidden")
    return {
        str(folder / "missing.jpeg"): "no such file",
        str(folder / ".." / ".." / "etc" / "no_such_traversal.jpeg"): "no such file",
        str(loop): "symbolic link loop",
        str(dangling): "no such file",
        str(sub / "broken.png"): "no such file",
        str(sub / "self.dcm"): "symbolic link loop",
    }
