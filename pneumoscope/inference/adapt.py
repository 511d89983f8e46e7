"""Adapting to a new site without labels: explicit, opt-in, and always reported. Only the label prior.

``em_prior``: label-prior re-estimation by EM (Saerens, Latinne & Decaestecker, Neural Computation 14:21, 2002).
The classifier's posteriors were calibrated where the pneumonia prior was ``source_prior`` (the validation split);
on a batch from a site with another prior, EM alternates p'(y|x) ∝ (π'_y / π_y) p(y|x) and π'_y = mean p'(y|x) until
the prior stops moving. Only the prior changes: the ranking (AUC) stays, and a site that differs in appearance is
not fixed by it. A batch must hold at least ``MIN_BATCH`` images.

Measured on the bundled model (docs/adapt.md): the prior moves the operating point only, helping on one probe
(hannover sensitivity 0.897 -> 0.947) and hurting on another (site_nih specificity 0.133 -> 0.073). Re-estimating
BatchNorm statistics on the batch (AdaBN), offered until issue 22, lowered AUC on every set measured (validation
0.996 -> 0.950, actualmed 0.957 -> 0.731, site_nih 0.456 -> 0.382) and turned a batch of one film into PNEUMONIA
0.99999: it was removed. A new site that needs a working model labels a few hundred films: ``pneumoscope adapt``.

Never on by default: ``pneumoscope evaluate|predict --adapt-to-batch prior``.
"""
from __future__ import annotations

import logging

import numpy as np

from pneumoscope.errors import ConfigError
from pneumoscope.inference.runtime import pneumonia_score

log = logging.getLogger(__name__)

MODES = ("prior",)
MIN_BATCH = 50


def em_prior(p: np.ndarray, source_prior: float, max_iter: int = 1000, tol: float = 1e-8) -> tuple[np.ndarray, float, int]:
    """(adapted probabilities, estimated target prior, iterations) for binary posteriors ``p`` = P(pneumonia | x)."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    if p.ndim != 1 or p.size == 0:
        raise ConfigError(f"em_prior needs a non-empty 1-D array of probabilities, got shape {p.shape}")
    if not 0.0 < source_prior < 1.0:
        raise ConfigError(f"source prior {source_prior!r} must be strictly between 0 and 1")
    prior, q = source_prior, p
    for it in range(1, max_iter + 1):
        w1, w0 = prior / source_prior, (1 - prior) / (1 - source_prior)
        q = w1 * p / (w1 * p + w0 * (1 - p))
        new = float(q.mean())
        if abs(new - prior) < tol:
            return q, new, it
        prior = new
    log.warning("EM prior estimation did not converge in %d iterations (last prior %.4f)", max_iter, prior)
    return q, prior, max_iter


def adapt_batch(predictor, images_u8: np.ndarray, mode: str) -> tuple[np.ndarray, dict]:
    """Calibrated pneumonia probabilities of the batch ``images_u8`` (N, S, S) after the adaptation ``mode``
    ("prior"), and what was done (for the report). The predictor itself is not changed."""
    if mode not in MODES:
        raise ConfigError(f"--adapt-to-batch {mode!r} is invalid: choose one of {', '.join(MODES)}")
    check_batch(len(images_u8))
    if len(predictor.label_names) != 2:
        raise ConfigError("--adapt-to-batch works for binary (NORMAL/PNEUMONIA) models only")
    source = predictor.info.get("val_prior")
    if source is None:
        raise ConfigError(f"{predictor.info.get('checkpoint')} stores no validation prior (val_prior): train or "
                          "rebuild it with this version of pneumoscope to use --adapt-to-batch prior")
    logits = predictor.logits(images_u8)
    p = pneumonia_score(logits, predictor.temperature or 1.0, predictor.calibration_bias)
    p, prior, iterations = em_prior(p, float(source))
    info = {"mode": mode, "n": int(len(images_u8)), "source_prior": float(source), "estimated_prior": prior,
            "em_iterations": iterations,
            "note": (f"Adapted to this batch without labels: pneumonia prior re-estimated by EM: {source:.3f} "
                     f"(validation) -> {prior:.3f} (these {len(images_u8)} images). Figures of the plain model are "
                     "the ones validated; these depend on the batch.")}
    return p, info


def check_batch(n: int) -> None:
    """ConfigError when ``n`` images are too few to estimate a prior from (before any work is done)."""
    if n < MIN_BATCH:
        raise ConfigError(f"--adapt-to-batch needs at least {MIN_BATCH} readable images in one batch, got {n}: the "
                          f"pneumonia prior of fewer cannot be estimated (its standard error would exceed "
                          f"{0.5 / MIN_BATCH ** 0.5:.2f}); drop the option, or pass a larger batch of this site's images")
