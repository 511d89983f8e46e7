"""The `pneumoscope` command: a thin argparse layer over the Python API.

Every sub-command imports its module lazily, so `pneumoscope --help` is instant.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from pneumoscope import __version__
from pneumoscope.errors import PneumoscopeError

log = logging.getLogger("pneumoscope")


# ---------------------------------------------------------------------------------------------- data
def _data_summary(args: argparse.Namespace) -> int:
    from pneumoscope.data.summary import format_summary, summarize

    s = summarize(args.data, labels=args.labels, progress=not args.json)
    sys.stdout.write((json.dumps(s, indent=2) if args.json else format_summary(s)) + "\n")
    return 0


def _download(args: argparse.Namespace) -> int:
    from pneumoscope.data.download import cli_download

    return cli_download(args)


# ---------------------------------------------------------------------------------------------- train
TRAIN_FLAGS = {  # flag -> (type, help); every key mirrors a TrainConfig field / YAML key
    "data": (str, "folder with NORMAL/ PNEUMONIA/ or train/ val/ test/"),
    "model": (str, "model name (see docs/models.md); default seed_cnn"),
    "image_size": (int, "square input side in px; default: the model's"),
    "labels": (str, "binary (default) or ternary (NORMAL/BACTERIAL/VIRAL)"),
    "epochs": (int, "maximum epochs (default 10)"),
    "batch_size": (int, "default 32"),
    "lr": (float, "peak learning rate of the one-cycle schedule (default 1e-3)"),
    "val_fraction": (float, "patient-level validation fraction (default 0.15)"),
    "seed": (int, "default 0"),
    "out": (str, "run folder (default runs/<model>-<labels>-seed<seed>)"),
    "imbalance": (str, "weighted (default) | sampler | none"),
    "label_smoothing": (float, "default 0"),
    "threshold": (str, "youden (default) | sensitivity:0.95"),
    "patience": (int, "early stopping patience in epochs (default 5)"),
    "precision": (str, "auto (default) | bf16 | fp16 | fp32"),
    "device": (str, "auto (default) | cpu | cuda"),
    "threads": (int, "torch threads (default: all cores)"),
    "limit": (int, "at most N training and N validation images (quick runs)"),
    "cache_dir": (str, "cache decoded images here (default: off)"),
    "weights": (str, "local weights file for the backbone"),
    "freeze_epochs": (int, "epochs with a frozen backbone first (default 0)"),
    "backbone_lr_mult": (float, "backbone learning rate = lr x this (default 1)"),
}


def add_train_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("--config", help="YAML file whose keys mirror these flags (flags override it)")
    for key, (typ, hlp) in TRAIN_FLAGS.items():
        s.add_argument("--" + key.replace("_", "-"), dest=key, type=typ, default=None, help=hlp)
    s.add_argument("--pretrained", action="store_true", default=None, help="ImageNet weights (efficientnet_lite0, offline)")
    s.add_argument("--no-augment", dest="augment", action="store_false", default=None, help="turn augmentation off")
    s.add_argument("--hflip", action="store_true", default=None, help="add random horizontal flips (off by default)")


def _overrides(args: argparse.Namespace) -> dict:
    keys = list(TRAIN_FLAGS) + ["pretrained", "augment", "hflip"]
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def _train(args: argparse.Namespace) -> int:
    from pneumoscope.config import DEFAULT_INPUT_SIZE, resolve
    from pneumoscope.data.prepare import Prefetch

    # split + decode start in a forked process now, while this one imports torch and builds the model
    overrides = _overrides(args)
    cfg = resolve(args.config, args.resume, validate=False, **overrides)
    prefetch = Prefetch.start(cfg, cfg.image_size or DEFAULT_INPUT_SIZE.get(cfg.model))
    try:
        from pneumoscope.train import train

        m = train(args.config, resume=args.resume, prefetch=prefetch, **overrides)
    finally:
        if prefetch is not None:
            prefetch.close()
    log.info("best val AUC %.4f at epoch %s; threshold %.3f; run folder %s", m["val_auc"], m["best_epoch"],
             m["threshold"] or float("nan"), m["run_dir"])
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from pneumoscope.config import resolve
    from pneumoscope.reproduce import reproduce

    ov = _overrides(args)
    ov.setdefault("model", "seed_cnn")
    ov.setdefault("out", "runs/reproduce")
    sys.stdout.write(reproduce(resolve(args.config, **ov), tuple(int(e) for e in args.epoch_list.split(","))))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from pneumoscope.compare import compare, format_table
    from pneumoscope.config import resolve

    ov = _overrides(args)
    ov.setdefault("out", "runs/compare")
    base = resolve(args.config, **ov)
    rows = compare(base, [m.strip() for m in args.models.split(",") if m.strip()], base.out, tta=args.tta, ensemble=args.ensemble)
    sys.stdout.write(format_table(rows, base))
    return 0


def _build_default(args: argparse.Namespace) -> int:
    from pneumoscope.default_model import build

    m = build(args.data, out=args.out, config=args.config, dest=args.dest)
    log.info("default model: val AUC %.4f, threshold %.3f -> %s", m["val_auc"], m["threshold"], m["packed"])
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from pneumoscope.evaluate import evaluate

    r = evaluate(args.checkpoint, args.data, args.out, split=args.split, device=args.device,
                 group_by=args.group_by, metadata=args.metadata)
    keys = ("n", "accuracy", "sensitivity", "specificity", "auc", "threshold")
    log.info("%s; report in %s", ", ".join(f"{k} {r.get(k)}" if not isinstance(r.get(k), float) else f"{k} {r[k]:.4f}"
                                          for k in keys if k in r), args.out)
    return 0


def _predict(args: argparse.Namespace) -> int:
    import csv

    from pneumoscope.predict import expand_paths, load

    paths = expand_paths(args.paths)
    if not paths:
        raise PneumoscopeError(f"no image or DICOM file found in {args.paths}")
    results = load(args.checkpoint, device=args.device).predict(paths)
    fmt = args.format or ("json" if args.output and args.output.endswith(".json") else "csv")
    out = open(args.output, "w", newline="") if args.output else sys.stdout
    try:
        if fmt == "json":
            out.write(json.dumps(results, indent=2) + "\n")
        else:
            cols = ["path", "patient_id", "probability", "calibrated_probability", "label", "threshold", "warnings", "error"]
            w = csv.DictWriter(out, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            for r in results:
                w.writerow({**r, "warnings": "; ".join(r.get("warnings", []))})
    finally:
        if args.output:
            out.close()
    bad = [r for r in results if "error" in r]
    if bad:
        log.warning("%d of %d files could not be read: %s", len(bad), len(results), ", ".join(r["path"] for r in bad))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pneumoscope", description="Pneumonia detection on chest X-rays.")
    p.add_argument("--version", action="version", version=f"pneumoscope {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="inspect data folders").add_subparsers(dest="data_command", required=True, metavar="ACTION")
    s = data.add_parser("summary", help="images, patients, duplicates, sizes and unreadable files per split and class")
    s.add_argument("--data", required=True, help="folder with NORMAL/ PNEUMONIA/ or train/ val/ test/")
    s.add_argument("--labels", default="binary", choices=["binary", "ternary"])
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=_data_summary)

    s = sub.add_parser("download", help="fetch a public dataset (resumable, checksum-verified)")
    s.add_argument("name", choices=["kermany", "pneumoniamnist"])
    s.add_argument("--dest", required=True, help="folder to download and extract into")
    s.add_argument("--sha256", default=None, help="expected SHA-256 of the archive when the table has none")
    s.set_defaults(func=_download)

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

    s = sub.add_parser("build-default-model", help="train pneumoscope/resources/default_model.yaml and pack it as the bundled model")
    s.add_argument("--data", required=True)
    s.add_argument("--out", default="runs/default_model", help="run folder")
    s.add_argument("--config", help="training config (default: pneumoscope/resources/default_model.yaml)")
    s.add_argument("--dest", help="where to write the packed model (default: inside the package)")
    s.set_defaults(func=_build_default)

    s = sub.add_parser("evaluate", help="metrics with confidence intervals, curves and calibration on a labelled folder")
    s.add_argument("--checkpoint", help="best.pt of a run (default: the bundled model)")
    s.add_argument("--data", required=True)
    s.add_argument("--split", help="split of a train/val/test layout (e.g. test), or 'validation': the checkpoint's own "
                                   "patient-level validation split re-made from its stored config")
    s.add_argument("--out", default="report", help="report folder (default ./report)")
    s.add_argument("--metadata", help="CSV with a 'file' or 'patient_id' column and group columns (site, device, ...)")
    s.add_argument("--group-by", help="column to break every metric down by (default 'site'); "
                                      "'device' works without CSV for DICOM (Manufacturer + model)")
    s.add_argument("--device", default="auto")
    s.set_defaults(func=_evaluate)

    s = sub.add_parser("predict", help="probability of pneumonia for image/DICOM files or folders")
    s.add_argument("paths", nargs="+", metavar="PATH")
    s.add_argument("--checkpoint", help="best.pt of a run (default: the bundled model)")
    s.add_argument("--output", "-o", help="write CSV or JSON here (default: CSV on stdout)")
    s.add_argument("--format", choices=["csv", "json"])
    s.add_argument("--device", default="auto")
    s.set_defaults(func=_predict)

    from pneumoscope import bench, experiments, explain, export, ood  # these import only numpy/stdlib at the top
    from pneumoscope.serve import register as register_serve
    from pneumoscope.serve import register_db

    ood.register_data_compare(data)
    explain.register(sub)
    experiments.register(sub)
    register_serve(sub)
    register_db(sub)
    export.register(sub)
    bench.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except PneumoscopeError as e:
        log.error("%s", e)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


def run() -> None:
    """Console entry point (``pneumoscope ...``, ``python -m pneumoscope ...``): `main`, then exit without the
    interpreter's teardown. Once torch, scikit-learn, numba and matplotlib are loaded, freeing every module's
    objects takes ~1 s (measured on a 2-epoch train) and does nothing a finished command needs (mypy exits the
    same way); log handlers and streams are flushed first. Errors and torchrun workers exit normally."""
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # let the process group tear down
        raise SystemExit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
