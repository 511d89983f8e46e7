"""The structured report of one study: a JSON document (``REPORT_SCHEMA``) and a self-contained HTML page.

``build_report`` assembles it from the study, its prediction, the model and the Grad-CAM overlay;
``render_html`` renders it with every value escaped and no external asset (the heatmap is a data: URI).
"""
from __future__ import annotations

import base64
import html
from datetime import datetime, timezone

SCHEMA_VERSION = "1.0"
DISCLAIMER = ("Decision support only: this result must be reviewed by a qualified radiologist; "
              "it does not replace a radiologist's diagnosis.")

_STR_OR_NULL = {"type": ["string", "null"]}
_NUM_OR_NULL = {"type": ["number", "null"]}
_PROB = {"type": "number", "minimum": 0, "maximum": 1}

REPORT_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://pneumoscope.invalid/schemas/study-report-1.0.json",
    "title": "pneumoscope study report",
    "type": "object",
    "additionalProperties": False,
    "required": ["schema_version", "generated", "patient", "study", "result", "threshold", "heatmap", "model",
                 "warnings", "reviews", "disclaimer"],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "generated": {"type": "string", "description": "ISO 8601 UTC time the report was built"},
        "patient": {
            "type": "object", "additionalProperties": False, "required": ["id", "pseudonymized"],
            "properties": {
                "id": {**_STR_OR_NULL, "description": "DICOM PatientID, its keyed hash, or null (JPEG/PNG)"},
                "pseudonymized": {"type": "boolean"},
            },
        },
        "study": {
            "type": "object", "additionalProperties": False,
            "required": ["id", "received", "format", "modality", "manufacturer", "device_model", "image"],
            "properties": {
                "id": {"type": "string", "description": "StudyInstanceUID (or its keyed hash) or a generated id"},
                "received": {"type": "string"},
                "format": {"enum": ["JPEG", "PNG", "DICOM"]},
                "modality": _STR_OR_NULL,
                "manufacturer": _STR_OR_NULL,
                "device_model": _STR_OR_NULL,
                "image": {
                    "type": "object", "additionalProperties": False,
                    "required": ["url", "sha256", "width", "height"],
                    "properties": {
                        "url": {"type": "string", "description": "the viewer copy (PNG) of the image"},
                        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$",
                                   "description": "SHA-256 of the uploaded file"},
                        "width": {"type": "integer", "minimum": 1},
                        "height": {"type": "integer", "minimum": 1},
                    },
                },
            },
        },
        "result": {
            "type": "object", "additionalProperties": False,
            "required": ["probability", "calibrated_probability", "label", "label_from", "positive_label", "predicted"],
            "properties": {
                "probability": {**_PROB, "description": "raw model probability of pneumonia"},
                "calibrated_probability": {"type": ["number", "null"], "minimum": 0, "maximum": 1,
                                           "description": "sigmoid(logit / T + b), T and b fitted on validation "
                                                          "data; null when not calibrated"},
                "label": {"type": "string", "description": "label at the decision threshold"},
                "label_from": {"enum": ["calibrated_probability", "probability"],
                               "description": "the probability the label comes from (compared with the threshold)"},
                "positive_label": {"const": "PNEUMONIA"},
                "predicted": {"type": "string"},
                "latency_ms": _NUM_OR_NULL,
            },
        },
        "threshold": {
            "type": "object", "additionalProperties": False,
            "required": ["value", "applies_to", "method", "chosen_on"],
            "properties": {
                "value": _PROB,
                "applies_to": {"enum": ["calibrated_probability", "probability"]},
                "method": {"type": "string", "description": "e.g. youden, sensitivity:0.95, specificity:0.9, or a default"},
                "chosen_on": _STR_OR_NULL,
                "validation_sensitivity": _NUM_OR_NULL,
                "validation_specificity": _NUM_OR_NULL,
            },
        },
        "heatmap": {
            "type": ["object", "null"], "additionalProperties": False,
            "required": ["method", "media_type", "png_base64"],
            "properties": {
                "method": {"const": "Grad-CAM"},
                "media_type": {"const": "image/png"},
                "png_base64": {"type": "string", "description": "the image blended with the heatmap"},
            },
        },
        "model": {
            "type": "object", "additionalProperties": False, "required": ["name", "version", "checksum"],
            "properties": {"name": {"type": "string"}, "version": _STR_OR_NULL,
                           "checksum": {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"}},
        },
        "warnings": {"type": "array", "items": {"type": "string"}},
        "reviews": {
            "type": "array",
            "items": {
                "type": "object", "additionalProperties": False,
                "required": ["reviewer", "decision", "comment", "time"],
                "properties": {"reviewer": {"type": "string"}, "decision": {"enum": ["agree", "disagree"]},
                               "comment": {"type": "string"}, "time": {"type": "string"}},
            },
        },
        "disclaimer": {"const": DISCLAIMER},
    },
}


def _threshold(prediction: dict, model_info: dict) -> dict:
    info = prediction.get("threshold_info") or model_info.get("threshold_info")
    out = {"value": float(prediction["threshold"]), "applies_to": prediction["label_from"]}
    if info:
        out.update(method=str(info.get("method", "unknown")),
                   chosen_on=str(info.get("chosen_on") or "validation split of the training data (patient-level), "
                                                             "never the test data"),
                   validation_sensitivity=info.get("sensitivity"), validation_specificity=info.get("specificity"))
    else:
        out.update(method="default 0.5: the checkpoint stores no chosen threshold", chosen_on=None)
    return out


def build_report(study: dict, prediction: dict, model_info: dict, heatmap_png: bytes | None,
                 warnings: list[str], reviews: list[dict] | None = None) -> dict:
    """The report of ``study`` (a ``StudyDB.study`` row) and its ``prediction`` (a ``StudyDB.latest_prediction``
    row, or a dict with probability, calibrated_probability, label, label_from, threshold, created): the label and
    the probability it comes from are the predictor's (``Prediction``), stored, never re-derived here.

    ``model_info``: ``name, version, checksum`` and ``threshold_info`` (``Predictor.info``); the prediction's own
    ``model_*`` / ``threshold_info`` fields win when present, so an old prediction keeps the model that made it.
    """
    calibrated = prediction.get("calibrated_probability")
    return {
        "schema_version": SCHEMA_VERSION,
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "patient": {"id": study.get("patient_id"), "pseudonymized": bool(study.get("pseudonymized", False))},
        "study": {
            "id": study["id"], "received": study["received"], "format": study["format"],
            "modality": study.get("modality"), "manufacturer": study.get("manufacturer"),
            "device_model": study.get("device_model"),
            "image": {"url": f"/studies/{study['id']}/image.png", "sha256": study["sha256"],
                      "width": int(study["width"]), "height": int(study["height"])},
        },
        "result": {
            "probability": float(prediction["probability"]),
            "calibrated_probability": None if calibrated is None else float(calibrated),
            "label": prediction["label"], "positive_label": "PNEUMONIA",
            "label_from": prediction["label_from"],
            "predicted": prediction.get("created") or study["received"],
            "latency_ms": prediction.get("latency_ms"),
        },
        "threshold": _threshold(prediction, model_info),
        "heatmap": None if heatmap_png is None else {
            "method": "Grad-CAM", "media_type": "image/png",
            "png_base64": base64.b64encode(heatmap_png).decode("ascii")},
        "model": {"name": prediction.get("model_name") or model_info["name"],
                  "version": prediction.get("model_version") or model_info.get("version"),
                  "checksum": prediction.get("model_checksum") or model_info["checksum"]},
        "warnings": [str(w) for w in warnings],
        "reviews": [{"reviewer": r["reviewer"], "decision": r["decision"], "comment": r.get("comment") or "",
                     "time": r["created"]} for r in (reviews or [])],
        "disclaimer": DISCLAIMER,
    }


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def render_html(report: dict) -> str:
    """A self-contained HTML page of ``report`` (every value escaped; no scripts, no external assets)."""
    e = lambda v: html.escape(_fmt(v), quote=True)  # noqa: E731
    s, r, t, m = report["study"], report["result"], report["threshold"], report["model"]
    rows = [
        ("Patient", (report["patient"]["id"] or "not recorded")
         + (" (pseudonymised)" if report["patient"]["pseudonymized"] else "")),
        ("Study", s["id"]), ("Received", s["received"]), ("Format", s["format"]), ("Modality", s["modality"]),
        ("Device", " ".join(x for x in (s["manufacturer"], s["device_model"]) if x) or None),
        ("Image SHA-256", s["image"]["sha256"]), ("Image size", f"{s['image']['width']} x {s['image']['height']} px"),
        ("Raw model probability" + (" (the label uses this)" if r["label_from"] == "probability" else ""),
         r["probability"]),
        ("Calibrated probability" + (" (the label uses this)" if r["label_from"] != "probability" else ""),
         r["calibrated_probability"]),
        ("Threshold", f"{t['value']:.3f} on the {t['applies_to'].replace('_', ' ')}"),
        ("Threshold method", t["method"]), ("Threshold chosen on", t["chosen_on"]),
        ("Model", f"{m['name']} {m['version'] or ''}".strip()), ("Model checksum", m["checksum"]),
        ("Predicted", r["predicted"]),
    ]
    table = "\n".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rows)
    warnings = "".join(f"<li>{e(w)}</li>" for w in report["warnings"]) or "<li>none</li>"
    reviews = "".join(f"<li>{e(v['time'])}: {e(v['reviewer'])} <b>{e(v['decision'])}</b>"
                      + (f" &mdash; {e(v['comment'])}" if v["comment"] else "") + "</li>"
                      for v in report["reviews"]) or "<li>not reviewed yet</li>"
    heat = report["heatmap"]
    figure = ("<p>No heatmap was computed for this prediction.</p>" if heat is None else
              f'<figure><img alt="Grad-CAM heatmap over the X-ray" src="data:image/png;base64,{e(heat["png_base64"])}">'
              "<figcaption>Grad-CAM: the regions that drive the score, not a delineation of disease.</figcaption></figure>")
    label_class = {"PNEUMONIA": "pos", "NORMAL": "neg"}.get(r["label"], "na")  # "not assessed": no diagnosis
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>pneumoscope report {e(s['id'])}</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}}
table{{border-collapse:collapse}} th,td{{text-align:left;padding:.25rem .75rem;border-bottom:1px solid #ddd;vertical-align:top}}
th{{font-weight:600;white-space:nowrap}} td{{word-break:break-all}} img{{max-width:100%;max-height:32rem}}
.label{{font-size:1.5rem;font-weight:700}} .pos{{color:#b00020}} .neg{{color:#1b5e20}} .na{{color:#5f6368;font-style:italic}}
.disclaimer{{border:2px solid #b00020;padding:.75rem;font-weight:600}}
</style></head><body>
<h1>Chest X-ray: pneumonia decision support</h1>
<p class="disclaimer">{e(report['disclaimer'])}</p>
<p class="label {label_class}">{e(r['label'])}</p>
<table>
{table}
</table>
<h2>Heatmap</h2>
{figure}
<h2>Warnings</h2>
<ul>{warnings}</ul>
<h2>Reviews</h2>
<ul>{reviews}</ul>
<p><small>Report schema {e(report['schema_version'])}, generated {e(report['generated'])}.</small></p>
</body></html>
"""
