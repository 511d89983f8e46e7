"""``pneumoscope train|reproduce|compare|build-default-model|ensemble|bench`` and ``experiment image-size``: commands that train.

Every training flag mirrors a ``TrainConfig`` field (YAML key); its help text comes from here, its default from
``TrainConfig`` itself, so the two cannot drift.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from pneumoscope.config import TrainConfig

log = logging.getLogger("pneumoscope")

TRAIN_FLAGS = {  # key -> help; every key is a TrainConfig field / YAML key (tested)
    "data": "folder with NORMAL/ PNEUMONIA/ or train/ val/ test/",
    "model": "model name (see docs/models.md)",
    "image_size": "square input side in px (default: the model's)",
    "labels": "binary or ternary (NORMAL/BACTERIAL/VIRAL)",
    "epochs": "maximum epochs",
    "batch_size": "images per step",
    "lr": "peak learning rate of the one-cycle schedule",
    "val_fraction": "patient-level validation fraction",
    "fold": "i/k: validate on patient fold i of k of train/, train on the others (cross-validated ensembles)",
    "seed": "random seed of split, initialisation and augmentation",
    "out": "run folder (default runs/<model>-<labels>-<size>px-seed<seed>)",
    "imbalance": "weighted | sampler | none",
    "label_smoothing": "label smoothing of the loss",
    "mixup": "mixup alpha: blend image pairs and their labels, weight ~ Beta(alpha, alpha) (0: off)",
    "threshold": "youden | sensitivity:0.95 | specificity:0.9",
    "patience": "early stopping patience in epochs",
    "precision": "auto | bf16 | fp16 | fp32",
    "device": "auto | cpu | cuda",
    "threads": "torch threads (0: all cores)",
    "limit": "at most N training and N validation images (quick runs; 0: all)",
    "cache_dir": "cache decoded images here (empty: off)",
    "weights": "local weights file for the backbone",
    "freeze_epochs": "epochs with a frozen backbone first",
    "backbone_lr_mult": "backbone learning rate = lr x this",
    "layer_decay": "layer-wise lr decay: each earlier backbone stage at this x the next one's lr (1: off)",
    "ema": "weight EMA decay per step, e.g. 0.995; the averaged weights are validated and saved (0: off)",
}
SWITCHES = {  # key -> (flag, action, help)
    "pretrained": ("--pretrained", "store_true", "ImageNet weights (efficientnet_lite0, offline)"),
    "augment": ("--no-augment", "store_false", "turn augmentation off"),
    "hflip": ("--hflip", "store_true", "add random horizontal flips (off by default)"),
}


def add_train_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("--config", help="YAML file whose keys mirror these flags (flags override it)")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for key, hlp in TRAIN_FLAGS.items():
        default = fields[key].default
        typ = {"int": int, "float": float}.get(str(fields[key].type).split(" ")[0], str)
        shown = "" if default in ("", None) or "default" in hlp else f" (default {default})"
        s.add_argument("--" + key.replace("_", "-"), dest=key, type=typ, default=None, help=hlp + shown)
    for key, (flag, action, hlp) in SWITCHES.items():
        s.add_argument(flag, dest=key, action=action, default=None, help=hlp)


def overrides(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in [*TRAIN_FLAGS, *SWITCHES] if getattr(args, k, None) is not None}


def _train(args: argparse.Namespace) -> int:
    from pneumoscope.config import resolve
    from pneumoscope.data.prefetch import Prefetch
    from pneumoscope.models.names import DEFAULT_INPUT_SIZE

    # split + decode start in a forked process now, while this one imports torch and builds the model
    ov = overrides(args)
    cfg = resolve(args.config, args.resume, validate=False, **ov)
    prefetch = Prefetch.start(cfg, cfg.image_size or DEFAULT_INPUT_SIZE.get(cfg.model))
    try:
        from pneumoscope.training.loop import train

        m = train(cfg, resume=args.resume, prefetch=prefetch)  # resolved once, above
    finally:
        if prefetch is not None:
            prefetch.close()
    log.info("best val AUC %.4f at epoch %s; threshold %.3f; run folder %s", m["val_auc"], m["best_epoch"],
             m["threshold"] or float("nan"), m["run_dir"])
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from pneumoscope.config import resolve
    from pneumoscope.studies.reproduce import reproduce

    ov = overrides(args)
    ov.setdefault("model", "seed_cnn")
    ov.setdefault("out", "runs/reproduce")
    sys.stdout.write(reproduce(resolve(args.config, **ov), tuple(int(e) for e in args.epoch_list.split(","))))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from pneumoscope.config import resolve
    from pneumoscope.studies.compare import compare, format_table

    ov = overrides(args)
    ov.setdefault("out", "runs/compare")
    base = resolve(args.config, **ov)
    rows = compare(base, [m.strip() for m in args.models.split(",") if m.strip()], base.out, tta=args.tta,
                   ensemble=args.ensemble)
    sys.stdout.write(format_table(rows, base))
    return 0


def _build_default(args: argparse.Namespace) -> int:
    from pneumoscope.studies.default_model import build

    m = build(args.data, out=args.out, config=args.config, dest=args.dest, weights_from=args.weights_from)
    log.info("default model: val AUC %.4f, threshold %.3f -> %s", m["val_auc"], m["threshold"], m["packed"])
    return 0


def _ensemble(args: argparse.Namespace) -> int:
    from pneumoscope.studies.ensemble import build

    m = build([c for c in args.checkpoints.split(",") if c], args.data, args.out)
    log.info("ensemble: val AUC %.4f, threshold %.3f -> %s", m["val_auc"], m["threshold"], m["checkpoint"])
    return 0


def _bench(args: argparse.Namespace) -> int:
    from pneumoscope.studies.bench import bench

    r = bench(args.data, model=args.model, image_size=args.image_size, limit=args.limit, batch_size=args.batch_size,
              out=args.out)
    sys.stdout.write(r["markdown"])
    return 0


def register(sub) -> None:
    s = sub.add_parser("train", help="train a model; prints the study's per-epoch table")
    add_train_flags(s)
    s.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from RUN_DIR/last.pt")
    s.set_defaults(func=_train)

    s = sub.add_parser("reproduce", help="train seed_cnn for 5, 7 and 10 epochs and compare with the study's table")
    add_train_flags(s)
    s.add_argument("--epoch-list", default="5,7,10", help="comma-separated epoch counts (default 5,7,10)")
    s.set_defaults(func=_reproduce)

    s = sub.add_parser("compare", help="train several models on the same split and seed; one markdown table")
    add_train_flags(s)
    s.add_argument("--models", required=True,
                   help="comma-separated, e.g. seed_cnn,cnn_rnn,efficientnet_lite0:pretrained,efficientnet_lite0:scratch")
    s.add_argument("--tta", action="store_true", help="add a test-time-augmentation row per model")
    s.add_argument("--ensemble", action="store_true", help="add a row for the mean probability of all models")
    s.set_defaults(func=_compare)

    s = sub.add_parser("build-default-model",
                       help="train pneumoscope/resources/default_model.yaml and pack it as the bundled model")
    s.add_argument("--data", required=True)
    s.add_argument("--out", default="runs/default_model", help="run folder")
    s.add_argument("--config", help="training config (default: pneumoscope/resources/default_model.yaml)")
    s.add_argument("--dest", help="where to write the packed model (default: inside the package)")
    s.add_argument("--weights-from", metavar="CKPT",
                   help="do not train: take the weights of CKPT (trained by the same recipe) and refit its test-time "
                        "views, calibration and threshold on its validation split, then the OOD reference; pack")
    s.set_defaults(func=_build_default)

    s = sub.add_parser("ensemble", help="combine finished runs into one checkpoint (mean calibrated probability; "
                                        "calibration and threshold fitted on their shared validation split)")
    s.add_argument("--checkpoints", required=True, help="comma-separated best.pt files of binary runs on the same split")
    s.add_argument("--data", required=True, help="the training data folder (the validation split is re-made)")
    s.add_argument("--out", required=True, help="the ensemble checkpoint to write, e.g. runs/ensemble.pt")
    s.set_defaults(func=_ensemble)

    s = sub.add_parser("bench", help="time one training epoch per hardware configuration (threads, precision, device)")
    s.add_argument("--data", required=True, help="folder with NORMAL/ PNEUMONIA/ or train/ val/ test/")
    s.add_argument("--model", default="seed_cnn")
    s.add_argument("--image-size", type=int, default=150)
    s.add_argument("--limit", type=int, default=1024, help="training (and validation) images per epoch (default 1024)")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--out", default=None, help="also write the markdown table here, e.g. bench.md")
    s.set_defaults(func=_bench)
