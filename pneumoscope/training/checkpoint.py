"""What a training run keeps between epochs: ``TrainState`` (history, best AUC, early-stopping counter, the best
epoch's calibration), the checkpoint payload (a checkpoint holds what rebuilds its model), resume, weights digest.

``best.pt``: the epoch with the best validation AUC, with its threshold and calibration chosen on validation data.
``last.pt``: every epoch, plus ``train_state`` (optimizer, scheduler, TrainState, the weight average) so ``--resume``
continues exactly. With a weight EMA, ``best.pt`` holds the average and ``last.pt`` the trained weights.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pneumoscope.errors import ConfigError
from pneumoscope.evaluation.calibration import fit_calibration_and_threshold
from pneumoscope.models.checkpoint import load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    history: list[dict] = field(default_factory=list)
    best_auc: float = -1.0
    since_best: int = 0  # epochs since the best validation AUC
    best_info: dict = field(default_factory=dict)  # threshold, temperature, bias of the best epoch
    next_epoch: int = 1
    best_logits: np.ndarray | None = None  # validation logits of best.pt when this process made it

    def stopped(self, patience: int) -> bool:
        return bool(self.history) and self.since_best >= patience

    def record(self, h: dict) -> bool:
        """Add epoch ``h``; True when its validation AUC is the best so far."""
        self.history.append(h)
        self.next_epoch = h["epoch"] + 1
        if h["val_auc"] > self.best_auc:
            self.best_auc, self.since_best = h["val_auc"], 0
            return True
        self.since_best += 1
        return False

    def choose_operating_point(self, val_logits: np.ndarray, y: np.ndarray, threshold_method: str) -> None:
        """The best epoch's calibration (temperature, bias) and decision threshold, fitted on its validation logits."""
        self.best_info = fit_calibration_and_threshold(val_logits, y, threshold_method)
        self.best_logits = val_logits

    def to_dict(self, opt, sched, ema: AveragedModel | None = None) -> dict:
        return {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "history": self.history,
                "best_auc": self.best_auc, "since_best": self.since_best, "best_info": self.best_info,
                "ema": None if ema is None else {k: v.detach().cpu() for k, v in ema.state_dict().items()}}

    @classmethod
    def resume(cls, last_path: Path, model: torch.nn.Module, opt, sched,
               ema: AveragedModel | None = None) -> "TrainState":
        """Weights, optimizer, scheduler (and weight average) from ``last.pt``, and the state to continue from
        (fresh if none)."""
        if not last_path.exists():
            return cls()
        ck = load_checkpoint(last_path)
        model.load_state_dict(ck["state_dict"])
        st = ck["train_state"]
        stored = ck.get("config", {})
        if len(st["optimizer"]["param_groups"]) != len(opt.param_groups):
            raise ConfigError(f"cannot resume {last_path.parent}: its optimizer has {len(st['optimizer']['param_groups'])} "
                              f"learning-rate groups, this config {len(opt.param_groups)} (layer_decay "
                              f"{stored.get('layer_decay', 1.0)!r} then); resume without overriding layer_decay or "
                              "start a new run")
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        if (ema is None) != (st.get("ema") is None):
            raise ConfigError(f"cannot resume {last_path.parent} with ema {'off' if ema is None else 'on'}: it was "
                              f"trained with ema {stored.get('ema', 0.0)!r}; resume with the run's own config (no ema "
                              "override) or start a new run")
        if ema is not None:
            ema.load_state_dict(st["ema"])
        log.info("resuming %s after epoch %d (best val AUC so far %.4f)", last_path.parent, ck["epoch"], st["best_auc"])
        return cls(history=st["history"], best_auc=st["best_auc"], since_best=st["since_best"],
                   best_info=st["best_info"], next_epoch=ck["epoch"] + 1)


def payload(model: torch.nn.Module, label_names, cfg_dict: dict, epoch: int, metrics: dict, **extra) -> dict:
    """A checkpoint dict: architecture, preprocessing, labels, weights, epoch, metrics, config, and ``extra``."""
    return {"arch": model.arch, "preprocess": model.preprocess.to_dict(), "label_names": list(label_names),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "epoch": epoch, "metrics": metrics, "config": cfg_dict, **extra}


def make_ema(model: torch.nn.Module, decay: float) -> AveragedModel | None:
    """The exponential moving average of ``model``'s parameters and BatchNorm buffers (``decay`` per step), or None
    for ``decay`` 0. Its ``.module`` is a full model (architecture, preprocessing) that predicts and saves as one."""
    if decay <= 0:
        return None
    # (BatchNorm's integer num_batches_tracked is not averaged; it matters only for momentum=None, unused here)
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def save_epoch(out: Path, model, label_names, cfg_dict: dict, state: TrainState, improved: bool, opt, sched,
               ema: AveragedModel | None = None) -> None:
    """``best.pt`` when this epoch improved (the weight average when there is one), ``last.pt`` always (the trained
    weights, with the state to resume from)."""
    h = state.history[-1]
    if improved:
        best = ema.module if ema is not None else model
        save_checkpoint(payload(best, label_names, cfg_dict, h["epoch"], h, **state.best_info), out / "best.pt")
    save_checkpoint(payload(model, label_names, cfg_dict, h["epoch"], h, train_state=state.to_dict(opt, sched, ema)),
                    out / "last.pt")


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the model's parameters and buffers (names, shapes and bytes)."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
