"""The DICOM node under bad peers (issue 25): a wrong called AE title, a malformed dataset, a stream cut in the
middle of a transfer, a forward target that is down (results kept and retried, nothing lost) and two modalities
sending at once. In-process: the Storage SCP with the session's tiny model, pynetdicom peers on 127.0.0.1."""
from __future__ import annotations

import socket
import struct
import threading
import time

import pydicom
import pytest

pynetdicom = pytest.importorskip("pynetdicom")
from pynetdicom import AE, evt  # noqa: E402
from pynetdicom.sop_class import (  # noqa: E402
    ComprehensiveSRStorage,
    DigitalXRayImageStorageForPresentation,
    Verification,
)

from tests.dicom.orthanc import free_port  # noqa: E402

CHEST = ["chest_dx_nih_no_finding.dcm", "chest_dx_nih_cardiomegaly.dcm"]


@pytest.fixture
def node(tiny_checkpoint, tmp_path):
    """Start a listener (kwargs of Listener); yields (start, tmp_path); everything is stopped afterwards."""
    from pneumoscope.dicom.listen import Listener
    from pneumoscope.inference.loader import load

    pred = load(tiny_checkpoint, device="cpu")
    started = []

    def start(**kw):
        port = free_port()
        listener = Listener(str(tmp_path / "studies.db"), pred, heatmaps=False, **kw)
        listener.start("127.0.0.1", port)
        started.append(listener)
        return listener, port

    yield start
    for listener in started:
        listener.close()


def _store(port: int, ds, calling: str = "MODALITY1", called: str = "PNEUMOSCOPE"):
    ae = AE(ae_title=calling)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def _echo(port: int, called: str = "PNEUMOSCOPE") -> bool:
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return False
    try:
        return int(assoc.send_c_echo().Status) == 0
    finally:
        assoc.release()


def _rows(listener) -> int:
    return listener.pipeline.db.counts()["predictions"]


def test_an_association_to_another_called_ae_title_is_refused(node):
    _, port = node()
    assert not _echo(port, called="SOMEONE_ELSE")
    assert _echo(port)


def test_a_malformed_dataset_fails_and_the_node_keeps_running(node, dicom_dir):
    listener, port = node()
    ds = pydicom.dcmread(dicom_dir / CHEST[0])
    ds.PixelData = ds.PixelData[:100]  # far fewer bytes than Rows x Columns
    assert _store(port, ds) == 0xC000
    ds = pydicom.dcmread(dicom_dir / CHEST[0])
    del ds.PixelData
    assert _store(port, ds) == 0xC000
    assert _rows(listener) == 0 and _echo(port)
    assert _store(port, pydicom.dcmread(dicom_dir / CHEST[0])) == 0 and _rows(listener) == 1


def test_a_stream_cut_mid_transfer_leaves_nothing_behind(node, dicom_dir):
    """An association whose P-DATA is cut after 200 of a promised 100,000 bytes, then a peer that sends garbage
    and hangs up: no row, no crash, the next store works."""
    listener, port = node()
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMOSCOPE")
    assert assoc.is_established
    raw = assoc.dul.socket.socket
    raw.sendall(struct.pack(">BBL", 0x04, 0, 100_000) + b"\x00" * 200)  # P-DATA-TF header, then a stub
    raw.close()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET / HTTP/1.1\r\n\r\n" + bytes(range(256)))
    time.sleep(0.5)
    assert _echo(port) and _rows(listener) == 0
    assert _store(port, pydicom.dcmread(dicom_dir / CHEST[0])) == 0 and _rows(listener) == 1


class Target:
    """A PACS stand-in that stores SRs (and counts them), started and stopped at will on a fixed port."""

    def __init__(self, port: int) -> None:
        self.port, self.received, self.server = port, [], None

    def start(self) -> None:
        ae = AE(ae_title="PACS")
        ae.add_supported_context(ComprehensiveSRStorage)
        ae.add_supported_context("1.2.840.10008.5.1.4.1.1.7")  # Secondary Capture

        def on_store(event):
            self.received.append(event.dataset.SOPInstanceUID)
            return 0x0000

        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])

    def stop(self) -> None:
        self.server.shutdown()


def test_results_for_a_target_that_is_down_are_kept_and_sent_when_it_is_back(node, dicom_dir, tmp_path):
    from pneumoscope.dicom.listen import Remote

    target = Target(free_port())
    outbox = tmp_path / "outbox"
    listener, port = node(forward=Remote("PACS", "127.0.0.1", target.port), outbox=outbox, retry_s=0.3)
    for name in CHEST:
        assert _store(port, pydicom.dcmread(dicom_dir / name)) == 0  # stored and predicted although PACS is down
    kept = sorted(p.stem for p in outbox.glob("*.dcm"))
    assert len(kept) == 2 and _rows(listener) == 2  # one SR each, on disk
    target.start()
    try:
        deadline = time.monotonic() + 20
        while list(outbox.glob("*.dcm")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sorted(target.received) == kept and not list(outbox.glob("*.dcm"))
    finally:
        target.stop()


def test_a_restart_sends_what_the_outbox_kept(node, dicom_dir, tmp_path):
    from pneumoscope.dicom.listen import Remote

    target = Target(free_port())
    outbox = tmp_path / "outbox"
    first, port = node(forward=Remote("PACS", "127.0.0.1", target.port), outbox=outbox, retry_s=60)
    assert _store(port, pydicom.dcmread(dicom_dir / CHEST[0])) == 0
    first.close()
    kept = [p.stem for p in outbox.glob("*.dcm")]
    assert len(kept) == 1
    target.start()
    try:
        node(forward=Remote("PACS", "127.0.0.1", target.port), outbox=outbox, retry_s=60)
        deadline = time.monotonic() + 20
        while not target.received and time.monotonic() < deadline:
            time.sleep(0.1)
        assert target.received == kept and not list(outbox.glob("*.dcm"))
    finally:
        target.stop()


def test_two_modalities_sending_at_once(node, dicom_dir):
    listener, port = node()
    statuses: dict[str, int] = {}

    def send(calling: str, name: str) -> None:
        statuses[calling] = _store(port, pydicom.dcmread(dicom_dir / name), calling=calling)

    threads = [threading.Thread(target=send, args=(f"MODALITY{i}", name)) for i, name in enumerate(CHEST)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert statuses == {"MODALITY0": 0, "MODALITY1": 0}
    counts = listener.pipeline.db.counts()
    assert counts["predictions"] == 2 and counts["studies"] == 2
