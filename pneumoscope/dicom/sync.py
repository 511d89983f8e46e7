"""``pneumoscope dicom sync``: pull CR / DX series from a DICOMweb archive (QIDO-RS, WADO-RS), predict each
image through the listener's ``Pipeline`` (same decoding, model, study database) and STOW-RS the SR and the
Grad-CAM Secondary Capture back. Idempotent: a study that already carries a pneumoscope SR of the same model
(name, version and checksum) is skipped, so a second run adds nothing."""
from __future__ import annotations

import logging

from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from pneumoscope.dicom.listen import Pipeline
from pneumoscope.dicom.results import MANUFACTURER
from pneumoscope.errors import ImageReadError

log = logging.getLogger(__name__)

MODALITIES = ("CR", "DX")
STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"


def _value(item: dict, tag: str) -> str | None:
    v = item.get(tag, {}).get("Value")
    return str(v[0]) if v else None


ALGORITHM_NAME, ALGORITHM_VERSION, ALGORITHM_PARAMETERS = "111001", "111003", "111002"  # TID 4019 (DCM)


def algorithms(ds: Dataset) -> set[tuple[str, str, str]]:
    """(name, version, parameters) of every TID 4019 algorithm identification anywhere in an SR's content tree."""
    found = set()

    def walk(items) -> None:
        texts: dict[str, str] = {}
        for item in items:
            code = item.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in item else None
            if item.get("ValueType") == "TEXT" and code in (ALGORITHM_NAME, ALGORITHM_VERSION, ALGORITHM_PARAMETERS):
                texts.setdefault(code, str(item.get("TextValue", "")))
            walk(item.get("ContentSequence", []))
        if ALGORITHM_NAME in texts:
            found.add((texts[ALGORITHM_NAME], texts.get(ALGORITHM_VERSION, ""), texts.get(ALGORITHM_PARAMETERS, "")))

    walk(ds.get("ContentSequence", []))
    return found


def _assessed_by(client: DICOMwebClient, study_uid: str, identity: tuple[str, str, str]) -> bool:
    """Whether the study holds a pneumoscope SR whose algorithm (name, version, checksum) is ``identity``."""
    for series in client.search_for_series(study_uid, search_filters={"Modality": "SR"}):
        for meta in client.retrieve_series_metadata(study_uid, _value(series, SERIES_UID)):
            ds = Dataset.from_json(meta)
            if ds.get("Manufacturer") == MANUFACTURER and identity in algorithms(ds):
                return True
    return False


def sync(pipeline: Pipeline, url: str, since: str | None = None) -> dict:
    """One pass over the archive; counts of studies found, skipped (already assessed), images predicted,
    refused, and objects stored."""
    client = DICOMwebClient(url=url)
    done = {"studies": 0, "skipped": 0, "predicted": 0, "refused": 0, "stored": 0}
    series_of: dict[str, list[str]] = {}
    for modality in MODALITIES:
        filters = {"Modality": modality}
        if since:
            filters["StudyDate"] = f"{since.replace('-', '')}-"
        for s in client.search_for_series(search_filters=filters):
            series_of.setdefault(_value(s, STUDY_UID), []).append(_value(s, SERIES_UID))
    for study_uid, series in sorted(series_of.items()):
        done["studies"] += 1
        if _assessed_by(client, study_uid, pipeline.model_identity):
            done["skipped"] += 1
            log.info("study %s: already assessed by %s, skipped", study_uid, " ".join(pipeline.model_identity))
            continue
        out: list[Dataset] = []
        for series_uid in series:
            for inst in client.search_for_instances(study_uid, series_uid):
                sop_uid = _value(inst, SOP_UID)
                ds = client.retrieve_instance(study_uid, series_uid, sop_uid, media_types=(("application/dicom", "*"),))
                try:
                    out += pipeline.process(ds, sop_uid, url)
                    done["predicted"] += 1
                except ImageReadError as e:
                    done["refused"] += 1
                    log.warning("refused %s: %s", sop_uid, e)
        if out:
            client.store_instances(out, study_uid)
            done["stored"] += len(out)
    log.info("sync %s: %s", url, done)
    return done
