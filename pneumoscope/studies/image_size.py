"""Experiments: the image-size study, and the CLI of the shift study. ``pneumoscope experiment ...``.

``image_size_experiment`` trains the same model at several input sizes through ``train()``: same data, same
patient-level validation split (it does not depend on the size), same seed and epochs; only ``image_size`` and
the run folder change. It writes ``image_size.md`` (table), ``image_size.json`` and ``image_size.png``.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pneumoscope.errors import ConfigError
from pneumoscope.training.loop import train

log = logging.getLogger(__name__)


def _row(size: int, m: dict) -> dict:
    hist = m.get("history") or []
    last = hist[-1] if hist else {}
    at_thr = m.get("val_at_threshold") or {}
    secs = [h["seconds"] for h in hist]
    return {
        "image_size": int(size), "run_dir": m.get("run_dir"), "epochs_run": m.get("epochs_run"),
        "best_epoch": m.get("best_epoch"),
        "val_loss_best": m.get("val_loss"), "val_loss_last": last.get("val_loss"),
        "val_accuracy": m.get("val_accuracy"),  # best epoch, at logit 0 (p = 0.5)
        "val_accuracy_at_threshold": at_thr.get("accuracy"), "threshold": m.get("threshold"),
        "val_auc": m.get("val_auc"), "val_sensitivity": at_thr.get("sensitivity"),
        "val_specificity": at_thr.get("specificity"),
        "seconds_per_epoch": sum(secs) / len(secs) if secs else None, "wall_seconds": m.get("wall_seconds"),
        "n_train": m.get("n_train"), "n_val": m.get("n_val"),
    }


def image_size_experiment(base_cfg: dict, sizes, out_dir: str | Path) -> list[dict]:
    """Train ``base_cfg`` (a train() config dict) once per size in ``sizes``; one row of results per size.

    Each run goes to ``out_dir/size<S>``. Rows: image_size, epochs_run, best_epoch, val_loss_best (the epoch with the
    best validation AUC, whose checkpoint is kept), val_loss_last, val_accuracy (best epoch, p = 0.5),
    val_accuracy_at_threshold (stored threshold), val_auc, sensitivity/specificity at the threshold,
    seconds_per_epoch, wall_seconds.
    """

    sizes = [int(s) for s in sizes]
    if not sizes:
        raise ConfigError("image size experiment needs at least one size, e.g. --sizes 64,128,224")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for size in sizes:
        cfg = {**base_cfg, "image_size": size, "out": str(out / f"size{size}")}
        log.info("image size experiment: training %s at %d px", cfg.get("model", "seed_cnn"), size)
        rows.append(_row(size, train(cfg)))
        write_image_size_report(rows, out, base_cfg)  # after every run: partial results survive an interruption
    return rows


def write_image_size_report(rows: list[dict], out_dir: str | Path, base_cfg: dict | None = None) -> Path:
    """image_size.json, image_size.md and image_size.png (validation loss and AUC against the size)."""

    out = Path(out_dir)
    cfg = {k: v for k, v in (base_cfg or {}).items() if k not in ("out", "image_size")}
    (out / "image_size.json").write_text(json.dumps({"config": cfg, "rows": rows}, indent=2, default=str))

    def f(v, d: int = 4) -> str:
        return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{d}f}"

    lines = ["# Image size experiment\n",
             f"Model `{cfg.get('model', 'seed_cnn')}`, {cfg.get('epochs', '?')} epochs, seed {cfg.get('seed', 0)}, "
             f"limit {cfg.get('limit', 0) or 'none'}; the same patient-level validation split for every size. "
             "Best = the epoch with the best validation AUC (the kept checkpoint).\n",
             "| size (px) | best epoch | val loss (best) | val loss (last) | val accuracy (p=0.5) | "
             "val accuracy (threshold) | val AUC | s / epoch | wall s |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['image_size']} | {r['best_epoch']} | {f(r['val_loss_best'])} | {f(r['val_loss_last'])} | "
                     f"{f(r['val_accuracy'])} | {f(r['val_accuracy_at_threshold'])} | {f(r['val_auc'])} | "
                     f"{f(r['seconds_per_epoch'], 1)} | {f(r['wall_seconds'], 0)} |")
    (out / "image_size.md").write_text("\n".join(lines) + "\n")

    fig = Figure(figsize=(6, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    xs = [r["image_size"] for r in rows]
    nan = float("nan")

    def col(key: str) -> list[float]:
        return [nan if r[key] is None else r[key] for r in rows]

    ax.plot(xs, col("val_loss_best"), "o-", label="val loss (best epoch)")
    ax.plot(xs, col("val_loss_last"), "s--", label="val loss (last epoch)")
    ax.set_xlabel("image size (px)")
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(xs, col("val_auc"), "^:", color="tab:green", label="val AUC")
    ax2.set_ylabel("validation AUC")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="best")
    fig.savefig(out / "image_size.png", dpi=100)
    return out / "image_size.md"


# ------------------------------------------------------------------------------------------- CLI
