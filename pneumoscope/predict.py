"""Prediction: ``load(checkpoint).predict(paths or arrays)``, preprocessing exactly as in training."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pneumoscope.checkpoint import file_sha256, load_checkpoint, model_from_checkpoint
from pneumoscope.data.folders import FILE_EXTENSIONS, patient_id_from_name
from pneumoscope.errors import CheckpointError, ImageReadError
from pneumoscope.models import Preprocess
from pneumoscope.train import pick_device, pick_precision, pneumonia_score, predict_logits, softmax

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default_model.pt"


def default_checkpoint() -> Path:
    """The model shipped inside the package (see MODEL_CARD.md)."""
    from importlib.resources import files

    p = Path(str(files("pneumoscope") / "resources" / DEFAULT_MODEL))
    if not p.is_file():
        raise CheckpointError(f"no bundled default model at {p}; pass --checkpoint RUN_DIR/best.pt")
    return p


def expand_paths(inputs: list[str | Path]) -> list[Path]:
    """Files as given; folders expanded recursively to their image/DICOM files (sorted)."""
    out: list[Path] = []
    for i in inputs:
        p = Path(i)
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in FILE_EXTENSIONS
                          and not f.name.startswith("."))
        else:
            out.append(p)
    return out


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
    backend: object | None = None  # e.g. pneumoscope.export.OnnxBackend: .logits(batch_u8) -> np.ndarray
    ood_reference: object | None = None  # ood.EmbeddingReference shipped in the checkpoint, if any

    # -- preprocessing: the same uint8 resize as training's decode
    def prepare(self, item) -> tuple[np.ndarray, dict]:
        """A path, or a float image in [0, 1] / uint8 array -> (uint8 SxS, meta)."""
        from pneumoscope.data.images import check_intensity, load_uint8, read_image, resize_uint8, to_uint8

        size = self.preprocess.input_size
        if isinstance(item, (str, Path)):
            p = Path(item)
            meta: dict = {}
            if p.suffix.lower() in (".dcm", ".dicom"):
                img, meta = read_image(p)
                return resize_uint8(to_uint8(img), size), meta
            return load_uint8(p, size), meta
        arr = np.asarray(item)
        if arr.dtype == np.uint8:
            return resize_uint8(arr, size), {}
        return resize_uint8(to_uint8(check_intensity(arr)), size), {}

    def input_warnings(self, item, u8: np.ndarray, meta: dict) -> list[str]:
        """Model-free quality / out-of-distribution flags (blank, photo-like colour, exposure, polarity...)."""
        from pneumoscope.ood import file_warnings, image_warnings

        if isinstance(item, (str, Path)) and meta.get("format") != "DICOM" and Path(item).suffix.lower() not in (".dcm", ".dicom"):
            return file_warnings(item)
        return list(meta.get("warnings", [])) + image_warnings(np.asarray(item) if not isinstance(item, (str, Path)) else u8, meta)

    def embedding_warnings(self, batch_u8: np.ndarray) -> list[list[str]]:
        """Flags for images far from the training images in the model's embedding space (needs ``ood_reference``)."""
        if self.ood_reference is None:
            return [[] for _ in batch_u8]
        from pneumoscope.ood import embed

        d = self.ood_reference.distance(embed(self, batch_u8))
        t = self.ood_reference.threshold
        return [[f"out of distribution: embedding distance {x:.1f} > {t:.1f} (99th percentile of training images); "
                 "the model may not apply to this image"] if x > t else [] for x in np.atleast_1d(d)]

    def logits(self, batch_u8: np.ndarray) -> np.ndarray:
        if self.backend is not None:
            return self.backend.logits(batch_u8)
        x = torch.from_numpy(np.ascontiguousarray(batch_u8)).unsqueeze(1)
        return predict_logits(self.model, x, self.preprocess, self.device, self.amp)

    def predict(self, items: list, batch_size: int = 16) -> list[dict]:
        """One dict per input: probability (raw and calibrated), label at the stored threshold, or an error."""
        if isinstance(items, (str, Path, np.ndarray)):
            items = [items]
        results: list[dict] = []
        ready: list[tuple[int, np.ndarray]] = []
        for i, item in enumerate(items):
            name = str(item) if isinstance(item, (str, Path)) else f"array[{i}]"
            r: dict = {"path": name}
            if isinstance(item, (str, Path)):
                r["patient_id"] = patient_id_from_name(Path(item).name)
            try:
                u8, meta = self.prepare(item)
                if meta.get("patient_id"):
                    r["patient_id"] = meta["patient_id"]
                r["warnings"] = self.input_warnings(item, u8, meta)
                ready.append((i, u8))
            except ImageReadError as e:
                log.warning("cannot read %s: %s", name, e)
                r["error"] = str(e)
            results.append(r)
        for start in range(0, len(ready), batch_size):
            chunk = ready[start:start + batch_size]
            batch = np.stack([u for _, u in chunk])
            logits = self.logits(batch)
            for (i, _), w in zip(chunk, self.embedding_warnings(batch)):
                results[i]["warnings"] += w
            raw = pneumonia_score(logits)
            cal = pneumonia_score(logits, self.temperature, self.calibration_bias) if self.temperature else raw
            for (i, _), lg, p_raw, p_cal in zip(chunk, logits, raw, cal):
                r = results[i]
                r["probability"] = float(p_raw)
                r["calibrated_probability"] = float(p_cal) if self.temperature else None
                score = p_cal if self.temperature else p_raw
                r["label"] = "PNEUMONIA" if score >= self.threshold else "NORMAL"
                r["threshold"] = self.threshold
                if len(self.label_names) > 2:
                    probs = softmax(lg[None] / (self.temperature or 1.0))[0]
                    r["class_probabilities"] = {n: float(q) for n, q in zip(self.label_names, probs)}
                    r["predicted_class"] = self.label_names[int(probs.argmax())]
        return results


def load(checkpoint: str | Path | None = None, device: str = "auto", precision: str = "fp32") -> Predictor:
    """A predictor from a checkpoint file (``None`` = the bundled default model).

    Prediction runs in fp32 by default so probabilities are reproducible across machines.
    """
    path = Path(checkpoint) if checkpoint else default_checkpoint()
    if path.suffix.lower() == ".onnx":  # exported by pneumoscope export: preprocessing and threshold inside
        from pneumoscope.export import load_onnx_predictor

        return load_onnx_predictor(path)
    ckpt = load_checkpoint(path)
    dev = pick_device(device)
    model = model_from_checkpoint(ckpt).to(dev).to(memory_format=torch.channels_last)
    threshold = ckpt.get("threshold")
    if threshold is None:
        log.warning("%s stores no decision threshold; using 0.5", path)
        threshold = 0.5
    info = {
        "name": ckpt["arch"]["name"], "checkpoint": str(path), "version": ckpt.get("pneumoscope_version"),
        "checksum": "sha256:" + file_sha256(path), "epoch": ckpt.get("epoch"),
        "threshold": float(threshold), "threshold_info": ckpt.get("threshold_info"),
        "temperature": ckpt.get("temperature"), "calibration_bias": ckpt.get("calibration_bias", 0.0),
        "label_names": list(ckpt["label_names"]),
        "val_operating_points": ckpt.get("val_operating_points"), "val_metrics": ckpt.get("metrics"),
    }
    ood_reference = None
    if ckpt.get("ood_reference"):
        from pneumoscope.ood import EmbeddingReference

        ood_reference = EmbeddingReference.from_dict(ckpt["ood_reference"])
    return Predictor(model=model, preprocess=Preprocess.from_dict(ckpt["preprocess"]), ood_reference=ood_reference,
                     label_names=tuple(ckpt["label_names"]), threshold=float(threshold),
                     temperature=ckpt.get("temperature"), calibration_bias=float(ckpt.get("calibration_bias") or 0.0),
                     info=info, device=dev,
                     amp=pick_precision(precision, dev))
