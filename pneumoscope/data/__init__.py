"""The chest X-ray data layer: every source read into one sample type with one checked intensity range.

Images are float32 HxW arrays in [0, 1] (``images.check_intensity``); datasets in memory are uint8 (N, S, S).
"""
from pneumoscope.data.cache import Decoded, decode_all
from pneumoscope.data.folders import (
    LABEL_SETS,
    Dataset,
    Sample,
    check_no_cross_split_duplicates,
    find_duplicates,
    patient_id_from_name,
    scan,
    split_by_patient,
)
from pneumoscope.data.images import check_intensity, read_image, read_image_bytes

__all__ = [
    "LABEL_SETS", "Dataset", "Decoded", "Sample", "check_intensity", "check_no_cross_split_duplicates",
    "decode_all", "find_duplicates", "patient_id_from_name", "read_image", "read_image_bytes", "scan",
    "split_by_patient",
]
