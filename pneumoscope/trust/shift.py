"""Device / acquisition shift study: how a checkpoint degrades under controlled image changes.

Each shift maps uint8 images (H, W) or (N, H, W) (numpy, or a torch tensor: returned as one) to uint8 images
of the same shape, deterministically (``seed`` feeds the only random one, ``noise``). Strength 0 is the
identity for every shift. Shifts are applied to the images at the model input size S, not to the originals
(fast, and what the model sees; a real device changes the original before the resize). Spatial strengths are
given for a 224-px image and scaled by S/224, so one table means the same physical change for every model.

``SHIFTS = {name: (function, strengths)}``, MedMNIST-style:

- ``blur``: Gaussian blur, sigma in px at 224 px (focus, motion, detector MTF);
- ``noise``: additive Gaussian noise, std as a fraction of the full range (quantum/electronic noise, taken as
  signal-independent); clipped to 0..255;
- ``gamma``: x -> x ** (2 ** strength) on [0, 1] (another detector response curve / post-processing LUT);
- ``contrast``: (1 - strength) x contrast around the image mean (scatter, under-penetration; < 0 raises it);
- ``jpeg``: re-compression at quality 100 - strength (PACS export, screenshots);
- ``downsample``: shrink by 2 ** strength (area average) and back up (bilinear) (lower-resolution detector);
- ``crop``: remove a border of ``strength`` of each side in total (half per edge), resize back (collimation, zoom);
- ``invert``: blend towards 255 - x; 1 = inverted polarity (MONOCHROME1 read as MONOCHROME2).

``shift_study`` evaluates a checkpoint on its own validation split (re-made from the checkpoint's config, so it
never touches training images) under every shift and strength and writes ``shift.md``, ``shift.json``, ``shift.png``.
"""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from scipy.ndimage import gaussian_filter

from pneumoscope.data.cache import decode_all
from pneumoscope.data.splits import subset
from pneumoscope.errors import ConfigError, DatasetLayoutError
from pneumoscope.evaluation.evaluate import evaluation_samples
from pneumoscope.evaluation.metrics import binary_metrics
from pneumoscope.inference.loader import load
from pneumoscope.inference.runtime import pneumonia_score
from pneumoscope.models.checkpoint import load_checkpoint

log = logging.getLogger(__name__)

REFERENCE_SIZE = 224


# ------------------------------------------------------------------------------------------- helpers
def _as_batch(images) -> tuple[np.ndarray, Callable]:
    """(N, H, W) uint8 numpy view of ``images`` and a function that restores the caller's shape and type."""
    is_torch = type(images).__module__.startswith("torch")
    arr = images.detach().cpu().numpy() if is_torch else np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise ValueError(f"shifts need uint8 images (H, W) or (N, H, W), got {arr.dtype} {arr.shape}")
    single = arr.ndim == 2
    batch = arr[None] if single else arr

    def restore(out: np.ndarray):
        out = out[0] if single else out
        if is_torch:
            return torch.from_numpy(np.ascontiguousarray(out))
        return out

    return batch, restore


def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _resize(img: np.ndarray, w: int, h: int, resample) -> np.ndarray:
    return np.asarray(Image.fromarray(np.ascontiguousarray(img), mode="L").resize((w, h), resample), dtype=np.uint8)


# ------------------------------------------------------------------------------------------- shifts
def blur(images, sigma: float, seed: int = 0):
    """Gaussian blur; ``sigma`` in px of a 224-px image (scaled to the actual size)."""

    x, restore = _as_batch(images)
    if sigma <= 0:
        return restore(x.copy())
    s = sigma * x.shape[-1] / REFERENCE_SIZE
    return restore(_to_u8(gaussian_filter(x.astype(np.float32), sigma=(0, s, s), mode="reflect")))


def noise(images, std: float, seed: int = 0):
    """Additive Gaussian noise, ``std`` as a fraction of 255, seeded, clipped to 0..255."""
    x, restore = _as_batch(images)
    if std <= 0:
        return restore(x.copy())
    rng = np.random.default_rng(seed)
    return restore(_to_u8(x.astype(np.float32) + rng.normal(0.0, std * 255.0, size=x.shape).astype(np.float32)))


def gamma(images, strength: float, seed: int = 0):
    """x -> 255 * (x / 255) ** (2 ** strength): < 0 brightens mid-tones, > 0 darkens them."""
    x, restore = _as_batch(images)
    if strength == 0:
        return restore(x.copy())
    lut = _to_u8(255.0 * (np.arange(256) / 255.0) ** (2.0 ** strength))
    return restore(lut[x])


def contrast(images, strength: float, seed: int = 0):
    """Scale the deviation from each image's mean by (1 - strength)."""
    x, restore = _as_batch(images)
    if strength == 0:
        return restore(x.copy())
    f = x.astype(np.float32)
    mean = f.mean(axis=(1, 2), keepdims=True)
    return restore(_to_u8(mean + (1.0 - strength) * (f - mean)))


def jpeg(images, strength: float, seed: int = 0):
    """Re-compress with Pillow at JPEG quality 100 - strength (strength 0: untouched)."""

    x, restore = _as_batch(images)
    if strength <= 0:
        return restore(x.copy())
    quality = int(round(max(1.0, min(100.0, 100.0 - strength))))
    out = np.empty_like(x)
    for i, img in enumerate(x):
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(img), mode="L").save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        out[i] = np.asarray(Image.open(buf).convert("L"), dtype=np.uint8)
    return restore(out)


def downsample(images, strength: float, seed: int = 0):
    """Shrink by 2 ** strength (box filter) and resize back up (bilinear): resolution loss."""

    x, restore = _as_batch(images)
    if strength <= 0:
        return restore(x.copy())
    h, w = x.shape[1:]
    f = 2.0 ** strength
    sw, sh = max(1, int(round(w / f))), max(1, int(round(h / f)))
    out = np.stack([_resize(_resize(img, sw, sh, Image.Resampling.BOX), w, h, Image.Resampling.BILINEAR) for img in x])
    return restore(out)


def crop(images, strength: float, seed: int = 0):
    """Remove ``strength`` of each side in total (half at each edge) and resize back (bilinear)."""

    x, restore = _as_batch(images)
    if strength <= 0:
        return restore(x.copy())
    if strength >= 1:
        raise ValueError(f"crop strength {strength} must be < 1 (fraction of the side removed)")
    h, w = x.shape[1:]
    dy, dx = int(round(h * strength / 2)), int(round(w * strength / 2))
    out = np.stack([_resize(img[dy:h - dy, dx:w - dx], w, h, Image.Resampling.BILINEAR) for img in x])
    return restore(out)


def invert(images, strength: float = 1.0, seed: int = 0):
    """Blend towards the negative: (1 - s) x + s (255 - x); strength 1 = polarity flip (its own inverse)."""
    x, restore = _as_batch(images)
    if strength <= 0:
        return restore(x.copy())
    if strength >= 1:
        return restore(255 - x)
    f = x.astype(np.float32)
    return restore(_to_u8((1.0 - strength) * f + strength * (255.0 - f)))


SHIFTS: dict[str, tuple[Callable, list[float]]] = {
    "blur": (blur, [0, 1, 2, 4, 8]),
    "noise": (noise, [0, 0.02, 0.05, 0.1, 0.2]),
    "gamma": (gamma, [-1, -0.5, 0, 0.5, 1]),
    "contrast": (contrast, [-0.5, 0, 0.25, 0.5, 0.75]),
    "jpeg": (jpeg, [0, 50, 80, 90, 95]),
    "downsample": (downsample, [0, 1, 2, 3]),
    "crop": (crop, [0, 0.1, 0.2, 0.3]),
    "invert": (invert, [0, 1]),
}


def apply(name: str, images, strength: float, seed: int = 0):
    """Apply shift ``name`` of ``SHIFTS`` at ``strength``."""

    if name not in SHIFTS:
        raise ConfigError(f"unknown shift {name!r}; choose from {', '.join(SHIFTS)}")
    return SHIFTS[name][0](images, strength, seed=seed)


# ------------------------------------------------------------------------------------------- study
def _metrics(y: np.ndarray, logits: np.ndarray, predictor) -> dict:
    p = pneumonia_score(logits, predictor.temperature or 1.0, predictor.calibration_bias)
    m = binary_metrics(y, p, predictor.threshold)
    return {"auc": m["auc"], "accuracy": m["accuracy"], "sensitivity": m["sensitivity"],
            "specificity": m["specificity"], "mean_probability": float(p.mean())}


def shift_study(checkpoint: str | Path, data_dir: str | Path, out_dir: str | Path, split: str | None = None,
                shifts: list[str] | dict | None = None, limit: int = 0, seed: int = 0, device: str = "auto",
                progress: bool = True) -> list[dict]:
    """AUC, and accuracy / sensitivity / specificity at the stored threshold, under every shift and strength.

    ``shifts``: names of ``SHIFTS`` (default all) or a ``{name: strengths}`` dict. ``limit``: evaluate at most this
    many images (stratified, seeded). Rows: ``{shift, strength, n, auc, accuracy, sensitivity, specificity,
    mean_probability, auc_drop}``; strength 0 rows are the clean images. Writes shift.md/.json/.png to ``out_dir``.
    """

    if shifts is None:
        table = {n: strengths for n, (_, strengths) in SHIFTS.items()}
    else:
        table = dict(shifts) if isinstance(shifts, dict) else {n: SHIFTS[n][1] if n in SHIFTS else [] for n in shifts}
    unknown = [n for n in table if n not in SHIFTS]
    if unknown:
        raise ConfigError(f"unknown shift(s) {unknown}; choose from {', '.join(SHIFTS)}")
    ckpt = load_checkpoint(checkpoint)
    predictor = load(checkpoint, device=device)
    samples, how = evaluation_samples(ckpt, data_dir, split)
    samples = subset(samples, limit, seed)
    d = decode_all([s.path for s in samples], predictor.preprocess.input_size, progress=progress)
    keep = np.flatnonzero(d.ok)
    if len(keep) == 0:
        raise DatasetLayoutError(f"{data_dir}: no readable image to evaluate")
    images = d.images[keep]
    y = (np.array([samples[i].label for i in keep]) > 0).astype(int)
    log.info("shift study of %s on %d images (%s)", checkpoint, len(y), how)

    clean = _metrics(y, predictor.logits(images), predictor)
    rows: list[dict] = []
    for name, strengths in table.items():
        for s in strengths:
            m = clean if s == 0 else _metrics(y, predictor.logits(apply(name, images, s, seed=seed)), predictor)
            drop = None if m["auc"] is None or clean["auc"] is None else clean["auc"] - m["auc"]
            rows.append({"shift": name, "strength": float(s), "n": int(len(y)), **m, "auc_drop": drop})
            log.info("%-10s %6g  AUC %s  accuracy %.3f", name, s, f"{m['auc']:.4f}" if m["auc"] is not None else "-",
                     m["accuracy"])
    write_shift_report(rows, out_dir, {"checkpoint": str(checkpoint), "data": str(data_dir), "images": how,
                                       "n": int(len(y)), "threshold": predictor.threshold,
                                       "temperature": predictor.temperature,
                                       "calibration_bias": predictor.calibration_bias, "seed": seed})
    return rows


def write_shift_report(rows: list[dict], out_dir: str | Path, info: dict) -> Path:
    """shift.json (info + rows), shift.md (one table), shift.png (AUC vs strength, one panel per shift)."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "shift.json").write_text(json.dumps({**info, "rows": rows}, indent=2))

    def f(v) -> str:
        return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.3f}"

    lines = ["# Acquisition shift study\n", f"Checkpoint `{info.get('checkpoint')}`, {info.get('n')} images "
             f"({info.get('images')}); threshold {f(info.get('threshold'))}. Strength 0 = clean images.\n",
             "| shift | strength | AUC | AUC drop | accuracy | sensitivity | specificity | mean p |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['shift']} | {r['strength']:g} | {f(r['auc'])} | {f(r['auc_drop'])} | {f(r['accuracy'])} | "
                     f"{f(r['sensitivity'])} | {f(r['specificity'])} | {f(r['mean_probability'])} |")
    (out / "shift.md").write_text("\n".join(lines) + "\n")

    names = list(dict.fromkeys(r["shift"] for r in rows))
    ncols = max(1, min(4, len(names)))
    nrows = -(-len(names) // ncols)
    fig = Figure(figsize=(3.2 * ncols, 2.8 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, name in zip(axes, names):
        rs = sorted((r for r in rows if r["shift"] == name), key=lambda r: r["strength"])
        ax.plot([r["strength"] for r in rs], [np.nan if r["auc"] is None else r["auc"] for r in rs], "o-")
        ax.set_title(name)
        ax.set_xlabel("strength")
        ax.set_ylabel("AUC")
        ax.set_ylim(0.0, 1.02)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.savefig(out / "shift.png", dpi=100)
    return out / "shift.png"
