"""`pneumoscope reproduce`: train seed_cnn for 5, 7 and 10 epochs and print the study's table beside ours."""
from __future__ import annotations

import logging
from pathlib import Path

from pneumoscope.config import TrainConfig
from pneumoscope.training.loop import train

log = logging.getLogger(__name__)

# The published per-run figures (epochs -> loss, accuracy, val_loss, val_accuracy).
STUDY = {
    5: (0.2681, 0.9544, 1.6885, 0.8462),
    7: (0.2125, 0.9618, 0.6798, 0.9119),
    10: (0.2057, 0.9684, 0.8387, 0.9103),
}


def reproduce(cfg: TrainConfig, epochs: tuple[int, ...] = (5, 7, 10)) -> str:
    """One run per epoch count, same seed, no early stopping; returns the markdown table (also saved)."""

    out = Path(cfg.out or "runs/reproduce")
    rows = []
    for n in epochs:
        run = TrainConfig(**{**cfg.to_dict(), "epochs": n, "patience": n + 1, "out": str(out / f"seed_cnn-{n}ep")})
        m = train(run)
        last = m["history"][-1]
        rows.append((n, last, m))
    lines = [
        "| epochs | study loss | study acc | study val_loss | study val_acc | loss | accuracy | val_loss | val_accuracy "
        "| val AUC (last) | best val AUC | wall s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, last, m in rows:
        s = STUDY.get(n, (float("nan"),) * 4)
        lines.append(f"| {n} | {s[0]:.4f} | {s[1]:.4f} | {s[2]:.4f} | {s[3]:.4f} | {last['loss']:.4f} | {last['accuracy']:.4f} | "
                     f"{last['val_loss']:.4f} | {last['val_accuracy']:.4f} | {last['val_auc']:.4f} | "
                     f"{m['val_auc']:.4f} | {m['wall_seconds']:.0f} |")
    table = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "reproduce.md").write_text(table)
    log.info("table written to %s", out / "reproduce.md")
    return table
