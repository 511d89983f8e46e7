"""Several finished runs as ONE checkpoint (models/ensemble.py).

``build(checkpoints, data, out)``: members validated on the same patient-level split (same data, ``val_fraction``
and ``seed``), re-made from the first member's config. The ensemble's calibration (temperature + bias) and threshold
are fitted on that validation split exactly as training fits a single model's
(``evaluation.calibration.fit_calibration_and_threshold``): no probe or test image is ever used. ``pneumoscope ensemble``.

``build_cv(checkpoints, data, out)``: a **cross-validated ensemble**, the k runs of one recipe with ``fold: i/k``
(i = 1..k): each member validated on its own patient fold, so every training film has one out-of-fold prediction,
from the member that never saw it. Calibration and threshold are fitted on those out-of-fold predictions (a single
member's calibrated probability standing in for the mean of k: an approximation, slightly less sharp than the
ensemble), and the checkpoint's ``metrics`` are out-of-fold figures over all training films (``cv`` says so;
``oof_predictions`` gives the same figures to ``pneumoscope select``). There is no held-out split left, so
``evaluation_samples`` refuses such a checkpoint.
"""
from __future__ import annotations

import hashlib
import logging
import weakref
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch

from pneumoscope.config import parse_fold
from pneumoscope.data.cache import decode_all
from pneumoscope.data.digest import file_digest
from pneumoscope.data.splits import DATA_KEYS
from pneumoscope.errors import CheckpointError
from pneumoscope.evaluation.calibration import fit_calibration_and_threshold
from pneumoscope.evaluation.evaluate import evaluation_samples
from pneumoscope.evaluation.metrics import binary_metrics, bootstrap_ci
from pneumoscope.inference.onnx import OnnxBackend, cached_backend
from pneumoscope.inference.runtime import pneumonia_score, predict_logits
from pneumoscope.models.checkpoint import (
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from pneumoscope.models.ensemble import Ensemble, OneMember
from pneumoscope.training.checkpoint import payload

log = logging.getLogger(__name__)


def assemble(checkpoints: list[str | Path]) -> tuple[Ensemble, list[dict]]:
    """The ``Ensemble`` of the checkpoints' models (each with its calibration) and the loaded checkpoints."""
    cks = [load_checkpoint(c) for c in checkpoints]
    for c, ck in zip(checkpoints, cks):
        if len(ck["label_names"]) != 2 or not ck.get("temperature"):
            raise CheckpointError(f"{c}: an ensemble member must be a calibrated binary model (the best.pt of a "
                                  f"binary training run)")
    models = [model_from_checkpoint(ck) for ck in cks]  # each with its stored preprocessing, intensity included
    ens = Ensemble(models, [ck["temperature"] for ck in cks], [ck.get("calibration_bias", 0.0) for ck in cks])
    return ens.eval(), cks


def build(checkpoints: list[str | Path], data_dir: str | Path, out: str | Path, threshold_method: str | None = None) -> dict:
    """Write the ensemble checkpoint ``out``; return its validation metrics at the fitted threshold."""
    if len(checkpoints) < 2:
        raise CheckpointError("an ensemble needs at least two checkpoints")
    ens, cks = assemble(checkpoints)
    splits = [evaluation_samples(ck, data_dir)[0] for ck in cks]
    paths = [str(s.path) for s in splits[0]]
    for c, s in zip(checkpoints[1:], splits[1:]):
        if [str(x.path) for x in s] != paths:
            raise CheckpointError(f"{c} was validated on another split than {checkpoints[0]}: ensemble members need "
                                  f"the same data, val_fraction and seed")
    d = decode_all([s.path for s in splits[0]], ens.preprocess.input_size, progress=False)
    keep = np.flatnonzero(d.ok)
    y = (np.array([splits[0][i].label for i in keep]) > 0).astype(int)
    x = torch.from_numpy(np.ascontiguousarray(ens.preprocess.standardise(d.images[keep]))).unsqueeze(1)
    logits = predict_logits(ens, x, ens.preprocess, torch.device("cpu"), None)
    cfg = {**cks[0]["config"], "tta": ""}  # the members' test-time views are not used inside an ensemble
    info = fit_calibration_and_threshold(logits, y, threshold_method or cfg.get("threshold", "youden"))
    m = binary_metrics(y, pneumonia_score(logits, info["temperature"], info["calibration_bias"]), info["threshold"])
    metrics = {"val_auc": m["auc"], "val_accuracy": m["accuracy"], "val_sensitivity": m["sensitivity"],
               "val_specificity": m["specificity"], "n_val": int(len(y))}
    members = [{"checkpoint": Path(c).name, "run": Path(c).parent.name, "sha256": file_digest(c),
                "model": ck["arch"]["name"], "epoch": ck.get("epoch")} for c, ck in zip(checkpoints, cks)]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(payload(ens, cks[0]["label_names"], cfg, 0, metrics, ensemble_members=members, **info), out)
    log.info("ensemble of %s -> %s: validation AUC %.4f, threshold %.3f", [m_["run"] for m_ in members], out,
             m["auc"], info["threshold"])
    return {**metrics, "threshold": info["threshold"], "checkpoint": str(out)}


def cv_folds(cks: list[dict], names: list[str], data_dir: str | Path) -> list[list]:
    """Each member's validation fold, re-made from its config; refused unless the members are the runs
    ``fold: 1/k`` ... ``k/k`` of one split (same data keys, k = the number of members)."""
    k = len(cks)
    folds = [parse_fold((ck.get("config") or {}).get("fold", "")) for ck in cks]
    if sorted(f or (0, 0) for f in folds) != [(i, k) for i in range(1, k + 1)]:
        raise CheckpointError(f"a cross-validated ensemble needs the {k} runs with fold 1/{k} ... {k}/{k} of one "
                              f"recipe; got folds {[ck.get('config', {}).get('fold') for ck in cks]} for {names}")
    keys = [{key: ck["config"].get(key) for key in DATA_KEYS if key not in ("data", "fold")} for ck in cks]
    if any(kk != keys[0] for kk in keys[1:]):
        raise CheckpointError(f"{names}: the members' folds come from different splits ({keys}); train them with "
                              "the same labels, seed and limit")
    return [evaluation_samples(ck, data_dir)[0] for ck in cks]


def member_folds(ckpt: dict, data_dir: str | Path) -> list[list]:
    """The validation fold of each member of a saved cross-validated ensemble (its members' ``fold`` and its config)."""
    return [evaluation_samples({**ckpt, "cv": None, "config": {**ckpt["config"], "fold": m["fold"]}}, data_dir)[0]
            for m in ckpt["ensemble_members"]]


_MEMBER_RUNTIMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def member_runtime(ens: Ensemble, i: int) -> OnnxBackend | None:
    """ONNX Runtime copy of member ``i`` (exported once into the ONNX cache, keyed by its weights, and checked against
    PyTorch within 1e-4 by ``inference.onnx.cached_backend``), or None (no onnxruntime, another input size or
    intensity method than the ensemble's, or no agreement)."""
    # one export check and session per member, per ensemble; kept beside the module, not in it: an ONNX Runtime
    # session cannot be deep-copied (Grad-CAM copies the model) or pickled
    cache = _MEMBER_RUNTIMES.setdefault(ens, {})
    if i in cache:
        return cache[i]
    member = ens.members[i]
    same_pixels = [(q.input_size, q.channels, q.intensity) for q in (member.preprocess, ens.preprocess)]
    if find_spec("onnxruntime") is None or same_pixels[0] != same_pixels[1]:
        return None  # (the mean and std may differ: the member's copy normalises the uint8 input itself)
    h = hashlib.sha256()
    for name, t in member.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    cache[i] = cached_backend(member, member.preprocess, "member-" + h.hexdigest()[:32])
    return cache[i]


def _member_logit(z: np.ndarray, t: float, b: float) -> np.ndarray:
    """``OneMember``'s output from the member's raw logits, in float32 as PyTorch computes it."""
    p = (1.0 / (1.0 + np.exp(-(z[:, :1].astype(np.float32) / np.float32(t) + np.float32(b))))).astype(np.float32)
    p = np.clip(p, np.float32(1e-6), np.float32(1 - 1e-6))
    return np.log(p) - np.log1p(-p)


def oof_logits(ens: Ensemble, images_u8: np.ndarray, fold: np.ndarray, backend: str = "auto") -> np.ndarray:
    """Logits (N, 1) of images whose member is ``fold`` (member i scores the images of fold i): each the logit of
    that member's calibrated probability, as ``Ensemble.forward`` would average them. ``backend`` "auto": ONNX
    Runtime where the member's copy agrees with PyTorch (about 3x faster than eager PyTorch on the CPU for the
    12 shifted copies ``select`` scores), else PyTorch; "torch": PyTorch."""
    z = np.zeros((len(images_u8), 1), np.float32)
    for i in np.unique(fold):
        sel = np.flatnonzero(fold == i)
        runtime = member_runtime(ens, int(i)) if backend == "auto" else None
        if runtime is not None:
            z[sel] = _member_logit(runtime.logits(images_u8[sel]), ens.temperatures[i], ens.biases[i])
            continue
        x = torch.from_numpy(np.ascontiguousarray(ens.preprocess.standardise(images_u8[sel]))).unsqueeze(1)
        z[sel] = predict_logits(OneMember(ens, int(i)), x, ens.preprocess, torch.device("cpu"), None)
    return z


def oof_predictions(ens: Ensemble, folds: list[list]) -> dict:
    """Out-of-fold logits of a cross-validated ensemble (``oof_logits``), labels, patient ids, paths, fold index
    and the decoded images."""
    ys, pids, paths, fold, images = [], [], [], [], []
    for i, samples in enumerate(folds):
        d = decode_all([s.path for s in samples], ens.preprocess.input_size, progress=False)
        keep = np.flatnonzero(d.ok)
        ys += [int(samples[j].label > 0) for j in keep]
        pids += [samples[j].patient_id for j in keep]
        paths += [str(samples[j].path) for j in keep]
        fold += [i] * len(keep)
        images.append(d.images[keep])
    o = {"y": np.array(ys), "patients": np.array(pids), "paths": paths, "fold": np.array(fold),
         "images": np.concatenate(images)}
    o["logits"] = oof_logits(ens, o["images"], o["fold"])
    return o


def build_cv(checkpoints: list[str | Path], data_dir: str | Path, out: str | Path,
             threshold_method: str | None = None) -> dict:
    """Write the cross-validated ensemble ``out``; return its out-of-fold metrics at the fitted threshold."""
    if len(checkpoints) < 2:
        raise CheckpointError("a cross-validated ensemble needs at least two fold runs")
    ens, cks = assemble(checkpoints)
    folds = cv_folds(cks, [str(c) for c in checkpoints], data_dir)
    o = oof_predictions(ens, folds)
    cfg = {**cks[0]["config"], "tta": ""}  # the members' test-time views are not used inside an ensemble
    info = fit_calibration_and_threshold(o["logits"], o["y"], threshold_method or cfg.get("threshold", "youden"))
    p = pneumonia_score(o["logits"], info["temperature"], info["calibration_bias"])
    m = binary_metrics(o["y"], p, info["threshold"])
    ci = bootstrap_ci(o["y"], p, info["threshold"], groups=o["patients"])
    metrics = {"val_auc": m["auc"], "val_auc_ci": ci["auc"], "val_accuracy": m["accuracy"],
               "val_sensitivity": m["sensitivity"], "val_specificity": m["specificity"], "n_val": int(len(o["y"])),
               "validation": f"out-of-fold over {len(o['y'])} training films ({len(cks)} patient folds)"}
    members = [{"checkpoint": Path(c).name, "run": Path(c).parent.name, "sha256": file_digest(c),
                "model": ck["arch"]["name"], "epoch": ck.get("epoch"), "fold": ck["config"]["fold"]}
               for c, ck in zip(checkpoints, cks)]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(payload(ens, cks[0]["label_names"], cfg, 0, metrics, ensemble_members=members,
                            cv={"folds": len(cks), "metrics": "out-of-fold"}, **info), out)
    log.info("cross-validated ensemble of %d folds -> %s: out-of-fold AUC %.4f [%.4f, %.4f], threshold %.3f",
             len(cks), out, m["auc"], *ci["auc"], info["threshold"])
    return {**metrics, "threshold": info["threshold"], "checkpoint": str(out)}
