"""DICOM reader: the eight real shared files and generated cases with exact pixel values after the pipeline."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from pneumoscope.data.dicom import RADIOGRAPH_MODALITIES, read_dicom, voi_output_range
from pneumoscope.data.images import read_image, read_image_bytes
from pneumoscope.errors import DicomError, ImageReadError, ImageTooLargeError


def raw_pixels(path: Path) -> np.ndarray:
    """Stored pixel values, decoded by pydicom alone (independent of the code under test)."""
    ds = pydicom.dcmread(path, force=True)
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return ds.pixel_array.astype(np.float64)


def minmax(x: np.ndarray) -> np.ndarray:
    return (x - x.min()) / (x.max() - x.min())


def make_dicom(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int = 12,
               modality: str | None = "DX", signed: bool = False, pixel_data: bool = True, **tags) -> Path:
    """Write a one-frame 16-bit-allocated DICOM file (explicit VR little endian) with the given tags."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.3.4"
    ds.PatientID = "P001"
    ds.BodyPartExamined = "CHEST"
    if modality is not None:
        ds.Modality = modality
    frames = pixels if pixels.ndim == 3 else pixels[None]
    ds.Rows, ds.Columns = frames.shape[1:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(signed)
    if pixel_data:
        ds.PixelData = frames.astype(np.int16 if signed else np.uint16).tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


RAMP12 = np.arange(0, 4096, 64, dtype=np.uint16).reshape(8, 8)  # 0, 64, ..., 4032


# ---------------------------------------------------------------- the eight real files


def test_jpeg_baseline_chest(dicom_dir):
    path = dicom_dir / "chest_cr_jpeg_baseline_siim.dcm"
    img, meta = read_dicom(path)
    assert img.shape == (1024, 1024) and img.dtype == np.float32
    assert img.min() == 0.0 and img.max() == 1.0  # no VOI: scaled by the actual min..max
    np.testing.assert_allclose(img, minmax(raw_pixels(path)), atol=1e-6)
    assert meta["format"] == "DICOM" and meta["modality"] == "CR" and meta["body_part"] == "CHEST"
    assert meta["photometric"] == "MONOCHROME2" and meta["bits_stored"] == 8
    assert meta["original_size"] == (1024, 1024) and meta["warnings"] == []
    assert meta["study_uid"].startswith("1.2.276.0.7230010") and meta["patient_id"]


def test_monochrome1_relabelled_is_inverted(dicom_dir):
    base, _ = read_dicom(dicom_dir / "chest_cr_jpeg_baseline_siim.dcm")
    inv, meta = read_dicom(dicom_dir / "chest_cr_jpeg_monochrome1_relabelled.dcm")
    assert meta["photometric"] == "MONOCHROME1"
    # Same stored JPEG bytes -> same decoded pixels and the same min..max; only float32 rounding of 1 - x differs.
    np.testing.assert_allclose(inv, 1.0 - base, atol=1e-6)


def test_no_meta_10bit_windowed(dicom_dir):
    path = dicom_dir / "chest_cr_monochrome1_10bit_no_meta.dcm"
    img, meta = read_dicom(path)
    assert img.shape == (440, 440)
    assert meta["bits_stored"] == 10 and meta["photometric"] == "MONOCHROME1" and meta["modality"] == "CR"
    # Window 550/1024, LINEAR (PS3.3 C.11.2.1.2.1): c' = 549.5, w' = 1023; output range 0..1023 -> / 1023;
    # then MONOCHROME1 inverted.
    x = raw_pixels(path)
    lin = np.clip((x - 549.5) / 1023 + 0.5, 0, 1)
    lin[x <= 549.5 - 1023 / 2] = 0
    lin[x > 549.5 + 1023 / 2] = 1
    np.testing.assert_allclose(img, 1 - lin, atol=1e-6)
    assert img.max() == 1.0  # the 6 stored values <= 38 are below the window: black before inversion


@pytest.mark.parametrize("fname, patient", [("chest_dx_nih_no_finding.dcm", "Covid0000"),
                                             ("chest_dx_nih_cardiomegaly.dcm", "1")])
def test_nih_dx(dicom_dir, fname, patient):
    path = dicom_dir / fname
    img, meta = read_image(path)  # through the dispatcher
    assert img.shape == (1024, 1024) and img.dtype == np.float32
    np.testing.assert_allclose(img, minmax(raw_pixels(path)), atol=1e-6)
    assert meta["modality"] == "DX" and meta["patient_id"] == patient and meta["study_uid"].startswith("1.3.6.1.4.1")
    assert meta["body_part"] is None and meta["manufacturer"] is None and meta["device_model"] is None
    assert any("body part not recorded" in w for w in meta["warnings"])


def test_dental_jpeg_lossless_modality_lut(dicom_dir):
    path = dicom_dir / "dental_cr_jpeg_lossless_modality_lut.dcm"
    img, meta = read_dicom(path)
    assert img.shape == (1576, 1976) and meta["bits_stored"] == 10
    ds = pydicom.dcmread(path)
    item = ds.ModalityLUTSequence[0]
    n, first, _ = item.LUTDescriptor
    lut = np.frombuffer(item.LUTData, "<u2").astype(np.float64)
    assert not np.array_equal(lut, np.arange(n))  # the LUT is not the identity: it matters
    mapped = lut[np.clip(raw_pixels(path).astype(int) - first, 0, n - 1)]
    np.testing.assert_allclose(img, 1 - minmax(mapped), atol=1e-6)  # Modality LUT, min..max, MONOCHROME1
    assert any("body part" in w and "TEETH" in w for w in meta["warnings"])


def test_dog_thorax_reads_with_warnings(dicom_dir):
    path = dicom_dir / "animal_thorax_dx_monochrome1.dcm"
    img, meta = read_dicom(path)
    assert img.shape == (169, 211)
    # Window 128/256 on 8 bits maps every stored x onto x (output range 0..255), then MONOCHROME1: 1 - x / 255.
    np.testing.assert_allclose(img, 1 - raw_pixels(path) / 255, atol=1e-6)
    assert meta["body_part"] == "THORAX" and meta["manufacturer"] == "FUJIFILM Corporation"
    assert any("THORAX, not CHEST" in w for w in meta["warnings"])
    assert any("veterinary" in w for w in meta["warnings"])


def test_ot_scout_refused(dicom_dir):
    path = dicom_dir / "abdomen_ot_scout.dcm"
    with pytest.raises(DicomError, match="modality OT is not a radiograph") as e:
        read_image(path)
    assert str(path) in str(e.value) and "CR, DX" in str(e.value)


def test_bytes_equal_path(dicom_dir):
    path = dicom_dir / "chest_cr_monochrome1_10bit_no_meta.dcm"  # no preamble: the .dcm name decides
    a, meta_a = read_dicom(path)
    b, meta_b = read_image_bytes(path.read_bytes(), name="x.dcm")
    np.testing.assert_array_equal(a, b)
    assert meta_a["study_uid"] == meta_b["study_uid"]
    path = dicom_dir / "chest_cr_jpeg_baseline_siim.dcm"  # has the DICM magic: found without an extension
    np.testing.assert_array_equal(read_image_bytes(path.read_bytes(), name="upload")[0], read_dicom(path)[0])


# ---------------------------------------------------------------- generated files: exact pipeline values


def test_monochrome2_and_1_ramp(tmp_path):
    img, meta = read_dicom(make_dicom(tmp_path / "m2.dcm", RAMP12))
    np.testing.assert_allclose(img, RAMP12 / 4032, atol=1e-7)  # min..max of the data (0..4032), not of 12 bits
    assert meta["warnings"] == [] and meta["modality"] == "DX" and meta["patient_id"] == "P001"
    img1, _ = read_dicom(make_dicom(tmp_path / "m1.dcm", RAMP12, photometric="MONOCHROME1"))
    np.testing.assert_allclose(img1, 1 - RAMP12 / 4032, atol=1e-7)


def test_16bit_negative_rescale_slope_inverts(tmp_path):
    pixels = np.array([[0, 1000], [30000, 65535]], dtype=np.uint16)
    path = make_dicom(tmp_path / "s.dcm", pixels, bits_stored=16, RescaleSlope=-1, RescaleIntercept=100)
    img, meta = read_dicom(path)
    # Modality output 100 - x; no VOI: min..max of that output -> the largest stored value is black.
    np.testing.assert_allclose(img, 1 - pixels / 65535, atol=1e-7)
    assert meta["bits_stored"] == 16


def test_window_center_width(tmp_path):
    pixels = np.array([[0, 1536, 1537, 2048], [2559, 2560, 3000, 4095]], dtype=np.uint16)
    img, _ = read_dicom(make_dicom(tmp_path / "w.dcm", pixels, WindowCenter=2048, WindowWidth=1024))
    # LINEAR: c' = 2047.5, w' = 1023; x <= 1536 -> 0, x > 2559 -> 1, else (x - c') / w' + 0.5.
    expected = [[0, 0, (1537 - 2047.5) / 1023 + 0.5, 0.5 / 1023 + 0.5], [1, 1, 1, 1]]
    expected[1][0] = (2559 - 2047.5) / 1023 + 0.5
    np.testing.assert_allclose(img, expected, atol=1e-6)
    assert abs(img[0, 3] - 0.5) < 1e-3
    inv, _ = read_dicom(make_dicom(tmp_path / "w1.dcm", pixels, photometric="MONOCHROME1",
                                   WindowCenter=2048, WindowWidth=1024))
    np.testing.assert_allclose(inv, 1 - img, atol=1e-6)


def test_window_after_rescale_and_first_of_several(tmp_path):
    pixels = np.array([[800, 1024, 1300, 0]], dtype=np.uint16)  # modality values -224, 0, 276, -1024
    img, _ = read_dicom(make_dicom(tmp_path / "r.dcm", pixels, RescaleSlope=1, RescaleIntercept=-1024,
                                   WindowCenter=[0, 3000], WindowWidth=[400, 10]))
    # First window 0/400 on the rescaled values: c' = -0.5, w' = 399.
    np.testing.assert_allclose(img, [[0, 0.5 / 399 + 0.5, 1, 0]], atol=1e-6)


def test_voi_lut_sequence_preferred_over_window(tmp_path):
    item = Dataset()
    item.add_new(0x00283002, "US", [256, 100, 8])  # LUT Descriptor: 256 entries, first mapped value 100, 8 bits
    item.add_new(0x00283006, "US", [255 - i for i in range(256)])  # LUT Data: an inverting ramp
    pixels = np.array([[0, 100, 150, 355, 4000]], dtype=np.uint16)
    img, _ = read_dicom(make_dicom(tmp_path / "v.dcm", pixels, VOILUTSequence=[item],
                                   WindowCenter=2048, WindowWidth=100))
    # x < 100 -> entry 0 (255), x >= 355 -> last entry (0); output range 0..2**8 - 1.
    np.testing.assert_allclose(img, [[1, 1, 205 / 255, 0, 0]], atol=1e-6)


def test_voi_output_range_matches_pydicom(tmp_path):
    from pydicom.pixels import apply_voi_lut

    cases = [
        (dict(bits_stored=12), (0, 4095)),
        (dict(bits_stored=16), (0, 65535)),
        (dict(bits_stored=16, signed=True), (-32768, 32767)),
        (dict(bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024), (-1024, 4095 * 2 - 1024)),
    ]
    for i, (kw, expected) in enumerate(cases):
        ds = pydicom.dcmread(make_dicom(tmp_path / f"{i}.dcm", np.zeros((2, 2)), WindowCenter=0, WindowWidth=10, **kw))
        assert voi_output_range(ds) == expected
        # pydicom maps the far ends of the input onto exactly this range
        out = apply_voi_lut(np.array([-1e9, 1e9]), ds)
        assert tuple(out) == expected


def test_signed_16bit_window(tmp_path):
    pixels = np.array([[-1000, -50, 0, 49, 1000]], dtype=np.int16)
    img, _ = read_dicom(make_dicom(tmp_path / "s.dcm", pixels, bits_stored=16, signed=True,
                                   WindowCenter=0, WindowWidth=100))
    # c' = -0.5, w' = 99: x <= -50 -> 0, x > 49 -> 1, output range -32768..32767 rescaled to [0, 1]
    np.testing.assert_allclose(img, [[0, 0, 0.5 / 99 + 0.5, 49.5 / 99 + 0.5, 1]], atol=1e-6)


def test_multiframe_first_frame_and_constant_image(tmp_path):
    frames = np.stack([RAMP12, RAMP12[::-1], np.zeros_like(RAMP12)])
    img, meta = read_dicom(make_dicom(tmp_path / "mf.dcm", frames))
    np.testing.assert_allclose(img, RAMP12 / 4032, atol=1e-7)
    assert any("3 frames" in w for w in meta["warnings"])
    img, meta = read_dicom(make_dicom(tmp_path / "c.dcm", np.full((4, 4), 77), photometric="MONOCHROME1"))
    assert np.array_equal(img, np.zeros((4, 4), np.float32))
    assert any("constant image" in w for w in meta["warnings"])


def test_rgb_dicom_to_luma(tmp_path):
    path = make_dicom(tmp_path / "rgb.dcm", RAMP12, pixel_data=False, photometric="RGB", bits_stored=8,
                      BitsAllocated=8, HighBit=7, SamplesPerPixel=3, PlanarConfiguration=0)
    ds = pydicom.dcmread(path)
    ds.add_new(0x7FE00010, "OB", np.tile(np.array([200, 100, 50], np.uint8), (8, 8, 1)).tobytes())
    ds.save_as(path)
    img, meta = read_dicom(path)
    np.testing.assert_allclose(img, np.full((8, 8), 124.2 / 255), atol=1e-6)  # BT.601 luma, no rounding
    assert any("converted to grey" in w for w in meta["warnings"])


def test_missing_modality_and_species_warn(tmp_path):
    img, meta = read_dicom(make_dicom(tmp_path / "m.dcm", RAMP12, modality=None,
                                      PatientSpeciesDescription="Canis lupus familiaris"))
    assert img.shape == (8, 8) and meta["modality"] is None
    assert any("no Modality tag" in w for w in meta["warnings"])
    assert any("PatientSpecies Canis lupus familiaris" in w for w in meta["warnings"])


def test_refused_files(tmp_path):
    path = make_dicom(tmp_path / "nopix.dcm", RAMP12, pixel_data=False)
    with pytest.raises(DicomError, match="no pixel data") as e:
        read_dicom(path)
    assert str(path) in str(e.value)

    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(np.random.default_rng(0).bytes(3000))
    with pytest.raises(DicomError, match="not a readable DICOM file") as e:
        read_image(garbage)
    assert str(garbage) in str(e.value)

    text = tmp_path / "notes.dcm"
    text.write_text("this is not a DICOM file\n" * 20)
    with pytest.raises(DicomError, match="notes.dcm: not a readable DICOM file"):
        read_image(text)

    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    with pytest.raises(DicomError, match="empty file"):
        read_image(empty)

    with pytest.raises(DicomError, match="modality CT is not a radiograph"):
        read_dicom(make_dicom(tmp_path / "ct.dcm", RAMP12, modality="CT"))
    with pytest.raises(DicomError, match="up.dcm"):
        read_image_bytes(b"\x00" * 50, name="up.dcm")
    assert issubclass(DicomError, ImageReadError)  # callers catching ImageReadError also catch these


def test_too_large_refused_before_decoding(tmp_path):
    path = make_dicom(tmp_path / "big.dcm", RAMP12)
    with pytest.raises(ImageTooLargeError, match="64 pixels exceeds the limit of 10"):
        read_image(path, max_pixels=10)


def test_no_file_meta_generated(tmp_path):
    ds = Dataset()
    ds.Modality, ds.BodyPartExamined = "CR", "CHEST"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 8, 8, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = RAMP12.tobytes()
    path = tmp_path / "nometa.dcm"
    pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True)  # no preamble, no file meta
    assert path.read_bytes()[128:132] != b"DICM"
    img, meta = read_dicom(path)
    np.testing.assert_allclose(img, RAMP12 / 4032, atol=1e-7)


def test_modalities_documented():
    assert set(RADIOGRAPH_MODALITIES) == {"CR", "DX", "RG", "DR"}
