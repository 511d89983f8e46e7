"""Can the model assess this image? ONE function, ``assess``, turns an image's model-free quality flags and its
out-of-distribution score into its warnings and, when the model cannot assess it, the reason. ``predict``,
``evaluate``, ``explain``, the service and its structured report all take their warnings and their "not assessed"
label from here, so none can drop a flag another raises.

Not assessed (label ``NOT_ASSESSED``, the probability still reported beside the reason): a blank/constant image,
a colour image (a photo or screenshot, not a radiograph), or an image unlike the training images
(``ood_score`` > 1: beyond the stored false-flag threshold of the out-of-distribution reference).
"""
from __future__ import annotations

from dataclasses import dataclass, field

NOT_ASSESSED = "not assessed"
# model-free flags (data/quality.py) after which the model's output means nothing
BLOCKING = ("blank or constant image", "colour image")


# The reading worklist's order (the service's GET /worklist, serve/db.py's SQL, and the triage experiment):
WORKLIST_RULE = ("unreviewed studies only; 1. likely pneumonia (label PNEUMONIA), highest calibrated probability first; "
                 "2. not assessed (the model could not read them: a reader must), oldest first; 3. the rest (label "
                 "NORMAL), highest probability first; within a tie the oldest first; a review closes an item")
TIERS = {1: "likely pneumonia", 2: "not assessed", 3: "likely normal"}


HEATMAP_RULE = ("a Grad-CAM map is shown only for a film labelled PNEUMONIA: on a film labelled NORMAL a map of "
                "evidence for pneumonia (red on the abdomen, the film edges) reads as a finding, and a film the model "
                "did not assess has no output worth explaining")


def heatmap_shown(label: str) -> bool:
    """HEATMAP_RULE: the service, the viewer, ``explain`` and the DICOM Secondary Capture all follow it."""
    return label == "PNEUMONIA"


def reading_key(label: str, probability: float | None, arrival: float) -> tuple:
    """Sort key of WORKLIST_RULE: (tier, -probability, arrival); smaller = read sooner."""
    tier = 1 if label == "PNEUMONIA" else 2 if label == NOT_ASSESSED else 3
    return tier, 0.0 if tier == 2 or probability is None else -float(probability), arrival


def ood_warning(score: float) -> str:
    return (f"not like the training images (out of distribution: score {score:.2f} > 1): the prediction is "
            "unreliable; review manually")


@dataclass
class Assessment:
    warnings: list[str] = field(default_factory=list)
    ood_score: float | None = None  # distance / threshold of the OOD reference; > 1 = out of distribution
    out_of_distribution: bool = False
    reason: str | None = None  # why the model cannot assess the image; None = assessed

    @property
    def assessed(self) -> bool:
        return self.reason is None


def assess(quality_warnings: list[str], ood_score: float | None = None) -> Assessment:
    """The warnings of one image and whether the model can assess it (see the module docstring)."""
    warnings = list(dict.fromkeys(quality_warnings))
    ood = ood_score is not None and ood_score > 1.0
    if ood:
        warnings.append(ood_warning(ood_score))
    blocking = [w for w in warnings if w.startswith(BLOCKING)]
    reason = blocking[0] if blocking else (ood_warning(ood_score) if ood else None)
    return Assessment(warnings, None if ood_score is None else float(ood_score), ood, reason)
