"""``pneumoscope dicom listen``: a DICOM Storage SCP (pynetdicom) that predicts every radiograph it receives.

C-ECHO, and C-STORE of CR, DX (for presentation / processing) and Secondary Capture images in the usual transfer
syntaxes. Each received dataset is decoded, predicted and recorded exactly as an upload to the HTTP service
(``data.intake.from_dataset``: the parsed dataset, decoded once; the same ``Predictor``, the same study database:
one study per image);
with ``forward`` the SR and the Grad-CAM Secondary Capture (results.py) are C-STOREd to a remote AE through an
on-disk outbox (outbox.py: kept and retried while the target is down).

Security: an association whose called AE title is not this listener's is rejected; with ``allowed_aes`` only
those calling AE titles may associate (``require_calling_aet``; others are rejected at association); an AE title
is no authentication, so also keep the port on a trusted network.
Refused inputs (another modality, no pixel data, a malformed dataset) are logged as ``refused`` and answered
with a failure status (0xC000 "cannot understand"); the listener keeps running.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import (
    JPEG2000,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    Verification,
)

from pneumoscope.data.intake import from_dataset
from pneumoscope.dicom.outbox import Outbox
from pneumoscope.dicom.results import model_identity, result_datasets
from pneumoscope.errors import ImageReadError
from pneumoscope.inference.loader import load
from pneumoscope.inference.predictor import Predictor
from pneumoscope.inference.worker import ModelWorker
from pneumoscope.studydb.db import ModelRecord, StudyDB
from pneumoscope.studydb.records import heatmap_overlay, prediction_record, upload_of

log = logging.getLogger(__name__)

STORAGE_CLASSES = (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
                   DigitalXRayImageStorageForProcessing, SecondaryCaptureImageStorage)
# compressed first: pynetdicom accepts the first of these the sender proposes, and a sender that would otherwise
# have to decompress (dcmtk's storescu -R proposes the file's syntax and the uncompressed ones) sends the
# original pixel data, decoded here exactly as `pneumoscope predict` decodes the file
TRANSFER_SYNTAXES = [JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEG2000Lossless, JPEG2000,
                     RLELossless, ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
CANNOT_UNDERSTAND = 0xC000
SUCCESS = 0x0000


@dataclass(frozen=True)
class Remote:
    """A remote AE: ``AET@HOST:PORT``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Remote:
        aet, sep, rest = text.partition("@")
        host, _, port = rest.rpartition(":")
        if not sep or not aet or not host or not port.isdigit():
            raise ValueError(f"{text!r}: expected AET@HOST:PORT, e.g. ORTHANC@127.0.0.1:4242")
        return cls(aet, host, int(port))


PIXEL_KEYS = ("SOPInstanceUID", "Rows", "Columns", "BitsStored", "PhotometricInterpretation", "RescaleSlope",
              "RescaleIntercept", "WindowCenter", "WindowWidth", "PixelRepresentation")


def _pixel_digest(ds) -> str:
    """The study key of a received instance: sha256 of its pixel data and the attributes that say how to read it
    (the same image sent twice is one study; the dataset is not encoded again to hash its file)."""
    h = hashlib.sha256("|".join(str(ds.get(k, "")) for k in PIXEL_KEYS).encode())
    h.update(bytes(ds.get("PixelData", b"") or b""))
    return h.hexdigest()


class Pipeline:
    """Decode, predict, record one received dataset; build its SR and Secondary Capture (listen and sync).
    ``checkpoint``: a path, None for the bundled model, or a loaded ``Predictor``."""

    def __init__(self, db_path: str, checkpoint=None, device: str = "auto", heatmaps: bool = True) -> None:
        self.predictor = checkpoint if isinstance(checkpoint, Predictor) else load(checkpoint, device=device)
        self.model = ModelRecord.of(self.predictor.info)
        self.db = StudyDB(db_path)
        self.heatmaps = heatmaps
        from pneumoscope.trust.explain import heatmaps as heatmap_fn

        # the service's model worker: concurrent associations share one model thread, batched
        self.worker = ModelWorker(self.predictor, heatmap_fn=heatmap_fn)

    @property
    def model_identity(self) -> tuple[str, str, str]:
        return model_identity(self.predictor.info)

    def process(self, ds, sop_uid: str, source: str) -> list:
        """The SR (and Secondary Capture) of ``ds``, after its prediction is stored. Raises ImageReadError (not a
        radiograph, no pixel data, malformed)."""
        t0 = time.perf_counter()
        u = upload_of(from_dataset(ds, f"{sop_uid}.dcm", self.predictor.preprocess.input_size),
                      _pixel_digest(ds), None)  # the parsed dataset, decoded once (data/intake.py)
        scored = self.worker.submit([u.model_u8], heatmaps=self.heatmaps, quality=[u.quality]).result()[0]
        r = scored.prediction
        if r.error is not None:
            raise ImageReadError(r.error)
        if scored.heat_error:
            log.warning("%s: %s", sop_uid, scored.heat_error)
        png = None if scored.heat is None else heatmap_overlay(u.view_u8, scored.heat)  # HEATMAP_RULE applied there
        latency_ms = (time.perf_counter() - t0) * 1000.0
        stored = self.db.add_predictions([prediction_record(u, r, latency_ms, png)], self.model)[0]
        log.info("predicted %s from %s: %s, probability %.4f (study %s%s)", sop_uid, source, r.label,
                 r.score, stored["study_id"], ", received before" if stored["duplicate"] else "")
        return result_datasets(ds, r, self.predictor.info, png)

    def close(self) -> None:
        self.worker.close()
        self.db.close()


class Listener:
    """The Storage SCP around a ``Pipeline``."""

    def __init__(self, db_path: str, checkpoint=None, ae_title: str = "PNEUMOSCOPE", forward: Remote | None = None,
                 allowed_aes: list[str] | None = None, device: str = "auto", heatmaps: bool = True,
                 outbox: str | Path | None = None, retry_s: float = 30.0) -> None:
        """``outbox``: where results wait for ``forward`` (default: beside a SQLite ``db_path``, else
        ./pneumoscope-outbox); retried every ``retry_s`` seconds (dicom/outbox.py)."""
        self.pipeline = Pipeline(db_path, checkpoint, device=device, heatmaps=heatmaps)
        self.ae_title, self.forward = ae_title, forward
        self.outbox = None
        if forward is not None:
            folder = outbox or (Path(f"{db_path}.outbox") if "://" not in str(db_path) else Path("pneumoscope-outbox"))
            self.outbox = Outbox(folder, forward.ae_title, forward.host, forward.port, ae_title, retry_s)
        self.ae = AE(ae_title=ae_title)
        self.ae.require_called_aet = True  # an association addressed to another AE title is rejected
        self.ae.add_supported_context(Verification)
        for uid in STORAGE_CLASSES:
            self.ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        if allowed_aes:
            self.ae.require_calling_aet = list(allowed_aes)
        self._server = None
        self._closed = False

    def start(self, host: str, port: int, block: bool = False):
        handlers = [(evt.EVT_C_STORE, self.on_store), (evt.EVT_C_ECHO, lambda event: SUCCESS)]
        m = self.pipeline.model
        log.info("DICOM listener %s on %s:%d (model %s %s); study database %s; forwarding to %s", self.ae_title,
                 host, port, m.name, m.version, self.pipeline.db.path, self.forward or "nobody")
        if self.outbox is not None:
            self.outbox.start()  # also sends what an earlier run left in the outbox
        self._server = self.ae.start_server((host, port), block=block, evt_handlers=handlers)
        return self._server

    def close(self) -> None:
        """Stop serving, stop the outbox's retries, close the database (once; a second call does nothing)."""
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.shutdown()
        if self.outbox is not None:
            self.outbox.close()
        self.pipeline.close()

    def on_store(self, event) -> int:
        """EVT_C_STORE: decode, predict, record, forward. Never raises: a failure is a status."""
        calling = event.assoc.requestor.ae_title
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            sop_uid = str(ds.get("SOPInstanceUID", "unknown"))
        except Exception as e:  # noqa: BLE001 - a dataset pydicom cannot even parse
            log.warning("refused a C-STORE from %s: malformed dataset (%s)", calling, e)
            return CANNOT_UNDERSTAND
        try:
            out = self.pipeline.process(ds, sop_uid, calling)
        except ImageReadError as e:
            log.warning("refused %s from %s: %s", sop_uid, calling, e)
            return CANNOT_UNDERSTAND
        except Exception:  # the listener keeps running
            log.exception("refused %s from %s: unexpected error", sop_uid, calling)
            return CANNOT_UNDERSTAND
        if self.outbox is not None:
            self.outbox.put(out)  # on disk first: a target that is down loses nothing
            self.outbox.flush()
        return SUCCESS
