"""The structured report: schema, threshold provenance, disclaimer, escaped self-contained HTML."""
from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest

from pneumoscope.serve.study_report import (
    DISCLAIMER,
    REPORT_SCHEMA,
    build_report,
    render_html,
)

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is_type(v, t: str) -> bool:
    if t == "integer":
        return isinstance(v, int) and not isinstance(v, bool)
    if t == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return isinstance(v, _TYPES[t])


def validate(instance, schema: dict, path: str = "$") -> list[str]:
    """The errors of ``instance`` against ``schema`` (``jsonschema`` when installed, else the subset of JSON
    Schema that REPORT_SCHEMA uses: type, const, enum, required, properties, additionalProperties, items,
    minimum, maximum, pattern)."""
    try:
        import jsonschema
    except ImportError:
        pass
    else:
        return [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(instance)]
    errors = []
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(instance, t) for t in types):
            return [f"{path}: {instance!r} is not of type {types}"]
    if "const" in schema and instance != schema["const"]:
        errors.append(f"{path}: {instance!r} != {schema['const']!r}")
    if "enum" in schema and instance not in schema["enum"]:
        errors.append(f"{path}: {instance!r} not in {schema['enum']}")
    if isinstance(instance, (int, float)) and not isinstance(instance, bool):
        if "minimum" in schema and instance < schema["minimum"]:
            errors.append(f"{path}: {instance} < {schema['minimum']}")
        if "maximum" in schema and instance > schema["maximum"]:
            errors.append(f"{path}: {instance} > {schema['maximum']}")
    if isinstance(instance, str) and "pattern" in schema and not re.search(schema["pattern"], instance):
        errors.append(f"{path}: {instance!r} does not match {schema['pattern']}")
    if isinstance(instance, dict):
        props = schema.get("properties", {})
        errors += [f"{path}: missing {k!r}" for k in schema.get("required", []) if k not in instance]
        if schema.get("additionalProperties") is False:
            errors += [f"{path}: unexpected {k!r}" for k in instance if k not in props]
        for k, v in instance.items():
            if k in props:
                errors += validate(v, props[k], f"{path}.{k}")
    if isinstance(instance, list) and "items" in schema:
        for i, v in enumerate(instance):
            errors += validate(v, schema["items"], f"{path}[{i}]")
    return errors


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


STUDY = {"id": "1.2.840.113619.2.1", "patient_id": "PAT-7", "pseudonymized": 0, "received": "2026-01-02T03:04:05+00:00",
         "sha256": "ab" * 32, "format": "DICOM", "modality": "DX", "manufacturer": "ACME", "device_model": "X1",
         "width": 1024, "height": 900, "warnings": []}
PREDICTION = {"probability": 0.61, "calibrated_probability": 0.83, "label": "PNEUMONIA", "label_from": "calibrated_probability",
              "threshold": 0.75, "created": "2026-01-02T03:04:06+00:00", "latency_ms": 41.5}
INFO = {"name": "seed_cnn", "version": "0.1.0", "checksum": "sha256:" + "0f" * 32,
        "threshold_info": {"method": "youden", "threshold": 0.75, "sensitivity": 0.9, "specificity": 0.8}}


def test_report_fields_and_schema():
    png = _png()
    rep = build_report(STUDY, PREDICTION, INFO, png, ["body part not recorded"],
                       [{"reviewer": "Dr A", "decision": "agree", "comment": "", "created": "2026-01-03T00:00:00+00:00"}])
    assert validate(rep, REPORT_SCHEMA) == []
    assert rep["patient"] == {"id": "PAT-7", "pseudonymized": False}
    assert rep["study"]["id"] == STUDY["id"]
    assert rep["study"]["image"] == {"url": f"/studies/{STUDY['id']}/image.png", "sha256": "ab" * 32,
                                     "width": 1024, "height": 900}
    assert rep["result"]["probability"] == 0.61 and rep["result"]["calibrated_probability"] == 0.83
    assert rep["result"]["label"] == "PNEUMONIA"
    assert rep["threshold"]["value"] == 0.75 and rep["threshold"]["applies_to"] == "calibrated_probability"
    assert rep["threshold"]["method"] == "youden" and "validation" in rep["threshold"]["chosen_on"]
    assert rep["threshold"]["validation_sensitivity"] == 0.9 and rep["threshold"]["validation_specificity"] == 0.8
    assert base64.b64decode(rep["heatmap"]["png_base64"]) == png
    assert rep["model"] == {"name": "seed_cnn", "version": "0.1.0", "checksum": INFO["checksum"]}
    assert rep["warnings"] == ["body part not recorded"]
    assert rep["reviews"][0]["decision"] == "agree"
    assert rep["disclaimer"] == DISCLAIMER
    assert DISCLAIMER == ("Decision support only: this result must be reviewed by a qualified radiologist; "
                          "it does not replace a radiologist's diagnosis.")


def test_report_without_calibration_heatmap_or_threshold_info():
    pred = {**PREDICTION, "calibrated_probability": None, "label": "NORMAL", "label_from": "probability", "threshold": 0.5}
    rep = build_report({**STUDY, "patient_id": None, "format": "JPEG", "modality": None}, pred,
                       {**INFO, "threshold_info": None}, None, [])
    assert validate(rep, REPORT_SCHEMA) == []
    assert rep["heatmap"] is None and rep["patient"]["id"] is None
    assert rep["threshold"]["applies_to"] == "probability"
    assert rep["threshold"]["chosen_on"] is None and rep["threshold"]["method"].startswith("default 0.5")


def test_prediction_model_fields_win_over_the_loaded_model():
    pred = {**PREDICTION, "model_name": "densenet121", "model_version": "0.0.9", "model_checksum": "sha256:" + "1a" * 32,
            "threshold_info": {"method": "sensitivity:0.95", "sensitivity": 0.95, "specificity": 0.6}}
    rep = build_report(STUDY, pred, INFO, None, [])
    assert rep["model"]["name"] == "densenet121" and rep["model"]["checksum"] == "sha256:" + "1a" * 32
    assert rep["threshold"]["method"] == "sensitivity:0.95"
    assert rep["threshold"]["chosen_on"].startswith("validation split of the training data")


def test_an_adapted_models_threshold_says_where_it_was_chosen():
    site = {"method": "specificity:0.9", "sensitivity": 0.7, "specificity": 0.9,
            "chosen_on": "out-of-fold predictions on the site's own labelled films (pneumoscope adapt)"}
    rep = build_report(STUDY, {**PREDICTION, "threshold_info": site}, INFO, None, [])
    assert validate(rep, REPORT_SCHEMA) == []
    assert rep["threshold"]["chosen_on"] == site["chosen_on"] and rep["threshold"]["method"] == "specificity:0.9"


@pytest.mark.parametrize("bad", [
    lambda r: r["result"].__setitem__("probability", 1.5),
    lambda r: r.__setitem__("disclaimer", "trust me"),
    lambda r: r["model"].__setitem__("checksum", "md5:123"),
    lambda r: r.pop("warnings"),
    lambda r: r.__setitem__("extra", 1),
])
def test_schema_rejects_bad_reports(bad):
    rep = build_report(STUDY, PREDICTION, INFO, None, [])
    bad(rep)
    assert validate(rep, REPORT_SCHEMA) != []


def test_html_escapes_everything_and_has_no_external_assets():
    evil = '<script>alert("x")</script>'
    rep = build_report({**STUDY, "id": "s1", "manufacturer": evil}, PREDICTION, INFO, _png(), [evil],
                       [{"reviewer": evil, "decision": "disagree", "comment": "a & b <i>", "created": "t"}])
    page = render_html(rep)
    assert "<script" not in page.lower()
    assert page.count("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;") == 3  # device, warning, reviewer
    assert "a &amp; b &lt;i&gt;" in page
    assert DISCLAIMER.replace("'", "&#x27;") in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert 'src="data:image/png;base64,' in page
    assert "PNEUMONIA" in page and "0.830" in page and "youden" in page
