"""Training: ``train(cfg) -> metrics``, the whole loop in one screen (nanoGPT-style).

Data are decoded once into a uint8 tensor at the model's input size (``setup.start_run``); batches are augmented
as tensors; the model runs channels_last under bf16 autocast where the hardware has it. Every epoch writes
``last.pt`` (resumable), ``best.pt`` when validation AUC improves (with its decision threshold and calibration
chosen on validation data), and the history. With ``ema`` the model that is validated and saved as ``best.pt`` is
the exponential moving average of the weights (``torch.optim.swa_utils.AveragedModel``, BatchNorm buffers included).
Under ``torchrun`` it trains with DistributedDataParallel.
"""
from __future__ import annotations

import json
import logging
import math
import time

import torch
import torch.distributed as tdist

from pneumoscope.config import TrainConfig, resolve
from pneumoscope.data.prefetch import Prefetch
from pneumoscope.evaluation.report import plot_history
from pneumoscope.inference.runtime import normalize, predict_logits
from pneumoscope.inference.tta import with_views
from pneumoscope.models.checkpoint import load_checkpoint
from pneumoscope.models.weights import (
    apply_trainable,
    param_groups,
    set_backbone_trainable,
)
from pneumoscope.progress import bar as progress_bar
from pneumoscope.training.augment import augment_batch
from pneumoscope.training.checkpoint import TrainState, make_ema, save_epoch, weights_digest
from pneumoscope.training.history import (
    best_val_logits,
    epoch_line,
    val_at_threshold,
    validation_scores,
    write_history,
)
from pneumoscope.training.losses import make_loss
from pneumoscope.training.setup import Run, start_run

log = logging.getLogger(__name__)


def train(cfg: TrainConfig | dict | str | None = None, *, resume: str | None = None, prefetch: Prefetch | None = None,
          **overrides) -> dict:
    """Train a model; return the final validation metrics. ``resume`` = a run folder to continue; ``prefetch`` =
    the split and decoded images being prepared in another process (data/prefetch.py; the caller closes it)."""
    if not isinstance(cfg, TrainConfig) or overrides:  # the CLI resolves once and passes the TrainConfig itself
        cfg = resolve(cfg, resume, **overrides)
    run = start_run(cfg.validate(), prefetch)
    cfg = run.cfg  # with what the run derived: its folder and the model's input size
    model, main = run.model, run.dist.main
    opt = torch.optim.AdamW(param_groups(model, cfg.lr, cfg.backbone_lr_mult, cfg.layer_decay), lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    steps = max(1, math.ceil(len(run.tr.y) / run.dist.world) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                                total_steps=cfg.epochs * steps, pct_start=0.15)
    scaler = torch.amp.GradScaler("cuda", enabled=run.amp == torch.float16)
    loss_fn = make_loss(cfg, run.tr.y, run.n_classes, run.device)
    net = model if run.dist.world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    ema = make_ema(model, cfg.ema)  # None when off
    state = TrainState.resume(run.out / "last.pt", model, opt, sched, ema) if resume else TrainState()
    scored = ema.module if ema is not None else model  # the weights validated and saved as best.pt
    y_val = run.va.y.numpy()

    for epoch in range(state.next_epoch, cfg.epochs + 1):
        if state.stopped(cfg.patience):
            break
        t0 = time.perf_counter()
        set_backbone_trainable(model, epoch > cfg.freeze_epochs)
        frozen = apply_trainable(model, cfg.trainable)  # trainable head / last:N: a fixed part of the backbone
        loss, accuracy, seen = train_epoch(run, net, opt, sched, scaler, loss_fn, epoch, steps, frozen, ema)
        train_seconds = time.perf_counter() - t0
        # with the model's test-time views (inference/tta.py), as it will predict
        val_logits = predict_logits(with_views(scored, cfg.tta), run.va.x, model.preprocess, run.device, run.amp)
        h = {"epoch": epoch, "loss": loss, "accuracy": accuracy, **validation_scores(val_logits, y_val),
             "lr": backbone_lr(sched.get_last_lr()), "frozen_backbone": epoch <= cfg.freeze_epochs,
             "seconds": time.perf_counter() - t0, "images_per_s": seen / train_seconds}
        improved = state.record(h)
        if improved:  # calibration and threshold of the new best epoch, chosen on validation data only
            state.choose_operating_point(val_logits, y_val, cfg.threshold)
        if main:
            log.info("%s%s", epoch_line(h, cfg.epochs), "  *" if improved else "")
            save_epoch(run.out, model, run.label_names, cfg.to_dict(), state, improved, opt, sched, ema)
            write_history(run.out, state.history)
        if state.stopped(cfg.patience):
            if main:
                log.info("early stopping: no better validation AUC for %d epochs", state.since_best)
            break
    return summarise(run, state)


def backbone_lr(lrs: list[float]) -> float:
    """The logged rate: the backbone's (with layer_decay its last stage's: lr * backbone_lr_mult, as without it);
    groups are [backbone stage(s)..., head] (models.weights.param_groups), or [head] alone."""
    return lrs[-2] if len(lrs) > 1 else lrs[0]


def train_epoch(run: Run, net, opt, sched, scaler, loss_fn, epoch: int, steps: int,
                frozen: list[torch.nn.Module], ema=None) -> tuple[float, float, int]:
    """One pass over (this rank's share of) the training images; returns mean loss, accuracy at 0.5, images seen.
    ``frozen`` stages stay in eval mode: their BatchNorm keeps its pretrained statistics. ``ema``: the weight
    average, updated after every optimizer step."""
    cfg, tr, device, pre = run.cfg, run.tr, run.device, run.model.preprocess
    # every random draw of this epoch comes from (seed, epoch): a resumed run repeats it exactly
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    torch.manual_seed(cfg.seed * 7919 + epoch)
    if cfg.imbalance == "sampler":  # balanced sampling: each class drawn equally often
        weights = (1.0 / torch.bincount(tr.y, minlength=run.n_classes).double())[tr.y]
        order = torch.multinomial(weights, len(tr.y), replacement=True, generator=g)
    else:
        order = torch.randperm(len(tr.y), generator=g)
    order = order[run.dist.rank::run.dist.world][: steps * cfg.batch_size]
    net.train()
    for m in frozen:
        m.eval()
    loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
    bar = progress_bar(range(steps), desc=f"epoch {epoch}/{cfg.epochs}", leave=False, unit="batch",
               disable=not (cfg.progress and run.dist.main))
    for step in bar:
        idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        xb = tr.x[idx].to(device, non_blocking=True).float().div_(255)
        xb = normalize(augment_batch(xb, g, cfg) if cfg.augment else xb, pre)
        yb = tr.y[idx].to(device, non_blocking=True)
        lam, partner = 1.0, None
        if cfg.mixup > 0:  # mixup (Zhang et al. 2018): the loss is linear in the target, so mixing losses mixes labels
            lam = float(torch.distributions.Beta(cfg.mixup, cfg.mixup).sample())
            partner = torch.randperm(len(idx), generator=g).to(device)
            xb = lam * xb + (1 - lam) * xb[partner]
        with torch.autocast(device.type, dtype=run.amp or torch.float32, enabled=run.amp is not None):
            logits = net(xb)
        loss = loss_fn(logits, yb) if partner is None else lam * loss_fn(logits, yb) + (1 - lam) * loss_fn(logits, yb[partner])
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        if ema is not None:
            ema.update_parameters(run.model)
        loss_sum += loss.detach() * len(idx)
        # (with mixup: against the label of each blend's first image, so a rough figure)
        correct += ((logits[:, 0] > 0).long() if run.n_classes == 2 else logits.argmax(1)).eq(yb).sum()
        seen += len(idx)
    if run.dist.world > 1:
        stats = torch.stack([loss_sum, correct, torch.tensor(float(seen), device=device)])
        tdist.all_reduce(stats)
        loss_sum, correct, seen = stats[0], stats[1], int(stats[2].item())
    return loss_sum.item() / seen, correct.item() / seen, seen


def summarise(run: Run, state: TrainState) -> dict:
    """The run's metrics (best epoch, its validation metrics at the stored threshold), curves.png, metrics.json."""
    cfg, main = run.cfg, run.dist.main
    if run.dist.world > 1:
        tdist.barrier()  # rank 0 has saved this run's last best.pt before any rank reads it
    best_path = run.out / "best.pt"
    best = load_checkpoint(best_path) if best_path.exists() else None
    metrics = {
        "run_dir": str(run.out), "model": cfg.model, "image_size": cfg.image_size, "labels": list(run.label_names),
        "epochs_run": len(state.history), "best_epoch": best["epoch"] if best else None,
        "val_auc": state.best_auc, "threshold": state.best_info.get("threshold"),
        "temperature": state.best_info.get("temperature"), "calibration_bias": state.best_info.get("calibration_bias", 0.0),
        "n_train": int(len(run.tr.y)), "n_val": int(len(run.va.y)), "validation": run.val_how,
        "wall_seconds": time.perf_counter() - run.t_start, "history": state.history,
    }
    if best is not None:
        metrics.update({k: best["metrics"][k] for k in ("val_loss", "val_accuracy", "val_sensitivity", "val_specificity")})
        if main:
            logits = state.best_logits  # None when the best epoch came before a resume: run best.pt again
            if logits is None:
                logits = best_val_logits(best, run.va, run.device, run.amp)
            metrics["val_at_threshold"] = val_at_threshold(logits, run.va.y.numpy(), best)
    if main:
        plot_history(state.history, run.out / "curves.png")
        (run.out / "metrics.json").write_text(json.dumps({k: v for k, v in metrics.items() if k != "history"}, indent=2))
    metrics["weights_digest"] = weights_digest(run.model)  # every rank: DDP replicas must agree (trained, not EMA)
    if run.dist.world > 1:
        tdist.barrier()
    return metrics
