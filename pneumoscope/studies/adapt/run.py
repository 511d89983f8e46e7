"""``adapt(data, out)``: from a site's labelled films to a validated local model, ``DIR/model.pt``, and its report.

1. the films, decoded once; patient-level stratified folds (k from the number of patients);
2. every strategy (strategies.py) cross-validated on the same folds; the winner by the rule of docs/adapt.md;
3. the confounding check: the same CV for a model that sees only style (histogram, texture statistics, size),
   and the winner's Grad-CAM mass in the lung box;
4. the winner refitted on all films; its calibration and threshold from the out-of-fold predictions only; an
   out-of-distribution reference covering the base's images and the site's films;
5. a learning curve, the forgetting check on the base's own validation split, the base model's figures on the
   same films, and a verdict by a stated rule (report.py).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from pneumoscope.config import resolve, threshold_target
from pneumoscope.data.cache import decode_all
from pneumoscope.data.digest import file_digest
from pneumoscope.data.splits import split_samples
from pneumoscope.errors import CheckpointError, ConfigError
from pneumoscope.evaluation.calibration import fit_calibration_and_threshold
from pneumoscope.evaluation.evaluate import evaluation_samples
from pneumoscope.evaluation.metrics import binary_metrics, bootstrap_ci
from pneumoscope.inference.default_model import default_checkpoint
from pneumoscope.inference.embedding import EmbeddingReference, ReferenceSet
from pneumoscope.inference.features import NAME
from pneumoscope.inference.loader import load
from pneumoscope.inference.runtime import pneumonia_score
from pneumoscope.models.checkpoint import load_checkpoint, save_checkpoint
from pneumoscope.models.registry import create_model
from pneumoscope.studies.adapt import strategies as S
from pneumoscope.studies.adapt.finetune import cut_of
from pneumoscope.studies.adapt.report import write_report
from pneumoscope.studies.adapt.site import choose_k, load_site, patient_folds
from pneumoscope.studies.adapt.validate import (
    choose_winner,
    cross_validate,
    learning_curve,
    ood_rate,
)
from pneumoscope.studies.adapt.views import (
    cut_features,
    run_batches,
    style_features,
    trunk_features,
)
from pneumoscope.studies.select import lung_box_mass
from pneumoscope.trust.explain import heatmaps

log = logging.getLogger(__name__)

# The site reference's flag threshold: the 99.5 % quantile of out-of-fold distances. With 99 % (the base's), a
# reference fitted on half of site_nih's patients flagged 3.4-4.8 % of the other half (3 seeds), too close to the
# 5 % a site can accept; 99.5 % flagged 2.1-3.4 % there and still flagged 89-94 % of the base's children.
QUANTILE = 0.995
REPLAY_FILMS = 400  # base training images replayed by strategy d (half of each class)
GRADCAM_FILMS = 64
MIN_BASE_AUC = 0.90  # the adapted model's reference covers the base's images only if it still ranks them this well


def _base_data(ckpt: dict, base_data) -> Path | None:
    """The base model's training folder: ``base_data``, else the one its config names when it exists here."""
    if base_data:
        p = Path(base_data)
        if not p.is_dir():
            raise ConfigError(f"--base-data {p} is not a folder: pass the base model's training data folder")
        return p
    p = Path(str((ckpt.get("config") or {}).get("data") or ""))
    return p if str(p) not in ("", ".") and p.is_dir() else None


def _replay(ckpt: dict, base_dir: Path, n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint8 images, labels, patient ids) of ``n`` images of the base's own training split, half of each class."""
    train, _, _, _ = split_samples(resolve(dict(ckpt["config"]), data=str(base_dir), limit=0, progress=False))
    rng = np.random.default_rng(seed)
    pick = [int(i) for c in (0, 1) for i in rng.permutation([j for j, s in enumerate(train) if s.label == c])[: n // 2]]
    d = decode_all([train[i].path for i in pick], size, progress=False)
    return (d.images[d.ok], np.array([train[i].label for i in pick])[d.ok],
            np.array(["base:" + train[i].patient_id for i in pick])[d.ok])


def _forgetting(model, base_pred, ckpt: dict, base_dir: Path) -> dict:
    """AUC of the adapted and of the base model on the base's own validation split (does the new model forget?)."""
    samples, how = evaluation_samples(ckpt, base_dir)
    d = decode_all([s.path for s in samples], model.preprocess.input_size, progress=False)
    y = np.array([s.label for s in samples])[d.ok]
    adapted = binary_metrics(y, pneumonia_score(run_batches(model, d.images[d.ok], model.preprocess)))["auc"]
    base = binary_metrics(y, pneumonia_score(base_pred.logits(d.images[d.ok])))["auc"]
    return {"split": how, "n": int(len(y)), "auc_adapted": adapted, "auc_base": base}


def _base_on_site(base_pred, films, quality: list[list[str]]) -> dict:
    """The base model as shipped, on the site's films: AUC, and the label at its stored threshold."""
    logits = base_pred.logits(films.images)
    p = pneumonia_score(logits, base_pred.temperature or 1.0, base_pred.calibration_bias)
    m = binary_metrics(films.y, p, base_pred.threshold)
    ci = bootstrap_ci(films.y, p, base_pred.threshold, groups=films.patients)
    assessed = np.array([a.assessed for a in base_pred.assess(films.images, quality)])
    return {"auc": m["auc"], "auc_ci": ci["auc"], "sensitivity": m["sensitivity"], "specificity": m["specificity"],
            "threshold": base_pred.threshold, "not_assessed": float((~assessed).mean()), "logits": logits[:, 0]}


def adapt(data: str | Path, out: str | Path, checkpoint: str | Path | None = None, base_data: str | Path | None = None,
          seed: int = 0, progress: bool = False, replay_films: int = REPLAY_FILMS, threshold: str = "youden") -> dict:
    """Adapt ``checkpoint`` (None = the bundled default model) to the labelled films of ``data``; write
    ``out/model.pt``, ``out/report.md``, ``out/report.json`` and plots; return the report. ``base_data``: the
    base's training folder (replay of ``replay_films`` of its images, and the forgetting check). ``threshold``: how
    the operating point is chosen on out-of-fold predictions (youden, sensitivity:T or specificity:T)."""
    threshold_target(threshold)  # a bad method fails here, before any film is read
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base_path = Path(checkpoint) if checkpoint else default_checkpoint()
    ckpt = load_checkpoint(base_path)
    if len(ckpt["label_names"]) != 2:
        raise CheckpointError(f"{base_path} is a {len(ckpt['label_names'])}-class model; adapt needs a binary one")
    base_pred = load(base_path, device="cpu")
    base = base_pred.model.eval()
    effnet = hasattr(getattr(base, "backbone", None), "_blocks")  # an EfficientNet-Lite base (Lite0/1/2)
    size = base_pred.preprocess.input_size
    films = load_site(data, size, progress)
    y, patients = films.y, films.patients
    k = choose_k(y, patients)
    fold = patient_folds(y, patients, k, seed)
    log.info("%d-fold cross-validation by patient", k)
    quality = films.quality
    base_dir = _base_data(ckpt, base_data)

    t = time.perf_counter()
    imagenet = create_model("efficientnet_lite0", pretrained=True, image_size=size).eval()
    # the base as strategy "a" saves it: without the base's test-time views (the adapted checkpoint has no config)
    base_logits = base_pred.torch_logits(films.images)[:, 0]
    strategies = [S.recalibration(base, base_logits)]
    for key, name, trunk, kind in (("b1", "head on the base model's pooled features", base, "pooled"),
                                   ("b2", "head on the base model's block statistics", base, "block_stats"),
                                   ("b3", "head on ImageNet Lite0 pooled features", imagenet, "pooled"),
                                   ("b4", "head on ImageNet Lite0 block statistics", imagenet, "block_stats")):
        if kind == "block_stats" and not hasattr(trunk.backbone, "_blocks"):
            continue
        strategies.append(S.head(key, name, trunk, kind, trunk_features(trunk, films.images, kind), y, patients))
    notes = []
    replay = _replay(ckpt, base_dir, replay_films, size, seed) if base_dir is not None and ckpt.get("config") else None
    if replay is None:
        notes.append("strategies d and e (replay) skipped: the base model's training folder was not found (--base-data)")
    if effnet:
        cut = cut_features(base, films.images, cut_of(base))
        strategies.append(S.fine_tune("c", "partial fine-tune of the base (last blocks)", base, cut, y, seed=seed))
        if replay is not None:
            strategies.append(S.fine_tune("d", f"partial fine-tune with replay of {len(replay[1])} base training "
                                          "images", base, cut, y, (cut_features(base, replay[0], cut_of(base)), replay[1]), seed))
    else:
        notes.append(f"strategies c and d skipped: partial fine-tuning is implemented for EfficientNet-Lite bases, "
                     f"not {ckpt['arch']['name']}")
    if replay is not None:
        r_feats = trunk_features(imagenet, replay[0], "block_stats")
        strategies.append(S.head("e", f"head on ImageNet Lite0 block statistics, with replay of {len(replay[1])} base "
                                 "training images", imagenet, "block_stats",
                                 next(s.X for s in strategies if s.key == "b4"), y, patients,
                                 (r_feats, replay[1], replay[2])))
    style = style_features(films.images, films.sizes)
    log.info("features of %d films in %.0f s", len(films), time.perf_counter() - t)

    results = [cross_validate(s, y, fold, patients, threshold) for s in strategies]
    winner = choose_winner(results)
    strategy = next(s for s in strategies if s.key == winner.key)
    log.info("winner by the rule: %s (%s)", winner.key, winner.name)
    confound = [cross_validate(S.style_only(np.hstack([style["histogram"], style["texture"], style["size"]]), y,
                                            patients), y, fold, patients, threshold),
                cross_validate(S.style_only(style["histogram"], y, patients), y, fold, patients, threshold)]
    confound[1].key, confound[1].name = "histogram", "intensity histogram only"
    curve = learning_curve(strategy, y, fold, patients, seed)

    model = strategy.model(strategy.fit(np.arange(len(y))))
    # out-of-fold predictions only: never films it trained on
    calib = fit_calibration_and_threshold(winner.oof[:, None], y, threshold)
    calib["threshold_info"]["chosen_on"] = "out-of-fold predictions on the site's own labelled films (pneumoscope adapt)"
    forgetting = _forgetting(model, base_pred, ckpt, base_dir) if base_dir is not None and ckpt.get("config") else None
    if forgetting is None:
        notes.append("forgetting not measured: the base model's training folder was not found (--base-data)")
    base_ref = base_pred.ood_reference
    base_refs = [r for r in (getattr(base_ref, "references", None) or ([base_ref] if base_ref else []))
                 if r.features == NAME]
    if base_refs and (forgetting is None or forgetting["auc_adapted"] < MIN_BASE_AUC):
        notes.append("the model's out-of-distribution reference covers this site's films only: "
                     + ("its ranking of the base's own validation images was not measured" if forgetting is None else
                        f"it ranks the base's own validation images at AUC {forgetting['auc_adapted']:.3f} "
                        f"(< {MIN_BASE_AUC})") + ", so such images are 'not assessed' by it; use the base model for them")
        base_refs = []
    site_ref = EmbeddingReference.fit(style["texture"], QUANTILE, space=NAME)
    ood_cv = ood_rate(style["texture"], quality, fold, base_refs, QUANTILE)
    adaptation = {"base_checkpoint": str(base_path), "base_sha256": file_digest(base_path), "site_data": str(films.root),
                  "site_digest": films.digest(), **films.counts(), "folds": k, "seed": seed, "strategy": winner.key,
                  "strategy_name": winner.name, "cv_auc": winner.metrics["auc"], "cv_auc_ci": winner.metrics["auc_ci"],
                  "ood_covers_base": bool(base_refs)}
    model_path = save_checkpoint({
        "arch": model.arch, "preprocess": model.preprocess.to_dict(), "label_names": list(ckpt["label_names"]),
        "state_dict": {k_: v.contiguous() for k_, v in model.state_dict().items()}, **calib, "epoch": None,
        "metrics": {"cv": winner.metrics}, "adaptation": adaptation,
        "ood_reference": ReferenceSet([*base_refs, site_ref]).to_dict()}, out / "model.pt")
    adapted = load(model_path, device="cpu")
    maps = heatmaps(adapted, films.images[np.random.default_rng(seed).permutation(len(y))[:GRADCAM_FILMS]])
    lung_box = float(np.nanmean(lung_box_mass(maps)))
    report = {
        "site": {"data": str(films.root), "digest": films.digest(), **films.counts(), "skipped": films.skipped},
        "base": {"checkpoint": str(base_path), "sha256": adaptation["base_sha256"], "name": ckpt["arch"]["name"],
                 **_base_on_site(base_pred, films, quality)},
        "folds": k, "seed": seed, "strategies": results, "winner": winner.key,
        "confounding": confound,
        "lung_box_mass": lung_box, "gradcam_films": int(len(maps)), "learning_curve": curve, "forgetting": forgetting,
        "ood": ood_cv, "model": {"path": str(model_path), "sha256": file_digest(model_path), "ood_covers_base": bool(base_refs),
                  **calib},
        "notes": notes, "seconds": time.perf_counter() - t_start,
    }
    write_report(report, films, fold, out)
    log.info("adapted model %s (%s: CV AUC %.3f); report %s, %.0f s", model_path, winner.key, winner.metrics["auc"],
             out / "report.md", report["seconds"])
    return report
