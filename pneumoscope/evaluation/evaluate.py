"""Evaluation of a checkpoint on a labelled folder: metrics with bootstrap CIs, curves, calibration, report."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pneumoscope.config import resolve
from pneumoscope.data.cache import decode_all
from pneumoscope.data.folders import scan
from pneumoscope.data.metadata import group_labels
from pneumoscope.data.splits import split_samples
from pneumoscope.errors import CheckpointError, DatasetLayoutError
from pneumoscope.evaluation.metrics import binary_metrics, bootstrap_ci
from pneumoscope.evaluation.report import write_evaluation
from pneumoscope.inference.adapt import adapt_batch, check_batch
from pneumoscope.inference.loader import load
from pneumoscope.models.checkpoint import load_checkpoint

log = logging.getLogger(__name__)


def select_split(root: str | Path, split: str | None, labels: str):
    ds = scan(root, labels=labels)
    if ds.splits:
        if split is None:
            if len(ds.splits) > 1:
                raise DatasetLayoutError(f"{root} has splits {ds.splits}: choose one with --split (e.g. --split test)")
            split = ds.splits[0]
        return ds, ds.split(split)
    if split is not None:
        raise DatasetLayoutError(f"{root} has no split folders; drop --split {split}")
    return ds, ds.samples


def evaluation_samples(ckpt: dict, data_dir: str | Path, split: str | None = None):
    """Samples to evaluate and how they were chosen.

    ``split=None``: the checkpoint's own validation split, re-made from its stored config (data folder replaced
    by ``data_dir``; ``limit`` ignored), exactly as training made it (``data.splits.split_samples``): never a training image.
    ``split="test"`` (or any split name, or ``"all"`` for a folder without splits): those images.
    """

    labels = "binary" if len(ckpt["label_names"]) == 2 else "ternary"
    if split is None and ckpt.get("cv"):
        raise CheckpointError("a cross-validated ensemble trained on every film of its data: it has no held-out "
                              "validation split (its stored metrics are out-of-fold figures); evaluate it on "
                              "another folder or split (--split test)")
    if split is not None:
        _, samples = select_split(data_dir, None if split == "all" else split, labels)
        return samples, f"{split} images of {data_dir}"
    cfg = ckpt.get("config")
    if not cfg:
        raise CheckpointError("the checkpoint stores no training config, so its validation split cannot be re-made; "
                              "pass split='test' (--split test) to evaluate a held-out split instead")
    c = resolve(dict(cfg), data=str(data_dir), limit=0, progress=False)
    _, val, _, how = split_samples(c)
    return val, f"validation split of the checkpoint: {how}"


def assessed_metrics(preds: list, y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    """The metrics on the images the model assessed (each ``Prediction.assessed``: not blank, not colour, not out of
    distribution), ``n_not_assessed`` per class and the flagged share; the top-level figures keep every image."""
    ok = np.array([r.assessed for r in preds])
    out = {"n": int(ok.sum()), "n_not_assessed": {"NORMAL": int((~ok & (y == 0)).sum()),
                                                  "PNEUMONIA": int((~ok & (y == 1)).sum())},
           "not_assessed_fraction": float((~ok).mean())}
    if ok.any():
        out.update(binary_metrics(y[ok], p[ok], threshold))
    return out


def evaluate(checkpoint: str | Path | None, data: str | Path, out: str | Path, split: str | None = None,
             device: str = "auto", progress: bool = True, group_by: str | None = None,
             metadata: str | Path | None = None, adapt: str | None = None) -> dict:
    """Evaluate ``checkpoint`` (None = bundled default) on ``data``; write report files into ``out``; return the report.

    ``adapt`` ("prior"; opt-in): also report the metrics after adapting to the evaluated images without
    their labels (inference/adapt.py) as ``report["adapted"]``; the top-level figures stay the plain model's."""

    pred = load(checkpoint, device=device)
    labels = "binary" if len(pred.label_names) == 2 else "ternary"
    if split == "validation":  # the checkpoint's own patient-level validation split, re-made from its config

        samples, _ = evaluation_samples(load_checkpoint(pred.info["checkpoint"]), data)
    else:
        _, samples = select_split(data, split, labels)
    d = decode_all([s.path for s in samples], pred.preprocess.input_size, progress=progress)
    keep = np.flatnonzero(d.ok)
    if len(keep) == 0:
        raise DatasetLayoutError(f"{data}: no readable image to evaluate")
    if adapt:
        check_batch(len(keep))  # before any model work
    preds = pred.predict(list(d.images[keep]), batch_size=64)  # the same Predictions as `predict` makes
    y = np.array([samples[i].label for i in keep])
    groups = None
    if group_by or metadata:
        groups = group_labels([samples[i] for i in keep], group_by or "site", metadata)
    extra = {"data": str(data), "split": split, "checkpoint": pred.info["checkpoint"],
             "model": pred.info["name"], "model_checksum": pred.info["checksum"],
             "threshold_info": pred.info["threshold_info"],
             "unreadable": [{"path": str(p), "error": m} for p, m in d.errors]}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if len(pred.label_names) > 2:
        P = np.array([[r.class_probabilities[n] for n in pred.label_names] for r in preds])
        return write_evaluation(out, y, P, pred.threshold, label_names=list(pred.label_names), extra=extra)
    p = np.array([r.score for r in preds])  # the probability each label comes from (label_from)
    assessed = assessed_metrics(preds, (y > 0).astype(int), p, pred.threshold)
    adapted = None
    if adapt:
        p_ad, info = adapt_batch(pred, d.images[keep], adapt)
        adapted = {**info, **binary_metrics((y > 0).astype(int), p_ad, pred.threshold),
                   "ci": bootstrap_ci((y > 0).astype(int), p_ad, pred.threshold)}
    return write_evaluation(out, y, p, pred.threshold, label_names=list(pred.label_names),
                            logits=np.array([r.logit for r in preds]), temperature=pred.temperature,
                            calibration_bias=pred.calibration_bias,
                            val_operating_points=pred.info.get("val_operating_points"),
                            groups=groups, extra=extra, adapted=adapted, assessed=assessed)
