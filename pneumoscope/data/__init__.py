"""The chest X-ray data layer: every source read into one sample type with one checked intensity range.

Images are float32 HxW arrays in [0, 1] (``images.check_intensity``); datasets in memory are uint8 (N, S, S).
"""
from pneumoscope._lazy import lazy_api

__all__ = [
    "LABEL_SETS", "Dataset", "Decoded", "Sample", "check_intensity", "check_no_cross_split_duplicates",
    "decode_all", "expand_paths", "find_duplicates", "patient_id_from_name", "read_image", "read_image_bytes", "scan",
    "split_by_patient",
]
__getattr__, __dir__ = lazy_api(__name__, {
    **{n: "cache" for n in ("Decoded", "decode_all")},
    **{n: "folders" for n in ("LABEL_SETS", "Dataset", "Sample", "check_no_cross_split_duplicates", "expand_paths",
                              "find_duplicates", "patient_id_from_name", "scan", "split_by_patient")},
    **{n: "images" for n in ("check_intensity", "read_image", "read_image_bytes")},
})
