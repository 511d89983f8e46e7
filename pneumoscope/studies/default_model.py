"""Build the bundled default model: train with ``resources/default_model.yaml``, fit its out-of-distribution
reference on its own training images, and pack best.pt as fp16 into the package (``inference/default_model.py``).

The YAML is either a training config (one model) or an ensemble recipe, ``ensemble: [member.yaml, ...]`` (paths
relative to the YAML's folder): each member is trained into ``out/<member stem>/`` and the members are combined by
``studies.ensemble.build`` (calibration and threshold fitted on their shared validation split)."""
from __future__ import annotations

import time
from pathlib import Path

import yaml

from pneumoscope.errors import ConfigError
from pneumoscope.inference.default_model import (
    DEFAULT_CONFIG,
    DEFAULT_MODEL,
    RESOURCES,
    pack,
)
from pneumoscope.studies import ensemble
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


def build(data: str | Path, out: str | Path = "runs/default_model", config: str | Path | None = None,
          dest: str | Path | None = None) -> dict:
    """Train the default model on ``data`` and pack it into the package resources."""
    t0 = time.perf_counter()
    config = Path(config or DEFAULT_CONFIG)
    members = ensemble_members(config)
    if members is None:
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
