"""A real Orthanc on 127.0.0.1 for the DICOM tests: temporary config and storage, free ports, no remote access,
the DICOMweb plugin when installed; and the few helpers the tests share."""
from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pydicom

from tests.conftest import REPO, require_program

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
SR_CLASS, SC_CLASS = "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.7"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: exited with {proc.returncode}\n{log.read_text() if log else ''}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{what}: not ready after {timeout} s\n{log.read_text() if log else ''}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def orthanc(tmp: Path, modalities: dict | None = None, dicomweb: bool = False):
    """Yields (REST base URL, DICOM port); stopped on exit. ``dicomweb``: skip unless the plugin is installed."""
    exe = require_program("Orthanc", "orthanc", ["/usr/sbin/Orthanc"])
    if dicomweb and not DICOMWEB_PLUGIN.is_file():  # a plugin, not a program: the helper skips (or fails) as for one
        require_program(DICOMWEB_PLUGIN.name, "orthanc-dicomweb")
    dicom_port, http_port = free_port(), free_port()
    config = {
        "Name": "pneumoscope-test", "StorageDirectory": str(tmp / "storage"), "IndexDirectory": str(tmp / "storage"),
        "DicomAet": "ORTHANC", "DicomPort": dicom_port, "HttpPort": http_port, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "DicomModalities": modalities or {},
        "Plugins": [str(DICOMWEB_PLUGIN)] if DICOMWEB_PLUGIN.exists() else [],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (tmp / "orthanc.json").write_text(json.dumps(config))
    log = tmp / "orthanc.log"
    proc = subprocess.Popen([str(exe), str(tmp / "orthanc.json")], stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        http = f"http://127.0.0.1:{http_port}"
        wait_for(lambda: urllib.request.urlopen(http + "/system", timeout=2).status == 200, 30, "Orthanc", proc, log)
        yield http, dicom_port
    finally:
        stop(proc)


def orthanc_datasets(http: str) -> list[pydicom.Dataset]:
    ids = json.load(urllib.request.urlopen(http + "/instances", timeout=10))
    return [pydicom.dcmread(io.BytesIO(urllib.request.urlopen(f"{http}/instances/{i}/file", timeout=10).read()))
            for i in ids]


def upload(http: str, file: Path) -> None:
    """POST a file to Orthanc's REST API."""
    req = urllib.request.Request(http + "/instances", data=file.read_bytes(), method="POST",
                                 headers={"Content-Type": "application/dicom"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200, r.read()


def content(sr: pydicom.Dataset) -> dict[str, pydicom.Dataset]:
    """The SR's content items by concept code, at any depth of its content tree (the first of each code)."""
    out: dict[str, pydicom.Dataset] = {}

    def walk(items) -> None:
        for item in items:
            if "ConceptNameCodeSequence" in item:
                out.setdefault(item.ConceptNameCodeSequence[0].CodeValue, item)
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return out


def dciodvfy_errors(ds: pydicom.Dataset, tmp: Path) -> list[str]:
    """The error lines of dicom3tools' dciodvfy on ``ds`` (warnings are not errors)."""
    path = tmp / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    done = subprocess.run([str(require_program("dciodvfy", "dicom3tools")), str(path)], capture_output=True, text=True,
                          timeout=60, check=False)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


def tid1500(ds: pydicom.Dataset):
    """highdicom's own reading of a TID 1500 SR: its measurement groups (raises on a malformed SR)."""
    import highdicom as hd

    sr = hd.sr.ComprehensiveSR.from_dataset(ds)
    assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"  # root: Imaging Measurement Report
    return sr.content.get_image_measurement_groups()
