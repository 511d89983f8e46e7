"""Evaluation plots and the report folder (report.json, report.md, PNGs).

Plots are drawn on `matplotlib.figure.Figure` objects with an explicit Agg canvas: no pyplot global state,
no GUI backend, nothing left open after saving (safe inside the web service and in threads).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from pneumoscope.errors import ConfigError
from pneumoscope.evaluation import calibration as C
from pneumoscope.evaluation import metrics as M

log = logging.getLogger(__name__)


def _figure(ncols: int = 1, size: tuple[float, float] = (5.0, 5.0)):
    """A new Agg-backed figure and its axes (a list when ncols > 1)."""

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    return fig, axes


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    fig.clear()
    return path


# ----------------------------------------------------------------------------- plots


def plot_roc(y, p, path, label_names=None) -> Path:
    """ROC curve with AUC. For (N, K) probabilities: one one-vs-rest curve per class."""

    y = np.asarray(y).reshape(-1)
    p = np.asarray(p, dtype=np.float64)
    fig, ax = _figure()
    if p.ndim == 2:
        names = label_names or [str(k) for k in range(p.shape[1])]
        curves = [(str(names[k]), (y == k).astype(int), p[:, k]) for k in range(p.shape[1])]
    else:
        curves = [("PNEUMONIA" if not label_names else str(label_names[-1]), y.astype(int), p)]
    for name, yk, pk in curves:
        if yk.min() == yk.max():
            log.warning("ROC for %s skipped: only one class present", name)
            continue
        fpr, tpr, _ = roc_curve(yk, pk)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(yk, pk):.3f})")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set(xlabel="1 - specificity (FPR)", ylabel="sensitivity (TPR)", title="ROC", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_pr(y, p, path) -> Path:
    """Precision-recall curve for the positive class, with average precision and the prevalence line."""

    y = np.asarray(y).reshape(-1).astype(int)
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    fig, ax = _figure()
    if y.max() == 1:
        prec, rec, _ = precision_recall_curve(y, p)
        ax.plot(rec, prec, label=f"AP {average_precision_score(y, p):.3f}")
        ax.axhline(y.mean(), ls="--", color="grey", lw=1, label=f"prevalence {y.mean():.2f}")
        ax.legend(loc="lower left")
    else:
        log.warning("PR curve empty: no positive case")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="Precision-recall", xlim=(0, 1), ylim=(0, 1.01))
    return _save(fig, path)


def plot_confusion(confusion, label_names, path) -> Path:
    """Confusion matrix (rows = true, columns = predicted) with counts. Accepts a KxK array or {tp, fp, tn, fn}."""
    if isinstance(confusion, dict):
        c = confusion
        confusion = [[c["tn"], c["fp"]], [c["fn"], c["tp"]]]
    cm = np.asarray(confusion)
    names = [str(n) for n in label_names]
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(names):
        raise ConfigError(f"confusion matrix of shape {cm.shape} does not match {len(names)} label names {names}")
    fig, ax = _figure(size=(1.5 + 1.3 * len(names), 1.2 + 1.3 * len(names)))
    ax.imshow(cm, cmap="Blues")
    mid = (cm.min() + cm.max()) / 2  # imshow maps min..max onto the colormap: dark cells get white text
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > mid else "black")
    ax.set(xticks=range(len(names)), yticks=range(len(names)), xticklabels=names, yticklabels=names,
           xlabel="predicted", ylabel="true", title="Confusion matrix")
    return _save(fig, path)


def plot_reliability(y, p_before, p_after, path, n_bins: int = 10) -> Path:
    """Reliability diagram (fraction positive vs mean predicted probability) before and, if given, after calibration."""
    fig, ax = _figure()
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect")
    for name, p in (("before", p_before), ("after", p_after)):
        if p is None:
            continue
        rc = C.reliability_curve(y, p, n_bins)
        ece = C.expected_calibration_error(y, p)
        ax.plot(rc["mean_predicted"], rc["fraction_positive"], "o-", label=f"{name} (ECE {ece:.3f})")
    ax.set(xlabel="mean predicted probability", ylabel="observed fraction positive", title="Reliability",
           xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left")
    return _save(fig, path)


def plot_history(history: list[dict], path) -> Path:
    """Training curves: loss (train/val) and accuracy/AUC (train/val) per epoch. Missing keys are skipped."""
    fig, (ax1, ax2) = _figure(ncols=2, size=(10.0, 4.0))
    epochs = [row["epoch"] for row in history]

    def series(ax, key, label):
        pts = [(e, row[key]) for e, row in zip(epochs, history) if row.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), "o-", ms=3, label=label)

    series(ax1, "loss", "train loss")
    series(ax1, "val_loss", "val loss")
    series(ax2, "accuracy", "train accuracy")
    series(ax2, "val_accuracy", "val accuracy")
    series(ax2, "val_auc", "val AUC")
    ax1.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax2.set(xlabel="epoch", ylabel="accuracy / AUC", title="Accuracy and AUC")

    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:
            ax.legend()
    return _save(fig, path)


# ----------------------------------------------------------------------------- report


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, (list, tuple)) and len(x) == 2:
        return f"[{_fmt(x[0], digits)}, {_fmt(x[1], digits)}]"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines + [""]


def _markdown_binary(r: dict) -> str:
    c = r["confusion"]
    names = r.get("label_names", ["NORMAL", "PNEUMONIA"])
    ci = r.get("ci", {})
    out = ["# Evaluation report", "",
           f"{r['n']} cases ({r['n_pos']} {names[1]}, {r['n_neg']} {names[0]}), threshold {r['threshold']:.4f} "
           f"(p({names[1]}) >= threshold is called positive).", ""]
    out += ["## Metrics", ""]
    out += _table(["metric", "value", "95% CI"],
                  [[k, r[k], ci.get(k)] for k in ("accuracy", "sensitivity", "specificity", "precision", "f1", "auc")])
    out += ["## Confusion matrix", ""]
    out += _table(["true \\ predicted", names[0], names[1]],
                  [[names[0], c["tn"], c["fp"]], [names[1], c["fn"], c["tp"]]])
    if r.get("operating_points"):
        out += ["## Operating points (thresholds chosen on validation data)", ""]
        out += _table(["target sensitivity", "threshold", "sensitivity", "specificity"],
                      [[o["target"], o["threshold"], o["sensitivity"], o["specificity"]] for o in r["operating_points"]])
    if "calibration" in r:
        cal = r["calibration"]
        out += ["## Calibration", "", f"Calibrated probability = sigmoid(logit / T + b) with T = {cal['temperature']:.4f}, "
                f"b = {cal.get('bias', 0.0):.4f} (fitted on the validation split).", ""]
        out += _table(["", "ECE", "Brier"], [["before (T=1)", cal["ece"], cal["brier"]],
                                             ["after", cal["ece_calibrated"], cal["brier_calibrated"]]])
    if "subgroups" in r:
        out += ["## Subgroups", "", "Flagged: AUC or accuracy CI does not overlap the overall CI.", ""]
        out += _table(["group", "n", "accuracy", "accuracy CI", "auc", "auc CI", "flagged"],
                      [[g, s["n"], s["accuracy"], s["ci"]["accuracy"], s["auc"], s["ci"]["auc"],
                        "YES " + ",".join(s["flag_reasons"]) if s["flagged"] else "no"] for g, s in r["subgroups"].items()])
    return "\n".join(out)


def _markdown_multiclass(r: dict) -> str:
    names = r["label_names"]
    out = ["# Evaluation report (multiclass)", "", f"{r['n']} cases; prediction = most probable class.", "",
           "## Metrics", ""]
    out += _table(["metric", "value"], [[k, r[k]] for k in
                                        ("accuracy", "macro_sensitivity", "macro_specificity", "macro_f1", "macro_auc")])
    out += ["## Per class", ""]
    out += _table(["class", "support", "precision", "recall", "specificity", "f1", "auc (one-vs-rest)"],
                  [[n, s["support"], s["precision"], s["recall"], s["specificity"], s["f1"], s["auc"]]
                   for n, s in r["per_class"].items()])
    out += ["## Confusion matrix", ""]
    out += _table(["true \\ predicted", *names], [[n, *row] for n, row in zip(names, r["confusion"])])
    if "calibration" in r:
        cal = r["calibration"]
        out += ["## Calibration", "", f"Calibrated probabilities = softmax(logits / T) with T = {cal['temperature']:.4f}.", ""]
        out += _table(["", "ECE", "Brier"], [["before (T=1)", cal["ece"], cal["brier"]],
                                             ["after", cal["ece_calibrated"], cal["brier_calibrated"]]])
    return "\n".join(out)


def _calibration(y, logits, temperature, bias: float = 0.0) -> tuple[dict, np.ndarray, np.ndarray]:
    before = C.apply_temperature(logits, 1.0)
    after = C.apply_temperature(logits, temperature, bias)
    cal = {
        "ece": C.expected_calibration_error(y, before),
        "brier": C.brier(y, before),
        "ece_calibrated": C.expected_calibration_error(y, after),
        "brier_calibrated": C.brier(y, after),
        "temperature": float(temperature),
        "bias": float(bias or 0.0),
    }
    return cal, before, after


def write_evaluation(out_dir, y, p, threshold: float = 0.5, *, label_names, logits=None, temperature=None,
                     calibration_bias: float = 0.0, val_operating_points=None, groups=None, extra=None,
                     n_boot: int = 1000, seed: int = 0,
                     adapted: dict | None = None, assessed: dict | None = None) -> dict:
    """Write report.json, report.md and plots for one evaluated split into `out_dir`; return the report dict.

    Binary (`p` 1-D): binary_metrics + `ci` (stratified bootstrap) + `operating_points` (sens/spec on THIS data
    at each validation-chosen {target, threshold} in `val_operating_points`; [] when none) + `calibration`
    {ece, brier, ece_calibrated, brier_calibrated, temperature, bias} when `logits` and `temperature` are given
    (before = sigmoid(logits), after = sigmoid(logits / T + calibration_bias)) + `subgroups` when `groups` is given + `extra`.
    Plots: roc.png, pr.png, confusion.png, reliability.png (with calibration).
    Multiclass (`p` (N, K)): multiclass_metrics (+ calibration on top-label confidence), confusion.png and
    one-vs-rest roc.png (+ reliability.png of top-label confidence); `threshold` is not used.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [str(n) for n in label_names]
    p_arr = np.asarray(p, dtype=np.float64)
    y_arr = np.asarray(y).reshape(-1)
    if (logits is None) != (temperature is None):
        log.warning("calibration skipped: pass both logits and temperature (got only one)")
    with_cal = logits is not None and temperature is not None

    if p_arr.ndim == 2:
        report = M.multiclass_metrics(y_arr, p_arr, names)
        plot_confusion(report["confusion"], names, out / "confusion.png")
        plot_roc(y_arr, p_arr, out / "roc.png", label_names=names)
        if with_cal:
            report["calibration"], before, after = _calibration(y_arr, logits, temperature)
            correct = (before.argmax(axis=1) == y_arr).astype(int)  # argmax does not change with T
            plot_reliability(correct, before.max(axis=1), after.max(axis=1), out / "reliability.png")
        md = _markdown_multiclass
    else:
        report = M.binary_metrics(y_arr, p_arr, threshold)
        report["label_names"] = names
        report["ci"] = M.bootstrap_ci(y_arr, p_arr, threshold, n_boot=n_boot, seed=seed)
        report["operating_points"] = [
            {"target": float(o["target"]), **M.sens_spec_at(y_arr, p_arr, float(o["threshold"]))}
            for o in (val_operating_points or [])
        ]
        if with_cal:
            report["calibration"], before, after = _calibration(y_arr, logits, temperature, calibration_bias)
            plot_reliability(y_arr, before, after, out / "reliability.png")
        if groups is not None:
            report["subgroups"] = M.subgroup_metrics(y_arr, p_arr, threshold, groups, n_boot=n_boot, seed=seed)
        plot_roc(y_arr, p_arr, out / "roc.png", label_names=names)
        plot_pr(y_arr, p_arr, out / "pr.png")
        plot_confusion(report["confusion"], names, out / "confusion.png")
        md = _markdown_binary
    if assessed is not None:  # the same metrics on the images the model can assess (inference/assess.py)
        report["assessed"] = assessed
    if adapted is not None:  # opt-in batch adaptation: beside the plain model's figures, never instead of them
        report["adapted"] = adapted
    if extra is not None:
        report["extra"] = extra
    (out / "report.json").write_text(json.dumps(report, indent=2))
    text = md(report)
    if assessed is not None:
        na = assessed["n_not_assessed"]
        text += (f"\n## Assessed images only\n\n{assessed['n']} assessed; not assessed (blank, colour or out of "
                 f"distribution): {na['NORMAL']} NORMAL, {na['PNEUMONIA']} PNEUMONIA. "
                 + ", ".join(f"{k} {assessed[k]:.4f}" for k in ("accuracy", "sensitivity", "specificity", "auc")
                             if assessed.get(k) is not None) + "\n")
    if adapted is not None:
        keys = ("accuracy", "sensitivity", "specificity", "auc")
        text += (f"\n## Adapted to this batch (opt-in: --adapt-to-batch {adapted['mode']})\n\n"
                 + ", ".join(f"{k} {adapted[k]:.4f}" for k in keys if adapted.get(k) is not None)
                 + f"\n\n{adapted['note']}\n")
    if extra is not None:
        text += "\n## Extra\n\n```json\n" + json.dumps(extra, indent=2) + "\n```\n"
    (out / "report.md").write_text(text + "\n")
    log.info("wrote evaluation report to %s", out)
    return report
