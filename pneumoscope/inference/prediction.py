"""``Prediction``: the one typed result of one image, made only by ``Predictor.predict``. The CSV/JSON of
``predict``, the service, the study database, the DICOM SR, ``explain`` and the triage experiment read its fields;
none re-derives the label, the probability it comes from, or whether the image was assessed."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pneumoscope.inference.assess import NOT_ASSESSED

ALWAYS = ("probability", "calibrated_probability", "label", "label_from", "threshold", "warnings", "ood_score",
          "out_of_distribution")  # in every answer for a readable image, None or not (the JSON keys of before)


@dataclass
class Prediction:
    path: str
    patient_id: str | None = None
    error: str | None = None  # the image could not be read (then nothing else is set)
    logit: float | None = None  # the model's raw pneumonia logit (binary models)
    probability: float | None = None  # sigmoid(logit): the model's raw output
    calibrated_probability: float | None = None  # sigmoid(logit / T + b); None for an uncalibrated checkpoint
    label: str | None = None  # PNEUMONIA | NORMAL | "not assessed"
    label_from: str | None = None  # which probability the label compares with the threshold
    threshold: float | None = None
    warnings: list[str] = field(default_factory=list)
    ood_score: float | None = None  # distance / threshold of the OOD reference (> 1: out of distribution)
    out_of_distribution: bool | None = None
    not_assessed_reason: str | None = None
    class_probabilities: dict[str, float] | None = None  # multi-class models
    predicted_class: str | None = None
    adapted_probability: float | None = None  # --adapt-to-batch prior
    adaptation: str | None = None

    @property
    def assessed(self) -> bool:
        """Read, and assessed by the model (not blank, colour or out of distribution)."""
        return self.error is None and self.label not in (None, NOT_ASSESSED)

    @property
    def score(self) -> float | None:
        """The probability the label comes from (``label_from``)."""
        return getattr(self, self.label_from) if self.label_from else self.probability

    def to_dict(self) -> dict:
        """The JSON/CSV row: the fields that are set (an unreadable image: path, patient id and the error)."""
        d = asdict(self)
        if self.error is not None:
            return {k: d[k] for k in ("path", "patient_id", "error")}
        return {k: v for k, v in d.items() if v is not None or k in ALWAYS}
