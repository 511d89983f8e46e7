"""End to end with real programs: Orthanc (a PACS), dcmtk's storescu / echoscu, and `pneumoscope dicom listen`
as a subprocess. Chest radiographs stored on the listener come back to Orthanc as a Comprehensive SR (with the
probability `pneumoscope predict` gives for the file) and, when assessed, a Grad-CAM Secondary Capture; the
abdominal scout (modality OT) is refused and logged; an AE title not allowed is rejected; a dataset without
pixel data fails its C-STORE and the listener keeps answering."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from tests.conftest import REPO, require_program
from tests.dicom.orthanc import (
    ENV,
    SC_CLASS,
    SR_CLASS,
    content,
    dciodvfy_errors,
    free_port,
    orthanc,
    orthanc_datasets,
    stop,
    tid1500,
    wait_for,
)

pynetdicom = pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")

CHEST = ["chest_cr_jpeg_baseline_siim.dcm", "chest_cr_jpeg_monochrome1_relabelled.dcm",
         "chest_cr_monochrome1_10bit_no_meta.dcm", "chest_dx_nih_no_finding.dcm", "chest_dx_nih_cardiomegaly.dcm"]
REFUSED = "abdomen_ot_scout.dcm"


def echo(port: int, calling: str = "TESTSCU") -> bool:
    ae = pynetdicom.AE(ae_title=calling)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMOSCOPE")
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, dicom_dir):
    storescu = require_program("storescu", "dcmtk", ["/usr/bin/storescu"])
    echoscu = require_program("echoscu", "dcmtk", ["/usr/bin/echoscu"])
    tmp = tmp_path_factory.mktemp("pacs")
    listen_port = free_port()
    with orthanc(tmp, {"pneumoscope": ["PNEUMOSCOPE", "127.0.0.1", listen_port]}) as (http, dicom_port):
        llog, db = tmp / "listen.log", tmp / "studies.db"
        listener = subprocess.Popen(
            [sys.executable, "-m", "pneumoscope", "dicom", "listen", "--host", "127.0.0.1", "--port", str(listen_port),
             "--db", str(db), "--allow-ae", "TESTSCU,STORESCU", "--forward-to", f"ORTHANC@127.0.0.1:{dicom_port}"],
            cwd=REPO, env=ENV, stdout=llog.open("w"), stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: echo(listen_port), 60, "pneumoscope dicom listen", listener, llog)
            yield {"http": http, "port": listen_port, "log": llog, "db": db, "storescu": storescu,
                   "echoscu": echoscu, "dicom_dir": dicom_dir, "listener": listener, "tmp": tmp}
        finally:
            stop(listener)


# storescu proposes only uncompressed syntaxes unless told which compressed one the file is in
PROPOSE = {"1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2.4.70": "-xs", "1.2.840.10008.1.2.4.57": "-xs"}


def store(pacs, file: Path) -> subprocess.CompletedProcess:
    ds = pydicom.dcmread(file, force=True, stop_before_pixels=True)
    flag = PROPOSE.get(str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", "")), "-x=")
    return subprocess.run([str(pacs["storescu"]), flag, "-aet", "STORESCU", "-aec", "PNEUMOSCOPE", "127.0.0.1",
                           str(pacs["port"]), str(file)], capture_output=True, text=True, timeout=60, check=False)


def test_chest_radiographs_come_back_as_sr_and_secondary_capture(pacs):
    files = [pacs["dicom_dir"] / f for f in CHEST]
    for f in [*files, files[0]]:  # the first one twice: one study
        done = store(pacs, f)
        assert done.returncode == 0, done.stdout + done.stderr
    store(pacs, pacs["dicom_dir"] / REFUSED)
    expected = json.loads(subprocess.run([sys.executable, "-m", "pneumoscope", "predict", *map(str, files),
                                          "--format", "json"], cwd=REPO, env=ENV, capture_output=True, text=True,
                                         check=True).stdout)
    received = orthanc_datasets(pacs["http"])
    log = pacs["log"].read_text()
    srs = [d for d in received if d.SOPClassUID == SR_CLASS]
    scs = [d for d in received if d.SOPClassUID == SC_CLASS and d.get("Manufacturer") == "pneumoscope"]
    for f, r in zip(files, expected):
        src = pydicom.dcmread(f, force=True)
        # the SRs of this source instance (the two SIIM files share one SOP Instance UID: told apart by value)
        mine = [content(d) for d in srs if d.StudyInstanceUID == src.StudyInstanceUID and content(d)["121112"]
                .ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID]
        assert mine, f"{f.name}: no SR in Orthanc\n{log}"
        p = r["calibrated_probability"] if r["calibrated_probability"] is not None else r["probability"]
        items = [i for i in mine if i["122157"].MeasuredValueSequence[0].FloatingPointValue == pytest.approx(p, abs=1e-6)]
        assert items, (f.name, p, [i["122157"].MeasuredValueSequence[0].FloatingPointValue for i in mine])
        finding = items[0]["233604007"].ConceptCodeSequence[0].CodeMeaning  # the qualitative evaluation Pneumonia
        assert finding == {"PNEUMONIA": "Present", "NORMAL": "Absent"}.get(r["label"], "Presence Undetermined"), f.name
        from pneumoscope.inference.loader import load

        info = load(None, device="cpu").info  # the listener runs the bundled model: TID 4019 names it
        assert (items[0]["111001"].TextValue, items[0]["111002"].TextValue) == (info["name"], f"checksum {info['checksum']}")
    assert len(srs) == len(CHEST) + 1  # the file sent twice: predicted (and its SR sent) twice, one study
    for d in srs:  # every SR the listener produced: valid DICOM (dciodvfy) and a TID 1500 highdicom can read
        assert dciodvfy_errors(d, pacs["tmp"]) == [], d.SOPInstanceUID
        groups = tid1500(d)
        assert len(groups) == 1 and groups[0].finding_type.value == "233604007"
        assert {m.name.value for m in groups[0].get_measurements()} >= {"122157", "122411"}
    for d in srs + scs:
        assert "not for primary diagnosis" in d.SeriesDescription
        assert d.SeriesInstanceUID not in {pydicom.dcmread(f, force=True).get("SeriesInstanceUID") for f in files}
    shown = [r["label"] == "PNEUMONIA" for r in [*expected, expected[0]]]
    assert len(scs) == sum(shown), log  # a Grad-CAM Secondary Capture only for a film labelled PNEUMONIA
    assert all(d.Rows > d.Columns for d in scs)  # the square overlay plus its caption band (label, legend)
    assert all("not for primary diagnosis" in d.ImageComments and d.pixel_array.ndim == 3 for d in scs)
    from pneumoscope.studydb.db import StudyDB

    db = StudyDB(pacs["db"])
    try:
        counts = db.counts()
    finally:
        db.close()
    assert counts["studies"] == len(CHEST) and counts["predictions"] == len(CHEST) + 1, counts
    ot = pydicom.dcmread(pacs["dicom_dir"] / REFUSED, force=True)
    assert not [d for d in received if d.StudyInstanceUID == ot.StudyInstanceUID and d.SOPClassUID == SR_CLASS]
    assert f"refused {ot.SOPInstanceUID}" in log and "modality OT is not a radiograph" in log


def test_an_ae_title_not_allowed_is_rejected(pacs):
    def run(aet):
        return subprocess.run([str(pacs["echoscu"]), "-aet", aet, "-aec", "PNEUMOSCOPE", "127.0.0.1",
                               str(pacs["port"])], capture_output=True, text=True, timeout=30, check=False)
    assert run("INTRUDER").returncode != 0
    assert run("TESTSCU").returncode == 0


def test_a_dataset_without_pixel_data_fails_and_the_listener_keeps_running(pacs):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1", generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.Rows, ds.Columns = "CR", "NOPIXELS", 64, 64
    ae = pynetdicom.AE(ae_title="TESTSCU")
    ae.add_requested_context(ds.SOPClassUID, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", pacs["port"], ae_title="PNEUMOSCOPE")
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status in (0xC000, 0xA900), hex(status.Status)
    assert echo(pacs["port"]) and pacs["listener"].poll() is None
    assert f"refused {ds.SOPInstanceUID}" in pacs["log"].read_text()
