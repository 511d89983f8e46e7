"""MedMNIST PneumoniaMNIST ``.npz`` files (``pneumoniamnist.npz`` and its ``_64``, ``_128``, ``_224`` variants).

Each file holds ``{split}_images`` (uint8, N x H x W, or N x H x W x 3) and ``{split}_labels`` (N x 1 or N)
for the splits train, val and test. Images come back as uint8 (N, H, W), labels as int64 (N,) in {0, 1}.

``materialize(file.npz)`` writes the images once as PNG files in the split layout (``train|val|test/NORMAL|PNEUMONIA``)
under a content-keyed cache folder, so ``--data file.npz`` works wherever a data folder does (``folders.scan``).
"""
from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from pneumoscope.data.digest import file_digest
from pneumoscope.errors import DatasetLayoutError

log = logging.getLogger(__name__)

MEDMNIST_LABELS: tuple[str, ...] = ("NORMAL", "PNEUMONIA")  # index = integer label, as in medmnist's INFO
SPLITS = ("train", "val", "test")


def _luma(rgb: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) -> uint8 (...) by the ITU-R BT.601 luma rule, Y = 0.299 R + 0.587 G + 0.114 B (rounded)."""
    r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
    return ((299 * r + 587 * g + 114 * b + 500) // 1000).astype(np.uint8)


def _read_split(data: np.lib.npyio.NpzFile, path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    keys = sorted(data.files)
    ik, lk = f"{split}_images", f"{split}_labels"
    for k in (ik, lk):
        if k not in keys:
            raise DatasetLayoutError(
                f"{path}: no key '{k}' (keys in the file: {keys}); a MedMNIST file has "
                f"'{{train,val,test}}_images' and '..._labels': download it with `pneumoscope download pneumoniamnist`"
            )
    try:
        images, labels = data[ik], data[lk]
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise DatasetLayoutError(
            f"{path}: cannot read '{ik}'/'{lk}' ({e}); the file is damaged, download it again"
        ) from e

    if images.dtype != np.uint8:
        raise DatasetLayoutError(f"{path}: '{ik}' has dtype {images.dtype}, expected uint8 (0..255) as in MedMNIST")
    if images.ndim == 4 and images.shape[-1] == 3:
        images = _luma(images)
    elif images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3 or 0 in images.shape:
        raise DatasetLayoutError(
            f"{path}: '{ik}' has shape {images.shape}, expected N x H x W (or N x H x W x 3) with N, H, W > 0"
        )
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DatasetLayoutError(f"{path}: '{lk}' has shape {labels.shape}, expected N or N x 1 (one binary label)")
    if len(labels) != len(images):
        raise DatasetLayoutError(f"{path}: '{ik}' has {len(images)} images but '{lk}' has {len(labels)} labels")
    bad = ~np.isin(labels, (0, 1))
    if bad.any():
        raise DatasetLayoutError(
            f"{path}: '{lk}' holds values outside {{0, 1}} (e.g. {labels[bad][:5].tolist()}); "
            f"PneumoniaMNIST labels are 0={MEDMNIST_LABELS[0]}, 1={MEDMNIST_LABELS[1]}: is this another MedMNIST set?"
        )
    return np.ascontiguousarray(images), labels.astype(np.int64)


def _open(path: str | Path) -> tuple[Path, np.lib.npyio.NpzFile]:
    path = Path(path)
    if not path.is_file():
        raise DatasetLayoutError(
            f"{path} does not exist: download it with `pneumoscope download pneumoniamnist --dest DIR`"
        )
    if not zipfile.is_zipfile(path):
        raise DatasetLayoutError(f"{path} is not an .npz file (not a zip archive); download it again")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise DatasetLayoutError(f"{path} cannot be read as an .npz file ({e}); download it again") from e
    if not isinstance(data, np.lib.npyio.NpzFile):  # pragma: no cover - a zip always loads as NpzFile
        raise DatasetLayoutError(f"{path} is not an .npz file")
    return path, data


def read_medmnist(path: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One split of a PneumoniaMNIST file: (uint8 images (N, H, W), int64 labels (N,) in {0, 1})."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path, data = _open(path)
    with data:
        return _read_split(data, path, split)


def load_medmnist_arrays(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every split present in a PneumoniaMNIST file: {split: (images, labels)} in train, val, test order."""
    path, data = _open(path)
    with data:
        present = [s for s in SPLITS if f"{s}_images" in data.files or f"{s}_labels" in data.files]
        if not present:
            raise DatasetLayoutError(
                f"{path}: no '{{train,val,test}}_images' keys (keys in the file: {sorted(data.files)}); "
                "is this a MedMNIST file?"
            )
        out = {s: _read_split(data, path, s) for s in present}
    log.debug("%s: %s", path, {s: a[0].shape for s, a in out.items()})
    return out


def cache_root() -> Path:
    """Where materialised .npz files go: ``$PNEUMOSCOPE_CACHE/npz`` or ``~/.cache/pneumoscope/npz``."""
    return Path(os.environ.get("PNEUMOSCOPE_CACHE") or Path.home() / ".cache" / "pneumoscope") / "npz"


def materialize(path: str | Path, dest: str | Path | None = None) -> Path:
    """The folder holding ``path``'s images as PNG files in the split layout, written on first use.

    The folder is named by the file's SHA-256 (a changed file gets a new folder) and is complete once its
    ``.complete`` marker exists (an interrupted run writes it again). File names ``mnist_<split>_<index>.png``.
    """
    path = Path(path)
    arrays = load_medmnist_arrays(path)
    out = Path(dest) if dest else cache_root() / f"{path.stem}-{file_digest(path)[:16]}"
    if (out / ".complete").exists():
        return out
    for split, (images, labels) in arrays.items():
        for name in MEDMNIST_LABELS:
            (out / split / name).mkdir(parents=True, exist_ok=True)
        for i, (img, y) in enumerate(zip(images, labels)):
            Image.fromarray(img, mode="L").save(out / split / MEDMNIST_LABELS[y] / f"mnist_{split}_{i:05d}.png")
    (out / ".complete").write_text(str(path))
    log.info("%s: %s images written as PNG under %s", path, sum(len(v[1]) for v in arrays.values()), out)
    return out
