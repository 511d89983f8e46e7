"""Acquisition shifts: identities, monotonicity, determinism; the shift study on a tiny trained model."""
import json

import numpy as np
import pytest
import torch

from pneumoscope.config import resolve
from pneumoscope.data.cache import decode_all
from pneumoscope.data.splits import split_samples
from pneumoscope.errors import ConfigError
from pneumoscope.evaluation.evaluate import evaluation_samples
from pneumoscope.models.checkpoint import load_checkpoint
from pneumoscope.trust.shift import SHIFTS, apply, blur, invert, noise, shift_study


@pytest.fixture(scope="module")
def batch(chest_xray):
    files = (sorted((chest_xray / "train" / "NORMAL").glob("*.jpeg"))[:3]
             + sorted((chest_xray / "train" / "PNEUMONIA").glob("*.jpeg"))[:3])
    return decode_all(files, 96, progress=False).images  # (6, 96, 96) uint8


def test_strength_zero_is_identity(batch):
    for name, (fn, strengths) in SHIFTS.items():
        assert 0 in strengths, name
        out = fn(batch, 0)
        assert out.dtype == np.uint8 and np.array_equal(out, batch), name
        assert np.array_equal(fn(batch[0], 0), batch[0]), name  # a single image too


def test_every_shift_keeps_shape_and_type(batch):
    for name, (fn, strengths) in SHIFTS.items():
        for s in strengths:
            out = apply(name, batch, s, seed=1)
            assert out.shape == batch.shape and out.dtype == np.uint8, (name, s)
            if s != 0:
                assert not np.array_equal(out, batch), (name, s)
    t = apply("blur", torch.from_numpy(batch), 2)
    assert isinstance(t, torch.Tensor) and np.array_equal(t.numpy(), blur(batch, 2))
    with pytest.raises(ConfigError):
        apply("fog", batch, 1)


def test_blur_and_noise_change_pixels_monotonically(batch):
    f = batch.astype(np.float64)
    for fn, strengths in ((blur, [0, 1, 2, 4, 8]), (noise, [0, 0.01, 0.02, 0.05, 0.1, 0.2])):
        change = [np.abs(fn(batch, s, seed=0).astype(np.float64) - f).mean() for s in strengths]
        assert change[0] == 0 and all(b > a for a, b in zip(change, change[1:])), (fn.__name__, change)
    # blur removes fine detail: the horizontal gradient energy falls with sigma
    energy = [np.abs(np.diff(blur(batch, s).astype(np.float64), axis=2)).mean() for s in (0, 1, 2, 4, 8)]
    assert all(b < a for a, b in zip(energy, energy[1:])), energy
    # noise: the std of the added noise matches the strength (0.05 * 255 = 12.75; little clipping here)
    d = noise(batch, 0.05, seed=0).astype(np.float64) - f
    assert abs(d[(batch > 30) & (batch < 225)].std() - 12.75) < 0.5


def test_noise_is_seeded(batch):
    assert np.array_equal(noise(batch, 0.1, seed=3), noise(batch, 0.1, seed=3))
    assert not np.array_equal(noise(batch, 0.1, seed=3), noise(batch, 0.1, seed=4))


def test_invert_twice_is_identity(batch):
    assert np.array_equal(invert(invert(batch, 1), 1), batch)
    assert np.array_equal(invert(np.array([[0, 100, 255]], np.uint8), 1), np.array([[255, 155, 0]], np.uint8))


def test_other_shifts_do_what_they_say():
    ramp = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))  # 64 x 64 horizontal ramp 0..252
    g = apply("gamma", ramp, 1)  # x ** 2 darkens the mid-tones
    assert g[0, 32] == round(255 * (128 / 255) ** 2) and g[0, 0] == 0
    c = apply("contrast", ramp, 0.5)
    assert abs(c.astype(float).std() - 0.5 * ramp.astype(float).std()) < 0.6
    assert abs(c.astype(float).mean() - ramp.astype(float).mean()) < 0.6
    cr = apply("crop", ramp, 0.5)  # the middle half stretched to the full width
    assert cr[0, 0] >= 60 and cr[0, -1] <= 192
    d = apply("downsample", ramp, 3)  # 8 x 8 then back up: far fewer distinct values
    assert len(np.unique(d)) < len(np.unique(ramp))


@pytest.mark.slow
def test_shift_study_on_a_tiny_model(tiny_checkpoint, chest_xray, tmp_path):
    rows = shift_study(tiny_checkpoint, chest_xray, tmp_path, shifts={"blur": [0, 2, 8], "invert": [0, 1]},
                       limit=150, device="cpu", progress=False)
    assert [(r["shift"], r["strength"]) for r in rows] == [("blur", 0), ("blur", 2), ("blur", 8), ("invert", 0), ("invert", 1)]
    auc = {(r["shift"], r["strength"]): r["auc"] for r in rows}
    assert auc[("blur", 0)] == auc[("invert", 0)] > 0.75
    assert auc[("blur", 0)] > auc[("blur", 8)]  # strong blur hurts
    for r in rows:
        assert r["n"] == 150 and all(0.0 <= r[k] <= 1.0 for k in ("auc", "accuracy", "sensitivity", "specificity"))
    saved = json.loads((tmp_path / "shift.json").read_text())
    assert saved["rows"] == rows and "validation split" in saved["images"]
    assert (tmp_path / "shift.md").read_text().count("| blur |") == 3
    assert (tmp_path / "shift.png").stat().st_size > 0


@pytest.mark.slow
def test_evaluation_images_are_the_checkpoints_validation_split(tiny_checkpoint, chest_xray):
    ckpt = load_checkpoint(tiny_checkpoint)
    val, how = evaluation_samples(ckpt, chest_xray)
    train_s, val_again, _, _ = split_samples(resolve(dict(ckpt["config"]), limit=0))
    assert [s.path for s in val] == [s.path for s in val_again]
    assert not {s.patient_id for s in val} & {s.patient_id for s in train_s}
    assert 0.1 < len(val) / (len(val) + len(train_s)) < 0.2  # val_fraction 0.15, by patient
