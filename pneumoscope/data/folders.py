"""Folder layouts, the sample type, patient ids, patient-level splits and duplicate detection.

Two layouts are understood (class folder names are case-insensitive):
    ROOT/NORMAL/*.jpeg, ROOT/PNEUMONIA/*.jpeg                    ("class" layout)
    ROOT/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg              ("split" layout, Kermany/Kaggle)

Label names and their order come from ``LABEL_SETS``, never from directory listing order.
"""
from __future__ import annotations

import logging
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom  # lazy: only DICOM inputs pay for it

from pneumoscope.data.digest import cached_digest
from pneumoscope.data.images import DICOM_EXTENSIONS, IMAGE_EXTENSIONS, is_dicom_path
from pneumoscope.data.npz import materialize
from pneumoscope.errors import DatasetLayoutError, DuplicateAcrossSplitsError

log = logging.getLogger(__name__)

# One table of label facts (MedMNIST style). Index = integer label.
LABEL_SETS: dict[str, tuple[str, ...]] = {
    "binary": ("NORMAL", "PNEUMONIA"),
    "ternary": ("NORMAL", "BACTERIAL", "VIRAL"),
}
CLASS_FOLDERS = ("NORMAL", "PNEUMONIA")
SPLITS = ("train", "val", "test")
FILE_EXTENSIONS = IMAGE_EXTENSIONS + DICOM_EXTENSIONS
IGNORED_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}

_PERSON = re.compile(r"^(person\d+)_", re.IGNORECASE)
_IM = re.compile(r"^((?:NORMAL2-)?IM-\d+)-", re.IGNORECASE)
_NIH = re.compile(r"^(\d{8})_\d{3}\.")  # NIH ChestX-ray14: PPPPPPPP_NNN.png, the 8 digits are the patient


@dataclass
class Sample:
    """One image: where it is, what it is, whose it is (pixels are decoded separately: ``cache.decode_all``)."""

    path: Path
    label: int | None
    patient_id: str
    split: str | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class Dataset:
    root: Path
    label_names: tuple[str, ...]
    samples: list[Sample]
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, reason): listed, never fatal

    @property
    def splits(self) -> list[str]:
        return [s for s in SPLITS if any(x.split == s for x in self.samples)] + sorted(
            {x.split for x in self.samples if x.split not in SPLITS and x.split is not None}
        )

    def split(self, name: str) -> list[Sample]:
        out = [s for s in self.samples if s.split == name]
        if not out:
            raise DatasetLayoutError(f"{self.root}: no '{name}' split (found: {', '.join(self.splits) or 'none'})")
        return out


def patient_id_from_name(name: str) -> str:
    """Patient id from a Kermany file name; an unknown pattern makes each file its own patient.

    ``person1000_bacteria_2931.jpeg`` -> ``person1000``; ``IM-0115-0001.jpeg`` -> ``IM-0115``;
    ``NORMAL2-IM-0588-0001-0002.jpeg`` -> ``NORMAL2-IM-0588`` (kept apart from ``IM-0588``: another source);
    NIH ChestX-ray14 ``00001362_004.png`` -> ``00001362``.
    """
    stem = Path(name).name
    for pattern in (_PERSON, _IM, _NIH):
        m = pattern.match(stem)
        if m:
            return m.group(1)
    return Path(stem).stem


def ternary_label(path: Path, binary_label: int) -> int:
    """NORMAL=0, BACTERIAL=1, VIRAL=2, from the folder (normal) and the file name (bacteria/virus)."""
    if binary_label == 0:
        return 0
    name = path.name.lower()
    if "bacteria" in name:
        return 1
    if "virus" in name:
        return 2
    raise DatasetLayoutError(
        f"{path}: a PNEUMONIA file must name its kind ('bacteria' or 'virus') for --labels ternary"
    )


def _is_ignored(p: Path) -> bool:
    return p.name.startswith(".") or p.name in IGNORED_NAMES


def _class_dirs(folder: Path) -> dict[str, Path] | None:
    """{'NORMAL': path, 'PNEUMONIA': path} when ``folder`` is a class layout, None when it holds no class folder."""
    subdirs = [d for d in folder.iterdir() if d.is_dir() and not _is_ignored(d)]
    found = {d.name.upper(): d for d in subdirs if d.name.upper() in CLASS_FOLDERS}
    if not found:
        return None
    unknown = [d.name for d in subdirs if d.name.upper() not in CLASS_FOLDERS]
    if unknown:
        raise DatasetLayoutError(
            f"{folder}: unexpected folder(s) {unknown} beside the class folders; class folders must be named "
            f"{' and '.join(CLASS_FOLDERS)} (any case). Rename or move them."
        )
    missing = [c for c in CLASS_FOLDERS if c not in found]
    if missing:
        raise DatasetLayoutError(f"{folder}: class folder(s) {missing} missing; expected {list(CLASS_FOLDERS)}")
    return found


def _dicom_patient(path: Path) -> tuple[str | None, dict]:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception as e:  # noqa: BLE001 - pydicom raises many types on garbage; recorded, decoded later
        log.debug("cannot read DICOM header of %s: %s", path, e)
        return None, {}
    meta = {
        "patient_id": str(getattr(ds, "PatientID", "") or "") or None,
        "study_uid": str(getattr(ds, "StudyInstanceUID", "") or "") or None,
        "manufacturer": str(getattr(ds, "Manufacturer", "") or "") or None,
        "device_model": str(getattr(ds, "ManufacturerModelName", "") or "") or None,
    }
    return meta["patient_id"], meta


def _scan_class_folder(folder: Path, split: str | None, labels: str, skipped: list) -> list[Sample]:
    dirs = _class_dirs(folder)
    if dirs is None:
        raise DatasetLayoutError(
            f"{folder}: no class folders; expected sub-folders {list(CLASS_FOLDERS)} (any case), "
            f"or split folders {list(SPLITS)} each holding them"
        )
    out = []
    for label_name in CLASS_FOLDERS:  # fixed order, never directory order
        binary = CLASS_FOLDERS.index(label_name)
        files = sorted(p for p in dirs[label_name].rglob("*") if p.is_file() and not _is_ignored(p))
        n_before = len(out)
        for p in files:
            if p.suffix.lower() not in FILE_EXTENSIONS:
                skipped.append((p, f"unsupported file type '{p.suffix}' (expected {', '.join(FILE_EXTENSIONS)})"))
                continue
            if p.stat().st_size == 0:
                skipped.append((p, "empty file (0 bytes)"))
                continue
            meta: dict = {}
            pid = None
            if is_dicom_path(p):
                pid, meta = _dicom_patient(p)
            label = binary if labels == "binary" else ternary_label(p, binary)
            out.append(Sample(path=p, label=label, patient_id=pid or patient_id_from_name(p.name), split=split, meta=meta))
        if len(out) == n_before:
            raise DatasetLayoutError(f"{dirs[label_name]}: class folder holds no readable image file")
    return out


def scan(root: str | Path, labels: str = "binary") -> Dataset:
    """Index a data folder in either layout (or a MedMNIST ``.npz`` file, materialised as such a folder by
    ``npz.materialize``). Files are not decoded here (see ``pneumoscope.data.cache``)."""
    root = Path(root)
    if labels not in LABEL_SETS:
        raise DatasetLayoutError(f"unknown label set '{labels}'; choose one of {list(LABEL_SETS)}")
    if root.suffix.lower() == ".npz":
        if labels != "binary":
            raise DatasetLayoutError(f"{root}: a MedMNIST file has binary labels only; use --labels binary")
        root = materialize(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"{root}: not a folder. Point --data at a folder with NORMAL/ and PNEUMONIA/, "
                                 "or train/ val/ test/")
    skipped: list[tuple[Path, str]] = []
    split_dirs = {d.name.lower(): d for d in root.iterdir() if d.is_dir() and d.name.lower() in SPLITS}
    if split_dirs:
        samples = []
        for s in SPLITS:
            if s in split_dirs:
                samples += _scan_class_folder(split_dirs[s], s, labels, skipped)
    else:
        samples = _scan_class_folder(root, None, labels, skipped)
    for p, why in skipped:
        log.warning("skipping %s: %s", p, why)
    return Dataset(root=root, label_names=LABEL_SETS[labels], samples=samples, skipped=skipped)


def find_duplicates(samples: list[Sample]) -> list[list[Sample]]:
    """Groups (of 2 or more) of byte-identical files, sorted by first path."""
    by_hash: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_hash[cached_digest(s.path)].append(s)
    return sorted((g for g in by_hash.values() if len(g) > 1), key=lambda g: str(g[0].path))


def check_no_cross_split_duplicates(dataset: Dataset, allow: bool = False) -> list[list[Sample]]:
    """Duplicate groups spanning more than one split; an error unless ``allow``."""
    cross = [g for g in find_duplicates(dataset.samples) if len({s.split for s in g}) > 1]
    if cross and not allow:
        example = ", ".join(f"{s.split}:{s.path.name}" for s in cross[0])
        raise DuplicateAcrossSplitsError(
            f"{dataset.root}: {len(cross)} image(s) occur byte-identical in more than one split (e.g. {example}); "
            "remove them or pass --allow-cross-split-duplicates"
        )
    return cross


def _patient_groups(samples: list[Sample]) -> dict[str, list[int]]:
    """Indices grouped by patient, with patients that share a byte-identical image merged (union-find)."""
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        while parent.setdefault(a, a) != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for s in samples:
        find(s.patient_id)
    for g in find_duplicates(samples):
        for s in g[1:]:
            parent[find(s.patient_id)] = find(g[0].patient_id)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        groups[find(s.patient_id)].append(i)
    return groups


def _split_patients(samples: list[Sample], seed: int, pick) -> tuple[list[Sample], list[Sample]]:
    """(train, validation) by patient: group the samples by patient (byte-identical images merge patients), put each
    patient in the stratum of its most common label, shuffle each stratum's patients (sorted first, so the result
    does not depend on input order; seeded) and send ``pick(shuffled patients)`` of every stratum to validation."""
    groups = _patient_groups(samples)
    strata: dict[int, list[str]] = defaultdict(list)
    for pid, idx in groups.items():
        strata[Counter(samples[i].label for i in idx).most_common(1)[0][0]].append(pid)
    rng = np.random.default_rng(seed)
    val_pids: set[str] = set()
    for label in sorted(strata, key=lambda x: (x is None, x)):
        pids = sorted(strata[label])
        rng.shuffle(pids)
        val_pids.update(pick(pids))
    train = [samples[i] for pid, idx in groups.items() if pid not in val_pids for i in idx]
    val = [samples[i] for pid, idx in groups.items() if pid in val_pids for i in idx]
    key = lambda s: str(s.path)  # noqa: E731
    return sorted(train, key=key), sorted(val, key=key)


def split_by_patient(samples: list[Sample], val_fraction: float, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Patient-level train/validation split, stratified by class (``_split_patients``): ``round(val_fraction * n)``
    patients of each stratum (at least one, never all, when it has two or more) validate. No patient is on both
    sides."""
    if not 0.0 < val_fraction < 1.0:
        raise DatasetLayoutError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")

    def pick(pids: list[str]) -> list[str]:
        n_val = int(round(val_fraction * len(pids)))
        if len(pids) >= 2:
            n_val = min(max(n_val, 1), len(pids) - 1)
        return pids[:n_val]

    return _split_patients(samples, seed, pick)


def fold_by_patient(samples: list[Sample], k: int, i: int, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Patient-level stratified k-fold (``_split_patients``): (train, validation) of fold ``i`` (1-based) of ``k``.
    Each stratum's shuffled patients are dealt to the k folds in turn, so the k validation folds are disjoint, cover
    every image once and keep the class shares. No patient is on both sides of any fold."""
    if not 2 <= k or not 1 <= i <= k:
        raise DatasetLayoutError(f"fold {i} of {k} is invalid: need 2 <= k and 1 <= i <= k")
    train, val = _split_patients(samples, seed, lambda pids: pids[i - 1::k])
    if not train or not val:
        raise DatasetLayoutError(f"fold {i} of {k}: too few patients for {k} folds")
    return train, val


def expand_paths(inputs: list[str | Path], broken_links: bool = False) -> list[Path]:
    """Files as given; folders expanded recursively to their image/DICOM files (sorted, hidden files skipped).

    ``broken_links``: also list a folder's image-named symbolic links that lead nowhere (dangling, or a loop), so
    that the caller reports them instead of skipping them silently."""
    out: list[Path] = []
    for i in inputs:
        p = Path(i)
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if (f.is_file() or (broken_links and f.is_symlink()))
                          and f.suffix.lower() in FILE_EXTENSIONS and not f.name.startswith("."))
        else:
            out.append(p)
    return out
