"""Calibration on validation data: ECE, Brier, reliability curve; temperature (+ bias) scaling fitted by NLL; and
``fit_calibration_and_threshold`` (threshold, temperature and bias of a checkpoint, all from its validation split).

A calibrated probability is sigmoid(logit / T + b) for a binary model (``inference.runtime.pneumonia_score``)
and softmax(logits / T) for a multi-class one. The bias corrects the shift a class-weighted loss puts on logits.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss

from pneumoscope.errors import ConfigError
from pneumoscope.evaluation.metrics import (
    binary_inputs,
    choose_threshold,
    multiclass_inputs,
    operating_points,
)
from pneumoscope.inference.runtime import pneumonia_score, softmax

log = logging.getLogger(__name__)


def expected_calibration_error(y, p, n_bins: int = 15) -> float:
    """Top-label (confidence) ECE of Guo et al. 2017, equal-width bins over [0, 1].

    Binary `p` (probability of class 1): the predicted label is p >= 0.5 and its confidence max(p, 1 - p).
    Multiclass `P` (N, K): argmax and its probability. ECE = sum over bins of |accuracy - mean confidence|
    weighted by the bin's share of cases; bins are (lo, hi].
    """
    p_arr = np.asarray(p)
    if p_arr.ndim == 2:
        y, P = multiclass_inputs(y, p_arr)
        pred, conf = P.argmax(axis=1), P.max(axis=1)
    else:
        y, p1 = binary_inputs(y, p_arr)
        pred = (p1 >= 0.5).astype(np.int64)
        conf = np.where(pred == 1, p1, 1.0 - p1)
    correct = (pred == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.searchsorted(edges[1:-1], conf, side="left")
    # per bin |sum(correct) - sum(confidence)| / N == (n_bin / N) * |accuracy_bin - confidence_bin|
    gap = np.abs(np.bincount(bins, correct, n_bins) - np.bincount(bins, conf, n_bins))
    return float(gap.sum() / y.size)


def brier(y, p) -> float:
    """Brier score: mean (p - y)^2 for binary; mean over cases of sum_k (P_k - onehot_k)^2 for (N, K) P."""
    p_arr = np.asarray(p)
    if p_arr.ndim == 2:
        y, P = multiclass_inputs(y, p_arr)
        # by hand: sklearn's multiclass brier_score_loss needs >= 1.7 and halves the score for K == 2
        return float(np.mean(np.sum((P - np.eye(P.shape[1])[y]) ** 2, axis=1)))
    y, p1 = binary_inputs(y, p_arr)
    return float(brier_score_loss(y, p1, pos_label=1))


def reliability_curve(y, p, n_bins: int = 10) -> dict:
    """Reliability diagram data over equal-width bins of the positive-class probability (empty bins left out).

    Returns {mean_predicted, fraction_positive, count} as lists (sklearn.calibration.calibration_curve).
    """

    y, p = binary_inputs(y, p)
    frac, mean = calibration_curve(y, p, n_bins=n_bins, strategy="uniform")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    count = np.bincount(np.searchsorted(edges[1:-1], p), minlength=n_bins)
    return {
        "mean_predicted": mean.tolist(),
        "fraction_positive": frac.tolist(),
        "count": count[count > 0].astype(int).tolist(),
    }


T_MIN, T_MAX = 0.05, 20.0  # a fitted temperature outside this range means the model is not worth calibrating


def _lbfgs(params: list, loss_fn, max_iter: int) -> None:
    """Minimise ``loss_fn()`` over the float64 tensors ``params`` in place (torch LBFGS, strong Wolfe)."""

    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)


def fit_temperature(logits, y, multiclass: bool = False, max_iter: int = 200) -> float:
    """Temperature T > 0 minimising the NLL of logits / T on validation data (torch LBFGS over log T).

    Binary: `logits` is (N,) (logit of class 1), NLL is binary cross-entropy. Multiclass (or any 2-D logits):
    (N, K) logits and cross-entropy. T > 1 means the model was over-confident.
    """

    z = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    t = torch.as_tensor(np.asarray(y).reshape(-1).astype(np.int64))
    multiclass = multiclass or z.ndim == 2
    if z.shape[0] != t.shape[0] or (multiclass and z.ndim != 2) or (not multiclass and z.ndim != 1):
        raise ConfigError(
            f"fit_temperature got logits of shape {tuple(z.shape)} and {t.shape[0]} labels: pass (N,) binary "
            "logits or (N, K) multiclass logits, one row per label"
        )
    if not torch.isfinite(z).all():
        raise ConfigError("logits contain NaN or inf")
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    loss = F.cross_entropy if multiclass else (lambda scaled, t: F.binary_cross_entropy_with_logits(scaled, t.double()))
    _lbfgs([log_t], lambda: loss(z / log_t.exp(), t), max_iter)
    temp = float(log_t.detach().exp())
    if not math.isfinite(temp) or temp <= 0:
        raise ConfigError(f"temperature fit diverged (T={temp}): check that logits are raw model outputs")
    if not T_MIN <= temp <= T_MAX:
        log.warning("fitted temperature %.4g is outside [%g, %g] (a model that barely separates the classes); clipped",
                    temp, T_MIN, T_MAX)
        temp = min(max(temp, T_MIN), T_MAX)
    log.debug("fitted temperature T=%.4f on %d cases", temp, t.shape[0])
    return temp


def fit_calibration(logits, y, max_iter: int = 200) -> tuple[float, float]:
    """Binary calibration ``sigmoid(z / T + b)``: temperature scaling plus a bias (Platt scaling), fitted by NLL.

    The bias matters for models trained with a class-weighted loss (pneumoscope's default): weighting shifts
    every logit by about log(w_pos / w_neg), a prior shift that a temperature alone cannot undo (it can even
    raise ECE). T is fitted first (as ``fit_temperature``), then (T, b) jointly; T is clipped like there.
    Returns (T, b).
    """

    temp = fit_temperature(logits, y, max_iter=max_iter)
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64).reshape(-1))
    t = torch.as_tensor(np.asarray(y).reshape(-1).astype(np.float64))
    log_t = torch.tensor([math.log(temp)], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    _lbfgs([log_t, b], lambda: F.binary_cross_entropy_with_logits(z / log_t.exp() + b, t), max_iter)
    temp2, bias = float(log_t.detach().exp()), float(b.detach())
    if math.isfinite(temp2) and not T_MIN <= temp2 <= T_MAX:  # clip T like fit_temperature, then refit b alone
        log.warning("fitted temperature %.4g is outside [%g, %g]; clipped, bias refitted", temp2, T_MIN, T_MAX)
        temp2 = min(max(temp2, T_MIN), T_MAX)
        b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        _lbfgs([b], lambda: F.binary_cross_entropy_with_logits(z / temp2 + b, t), max_iter)
        bias = float(b.detach())
    if not (math.isfinite(temp2) and math.isfinite(bias)) or abs(bias) > 20:
        log.warning("calibration fit with a bias failed (T=%.4g, b=%.4g); keeping T=%.4f, b=0", temp2, bias, temp)
        return temp, 0.0
    log.debug("fitted calibration T=%.4f, bias=%.4f on %d cases", temp2, bias, t.shape[0])
    return temp2, bias


def apply_temperature(logits, temperature: float, bias: float = 0.0) -> np.ndarray:
    """Calibrated probabilities: sigmoid(logits / T + b) for (N,) logits, softmax(logits / T) for (N, K)."""
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 2:
        return softmax(z / float(temperature))
    return pneumonia_score(z[:, None], float(temperature), float(bias or 0.0))


def fit_calibration_and_threshold(logits: np.ndarray, y: np.ndarray, threshold_method: str) -> dict:
    """Threshold (on validation data, on the calibrated pneumonia probability), temperature and (binary) bias."""
    ybin = (y > 0).astype(int)
    if logits.shape[1] > 1:
        temperature, bias = float(fit_temperature(logits, y, multiclass=True)), 0.0
    else:
        temperature, bias = fit_calibration(logits[:, 0], ybin)
    p = pneumonia_score(logits, temperature, bias)
    threshold, info = choose_threshold(ybin, p, threshold_method)
    return {"threshold": float(threshold), "threshold_info": info, "temperature": temperature,
            "calibration_bias": bias, "val_operating_points": operating_points(ybin, p),
            "val_prior": float(ybin.mean())}  # the pneumonia prior the calibration was fitted at (adapt.em_prior)
