"""Build the bundled default model: train with ``resources/default_model.yaml``, fit its out-of-distribution
reference on its own training images, and pack best.pt as fp16 into the package (``inference/default_model.py``).

The YAML is one of:
- a training config (one model);
- an ensemble recipe, ``ensemble: [member.yaml, ...]`` (paths relative to the YAML's folder): each member is trained
  into ``out/<member stem>/`` and the members are combined by ``studies.ensemble.build`` (calibration and threshold
  fitted on their shared validation split);
- a cross-validated recipe, ``cross_validate: member.yaml`` + ``folds: k`` (+ training keys that override the
  member's, e.g. ``precision: fp32``): the member recipe is trained k times, ``fold: i/k`` into
  ``out/<member stem>-fold<i>/``, and combined by ``studies.ensemble.build_cv`` (out-of-fold calibration, threshold
  and metrics over every training film)."""
from __future__ import annotations

import time
from pathlib import Path

import torch
import yaml

from pneumoscope.config import check_value, load_config, parse_tta
from pneumoscope.data.digest import file_digest
from pneumoscope.errors import ConfigError
from pneumoscope.evaluation.calibration import fit_calibration_and_threshold
from pneumoscope.evaluation.evaluate import evaluation_samples
from pneumoscope.inference.default_model import (
    DEFAULT_CONFIG,
    DEFAULT_MODEL,
    RESOURCES,
    pack,
)
from pneumoscope.models.checkpoint import load_checkpoint, save_checkpoint
from pneumoscope.models.preprocess import Preprocess
from pneumoscope.studies import ensemble
from pneumoscope.training.data import decode
from pneumoscope.training.history import best_val_logits, validation_scores
from pneumoscope.training.loop import train
from pneumoscope.trust.ood import reference_for_checkpoint


def ensemble_members(config: str | Path) -> list[Path] | None:
    """The member recipes of an ensemble recipe YAML, or None for a plain training config."""
    p = Path(config)
    try:
        d = yaml.safe_load(p.read_text()) if p.is_file() else None
    except yaml.YAMLError:
        return None  # not ours to report: train()'s config loader names the file and the error
    if not (isinstance(d, dict) and "ensemble" in d):
        return None
    if set(d) != {"ensemble"} or not isinstance(d["ensemble"], list) or len(d["ensemble"]) < 2:
        raise ConfigError(f"{p}: an ensemble recipe holds only 'ensemble: [member.yaml, member.yaml, ...]' (>= 2)")
    members = [(p.parent / str(m)).resolve() for m in d["ensemble"]]
    missing = [str(m) for m in members if not m.is_file()]
    if missing:
        raise ConfigError(f"{p}: member recipe(s) not found: {', '.join(missing)}")
    return members


def cv_recipe(config: str | Path) -> tuple[Path, int, dict] | None:
    """(member recipe, k, overrides) of a cross-validated recipe YAML, or None for any other YAML."""
    p = Path(config)
    try:
        d = yaml.safe_load(p.read_text()) if p.is_file() else None
    except yaml.YAMLError:
        return None
    if not (isinstance(d, dict) and "cross_validate" in d):
        return None
    k = d.pop("folds", None)
    member = (p.parent / str(d.pop("cross_validate"))).resolve()
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= 20:
        raise ConfigError(f"{p}: folds={k!r} is invalid: a cross-validated recipe needs folds: k with 2 <= k <= 20")
    if not member.is_file():
        raise ConfigError(f"{p}: member recipe {member} not found")
    if "fold" in d or "out" in d or "data" in d:
        raise ConfigError(f"{p}: fold, out and data are set per member by the build; remove them from the recipe")
    return member, k, {key: check_value(key, v, f"config file {p}: value") for key, v in d.items()}


def train_cv(config: str | Path, data: str | Path, out: str | Path) -> list[Path]:
    """Train the k fold runs of a cross-validated recipe into ``out/<member stem>-fold<i>/`` (a finished run, one
    with metrics.json, is kept); return their best.pt files."""
    member, k, over = cv_recipe(config)
    runs = []
    for i in range(1, k + 1):
        run = Path(out) / f"{member.stem}-fold{i}"
        if not ((run / "metrics.json").is_file() and (run / "best.pt").is_file()):
            train(str(member), data=str(data), out=str(run), fold=f"{i}/{k}", **over)
        runs.append(run / "best.pt")
    return runs


def refit_views(weights_from: str | Path, config: str | Path, data: str | Path, out: str | Path) -> dict:
    """A model already trained by ``config``'s recipe, given the config's test-time views (``tta``): its validation
    logits are computed again with the views (its own patient split of ``data``) and its calibration, threshold
    (``config``'s rule) and validation metrics refitted on them, exactly as training fits them. Nothing is trained;
    writes ``out/best.pt``."""
    cfg = load_config(config, data=str(data))
    ck = load_checkpoint(weights_from)
    views = parse_tta(cfg.tta)
    if views and ck["preprocess"].get("intensity", "none") != "none":
        raise ConfigError(f"{weights_from} uses intensity {ck['preprocess']['intensity']!r}: test-time views need "
                          "intensity none (config.TrainConfig.validate)")
    ck["config"] = {**ck["config"], "tta": ",".join(views)}
    pre = Preprocess.from_dict(ck["preprocess"])
    va = decode(evaluation_samples(ck, data)[0], pre.input_size, cfg, show=False)
    va.x = torch.from_numpy(pre.standardise(va.x.numpy()))  # as training does before the model (training/setup.py)
    logits, y = best_val_logits(ck, va, torch.device("cpu"), None), va.y.numpy()  # with ck's views
    ck.update(fit_calibration_and_threshold(logits, y, cfg.threshold))
    ck["metrics"] = {**ck.get("metrics", {}), **validation_scores(logits, y)}
    ck["refit"] = {"weights_from": str(weights_from), "sha256": file_digest(weights_from), "views": list(views),
                   "n_val": int(len(y)), "config": str(config)}
    ck.pop("ood_reference", None)  # fitted again by build()
    best = Path(out) / "best.pt"
    save_checkpoint(ck, best)
    return {"run_dir": str(out), "val_auc": ck["metrics"]["val_auc"], "threshold": ck["threshold"], "n_val": len(y)}


def build(data: str | Path, out: str | Path = "runs/default_model", config: str | Path | None = None,
          dest: str | Path | None = None, weights_from: str | Path | None = None) -> dict:
    """Train the default model on ``data`` and pack it into the package resources. ``weights_from``: a checkpoint
    the same recipe already trained; instead of training, its views, calibration and threshold are refitted
    (``refit_views``), then the OOD reference and the packing are done as usual."""
    t0 = time.perf_counter()
    config = Path(config or DEFAULT_CONFIG)
    members = ensemble_members(config)
    if weights_from is not None:
        if members is not None or cv_recipe(config) is not None:
            raise ConfigError(f"--weights-from needs a single-model config; {config} is an ensemble recipe")
        metrics = refit_views(weights_from, config, data, out)
        best = Path(out) / "best.pt"
    elif cv_recipe(config) is not None:
        best = Path(out) / "ensemble.pt"
        metrics = ensemble.build_cv(train_cv(config, data, out), data, best)
    elif members is None:
        metrics = train(str(config), data=str(data), out=str(out))
        best = Path(metrics["run_dir"]) / "best.pt"
    else:
        runs = [train(str(m), data=str(data), out=str(Path(out) / m.stem)) for m in members]
        best = Path(out) / "ensemble.pt"
        metrics = {**ensemble.build([Path(r["run_dir"]) / "best.pt" for r in runs], data, best),
                   "members": [{k: r[k] for k in ("run_dir", "model", "val_auc", "wall_seconds")} for r in runs]}
    target = Path(dest) if dest else RESOURCES / DEFAULT_MODEL
    # out-of-distribution reference, fitted on (up to 2,000) of the model's own training images
    ref = reference_for_checkpoint(best, data, limit=2000)
    pack(best, target, extra={"ood_reference": ref.to_dict()})
    metrics["packed"] = str(target)
    metrics["build_seconds"] = time.perf_counter() - t0
    return metrics
