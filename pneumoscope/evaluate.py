"""Evaluation of a checkpoint on a labelled folder: metrics with bootstrap CIs, curves, calibration, report."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pneumoscope.data.cache import decode_all
from pneumoscope.data.folders import scan
from pneumoscope.errors import DatasetLayoutError
from pneumoscope.predict import load
from pneumoscope.train import pneumonia_score, softmax

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


def evaluate(checkpoint: str | Path | None, data: str | Path, out: str | Path, split: str | None = None,
             device: str = "auto", progress: bool = True, group_by: str | None = None,
             metadata: str | Path | None = None) -> dict:
    """Evaluate ``checkpoint`` (None = bundled default) on ``data``; write report files into ``out``; return the report."""
    from pneumoscope.report import write_evaluation

    pred = load(checkpoint, device=device)
    labels = "binary" if len(pred.label_names) == 2 else "ternary"
    if split == "validation":  # the checkpoint's own patient-level validation split, re-made from its config
        from pneumoscope.checkpoint import load_checkpoint
        from pneumoscope.shift import evaluation_samples

        samples, _ = evaluation_samples(load_checkpoint(pred.info["checkpoint"]), data)
    else:
        _, samples = select_split(data, split, labels)
    d = decode_all([s.path for s in samples], pred.preprocess.input_size, progress=progress)
    keep = np.flatnonzero(d.ok)
    if len(keep) == 0:
        raise DatasetLayoutError(f"{data}: no readable image to evaluate")
    logits = pred.logits(d.images[keep])
    y = np.array([samples[i].label for i in keep])
    groups = None
    if group_by or metadata:
        from pneumoscope.data.metadata import group_labels

        groups = group_labels([samples[i] for i in keep], group_by or "site", metadata)
    extra = {"data": str(data), "split": split, "checkpoint": pred.info["checkpoint"],
             "model": pred.info["name"], "model_checksum": pred.info["checksum"],
             "threshold_info": pred.info["threshold_info"],
             "unreadable": [{"path": str(p), "error": m} for p, m in d.errors]}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    T = pred.temperature
    if len(pred.label_names) > 2:
        P = softmax(logits / (T or 1.0))
        return write_evaluation(out, y, P, pred.threshold, label_names=list(pred.label_names), extra=extra)
    p_raw = pneumonia_score(logits)
    p = pneumonia_score(logits, T, pred.calibration_bias) if T else p_raw
    return write_evaluation(out, y, p, pred.threshold, label_names=list(pred.label_names),
                            logits=logits[:, 0], temperature=T, calibration_bias=pred.calibration_bias,
                            val_operating_points=pred.info.get("val_operating_points"),
                            groups=groups, extra=extra)
