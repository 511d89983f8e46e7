"""MedMNIST PneumoniaMNIST .npz reader, on small files built like the real ones (uint8 images, N x 1 labels)."""
from __future__ import annotations

import numpy as np
import pytest

from pneumoscope.data.npz import MEDMNIST_LABELS, load_medmnist_arrays, read_medmnist
from pneumoscope.errors import DatasetLayoutError

COUNTS = {"train": 6, "val": 2, "test": 3}


def _arrays(size: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in COUNTS.items():
        out[f"{split}_images"] = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        out[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8)[:, None]  # N x 1 like MedMNIST
    return out


def _save(tmp_path, name, arrays):
    path = tmp_path / name
    np.savez_compressed(path, **arrays)
    return path


def test_labels():
    assert MEDMNIST_LABELS == ("NORMAL", "PNEUMONIA")


@pytest.mark.parametrize("size,name", [(28, "pneumoniamnist.npz"), (64, "pneumoniamnist_64.npz")])
def test_read_round_trips(tmp_path, size, name):
    arrays = _arrays(size)
    path = _save(tmp_path, name, arrays)
    for split, n in COUNTS.items():
        images, labels = read_medmnist(path, split)
        assert images.dtype == np.uint8 and images.shape == (n, size, size)
        assert np.array_equal(images, arrays[f"{split}_images"])
        assert labels.dtype == np.int64 and labels.shape == (n,)
        assert labels.tolist() == [i % 2 for i in range(n)]
    # a few exact pixels, to be sure nothing was rescaled
    assert read_medmnist(path, "val")[0][1, 3, 5] == arrays["val_images"][1, 3, 5]


def test_load_all_splits(tmp_path):
    arrays = _arrays(28)
    out = load_medmnist_arrays(_save(tmp_path, "p.npz", arrays))
    assert list(out) == ["train", "val", "test"]
    for split, (images, labels) in out.items():
        assert np.array_equal(images, arrays[f"{split}_images"])
        assert np.array_equal(labels, arrays[f"{split}_labels"][:, 0])


def test_load_only_the_splits_present(tmp_path):
    arrays = {k: v for k, v in _arrays(28).items() if not k.startswith("val")}
    out = load_medmnist_arrays(_save(tmp_path, "p.npz", arrays))
    assert list(out) == ["train", "test"]


def test_flat_labels_accepted(tmp_path):
    arrays = _arrays(28)
    arrays["train_labels"] = arrays["train_labels"][:, 0].astype(np.int32)
    _, labels = read_medmnist(_save(tmp_path, "p.npz", arrays), "train")
    assert labels.dtype == np.int64 and labels.tolist() == [0, 1, 0, 1, 0, 1]


def test_rgb_converted_by_bt601_luma(tmp_path):
    arrays = _arrays(28)
    rgb = np.zeros((6, 28, 28, 3), np.uint8)
    rgb[0, ..., 0] = 255                           # pure red   -> 0.299 * 255 = 76.2
    rgb[1, ..., 1] = 255                           # pure green -> 0.587 * 255 = 149.7
    rgb[2, ..., 2] = 255                           # pure blue  -> 0.114 * 255 = 29.1
    rgb[3] = 255                                   # white stays 255
    rgb[4] = (10, 20, 30)                          # 2.99 + 11.74 + 3.42 = 18.15
    rgb[5] = np.random.default_rng(1).integers(0, 256, (28, 28, 1), dtype=np.uint8)  # gray stays gray
    arrays["train_images"] = rgb
    images, _ = read_medmnist(_save(tmp_path, "p.npz", arrays), "train")
    assert images.shape == (6, 28, 28) and images.dtype == np.uint8
    assert [int(images[i, 0, 0]) for i in range(5)] == [76, 150, 29, 255, 18]
    assert np.array_equal(images[5], rgb[5, ..., 0])


def test_missing_key_names_file_and_keys(tmp_path):
    arrays = _arrays(28)
    del arrays["test_labels"]
    path = _save(tmp_path, "p.npz", arrays)
    with pytest.raises(DatasetLayoutError) as e:
        read_medmnist(path, "test")
    msg = str(e.value)
    assert str(path) in msg and "test_labels" in msg and "'train_images'" in msg and "'test_images'" in msg
    with pytest.raises(DatasetLayoutError, match="test_labels"):
        load_medmnist_arrays(path)


def test_no_medmnist_keys(tmp_path):
    path = _save(tmp_path, "p.npz", {"x": np.zeros(3)})
    with pytest.raises(DatasetLayoutError, match=r"\['x'\]"):
        load_medmnist_arrays(path)


def test_shape_disagreement(tmp_path):
    arrays = _arrays(28)
    arrays["train_labels"] = arrays["train_labels"][:5]
    with pytest.raises(DatasetLayoutError, match="6 images but 'train_labels' has 5 labels"):
        read_medmnist(_save(tmp_path, "p.npz", arrays), "train")


@pytest.mark.parametrize("bad", [np.zeros((6, 28), np.uint8), np.zeros((6, 28, 28, 4), np.uint8),
                                 np.zeros((0, 28, 28), np.uint8)])
def test_bad_image_shapes(tmp_path, bad):
    arrays = _arrays(28)
    arrays["train_images"] = bad
    with pytest.raises(DatasetLayoutError, match="expected N x H x W"):
        read_medmnist(_save(tmp_path, "p.npz", arrays), "train")


def test_bad_image_dtype(tmp_path):
    arrays = _arrays(28)
    arrays["train_images"] = arrays["train_images"].astype(np.float32) / 255
    with pytest.raises(DatasetLayoutError, match="float32"):
        read_medmnist(_save(tmp_path, "p.npz", arrays), "train")


def test_labels_outside_0_1(tmp_path):
    arrays = _arrays(28)
    arrays["val_labels"] = np.array([[0], [2]], np.uint8)
    with pytest.raises(DatasetLayoutError, match=r"outside \{0, 1\}.*\[2\]"):
        read_medmnist(_save(tmp_path, "p.npz", arrays), "val")


def test_multilabel_shape_refused(tmp_path):
    arrays = _arrays(28)
    arrays["val_labels"] = np.zeros((2, 14), np.uint8)  # ChestMNIST-like
    with pytest.raises(DatasetLayoutError, match=r"\(2, 14\)"):
        read_medmnist(_save(tmp_path, "p.npz", arrays), "val")


def test_not_an_npz(tmp_path):
    path = tmp_path / "p.npz"
    path.write_bytes(b"<html>rate limited</html>")
    with pytest.raises(DatasetLayoutError, match="not an .npz"):
        read_medmnist(path, "train")
    npy = tmp_path / "a.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(DatasetLayoutError, match="not an .npz"):
        load_medmnist_arrays(npy)


def test_missing_file_and_bad_split(tmp_path):
    with pytest.raises(DatasetLayoutError, match="does not exist.*pneumoscope download pneumoniamnist"):
        read_medmnist(tmp_path / "nope.npz", "train")
    with pytest.raises(ValueError, match="split must be one of"):
        read_medmnist(tmp_path / "nope.npz", "validation")


def _real_npz(chest_xray, tmp_path, size: int = 64, per_class: dict | None = None):
    """A PneumoniaMNIST-like file made from real training images (downscaled like MedMNIST)."""
    from PIL import Image

    per_class = per_class or {"train": 24, "val": 60, "test": 4}
    arrays, start = {}, 0
    for split, n in per_class.items():
        imgs, labels = [], []
        for y, cls in enumerate(MEDMNIST_LABELS):
            for f in sorted((chest_xray / "train" / cls).glob("*.jpeg"))[start:start + n]:
                with Image.open(f) as im:
                    imgs.append(np.asarray(im.convert("L").resize((size, size), Image.Resampling.BOX)))
                labels.append(y)
        start += n
        arrays[f"{split}_images"] = np.stack(imgs)
        arrays[f"{split}_labels"] = np.array(labels, dtype=np.uint8)[:, None]
    return _save(tmp_path, "pneumoniamnist_64.npz", arrays), arrays


def test_npz_file_is_a_data_folder_for_summary_and_train(chest_xray, tmp_path, monkeypatch):
    from pneumoscope.cli import main
    from pneumoscope.data.folders import scan
    from pneumoscope.data.npz import materialize
    from pneumoscope.training.loop import train

    monkeypatch.setenv("PNEUMOSCOPE_CACHE", str(tmp_path / "cache"))
    path, arrays = _real_npz(chest_xray, tmp_path)
    ds = scan(path)
    assert ds.splits == ["train", "val", "test"]
    assert sum(s.label == 1 for s in ds.split("val")) == 60 and len(ds.split("test")) == 8
    root = materialize(path)
    assert (root / ".complete").exists() and materialize(path) == root  # written once, then reused
    first = sorted((root / "train" / "PNEUMONIA").glob("*.png"))[0]
    from PIL import Image

    with Image.open(first) as im:  # pixels kept exactly (lossless PNG)
        assert np.array_equal(np.asarray(im), arrays["train_images"][24])
    assert main(["data", "summary", "--data", str(path), "--json"]) == 0
    m = train(dict(data=str(path), model="seed_cnn", image_size=64, epochs=1, batch_size=16, threads=2,
                   progress=False, out=str(tmp_path / "run")))
    assert m["n_train"] == 48 and m["n_val"] == 120 and "val/ split" in m["validation"]
    assert (tmp_path / "run" / "best.pt").is_file()
