"""Compare two image folders (``pneumoscope data compare``): intensity histograms, original sizes, quality flags,
and model embeddings (Fréchet distance, Mahalanobis distance to a reference fitted on the first folder)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.spatial.distance import jensenshannon
from scipy.stats import wasserstein_distance

from pneumoscope.data.cache import decode_all
from pneumoscope.data.folders import expand_paths
from pneumoscope.data.quality import image_warnings
from pneumoscope.data.summary import image_size
from pneumoscope.errors import DatasetLayoutError
from pneumoscope.inference.embedding import EmbeddingReference, embed, feature_layer
from pneumoscope.inference.loader import load


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

    d = decode_all(paths, 128, progress=progress)
    imgs = d.images[d.ok]
    hist = np.bincount((imgs.ravel().astype(np.int64) * BINS) // 256, minlength=BINS).astype(np.float64)
    hist /= max(hist.sum(), 1.0)
    sizes = [image_size(p) for p, ok in zip(paths, d.ok) if ok]
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
