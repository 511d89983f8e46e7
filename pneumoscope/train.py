"""Training: the whole loop in one file. ``train(cfg) -> metrics``.

Data are decoded once into a uint8 tensor at the model's input size; batches are augmented as tensors; the
model runs channels_last under bf16 autocast where the hardware has it. Every epoch writes ``last.pt``
(resumable), ``best.pt`` when validation AUC improves (with its decision threshold and temperature chosen on
validation data), and the history. Under ``torchrun`` it trains with DistributedDataParallel.
"""
from __future__ import annotations

import csv
import ctypes
import ctypes.util
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from pneumoscope.augment import augment_batch
from pneumoscope.checkpoint import load_checkpoint, save_checkpoint
from pneumoscope.config import TrainConfig, resolve
from pneumoscope.data.cache import Decoded
from pneumoscope.data.folders import Sample
from pneumoscope.data.prepare import Prefetch, decode_samples, split_samples
from pneumoscope.errors import ConfigError, DatasetLayoutError

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ hardware
def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"config value device={name!r} is invalid: no CUDA device is visible; use --device cpu or auto")
    return torch.device(name)


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX): there bf16 autocast is fast."""
    f = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    g = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((f and f()) or (g and g()))


def pick_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = plain fp32), logging why when 'auto' falls back."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if precision == "fp16" or (precision == "auto" and not torch.cuda.is_bf16_supported()):
            return torch.float16
        return torch.bfloat16
    if precision == "fp16":
        raise ConfigError("config value precision='fp16' is invalid on CPU: use bf16 or fp32")
    if precision == "auto" and not cpu_has_bf16():
        log.info("precision: fp32 (this CPU has no AVX512-BF16/AMX; bf16 autocast would be emulated and slower)")
        return None
    return torch.bfloat16


def reuse_freed_memory(on: bool = True) -> bool:
    """Let glibc's malloc keep freed memory for reuse (True when set; False off glibc).

    By default glibc serves blocks over 32 MB with a fresh mmap and unmaps them on free, so every training step
    page-faults its largest activations anew (seed_cnn at 150 px, batch 32: the first feature map and its gradient
    are 45 MB each); that costs about a fifth of a CPU training step here (docs/speed.md). ``on=False`` restores
    glibc's defaults. The price: the process keeps its peak heap instead of returning it to the system (the first
    few steps may still grow it: an aligned re-allocation does not always fit the block just freed).
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        log.debug("allocator: no glibc mallopt here; keeping the system allocator's behaviour")
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    ok = mallopt(m_mmap_max, 0 if on else 65536) == 1
    ok &= mallopt(m_trim_threshold, 2**30 if on else 128 * 1024) == 1
    return bool(ok)


# ------------------------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): gloo on CPU, NCCL on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_name != "cpu"
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size())


# ------------------------------------------------------------------------------------------- data
@dataclass
class Arrays:
    x: torch.Tensor  # (N, 1, S, S) uint8
    y: torch.Tensor  # (N,) int64
    samples: list[Sample]


def decode(samples: list[Sample], size: int, cfg: TrainConfig, show: bool) -> Arrays:
    return to_arrays(decode_samples(samples, size, cfg, show), samples, cfg)


def to_arrays(d: Decoded, samples: list[Sample], cfg: TrainConfig) -> Arrays:
    """Decoded images of ``samples`` as tensors, unreadable files left out (decode_all has listed them)."""
    keep = np.flatnonzero(d.ok)
    if len(keep) == 0:
        raise DatasetLayoutError(f"{cfg.data}: none of the {len(samples)} images could be decoded")
    images = d.images if len(keep) == len(samples) else d.images[keep]  # no 100 MB copy when every file decoded
    x = torch.from_numpy(images).unsqueeze(1)
    y = torch.tensor([samples[i].label for i in keep], dtype=torch.int64)
    return Arrays(x=x, y=y, samples=[samples[i] for i in keep])


def import_ahead(device: torch.device, amp: torch.dtype | None) -> None:
    """Do now the ~1 s of single-threaded loading that the first step and the first validation would do
    (numba's pooling kernels, scikit-learn's metrics)."""
    import sklearn.metrics  # noqa: F401

    if device.type == "cpu":
        from pneumoscope.pooling import warm_up

        warm_up(amp or torch.float32)


def to_input(xb: torch.Tensor, pre, device: torch.device) -> torch.Tensor:
    """uint8 (B,1,S,S) -> normalised float on ``device``, channels_last. The one preprocessing of the project."""
    x = xb.to(device, non_blocking=True).float().div_(255)
    return normalize(x, pre)


def normalize(x: torch.Tensor, pre) -> torch.Tensor:
    mean = torch.tensor(pre.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(pre.std, device=x.device).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------------- loss & scores
def make_loss(cfg: TrainConfig, y_train: torch.Tensor, n_classes: int, device: torch.device):
    counts = torch.bincount(y_train, minlength=n_classes).float()
    if (counts == 0).any():
        raise DatasetLayoutError(f"training split lacks a class (counts per class: {counts.tolist()})")
    ls = cfg.label_smoothing
    if n_classes == 2:
        pos_weight = (counts[0] / counts[1]).to(device) if cfg.imbalance == "weighted" else None

        def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            t = y.float() * (1 - ls) + 0.5 * ls
            return F.binary_cross_entropy_with_logits(logits[:, 0].float(), t, pos_weight=pos_weight)
    else:
        weight = (counts.sum() / (n_classes * counts)).to(device) if cfg.imbalance == "weighted" else None

        def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits.float(), y, weight=weight, label_smoothing=ls)
    return loss_fn


def pneumonia_score(logits: np.ndarray, temperature: float = 1.0, bias: float = 0.0) -> np.ndarray:
    """Probability of pneumonia: sigmoid(logit / T + bias) (binary) or 1 - softmax(logits / T)[NORMAL] (ternary)."""
    logits = np.asarray(logits, dtype=np.float64) / (temperature or 1.0)
    if logits.shape[1] == 1:
        return 1.0 / (1.0 + np.exp(-(logits[:, 0] + (bias or 0.0))))
    e = np.exp(logits - logits.max(1, keepdims=True))
    return 1.0 - e[:, 0] / e.sum(1)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@torch.no_grad()
def predict_logits(model: torch.nn.Module, x: torch.Tensor, pre, device: torch.device, amp: torch.dtype | None,
                   batch_size: int = 16) -> np.ndarray:
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out.append(model(to_input(x[i:i + batch_size], pre, device)).float().cpu())
    return torch.cat(out).numpy()


def validation_scores(logits: np.ndarray, y: np.ndarray) -> dict:
    """val_loss (plain, unweighted cross-entropy), accuracy at 0.5 / argmax, AUC, sensitivity, specificity."""
    from sklearn.metrics import roc_auc_score

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


def calibrate(logits: np.ndarray, y: np.ndarray, threshold_method: str) -> dict:
    """Threshold (on validation data, on the calibrated pneumonia probability), temperature and (binary) bias."""
    from pneumoscope.metrics import choose_threshold, fit_calibration, fit_temperature, operating_points

    ybin = (y > 0).astype(int)
    if logits.shape[1] > 1:
        temperature, bias = float(fit_temperature(logits, y, multiclass=True)), 0.0
    else:
        temperature, bias = fit_calibration(logits[:, 0], ybin)
    p = pneumonia_score(logits, temperature, bias)
    threshold, info = choose_threshold(ybin, p, threshold_method)
    return {"threshold": float(threshold), "threshold_info": info, "temperature": temperature,
            "calibration_bias": bias, "val_operating_points": operating_points(ybin, p)}


# ------------------------------------------------------------------------------------------- I/O helpers
def _write_history(out: Path, history: list[dict]) -> None:
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


# ------------------------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig | dict | str | None = None, *, resume: str | None = None, prefetch: Prefetch | None = None,
          **overrides) -> dict:
    """Train a model; return the final validation metrics. ``resume`` = a run folder to continue; ``prefetch`` =
    the split and decoded images being prepared in another process (data/prepare.py; the caller closes it)."""
    from pneumoscope.models import create_model, param_groups, set_backbone_trainable

    cfg = resolve(cfg, resume, **overrides)
    if prefetch is not None and not prefetch.matches(cfg):
        log.warning("ignoring the prefetched data: they were prepared for another data/split configuration")
        prefetch.close()
        prefetch = None
    dist = init_distributed(cfg.device)
    if dist.world > 1 and cfg.freeze_epochs:
        raise ConfigError("config value freeze_epochs must be 0 under torchrun: DDP cannot change which parameters train mid-run")
    device = pick_device(cfg.device)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // dist.world))
    if device.type == "cpu":
        reuse_freed_memory()
    amp = pick_precision(cfg.precision, device)
    out = Path(cfg.out or cfg.default_out())
    cfg.out = str(out)
    t_start = time.perf_counter()

    # model first (its preprocessing config decides the input size)
    torch.manual_seed(cfg.seed)
    train_s, val_s, label_names, val_how = prefetch.split() if prefetch else split_samples(cfg)
    n_classes = len(label_names)
    model = create_model(cfg.model, num_classes=1 if n_classes == 2 else n_classes, image_size=cfg.image_size,
                         pretrained=cfg.pretrained, weights=cfg.weights or None, **cfg.model_kwargs)
    pre = model.preprocess
    cfg.image_size = pre.input_size
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        log.info("model %s at %d px, %s on %s%s; validation: %s", cfg.model, pre.input_size,
                 "bf16" if amp == torch.bfloat16 else "fp16" if amp == torch.float16 else "fp32", device,
                 f" x{dist.world} processes" if dist.world > 1 else "", val_how)

    model = model.to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(param_groups(model, cfg.lr, cfg.backbone_lr_mult), lr=cfg.lr, weight_decay=cfg.weight_decay)
    prefetched = prefetch is not None and prefetch.size == pre.input_size
    if prefetched:
        import_ahead(device, amp)  # while the other process still decodes: these imports then cost no wall time
        dtr, dva = prefetch.decoded()
        tr, va = to_arrays(dtr, train_s, cfg), to_arrays(dva, val_s, cfg)
    else:
        if prefetch is not None:  # decoded at another size than the model's: stop it, decode here
            prefetch.close()
        tr = decode(train_s, pre.input_size, cfg, dist.main)
        va = decode(val_s, pre.input_size, cfg, dist.main)
    if dist.main:
        log.info("train: %d images (%s), val: %d images (%s)%s", len(tr.y),
                 ", ".join(f"{n} {c}" for c, n in zip(label_names, torch.bincount(tr.y, minlength=n_classes).tolist())),
                 len(va.y), ", ".join(f"{n} {c}" for c, n in zip(label_names, torch.bincount(va.y, minlength=n_classes).tolist())),
                 "; decoded by a second process during start-up" if prefetched else "")

    per_rank = math.ceil(len(tr.y) / dist.world)
    steps_per_epoch = max(1, per_rank // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                                total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    loss_fn = make_loss(cfg, tr.y, n_classes, device)
    net = model
    if dist.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    history: list[dict] = []
    best_auc, since_best, start_epoch, best_info = -1.0, 0, 1, {}
    best_logits = None  # validation logits of best.pt when this process made it (else recomputed at the end)
    last_path, best_path = out / "last.pt", out / "best.pt"
    if resume and last_path.exists():
        ck = load_checkpoint(last_path)
        model.load_state_dict(ck["state_dict"])
        st = ck["train_state"]
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        history, best_auc, since_best, best_info = st["history"], st["best_auc"], st["since_best"], st["best_info"]
        start_epoch = ck["epoch"] + 1
        if dist.main:
            log.info("resuming %s after epoch %d (best val AUC so far %.4f)", out, ck["epoch"], best_auc)

    def payload(epoch: int, metrics: dict, **extra) -> dict:
        return {"arch": model.arch, "preprocess": pre.to_dict(), "label_names": list(label_names),
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "epoch": epoch, "metrics": metrics, "config": cfg.to_dict(), **extra}

    weights = None
    if cfg.imbalance == "sampler":
        counts = torch.bincount(tr.y, minlength=n_classes).double()
        weights = (1.0 / counts)[tr.y]
    stopped_early = start_epoch > cfg.epochs or (since_best >= cfg.patience and history)
    for epoch in range(start_epoch, cfg.epochs + 1):
        if stopped_early:
            break
        t0 = time.perf_counter()
        # every random draw of this epoch comes from (seed, epoch): a resumed run repeats it exactly
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        torch.manual_seed(cfg.seed * 7919 + epoch)
        frozen = epoch <= cfg.freeze_epochs
        set_backbone_trainable(model, not frozen)
        order = (torch.multinomial(weights, len(tr.y), replacement=True, generator=g) if weights is not None
                 else torch.randperm(len(tr.y), generator=g))
        order = order[dist.rank::dist.world][: steps_per_epoch * cfg.batch_size]
        net.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        seen = 0
        from tqdm.auto import tqdm

        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{cfg.epochs}", leave=False, unit="batch",
                   disable=not (cfg.progress and dist.main))
        for step in bar:
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            xb = tr.x[idx].to(device, non_blocking=True).float().div_(255)
            if cfg.augment:
                xb = augment_batch(xb, g, cfg)
            xb = normalize(xb, pre)
            yb = tr.y[idx].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = net(xb)
            loss = loss_fn(logits, yb)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            loss_sum += loss.detach() * len(idx)
            pred = (logits[:, 0] > 0).long() if n_classes == 2 else logits.argmax(1)
            correct += (pred == yb).sum()
            seen += len(idx)
        if dist.world > 1:
            import torch.distributed as tdist

            stats = torch.stack([loss_sum, correct, torch.tensor(float(seen), device=device)])
            tdist.all_reduce(stats)
            loss_sum, correct, seen = stats[0], stats[1], int(stats[2].item())
        train_s_elapsed = time.perf_counter() - t0
        val_logits = predict_logits(model, va.x, pre, device, amp)
        scores = validation_scores(val_logits, va.y.numpy())
        h = {"epoch": epoch, "loss": loss_sum.item() / seen, "accuracy": correct.item() / seen, **scores,
             "lr": sched.get_last_lr()[0], "frozen_backbone": frozen,
             "seconds": time.perf_counter() - t0, "images_per_s": seen / train_s_elapsed}
        history.append(h)
        improved = scores["val_auc"] > best_auc
        if improved:
            best_auc, since_best = scores["val_auc"], 0
            best_info = calibrate(val_logits, va.y.numpy(), cfg.threshold)
            best_logits = val_logits
        else:
            since_best += 1
        if dist.main:
            log.info("%s%s", epoch_line(h, cfg.epochs), "  *" if improved else "")
            if improved:
                save_checkpoint(payload(epoch, h, **best_info), best_path)
            state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "history": history,
                     "best_auc": best_auc, "since_best": since_best, "best_info": best_info}
            save_checkpoint(payload(epoch, h, train_state=state), last_path)
            _write_history(out, history)
        if since_best >= cfg.patience:
            log.info("early stopping: no better validation AUC for %d epochs", since_best) if dist.main else None
            break

    if dist.world > 1:
        import torch.distributed as tdist

        tdist.barrier()  # rank 0 has saved this run's last best.pt before any rank reads it
    best = load_checkpoint(best_path) if best_path.exists() else None
    metrics = {
        "run_dir": str(out), "model": cfg.model, "image_size": pre.input_size, "labels": list(label_names),
        "epochs_run": len(history), "best_epoch": best["epoch"] if best else None,
        "val_auc": best_auc, "threshold": best_info.get("threshold"), "temperature": best_info.get("temperature"),
        "calibration_bias": best_info.get("calibration_bias", 0.0),
        "n_train": int(len(tr.y)), "n_val": int(len(va.y)), "validation": val_how,
        "wall_seconds": time.perf_counter() - t_start, "history": history,
    }
    if best is not None:
        metrics.update({k: best["metrics"][k] for k in ("val_loss", "val_accuracy", "val_sensitivity", "val_specificity")})
        if dist.main:
            metrics["val_at_threshold"] = _val_at_threshold(best, va, device, amp, best_logits)
    if dist.main:
        from pneumoscope.report import plot_history

        plot_history(history, out / "curves.png")
        (out / "metrics.json").write_text(json.dumps({k: v for k, v in metrics.items() if k != "history"}, indent=2))
    metrics["weights_digest"] = weights_digest(model)  # every rank: DDP replicas must agree
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.barrier()
    return metrics


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the model's parameters and buffers (names, shapes and bytes)."""
    import hashlib

    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _val_at_threshold(best: dict, va: Arrays, device: torch.device, amp, logits: np.ndarray | None = None) -> dict:
    """Validation metrics of the best checkpoint at its stored threshold (what a user will get).

    ``logits``: that checkpoint's validation logits when still in memory; otherwise (a resumed run whose best
    epoch came before the interruption) the checkpoint is reloaded and run again.
    """
    from pneumoscope.metrics import binary_metrics

    if logits is None:
        from pneumoscope.checkpoint import model_from_checkpoint
        from pneumoscope.models import Preprocess

        model = model_from_checkpoint(best).to(device).to(memory_format=torch.channels_last)
        logits = predict_logits(model, va.x, Preprocess.from_dict(best["preprocess"]), device, amp)
    p = pneumonia_score(logits, best.get("temperature") or 1.0, best.get("calibration_bias", 0.0))
    return binary_metrics((va.y.numpy() > 0).astype(int), p, best["threshold"])
