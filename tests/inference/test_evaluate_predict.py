"""`evaluate` and `predict` on a checkpoint trained on a small real subset (through the CLI, as a user runs them)."""
import csv
import io
import json
import shutil
import subprocess
import sys

import pytest

from pneumoscope.cli import main


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def small_split_dir(chest_xray, tmp_path_factory):
    """A tiny train/val/test layout built from real images (copies in tmp, never in the repo)."""
    root = tmp_path_factory.mktemp("layout")
    for cls in ("NORMAL", "PNEUMONIA"):
        files = sorted((chest_xray / "train" / cls).glob("*.jpeg"))[-12:]
        for i, f in enumerate(files):
            split = "test" if i % 2 else "train"
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, root / split / cls / f.name)
    (root / "test" / "NORMAL" / "corrupt.jpeg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    return root


def test_evaluate_writes_report(ckpt, small_split_dir, tmp_path):
    out = tmp_path / "rep"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(small_split_dir), "--split", "test",
                 "--out", str(out)]) == 0
    r = json.loads((out / "report.json").read_text())
    for k in ("n", "accuracy", "sensitivity", "specificity", "precision", "f1", "auc", "threshold", "confusion", "ci"):
        assert k in r, k
    assert r["n"] == 12  # the corrupt file is listed, not counted
    assert set(r["confusion"]) == {"tp", "fp", "tn", "fn"} and sum(r["confusion"].values()) == 12
    for k in ("accuracy", "sensitivity", "specificity", "auc"):
        lo, hi = r["ci"][k]
        assert lo <= r[k] <= hi
    assert "calibration" in r and r["calibration"]["temperature"] > 0
    assert [u["path"].endswith("corrupt.jpeg") for u in r["extra"]["unreadable"]] == [True]
    for f in ("report.md", "roc.png", "pr.png", "confusion.png", "reliability.png"):
        assert (out / f).stat().st_size > 0


def test_temperature_scaling_lowers_ece_on_the_real_validation_split(ckpt, chest_xray, tmp_path):
    """The checkpoint's temperature (fitted on its validation images) lowers ECE and Brier on the full split (775)."""
    import torch

    out = tmp_path / "val"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(chest_xray), "--split", "validation",
                 "--out", str(out)]) == 0
    cal = json.loads((out / "report.json").read_text())["calibration"]
    T = torch.load(ckpt, map_location="cpu", weights_only=False)["temperature"]
    assert cal["temperature"] == pytest.approx(T) and T != pytest.approx(1.0, abs=0.05)
    assert cal["ece_calibrated"] < 0.75 * cal["ece"], cal
    assert cal["brier_calibrated"] < cal["brier"], cal
    assert "Calibration" in (out / "report.md").read_text()


def test_evaluate_needs_split_choice(ckpt, small_split_dir, tmp_path):
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(small_split_dir), "--out", str(tmp_path)]) == 2


def test_predict_csv_lists_bad_files(ckpt, small_split_dir, tmp_path, capsys):
    target = small_split_dir / "test" / "NORMAL"
    out = tmp_path / "p.csv"
    assert main(["predict", "--checkpoint", str(ckpt), str(target), "-o", str(out)]) == 3  # some failed (#18)
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 7
    bad = [r for r in rows if r["error"]]
    assert len(bad) == 1 and bad[0]["path"].endswith("corrupt.jpeg")
    good = [r for r in rows if not r["error"]]
    assert all(0 <= float(r["probability"]) <= 1 and r["label"] in ("NORMAL", "PNEUMONIA") for r in good)
    assert all(r["patient_id"].startswith(("IM-", "NORMAL2-IM-")) for r in good)


def test_predict_json_dicom(ckpt, dicom_dir):
    r = subprocess.run([sys.executable, "-m", "pneumoscope", "predict", "--checkpoint", str(ckpt), "--format", "json",
                        str(dicom_dir / "chest_dx_nih_no_finding.dcm"), str(dicom_dir / "abdomen_ot_scout.dcm")],
                       capture_output=True, text=True)
    assert r.returncode == 3, r.stderr  # one of the two files failed (#18: exit 3, the output still written)
    res = json.loads(r.stdout)
    assert 0 <= res[0]["probability"] <= 1 and "error" not in res[0]
    assert "not a radiograph" in res[1]["error"] or "OT" in res[1]["error"]


def test_evaluate_reads_the_predictors_predictions(ckpt, small_split_dir, tmp_path, capsys):
    """One Prediction per image, typed; `evaluate`'s confusion is the count of `predict`'s labels (it reads the same
    Predictions, never re-derives a label), and the JSON rows are their fields."""
    from pneumoscope.inference.loader import load
    from pneumoscope.inference.prediction import Prediction

    files = sorted((small_split_dir / "test").rglob("*.jpeg"))
    res = load(ckpt, device="cpu").predict(files)
    assert all(isinstance(r, Prediction) for r in res)
    bad = [r for r in res if r.error]
    assert [r.path.endswith("corrupt.jpeg") for r in bad] == [True] and bad[0].to_dict().keys() == {
        "path", "patient_id", "error"} and not bad[0].assessed
    good = [r for r in res if not r.error]
    assert all(r.score == r.calibrated_probability and r.label_from == "calibrated_probability" for r in good)
    truth = ["PNEUMONIA" in r.path.split("/")[-2] for r in good]
    called = [r.label == "PNEUMONIA" for r in good]
    out = tmp_path / "rep"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(small_split_dir), "--split", "test",
                 "--out", str(out)]) == 0
    c = json.loads((out / "report.json").read_text())["confusion"]
    assert c["tp"] == sum(t and k for t, k in zip(truth, called)) and c["fp"] == sum(k and not t for t, k in zip(truth, called))
    capsys.readouterr()
    assert main(["predict", *map(str, files[:2]), "--checkpoint", str(ckpt), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [r.to_dict() for r in res[:2]]


def test_predict_arrays_match_paths(ckpt, chest_xray):
    import numpy as np

    from pneumoscope.data.images import read_image
    from pneumoscope.inference.loader import load

    p = sorted((chest_xray / "train" / "PNEUMONIA").glob("*.jpeg"))[0]
    pred = load(ckpt, device="cpu")
    a = pred.predict([p])[0].probability
    b = pred.predict([read_image(p)[0]])[0].probability
    assert abs(a - b) < 1e-3
    with pytest.raises(ValueError, match=r"expected \[0, 1\]"):
        pred.predict([np.full((10, 10), 2.0, np.float32)])


def test_evaluate_breaks_metrics_down_by_site(ckpt, small_split_dir, tmp_path):
    files = sorted(p.name for p in (small_split_dir / "test").rglob("*.jpeg") if p.name != "corrupt.jpeg")
    meta = tmp_path / "meta.csv"
    # site A: every other file; site C: one NORMAL file only (a one-class group must not crash the report)
    normal_one = sorted(p.name for p in (small_split_dir / "test" / "NORMAL").glob("*.jpeg") if p.name != "corrupt.jpeg")[0]
    rows = ["file,site"] + [f"{f},{'C' if f == normal_one else ('A' if i % 2 else 'B')}" for i, f in enumerate(files)]
    meta.write_text("\n".join(rows) + "\n")
    out = tmp_path / "rep"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(small_split_dir), "--split", "test",
                 "--out", str(out), "--metadata", str(meta), "--group-by", "site"]) == 0
    r = json.loads((out / "report.json").read_text())
    sg = r["subgroups"]
    assert set(sg) == {"A", "B", "C"}
    assert sum(g["n"] for g in sg.values()) == r["n"] == 12
    assert sg["C"]["n"] == 1 and sg["C"]["auc"] is None
    assert all("flagged" in g and "ci" in g for g in sg.values())
    assert "Subgroups" in (out / "report.md").read_text()
    bad = tmp_path / "bad.csv"
    bad.write_text("name,site\nx,A\n")
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(small_split_dir), "--split", "test",
                 "--out", str(out), "--metadata", str(bad)]) == 2


def test_default_model_flags_out_of_distribution_inputs(chest_xray, dicom_dir):
    """The bundled model carries an embedding reference: a cat photo and a dental film are flagged, chests are not."""
    from skimage import data

    from pneumoscope.inference.loader import load

    pred = load(None, device="cpu")
    assert pred.ood_reference is not None
    cat = (data.chelsea().mean(axis=2) / 255).astype("float32")
    chests = sorted((chest_xray / "train" / "NORMAL").glob("*.jpeg"))[:20]
    res = pred.predict([cat, dicom_dir / "dental_cr_jpeg_lossless_modality_lut.dcm", *chests])
    ood = ["out of distribution" in " ".join(r.warnings) for r in res]
    assert ood[0] and ood[1]
    assert sum(ood[2:]) <= 1


def test_default_model_on_its_validation_split(chest_xray, tmp_path):
    """The bundled model on its own 775-image patient-level validation split: what MODEL_CARD.md states."""
    from pneumoscope.evaluation.evaluate import evaluate

    r = evaluate(None, chest_xray, tmp_path, split="validation", progress=False)
    assert r["n"] == 775 and r["auc"] > 0.99
    assert r["sensitivity"] > 0.95 and r["specificity"] > 0.95
    cal = r["calibration"]  # temperature + bias undo the class-weighted loss's shift
    assert cal["bias"] != 0 and cal["ece_calibrated"] < 0.5 * cal["ece"] and cal["brier_calibrated"] < cal["brier"]
