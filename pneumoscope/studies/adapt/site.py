"""A site's labelled films, read once: ``load_site`` (checked: both classes, enough films and patients), its
patient-level folds (``patient_folds``, k from ``choose_k``) and a digest of the data the model was adapted on."""
from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from pneumoscope.data.cache import default_workers
from pneumoscope.data.digest import cached_digest
from pneumoscope.data.folders import scan
from pneumoscope.data.intake import from_path
from pneumoscope.errors import DatasetLayoutError, ImageReadError

log = logging.getLogger(__name__)

MIN_FILMS_PER_CLASS = 20
MIN_PATIENTS_PER_CLASS = 10


@dataclass
class SiteFilms:
    """Every readable labelled film of a site folder, decoded once at the model's input size."""

    root: Path
    paths: list[Path]
    y: np.ndarray  # (N,) 0 = NORMAL, 1 = PNEUMONIA
    patients: np.ndarray  # (N,) patient id per film
    images: np.ndarray  # (N, S, S) uint8
    sizes: np.ndarray  # (N, 2) original height, width
    quality: list[list[str]] = field(default_factory=list)  # model-free flags of each film (data/quality.py)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why): unreadable or unsupported

    def __len__(self) -> int:
        return len(self.y)

    def counts(self) -> dict:
        return {"films": len(self), "patients": int(len(set(self.patients))),
                "NORMAL": int((self.y == 0).sum()), "PNEUMONIA": int((self.y == 1).sum())}

    def digest(self) -> str:
        """sha256 over (label, path relative to the folder, file sha256) of every film used: the adapted model
        records it, so a report and a model can be matched to the exact films."""
        h = hashlib.sha256()
        for p, label in sorted(zip(self.paths, self.y.tolist()), key=lambda t: str(t[0])):
            h.update(f"{label}\t{p.relative_to(self.root)}\t{cached_digest(p)}\n".encode())
        return "sha256:" + h.hexdigest()


def load_site(folder: str | Path, size: int, progress: bool = False) -> SiteFilms:
    """The films of ``folder`` (NORMAL/ and PNEUMONIA/, any depth, or train/val/test holding them: all are used),
    each decoded once (data/intake.py) to its uint8 ``size`` x ``size`` model input and its quality flags.
    Unreadable files are skipped and listed. Refuses (DatasetLayoutError,
    naming the minimum) a folder with one class, fewer than MIN_FILMS_PER_CLASS films or MIN_PATIENTS_PER_CLASS
    patients in a class: cross-validation on fewer says nothing."""
    root = Path(folder)
    ds = scan(root, labels="binary")
    samples = ds.samples

    def read(s):
        try:
            return from_path(s.path, size)  # decoded once: the model input, the quality flags, the original size
        except (ImageReadError, OSError) as e:
            return e

    with ThreadPoolExecutor(max_workers=default_workers()) as pool:
        intakes = list(pool.map(read, samples))
    keep = [i for i, it in enumerate(intakes) if not isinstance(it, Exception)]
    skipped = [(str(p), why) for p, why in ds.skipped] + [
        (str(samples[i].path), str(it)) for i, it in enumerate(intakes) if isinstance(it, Exception)]
    films = SiteFilms(root=root, paths=[samples[i].path for i in keep],
                      y=np.array([samples[i].label for i in keep], dtype=np.int64),
                      patients=np.array([samples[i].patient_id for i in keep]),
                      images=np.stack([intakes[i].model_u8 for i in keep]) if keep else np.zeros((0, size, size), np.uint8),
                      sizes=np.array([intakes[i].meta["original_size"][:2] for i in keep], dtype=np.int64).reshape(-1, 2),
                      quality=[intakes[i].quality for i in keep], skipped=skipped)
    for label, name in enumerate(ds.label_names):
        n = int((films.y == label).sum())
        n_pat = len(set(films.patients[films.y == label]))
        if n < MIN_FILMS_PER_CLASS or n_pat < MIN_PATIENTS_PER_CLASS:
            raise DatasetLayoutError(
                f"{root}: {n} readable {name} films of {n_pat} patients; adapting needs at least {MIN_FILMS_PER_CLASS} "
                f"films of at least {MIN_PATIENTS_PER_CLASS} patients in each of NORMAL/ and PNEUMONIA/ (a few "
                "hundred in all are better): label more of this site's films")
    log.info("site %s: %d films of %d patients (%d NORMAL, %d PNEUMONIA), %d skipped", root, len(films),
             films.counts()["patients"], films.counts()["NORMAL"], films.counts()["PNEUMONIA"], len(skipped))
    return films


def choose_k(y: np.ndarray, patients: np.ndarray) -> int:
    """Folds for patient-level cross-validation, from the patients of the smaller class: 5, or 3 below 25 (each
    test fold then still holds >= 8 of them), 10 from 500 (the estimate then needs no wider test folds)."""
    n = min(len(set(patients[y == c])) for c in (0, 1))
    return 3 if n < 25 else 10 if n >= 500 else 5


def patient_folds(y: np.ndarray, patients: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """(N,) fold index of every film: stratified by label, all films of a patient in one fold (also a patient with
    films in both classes)."""
    fold = np.full(len(y), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for i, (_, test) in enumerate(splitter.split(np.zeros(len(y)), y, patients)):
        fold[test] = i
    return fold
