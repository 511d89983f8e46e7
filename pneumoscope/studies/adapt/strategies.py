"""The ways ``pneumoscope adapt`` can make a model for a site, each fitted on the training folds only and scored on
the same patient-level folds (docs/adapt.md):

- **a** recalibration: the base model unchanged; only its calibration and threshold are fitted to the site;
- **b** a logistic head on frozen features (scikit-learn, L2 strength chosen by an inner patient-level CV on the
  training folds): of the base model or of ImageNet EfficientNet-Lite0; its pooled last features or the
  statistics of every block (multi-layer features transfer better than the last layer alone when the target
  differs from the source: Yosinski et al. 2014; Raghu et al. 2019);
- **c** partial fine-tuning of the base's last blocks (finetune.py);
- **d** the same with replay of the base's training images (rehearsal against forgetting);
- **e** the best-suited head (ImageNet block statistics) with the same replay: one linear model for both populations.

A ``Strategy`` is three functions: ``fit(train_idx)``, ``logits(fitted, idx)`` and ``model(fitted)``, the network
to ship (an ordinary registry model: ``FeatureHead`` or the fine-tuned base).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from pneumoscope.models.feature_head import FeatureHead
from pneumoscope.studies.adapt.finetune import (
    finetune,
    tail_logits,
    trainable_parameters,
)

CS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # inverse L2 strengths tried by the inner CV (features are standardised)
INNER_FOLDS = 4


@dataclass
class Strategy:
    key: str  # a, b1, ..., d: the table's row id
    name: str
    n_weights: int  # numbers fitted on the site's films (the tie rule prefers fewer)
    fit: Callable[[np.ndarray], object]
    logits: Callable[[object, np.ndarray], np.ndarray]
    model: Callable[[object], nn.Module]
    X: np.ndarray | None = None  # a head's per-film features (shared by the heads that read the same ones)


def logistic(X: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int = 0):
    """StandardScaler + L2 logistic regression, C chosen by a grouped, stratified inner CV on (X, y) (ROC AUC)."""
    inner = StratifiedGroupKFold(n_splits=INNER_FOLDS, shuffle=True, random_state=seed)
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    search = GridSearchCV(pipe, {"logisticregression__C": list(CS)}, cv=inner, scoring="roc_auc", refit=True)
    return search.fit(X, y, groups=groups).best_estimator_


def recalibration(base: nn.Module, base_logits: np.ndarray) -> Strategy:
    return Strategy("a", "recalibration + local threshold (base weights unchanged)", 2,
                    fit=lambda idx: None, logits=lambda _, idx: base_logits[idx], model=lambda _: base)


def head(key: str, name: str, trunk: nn.Module, kind: str, X: np.ndarray, y: np.ndarray, patients: np.ndarray,
         replay: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> Strategy:
    """A logistic head on features ``X`` (N, D) that ``FeatureHead(trunk, kind)`` computes (views.trunk_features).
    ``replay`` = (features, labels, patient ids) of base training images, added to every fit (never scored)."""
    def fit(idx: np.ndarray):
        if replay is None:
            return logistic(X[idx], y[idx], patients[idx])
        return logistic(np.vstack([X[idx], replay[0]]), np.concatenate([y[idx], replay[1]]),
                        np.concatenate([patients[idx], replay[2]]))

    def model(pipe) -> nn.Module:
        scaler, lr = pipe.named_steps["standardscaler"], pipe.named_steps["logisticregression"]
        return FeatureHead(trunk, kind, X.shape[1]).set_head(scaler.mean_, scaler.scale_, lr.coef_[0],
                                                             lr.intercept_[0]).eval()

    return Strategy(key, name, X.shape[1] + 1, fit=fit, logits=lambda pipe, idx: pipe.decision_function(X[idx]),
                    model=model, X=X)


def fine_tune(key: str, name: str, base: nn.Module, cut: np.ndarray, y: np.ndarray,
              replay: tuple[np.ndarray, np.ndarray] | None = None, seed: int = 0) -> Strategy:
    n = sum(p.numel() for p in trainable_parameters(base))
    return Strategy(key, name, n, fit=lambda idx: finetune(base, cut[idx], y[idx], replay, seed),
                    logits=lambda m, idx: tail_logits(m, cut[idx]), model=lambda m: m)


def style_only(X: np.ndarray, y: np.ndarray, patients: np.ndarray) -> Strategy:
    """The confounding check's model: a logistic regression on features that know nothing of anatomy."""
    return Strategy("style", "style only (no anatomy)", X.shape[1] + 1, fit=lambda idx: logistic(X[idx], y[idx], patients[idx]),
                    logits=lambda pipe, idx: pipe.decision_function(X[idx]), model=lambda _: None)
