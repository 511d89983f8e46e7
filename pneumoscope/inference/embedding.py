"""The predictor's out-of-distribution check: ``EmbeddingReference``, a Gaussian of training features (Ledoit-Wolf
covariance) whose Mahalanobis distance flags images beyond a quantile (default 99 %) of out-of-fold training
distances. The features are ``features.NAME`` (generic ImageNet feature statistics, the default since they separate
populations; inference/features.py) or ``"model"``: the classifier's own pooled last features (``feature_layer``),
which checkpoints made before the generic features existed carry.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pneumoscope.inference.features import NAME, features


def feature_layer(model) -> str:
    """Name of the module whose INPUT, average-pooled over space when it is a feature map, is the embedding.

    The last feature map or pooled vector before the classifier, like FID's pooled features: generic image
    features, less class-collapsed than the last hidden layer of the head.

    seed_cnn: ``backbone.flatten`` (128 channels of the last conv block, pooled); cnn_rnn: ``head`` (128 channels
    of the last conv block, pooled; before the GRU); efficientnet_lite0: ``head`` (1280, pooled by the backbone);
    densenet121: ``head`` (1024); resnet18: ``head`` (512).
    """

    if hasattr(model, "members"):  # an ensemble (models/ensemble.py): its first member's embedding
        return "members.0." + feature_layer(model.members[0])
    last = list(model.backbone.children())[-1] if len(list(model.backbone.children())) else None
    return "backbone." + list(model.backbone._modules)[-1] if isinstance(last, nn.Flatten) else "head"


def embed(predictor, images_u8: np.ndarray) -> np.ndarray:
    """Embeddings (N, D) float32 of uint8 images (N, S, S) at the model input size (see ``feature_layer``).

    The hook is removed afterwards; the model is left as it was.
    """
    model = predictor.model
    module = dict(model.named_modules())[feature_layer(model)]
    feats: list[np.ndarray] = []

    def hook(_m, inp) -> None:
        x = inp[0].detach().float()
        feats.append((x.mean(dim=(2, 3)) if x.dim() == 4 else x.flatten(1)).cpu().numpy())

    handle = module.register_forward_pre_hook(hook)
    try:
        predictor.torch_logits(np.asarray(images_u8))  # the PyTorch pass, whatever the predictor's backend
    finally:
        handle.remove()
    return np.concatenate(feats).astype(np.float32)


@dataclass
class EmbeddingReference:
    """Gaussian model of training embeddings: ``distance`` = Mahalanobis, ``flag`` = beyond the threshold."""

    mean: np.ndarray  # (D,) float32
    precision: np.ndarray  # (D, D) float32, inverse of the Ledoit-Wolf covariance
    threshold: float  # the ``quantile`` of the fitting images' distances
    quantile: float = 0.99
    layer: str = ""
    n_fit: int = 0
    features: str = "model"  # which feature space: "model" (the classifier's, see feature_layer) or features.NAME

    @classmethod
    def fit(cls, features: np.ndarray, quantile: float = 0.99, layer: str = "", folds: int = 5,
            seed: int = 0, space: str = "model") -> "EmbeddingReference":
        """Fit mean and Ledoit-Wolf precision on training features (N, D).

        The threshold is the ``quantile`` of *out-of-fold* distances (``folds``-fold: each image measured against
        a fit without it). In-sample distances are biased low, badly so when N is not much larger than D, and
        would flag most new in-distribution images; out-of-fold ones flag about 1 - quantile of them.
        """

        from sklearn.covariance import (
            LedoitWolf,  # here: importing scikit-learn costs predict's start-up 1.3 s
        )

        X = np.asarray(features, dtype=np.float64)
        if X.ndim != 2 or X.shape[0] < 2 * folds:
            raise ValueError(f"EmbeddingReference.fit needs features (N >= {2 * folds}, D), got shape {X.shape}")
        lw = LedoitWolf().fit(X)
        ref = cls(mean=lw.location_.astype(np.float32), precision=lw.precision_.astype(np.float32), threshold=0.0,
                  quantile=quantile, layer=layer, n_fit=int(X.shape[0]), features=space)
        fold = np.random.default_rng(seed).permutation(X.shape[0]) % folds
        oof = np.empty(X.shape[0])
        for k in range(folds):
            part = LedoitWolf().fit(X[fold != k])
            diff = X[fold == k] - part.location_
            oof[fold == k] = np.sqrt(np.maximum(np.einsum("nd,de,ne->n", diff, part.precision_, diff), 0.0))
        ref.threshold = float(np.quantile(oof, quantile))
        return ref

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row (or of one vector) to the training mean."""
        X = np.atleast_2d(np.asarray(features, dtype=np.float64)) - self.mean.astype(np.float64)
        d2 = np.einsum("nd,de,ne->n", X, self.precision.astype(np.float64), X)
        d = np.sqrt(np.maximum(d2, 0.0))
        return d if np.ndim(features) == 2 else d[0]

    def score(self, features: np.ndarray) -> np.ndarray:
        """Out-of-distribution score of each row: distance / threshold (> 1 = out of distribution)."""
        return np.atleast_1d(self.distance(features)) / self.threshold

    def flag(self, features: np.ndarray):
        """True where the distance exceeds the threshold: a bool for one vector, a bool array for (N, D)."""
        f = self.distance(features) > self.threshold
        return f if np.ndim(f) else bool(f)

    def to_dict(self) -> dict:
        """Tensors and plain values only (``torch.load(weights_only=True)`` reads it back inside a checkpoint).

        seed_cnn and cnn_rnn (D=128): (128 + 128 x 128) float32 = 66 kB; resnet18 1 MB; densenet121 4.2 MB;
        efficientnet_lite0 6.6 MB.
        """

        return {"mean": torch.from_numpy(self.mean.astype(np.float32)),
                "precision": torch.from_numpy(self.precision.astype(np.float32)),
                "threshold": float(self.threshold), "quantile": float(self.quantile), "layer": self.layer,
                "n_fit": int(self.n_fit), "features": self.features}

    @classmethod
    def from_dict(cls, d: dict) -> "EmbeddingReference":
        def arr(v) -> np.ndarray:
            return (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)).astype(np.float32)

        return cls(mean=arr(d["mean"]), precision=arr(d["precision"]), threshold=float(d["threshold"]),
                   quantile=float(d.get("quantile", 0.99)), layer=str(d.get("layer", "")), n_fit=int(d.get("n_fit", 0)),
                   features=str(d.get("features", "model")))


@dataclass
class ReferenceSet:
    """Several populations a model was validated on, e.g. its base model's training images and the films of the site
    it was adapted to (``pneumoscope adapt``): one ``EmbeddingReference`` each, in the same feature space. An image
    is in distribution when it lies within the threshold of ANY of them: its score is the smallest of their scores.
    A single Gaussian fitted on the pooled images would instead stretch over the gap between the populations and
    stop flagging what lies between or beyond them."""

    references: list[EmbeddingReference]

    def __post_init__(self) -> None:
        if not self.references or len({r.features for r in self.references}) != 1:
            raise ValueError("a ReferenceSet needs >= 1 reference, all in one feature space, got "
                             f"{[r.features for r in self.references]}")

    @property
    def features(self) -> str:
        return self.references[0].features

    @property
    def quantile(self) -> float:  # an image is flagged only when beyond every reference: at most each one's rate
        return max(r.quantile for r in self.references)

    def score(self, features: np.ndarray) -> np.ndarray:
        return np.min([r.score(features) for r in self.references], axis=0)

    def to_dict(self) -> dict:
        return {"components": [r.to_dict() for r in self.references]}


def reference_from_dict(d: dict) -> EmbeddingReference | ReferenceSet:
    """What a checkpoint's ``ood_reference`` holds: one reference, or ``{"components": [...]}`` of several."""
    if "components" in d:
        return ReferenceSet([EmbeddingReference.from_dict(c) for c in d["components"]])
    return EmbeddingReference.from_dict(d)


def reference_features(predictor, images_u8: np.ndarray, space: str) -> np.ndarray:
    """Features of uint8 images (N, S, S) at the model input size in ``space`` ("model" or features.NAME)."""
    if space == "model":
        return embed(predictor, images_u8)
    if space != NAME:
        raise ValueError(f"unknown out-of-distribution feature space {space!r}; known: model, {NAME}")
    return features(images_u8, threads=getattr(predictor, "threads", 0))


def reference_from_images(predictor, images_u8: np.ndarray, quantile: float = 0.99,
                          space: str = "model") -> EmbeddingReference:
    """Fit an ``EmbeddingReference`` on uint8 images (N, S, S) at the model input size."""
    layer = feature_layer(predictor.model) if space == "model" else ""
    return EmbeddingReference.fit(reference_features(predictor, images_u8, space), quantile, layer, space=space)
