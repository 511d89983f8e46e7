"""Local validation on few films: out-of-fold predictions for every film, a threshold that never saw the films it
is judged on, patient-level bootstrap CIs, a learning curve and the out-of-distribution rate of new films."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from pneumoscope.evaluation.calibration import (
    expected_calibration_error,
    fit_calibration,
)
from pneumoscope.evaluation.metrics import (
    binary_metrics,
    bootstrap_ci,
    choose_threshold,
)
from pneumoscope.inference.assess import assess
from pneumoscope.inference.embedding import EmbeddingReference, ReferenceSet
from pneumoscope.inference.features import NAME
from pneumoscope.inference.runtime import pneumonia_score
from pneumoscope.studies.adapt.strategies import Strategy

log = logging.getLogger(__name__)

LEARNING_SIZES = (50, 100, 200)  # training films per fold, besides all of them
N_BOOT = 2000


@dataclass
class CVResult:
    key: str
    name: str
    n_weights: int
    oof: np.ndarray  # (N,) out-of-fold logits
    p: np.ndarray  # (N,) out-of-fold probabilities, each calibrated on the other folds' out-of-fold logits
    label: np.ndarray  # (N,) 0/1 at a threshold chosen on the other folds (never on the film's own fold)
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0


def out_of_fold(strategy: Strategy, fold: np.ndarray, train_subset=None) -> np.ndarray:
    """(N,) logits, each from the strategy fitted without the film's fold. ``train_subset(train_idx, k)`` may
    shrink the training films (learning curve); the test folds stay whole."""
    oof = np.zeros(len(fold))
    for k in range(fold.max() + 1):
        train = np.flatnonzero(fold != k)
        if train_subset is not None:
            train = train_subset(train, k)
        test = np.flatnonzero(fold == k)
        oof[test] = strategy.logits(strategy.fit(train), test)
    return oof


def cross_fitted(y: np.ndarray, oof: np.ndarray, fold: np.ndarray,
                 method: str = "youden") -> tuple[np.ndarray, np.ndarray]:
    """Calibrated probabilities and labels of each fold with the calibration and the threshold (``method``: youden,
    sensitivity:T or specificity:T) fitted on the OTHER folds' out-of-fold predictions: what the final model's
    stored threshold does to films it never saw."""
    p, label = np.zeros(len(y)), np.zeros(len(y), dtype=np.int64)
    for k in range(fold.max() + 1):
        rest, here = fold != k, fold == k
        t, b = fit_calibration(oof[rest], y[rest])
        p_rest = pneumonia_score(oof[rest, None], t, b)
        threshold, _ = choose_threshold(y[rest], p_rest, method)
        p[here] = pneumonia_score(oof[here, None], t, b)
        label[here] = p[here] >= threshold
    return p, label


def summarise(y: np.ndarray, oof: np.ndarray, fold: np.ndarray, patients: np.ndarray,
              method: str = "youden") -> tuple[dict, np.ndarray, np.ndarray]:
    """AUC of the out-of-fold logits and sensitivity / specificity at the cross-fitted threshold, each with a
    patient-level bootstrap 95 % CI; ECE of the cross-fitted probabilities."""
    p, label = cross_fitted(y, oof, fold, method)
    ranks = pneumonia_score(oof[:, None] / max(1e-6, float(np.std(oof))))  # any monotone map: AUC only
    auc = binary_metrics(y, ranks)["auc"]
    auc_ci = bootstrap_ci(y, ranks, 0.5, N_BOOT, groups=patients)["auc"]
    at = binary_metrics(y, label.astype(float), 0.5)
    ci = bootstrap_ci(y, label.astype(float), 0.5, N_BOOT, groups=patients)
    return ({"auc": auc, "auc_ci": auc_ci, "sensitivity": at["sensitivity"], "sensitivity_ci": ci["sensitivity"],
             "specificity": at["specificity"], "specificity_ci": ci["specificity"], "accuracy": at["accuracy"],
             "ece": expected_calibration_error(y, p)}, p, label)


def cross_validate(strategy: Strategy, y: np.ndarray, fold: np.ndarray, patients: np.ndarray,
                   method: str = "youden") -> CVResult:
    t0 = time.perf_counter()
    oof = out_of_fold(strategy, fold)
    metrics, p, label = summarise(y, oof, fold, patients, method)
    r = CVResult(strategy.key, strategy.name, strategy.n_weights, oof, p, label, metrics, time.perf_counter() - t0)
    log.info("%-6s %-60s CV AUC %.3f [%.3f, %.3f]  sens %.3f  spec %.3f  (%.0f s)", r.key, r.name, metrics["auc"],
             *metrics["auc_ci"], metrics["sensitivity"], metrics["specificity"], r.seconds)
    return r


def choose_winner(results: list[CVResult], margin: float = 0.01) -> CVResult:
    """The rule of docs/adapt.md, fixed before any table was filled: the highest cross-validated AUC wins; a
    strategy within ``margin`` of it that fits fewer numbers to the site wins instead (the simplest one)."""
    best = max(r.metrics["auc"] for r in results)
    close = [r for r in results if r.metrics["auc"] >= best - margin]
    return min(close, key=lambda r: (r.n_weights, -r.metrics["auc"]))


def _films_of_patients(train: np.ndarray, y: np.ndarray, patients: np.ndarray, n: int, seed: int) -> np.ndarray:
    """About ``n`` films of ``train``, half of each class, whole patients at a time (seeded)."""
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for c in (0, 1):
        idx = train[y[train] == c]
        pats = rng.permutation(sorted(set(patients[idx])))
        got = 0
        for pat in pats:
            if got >= n // 2:
                break
            films = idx[patients[idx] == pat]
            keep += films.tolist()
            got += len(films)
    return np.array(sorted(keep), dtype=np.int64)


def learning_curve(strategy: Strategy, y: np.ndarray, fold: np.ndarray, patients: np.ndarray, seed: int = 0) -> list[dict]:
    """CV AUC with the training folds cut to LEARNING_SIZES films (whole patients, both classes) and with all of
    them; the test folds stay whole, so every point is measured on the same films."""
    n_train = int(np.min([np.sum(fold != k) for k in range(fold.max() + 1)]))
    rows = []
    for n in [s for s in LEARNING_SIZES if s < n_train] + [None]:
        sub = None if n is None else (lambda train, k, n=n: _films_of_patients(train, y, patients, n, seed + k))
        oof = out_of_fold(strategy, fold, sub)
        ranks = pneumonia_score(oof[:, None] / max(1e-6, float(np.std(oof))))
        rows.append({"train_films": n or n_train, "auc": binary_metrics(y, ranks)["auc"],
                     "auc_ci": bootstrap_ci(y, ranks, 0.5, N_BOOT, groups=patients)["auc"]})
        log.info("learning curve: %d training films per fold -> CV AUC %.3f", rows[-1]["train_films"], rows[-1]["auc"])
    return rows


def more_films_help(curve: list[dict]) -> bool:
    """True when the last step of the learning curve still gained more than 0.01 AUC."""
    return len(curve) >= 2 and curve[-1]["auc"] - curve[-2]["auc"] > 0.01


def ood_rate(texture: np.ndarray, quality: list[list[str]], fold: np.ndarray, base: list[EmbeddingReference],
             quantile: float) -> dict:
    """Share of the site's films that would be 'not assessed' by a model whose reference covers the base's images
    (``base``: its references in the ``texture`` feature space) and the site's training folds: each fold scored
    against a site reference fitted without it, so the figure is what NEW films of this site will see, not the
    in-sample rate of the films the reference was fitted on. ``quality``: each film's model-free flags."""
    flagged = np.zeros(len(fold), dtype=bool)
    for k in range(fold.max() + 1):
        site = EmbeddingReference.fit(texture[fold != k], quantile, space=NAME)
        scores = ReferenceSet([site, *base]).score(texture[fold == k])
        for i, s in zip(np.flatnonzero(fold == k), scores):
            flagged[i] = not assess(quality[i], float(s)).assessed
    blocked = np.array([not assess(q).assessed for q in quality])
    return {"not_assessed": float(flagged.mean()), "by_quality_flags": float(blocked.mean()), "n": int(len(fold))}
