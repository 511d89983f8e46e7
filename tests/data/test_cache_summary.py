"""Parallel decode, the on-disk cache, bad files, and `data summary` on the shared data."""
import json
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image

from pneumoscope.data.cache import decode_all
from pneumoscope.data.intake import load_uint8
from pneumoscope.data.summary import summarize


def test_decode_matches_single_and_lists_bad_files(chest_xray, tmp_path):
    good = sorted((chest_xray / "train" / "NORMAL").glob("*.jpeg"))[:5]
    trunc = tmp_path / "truncated.jpeg"
    trunc.write_bytes(good[0].read_bytes()[:2000])
    text = tmp_path / "text.png"
    text.write_text("not an image")
    paths = good[:2] + [trunc, text] + good[2:]
    d = decode_all(paths, 64, progress=False)
    assert d.images.shape == (7, 64, 64) and d.images.dtype == np.uint8
    assert d.ok.tolist() == [True, True, False, False, True, True, True]
    assert {p.name for p, _ in d.errors} == {"truncated.jpeg", "text.png"}
    assert all(p.name in m for p, m in d.errors)  # the message names the file
    np.testing.assert_array_equal(d.images[4], load_uint8(good[2], 64))
    assert d.images[0].std() > 10  # a real radiograph, not a blank


def test_disk_cache_roundtrip(chest_xray, tmp_path):
    paths = sorted((chest_xray / "train" / "PNEUMONIA").glob("*.jpeg"))[:6]
    a = decode_all(paths, 32, cache_dir=tmp_path, progress=False)
    files = list(tmp_path.glob("decoded-32px-*.npz"))
    assert len(files) == 1
    b = decode_all(paths, 32, cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(a.images, b.images)
    decode_all(paths, 48, cache_dir=tmp_path, progress=False)  # another size -> another key
    assert len(list(tmp_path.glob("decoded-*.npz"))) == 2


def test_summary_on_shared_data(chest_xray):
    s = summarize(chest_xray, progress=False)
    c = s["splits"]["train"]["classes"]
    assert c["NORMAL"]["images"] == 1341 and c["PNEUMONIA"]["images"] == 3875
    assert s["images"] == 5216
    assert 0 < c["NORMAL"]["patients"] <= 1341 and c["PNEUMONIA"]["patients"] < 3875
    assert len(s["duplicate_groups"]) == 24 and s["cross_split_duplicate_groups"] == 0
    assert c["NORMAL"]["size_most_common"] == [224, 224]
    assert s["unreadable"] == []


def test_summary_cli_json_and_bad_files(tmp_path, chest_xray):
    for cls, src in (("NORMAL", "IM-0115-0001.jpeg"), ("PNEUMONIA", "person1000_bacteria_2931.jpeg")):
        (tmp_path / cls).mkdir()
        shutil.copy(chest_xray / "train" / cls / src, tmp_path / cls / src)
    (tmp_path / "PNEUMONIA" / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    Image.fromarray(np.zeros((4000, 3000), np.uint16)).save(tmp_path / "NORMAL" / "big16.png")
    r = subprocess.run([sys.executable, "-m", "pneumoscope", "data", "summary", "--data", str(tmp_path), "--json"],
                       capture_output=True, text=True, check=True)
    s = json.loads(r.stdout)
    assert s["splits"]["all"]["classes"]["PNEUMONIA"]["unreadable"] == [str(tmp_path / "PNEUMONIA" / "broken.jpeg")]
    assert s["splits"]["all"]["classes"]["NORMAL"]["size_max"] == [4000, 3000]
    assert s["images"] == 4
    text = subprocess.run([sys.executable, "-m", "pneumoscope", "data", "summary", "--data", str(tmp_path)],
                          capture_output=True, text=True, check=True).stdout
    assert "broken.jpeg" in text and "NORMAL" in text
