"""What each epoch reports: validation scores, the study-style epoch line, history.csv/json, and the best
checkpoint's validation metrics at its stored threshold."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from pneumoscope.evaluation.metrics import binary_metrics
from pneumoscope.inference.runtime import pneumonia_score, predict_logits
from pneumoscope.inference.tta import with_views
from pneumoscope.models.checkpoint import model_from_checkpoint


def validation_scores(logits: np.ndarray, y: np.ndarray) -> dict:
    """val_loss (plain, unweighted cross-entropy), accuracy at 0.5 / argmax, AUC, sensitivity, specificity."""

    lt = torch.from_numpy(logits)
    yt = torch.from_numpy(y)
    if logits.shape[1] == 1:
        loss = F.binary_cross_entropy_with_logits(lt[:, 0], yt.float()).item()
        pred = (logits[:, 0] > 0).astype(int)
        acc = float((pred == y).mean())
        ybin = y
    else:
        loss = F.cross_entropy(lt, yt).item()
        acc = float((logits.argmax(1) == y).mean())
        pred = (logits.argmax(1) > 0).astype(int)
        ybin = (y > 0).astype(int)
    p = pneumonia_score(logits)
    auc = float(roc_auc_score(ybin, p)) if len(np.unique(ybin)) == 2 else float("nan")
    sens = float((pred[ybin == 1] == 1).mean()) if (ybin == 1).any() else float("nan")
    spec = float((pred[ybin == 0] == 0).mean()) if (ybin == 0).any() else float("nan")
    return {"val_loss": loss, "val_accuracy": acc, "val_auc": auc, "val_sensitivity": sens, "val_specificity": spec}


# ------------------------------------------------------------------------------------------- I/O helpers
def write_history(out: Path, history: list[dict]) -> None:
    (out / "history.json").write_text(json.dumps(history, indent=2))
    if history:
        with open(out / "history.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(history[0]))
            w.writeheader()
            w.writerows(history)


def epoch_line(h: dict, epochs: int) -> str:
    return (f"epoch {h['epoch']}/{epochs}  loss {h['loss']:.4f}  accuracy {h['accuracy']:.4f}  "
            f"val_loss {h['val_loss']:.4f}  val_accuracy {h['val_accuracy']:.4f}  val_auc {h['val_auc']:.4f}  "
            f"sens {h['val_sensitivity']:.3f}  spec {h['val_specificity']:.3f}  {h['seconds']:.1f}s "
            f"({h['images_per_s']:.0f} img/s)")


def best_val_logits(best: dict, va, device: torch.device, amp: torch.dtype | None) -> np.ndarray:
    """Validation logits of checkpoint ``best`` on images ``va`` (``training.data.Arrays``), run again from the file
    (for a resumed run whose best epoch came before the interruption)."""
    model = model_from_checkpoint(best).to(device).to(memory_format=torch.channels_last)
    return predict_logits(with_views(model, best.get("config", {}).get("tta", "")), va.x, model.preprocess, device, amp)


def val_at_threshold(logits: np.ndarray, y: np.ndarray, best: dict) -> dict:
    """Validation metrics of the best checkpoint (``best``: its calibration and threshold) at its stored threshold:
    what a user will get."""
    p = pneumonia_score(logits, best.get("temperature") or 1.0, best.get("calibration_bias", 0.0))
    return binary_metrics((y > 0).astype(int), p, best["threshold"])
