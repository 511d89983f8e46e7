"""Recipe selection: score checkpoints by the fixed rule and write the comparison table.

``score_checkpoint(ckpt, data_dir, external_dir) -> dict`` measures, for one checkpoint at ITS stored threshold
and calibration (both fitted on its own validation split during training; nothing here is fitted on a probe):

(a) ``val_auc``: AUC on the checkpoint's patient-level validation split (re-made from its stored config);
(b) ``shift_auc``: mean AUC over the 12 moderate simulated shifts of MODEL_CARD.md (``MODERATE_SHIFTS``) on the same
    validation images;
(c) ``actualmed_auc``: AUC on ``external_dir/actualmed`` (18 normal, 26 COVID adults);

each with a 95 % stratified bootstrap CI; plus actualmed sensitivity/specificity, ``external_dir/hannover``
sensitivity (positives only), validation sensitivity/specificity, ECE (validation, calibrated probabilities) and
``lung_box_mass``: the mean share of Grad-CAM mass inside the central box ``LUNG_BOX`` on (a subsample of) the
validation images. **score = min(a, b, c)**; ties within 0.005 are broken by hannover sensitivity.

``select(checkpoints, ...)`` scores several and optionally adds an ensemble row (mean of the members' calibrated
probabilities; threshold by Youden's J on the validation split). ``train_recipes(recipes, data, runs)`` trains each
recipe YAML into ``runs/<name>/`` (skipped when its run finished before) and returns the best.pt files, so the whole
table is one command: ``pneumoscope select --recipes all --data DIR --external DIR --out DIR [--ensemble ...]``
(or ``--checkpoints a.pt,b.pt`` for runs made elsewhere).
"""
from __future__ import annotations

import hashlib
import json
import logging
import pickle
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from pneumoscope.data.cache import decode_all
from pneumoscope.data.digest import file_digest
from pneumoscope.data.folders import expand_paths, patient_id_from_name, scan
from pneumoscope.errors import ConfigError
from pneumoscope.evaluation.calibration import expected_calibration_error
from pneumoscope.evaluation.evaluate import evaluation_samples
from pneumoscope.evaluation.metrics import (
    auc_from_counts,
    binary_metrics,
    bootstrap_ci,
    choose_threshold,
    paired_auc_difference,
)
from pneumoscope.inference.loader import load
from pneumoscope.inference.runtime import pneumonia_score
from pneumoscope.models.checkpoint import load_checkpoint
from pneumoscope.studies.ensemble import member_folds, oof_logits, oof_predictions
from pneumoscope.trust.explain import heatmaps
from pneumoscope.trust.shift import apply

log = logging.getLogger(__name__)

# The moderate shift set of MODEL_CARD.md ("blur 1-2 px, noise 0.02-0.05, gamma +-0.5, contrast -25/-50 %, JPEG
# quality 10, downsampling x2/x4, 10 % crop"): 12 (shift, strength) pairs of pneumoscope.shift.SHIFTS.
MODERATE_SHIFTS: dict[str, list[float]] = {
    "blur": [1, 2], "noise": [0.02, 0.05], "gamma": [-0.5, 0.5], "contrast": [0.25, 0.5],
    "jpeg": [90], "downsample": [1, 2], "crop": [0.1],
}
# Central "lung box" for the shortcut column, as fractions of the (square) model input: x 15-85 %, y 15-85 %.
# On these films it holds both lung fields and the heart and excludes the neck / upper trachea / tubes above the
# clavicles (top ~15 %), the shoulders and lateral soft tissue, the lower abdomen and the film edges and labels.
# Its area is 49 % of the image: a uniform map scores 0.49; a model looking at the lungs scores well above it.
LUNG_BOX = (0.15, 0.85, 0.15, 0.85)  # x0, x1, y0, y1
N_BOOT = 1000


def lung_box_mass(maps: np.ndarray, box=LUNG_BOX) -> np.ndarray:
    """Per-map share (N,) of the Grad-CAM mass inside ``box``; NaN for an all-zero map."""
    maps = np.asarray(maps, dtype=np.float64)
    h, w = maps.shape[-2:]
    x0, x1, y0, y1 = int(round(box[0] * w)), int(round(box[1] * w)), int(round(box[2] * h)), int(round(box[3] * h))
    total = maps.sum(axis=(-2, -1))
    inside = maps[..., y0:y1, x0:x1].sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / np.where(total > 0, total, 1), np.nan)


def _probs(predictor, logits: np.ndarray) -> np.ndarray:
    return pneumonia_score(logits, predictor.temperature or 1.0, predictor.calibration_bias)


def _boot_counts(y: np.ndarray, seed: int = 0, n_boot: int = N_BOOT):
    """Stratified multinomial resample counts (like evaluation.metrics.bootstrap_ci), shared by several score vectors."""
    rng = np.random.default_rng(seed)
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    cpos = rng.multinomial(n_pos, np.full(n_pos, 1.0 / n_pos), size=n_boot)
    cneg = rng.multinomial(n_neg, np.full(n_neg, 1.0 / n_neg), size=n_boot)
    return cpos, cneg


def mean_auc_ci(y: np.ndarray, ps: list[np.ndarray], seed: int = 0) -> tuple[float, list[float]]:
    """Mean AUC over score vectors ``ps`` of the same cases, and its 95 % CI (same case resamples for all)."""
    cpos, cneg = _boot_counts(y, seed)
    boots = np.mean([auc_from_counts(p[y == 1], p[y == 0], cpos, cneg) for p in ps], axis=0)
    return float(np.mean([roc_auc_score(y, p) for p in ps])), [float(x) for x in np.quantile(boots, [0.025, 0.975])]


def _probe(predictor, folder: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(labels, calibrated probabilities) of a probe folder, through ``Predictor.predict`` (the user's path)."""
    if not folder.is_dir():
        return None
    if (folder / "NORMAL").is_dir():
        samples = [(s.path, int(s.label > 0)) for s in scan(folder).samples]
    else:  # positives only (hannover): PNEUMONIA/ without NORMAL/, which scan() rejects
        samples = [(p, 1) for p in expand_paths([folder / "PNEUMONIA"])]
    res = predictor.predict([p for p, _ in samples])
    ok = [i for i, r in enumerate(res) if r.error is None]
    p = np.array([res[i].score for i in ok])
    y = np.array([samples[i][1] for i in ok])
    return y, p


def _val_images(ckpt: dict, predictor, data_dir):
    samples, how = evaluation_samples(ckpt, data_dir)
    d = decode_all([s.path for s in samples], predictor.preprocess.input_size, progress=False)
    keep = np.flatnonzero(d.ok)
    y = (np.array([samples[i].label for i in keep]) > 0).astype(int)
    return d.images[keep], y, [str(samples[i].path) for i in keep], how


def _row_metrics(y_val, p_val, p_shift: list[np.ndarray], probes: dict, threshold: float) -> dict:
    """The table columns from probabilities (shared by single checkpoints and the ensemble row)."""
    r: dict = {"threshold": float(threshold)}
    m = binary_metrics(y_val, p_val, threshold)
    ci = bootstrap_ci(y_val, p_val, threshold, n_boot=N_BOOT)
    r.update(val_auc=m["auc"], val_auc_ci=ci["auc"], val_sensitivity=m["sensitivity"],
             val_specificity=m["specificity"], ece=float(expected_calibration_error(y_val, p_val)), n_val=int(len(y_val)))
    r["shift_auc"], r["shift_auc_ci"] = mean_auc_ci(y_val, p_shift)
    r["shift_specificity"] = float(np.mean([binary_metrics(y_val, p, threshold)["specificity"] for p in p_shift]))
    r["shift_sensitivity"] = float(np.mean([binary_metrics(y_val, p, threshold)["sensitivity"] for p in p_shift]))
    am = probes.get("actualmed")
    if am is not None:
        ma, ca = binary_metrics(*am, threshold), bootstrap_ci(*am, threshold, n_boot=N_BOOT)
        r.update(actualmed_auc=ma["auc"], actualmed_auc_ci=ca["auc"], actualmed_sensitivity=ma["sensitivity"],
                 actualmed_specificity=ma["specificity"], n_actualmed=int(len(am[0])))
    hn = probes.get("hannover")
    if hn is not None:
        mh, ch = binary_metrics(*hn, threshold), bootstrap_ci(*hn, threshold, n_boot=N_BOOT)
        r.update(hannover_sensitivity=mh["sensitivity"], hannover_sensitivity_ci=ch["sensitivity"],
                 n_hannover=int(len(hn[0])))
    site = probes.get("site")
    if site is not None:
        ms, cs = binary_metrics(*site, threshold), bootstrap_ci(*site, threshold, n_boot=N_BOOT)
        r.update(site_auc=ms["auc"], site_auc_ci=cs["auc"], site_sensitivity=ms["sensitivity"],
                 site_specificity=ms["specificity"], n_site=int(len(site[0])))
    parts = [r.get("val_auc"), r.get("shift_auc"), r.get("actualmed_auc")]
    r["score"] = None if any(v is None for v in parts) else float(min(parts))
    return r


def score_checkpoint(ckpt_path: str | Path, data_dir: str | Path, external_dir: str | Path | None,
                     gradcam_n: int = 200, seed: int = 0, keep_probabilities: bool = False,
                     site_dir: str | Path | None = None) -> dict:
    """Every column of the selection table for one checkpoint (see the module docstring)."""
    ckpt_path = Path(ckpt_path)
    ckpt = load_checkpoint(ckpt_path)
    predictor = load(ckpt_path, device="cpu")
    if ckpt.get("cv"):  # a cross-validated ensemble: every training film, scored by the member that never saw it
        o = oof_predictions(predictor.model, member_folds(ckpt, data_dir))
        images, y, paths = o["images"], o["y"], o["paths"]
        how = f"out-of-fold over every training film ({ckpt['cv']['folds']} patient folds)"

        def probs(u8):
            return pneumonia_score(oof_logits(predictor.model, u8, o["fold"]), predictor.temperature,
                                   predictor.calibration_bias)
    else:
        images, y, paths, how = _val_images(ckpt, predictor, data_dir)

        def probs(u8):
            return _probs(predictor, predictor.logits(u8))
    p_val = probs(images)
    log.info("%s: %d validation images scored; moderate shifts next", ckpt_path, len(y))
    p_shift = [probs(apply(n, images, s, seed=seed)) for n, ss in MODERATE_SHIFTS.items() for s in ss]
    ext = Path(external_dir) if external_dir else None
    log.info("%s: shifts done; probes next", ckpt_path)
    probes = {k: _probe(predictor, ext / k) if ext else None for k in ("actualmed", "hannover")}
    probes["site"] = _probe(predictor, Path(site_dir)) if site_dir else None
    log.info("%s: probes done; Grad-CAM next", ckpt_path)
    row = {"name": ckpt_path.parent.name, "checkpoint": str(ckpt_path), "model": ckpt["arch"]["name"],
           "input_size": predictor.preprocess.input_size, "intensity": predictor.preprocess.intensity,
           "temperature": predictor.temperature, "calibration_bias": predictor.calibration_bias,
           "validation": how, **_row_metrics(y, p_val, p_shift, probes, predictor.threshold)}
    if gradcam_n:
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(len(images), size=min(gradcam_n, len(images)), replace=False))
        torch.manual_seed(seed)
        maps = np.concatenate([heatmaps(predictor, images[idx[i:i + 25]]) for i in range(0, len(idx), 25)])
        share = lung_box_mass(maps)
        def mean(v):  # None when every map is all zero
            return float(np.nanmean(v)) if np.isfinite(v).any() else None

        row["lung_box_mass"], row["lung_box_mass_pneumonia"] = mean(share), mean(share[y[idx] == 1])
    metrics_json = ckpt_path.parent / "metrics.json"
    if metrics_json.is_file():
        row["train_wall_s"] = json.loads(metrics_json.read_text()).get("wall_seconds")
    if keep_probabilities:
        row["_probs"] = {"y_val": y, "p_val": p_val, "p_shift": p_shift, "probes": probes, "val_paths": paths}
    return row


def ensemble_row(members: list[dict], name: str = "ensemble") -> dict:
    """Mean of the members' calibrated probabilities; threshold = Youden's J on the validation split."""
    P = [m["_probs"] for m in members]
    if any(q["val_paths"] != P[0]["val_paths"] for q in P[1:]):
        raise ValueError("ensemble members were validated on different images: they need the same validation split")
    y = P[0]["y_val"]
    p_val = np.mean([q["p_val"] for q in P], axis=0)
    p_shift = [np.mean([q["p_shift"][i] for q in P], axis=0) for i in range(len(P[0]["p_shift"]))]
    probes = {}
    for k in ("actualmed", "hannover"):
        if all(q["probes"].get(k) is not None for q in P):
            probes[k] = (P[0]["probes"][k][0], np.mean([q["probes"][k][1] for q in P], axis=0))
    threshold, _ = choose_threshold(y, p_val, "youden")
    row = {"name": name, "checkpoint": " + ".join(m["checkpoint"] for m in members), "model": "ensemble",
           "intensity": "/".join(m["intensity"] for m in members), **_row_metrics(y, p_val, p_shift, probes, threshold)}
    walls = [m.get("train_wall_s") for m in members]
    row["train_wall_s"] = sum(walls) if all(w is not None for w in walls) else None
    return row


def rank(rows: list[dict]) -> list[dict]:
    """Rows sorted by the rule (score, then hannover sensitivity within 0.005); marks ``winner`` on the first."""
    def key(r):
        return (r.get("score") if r.get("score") is not None else -1.0)

    ordered = sorted(rows, key=key, reverse=True)
    if ordered:
        best = ordered[0]
        close = [r for r in ordered if r.get("score") is not None and key(best) - key(r) <= 0.005]
        best = max(close, key=lambda r: (r.get("hannover_sensitivity") or 0.0, key(r))) if close else best
        for r in rows:
            r["winner"] = r is best
    return rows


def _cached_score(c, data_dir, external_dir, gradcam_n: int, cache_dir, site_dir=None) -> dict:
    """score_checkpoint, memoised in ``cache_dir`` by checkpoint content, data/probe folders and gradcam_n."""
    if not cache_dir:
        return score_checkpoint(c, data_dir, external_dir, gradcam_n=gradcam_n, keep_probabilities=True,
                                site_dir=site_dir)
    key = hashlib.sha256(f"{file_digest(c)}|{Path(data_dir).resolve()}|{external_dir and Path(external_dir).resolve()}|"
                         f"{gradcam_n}|{site_dir and Path(site_dir).resolve()}".encode()).hexdigest()[:16]
    f = Path(cache_dir) / f"{Path(c).parent.name}-{key}.pkl"
    if f.is_file():
        return pickle.loads(f.read_bytes())
    row = score_checkpoint(c, data_dir, external_dir, gradcam_n=gradcam_n, keep_probabilities=True, site_dir=site_dir)
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(pickle.dumps(row))
    return row


def select(checkpoints: list[str | Path], data_dir, external_dir, ensemble: bool | list[list[int]] = False,
           gradcam_n: int = 200, cache_dir: str | Path | None = None, site_dir: str | Path | None = None) -> list[dict]:
    """Rows of every checkpoint (+ ensemble rows: ``True`` = all members, or lists of member indices), ranked.
    ``site_dir``: a labelled folder of another hospital scored zero-shot (measured only, never fitted on)."""
    rows = [_cached_score(c, data_dir, external_dir, gradcam_n, cache_dir, site_dir) for c in checkpoints]
    groups = [list(range(len(rows)))] if ensemble is True else (ensemble or [])
    for g in groups:
        if len(g) >= 2:
            members = [rows[i] for i in g]
            rows.append(ensemble_row(members, "ensemble(" + "+".join(m["name"] for m in members) + ")"))
    add_paired_differences(rows)
    for r in rows:
        r.pop("_probs", None)
    return rank(rows)


def add_paired_differences(rows: list[dict]) -> None:
    """For each row scored on exactly the films of an earlier row (e.g. two cross-validated recipes on the same
    folds): ``paired`` = its AUC minus the earlier row's on those films, with the CI of a patient-level paired
    bootstrap (evaluation.metrics.paired_auc_difference)."""
    for i, r in enumerate(rows):
        pr = r.get("_probs")
        if not pr or not pr.get("val_paths"):
            continue
        for base in rows[:i]:
            pb = base.get("_probs")
            if not pb or sorted(pb.get("val_paths") or []) != sorted(pr["val_paths"]):
                continue
            order_r, order_b = np.argsort(pr["val_paths"]), np.argsort(pb["val_paths"])
            y = np.asarray(pr["y_val"])[order_r]
            patients = [patient_id_from_name(Path(pr["val_paths"][k]).name) for k in order_r]
            d = paired_auc_difference(y, np.asarray(pb["p_val"])[order_b], np.asarray(pr["p_val"])[order_r],
                                      groups=patients)
            r["paired"] = {"against": base["name"], **d}
            break


def recipe_files(spec: str) -> list[Path]:
    """``all`` = ``resources/recipes/*.yaml`` (sorted; ``resources/default_model.yaml`` repeats the settings of the
    winning one: tested); else comma-separated YAML paths."""
    from pneumoscope.inference.default_model import RESOURCES

    if spec == "all":
        return sorted((RESOURCES / "recipes").glob("*.yaml"))
    files = [Path(f) for f in spec.split(",") if f.strip()]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"recipe file(s) not found: {', '.join(missing)} (give YAML paths or 'all')")
    return files


def train_recipes(recipes: list[Path], data_dir, runs_dir) -> list[Path]:
    """Train each recipe into ``runs_dir/<yaml stem>/`` unless that run finished (its metrics.json exists).
    An ensemble recipe (``ensemble: [member.yaml, ...]``, studies/default_model.py) trains its members the same way
    and combines them into ``runs_dir/<yaml stem>/best.pt`` (studies/ensemble.py)."""
    from pneumoscope.studies import ensemble
    from pneumoscope.studies.default_model import cv_recipe, ensemble_members, train_cv
    from pneumoscope.training.loop import train

    out = []
    for r in recipes:
        run = Path(runs_dir) / Path(r).stem
        members = ensemble_members(r)
        if (run / "metrics.json").is_file() and (run / "best.pt").is_file():
            log.info("%s: finished run found in %s; not retrained", r, run)
        elif cv_recipe(r) is not None:
            m = ensemble.build_cv(train_cv(r, data_dir, runs_dir), data_dir, run / "best.pt")
            (run / "metrics.json").write_text(json.dumps(m, indent=2))
        elif members:
            parts = train_recipes(members, data_dir, runs_dir)
            m = ensemble.build(parts, data_dir, run / "best.pt")
            walls = [json.loads((b.parent / "metrics.json").read_text()).get("wall_seconds") for b in parts]
            (run / "metrics.json").write_text(json.dumps({**m, "members": [str(b) for b in parts],
                                                          "wall_seconds": sum(w or 0 for w in walls)}, indent=2))
        else:
            log.info("%s: training into %s", r, run)
            train(str(r), data=str(data_dir), out=str(run))
        out.append(run / "best.pt")
    return out


def _f(v, nd=3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return f"{v:.{nd}f}"


def _ci(v, ci, nd=3) -> str:
    return _f(v, nd) + (f" [{_f(ci[0], nd)}, {_f(ci[1], nd)}]" if ci else "")


def markdown_table(rows: list[dict]) -> str:
    head = ("| candidate | score = min(a,b,c) | (a) val AUC [95 % CI] | (b) mean AUC, 12 moderate shifts [CI] | "
            "(c) actualmed AUC [CI] | actualmed sens / spec | hannover sens [CI] | val sens / spec | "
            "shifted sens / spec | site AUC, zero-shot [CI] | ECE | Grad-CAM lung-box mass | train wall |")
    lines = [head, "|" + " --- |" * head.count(" | ") + " --- |"]
    for r in rows:
        wall = r.get("train_wall_s")
        lines.append("| " + " | ".join([
            ("**" + r["name"] + "** (winner)") if r.get("winner") else r["name"], _f(r.get("score"), 4),
            _ci(r.get("val_auc"), r.get("val_auc_ci"), 4), _ci(r.get("shift_auc"), r.get("shift_auc_ci"), 4),
            _ci(r.get("actualmed_auc"), r.get("actualmed_auc_ci")),
            f"{_f(r.get('actualmed_sensitivity'))} / {_f(r.get('actualmed_specificity'))}",
            _ci(r.get("hannover_sensitivity"), r.get("hannover_sensitivity_ci")),
            f"{_f(r.get('val_sensitivity'))} / {_f(r.get('val_specificity'))}",
            f"{_f(r.get('shift_sensitivity'))} / {_f(r.get('shift_specificity'))}",
            _ci(r.get("site_auc"), r.get("site_auc_ci")),
            _f(r.get("ece")), _f(r.get("lung_box_mass")),
            f"{wall / 60:.1f} min" if wall else "-"]) + " |")
    lines.append("")
    for r in rows:
        d = r.get("paired")
        if d:
            lines.append(f"- Paired on the same {d['n']} films: AUC of {r['name']} minus {d['against']} = "
                         f"{d['difference']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}] (patient bootstrap, "
                         f"{d['n_boot']} resamples).")
    lines.append("")
    lines.append(f"Lung box: x {LUNG_BOX[0]:.0%}-{LUNG_BOX[1]:.0%}, y {LUNG_BOX[2]:.0%}-{LUNG_BOX[3]:.0%} of the input "
                 f"(uniform map = {(LUNG_BOX[1] - LUNG_BOX[0]) * (LUNG_BOX[3] - LUNG_BOX[2]):.2f}). Moderate shifts: "
                 + ", ".join(f"{k} {v}" for k, v in MODERATE_SHIFTS.items()) + ". All at each row's stored threshold.")
    return "\n".join(lines) + "\n"


def write(rows: list[dict], out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "select.json").write_text(json.dumps(rows, indent=2, default=float))
    (out / "select.md").write_text(markdown_table(rows))
    return out / "select.md"
