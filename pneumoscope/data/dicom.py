"""Read a projection radiograph stored as DICOM into a float32 HxW image in [0, 1].

The pixel pipeline follows the order of the DICOM standard (PS3.4 N.2):

1. Modality LUT: Modality LUT Sequence or Rescale Slope/Intercept (``pydicom.pixels.apply_modality_lut``).
2. VOI LUT: VOI LUT Sequence when present, else Window Center/Width; the first one when several
   (``pydicom.pixels.apply_voi_lut`` with index 0).
3. Scaling to [0, 1]:
   - after a VOI transform, by the VOI output range (``voi_output_range``): for a VOI LUT Sequence
     0..2**n - 1 with n the third LUT Descriptor value (bits per entry); for Window Center/Width the range
     pydicom's ``apply_windowing`` maps onto, i.e. the stored-value range (0..2**BitsStored - 1 unsigned,
     -2**(BitsStored-1)..2**(BitsStored-1) - 1 signed; 0..2**n - 1 when there is a Modality LUT Sequence)
     passed through Rescale Slope/Intercept when both are present. So below the window -> 0, above -> 1.
   - without VOI, by the actual min..max of the Modality LUT output (a constant image -> all zeros, with a
     warning).
4. MONOCHROME1 inversion (x -> 1 - x), so that 0 is always black (air) and 1 white (bone). A Presentation LUT
   Shape of INVERSE on MONOCHROME1 images only restates that (PS3.3 C.8.11.6) and is not applied again.

Only projection radiographs are read: ``RADIOGRAPH_MODALITIES`` = CR (computed radiography), DX (digital
radiography), RG (radiographic imaging, e.g. digitised film) and DR (not a DICOM defined term, but written by
some digital radiography systems). Other modalities (OT, CT, MR, US, ...) raise ``DicomError``; a missing
Modality tag is accepted with a warning.

Compressed transfer syntaxes are decoded by pydicom's plugins (pylibjpeg + pylibjpeg-libjpeg: JPEG Baseline,
Extended and Lossless; RLE natively).
"""
from __future__ import annotations

import io
import logging
import re
import struct
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from pneumoscope.errors import DicomError, ImageTooLargeError

log = logging.getLogger(__name__)

RADIOGRAPH_MODALITIES = ("CR", "DX", "RG", "DR")
_VETERINARY_WORDS = re.compile(r"\b(CANINE|FELINE|EQUINE|BOVINE|PORCINE|OVINE|VETERINARY|VETERINARIAN)\b")
_HUMAN = ("HOMO SAPIENS", "HUMAN")
_FREE_TEXT = ("StudyDescription", "SeriesDescription", "ProtocolName", "AcquisitionDeviceProcessingDescription")
# What pydicom raises on malformed data (it parses lazily, so these can surface after dcmread too).
_PYDICOM_ERRORS = (OSError, ValueError, EOFError, struct.error, KeyError, IndexError, TypeError, AttributeError,
                   NotImplementedError, RuntimeError)


def read_dicom(
    source, name: str | None = None, max_pixels: int | None = None
) -> tuple[np.ndarray, dict]:
    """Read a DICOM radiograph (a path, bytes, or a parsed ``pydicom.Dataset``) as a float32 HxW image in [0, 1]
    and its metadata.

    meta: ``format="DICOM"``, ``patient_id``, ``study_uid``, ``modality``, ``manufacturer``, ``device_model``,
    ``body_part``, ``view_position``, ``photometric``, ``bits_stored``, ``original_size`` (h, w), ``bit_depth``
    (= bits_stored) and ``warnings`` (list of str: not a chest, not human, first frame of several, ...).
    Missing tags are None. Files without a file meta header are read too (implicit VR little endian assumed
    unless the data set itself reads as explicit VR). ``max_pixels`` refuses a frame with more pixels before
    decoding it.
    """
    if name is None:
        name = "upload.dcm" if isinstance(source, (bytes, bytearray)) else str(source)
    ds = _read_dataset(source, name)
    warnings: list[str] = []
    try:
        meta = _metadata(ds, name, warnings)
        if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            raise DicomError(f"{name}: no pixel data (is it a DICOM image, or a structured report / header-only file?); "
                             "send the radiograph itself (CR or DX with its pixel data), or resend it if it was cut short")
        rows, cols = int(ds.Rows), int(ds.Columns)
        if max_pixels is not None and rows * cols > max_pixels:
            raise ImageTooLargeError.of(name, rows * cols, max_pixels, (cols, rows))
        arr = _first_frame(ds, name, warnings)
        img = _to_unit_range(arr, ds, warnings)
    except (DicomError, ImageTooLargeError):  # ours, raised above: not to be re-wrapped
        raise
    except _PYDICOM_ERRORS as e:
        raise DicomError(f"{name}: malformed DICOM ({type(e).__name__}: {e}); the file is damaged or was cut short: "
                         "export it again from the modality or PACS and resend it") from e
    for w in warnings:
        log.warning("%s: %s", name, w)
    meta.update(original_size=tuple(img.shape), bit_depth=meta["bits_stored"], warnings=warnings)
    return img, meta


def _read_dataset(source, name: str):
    if isinstance(source, pydicom.Dataset):  # already parsed (the DICOM listener): never encoded and parsed again
        if "TransferSyntaxUID" not in getattr(source, "file_meta", {}):
            raise DicomError(f"{name}: a received dataset without its transfer syntax; the sender must negotiate one")
        return source
    if isinstance(source, (bytes, bytearray)):
        if len(source) == 0:
            raise DicomError(f"{name}: empty file (0 bytes)")
        fp = io.BytesIO(source)
    else:
        if Path(source).stat().st_size == 0:  # a missing file raises FileNotFoundError
            raise DicomError(f"{name}: empty file (0 bytes)")
        fp = source
    try:
        ds = pydicom.dcmread(fp, force=True)
        if not any(k in ds for k in ("SOPClassUID", "Modality", "Rows", "PixelData", "StudyInstanceUID")):
            raise InvalidDicomError("none of SOPClassUID, Modality, Rows, PixelData, StudyInstanceUID found")
        if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
            # No file meta header (older files): take the encoding the data set was read with.
            ds.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
            implicit, little = ds.original_encoding
            ds.file_meta.TransferSyntaxUID = (
                ImplicitVRLittleEndian if implicit in (True, None)
                else ExplicitVRLittleEndian if little in (True, None) else ExplicitVRBigEndian
            )
    except (InvalidDicomError, *_PYDICOM_ERRORS) as e:
        raise DicomError(f"{name}: not a readable DICOM file ({type(e).__name__}: {e}); its header is damaged or "
                         "truncated: export it again from the modality or PACS, or send a JPEG/PNG instead") from e
    return ds


def _text(ds, keyword: str) -> str | None:
    """A tag's value as a stripped string, or None when missing/empty."""

    value = ds.get(keyword)
    if value is None:
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        value = "\\".join(str(v) for v in value)
    value = str(value).strip()
    return value or None


def _metadata(ds, name: str, warnings: list[str]) -> dict:
    modality = _text(ds, "Modality")
    if modality is None:
        warnings.append("no Modality tag: cannot confirm this is a projection radiograph")
    elif modality.upper() not in RADIOGRAPH_MODALITIES:
        raise DicomError(
            f"{name}: modality {modality} is not a radiograph; pneumoscope reads projection radiographs "
            f"({', '.join(RADIOGRAPH_MODALITIES)}). Export the chest X-ray itself, not a secondary capture (OT), "
            "CT scout or other modality"
        )

    body_part = _text(ds, "BodyPartExamined")
    if body_part is None:
        desc = _text(ds, "StudyDescription") or _text(ds, "SeriesDescription")
        warnings.append(
            "body part not recorded (no BodyPartExamined"
            + (f"; description '{desc}'" if desc else "")
            + "): check it is a chest radiograph, the model was trained on chest radiographs"
        )
    elif "CHEST" not in body_part.upper():
        warnings.append(f"body part {body_part}, not CHEST: the model was trained on chest radiographs")

    species = _text(ds, "PatientSpeciesDescription")
    if species is None and ds.get("PatientSpeciesCodeSequence"):
        species = _text(ds.PatientSpeciesCodeSequence[0], "CodeMeaning") or "coded species"
    if species is not None and species.upper() not in _HUMAN:
        warnings.append(f"PatientSpecies {species}: the model was trained on human chest radiographs")
    elif species is None:
        for keyword in _FREE_TEXT:
            text = _text(ds, keyword)
            if text and _VETERINARY_WORDS.search(text.upper()):
                warnings.append(
                    f"{keyword} '{text}' suggests a veterinary image: the model was trained on human chest radiographs"
                )
                break

    view = _text(ds, "ViewPosition")
    if view is not None and view.upper() not in ("PA", "AP"):
        warnings.append(f"view position {view}: the model was trained on frontal (PA/AP) chest radiographs")
    if (_text(ds, "PresentationIntentType") or "").upper() == "FOR PROCESSING":
        warnings.append("a 'FOR PROCESSING' (raw detector) image: the model expects 'FOR PRESENTATION' images")

    bits = ds.get("BitsStored")
    return {
        "format": "DICOM",
        "patient_id": _text(ds, "PatientID"),
        "study_uid": _text(ds, "StudyInstanceUID"),
        "modality": modality,
        "manufacturer": _text(ds, "Manufacturer"),
        "device_model": _text(ds, "ManufacturerModelName"),
        "body_part": body_part,
        "view_position": view,
        "photometric": _text(ds, "PhotometricInterpretation"),
        "bits_stored": int(bits) if bits is not None else None,
    }


def _first_frame(ds, name: str, warnings: list[str]) -> np.ndarray:
    from pydicom.pixels import pixel_array

    frames = int(ds.get("NumberOfFrames") or 1)
    try:
        arr = pixel_array(ds, index=0 if frames > 1 else None)
    except (NotImplementedError, RuntimeError) as e:
        ts = ds.file_meta.get("TransferSyntaxUID")
        raise DicomError(
            f"{name}: cannot decode pixel data with transfer syntax {ts} ({getattr(ts, 'name', '')}): {e}. "
            "JPEG needs `pip install pylibjpeg pylibjpeg-libjpeg`, JPEG 2000 `pip install pylibjpeg-openjpeg`"
        ) from e
    if frames > 1:
        warnings.append(f"{frames} frames: only the first one is read")
    if arr.ndim == 3:  # colour (RGB after pydicom's YBR conversion): BT.601 luma, as for JPEG/PNG
        photometric = _text(ds, "PhotometricInterpretation")
        if photometric == "PALETTE COLOR":
            raise DicomError(f"{name}: PALETTE COLOR pixel data is not a radiograph; export it as MONOCHROME2")
        warnings.append(f"colour ({photometric}) pixel data converted to grey by the BT.601 luma rule")
        arr = arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114
    return arr


def voi_output_range(ds) -> tuple[float, float]:
    """The (low, high) output values of the VOI transform ``apply_voi_lut`` applies to ``ds``.

    Low maps to black and high to white (high < low is possible with a negative Rescale Slope).
    """
    item = _voi_lut_item(ds)
    if item is not None:
        return 0.0, float(2 ** int(item.LUTDescriptor[2]) - 1)
    # pydicom.pixels.processing.apply_windowing
    bits = int(ds.BitsStored)
    if ds.get("ModalityLUTSequence"):
        y_min, y_max = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(ds.get("PixelRepresentation", 0)) == 0:
        y_min, y_max = 0.0, float(2**bits - 1)
    else:
        y_min, y_max = -float(2 ** (bits - 1)), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        y_min = y_min * float(slope) + float(intercept)
        y_max = y_max * float(slope) + float(intercept)
    return y_min, y_max


def _voi_lut_item(ds):
    """The VOI LUT Sequence item ``apply_voi_lut`` uses (the first, when complete), else None."""
    lut = ds.get("VOILUTSequence")
    if lut and None not in (lut[0].get("LUTDescriptor"), lut[0].get("LUTData")):
        return lut[0]
    return None


def _clip_to_lut(arr: np.ndarray, item) -> np.ndarray:
    """Clip LUT inputs to the mapped range as integers (PS3.3 C.11.1.1.1: below the first -> first entry,
    above the last -> last entry). pydicom 3.0 computes the LUT index in the LUT's own dtype, so that
    e.g. 4000 - first on an 8-bit VOI LUT wraps around instead of reaching the last entry."""
    n, first = int(item.LUTDescriptor[0]) or 2**16, int(item.LUTDescriptor[1])
    return np.clip(np.rint(arr), first, first + n - 1).astype(np.int64)


def _to_unit_range(arr: np.ndarray, ds, warnings: list[str]) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    photometric = ds.get("PhotometricInterpretation")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):  # colour, already luma: no LUTs apply
        return np.clip(arr / float(2 ** int(ds.BitsStored) - 1), 0.0, 1.0).astype(np.float32)
    if ds.get("ModalityLUTSequence"):
        arr = _clip_to_lut(arr, ds.ModalityLUTSequence[0])
    arr = apply_modality_lut(arr, ds)
    voi_lut = _voi_lut_item(ds)
    if voi_lut is not None or None not in (ds.get("WindowCenter"), ds.get("WindowWidth")):
        if voi_lut is not None:
            arr = _clip_to_lut(arr, voi_lut)
        lo, hi = voi_output_range(ds)
        out = apply_voi_lut(arr, ds, index=0).astype(np.float64)
        img = (out - lo) / (hi - lo) if hi != lo else np.zeros_like(out)
    else:
        arr = arr.astype(np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if hi > lo:
            img = (arr - lo) / (hi - lo)
        else:
            warnings.append(f"constant image (every pixel {lo:g}): read as all zeros")
            return np.zeros(arr.shape, dtype=np.float32)
    if photometric == "MONOCHROME1":  # 1 - x after scaling = inverting within the output range
        img = 1.0 - img
    return np.clip(img, 0.0, 1.0).astype(np.float32)
