"""`pneumoscope dicom sync` against a real Orthanc with its DICOMweb plugin: the CR / DX images uploaded by the
REST API get a Comprehensive SR (STOW-RS) with the probability `pneumoscope predict` gives; the abdominal scout
(OT) is not queried; a second run adds nothing (the studies carry an SR of this model); --since in the future
finds nothing."""
from __future__ import annotations

import json
import subprocess
import sys

import pydicom
import pytest

from tests.conftest import REPO
from tests.dicom.orthanc import (
    ENV,
    SC_CLASS,
    SR_CLASS,
    content,
    dciodvfy_errors,
    orthanc,
    orthanc_datasets,
    tid1500,
    upload,
)

pytest.importorskip("dicomweb_client")
pytest.importorskip("highdicom")

FILES = ["chest_cr_jpeg_baseline_siim.dcm", "chest_dx_nih_no_finding.dcm", "abdomen_ot_scout.dcm"]


def run(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "pneumoscope", *args], cwd=REPO, env=ENV, capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_sync_stores_one_sr_per_image_and_is_idempotent(tmp_path, dicom_dir):
    with orthanc(tmp_path, dicomweb=True) as (http, _):
        for f in FILES:
            upload(http, dicom_dir / f)
        db = str(tmp_path / "studies.db")
        web = f"{http}/dicom-web"
        assert run("dicom", "sync", "--dicomweb", web, "--db", db, "--since", "29990101")["predicted"] == 0
        first = run("dicom", "sync", "--dicomweb", web, "--db", db)
        assert first["studies"] == 2 and first["predicted"] == 2 and first["skipped"] == 0, first
        received = orthanc_datasets(http)
        srs = [d for d in received if d.SOPClassUID == SR_CLASS]
        assert len(srs) == 2 and sum(d.SOPClassUID == SC_CLASS and d.get("Manufacturer") == "pneumoscope"
                                     for d in received) == first["stored"] - 2
        chest = [dicom_dir / f for f in FILES[:2]]
        expected = json.loads(subprocess.run([sys.executable, "-m", "pneumoscope", "predict", *map(str, chest),
                                              "--format", "json"], cwd=REPO, env=ENV, capture_output=True,
                                             text=True, check=True).stdout)
        for f, r in zip(chest, expected):
            src = pydicom.dcmread(f, force=True)
            sr = next(d for d in srs if d.StudyInstanceUID == src.StudyInstanceUID)
            p = r["calibrated_probability"] if r["calibrated_probability"] is not None else r["probability"]
            assert content(sr)["122157"].MeasuredValueSequence[0].FloatingPointValue == pytest.approx(p, abs=1e-6)
            assert content(sr)["233604007"].ConceptCodeSequence[0].CodeMeaning == {
                "PNEUMONIA": "Present", "NORMAL": "Absent"}.get(r["label"], "Presence Undetermined")
        for sr in srs:  # every SR of the sync: valid DICOM (dciodvfy) and a TID 1500 highdicom can read
            assert dciodvfy_errors(sr, tmp_path) == [], sr.SOPInstanceUID
            assert len(tid1500(sr)) == 1
        second = run("dicom", "sync", "--dicomweb", web, "--db", db)
        assert second["skipped"] == 2 and second["predicted"] == 0 and second["stored"] == 0, second
        assert len(orthanc_datasets(http)) == len(received)


def test_sync_killed_mid_run_resumes_without_duplicates(tmp_path, dicom_dir):
    """SIGKILL once the first SR is in the archive; the next run finishes the rest and stores nothing twice."""
    import signal
    import time

    with orthanc(tmp_path, dicomweb=True) as (http, _):
        for f in FILES:
            upload(http, dicom_dir / f)
        db, web = str(tmp_path / "studies.db"), f"{http}/dicom-web"
        proc = subprocess.Popen([sys.executable, "-m", "pneumoscope", "dicom", "sync", "--dicomweb", web, "--db", db],
                                cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        try:
            while time.time() < deadline and proc.poll() is None:
                if any(d.SOPClassUID == SR_CLASS for d in orthanc_datasets(http)):
                    break
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        before = [d for d in orthanc_datasets(http) if d.SOPClassUID == SR_CLASS]
        assert 1 <= len(before) <= 2
        again = run("dicom", "sync", "--dicomweb", web, "--db", db)
        assert again["skipped"] == len(before) and again["predicted"] == 2 - len(before), again
        srs = [d for d in orthanc_datasets(http) if d.SOPClassUID == SR_CLASS]
        assert len(srs) == 2 and len({d.StudyInstanceUID for d in srs}) == 2  # one SR per study, none twice
