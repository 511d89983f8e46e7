"""``build(checkpoints, data, out)``: several finished runs as ONE checkpoint (models/ensemble.py).

The members must be binary and validated on the same patient-level split (same data, ``val_fraction`` and
``seed``); that split is re-made from the first member's config. The ensemble's calibration (temperature + bias)
and threshold are then fitted on that validation split exactly as training fits a single model's
(``evaluation.calibration.calibrate``): no probe or test image is ever used. ``pneumoscope ensemble``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from pneumoscope.data.cache import decode_all
from pneumoscope.data.digest import file_digest
from pneumoscope.errors import CheckpointError
from pneumoscope.evaluation.calibration import calibrate
from pneumoscope.evaluation.evaluate import evaluation_samples
from pneumoscope.evaluation.metrics import binary_metrics
from pneumoscope.inference.runtime import pneumonia_score, predict_logits
from pneumoscope.models.checkpoint import (
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from pneumoscope.models.ensemble import Ensemble
from pneumoscope.models.preprocess import Preprocess
from pneumoscope.training.checkpoint import payload

log = logging.getLogger(__name__)


def assemble(checkpoints: list[str | Path]) -> tuple[Ensemble, list[dict]]:
    """The ``Ensemble`` of the checkpoints' models (each with its calibration) and the loaded checkpoints."""
    cks = [load_checkpoint(c) for c in checkpoints]
    for c, ck in zip(checkpoints, cks):
        if len(ck["label_names"]) != 2 or not ck.get("temperature"):
            raise CheckpointError(f"{c}: an ensemble member must be a calibrated binary model (the best.pt of a "
                                  f"binary training run)")
    models = [model_from_checkpoint(ck) for ck in cks]
    for m, ck in zip(models, cks):
        m.preprocess = Preprocess.from_dict(ck["preprocess"])  # the stored one: intensity included
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
    cfg = dict(cks[0]["config"])
    info = calibrate(logits, y, threshold_method or cfg.get("threshold", "youden"))
    m = binary_metrics(y, pneumonia_score(logits, info["temperature"], info["calibration_bias"]), info["threshold"])
    metrics = {"val_auc": m["auc"], "val_accuracy": m["accuracy"], "val_sensitivity": m["sensitivity"],
               "val_specificity": m["specificity"], "n_val": int(len(y))}
    members = [{"checkpoint": Path(c).name, "run": Path(c).parent.name, "sha256": file_digest(c),
                "model": ck["arch"]["name"], "epoch": ck.get("epoch")} for c, ck in zip(checkpoints, cks)]
    save_checkpoint(payload(ens, cks[0]["label_names"], cfg, 0, metrics, ensemble_members=members, **info), out)
    log.info("ensemble of %s -> %s: validation AUC %.4f, threshold %.3f", [m_["run"] for m_ in members], out,
             m["auc"], info["threshold"])
    return {**metrics, "threshold": info["threshold"], "checkpoint": str(out)}
