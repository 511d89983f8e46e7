"""Adapting to a new site without labels: explicit, opt-in, and always reported.

- ``em_prior``: label-prior re-estimation by EM (Saerens, Latinne & Decaestecker, Neural Computation 14:21, 2002).
  The classifier's posteriors were calibrated where the pneumonia prior was ``source_prior`` (the validation split);
  on a batch from a site with another prior, EM alternates p'(y|x) ∝ (π'_y / π_y) p(y|x) and π'_y = mean p'(y|x) until
  the prior stops moving. Only the prior changes: a site that differs in appearance is not fixed by it.
- ``adabn``: BatchNorm statistics re-estimated on the target batch (AdaBN, Li et al. 2018): a copy of the model whose
  BN layers carry the batch's mean/variance; every weight is unchanged. A model without BatchNorm (seed_cnn) is left
  as it is, and the caller is told.

Neither is ever on by default: ``pneumoscope evaluate|predict --adapt-to-batch prior|bn|both``.
"""
from __future__ import annotations

import copy
import dataclasses
import logging

import numpy as np
import torch
from torch import nn

from pneumoscope.errors import ConfigError
from pneumoscope.inference.runtime import pneumonia_score, to_input

log = logging.getLogger(__name__)

MODES = ("prior", "bn", "both")


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


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def adabn(model: nn.Module, images_u8: np.ndarray, preprocess, device: torch.device, batch_size: int = 32) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are those of ``images_u8`` (N, S, S) uint8 at the
    model's input size (cumulative average over the batch; dropout stays off). ``model`` itself is not changed."""
    adapted = copy.deepcopy(model).eval()
    bns = [m for m in adapted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return adapted
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: every image weighs the same
        bn.train()
    x = torch.from_numpy(np.ascontiguousarray(images_u8)).unsqueeze(1)
    for i in range(0, len(x), batch_size):
        adapted(to_input(x[i:i + batch_size], preprocess, device))
    return adapted.eval()


def adapt_batch(predictor, images_u8: np.ndarray, mode: str) -> tuple[np.ndarray, dict]:
    """Calibrated pneumonia probabilities of the batch ``images_u8`` (N, S, S) after the adaptation ``mode`` (prior,
    bn or both), and what was done (for the report). The predictor itself is not changed."""
    if mode not in MODES:
        raise ConfigError(f"--adapt-to-batch {mode!r} is invalid: choose one of {', '.join(MODES)}")
    if len(predictor.label_names) != 2:
        raise ConfigError("--adapt-to-batch works for binary (NORMAL/PNEUMONIA) models only")
    info: dict = {"mode": mode, "n": int(len(images_u8))}
    notes = []
    if mode in ("bn", "both"):
        if predictor.model is None:
            raise ConfigError("--adapt-to-batch bn needs a PyTorch checkpoint (.pt); an ONNX model cannot be adapted")
        n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in predictor.model.modules())
        info["bn_layers"] = n_bn
        if n_bn:
            model = adabn(predictor.model, predictor.preprocess.standardise(images_u8), predictor.preprocess,
                          predictor.device)
            predictor = dataclasses.replace(predictor, model=model)
            notes.append(f"BatchNorm statistics of {n_bn} layers re-estimated on these {len(images_u8)} images")
        else:
            notes.append("the model has no BatchNorm layer: bn adaptation changes nothing")
    logits = predictor.logits(images_u8)
    p = pneumonia_score(logits, predictor.temperature or 1.0, predictor.calibration_bias)
    if mode in ("prior", "both"):
        source = predictor.info.get("val_prior")
        if source is None:
            raise ConfigError(f"{predictor.info.get('checkpoint')} stores no validation prior (val_prior): train or "
                              "rebuild it with this version of pneumoscope to use --adapt-to-batch prior")
        p, prior, iterations = em_prior(p, float(source))
        info.update(source_prior=float(source), estimated_prior=prior, em_iterations=iterations)
        notes.append(f"pneumonia prior re-estimated by EM: {source:.3f} (validation) -> {prior:.3f} (this batch)")
    info["note"] = ("Adapted to this batch without labels: " + "; ".join(notes) + ". Figures of the plain model are "
                    "the ones validated; these depend on the batch.")
    return p, info
