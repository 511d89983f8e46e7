"""Which images train and validate: ``split_samples(cfg)`` scans the data folder, refuses images shared between
splits, and makes the validation split (the data's own ``val/`` or a patient-level split of ``train/``).
``cfg`` is any object with the training config's data keys (``training.config.TrainConfig``); this module does
not import it, so the data layer stays below training."""
from __future__ import annotations

import logging

import numpy as np

from pneumoscope.data.cache import Decoded, decode_all
from pneumoscope.data.folders import (
    Sample,
    check_no_cross_split_duplicates,
    fold_by_patient,
    scan,
    split_by_patient,
)
from pneumoscope.errors import DatasetLayoutError

log = logging.getLogger(__name__)

# the config values that decide the split and the decoded pixels (besides the size)
DATA_KEYS = ("data", "labels", "allow_cross_split_duplicates", "min_val_split", "val_fraction", "fold", "seed", "limit")
Split = tuple[list[Sample], list[Sample], tuple[str, ...], str]  # train, val, label names, how val was made


def subset(samples: list[Sample], limit: int, seed: int) -> list[Sample]:
    """At most ``limit`` samples, class proportions kept, seeded."""
    if not limit or len(samples) <= limit:
        return samples
    rng = np.random.default_rng(seed)
    labels = np.array([s.label for s in samples])
    keep: list[int] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = max(1, int(round(limit * len(idx) / len(samples))))
        keep += rng.choice(idx, size=min(n, len(idx)), replace=False).tolist()
    return [samples[i] for i in sorted(keep)]


def split_samples(cfg) -> Split:
    """(train, val, label_names, how validation was made). Test data never enter."""
    ds = scan(cfg.data, labels=cfg.labels)
    check_no_cross_split_duplicates(ds, allow=cfg.allow_cross_split_duplicates)
    splits = ds.splits
    train_pool = ds.split("train") if "train" in splits else [s for s in ds.samples if s.split is None]
    if not train_pool:
        raise DatasetLayoutError(f"{cfg.data}: no training images (expected a train/ split or class folders)")
    val_given = [s for s in ds.samples if s.split == "val"]
    fold = getattr(cfg, "fold", "")
    if fold:  # cross-validation: patient fold i of k of the training images validates (config.parse_fold checked it)
        i, k = (int(x) for x in fold.split("/"))
        train, val = fold_by_patient(train_pool, k, i, cfg.seed)
        how = f"patient-level fold {i} of {k} of the training images (seed={cfg.seed})"
    elif len(val_given) >= cfg.min_val_split and len({s.label for s in val_given}) == len(ds.label_names):
        train, val, how = train_pool, val_given, f"the data's val/ split ({len(val_given)} images)"
    else:
        if val_given:
            log.info("val/ split has %d images (< %d): carving a patient-level validation split from train/ instead",
                     len(val_given), cfg.min_val_split)
        train, val = split_by_patient(train_pool, cfg.val_fraction, cfg.seed)
        how = f"patient-level split of the training images (val_fraction={cfg.val_fraction}, seed={cfg.seed})"
    train, val = subset(train, cfg.limit, cfg.seed), subset(val, cfg.limit, cfg.seed + 1)
    return train, val, ds.label_names, how


def decode_samples(samples: list[Sample], size: int, cfg, progress: bool, workers: int | None = None) -> Decoded:
    return decode_all([s.path for s in samples], size, workers=cfg.workers or workers,
                      cache_dir=cfg.cache_dir or None, progress=progress and cfg.progress)


# ------------------------------------------------------------------------------------------- prefetch
