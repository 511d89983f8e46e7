"""``pneumoscope adapt``: turn a site's labelled films into a cross-validated local model and a site report."""
from __future__ import annotations

import argparse
import logging

log = logging.getLogger("pneumoscope")


def _adapt(args: argparse.Namespace) -> int:
    from pneumoscope.studies.adapt.report import verdict
    from pneumoscope.studies.adapt.run import adapt

    r = adapt(args.data, args.out, checkpoint=args.checkpoint, base_data=args.base_data, seed=args.seed,
              progress=args.progress, threshold=args.threshold)
    win = next(x for x in r["strategies"] if x.key == r["winner"])
    ready, fails = verdict({"metrics": win.metrics}, r["ood"])
    log.info("verdict: %s%s", "READY for local use" if ready else "NOT READY for local use",
             "" if ready else " (" + "; ".join(fails) + ")")
    return 0


def register(sub) -> None:
    s = sub.add_parser(
        "adapt", help="adapt a model to a new hospital from its labelled films: patient-level cross-validation of "
                      "several strategies, a local model (DIR/model.pt) and a site report (DIR/report.md)",
        description="Cross-validates, by patient, recalibration, logistic heads on frozen features and partial "
                    "fine-tuning (with and without replay) on the site's films; refits the winner on all of them with "
                    "a threshold and calibration from out-of-fold predictions only; checks whether acquisition style "
                    "alone predicts the label; writes DIR/model.pt (an ordinary checkpoint) and DIR/report.md/json. "
                    "See docs/adapt.md.")
    s.add_argument("--data", required=True, help="the site's labelled films: a folder with NORMAL/ and PNEUMONIA/ "
                                                 "(at least 20 films of 10 patients each; a few hundred are better)")
    s.add_argument("--out", required=True, help="output folder: model.pt, report.md, report.json, oof.csv, plots")
    s.add_argument("--checkpoint", help="the base model (default: the bundled default model)")
    s.add_argument("--base-data", help="the base model's training data folder, for replay and the forgetting check "
                                       "(default: the folder named in the base's config, when it exists here)")
    s.add_argument("--seed", type=int, default=0, help="seed of the folds and of fine-tuning (default 0)")
    s.add_argument("--threshold", default="youden",
                   help="how the local operating point is chosen on out-of-fold predictions: youden (default), "
                        "sensitivity:0.95 (the highest threshold keeping that sensitivity) or specificity:0.9 (the "
                        "lowest threshold keeping that specificity)")
    s.add_argument("--progress", action="store_true", help="progress bars while decoding")
    s.set_defaults(func=_adapt)
