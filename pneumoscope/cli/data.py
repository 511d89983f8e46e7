"""``pneumoscope data summary|compare`` and ``pneumoscope download``."""
from __future__ import annotations

import argparse
import json
import logging
import sys

log = logging.getLogger("pneumoscope")


def _summary(args: argparse.Namespace) -> int:
    from pneumoscope.data.summary import format_summary, summarize

    s = summarize(args.data, labels=args.labels, progress=not args.json)
    sys.stdout.write((json.dumps(s, indent=2) if args.json else format_summary(s)) + "\n")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from pneumoscope.trust.data_compare import data_compare

    r = data_compare(args.reference, args.target, args.checkpoint, args.out, limit=args.limit, progress=not args.json,
                     alpha=args.alpha)
    keys = ("p_value", "intensity_js", "intensity_wasserstein", "size_wasserstein_px", "embedding_frechet",
            "target_flagged_fraction")
    log.info("%s%s", ", ".join(f"{k} {r[k]:.4g}" for k in keys if r.get(k) is not None),
             f"; report in {args.out}" if args.out else "")
    if r["shift_detected"]:
        log.warning("dataset shift detected: %s differs from %s (p = %.4g < %g); the model's validated figures may "
                    "not hold there", args.target, args.reference, r["p_value"], args.alpha)
    if args.json or not args.out:
        sys.stdout.write(json.dumps(r, indent=2) + "\n")
    return 0


def _download(args: argparse.Namespace) -> int:
    from pneumoscope.data.download import fetch_dataset

    root = fetch_dataset(args.name, args.dest, sha256=args.sha256)
    log.info("%s is ready in %s", args.name, root)
    return 0


def register(sub) -> None:
    data = sub.add_parser("data", help="inspect data folders").add_subparsers(dest="data_command", required=True,
                                                                              metavar="ACTION")
    s = data.add_parser("summary", help="images, patients, duplicates, sizes and unreadable files per split and class")
    s.add_argument("--data", required=True, help="folder with NORMAL/ PNEUMONIA/ or train/ val/ test/")
    s.add_argument("--labels", default="binary", choices=["binary", "ternary"])
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=_summary)

    s = data.add_parser("compare", help="compare two image folders: intensities, sizes, model embeddings")
    s.add_argument("--reference", required=True, help="folder of images the model knows (e.g. the training data)")
    s.add_argument("--target", required=True, help="folder of new images (e.g. another hospital's)")
    s.add_argument("--checkpoint", help="best.pt: also compare the model's embeddings")
    s.add_argument("--out", help="write compare.json/.md/.png here (default: JSON on stdout)")
    s.add_argument("--limit", type=int, default=500, help="at most N files per folder (default 500; 0 = all)")
    s.add_argument("--alpha", type=float, default=0.01, help="significance level of the shift test (default 0.01)")
    s.add_argument("--json", action="store_true", help="print the JSON result (also when --out is given)")
    s.set_defaults(func=_compare)

    s = sub.add_parser("download", help="fetch a public dataset (resumable, checksum-verified)")
    s.add_argument("name", choices=["kermany", "pneumoniamnist"])
    s.add_argument("--dest", required=True, help="folder to download and extract into")
    s.add_argument("--sha256", default=None, help="expected SHA-256 of the archive when the table has none")
    s.set_defaults(func=_download)
