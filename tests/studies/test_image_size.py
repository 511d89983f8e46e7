"""The image-size experiment on two tiny sizes; the experiment sub-commands."""
import json
import math

import pytest

from pneumoscope.cli import build_parser
from pneumoscope.studies.image_size import image_size_experiment


@pytest.mark.slow
def test_image_size_experiment_two_tiny_sizes(chest_xray, tmp_path):
    # cnn_rnn: seed_cnn needs at least 46 px
    base = dict(data=str(chest_xray), model="cnn_rnn", epochs=1, limit=120, batch_size=16, threads=2, progress=False)
    rows = image_size_experiment(base, [32, 48], tmp_path)
    assert [r["image_size"] for r in rows] == [32, 48]
    for r in rows:
        for k in ("val_loss_best", "val_loss_last", "val_accuracy", "val_accuracy_at_threshold", "val_auc",
                  "seconds_per_epoch", "wall_seconds"):
            assert isinstance(r[k], float) and math.isfinite(r[k]), (r["image_size"], k)
        assert 0 <= r["val_auc"] <= 1 and 0 <= r["val_accuracy"] <= 1 and r["val_loss_best"] > 0
        assert r["epochs_run"] == r["best_epoch"] == 1 and r["val_loss_best"] == r["val_loss_last"]
        assert r["n_train"] == 120 and r["n_val"] == 120
        assert (tmp_path / f"size{r['image_size']}" / "best.pt").is_file()
    assert rows[0]["n_val"] == rows[1]["n_val"]  # the same validation split at both sizes
    table = (tmp_path / "image_size.md").read_text().splitlines()
    data_rows = [line for line in table if line.startswith("| 32 |") or line.startswith("| 48 |")]
    assert len(data_rows) == 2 and "nan" not in "".join(data_rows)
    assert json.loads((tmp_path / "image_size.json").read_text())["rows"] == rows
    assert (tmp_path / "image_size.png").stat().st_size > 0


def test_experiment_subcommands_parse():
    parser = build_parser()
    a = parser.parse_args(["experiment", "image-size", "--data", "D", "--sizes", "64,128", "--epochs", "3",
                           "--model", "resnet18", "--limit", "50", "--out", "O"])
    assert (a.data, a.sizes, a.epochs, a.model, a.limit, a.out) == ("D", "64,128", 3, "resnet18", 50, "O")
    assert a.func.__name__ == "_image_size"
    a = parser.parse_args(["experiment", "shift", "--checkpoint", "C", "--data", "D", "--out", "O"])
    assert (a.checkpoint, a.data, a.out, a.split, a.limit) == ("C", "D", "O", None, 0)
    assert a.func.__name__ == "_shift"
