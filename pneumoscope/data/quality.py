"""Model-free quality checks of one image: blank, exposure, colour, mostly background, inverted polarity, strong
left-right asymmetry, small original. Thresholds are in ``LIMITS``; they were set on the 5,216 shared training
images (at 64 x 64), of which about 0.5 % get any flag. A flag is a reason to look, not a diagnosis.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from pneumoscope.errors import IntensityRangeError

# Thresholds of image_warnings (intensities in [0, 1], statistics of a 64 x 64 bilinear thumbnail). Shared
# training images (n=5216): mean 0.24-0.87 (0.5-99.5 % range 0.29-0.67), black fraction <= 0.36, white fraction
# <= 0.12, 1-99 percentile range >= 0.32, mediastinum minus lungs median +0.21 (< 0 for 2 images, 0.04 %), mirror
# correlation median 0.78 (< 0.1 for 0.5 %). Adult chest DICOMs (SIIM, NIH, CR): mediastinum minus lungs +0.22..+0.41.
LIMITS = {
    "blank_std": 0.02,  # intensity std below this: blank/constant
    "dark_mean": 0.15,  # mean below: very dark
    "bright_mean": 0.80,  # mean above: very bright
    "black_level": 0.05, "black_fraction": 0.45,  # more than 45 % of pixels below 0.05: mostly empty background
    "white_level": 0.95, "white_fraction": 0.30,  # more than 30 % above 0.95: saturated
    "min_range": 0.25,  # 99th - 1st percentile below: low contrast
    "min_mediastinum_minus_lungs": 0.0,  # lung fields brighter than the mediastinum: inverted polarity suspected
    "min_mirror_corr": 0.1,  # left-right mirror correlation below: not a frontal view (or a one-sided opacity)
    "colour": 0.02,  # mean |R-G| + |G-B| above: a colour image
    "min_side": 200,  # original short side below (px): small original
}
THUMB = 64


def _grey_float(image: np.ndarray) -> tuple[np.ndarray, float | None]:
    """(grey float32 HxW in [0, 1], colourfulness or None) from uint8/float grey or RGB(A) arrays."""
    a = np.asarray(image)
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    elif a.dtype == np.uint16:
        a = a.astype(np.float32) / 65535.0
    elif np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float32)
        if a.size and (not np.isfinite(a).all() or a.min() < 0 or a.max() > 1):
            raise IntensityRangeError(f"image_warnings: float image values must be finite in [0, 1], got "
                                      f"[{np.nanmin(a):.4g}, {np.nanmax(a):.4g}]")
    else:
        raise ValueError(f"image_warnings needs a uint8, uint16 or float image, got {a.dtype}")
    colourfulness = None
    if a.ndim == 3 and a.shape[2] in (3, 4):
        rgb = a[..., :3]
        colourfulness = float(np.abs(rgb[..., 0] - rgb[..., 1]).mean() + np.abs(rgb[..., 1] - rgb[..., 2]).mean())
        a = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601 luma, as read_image
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"image_warnings needs an HxW grey or HxWx3 RGB image, got shape {np.shape(image)}")
    return a, colourfulness


def _thumb(a: np.ndarray) -> np.ndarray:
    if a.shape == (THUMB, THUMB):
        return a
    return np.asarray(Image.fromarray(np.ascontiguousarray(a), mode="F").resize((THUMB, THUMB), Image.Resampling.BILINEAR))


def image_stats(image: np.ndarray) -> dict:
    """The statistics ``image_warnings`` judges (of a 64 x 64 thumbnail; ``colour`` needs an RGB array)."""
    a, colourfulness = _grey_float(image)
    t = np.clip(_thumb(a), 0.0, 1.0)
    S = THUMB
    rows = slice(int(0.25 * S), int(0.6 * S))
    # where the lung fields (air: dark) and the mediastinum/spine (bright) of a frontal chest film are
    lungs = np.concatenate([t[rows, int(0.15 * S):int(0.35 * S)].ravel(), t[rows, int(0.65 * S):int(0.85 * S)].ravel()])
    mediastinum = t[int(0.3 * S):int(0.7 * S), int(0.42 * S):int(0.58 * S)]
    std = float(t.std())
    mirror = float(np.corrcoef(t.ravel(), t[:, ::-1].ravel())[0, 1]) if std > 1e-6 else 1.0
    return {"mean": float(t.mean()), "std": std, "black_fraction": float((t < LIMITS["black_level"]).mean()),
            "white_fraction": float((t > LIMITS["white_level"]).mean()),
            "range": float(np.percentile(t, 99) - np.percentile(t, 1)),
            "mediastinum_minus_lungs": float(mediastinum.mean() - lungs.mean()),
            "mirror_corr": mirror, "colour": colourfulness, "shape": tuple(a.shape)}


def image_warnings(image: np.ndarray, meta: dict | None = None, min_side: int | None = None) -> list[str]:
    """Model-free flags of one image: an empty list when nothing looks unusual.

    ``image``: grey uint8/uint16/float [0, 1] HxW, or an RGB(A) HxWx3(4) array (only then can colour be
    detected: ``read_image`` already converts to grey; the intake (data/intake.py) keeps the colour). ``meta``: the dict of
    ``read_image``; its ``original_size`` is used for the size check, otherwise the array's own shape (so pass
    the original, not the model-size thumbnail). ``min_side`` defaults to ``LIMITS["min_side"]``.
    """
    s = image_stats(image)
    L = LIMITS
    if s["std"] < L["blank_std"]:
        return [f"blank or constant image (intensity std {s['std']:.3f}): nothing to read"]
    out = []
    if s["colour"] is not None and s["colour"] > L["colour"]:
        out.append(f"colour image (mean channel difference {s['colour']:.3f}): radiographs are grey; "
                   "a photo or a screenshot?")
    if s["mean"] < L["dark_mean"]:
        out.append(f"very dark image (mean intensity {s['mean']:.2f}): overexposed, mostly background, or wrong window")
    if s["mean"] > L["bright_mean"]:
        out.append(f"very bright image (mean intensity {s['mean']:.2f}): underexposed, inverted, or wrong window")
    if s["black_fraction"] > L["black_fraction"]:
        out.append(f"{100 * s['black_fraction']:.0f}% of the image is black: mostly empty background, "
                   "not a chest in the field?")
    if s["white_fraction"] > L["white_fraction"]:
        out.append(f"{100 * s['white_fraction']:.0f}% of the image is saturated white: burnt out or inverted")
    if s["range"] < L["min_range"]:
        out.append(f"low contrast (1st-99th percentile range {s['range']:.2f})")
    if s["mediastinum_minus_lungs"] < L["min_mediastinum_minus_lungs"]:
        out.append(f"lung fields brighter than the mediastinum ({s['mediastinum_minus_lungs']:+.2f}): inverted "
                   "polarity suspected (MONOCHROME1 shown as MONOCHROME2?)")
    if s["mirror_corr"] < L["min_mirror_corr"]:
        out.append(f"strongly left-right asymmetric (mirror correlation {s['mirror_corr']:.2f}): not a frontal chest "
                   "view, rotated, or a large one-sided opacity")
    size = (meta or {}).get("original_size") or s["shape"]
    limit = L["min_side"] if min_side is None else min_side
    if min(size[:2]) < limit:
        out.append(f"small original ({size[0]}x{size[1]} px, short side < {limit}): fine detail is lost")
    return out
