"""``pneumoscope experiment image-size|shift`` (the study's image-size experiment, the acquisition-shift study) and
``pneumoscope select`` (the recipe-selection table over checkpoints)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("pneumoscope")


def _image_size(args: argparse.Namespace) -> int:
    from pneumoscope.config import load_config
    from pneumoscope.studies.image_size import image_size_experiment

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


def _shift(args: argparse.Namespace) -> int:
    from pneumoscope.trust.shift import shift_study

    shifts = [s for s in args.shifts.split(",") if s.strip()] if args.shifts else None
    shift_study(args.checkpoint, args.data, args.out, split=args.split, shifts=shifts, limit=args.limit,
                device=args.device)
    log.info("table in %s", Path(args.out) / "shift.md")
    return 0


def _select(args: argparse.Namespace) -> int:
    from pneumoscope.studies.select import recipe_files, select, train_recipes, write

    groups = True if args.ensemble == "all" else (
        [[int(i) for i in g.split(",")] for g in args.ensemble.split(";")] if args.ensemble else False)
    checkpoints = [c for c in (args.checkpoints or "").split(",") if c]
    if args.recipes:
        checkpoints += train_recipes(recipe_files(args.recipes), args.data, args.runs or Path(args.out) / "runs")
    if not checkpoints:
        log.error("select: give --checkpoints a.pt,b.pt and/or --recipes all|a.yaml,b.yaml")
        return 2
    rows = select(checkpoints, args.data, args.external, groups, args.gradcam_n, args.cache, args.site)
    path = write(rows, args.out)
    winner = next((r["name"] for r in rows if r.get("winner")), None)
    log.info("%d candidates scored; winner by the rule: %s; table in %s", len(rows), winner, path)
    return 0


def _triage(args: argparse.Namespace) -> int:
    from pneumoscope.studies.triage import triage

    try:
        rates = tuple(float(r) for r in args.rates.split(",") if r.strip())
    except ValueError:
        from pneumoscope.errors import ConfigError

        raise ConfigError(f"--rates {args.rates!r} is invalid: give comma-separated multiples of the arrival rate, "
                          "e.g. 0.8,1,1.25") from None
    triage(args.data, args.out, args.checkpoint, args.hours, rates, args.seed, args.split)
    log.info("table in %s", Path(args.out) / "triage.md")
    return 0


def register(sub) -> None:
    s = sub.add_parser("select", help="score checkpoints on validation, shifted validation and the external probes; "
                                      "one table and the winner by the rule of MODEL_CARD.md")
    s.add_argument("--checkpoints", help="comma-separated best.pt files (runs made elsewhere)")
    s.add_argument("--recipes", help="'all' (every YAML of pneumoscope/resources/recipes/, ensemble recipes included) or "
                                     "comma-separated YAMLs: each is trained into RUNS/<name>/ unless done, then scored")
    s.add_argument("--runs", help="folder for the recipe runs (default OUT/runs)")
    s.add_argument("--data", required=True, help="training data folder (each checkpoint's validation split is re-made)")
    s.add_argument("--external", help="folder with actualmed/ and hannover/ (probes: measured, never fitted on)")
    s.add_argument("--site", help="a labelled folder of another hospital (NORMAL/, PNEUMONIA/), scored zero-shot: "
                                  "measured, never fitted on, not part of the score")
    s.add_argument("--out", required=True, help="folder for select.md and select.json")
    s.add_argument("--ensemble", nargs="?", const="all", default=None,
                   help="add an ensemble row (mean calibrated probability): of all checkpoints, or of the given "
                        "0-based indices, e.g. 1,3 (several groups separated by ';')")
    s.add_argument("--cache", help="folder to memoise per-checkpoint scores in (re-used when nothing changed)")
    s.add_argument("--gradcam-n", type=int, default=200, help="validation images for the Grad-CAM column (0 = off)")
    s.set_defaults(func=_select)

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
    s.set_defaults(func=_image_size)

    s = ex.add_parser("triage", help="replay a labelled folder as a day of arrivals: how much sooner are pneumonia "
                                     "films read in worklist order than in arrival order?")
    s.add_argument("--data", required=True, help="labelled folder (NORMAL/ PNEUMONIA/, or train/ val/ test/: all films)")
    s.add_argument("--checkpoint", help="model (default: the bundled model)")
    s.add_argument("--out", default="runs/triage", help="output folder (default runs/triage)")
    s.add_argument("--hours", type=float, default=8.0, help="the films arrive over this many hours (default 8)")
    s.add_argument("--rates", default="0.8,1,1.25",
                   help="reading rates as multiples of the arrival rate, comma-separated (default 0.8,1,1.25)")
    s.add_argument("--seed", type=int, default=0, help="seed of the arrival times (default 0)")
    s.add_argument("--split", choices=["validation"], default=None,
                   help="validation: the checkpoint's own validation split of the training folder --data")
    s.set_defaults(func=_triage)

    s = ex.add_parser("shift", help="evaluate a checkpoint under controlled acquisition shifts (blur, noise, ...)")
    s.add_argument("--checkpoint", required=True, help="best.pt of a run")
    s.add_argument("--data", required=True, help="the training data folder (its validation split is re-made)")
    s.add_argument("--out", default="runs/shift", help="output folder (default runs/shift)")
    s.add_argument("--split", default=None, help="evaluate this split instead (e.g. test; 'all' for a folder without splits)")
    s.add_argument("--shifts", default=None, help="comma-separated subset of the shifts (default: all)")
    s.add_argument("--limit", type=int, default=0, help="at most N images (stratified; default all)")
    s.add_argument("--device", default="auto")
    s.set_defaults(func=_shift)
