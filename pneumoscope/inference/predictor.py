"""``Predictor``: a model (or an ONNX Runtime backend) with its preprocessing, calibration and threshold;
``predict(paths or arrays)`` decodes exactly as training did and returns one result dict per input.
Build one with ``inference.loader.load(checkpoint)``."""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pneumoscope.data.folders import patient_id_from_name
from pneumoscope.data.images import os_error_message
from pneumoscope.data.intake import Intake, from_array, from_array_u8, from_path
from pneumoscope.errors import CheckpointError, ImageReadError
from pneumoscope.inference.adapt import adapt_batch, check_batch
from pneumoscope.inference.assess import NOT_ASSESSED, Assessment, assess
from pneumoscope.inference.embedding import (
    EmbeddingReference,
    ReferenceSet,
    reference_features,
)
from pneumoscope.inference.prediction import Prediction
from pneumoscope.inference.runtime import pneumonia_score, predict_logits, softmax
from pneumoscope.inference.tta import with_views
from pneumoscope.models.preprocess import Preprocess

log = logging.getLogger(__name__)

DECODE_THREADS = 2  # files decoded in parallel by predict (the development CPU has 2 cores)


@dataclass
class Predictor:
    model: torch.nn.Module | None
    preprocess: Preprocess
    label_names: tuple[str, ...]
    threshold: float
    temperature: float | None
    calibration_bias: float = 0.0  # binary calibration: sigmoid(logit / temperature + calibration_bias)
    info: dict = field(default_factory=dict)  # name, version, checksum, threshold provenance
    device: torch.device = torch.device("cpu")
    amp: torch.dtype | None = None
    backend: object | None = None  # e.g. inference.onnx.OnnxBackend: .logits(batch_u8) -> np.ndarray
    ood_reference: EmbeddingReference | ReferenceSet | None = None  # shipped in the checkpoint, if any
    threads: int = 0  # ONNX Runtime intra-op threads of the model and the OOD features (0 = one per core)
    tta: tuple[str, ...] = ()  # test-time views averaged with each image (inference/tta.py; the checkpoint's ``tta``)

    # -- the one intake (data/intake.py): decoded once, exactly as training decoded it
    def intake(self, item, quality: bool = True) -> Intake:
        """A path, or a float image in [0, 1] / uint8 array -> ``Intake`` (model input, quality flags, metadata)."""
        size = self.preprocess.input_size
        if isinstance(item, (str, Path)):
            return from_path(item, size, quality=quality)
        return from_array(item, size) if quality else Intake("array", "ARRAY", from_array_u8(item, size), item, [], {})

    def prepare(self, item) -> tuple[np.ndarray, dict]:
        """(uint8 SxS model input, metadata) of a path or an array (``intake`` without the quality flags)."""
        it = self.intake(item, quality=False)
        return it.model_u8, it.meta

    def ood_scores(self, batch_u8: np.ndarray) -> np.ndarray | None:
        """Out-of-distribution score per image (distance to the training images / the reference's threshold:
        > 1 = out of distribution), or None when the model ships no reference."""
        if self.ood_reference is None:
            return None
        ref = self.ood_reference
        return ref.score(reference_features(self, batch_u8, ref.features))

    def assess(self, batch_u8: np.ndarray, quality: list[list[str]]) -> list[Assessment]:
        """``inference.assess.assess`` of each image of a batch: its quality flags and its OOD score."""
        scores = self.ood_scores(batch_u8)
        return [assess(q, None if scores is None else float(s)) for q, s in
                zip(quality, scores if scores is not None else [None] * len(quality))]

    def logits(self, batch_u8: np.ndarray) -> np.ndarray:
        """Logits (N, K) of uint8 images (N, S, S), averaged over the model's test-time views (``tta``): ONNX Runtime
        when the predictor has that backend (its graph holds the views), else PyTorch."""
        if self.backend is not None:
            return self.backend.logits(batch_u8)
        return self.torch_logits(batch_u8, views=self.tta)

    def torch_logits(self, batch_u8: np.ndarray, views: tuple[str, ...] = ()) -> np.ndarray:
        """Logits through the PyTorch model itself (hooks on it see the pass: embeddings); ``views`` averaged in."""
        if self.model is None:
            raise CheckpointError(f"{self.info.get('checkpoint')} is an ONNX model: this needs the PyTorch checkpoint")
        x = torch.from_numpy(np.ascontiguousarray(self.preprocess.standardise(np.asarray(batch_u8)))).unsqueeze(1)
        return predict_logits(with_views(self.model, views), x, self.preprocess, self.device, self.amp)

    def predict(self, items: list, batch_size: int = 16, adapt: str | None = None,
                quality: list[list[str] | None] | None = None) -> list[Prediction]:
        """One ``Prediction`` per input: probability (raw and calibrated), label at the stored threshold (``not assessed``
        with ``not_assessed_reason`` when the model cannot assess the image: inference/assess.py), ``warnings``,
        ``ood_score`` and ``out_of_distribution``; or an error.

        ``quality``: the model-free flags of each item when the caller has them from its intake (the service: the
        upload's ``data.intake.Intake.quality``, the same as this intake computes for the same file).
        ``adapt`` ("prior"; opt-in, inference/adapt.py): the readable inputs, at least ``adapt.MIN_BATCH``, are one
        batch from a new site; each result then also holds ``adapted_probability`` and its label comes from it (and says so)."""
        if isinstance(items, (str, Path, np.ndarray)):
            items = [items]
        known = quality if quality is not None else [None] * len(items)

        def read(i: int):
            try:
                return self.intake(items[i], quality=known[i] is None)
            except (ImageReadError, OSError) as e:  # OSError: missing, unreadable, a link loop, ...
                return e

        results: list[Prediction] = []
        ready: list[tuple[int, np.ndarray]] = []
        paths = sum(isinstance(x, (str, Path)) for x in items)
        with ThreadPoolExecutor(max_workers=DECODE_THREADS if paths > 1 else 1) as pool:  # Pillow frees the GIL
            decoded = list(pool.map(read, range(len(items))))
        for i, (item, it) in enumerate(zip(items, decoded)):
            r = Prediction(path=str(item) if isinstance(item, (str, Path)) else f"array[{i}]")
            if isinstance(item, (str, Path)):
                r.patient_id = patient_id_from_name(Path(item).name)
            if isinstance(it, Exception):
                r.error = os_error_message(r.path, it) if isinstance(it, OSError) else str(it)
                log.warning("cannot read %s", r.error)
            else:
                r.patient_id = it.meta.get("patient_id") or r.patient_id
                r.warnings = list(known[i]) if known[i] is not None else list(it.quality)
                ready.append((i, it.model_u8))
            results.append(r)
        if adapt:
            check_batch(len(ready))  # before any model work
        for start in range(0, len(ready), batch_size):
            chunk = ready[start:start + batch_size]
            batch = np.stack([u for _, u in chunk])
            logits = self.logits(batch)
            assessments = self.assess(batch, [results[i].warnings for i, _ in chunk])
            raw = pneumonia_score(logits)
            cal = pneumonia_score(logits, self.temperature, self.calibration_bias) if self.temperature else None
            for k, ((i, _), a, lg) in enumerate(zip(chunk, assessments, logits)):
                r = results[i]
                r.warnings, r.ood_score, r.out_of_distribution = a.warnings, a.ood_score, a.out_of_distribution
                r.not_assessed_reason = a.reason
                r.probability = float(raw[k])
                r.logit = float(lg[0]) if len(lg) == 1 else None
                r.calibrated_probability = None if cal is None else float(cal[k])
                r.label_from = "probability" if cal is None else "calibrated_probability"  # >= threshold
                r.threshold = self.threshold
                r.label = NOT_ASSESSED if not a.assessed else ("PNEUMONIA" if r.score >= self.threshold else "NORMAL")
                if len(self.label_names) > 2:
                    probs = softmax(lg[None] / (self.temperature or 1.0))[0]
                    r.class_probabilities = {n: float(q) for n, q in zip(self.label_names, probs)}
                    r.predicted_class = self.label_names[int(probs.argmax())]
        if adapt and ready:
            p, info = adapt_batch(self, np.stack([u for _, u in ready]), adapt)
            for (i, _), q in zip(ready, p):
                r = results[i]
                r.adapted_probability, r.adaptation, r.label_from = float(q), adapt, "adapted_probability"
                if r.label != NOT_ASSESSED:
                    r.label = "PNEUMONIA" if q >= self.threshold else "NORMAL"
                r.warnings.append(f"label from the probability adapted to this batch of {info['n']} images "
                                  f"(--adapt-to-batch {adapt}); calibrated_probability is the plain model's")
        return results
