"""The site report of ``pneumoscope adapt``: ``report.md`` (read by people), ``report.json`` (by machines),
``oof.csv`` (every film's out-of-fold logit, and its probability calibrated on the other folds, under every
strategy), ``roc.png``, ``calibration.png`` and
``learning_curve.png``. The verdict and the confounding sentences follow rules stated in the report itself."""
from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from pneumoscope.evaluation.report import plot_reliability

MIN_AUC_LOWER = 0.80
MIN_SENS_SPEC = 0.75
MAX_NOT_ASSESSED = 0.05
VERDICT_RULE = (f"READY for local use when the lower bound of the 95 % CI of the cross-validated AUC is at least "
                f"{MIN_AUC_LOWER:.2f}, sensitivity and specificity at the cross-fitted threshold are both at least "
                f"{MIN_SENS_SPEC:.2f}, and at most {MAX_NOT_ASSESSED:.0%} of new films would be 'not assessed'; "
                "otherwise NOT READY.")
WINNER_RULE = ("the highest cross-validated AUC wins; a strategy within 0.01 of it that fits fewer numbers to the "
               "site's films wins instead")
STYLE_STRONG = 0.70  # style-only AUC from which acquisition is said to predict the label
MARGIN_CLEAR = 0.05  # the adapted model must beat style alone by this much to be said to see more than style
UNIFORM_LUNG_BOX = 0.49


def verdict(winner: dict, ood: dict) -> tuple[bool, list[str]]:
    m = winner["metrics"]
    fails = []
    if m["auc_ci"][0] < MIN_AUC_LOWER:
        fails.append(f"lower CI bound of AUC {m['auc_ci'][0]:.3f} < {MIN_AUC_LOWER:.2f}")
    for key in ("sensitivity", "specificity"):
        if m[key] < MIN_SENS_SPEC:
            fails.append(f"{key} {m[key]:.3f} < {MIN_SENS_SPEC:.2f}")
    if ood["not_assessed"] > MAX_NOT_ASSESSED:
        fails.append(f"{ood['not_assessed']:.1%} of new films not assessed > {MAX_NOT_ASSESSED:.0%}")
    return not fails, fails


def confounding_text(winner: dict, style: dict, histogram: dict, lung_box: float) -> str:
    """Plain words on how much of the adapted model's figure could come from how films were taken."""
    w, s, h = winner["metrics"]["auc"], style["metrics"]["auc"], histogram["metrics"]["auc"]
    lo, hi = style["metrics"]["auc_ci"]
    out = [f"A model that never sees anatomy (intensity histogram, texture statistics, image size) reaches CV AUC "
           f"{s:.3f} [{lo:.3f}, {hi:.3f}] on these films; the histogram alone {h:.3f}."]
    if s >= STYLE_STRONG:
        out.append("**At this site, how a film was taken predicts its label** (for instance portable AP films, "
                   "lines and tubes, exposure and post-processing for the sicker patients).")
        if w - s < MARGIN_CLEAR:
            out.append(f"The adapted model ({w:.3f}) does not clearly beat it (by less than {MARGIN_CLEAR}): much or "
                       "all of its apparent skill may come from acquisition rather than from the lungs, and it may "
                       "fail where acquisition and disease are not linked (another ward, another device).")
        else:
            out.append(f"The adapted model ({w:.3f}) beats it by {w - s:.3f}: part of its skill goes beyond acquisition,"
                       " but part of its figure may still be acquisition.")
    else:
        out.append("Style alone predicts the label poorly here, so acquisition is not an obvious shortcut.")
    side = "more" if lung_box > UNIFORM_LUNG_BOX else "less"
    out.append(f"Its Grad-CAM puts {lung_box:.2f} of its mass in the central lung box ({side} than the "
               f"{UNIFORM_LUNG_BOX} of a uniform map).")
    return " ".join(out)


def _ci(v, ci) -> str:
    return "-" if v is None else f"{v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _row(r: dict, winner: str) -> str:
    m = r["metrics"]
    name = f"**{r['name']}** (winner)" if r["key"] == winner else r["name"]
    return (f"| {r['key']} | {name} | {r['n_weights']:,} | {_ci(m['auc'], m['auc_ci'])} | "
            f"{_ci(m['sensitivity'], m['sensitivity_ci'])} | {_ci(m['specificity'], m['specificity_ci'])} | "
            f"{m['ece']:.3f} | {r['seconds']:.0f} |")


def markdown(r: dict) -> str:
    site, base, win = r["site"], r["base"], next(x for x in r["strategies"] if x["key"] == r["winner"])
    ready, fails = verdict(win, r["ood"])
    method = r["model"]["threshold_info"]["method"]  # the refit's method: the cross-fitted thresholds used the same
    head = "| id | strategy | numbers fitted | CV AUC [95 % CI] | sensitivity [CI] | specificity [CI] | ECE | s |"
    sep = "| --- | --- | ---: | --- | --- | --- | ---: | ---: |"
    lines = [
        "# Site adaptation report", "",
        f"Site: `{site['data']}`: {site['films']} films of {site['patients']} patients ({site['NORMAL']} NORMAL, "
        f"{site['PNEUMONIA']} PNEUMONIA), digest `{site['digest']}`; {len(site['skipped'])} files skipped.",
        f"Base model: `{base['checkpoint']}` ({base['name']}, `sha256:{base['sha256']}`).", "",
        f"## Verdict: {'READY' if ready else 'NOT READY'} for local use", "",
        ("All criteria met." if ready else "Not met: " + "; ".join(fails) + "."), "", f"Rule: {VERDICT_RULE}", "",
        "## Strategies (same patient-level folds)", "",
        f"{r['folds']}-fold cross-validation by patient, stratified by label (seed {r['seed']}). AUC from the "
        f"out-of-fold predictions of every film; sensitivity and specificity at a threshold chosen ({method}) on the "
        "other folds' out-of-fold predictions, never on the film's own fold; 95 % CIs by a patient-level bootstrap.",
        f"Winner rule (fixed before the table): {WINNER_RULE}.", "", head, sep,
        *[_row(x, r["winner"]) for x in r["strategies"]], "",
        f"The base model as shipped, on the same films: AUC {_ci(base['auc'], base['auc_ci'])}; at its stored "
        f"threshold {base['threshold']:.3f}: sensitivity {base['sensitivity']:.3f}, specificity "
        f"{base['specificity']:.3f}; not assessed (out of distribution) {base['not_assessed']:.1%}.", "",
        "## Confounding: does the model read the film or the way it was taken?", "", head, sep,
        *[_row(x, "") for x in r["confounding"]], "",
        confounding_text(win, r["confounding"][0], r["confounding"][1], r["lung_box_mass"]), "",
        "## Would more labelled films help?", "", "| training films per fold | CV AUC [95 % CI] |", "| ---: | --- |",
        *[f"| {c['train_films']} | {_ci(c['auc'], c['auc_ci'])} |" for c in r["learning_curve"]], "",
        ("The last step still gained more than 0.01 AUC: more labelled films would likely help."
         if len(r["learning_curve"]) > 1 and r["learning_curve"][-1]["auc"] - r["learning_curve"][-2]["auc"] > 0.01
         else "The curve has flattened: more films of the same kind would likely change little."), "",
        "## Forgetting: the base's own validation images", "",
    ]
    f = r["forgetting"]
    lines += [f"AUC on {f['split']} ({f['n']} images): adapted {f['auc_adapted']:.3f}, base {f['auc_base']:.3f}. "
              "The adapted model is for this site; keep the base model for the base's population."
              if f else "Not measured (the base model's training folder was not found; pass --base-data)."]
    m = r["model"]
    o = r["ood"]
    lines += ["", "## The model", "",
              f"`{m['path']}` (`sha256:{m['sha256']}`): strategy {r['winner']} refitted on all {site['films']} films. "
              f"Calibration sigmoid(logit / {m['temperature']:.3f} + {m['calibration_bias']:.3f}) and threshold "
              f"{m['threshold']:.3f} ({method}) fitted on the out-of-fold predictions only. Its out-of-distribution "
              f"reference covers {'the base model' + chr(39) + 's training images and ' if m['ood_covers_base'] else ''}"
              "this site's films: in cross-validation "
              f"{o['not_assessed']:.1%} of new site films would be 'not assessed' ({o['by_quality_flags']:.1%} by "
              "quality flags alone).", "",
              "Use it: `pneumoscope predict --checkpoint MODEL.pt ...`, `serve --checkpoint`, `dicom listen --checkpoint`, "
              "`export --checkpoint`.", ""]
    if r["notes"]:
        lines += ["## Notes", "", *[f"- {n}" for n in r["notes"]], ""]
    lines += [f"Wall time {r['seconds'] / 60:.1f} min. Plots: roc.png, calibration.png, learning_curve.png; every "
              "film's out-of-fold probabilities: oof.csv."]
    return "\n".join(lines) + "\n"


def _plots(r: dict, results, y: np.ndarray, out: Path) -> None:
    fig = Figure(figsize=(6, 6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    curves = [(x.key + " " + x.name, x.oof, x.metrics["auc"]) for x in results]
    curves.append(("base model as shipped", r["base"]["logits"], r["base"]["auc"]))
    for name, s, auc in curves:
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, lw=2.5 if name.startswith(r["winner"] + " ") else 1, label=f"{name[:48]} ({auc:.3f})")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="Out-of-fold ROC on the site's films")
    ax.legend(loc="lower right", fontsize=7)
    fig.savefig(out / "roc.png", dpi=100)
    win = next(x for x in results if x.key == r["winner"])
    plot_reliability(y, None, win.p, out / "calibration.png")
    fig = Figure(figsize=(5, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    c = r["learning_curve"]
    n = [x["train_films"] for x in c]
    ax.errorbar(n, [x["auc"] for x in c], yerr=np.abs(np.array([x["auc_ci"] for x in c]).T - [x["auc"] for x in c]),
                fmt="o-", capsize=3)
    ax.set(xlabel="training films per fold", ylabel="CV AUC", title=f"Learning curve ({r['winner']})")
    fig.savefig(out / "learning_curve.png", dpi=100)


def write_report(r: dict, films, fold: np.ndarray, out: Path) -> Path:
    """Write report.md, report.json, oof.csv and the plots into ``out``; returns report.md's path."""
    results = r["strategies"] + r["confounding"]
    _plots(r, r["strategies"], films.y, out)
    with open(out / "oof.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "patient_id", "label", "fold", *[f"p_{x.key}" for x in results],
                    *[f"logit_{x.key}" for x in results]])
        for i, p in enumerate(films.paths):
            w.writerow([str(p), films.patients[i], int(films.y[i]), int(fold[i]), *[f"{x.p[i]:.5f}" for x in results],
                        *[repr(float(x.oof[i])) for x in results]])
    plain = {**r, "base": {k: v for k, v in r["base"].items() if k != "logits"},
             "strategies": [_plain(x) for x in r["strategies"]], "confounding": [_plain(x) for x in r["confounding"]]}
    win = next(x for x in plain["strategies"] if x["key"] == r["winner"])
    ready, fails = verdict(win, r["ood"])
    plain["verdict"] = {"ready": ready, "unmet": fails, "rule": VERDICT_RULE}
    plain["confounding_text"] = confounding_text(win, plain["confounding"][0], plain["confounding"][1], r["lung_box_mass"])
    (out / "report.json").write_text(json.dumps(plain, indent=2))
    path = out / "report.md"
    path.write_text(markdown(plain))
    return path


def _plain(x) -> dict:
    d = asdict(x)
    for k in ("oof", "p", "label"):
        d.pop(k)
    return d
