"""Experiments: the image-size study, and the CLI of the shift study. ``pneumoscope experiment ...``.

``image_size_experiment`` trains the same model at several input sizes through ``train()``: same data, same
patient-level validation split (it does not depend on the size), same seed and epochs; only ``image_size`` and
the run folder change. It writes ``image_size.md`` (table), ``image_size.json`` and ``image_size.png``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

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
    from pneumoscope.errors import ConfigError
    from pneumoscope.train import train

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
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

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
def _cli_image_size(args: argparse.Namespace) -> int:
    from pneumoscope.config import load_config

    base = load_config(args.config).to_dict() if args.config else {}
    flags = {"data": args.data, "model": args.model, "epochs": args.epochs, "limit": args.limit, "seed": args.seed,
             "batch_size": args.batch_size, "threads": args.threads, "cache_dir": args.cache_dir,
             "device": args.device}
    base.update({k: v for k, v in flags.items() if v is not None})
    base.setdefault("model", "seed_cnn")
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    rows = image_size_experiment(base, sizes, args.out)
    for r in rows:
        log.info("%4d px: val loss %.4f (best) %.4f (last), val AUC %.4f, %.1f s/epoch", r["image_size"],
                 r["val_loss_best"] or float("nan"), r["val_loss_last"] or float("nan"), r["val_auc"] or float("nan"),
                 r["seconds_per_epoch"] or float("nan"))
    log.info("table in %s", Path(args.out) / "image_size.md")
    return 0


def _cli_shift(args: argparse.Namespace) -> int:
    from pneumoscope.shift import shift_study

    shifts = [s for s in args.shifts.split(",") if s.strip()] if args.shifts else None
    shift_study(args.checkpoint, args.data, args.out, split=args.split, shifts=shifts, limit=args.limit,
                device=args.device)
    log.info("table in %s", Path(args.out) / "shift.md")
    return 0


def register(sub) -> argparse.ArgumentParser:
    """Add ``pneumoscope experiment image-size ...`` and ``pneumoscope experiment shift ...``."""
    p = sub.add_parser("experiment", help="image-size study, acquisition-shift study")
    ex = p.add_subparsers(dest="experiment_command", required=True, metavar="EXPERIMENT")

    s = ex.add_parser("image-size", help="train the same model at several input sizes and tabulate validation results")
    s.add_argument("--data", required=True, help="folder with NORMAL/ PNEUMONIA/ or train/ val/ test/")
    s.add_argument("--sizes", default="64,128,150,224,320", help="comma-separated sizes in px (default 64,128,150,224,320)")
    s.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the config's, 10)")
    s.add_argument("--model", default=None, help="model name (default seed_cnn)")
    s.add_argument("--out", default="runs/image-size", help="output folder (default runs/image-size)")
    s.add_argument("--limit", type=int, default=None, help="at most N training and N validation images")
    s.add_argument("--config", help="YAML training config for everything else")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--batch-size", dest="batch_size", type=int, default=None)
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--cache-dir", dest="cache_dir", default=None)
    s.add_argument("--device", default=None)
    s.set_defaults(func=_cli_image_size)

    s = ex.add_parser("shift", help="evaluate a checkpoint under controlled acquisition shifts (blur, noise, ...)")
    s.add_argument("--checkpoint", required=True, help="best.pt of a run")
    s.add_argument("--data", required=True, help="the training data folder (its validation split is re-made)")
    s.add_argument("--out", default="runs/shift", help="output folder (default runs/shift)")
    s.add_argument("--split", default=None, help="evaluate this split instead (e.g. test; 'all' for a folder without splits)")
    s.add_argument("--shifts", default=None, help="comma-separated subset of the shifts (default: all)")
    s.add_argument("--limit", type=int, default=0, help="at most N images (stratified; default all)")
    s.add_argument("--device", default="auto")
    s.set_defaults(func=_cli_shift)
    return p
