"""The bad-input corpus through ``python -m pneumoscope`` as a subprocess (#18): exit codes 0 / 2 / 3, a message
naming the file and the fix, no traceback, every other input of the batch still processed. One ``predict`` call
carries the whole corpus; the bundled model is used (no training)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.bad_input.corpus import Item, path_items, write_items

NO_INPUT = "no image or DICOM file found in"


def cli(*args: str, cwd: Path) -> tuple[int, str, str]:
    """Run the CLI in a fresh process (PYTHONPATH and the rest of the environment passed through)."""
    p = subprocess.run([sys.executable, "-m", "pneumoscope", *args], cwd=cwd, env=dict(os.environ),
                       capture_output=True, text=True, timeout=300)
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    return p.returncode, p.stdout, p.stderr


def test_one_predict_call_over_the_whole_corpus(items, tmp_path):
    files = write_items(items, tmp_path / "in")
    good = files[0]
    paths = path_items(tmp_path / "paths", good)
    out = tmp_path / "out.csv"
    args = [*map(str, files), *paths, str(tmp_path / "paths" / "with_broken_links")]
    rc, _, err = cli("predict", *args, "-o", str(out), "--device", "cpu", cwd=tmp_path)
    assert rc == 3, err[-2000:]  # some inputs failed: not 0, and the CSV is written all the same
    table = list(csv.DictReader(open(out, newline="", encoding="utf-8")))
    rows = {r["path"]: r for r in table}
    listed = [*map(str, files), *paths]
    assert set(listed) <= set(rows), set(listed) - set(rows)
    # the folder: its real image and its broken links listed, the .txt and the hidden file skipped
    sub = tmp_path / "paths" / "with_broken_links"
    assert {Path(p).name for p in rows if Path(p).parent == sub} == {"real.jpeg", "broken.png", "self.dcm"}
    outcomes = []
    for item, f in zip(items, files):
        r = rows[str(f)]
        if item.ok:
            # a real image is predicted: a diagnosis, or "not assessed" with its reason (issue 14: blank, colour,
            # out of distribution), never an error row
            assessed = r["label"] in ("NORMAL", "PNEUMONIA") or (r["label"] == "not assessed" and r["not_assessed_reason"])
            ok = (r["error"] == "" and assessed and 0 <= float(r["probability"]) <= 1
                  and r["label_from"] == "calibrated_probability" and item.msg in r["warnings"])
        else:
            ok = r["label"] == "" and item.msg in r["error"] and f.name in r["error"] and f.name in err
        outcomes.append((item.name, ok, r["error"] or r["warnings"]))
    for p, msg in paths.items():
        r = rows[p]
        outcomes.append((p, r["label"] == "" and msg in r["error"] and p in r["error"], r["error"]))
    assert float(rows[str(sub / "real.jpeg")]["probability"]) >= 0
    failed = [o for o in outcomes if not o[1]]
    assert not failed, failed
    n_bad = sum(r["error"] != "" for r in table)
    assert n_bad == sum(not i.ok for i in items) + len(paths) + 2  # + the folder's two broken links, listed again
    assert f"{n_bad} of {len(table)} files could not be read (error rows in the output, exit code 3)" in err


def test_every_input_predicted_exits_0_and_json_says_which_probability_labels(items, tmp_path):
    files = write_items([i for i in items if i.ok][:3], tmp_path)
    rc, _, err = cli("predict", *map(str, files), "-o", str(tmp_path / "p.json"), "--device", "cpu", cwd=tmp_path)
    assert rc == 0, err
    res = json.loads((tmp_path / "p.json").read_text())
    assert len(res) == 3 and all(r["label_from"] == "calibrated_probability" and "error" not in r for r in res)


def test_every_file_failed_exits_3_not_0(tmp_path):
    (tmp_path / "zero.jpeg").write_bytes(b"")
    rc, out, err = cli("predict", "zero.jpeg", cwd=tmp_path)
    assert rc == 3 and "zero.jpeg: empty file" in out and "1 of 1 files could not be read" in err


def test_empty_folder_exits_2_with_the_same_message_for_predict_and_explain(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    for cmd in ("predict", "explain"):
        rc, _, err = cli(cmd, "empty", cwd=tmp_path)
        assert rc == 2 and f"{NO_INPUT} empty (looked for .jpeg" in err, (cmd, err)
    assert not (tmp_path / "explain").exists()


def test_output_paths_checked_before_any_work(items, tmp_path):
    good = write_items(items[:1], tmp_path)[0]
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file").write_text("x")
    cases = [
        (["predict", str(good), "-o", "no/such/folder/p.csv"], "the folder no/such/folder does not exist; create it"),
        (["predict", str(good), "-o", "a_dir"], "-o a_dir is a folder; pass a file name"),
        (["explain", str(good), "--out", "a_file"], "--out a_file is an existing file, not a folder"),
        (["predict", str(good), "-o", "a_file/p.csv"], "-o a_file/p.csv: a_file is a file, not a folder"),
        (["explain", str(good), "--out", "a_file/maps"], "a_file is a file, so the folder cannot be made"),
        (["predict", str(good), "--format", "xml"], "invalid choice: 'xml'"),  # argparse usage error
    ]
    for args, msg in cases:
        rc, _, err = cli(*args, cwd=tmp_path)
        assert rc == 2 and msg in err, (args, err)
        assert "could not be read" not in err  # refused upfront: no image was read
    assert (tmp_path / "a_file").read_text() == "x"


def test_explain_lists_failed_files_exits_3_and_writes_the_others(items, chest_xray, tmp_path):
    # a film the bundled model labels PNEUMONIA (maps are drawn only for those: inference.assess.HEATMAP_RULE)
    film = Item("good.jpeg", (chest_xray / "train" / "PNEUMONIA" / "person1000_bacteria_2931.jpeg").read_bytes(), True)
    files = write_items([film, next(i for i in items if i.name == "zero.jpeg")], tmp_path / "in")
    same_stem = write_items([film], tmp_path / "in2")  # another good.jpeg: its overlay must not overwrite
    rc, _, err = cli("explain", *map(str, files + same_stem), "missing.png", "--out", "maps", "--device", "cpu",
                     cwd=tmp_path)
    assert rc == 3, err
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["good_2_gradcam.png", "good_gradcam.png"]
    assert "2 of 4 files could not be explained" in err
    assert "zero.jpeg: empty file" in err and "missing.png: no such file" in err


def test_garbage_checkpoint_and_bad_flag_exit_2_with_a_clear_message(tmp_path):
    import torch

    torch.save(torch.nn.Linear(2, 2), tmp_path / "linear.pt")
    rc, _, err = cli("predict", "x.jpeg", "--checkpoint", "linear.pt", cwd=tmp_path)
    assert rc == 2 and "linear.pt is not a pneumoscope checkpoint (expected a file written by pneumoscope train" in err
    assert "weights_only" not in err and "safe_globals" not in err
    rc, _, err = cli("train", "--data", str(tmp_path), "--image-size", "100000", cwd=tmp_path)
    assert rc == 2 and "image_size=100000 is invalid: allowed range [16, 1024]" in err, err
