"""Evaluation metrics for the pneumonia classifier: point metrics, bootstrap CIs, thresholds, subgroups
(calibration: calibration.py).

Conventions: `y` is an int label array. Binary: `p` is the probability of PNEUMONIA (positive class 1),
a case is called positive when `p >= threshold`; sensitivity is the recall of class 1 and specificity the
recall of class 0. Multiclass: `P` is an (N, K) array of softmax probabilities, the prediction is argmax.
Point metrics come from scikit-learn. Ratios that are undefined on the data (e.g. sensitivity with no positive
case, AUC with one class) are reported as None, never as a crash or a made-up 0.
"""
from __future__ import annotations

import logging
import math

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from pneumoscope.config import threshold_target
from pneumoscope.errors import ConfigError

log = logging.getLogger(__name__)

CI_METRICS = ("accuracy", "sensitivity", "specificity", "auc")


# ----------------------------------------------------------------------------- helpers


def binary_inputs(y, p) -> tuple[np.ndarray, np.ndarray]:
    """Check and convert binary labels / probabilities to 1-D int and float arrays."""
    y = np.asarray(y).reshape(-1)
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ConfigError(f"labels and probabilities differ in length ({y.size} vs {p.size}): pass one probability per case")
    if y.size == 0:
        raise ConfigError("no cases to evaluate: the label array is empty")
    if not np.isin(y, (0, 1)).all():
        raise ConfigError(f"binary labels must be 0 or 1, got values {sorted(set(np.unique(y).tolist()))[:10]}")
    if not np.isfinite(p).all() or p.min() < 0 or p.max() > 1:
        raise ConfigError(
            f"probabilities must be finite and in [0, 1], got range [{np.nanmin(p):.4g}, {np.nanmax(p):.4g}]: "
            "pass sigmoid outputs, not logits"
        )
    return y.astype(np.int64), p


def multiclass_inputs(y, P) -> tuple[np.ndarray, np.ndarray]:
    """Check and convert multiclass labels / (N, K) probabilities."""
    y = np.asarray(y).reshape(-1).astype(np.int64)
    P = np.asarray(P, dtype=np.float64)
    if P.ndim != 2 or P.shape[0] != y.size:
        raise ConfigError(f"multiclass probabilities must have shape (N, K) with N={y.size}, got {P.shape}")
    if y.size == 0:
        raise ConfigError("no cases to evaluate: the label array is empty")
    if y.min() < 0 or y.max() >= P.shape[1]:
        raise ConfigError(f"labels must be in [0, {P.shape[1] - 1}], got range [{y.min()}, {y.max()}]")
    if not np.isfinite(P).all():
        raise ConfigError("probabilities contain NaN or inf")
    return y, P


def _num(x) -> float | None:
    """A plain float, or None for NaN (JSON has no NaN)."""
    x = float(x)
    return None if math.isnan(x) else x


def _sens_spec(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[float | None, float | None]:
    pred = (p >= threshold).astype(np.int64)
    sens = recall_score(y, pred, pos_label=1, labels=[0, 1], zero_division=np.nan)
    spec = recall_score(y, pred, pos_label=0, labels=[0, 1], zero_division=np.nan)
    return _num(sens), _num(spec)


def _roc(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """sklearn's ROC curve with every threshold kept and the leading `inf` (nothing called positive) dropped."""
    if y.min() == y.max():
        raise ConfigError("choosing a threshold needs both classes in the data (validation set has only one class)")
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
    keep = np.isfinite(thr)
    return fpr[keep], tpr[keep], thr[keep]


# ----------------------------------------------------------------------------- binary point metrics


def binary_metrics(y, p, threshold: float = 0.5) -> dict:
    """Counts, accuracy, sensitivity, specificity, precision, F1 at `threshold`, and ROC AUC (None with one class)."""
    y, p = binary_inputs(y, p)
    pred = (p >= threshold).astype(np.int64)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel().tolist()
    sens, spec = _sens_spec(y, p, threshold)
    both = y.min() != y.max()
    return {
        "n": int(y.size),
        "n_pos": int(y.sum()),
        "n_neg": int(y.size - y.sum()),
        "accuracy": float(accuracy_score(y, pred)),
        "sensitivity": sens,
        "specificity": spec,
        "precision": _num(precision_score(y, pred, labels=[0, 1], zero_division=np.nan)),
        "f1": _num(f1_score(y, pred, labels=[0, 1], zero_division=np.nan)),
        "auc": float(roc_auc_score(y, p)) if both else None,
        "threshold": float(threshold),
        "confusion": {"tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn)},
    }


# ----------------------------------------------------------------------------- bootstrap


def auc_from_counts(pos: np.ndarray, neg: np.ndarray, cpos: np.ndarray, cneg: np.ndarray) -> np.ndarray:
    """ROC AUC of B weighted resamples at once (Mann-Whitney form, ties count 1/2).

    pos/neg: scores of the positive/negative cases; cpos (B, n_pos) and cneg (B, n_neg): how many times
    each case occurs in each resample. With all counts 1 this equals sklearn's roc_auc_score (tested).
    """
    order = np.argsort(neg, kind="stable")
    neg_sorted = neg[order]
    cum = np.zeros((cneg.shape[0], neg.size + 1))
    np.cumsum(cneg[:, order], axis=1, out=cum[:, 1:])
    lo = np.searchsorted(neg_sorted, pos, side="left")  # negatives strictly below each positive
    hi = np.searchsorted(neg_sorted, pos, side="right")  # ... and those tied with it
    wins = cum[:, lo] + 0.5 * (cum[:, hi] - cum[:, lo])  # (B, n_pos) weighted negatives beaten
    return (cpos * wins).sum(axis=1) / (cpos.sum(axis=1) * cneg.sum(axis=1))


def bootstrap_ci(y, p, threshold: float = 0.5, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
                 groups=None) -> dict:
    """Percentile bootstrap (1 - alpha) CIs {metric: [lo, hi]} for accuracy, sensitivity, specificity and AUC.

    Cases are resampled with replacement *within each class* (stratified): every resample keeps the observed
    numbers of positives and negatives, so AUC is always defined and the prevalence is held fixed (the CI
    reflects case-to-case variation, not variation in prevalence). A metric undefined on the data (e.g. AUC
    with one class) gets None. Vectorised: the resamples are drawn as multinomial counts per case.

    ``groups`` (one id per case, e.g. the patient): a cluster bootstrap. Whole groups are resampled, within the
    strata "has a positive case" / "has none", so the films of one patient stay together and the CI is not
    narrowed by counting a patient's correlated films as independent cases.
    """
    y, p = binary_inputs(y, p)
    if n_boot < 1 or not 0 < alpha < 1:
        raise ConfigError(f"bootstrap needs n_boot >= 1 and 0 < alpha < 1, got n_boot={n_boot}, alpha={alpha}")
    pos, neg = p[y == 1], p[y == 0]
    n_pos, n_neg = pos.size, neg.size
    cpos, cneg = _resample_counts(y, groups, n_boot, np.random.default_rng(seed))
    tp = cpos @ (pos >= threshold).astype(np.float64)  # (B,) true positives per resample
    tn = cneg @ (neg < threshold).astype(np.float64)
    m_pos, m_neg = cpos.sum(axis=1), cneg.sum(axis=1)  # n_pos, n_neg (fixed) unless groups are resampled
    with np.errstate(invalid="ignore", divide="ignore"):
        samples = {"accuracy": (tp + tn) / (m_pos + m_neg), "sensitivity": None, "specificity": None, "auc": None}
        if n_pos:
            samples["sensitivity"] = tp / m_pos
        if n_neg:
            samples["specificity"] = tn / m_neg
    if n_pos and n_neg:
        rows = max(1, 4_000_000 // max(n_pos, n_neg))  # bound memory of the (B, n) intermediates
        samples["auc"] = np.concatenate(
            [auc_from_counts(pos, neg, cpos[i : i + rows], cneg[i : i + rows]) for i in range(0, n_boot, rows)]
        )
    q = [alpha / 2, 1 - alpha / 2]
    return {k: None if v is None else [float(x) for x in np.nanquantile(v, q)] for k, v in samples.items()}


def paired_auc_difference(y, p_a, p_b, groups=None, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> dict:
    """AUC(p_b) - AUC(p_a) on the same cases, with its percentile-bootstrap (1 - alpha) CI: both score vectors are
    resampled together (the same cases in every resample), stratified by class as ``bootstrap_ci``, by whole groups
    (patients) when ``groups`` is given. Pairing removes the case-to-case variation both share, so the CI of the
    difference is far narrower than comparing two separate CIs."""
    y, p_a = binary_inputs(y, p_a)
    if n_boot < 1 or not 0 < alpha < 1:
        raise ConfigError(f"bootstrap needs n_boot >= 1 and 0 < alpha < 1, got n_boot={n_boot}, alpha={alpha}")
    p_b = np.asarray(p_b, dtype=np.float64).reshape(-1)
    if p_b.shape != p_a.shape or (y == 1).all() or (y == 0).all():
        raise ConfigError(f"paired AUC difference needs two score vectors of the same {p_a.size} cases, both classes")
    _, p_b = binary_inputs(y, p_b)
    cpos, cneg = _resample_counts(y, groups, n_boot, np.random.default_rng(seed))
    diff = (auc_from_counts(p_b[y == 1], p_b[y == 0], cpos, cneg)
            - auc_from_counts(p_a[y == 1], p_a[y == 0], cpos, cneg))
    lo, hi = np.nanquantile(diff, [alpha / 2, 1 - alpha / 2])
    return {"auc_a": float(roc_auc_score(y, p_a)), "auc_b": float(roc_auc_score(y, p_b)),
            "difference": float(roc_auc_score(y, p_b) - roc_auc_score(y, p_a)), "ci": [float(lo), float(hi)],
            "n": int(y.size), "n_boot": int(n_boot)}


def _resample_counts(y: np.ndarray, groups, n_boot: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(n_boot, n_pos) and (n_boot, n_neg) counts of each positive / negative case per resample: stratified by class,
    or by whole groups (``_group_counts``) when ``groups`` is given."""
    if groups is not None:
        counts = _group_counts(y, groups, n_boot, rng)  # (B, N) times each case occurs
        return counts[:, y == 1], counts[:, y == 0]
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    cpos = rng.multinomial(n_pos, np.full(n_pos, 1.0 / n_pos), size=n_boot) if n_pos else np.zeros((n_boot, 0))
    cneg = rng.multinomial(n_neg, np.full(n_neg, 1.0 / n_neg), size=n_boot) if n_neg else np.zeros((n_boot, 0))
    return cpos, cneg


def _group_counts(y: np.ndarray, groups, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, N) case counts of a cluster bootstrap: groups drawn with replacement within the strata
    "group has a positive case" and "group has none" (so every resample keeps both kinds of patient)."""
    g = np.asarray(groups).reshape(-1)
    if g.size != y.size:
        raise ConfigError(f"groups ({g.size}) and labels ({y.size}) differ in length: pass one group id per case")
    ids, inverse = np.unique(g, return_inverse=True)
    has_pos = np.zeros(ids.size, dtype=bool)
    has_pos[inverse[y == 1]] = True
    group_counts = np.zeros((n_boot, ids.size))
    for stratum in (has_pos, ~has_pos):
        members = np.flatnonzero(stratum)
        if members.size:
            group_counts[:, members] = rng.multinomial(members.size, np.full(members.size, 1.0 / members.size),
                                                       size=n_boot)
    return group_counts[:, inverse]


# ----------------------------------------------------------------------------- thresholds


def _threshold_for_sensitivity(y: np.ndarray, p: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity on (y, p) is >= target (thresholds are observed scores)."""
    _, tpr, thr = _roc(y, p)
    ok = np.flatnonzero(tpr >= target - 1e-12)  # tpr rises as the threshold falls; the last point has tpr == 1
    return float(thr[ok[0]])


def _threshold_for_specificity(y: np.ndarray, p: np.ndarray, target: float) -> float:
    """The lowest threshold whose specificity on (y, p) is >= target (thresholds are observed scores)."""
    fpr, _, thr = _roc(y, p)
    ok = np.flatnonzero(1.0 - fpr >= target - 1e-12)  # specificity falls as the threshold falls
    if ok.size == 0:
        raise ConfigError(f"no observed score reaches specificity {target:g} on these data (negative films share or "
                          "hold the highest score); choose a lower specificity target")
    return float(thr[ok[-1]])


def choose_threshold(y, p, method: str = "youden") -> tuple[float, dict]:
    """Pick a decision threshold on (validation) data.

    "youden": maximise sensitivity + specificity - 1 over the ROC curve (the highest such threshold on ties);
    "sensitivity:0.95": the highest threshold whose sensitivity is >= 0.95; "specificity:0.9": the lowest threshold
    whose specificity is >= 0.9 (the most sensitive one that keeps that specificity). Thresholds are observed scores
    (sklearn's leading `inf` is dropped), so a case is positive when p >= threshold.
    Returns (threshold, {method, threshold, sensitivity, specificity}) measured on the same data.
    """
    target = threshold_target(method)
    y, p = binary_inputs(y, p)
    if target is None:
        fpr, tpr, thr = _roc(y, p)
        t = float(thr[int(np.argmax(tpr - fpr))])
    elif target[0] == "sensitivity":
        t = _threshold_for_sensitivity(y, p, target[1])
    else:
        t = _threshold_for_specificity(y, p, target[1])
    sens, spec = _sens_spec(y, p, t)
    return t, {"method": method, "threshold": t, "sensitivity": sens, "specificity": spec}


def operating_points(y, p, targets=(0.90, 0.95, 0.99)) -> list[dict]:
    """For each sensitivity target: the highest threshold reaching it and the sensitivity/specificity there."""
    y, p = binary_inputs(y, p)
    out = []
    for target in targets:
        t = _threshold_for_sensitivity(y, p, float(target))
        sens, spec = _sens_spec(y, p, t)
        out.append({"target": float(target), "threshold": t, "sensitivity": sens, "specificity": spec})
    return out


def sens_spec_at(y, p, threshold: float) -> dict:
    """{threshold, sensitivity, specificity} of (y, p) at a fixed threshold."""
    y, p = binary_inputs(y, p)
    sens, spec = _sens_spec(y, p, threshold)
    return {"threshold": float(threshold), "sensitivity": sens, "specificity": spec}


# ----------------------------------------------------------------------------- multiclass


def multiclass_metrics(y, P, label_names) -> dict:
    """Accuracy, macro sensitivity/specificity/F1/AUC, per-class metrics and the confusion matrix (rows = true).

    Per-class AUC is one-vs-rest (class k against all others, scored by P[:, k]); it is None when class k is
    absent or is the only class, and the macro AUC is then None too.
    """
    y, P = multiclass_inputs(y, P)
    names = [str(n) for n in label_names]
    k = P.shape[1]
    if len(names) != k:
        raise ConfigError(f"{len(names)} label names {names} for {k} probability columns")
    pred = P.argmax(axis=1)
    labels = list(range(k))
    cm = confusion_matrix(y, pred, labels=labels)
    prec = precision_score(y, pred, labels=labels, average=None, zero_division=np.nan)
    rec = recall_score(y, pred, labels=labels, average=None, zero_division=np.nan)
    f1 = f1_score(y, pred, labels=labels, average=None, zero_division=np.nan)
    per_class, specs, aucs = {}, [], []
    for c, name in enumerate(names):
        tn = cm.sum() - cm[c, :].sum() - cm[:, c].sum() + cm[c, c]
        fp = cm[:, c].sum() - cm[c, c]
        spec = tn / (tn + fp) if tn + fp else math.nan
        yc = (y == c).astype(np.int64)
        auc = float(roc_auc_score(yc, P[:, c])) if 0 < yc.sum() < yc.size else None
        specs.append(spec)
        aucs.append(auc)
        per_class[name] = {
            "support": int(cm[c, :].sum()),
            "precision": _num(prec[c]),
            "recall": _num(rec[c]),
            "specificity": _num(spec),
            "f1": _num(f1[c]),
            "auc": auc,
        }
    return {
        "n": int(y.size),
        "label_names": names,
        "accuracy": float(accuracy_score(y, pred)),
        "macro_sensitivity": _num(np.nanmean(rec)) if not np.isnan(rec).all() else None,
        "macro_specificity": _num(np.nanmean(specs)) if not np.isnan(specs).all() else None,
        "macro_f1": _num(np.nanmean(f1)) if not np.isnan(f1).all() else None,
        "macro_auc": float(np.mean(aucs)) if all(a is not None for a in aucs) else None,
        "per_class": per_class,
        "confusion": cm.tolist(),
    }


# ----------------------------------------------------------------------------- subgroups


def _no_overlap(a, b) -> bool:
    return a is not None and b is not None and (a[1] < b[0] or a[0] > b[1])


def subgroup_metrics(y, p, threshold: float, groups, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """binary_metrics + bootstrap CIs per group (e.g. site or device), with a simple disparity flag.

    A group is `flagged` when its AUC CI or its accuracy CI does not overlap the overall one (both from the
    same stratified bootstrap). Non-overlapping CIs is a conservative screen, not a significance test: a flag
    means "look at this group", no flag does not prove the group is fine (small groups have wide CIs).
    `flag_reasons` lists which of "auc"/"accuracy" triggered. Group keys are str(group).
    """
    y, p = binary_inputs(y, p)
    g = np.asarray([str(x) for x in groups])
    if g.size != y.size:
        raise ConfigError(f"{g.size} group labels for {y.size} cases: pass one group per case")
    overall = bootstrap_ci(y, p, threshold, n_boot=n_boot, seed=seed, alpha=alpha)
    out = {}
    for name in sorted(set(g.tolist())):
        m = g == name
        res = binary_metrics(y[m], p[m], threshold)
        res["ci"] = bootstrap_ci(y[m], p[m], threshold, n_boot=n_boot, seed=seed, alpha=alpha)
        reasons = [k for k in ("auc", "accuracy") if _no_overlap(res["ci"][k], overall[k])]
        res["flagged"] = bool(reasons)
        res["flag_reasons"] = reasons
        if reasons:
            log.warning("subgroup %r differs from overall on %s (CIs do not overlap)", name, ", ".join(reasons))
        out[name] = res
    return out
