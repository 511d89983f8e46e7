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


def _predict(args: argparse.Namespace) -> int:
    import csv

    from pneumoscope.data.folders import expand_paths
    from pneumoscope.inference.loader import load

    paths = expand_paths(args.paths)
    if not paths:
        raise PneumoscopeError(f"no image or DICOM file found in {args.paths}")
    results = load(args.checkpoint, device=args.device).predict(paths, adapt=args.adapt_to_batch)
    fmt = args.format or ("json" if args.output and args.output.endswith(".json") else "csv")
    out = open(args.output, "w", newline="") if args.output else sys.stdout
    try:
        if fmt == "json":
            out.write(json.dumps(results, indent=2) + "\n")
        else:
            cols = ["path", "patient_id", "probability", "calibrated_probability", "label", "threshold", "ood_score",
                    "out_of_distribution", "not_assessed_reason", "warnings", "error"]
            if args.adapt_to_batch:
                cols[4:4] = ["adapted_probability", "adaptation"]
            w = csv.DictWriter(out, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            for r in results:
                ood = r.get("out_of_distribution")
                w.writerow({**r, "warnings": "; ".join(r.get("warnings", [])),
                            "out_of_distribution": "" if ood is None else str(ood).lower()})
    finally:
        if args.output:
            out.close()
    bad = [r for r in results if "error" in r]
    if bad:
        log.warning("%d of %d files could not be read: %s", len(bad), len(results), ", ".join(r["path"] for r in bad))
    return 0


def _explain(args: argparse.Namespace) -> int:
    from pneumoscope.trust.explain import explain

    explain(args.checkpoint, args.paths, args.out, device=args.device)
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
    s.add_argument("--adapt-to-batch", choices=["prior", "bn", "both"], default=None,
                   help="opt-in, off by default: adapt to these images as one batch from a new site without labels "
                        "(prior: EM re-estimation of the pneumonia prior; bn: BatchNorm statistics; both); "
                        "reported beside the plain model's figures")


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

    s = sub.add_parser("predict", help="probability of pneumonia for image/DICOM files or folders")
    s.add_argument("paths", nargs="+", metavar="PATH")
    s.add_argument("--checkpoint", help="best.pt of a run (default: the bundled model)")
    s.add_argument("--output", "-o", help="write CSV or JSON here (default: CSV on stdout)")
    s.add_argument("--format", choices=["csv", "json"])
    s.add_argument("--device", default="auto")
    _add_adapt(s)
    s.set_defaults(func=_predict)

    s = sub.add_parser("explain", help="Grad-CAM heatmap overlays (PNG) of the pneumonia score")
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
