"""Site / device / any metadata per sample, for subgroup breakdowns of the evaluation report.

A CSV with a ``file`` column (file name, matched on the base name) or a ``patient_id`` column, plus any other
columns (site, device, sex, age band, ...). DICOM samples also carry ``manufacturer`` and ``device_model`` from
their headers, available as the column ``device`` without any CSV.
"""
from __future__ import annotations

import csv
from pathlib import Path

from pneumoscope.data.folders import Sample
from pneumoscope.errors import DatasetLayoutError

KEYS = ("file", "patient_id")


def read_metadata(path: str | Path) -> tuple[str, dict[str, dict[str, str]]]:
    """(key column, {key value: row}) from a CSV keyed by ``file`` or ``patient_id``."""
    path = Path(path)
    if not path.is_file():
        raise DatasetLayoutError(f"metadata file {path} not found")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise DatasetLayoutError(f"metadata file {path} has no rows")
    key = next((k for k in KEYS if k in rows[0]), None)
    if key is None:
        raise DatasetLayoutError(f"metadata file {path} needs a 'file' or 'patient_id' column; it has {list(rows[0])}")
    table: dict[str, dict[str, str]] = {}
    for r in rows:
        k = Path(r[key]).name if key == "file" else r[key]
        if k in table:
            raise DatasetLayoutError(f"metadata file {path}: {key} {k!r} appears twice")
        table[k] = r
    return key, table


def group_labels(samples: list[Sample], column: str, metadata: str | Path | None = None) -> list[str]:
    """One group label per sample: the CSV's ``column`` (joined on file name or patient id), or for
    ``column='device'`` without a CSV the DICOM Manufacturer + model. Unmatched samples get ``'unknown'``."""
    if metadata is None:
        if column != "device":
            raise DatasetLayoutError(f"grouping by {column!r} needs --metadata FILE.csv (only 'device' comes from DICOM headers)")
        out = []
        for s in samples:
            parts = [s.meta.get("manufacturer"), s.meta.get("device_model")]
            out.append(" ".join(p for p in parts if p) or "unknown")
        return out
    key, table = read_metadata(metadata)
    first = next(iter(table.values()))
    if column not in first:
        raise DatasetLayoutError(f"metadata file {metadata} has no column {column!r}; columns: {list(first)}")
    out = []
    for s in samples:
        row = table.get(s.path.name if key == "file" else s.patient_id)
        out.append((row or {}).get(column) or "unknown")
    return out
