"""Test-time augmentation measured out-of-fold (issue 23, docs/selection.md): each training film scored by the
cross-validated ensemble member that never saw it, plain and with extra views averaged in logit space; paired AUC
differences over all films (patient bootstrap) and the mean AUC over the 12 moderate shifts on one fold.

    python scripts/tta_oof.py --checkpoint runs23/cv4/r10_cv4_r9/best.pt --data ../shared/data/chest_xray
    python scripts/tta_oof.py --checkpoint runs23/cv4/r12_cv4_r11/best.pt --data ../shared/data/chest_xray \
        --out runs23/tta_oof_r12.json --save runs23/tta_oof_r12.npz
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from pneumoscope.data.folders import patient_id_from_name
from pneumoscope.evaluation.metrics import paired_auc_difference
from pneumoscope.inference.loader import load
from pneumoscope.models.checkpoint import load_checkpoint
from pneumoscope.studies.ensemble import member_folds, oof_logits, oof_predictions
from pneumoscope.studies.select import MODERATE_SHIFTS
from pneumoscope.trust.shift import apply

log = logging.getLogger("tta_oof")


def centre_crop(u8: np.ndarray, keep: float = 0.9) -> np.ndarray:
    """The central ``keep`` of each side, resized back (bilinear, antialiased)."""
    s = u8.shape[-1]
    c = int(round(s * (1 - keep) / 2))
    x = torch.from_numpy(np.ascontiguousarray(u8[:, c:s - c, c:s - c])).float().unsqueeze(1)
    y = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()


def shift_right(u8: np.ndarray, frac: float = 0.04) -> np.ndarray:
    """Moved right by ``frac`` of the side, the left edge column repeated."""
    k = int(round(u8.shape[-1] * frac))
    return np.concatenate([np.repeat(u8[:, :, :1], k, axis=2), u8[:, :, :-k]], axis=2)


VIEWS = {"crop90": centre_crop, "shift4": shift_right}
COMBOS = {"plain": [], "+crop90": ["crop90"], "+shift4": ["shift4"], "+crop90+shift4": ["crop90", "shift4"]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", default="runs23/tta_oof.json")
    p.add_argument("--save", help="also write every film's out-of-fold logits per view set to this .npz")
    p.add_argument("--no-shifts", action="store_true", help="skip the 12 shifted copies of fold 1")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    t0 = time.perf_counter()
    ens = load(a.checkpoint, device="cpu").model
    o = oof_predictions(ens, member_folds(load_checkpoint(a.checkpoint), a.data))
    y, fold, images = o["y"], o["fold"], o["images"]
    patients = [patient_id_from_name(Path(q).name) for q in o["paths"]]

    def scores(u8, fold_of):
        z = {"plain": oof_logits(ens, u8, fold_of)[:, 0]}
        z.update({v: oof_logits(ens, f(u8), fold_of)[:, 0] for v, f in VIEWS.items()})
        return {c: np.mean([z["plain"], *[z[v] for v in vs]], axis=0) for c, vs in COMBOS.items()}

    def prob(z):
        return 1 / (1 + np.exp(-z))

    full = scores(images, fold)
    log.info("out-of-fold scores of %d films, every view: %.0f s", len(y), time.perf_counter() - t0)
    if a.save:
        np.savez(a.save, y=y, paths=np.array(o["paths"]), **{c.replace("+", "_"): z for c, z in full.items()})
    one = fold == 0
    shifted = [] if a.no_shifts else [scores(apply(n, images[one], s, seed=0), fold[one])
                                      for n, ss in MODERATE_SHIFTS.items() for s in ss]
    rows = {}
    for c in COMBOS:
        d = paired_auc_difference(y, prob(full["plain"]), prob(full[c]), groups=patients)
        rows[c] = {"oof_auc": roc_auc_score(y, full[c]), "paired_vs_plain": d["difference"], "ci": d["ci"],
                   "shift_auc_fold1": float(np.mean([roc_auc_score(y[one], s[c]) for s in shifted])) if shifted else None}
        log.info("%-16s OOF AUC %.4f  paired %+.4f [%+.4f, %+.4f]  shifted (fold 1) %s", c, rows[c]["oof_auc"],
                 d["difference"], *d["ci"], rows[c]["shift_auc_fold1"])
    Path(a.out).write_text(json.dumps({"n": int(len(y)), "n_fold1": int(one.sum()), "rows": rows,
                                       "seconds": time.perf_counter() - t0}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
