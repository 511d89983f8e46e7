"""Out-of-distribution flags: model-free image checks, the embedding reference, data compare."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter
from skimage import color, data

from pneumoscope.cli import build_parser
from pneumoscope.data.cache import decode_all
from pneumoscope.data.images import resize_uint8, to_uint8
from pneumoscope.data.intake import from_path
from pneumoscope.data.quality import image_warnings
from pneumoscope.inference.embedding import (
    EmbeddingReference,
    ReferenceSet,
    embed,
    feature_layer,
    reference_from_dict,
    reference_from_images,
)
from pneumoscope.inference.loader import load
from pneumoscope.trust.data_compare import data_compare, frechet_distance


def file_warnings(path):
    """The quality flags of a file, as predict computes them (the one intake)."""
    return from_path(path, 64).quality


def hand_like(h: int = 512, w: int = 400) -> np.ndarray:
    """A bright palm and five fingers on a black background, like a hand radiograph."""
    img = np.zeros((h, w), np.float32)
    yy, xx = np.mgrid[:h, :w]
    img[((yy - 0.74 * h) / (0.21 * h)) ** 2 + ((xx - w / 2) / (0.3 * w)) ** 2 < 1] = 0.8
    for cx, top in ((0.28, 0.4), (0.4, 0.23), (0.51, 0.2), (0.63, 0.25), (0.75, 0.5)):
        img[(abs(xx - cx * w) < 0.04 * w) & (yy > top * h) & (yy < 0.74 * h)] = 0.75
    return img


@pytest.fixture(scope="module")
def shared_sample(chest_xray):
    files = sorted((chest_xray / "train").rglob("*.jpeg"))
    idx = np.random.default_rng(7).choice(len(files), 100, replace=False)
    return [files[i] for i in sorted(idx)]


# ------------------------------------------------------------------------------------------- model-free flags
def test_non_chest_images_are_flagged(chest_xray):
    cat_rgb = data.chelsea()
    cat_grey = color.rgb2gray(cat_rgb).astype(np.float32)
    chest = np.asarray(Image.open(sorted((chest_xray / "train" / "NORMAL").glob("*.jpeg"))[0]).convert("L"))

    def has(ws, word):
        return any(word in w for w in ws)

    assert image_warnings(np.zeros((300, 300), np.uint8)) == ["blank or constant image (intensity std 0.000): nothing to read"]
    assert has(image_warnings(np.full((300, 300), 0.7, np.float32)), "blank")
    assert has(image_warnings(cat_rgb), "colour image")
    assert has(image_warnings(cat_grey), "asymmetric")
    assert has(image_warnings(hand_like()), "black")
    assert has(image_warnings(255 - chest), "inverted polarity")
    assert has(image_warnings(chest, {"original_size": (120, 150)}), "small original (120x150")
    assert image_warnings(chest) == []
    assert has(image_warnings((chest // 8 + 100).astype(np.uint8)), "low contrast")


def test_polarity_check_on_real_dicoms(dicom_dir):
    """Adult chest films of other sites, read correctly: no polarity flag; the MONOCHROME1-relabelled copy
    of the SIIM film (its pixels come back inverted) is flagged."""
    for name in ("chest_cr_jpeg_baseline_siim.dcm", "chest_cr_monochrome1_10bit_no_meta.dcm",
                 "chest_dx_nih_no_finding.dcm", "chest_dx_nih_cardiomegaly.dcm"):
        assert not any("inverted polarity" in w for w in file_warnings(dicom_dir / name)), name
    assert any("inverted polarity" in w for w in file_warnings(dicom_dir / "chest_cr_jpeg_monochrome1_relabelled.dcm"))
    assert any("small original" in w for w in file_warnings(dicom_dir / "animal_thorax_dx_monochrome1.dcm"))


def test_real_chest_images_are_rarely_flagged(shared_sample):
    flagged = [(p.name, w) for p in shared_sample if (w := file_warnings(p))]
    assert len(flagged) <= 5, flagged


def test_the_intake_keeps_colour_for_its_flags(tmp_path):
    Image.fromarray(data.chelsea()).save(tmp_path / "cat.jpg")
    assert any("colour image" in w for w in file_warnings(tmp_path / "cat.jpg"))


def test_bad_input_is_refused():
    with pytest.raises(ValueError):
        image_warnings(np.full((10, 10), 2.0, np.float32))
    with pytest.raises(ValueError):
        image_warnings(np.zeros((2, 3, 4, 5), np.uint8))


# ------------------------------------------------------------------------------------------- embeddings
@pytest.mark.slow
def test_embedding_reference_flags_outliers(tiny_checkpoint, chest_xray, shared_sample):
    pred = load(tiny_checkpoint, device="cpu")
    assert feature_layer(pred.model) == "backbone.flatten"
    files = sorted((chest_xray / "train").rglob("*.jpeg"))
    fit_files = [files[i] for i in np.random.default_rng(1).choice(len(files), 200, replace=False)]
    held_out = [p for p in shared_sample if p not in set(fit_files)]
    ref = reference_from_images(pred, decode_all(fit_files, 64, progress=False).images)
    assert ref.mean.shape == (128,) and ref.precision.shape == (128, 128) and ref.n_fit == 200
    # new images of the same distribution: about 1 % beyond the out-of-fold 99th percentile
    f_held = embed(pred, decode_all(held_out, 64, progress=False).images)
    assert ref.flag(f_held).mean() <= 0.05
    odd = np.stack([np.zeros((64, 64), np.uint8), resize_uint8(to_uint8(hand_like()), 64)])
    assert ref.flag(embed(pred, odd)).all()
    assert isinstance(ref.flag(f_held[0]), bool)
    # the model is left without hooks
    assert sum(len(m._forward_pre_hooks) for m in pred.model.modules()) == 0


def test_embedding_reference_round_trips_through_a_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 8)) * np.arange(1, 9)
    ref = EmbeddingReference.fit(X, layer="head")
    assert abs((ref.distance(rng.normal(size=(2000, 8)) * np.arange(1, 9)) > ref.threshold).mean() - 0.01) < 0.015
    torch.save({"ood_reference": ref.to_dict()}, tmp_path / "c.pt")
    back = EmbeddingReference.from_dict(torch.load(tmp_path / "c.pt", weights_only=True)["ood_reference"])
    assert np.allclose(back.distance(X[:5]), ref.distance(X[:5]), rtol=1e-5) and back.threshold == ref.threshold
    assert back.layer == "head" and back.n_fit == 300


def test_reference_set_assesses_an_image_near_any_population(tmp_path):
    """Two populations far apart: each one's images pass; points between or beyond both are flagged; a single
    Gaussian of the pooled images would stretch over the gap and pass the point between them."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, (400, 6)), rng.normal(12, 1, (400, 6))
    both = ReferenceSet([EmbeddingReference.fit(a, space="s"), EmbeddingReference.fit(b, space="s")])
    assert (both.score(rng.normal(0, 1, (500, 6))) > 1).mean() < 0.05
    assert (both.score(rng.normal(12, 1, (500, 6))) > 1).mean() < 0.05
    between, beyond = np.full((1, 6), 6.0), np.full((1, 6), -8.0)
    assert both.score(between)[0] > 1 and both.score(beyond)[0] > 1
    assert EmbeddingReference.fit(np.vstack([a, b]), space="s").score(between)[0] < 1
    torch.save({"ood_reference": both.to_dict()}, tmp_path / "c.pt")
    back = reference_from_dict(torch.load(tmp_path / "c.pt", weights_only=True)["ood_reference"])
    assert isinstance(back, ReferenceSet) and back.features == "s"
    np.testing.assert_allclose(back.score(between), both.score(between), rtol=1e-5)
    with pytest.raises(ValueError, match="one feature space"):
        ReferenceSet([EmbeddingReference.fit(a, space="s"), EmbeddingReference.fit(b, space="t")])


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert frechet_distance(a, a) < 1e-6
    b = a + np.array([3.0, 0.0, 0.0])  # shifted mean: ||d||^2 = 9
    assert abs(frechet_distance(a, b) - 9.0) < 1e-3
    c = a * 2.0  # cov 4 I vs I: 3 * (1 + 4 - 2 * 2) = 3
    assert abs(frechet_distance(a, c) - 3.0) < 0.2


# ------------------------------------------------------------------------------------------- data compare
@pytest.fixture(scope="module")
def transformed(chest_xray, tmp_path_factory):
    """40 shared images, inverted, and heavily blurred (sigma 10 px at 224 px), as PNG folders."""
    root = tmp_path_factory.mktemp("transformed")
    files = sorted((chest_xray / "train").rglob("*.jpeg"))
    for i in np.random.default_rng(3).choice(len(files), 40, replace=False):
        a = np.asarray(Image.open(files[i]).convert("L"))
        for kind, b in (("inverted", 255 - a), ("blurred", gaussian_filter(a.astype(np.float32), 10))):
            (root / kind).mkdir(exist_ok=True)
            Image.fromarray(np.clip(np.rint(b), 0, 255).astype(np.uint8)).save(root / kind / f"{files[i].stem}.png")
    return root


@pytest.mark.slow
def test_data_compare_ranks_shifted_folders_further(tiny_checkpoint, chest_xray, transformed, tmp_path):
    normal, pneumonia = chest_xray / "train" / "NORMAL", chest_xray / "train" / "PNEUMONIA"
    same = data_compare(normal, pneumonia, tiny_checkpoint, out=tmp_path, limit=40)
    inv = data_compare(normal, transformed / "inverted", tiny_checkpoint, limit=40)
    blurred = data_compare(normal, transformed / "blurred", tiny_checkpoint, limit=40)
    assert same["intensity_js"] < 0.25 < inv["intensity_js"]
    assert same["intensity_wasserstein"] < inv["intensity_wasserstein"]
    assert inv["target_summary"]["flagged_fraction"] >= 0.9 and same["target_summary"]["flagged_fraction"] <= 0.1
    assert same["embedding_frechet"] < blurred["embedding_frechet"]
    assert same["size_wasserstein_px"] == 0.0 and same["reference_summary"]["short_side_median"] == 224
    assert same["reference_summary"]["n"] == same["target_summary"]["n"] == 40
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["intensity_js"] == same["intensity_js"]
    assert "intensity_js" in (tmp_path / "compare.md").read_text() and (tmp_path / "compare.png").stat().st_size > 0


def test_data_compare_subcommand(chest_xray, transformed, tmp_path):
    args = build_parser().parse_args(["data", "compare", "--reference", str(chest_xray / "train" / "NORMAL"), "--target",
                              str(transformed / "inverted"), "--out", str(tmp_path), "--limit", "20"])
    assert args.func(args) == 0
    assert json.loads((tmp_path / "compare.json").read_text())["target_summary"]["n"] == 20
