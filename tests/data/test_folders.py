"""Folder layouts, patient ids, patient-level splits and duplicates, on the real shared data and small built trees."""
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscope.data.folders import (
    LABEL_SETS,
    check_no_cross_split_duplicates,
    find_duplicates,
    patient_id_from_name,
    scan,
    split_by_patient,
)
from pneumoscope.errors import DatasetLayoutError, DuplicateAcrossSplitsError


@pytest.fixture(scope="module")
def shared(chest_xray):
    return scan(chest_xray)


def _png(path: Path, value: int = 100, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)
    return path


@pytest.mark.parametrize("name,pid", [
    ("person1000_bacteria_2931.jpeg", "person1000"),
    ("person1000_virus_1681.jpeg", "person1000"),
    ("person1_virus_10_2.jpeg", "person1"),
    ("IM-0115-0001.jpeg", "IM-0115"),
    ("IM-0117-0001-0002.jpeg", "IM-0117"),
    ("NORMAL2-IM-0588-0001-0002.jpeg", "NORMAL2-IM-0588"),
    ("00001362_004.png", "00001362"),  # NIH ChestX-ray14 (site_nih)
    ("0001362_004.png", "0001362_004"),  # not 8 digits: its own patient
    ("scan.png", "scan"),
])
def test_patient_ids(name, pid):
    assert patient_id_from_name(name) == pid


def test_shared_counts_and_label_order(shared):
    assert shared.label_names == ("NORMAL", "PNEUMONIA")
    assert shared.splits == ["train"]
    counts = Counter(s.label for s in shared.samples)
    assert counts == {0: 1341, 1: 3875}
    assert not shared.skipped


def test_shared_duplicates_are_same_patient(shared):
    groups = find_duplicates(shared.samples)
    assert len(groups) == 24
    assert sum(len(g) for g in groups) >= 48
    for g in groups:
        assert len({s.patient_id for s in g}) == 1


def test_patient_split_disjoint_stratified_reproducible(shared):
    train, val = split_by_patient(shared.samples, 0.15, seed=0)
    assert len(train) + len(val) == len(shared.samples)
    assert not {s.patient_id for s in train} & {s.patient_id for s in val}
    # no byte-identical image on both sides either
    from pneumoscope.data.digest import file_digest
    assert not {file_digest(s.path) for s in train} & {file_digest(s.path) for s in val}
    frac_pos = np.mean([s.label for s in val])
    assert abs(frac_pos - 3875 / 5216) < 0.05
    assert 0.10 < len(val) / len(shared.samples) < 0.20
    train2, val2 = split_by_patient(list(reversed(shared.samples)), 0.15, seed=0)
    assert [s.path for s in val2] == [s.path for s in val]
    _, val3 = split_by_patient(shared.samples, 0.15, seed=1)
    assert [s.path for s in val3] != [s.path for s in val]


def test_ternary_labels(shared, chest_xray):
    ds = scan(chest_xray, labels="ternary")
    assert ds.label_names == LABEL_SETS["ternary"]
    c = Counter(s.label for s in ds.samples)
    assert c[0] == 1341 and c[1] + c[2] == 3875 and c[1] > c[2] > 1000


def test_class_layout_case_insensitive(tmp_path):
    _png(tmp_path / "normal" / "a.png")
    _png(tmp_path / "Pneumonia" / "person1_bacteria_1.png")
    ds = scan(tmp_path)
    assert ds.splits == []
    assert [(s.label, s.patient_id) for s in ds.samples] == [(0, "a"), (1, "person1")]


def test_split_layout_and_cross_split_duplicates(tmp_path):
    for split in ("train", "val", "test"):
        _png(tmp_path / split / "NORMAL" / f"IM-{split}-1.png", value=10 + len(split))
        _png(tmp_path / split / "PNEUMONIA" / f"person{len(split)}_virus_1.png", value=200)
    ds = scan(tmp_path)
    assert ds.splits == ["train", "val", "test"]
    assert len(ds.split("test")) == 2
    with pytest.raises(DuplicateAcrossSplitsError, match="more than one split"):
        check_no_cross_split_duplicates(ds)
    assert len(check_no_cross_split_duplicates(ds, allow=True)) == 1


def test_bad_layouts_are_clear_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match="not a folder"):
        scan(tmp_path / "missing")
    with pytest.raises(DatasetLayoutError, match="no class folders"):
        scan(tmp_path)
    _png(tmp_path / "NORMAL" / "a.png")
    (tmp_path / "PNEUMONIA").mkdir()
    with pytest.raises(DatasetLayoutError, match="holds no readable image"):
        scan(tmp_path)
    _png(tmp_path / "PNEUMONIA" / "b.png")
    _png(tmp_path / "NORMALS" / "c.png")
    with pytest.raises(DatasetLayoutError, match="NORMALS"):
        scan(tmp_path)
    shutil.rmtree(tmp_path / "NORMALS")
    shutil.rmtree(tmp_path / "PNEUMONIA")
    with pytest.raises(DatasetLayoutError, match="PNEUMONIA"):
        scan(tmp_path)


def test_empty_and_foreign_files_are_skipped_and_listed(tmp_path):
    _png(tmp_path / "NORMAL" / "a.png")
    _png(tmp_path / "PNEUMONIA" / "b.png")
    (tmp_path / "PNEUMONIA" / "empty.jpeg").write_bytes(b"")
    (tmp_path / "PNEUMONIA" / "notes.txt").write_text("hello")
    (tmp_path / "PNEUMONIA" / ".DS_Store").write_bytes(b"x")
    ds = scan(tmp_path)
    assert len(ds.samples) == 2
    reasons = {p.name: r for p, r in ds.skipped}
    assert set(reasons) == {"empty.jpeg", "notes.txt"}
    assert "0 bytes" in reasons["empty.jpeg"]


def test_val_fraction_validated(shared):
    with pytest.raises(DatasetLayoutError, match="val_fraction"):
        split_by_patient(shared.samples, 1.5)
