"""``pneumoscope evaluate|predict|explain|export``: commands that run a trained model."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from pneumoscope.errors import PneumoscopeError

log = logging.getLogger("pneumoscope")


def _evaluate(args: argparse.Namespace) -> int:
    from pneumoscope.evaluation.evaluate import evaluate

    r = evaluate(args.checkpoint, args.data, args.out, split=args.split, device=args.device,
                 group_by=args.group_by, metadata=args.metadata, adapt=args.adapt_to_batch)
    keys = ("n", "accuracy", "sensitivity", "specificity", "auc", "threshold")
    log.info("%s; report in %s", ", ".join(f"{k} {r.get(k)}" if not isinstance(r.get(k), float) else f"{k} {r[k]:.4f}"
                                          for k in keys if k in r), args.out)
    return 0


EXIT_CODES = """exit codes:
  0  every input was predicted
  2  usage error, written nothing: no input file found, an output path that cannot be written, a bad checkpoint
  3  some inputs failed (unreadable, corrupt, missing, ...): the others were processed and the output lists
     each failed file with its error"""
EXIT_SOME_FAILED = 3
NO_INPUT = "no image or DICOM file found in {paths} (looked for .jpeg, .jpg, .png, .dcm, .dicom files)"


def _inputs(given: list[str]) -> list:
    """The files to process: folders expanded, missing paths and broken links kept (they become error rows)."""
    from pneumoscope.data.folders import expand_paths

    paths = expand_paths(given, broken_links=True)
    if not paths:
        raise PneumoscopeError(NO_INPUT.format(paths=" ".join(given)))
    return paths


def _check_output_file(path: str) -> None:
    """Refuse an output file that cannot be written, before any work is done."""
    import os
    from pathlib import Path

    p = Path(path)
    folder = p.parent
    if p.is_dir():
        raise PneumoscopeError(f"-o {p} is a folder; pass a file name, e.g. -o {p / 'predictions.csv'}")
    if folder.exists() and not folder.is_dir():
        raise PneumoscopeError(f"-o {p}: {folder} is a file, not a folder; write elsewhere")
    if not folder.is_dir():
        raise PneumoscopeError(f"-o {p}: the folder {folder} does not exist; create it (mkdir -p {folder}) or "
                               "write elsewhere")
    if not os.access(folder, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise PneumoscopeError(f"-o {p}: permission denied; choose a file you can write")


def _predict(args: argparse.Namespace) -> int:
    import csv

    from pneumoscope.inference.loader import load

    if args.output:
        _check_output_file(args.output)
    paths = _inputs(args.paths)
    if args.adapt_to_batch:
        from pneumoscope.inference.adapt import check_batch

        check_batch(len(paths))  # before the model loads
    results = load(args.checkpoint, device=args.device).predict(paths, adapt=args.adapt_to_batch)
    fmt = args.format or ("json" if args.output and args.output.endswith(".json") else "csv")
    out = open(args.output, "w", newline="") if args.output else sys.stdout
    try:
        if fmt == "json":
            out.write(json.dumps([r.to_dict() for r in results], indent=2) + "\n")
        else:
            cols = ["path", "patient_id", "probability", "calibrated_probability", "label", "label_from", "threshold",
                    "ood_score", "out_of_distribution", "not_assessed_reason", "warnings", "error"]
            if args.adapt_to_batch:
                cols[4:4] = ["adapted_probability", "adaptation"]
            w = csv.DictWriter(out, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            for r in results:
                ood = r.out_of_distribution
                w.writerow({**r.to_dict(), "warnings": "; ".join(r.warnings),
                            "out_of_distribution": "" if ood is None else str(ood).lower()})
    finally:
        if args.output:
            out.close()
    bad = [r for r in results if r.error is not None]
    if bad:
        log.warning("%d of %d files could not be read (error rows in the output, exit code %d): %s", len(bad),
                    len(results), EXIT_SOME_FAILED, ", ".join(r.path for r in bad))
        return EXIT_SOME_FAILED
    return 0


def _explain(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pneumoscope.trust.explain import explain

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise PneumoscopeError(f"--out {out} is an existing file, not a folder; pass a folder for the overlays")
    blocking = next((a for a in out.parents if a.exists() and not a.is_dir()), None)
    if blocking is not None:
        raise PneumoscopeError(f"--out {out}: {blocking} is a file, so the folder cannot be made; pass another folder")
    paths = _inputs(args.paths)
    errors: list[dict] = []
    explain(args.checkpoint, paths, out, device=args.device, errors=errors)
    if errors:
        log.warning("%d of %d files could not be explained (exit code %d):\n%s", len(errors), len(paths),
                    EXIT_SOME_FAILED, "\n".join(f"  {e['error']}" for e in errors))
        return EXIT_SOME_FAILED
    return 0


def _export(args: argparse.Namespace) -> int:
    from pneumoscope.inference.onnx import (
        OnnxBackend,
        calibration_images,
        export_onnx,
        quantize_onnx,
    )

    path = export_onnx(args.checkpoint, args.onnx, opset=args.opset)
    log.info("wrote %s", path)
    if args.int8_calibration:
        size = OnnxBackend(path).preprocess.input_size
        q = quantize_onnx(path, path.with_suffix(".int8.onnx"), calibration_images(args.int8_calibration, size))
        log.info("wrote %s (int8, calibrated on images from %s)", q, args.int8_calibration)
    return 0


def _add_adapt(s: argparse.ArgumentParser) -> None:
    s.add_argument("--adapt-to-batch", choices=["prior"], default=None,
                   help="opt-in, off by default: treat these images (at least 50) as one batch from a new site and "
                        "re-estimate its pneumonia prior by EM, without labels; reported beside the plain model's "
                        "figures. It only moves the operating point (the ranking, AUC, stays); measured, it helped on "
                        "one external probe and hurt on another (docs/adapt.md). To make a model work at a new site, "
                        "label a few hundred of its films and run pneumoscope adapt")


def register(sub) -> None:
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
    _add_adapt(s)
    s.set_defaults(func=_evaluate)

    s = sub.add_parser("predict", help="probability of pneumonia for image/DICOM files or folders",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="The label is PNEUMONIA when the calibrated probability (column calibrated_probability, "
                              "named in label_from) is at least the threshold.\n\n" + EXIT_CODES)
    s.add_argument("paths", nargs="+", metavar="PATH")
    s.add_argument("--checkpoint", help="best.pt of a run (default: the bundled model)")
    s.add_argument("--output", "-o", help="write CSV or JSON here (default: CSV on stdout)")
    s.add_argument("--format", choices=["csv", "json"])
    s.add_argument("--device", default="auto")
    _add_adapt(s)
    s.set_defaults(func=_predict)

    s = sub.add_parser("explain", help="Grad-CAM heatmap overlays (PNG) of the pneumonia score",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXIT_CODES)
    s.add_argument("paths", nargs="+", metavar="PATH", help="image/DICOM files or folders")
    s.add_argument("--checkpoint", help="best.pt of a run (default: the bundled model)")
    s.add_argument("--out", default="explain", help="folder for <stem>_gradcam.png (default ./explain)")
    s.add_argument("--device", default="auto")
    s.set_defaults(func=_explain)

    s = sub.add_parser("export", help="export a checkpoint to ONNX (uint8 input, preprocessing and threshold inside)")
    s.add_argument("--checkpoint", required=True, help="best.pt of a training run")
    s.add_argument("--onnx", required=True, help="output file, e.g. model.onnx")
    s.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    s.add_argument("--int8-calibration", metavar="DIR", help="also write MODEL.int8.onnx, int8 quantised and "
                   "calibrated on 64 images from DIR (e.g. the training folder)")
    s.set_defaults(func=_export)
