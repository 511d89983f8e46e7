"""`pneumoscope data summary`: images, patients, duplicates, sizes and unreadable files per split and class."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.errors import InvalidDicomError

from pneumoscope.data.cache import decode_all
from pneumoscope.data.folders import Dataset, find_duplicates, scan
from pneumoscope.data.images import is_dicom_path


def image_size(path: Path) -> tuple[int, int] | None:
    """(height, width) from the file header only; None when the header cannot be read."""

    if is_dicom_path(path):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            return int(ds.Rows), int(ds.Columns)
        except (InvalidDicomError, AttributeError, OSError, ValueError):
            return None
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def summarize(root: str | Path, labels: str = "binary", progress: bool = True) -> dict:
    """A JSON-ready summary of a data folder. Every file is decoded (at 32 px) to find unreadable ones."""
    ds: Dataset = scan(root, labels=labels)
    decoded = decode_all([s.path for s in ds.samples], 32, progress=progress)
    bad = {p for p, _ in decoded.errors}
    dup_groups = find_duplicates(ds.samples)
    dup_of = {s.path: gi for gi, g in enumerate(dup_groups) for s in g}
    splits: dict[str, dict] = {}
    for split in ds.splits or [None]:
        per_class = {}
        for li, name in enumerate(ds.label_names):
            members = [s for s in ds.samples if s.split == split and s.label == li]
            sizes = Counter(image_size(s.path) for s in members if s.path not in bad)
            sizes.pop(None, None)
            hs = [h for (h, w) in sizes.elements()]
            ws = [w for (h, w) in sizes.elements()]
            per_class[name] = {
                "images": len(members),
                "patients": len({s.patient_id for s in members}),
                "duplicate_files": sum(1 for s in members if s.path in dup_of),
                "unreadable": sorted(str(s.path) for s in members if s.path in bad),
                "size_min": [min(hs), min(ws)] if hs else None,
                "size_max": [max(hs), max(ws)] if hs else None,
                "size_most_common": list(sizes.most_common(1)[0][0]) if sizes else None,
            }
        members = [s for s in ds.samples if s.split == split]
        splits[split or "all"] = {
            "images": len(members),
            "patients": len({s.patient_id for s in members}),
            "classes": per_class,
        }
    cross = [g for g in dup_groups if len({s.split for s in g}) > 1]
    return {
        "root": str(ds.root),
        "layout": "split" if ds.splits else "class",
        "label_names": list(ds.label_names),
        "images": len(ds.samples),
        "patients": len({s.patient_id for s in ds.samples}),
        "splits": splits,
        "duplicate_groups": [[str(s.path.relative_to(ds.root)) for s in g] for g in dup_groups],
        "cross_split_duplicate_groups": len(cross),
        "unreadable": [{"path": str(p), "error": m} for p, m in decoded.errors],
        "skipped": [{"path": str(p), "reason": r} for p, r in ds.skipped],
    }


def format_summary(s: dict) -> str:
    """Human-readable table of ``summarize``'s output."""
    lines = [f"{s['root']} ({s['layout']} layout): {s['images']} images, {s['patients']} patients",
             f"{'split':<8}{'class':<12}{'images':>8}{'patients':>10}{'dupes':>7}{'bad':>5}"
             "  sizes (min / most common / max, h×w)"]
    fmt = lambda v: "×".join(map(str, v)) if v else "-"  # noqa: E731
    for split, d in s["splits"].items():
        for cls, c in d["classes"].items():
            lines.append(f"{split:<8}{cls:<12}{c['images']:>8}{c['patients']:>10}{c['duplicate_files']:>7}"
                         f"{len(c['unreadable']):>5}  {fmt(c['size_min'])} / {fmt(c['size_most_common'])} / {fmt(c['size_max'])}")
    lines.append(f"duplicate groups (byte-identical files): {len(s['duplicate_groups'])}, "
                 f"across splits: {s['cross_split_duplicate_groups']}")
    for g in s["duplicate_groups"]:
        lines.append("  " + "  ==  ".join(g))
    for u in s["unreadable"]:
        lines.append(f"unreadable: {u['path']}: {u['error']}")
    for k in s["skipped"]:
        lines.append(f"skipped: {k['path']}: {k['reason']}")
    return "\n".join(lines)
