"""`pneumoscope compare`: several models on the same patient-level split and seed, one markdown table.

Optional rows: test-time augmentation (TTA) of each model and the ensemble (mean pneumonia probability) of all
models. Every figure is on the validation split; TTA/ensemble thresholds are chosen on that same split (said in
the table), so their accuracy/sensitivity/specificity are slightly optimistic, their AUC is threshold-free.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pneumoscope.config import TrainConfig
from pneumoscope.data.splits import split_samples
from pneumoscope.evaluation.metrics import binary_metrics, choose_threshold
from pneumoscope.inference.runtime import (
    normalize,
    pick_device,
    pneumonia_score,
    predict_logits,
)
from pneumoscope.inference.tta import with_views
from pneumoscope.models.checkpoint import load_checkpoint, model_from_checkpoint
from pneumoscope.training.data import decode
from pneumoscope.training.loop import train

log = logging.getLogger(__name__)

# (zoom, dx, dy) in fractions of the side: small, chest-preserving views; no flips (heart side matters)
TTA_VIEWS = ((1.0, 0.0, 0.0), (1.06, 0.0, 0.0), (0.94, 0.0, 0.0), (1.0, 0.04, 0.0), (1.0, -0.04, 0.0), (1.0, 0.0, 0.04))


def tta_logits(model: torch.nn.Module, x_u8: torch.Tensor, pre, device: torch.device, batch_size: int = 64) -> np.ndarray:
    """Logits averaged over ``TTA_VIEWS`` (affine views of each image)."""

    model.eval()
    outs = []
    with torch.no_grad():
        for zoom, dx, dy in TTA_VIEWS:
            chunk = []
            for i in range(0, len(x_u8), batch_size):
                x = x_u8[i:i + batch_size].to(device).float().div_(255)
                theta = torch.tensor([[1 / zoom, 0, 2 * dx], [0, 1 / zoom, 2 * dy]], dtype=x.dtype).expand(len(x), 2, 3)
                grid = F.affine_grid(theta.to(device), list(x.shape), align_corners=False)
                x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
                chunk.append(model(normalize(x, pre)).float().cpu())
            outs.append(torch.cat(chunk).numpy())
    return np.mean(outs, axis=0)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _row(name: str, y: np.ndarray, p: np.ndarray, threshold: float, **extra) -> dict:
    m = binary_metrics(y, p, threshold)
    return {"model": name, "val_auc": m["auc"], "accuracy": m["accuracy"], "sensitivity": m["sensitivity"],
            "specificity": m["specificity"], "threshold": threshold, **extra}


def compare(base: TrainConfig, models: list[str], out: str | Path, tta: bool = False, ensemble: bool = False,
            per_model: dict[str, dict] | None = None) -> list[dict]:
    """Train each model (``per_model`` overrides, e.g. pretrained) and tabulate validation figures."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(base.device)
    _, val_s, _, _ = split_samples(base)
    rows, val_probs = [], {}
    y = None
    for spec in models:
        name, _, tag = spec.partition(":")  # "efficientnet_lite0:scratch" -> same model, another setting
        over = dict((per_model or {}).get(spec, {}))
        if tag == "scratch":
            over["pretrained"] = False
        elif tag == "pretrained":
            over["pretrained"] = True
        cfg = TrainConfig(**{**base.to_dict(), "model": name, "image_size": over.pop("image_size", base.image_size),
                             "out": str(out / spec.replace(":", "-")), **over})
        m = train(cfg)
        ck = load_checkpoint(Path(m["run_dir"]) / "best.pt")
        model = model_from_checkpoint(ck).to(device).to(memory_format=torch.channels_last)
        pre = model.preprocess  # the checkpoint's (model_from_checkpoint)
        va = decode(val_s, pre.input_size, cfg, show=False)
        va.x = torch.from_numpy(pre.standardise(va.x.numpy()))  # as training and the predictor do
        y = (va.y.numpy() > 0).astype(int)
        ips = float(np.median([h["images_per_s"] for h in m["history"]]))
        common = {"params": count_params(model), "train_images_per_s": ips, "wall_s": m["wall_seconds"],
                  "epochs_run": m["epochs_run"], "pretrained": bool(cfg.pretrained),
                  "image_size": pre.input_size}
        T, bias = ck.get("temperature") or 1.0, ck.get("calibration_bias", 0.0)

        views = (ck.get("config") or {}).get("tta", "")  # T, bias and threshold were fitted with these views
        p = pneumonia_score(predict_logits(with_views(model, views), va.x, pre, device, None), T, bias)
        rows.append(_row(spec, y, p, ck["threshold"], **common))
        val_probs[spec] = p
        if tta:
            p_tta = pneumonia_score(tta_logits(model, va.x, pre, device), T, bias)
            t, _ = choose_threshold(y, p_tta, base.threshold)
            rows.append(_row(f"{spec} + TTA", y, p_tta, t, **common, note="threshold re-chosen on val"))
            val_probs[f"{spec} + TTA"] = p_tta
    if ensemble and len(models) > 1 and y is not None:
        p_ens = np.mean([val_probs[s] for s in models], axis=0)
        t, _ = choose_threshold(y, p_ens, base.threshold)
        rows.append(_row("ensemble(" + "+".join(models) + ")", y, p_ens, t,
                         params=sum(r["params"] for r in rows if r["model"] in models),
                         train_images_per_s=float("nan"), wall_s=sum(r["wall_s"] for r in rows if r["model"] in models),
                         epochs_run=0, pretrained=False, image_size=None, note="threshold chosen on val"))
    (out / "compare.json").write_text(json.dumps(rows, indent=2))
    (out / "compare.md").write_text(format_table(rows, base))
    return rows


def format_table(rows: list[dict], base: TrainConfig) -> str:
    lines = [f"Validation split: patient-level, val_fraction={base.val_fraction}, seed={base.seed}; "
             f"up to {base.epochs} epochs, early stopping patience {base.patience}.",
             "",
             "| model | px | val AUC | accuracy | sensitivity | specificity | threshold | params | train img/s | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        px = r.get("image_size") or "-"
        lines.append(f"| {r['model']} | {px} | {r['val_auc']:.4f} | {r['accuracy']:.4f} | {r['sensitivity']:.4f} | "
                     f"{r['specificity']:.4f} | {r['threshold']:.3f} | {r['params'] / 1e6:.2f} M | "
                     f"{r['train_images_per_s']:.0f} | {r['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"
