"""Is this image like the training data? Model-free image flags, an embedding reference, and data compare.

Three tools, cheapest first:

- ``image_warnings``: model-free checks of one image (blank, exposure, colour, mostly background, inverted
  polarity, strong left-right asymmetry, small original). Thresholds are in ``LIMITS``; they were set on the
  5,216 shared training images (at 64 x 64), of which about 0.5 % get any flag.
- ``EmbeddingReference``: Mahalanobis distance of a model's pooled last features to those of training images
  (Ledoit-Wolf shrunk covariance); an image beyond the 99th percentile of out-of-fold training distances is flagged.
- ``data_compare``: two folders side by side: intensity histograms, original sizes, model embeddings.

A flag is a reason to look, not a diagnosis: an unflagged image can still be outside what the model has seen.
See docs/trust.md.
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

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


# ------------------------------------------------------------------------------------------- model-free flags
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
            from pneumoscope.errors import IntensityRangeError

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
    from PIL import Image

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
    detected: ``read_image`` already converts to grey; ``file_warnings`` keeps the colour). ``meta``: the dict of
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


def file_warnings(path: str | Path, min_side: int | None = None) -> list[str]:
    """``image_warnings`` of a file, colour kept for JPEG/PNG; DICOM through ``read_image`` (its warnings added)."""
    from pneumoscope.data.images import is_dicom_file, read_image

    path = Path(path)
    if is_dicom_file(path):
        img, meta = read_image(path)
        return list(meta.get("warnings", [])) + image_warnings(img, meta, min_side)
    from PIL import Image, ImageOps

    from pneumoscope.data.images import PIL_ERRORS
    from pneumoscope.errors import ImageReadError

    try:
        with Image.open(path) as src:
            im = ImageOps.exif_transpose(src)
            arr = np.asarray(im.convert("RGB") if im.mode not in ("L", "I;16", "I;16B", "I;16L", "I") else im)
    except PIL_ERRORS as e:
        raise ImageReadError(f"{path}: cannot decode ({type(e).__name__}: {e})") from e
    if arr.dtype not in (np.uint8, np.uint16):
        arr = np.clip(arr, 0, 65535).astype(np.uint16)
    return image_warnings(arr, None, min_side)


# ------------------------------------------------------------------------------------------- embeddings
def feature_layer(model) -> str:
    """Name of the module whose INPUT, average-pooled over space when it is a feature map, is the embedding.

    The last feature map or pooled vector before the classifier, like FID's pooled features: generic image
    features, less class-collapsed than the last hidden layer of the head.

    seed_cnn: ``backbone.flatten`` (128 channels of the last conv block, pooled); cnn_rnn: ``head`` (128 channels
    of the last conv block, pooled; before the GRU); efficientnet_lite0: ``head`` (1280, pooled by the backbone);
    densenet121: ``head`` (1024); resnet18: ``head`` (512).
    """
    from torch import nn

    last = list(model.backbone.children())[-1] if len(list(model.backbone.children())) else None
    return "backbone." + list(model.backbone._modules)[-1] if isinstance(last, nn.Flatten) else "head"


def embed(predictor, images_u8: np.ndarray) -> np.ndarray:
    """Embeddings (N, D) float32 of uint8 images (N, S, S) at the model input size (see ``feature_layer``).

    The hook is removed afterwards; the model is left as it was.
    """
    model = predictor.model
    module = dict(model.named_modules())[feature_layer(model)]
    feats: list[np.ndarray] = []

    def hook(_m, inp) -> None:
        x = inp[0].detach().float()
        feats.append((x.mean(dim=(2, 3)) if x.dim() == 4 else x.flatten(1)).cpu().numpy())

    handle = module.register_forward_pre_hook(hook)
    try:
        predictor.logits(np.asarray(images_u8))
    finally:
        handle.remove()
    return np.concatenate(feats).astype(np.float32)


@dataclass
class EmbeddingReference:
    """Gaussian model of training embeddings: ``distance`` = Mahalanobis, ``flag`` = beyond the threshold."""

    mean: np.ndarray  # (D,) float32
    precision: np.ndarray  # (D, D) float32, inverse of the Ledoit-Wolf covariance
    threshold: float  # the ``quantile`` of the fitting images' distances
    quantile: float = 0.99
    layer: str = ""
    n_fit: int = 0

    @classmethod
    def fit(cls, features: np.ndarray, quantile: float = 0.99, layer: str = "", folds: int = 5,
            seed: int = 0) -> "EmbeddingReference":
        """Fit mean and Ledoit-Wolf precision on training features (N, D).

        The threshold is the ``quantile`` of *out-of-fold* distances (``folds``-fold: each image measured against
        a fit without it). In-sample distances are biased low, badly so when N is not much larger than D, and
        would flag most new in-distribution images; out-of-fold ones flag about 1 - quantile of them.
        """
        from sklearn.covariance import LedoitWolf

        X = np.asarray(features, dtype=np.float64)
        if X.ndim != 2 or X.shape[0] < 2 * folds:
            raise ValueError(f"EmbeddingReference.fit needs features (N >= {2 * folds}, D), got shape {X.shape}")
        lw = LedoitWolf().fit(X)
        ref = cls(mean=lw.location_.astype(np.float32), precision=lw.precision_.astype(np.float32), threshold=0.0,
                  quantile=quantile, layer=layer, n_fit=int(X.shape[0]))
        fold = np.random.default_rng(seed).permutation(X.shape[0]) % folds
        oof = np.empty(X.shape[0])
        for k in range(folds):
            part = LedoitWolf().fit(X[fold != k])
            diff = X[fold == k] - part.location_
            oof[fold == k] = np.sqrt(np.maximum(np.einsum("nd,de,ne->n", diff, part.precision_, diff), 0.0))
        ref.threshold = float(np.quantile(oof, quantile))
        return ref

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row (or of one vector) to the training mean."""
        X = np.atleast_2d(np.asarray(features, dtype=np.float64)) - self.mean.astype(np.float64)
        d2 = np.einsum("nd,de,ne->n", X, self.precision.astype(np.float64), X)
        d = np.sqrt(np.maximum(d2, 0.0))
        return d if np.ndim(features) == 2 else d[0]

    def flag(self, features: np.ndarray):
        """True where the distance exceeds the threshold: a bool for one vector, a bool array for (N, D)."""
        f = self.distance(features) > self.threshold
        return f if np.ndim(f) else bool(f)

    def to_dict(self) -> dict:
        """Tensors and plain values only (``torch.load(weights_only=True)`` reads it back inside a checkpoint).

        seed_cnn and cnn_rnn (D=128): (128 + 128 x 128) float32 = 66 kB; resnet18 1 MB; densenet121 4.2 MB;
        efficientnet_lite0 6.6 MB.
        """
        import torch

        return {"mean": torch.from_numpy(self.mean.astype(np.float32)),
                "precision": torch.from_numpy(self.precision.astype(np.float32)),
                "threshold": float(self.threshold), "quantile": float(self.quantile), "layer": self.layer,
                "n_fit": int(self.n_fit)}

    @classmethod
    def from_dict(cls, d: dict) -> "EmbeddingReference":
        def arr(v) -> np.ndarray:
            return (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)).astype(np.float32)

        return cls(mean=arr(d["mean"]), precision=arr(d["precision"]), threshold=float(d["threshold"]),
                   quantile=float(d.get("quantile", 0.99)), layer=str(d.get("layer", "")), n_fit=int(d.get("n_fit", 0)))


def reference_from_images(predictor, images_u8: np.ndarray, quantile: float = 0.99) -> EmbeddingReference:
    """Fit an ``EmbeddingReference`` on uint8 images (N, S, S) at the model input size."""
    return EmbeddingReference.fit(embed(predictor, images_u8), quantile, feature_layer(predictor.model))


def reference_for_checkpoint(checkpoint: str | Path, data_dir: str | Path, limit: int = 2000, seed: int = 0,
                             progress: bool = False) -> EmbeddingReference:
    """Fit on (at most ``limit``, stratified) images of the checkpoint's own training split, re-made from its config.

    Put ``ref.to_dict()`` into the checkpoint (e.g. under ``"ood_reference"``) to ship it with the model.
    """
    from pneumoscope.checkpoint import load_checkpoint
    from pneumoscope.config import resolve
    from pneumoscope.data.cache import decode_all
    from pneumoscope.data.prepare import split_samples, subset
    from pneumoscope.errors import CheckpointError
    from pneumoscope.predict import load

    ckpt = load_checkpoint(checkpoint)
    if not ckpt.get("config"):
        raise CheckpointError(f"{checkpoint} stores no training config: its training split cannot be re-made")
    train_s, _, _, _ = split_samples(resolve(dict(ckpt["config"]), data=str(data_dir), limit=0, progress=False))
    train_s = subset(train_s, limit, seed)
    predictor = load(checkpoint)
    d = decode_all([s.path for s in train_s], predictor.preprocess.input_size, progress=progress)
    return reference_from_images(predictor, d.images[d.ok])


# ------------------------------------------------------------------------------------------- data compare
def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a (N, D) and b (M, D) (the FID formula).

    ``tr sqrt(S1 S2)`` is computed as ``tr sqrt(S1^1/2 S2 S1^1/2)`` (a symmetric PSD matrix: stable, real, no warning
    when N < D makes the covariances singular). With fewer images than dimensions the value is noisy and biased
    upwards: compare distances computed with the same number of images.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    r1 = _sqrt_psd(s1)
    m = r1 @ s2 @ r1
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2.0), 0.0, None)).sum())
    return float(max(0.0, ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean))


def _pick(folder: str | Path, limit: int, seed: int) -> list[Path]:
    from pneumoscope.errors import DatasetLayoutError
    from pneumoscope.predict import expand_paths

    paths = expand_paths([folder])
    if not Path(folder).is_dir() or not paths:
        raise DatasetLayoutError(f"{folder}: not a folder holding image or DICOM files")
    if limit and len(paths) > limit:
        idx = np.sort(np.random.default_rng(seed).choice(len(paths), size=limit, replace=False))
        paths = [paths[i] for i in idx]
    return paths


BINS = 64


def _describe(paths: list[Path], progress: bool) -> dict:
    """Pooled intensity histogram (at 128 px), original sizes and image_warnings of a list of files."""
    from pneumoscope.data.cache import decode_all
    from pneumoscope.data.summary import _image_size

    d = decode_all(paths, 128, progress=progress)
    imgs = d.images[d.ok]
    hist = np.bincount((imgs.ravel().astype(np.int64) * BINS) // 256, minlength=BINS).astype(np.float64)
    hist /= max(hist.sum(), 1.0)
    sizes = [_image_size(p) for p, ok in zip(paths, d.ok) if ok]
    flagged = 0
    for img, size in zip(imgs, sizes):
        meta = {"original_size": size} if size else None
        flagged += bool(image_warnings(img, meta))
    short = np.array([min(s) for s in sizes if s], dtype=np.float64)
    aspect = np.array([s[1] / s[0] for s in sizes if s], dtype=np.float64)
    return {"n": int(len(imgs)), "unreadable": [str(p) for p, _ in d.errors], "hist": hist, "short_side": short,
            "summary": {"n": int(len(imgs)), "mean_intensity": float(imgs.mean() / 255.0) if len(imgs) else None,
                        "short_side_median": float(np.median(short)) if short.size else None,
                        "short_side_min": float(short.min()) if short.size else None,
                        "short_side_max": float(short.max()) if short.size else None,
                        "aspect_median": float(np.median(aspect)) if aspect.size else None,
                        "flagged_fraction": flagged / max(len(imgs), 1)}}


def data_compare(reference_dir: str | Path, target_dir: str | Path, checkpoint: str | Path | None = None,
                 out: str | Path | None = None, limit: int = 500, seed: int = 0, progress: bool = False) -> dict:
    """Compare two image folders (at most ``limit`` seeded-random files each, sub-folders included).

    - intensity: Jensen-Shannon distance (base 2, 0..1) and Wasserstein distance (intensity units 0..1) of the
      pooled 64-bin intensity histograms;
    - size: Wasserstein distance (px) of the original short sides, medians;
    - ``flagged_fraction``: images with any ``image_warnings``;
    - with ``checkpoint``: Fréchet distance of the model embeddings, and the Mahalanobis distance of target
      images to an ``EmbeddingReference`` fitted on the reference images (mean, and fraction beyond its 99th
      percentile: about 0.01 when the target is like the reference).

    With ``out``: writes compare.json, compare.md and compare.png there. Returns the JSON-ready dict.
    """
    from scipy.spatial.distance import jensenshannon
    from scipy.stats import wasserstein_distance

    ref_paths, tgt_paths = _pick(reference_dir, limit, seed), _pick(target_dir, limit, seed)
    ref, tgt = _describe(ref_paths, progress), _describe(tgt_paths, progress)
    centres = (np.arange(BINS) + 0.5) / BINS
    result: dict = {
        "reference": str(reference_dir), "target": str(target_dir), "limit": limit, "seed": seed,
        "reference_summary": ref["summary"], "target_summary": tgt["summary"],
        "intensity_js": float(jensenshannon(ref["hist"], tgt["hist"], base=2)),
        "intensity_wasserstein": float(wasserstein_distance(centres, centres, ref["hist"], tgt["hist"])),
        "size_wasserstein_px": (float(wasserstein_distance(ref["short_side"], tgt["short_side"]))
                                if ref["short_side"].size and tgt["short_side"].size else None),
        "unreadable": ref["unreadable"] + tgt["unreadable"],
    }
    if checkpoint is not None:
        result.update(_embedding_compare(checkpoint, ref_paths, tgt_paths, progress))
    if out is not None:
        _write_compare(result, ref["hist"], tgt["hist"], ref["short_side"], tgt["short_side"], Path(out))
    return result


def _embedding_compare(checkpoint, ref_paths: list[Path], tgt_paths: list[Path], progress: bool) -> dict:
    from pneumoscope.data.cache import decode_all
    from pneumoscope.predict import load

    predictor = load(checkpoint)
    size = predictor.preprocess.input_size
    fr = embed(predictor, decode_all(ref_paths, size, progress=progress).images)
    ft = embed(predictor, decode_all(tgt_paths, size, progress=progress).images)
    reference = EmbeddingReference.fit(fr, layer=feature_layer(predictor.model))
    dt = reference.distance(ft)
    return {"checkpoint": str(checkpoint), "embedding_layer": reference.layer, "embedding_dim": int(fr.shape[1]),
            "embedding_frechet": frechet_distance(fr, ft),
            "mahalanobis_reference_mean": float(reference.distance(fr).mean()),
            "mahalanobis_target_mean": float(dt.mean()), "mahalanobis_threshold": reference.threshold,
            "target_flagged_fraction": float((dt > reference.threshold).mean())}


def _write_compare(r: dict, h_ref, h_tgt, s_ref, s_tgt, out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(r, indent=2))

    def f(v) -> str:
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    rs, ts = r["reference_summary"], r["target_summary"]
    lines = ["# Data compare\n", f"Reference `{r['reference']}`, target `{r['target']}` (at most {r['limit']} files each).\n",
             "| | reference | target |", "| --- | ---: | ---: |"]
    lines += [f"| {k.replace('_', ' ')} | {f(rs[k])} | {f(ts[k])} |" for k in rs]
    lines += ["", "| distance | value |", "| --- | ---: |"]
    keys = ["intensity_js", "intensity_wasserstein", "size_wasserstein_px", "embedding_frechet",
            "mahalanobis_reference_mean", "mahalanobis_target_mean", "mahalanobis_threshold", "target_flagged_fraction"]
    lines += [f"| {k} | {f(r[k])} |" for k in keys if k in r]
    (out / "compare.md").write_text("\n".join(lines) + "\n")

    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    a1, a2 = fig.subplots(1, 2)
    centres = (np.arange(BINS) + 0.5) / BINS
    a1.plot(centres, h_ref, label="reference")
    a1.plot(centres, h_tgt, label="target")
    a1.set_xlabel("intensity")
    a1.set_ylabel("fraction of pixels")
    a1.set_title(f"intensity (JS distance {r['intensity_js']:.3f})")
    a1.legend()
    if len(s_ref) or len(s_tgt):
        a2.hist([s_ref, s_tgt], bins=20, label=["reference", "target"])
        a2.legend()
    a2.set_xlabel("original short side (px)")
    a2.set_title("original sizes")
    fig.savefig(out / "compare.png", dpi=100)


def _cli_compare(args: argparse.Namespace) -> int:
    r = data_compare(args.reference, args.target, args.checkpoint, args.out, limit=args.limit, progress=True)
    keys = ("intensity_js", "intensity_wasserstein", "size_wasserstein_px", "embedding_frechet", "target_flagged_fraction")
    log.info("%s%s", ", ".join(f"{k} {r[k]:.4g}" for k in keys if r.get(k) is not None),
             f"; report in {args.out}" if args.out else "")
    if not args.out:
        import sys

        sys.stdout.write(json.dumps(r, indent=2) + "\n")
    return 0


def register_data_compare(data_sub) -> argparse.ArgumentParser:
    """Add ``data compare --reference A --target B [--checkpoint C] [--out DIR] [--limit N]`` to ``data``'s sub-parsers."""
    s = data_sub.add_parser("compare", help="compare two image folders: intensities, sizes, model embeddings")
    s.add_argument("--reference", required=True, help="folder of images the model knows (e.g. the training data)")
    s.add_argument("--target", required=True, help="folder of new images (e.g. another hospital's)")
    s.add_argument("--checkpoint", help="best.pt: also compare the model's embeddings")
    s.add_argument("--out", help="write compare.json/.md/.png here (default: JSON on stdout)")
    s.add_argument("--limit", type=int, default=500, help="at most N files per folder (default 500; 0 = all)")
    s.set_defaults(func=_cli_compare)
    return s
