"""The training split and its decoding, in-process and prefetched in a forked process (data/prepare.py)."""
import numpy as np
import pytest

from pneumoscope.config import resolve
from pneumoscope.data.prefetch import Prefetch
from pneumoscope.data.splits import decode_samples, split_samples
from pneumoscope.errors import DatasetLayoutError


def small_folder(chest_xray, root, n=12):
    """A class-folder dataset of n real images per class (symlinks), plus one corrupt file."""
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir(parents=True)
        for p in sorted((chest_xray / "train" / cls).glob("*.jpeg"))[:n]:
            (root / cls / p.name).symlink_to(p)
    good = sorted((chest_xray / "train" / "NORMAL").glob("*.jpeg"))[n]
    (root / "NORMAL" / "truncated.jpeg").write_bytes(good.read_bytes()[:3000])
    return root


def test_prefetch_gives_the_in_process_split_and_pixels(chest_xray):
    cfg = resolve(dict(data=str(chest_xray), limit=40, progress=False))
    p = Prefetch(cfg, 48)
    try:
        assert p.split() == split_samples(cfg)
        dtr, dva = p.decoded()
    finally:
        p.close()
    train, val, _, _ = split_samples(cfg)
    for got, samples in ((dtr, train), (dva, val)):
        want = decode_samples(samples, 48, cfg, progress=False)
        assert got.images.shape == (len(samples), 48, 48) and got.images.dtype == np.uint8
        np.testing.assert_array_equal(got.images, want.images)
        assert got.ok.all() and got.images.flags.writeable  # torch.from_numpy needs a writable array
    assert dtr.images[0].std() > 10  # real radiographs, not zeros


def test_prefetch_lists_bad_files_like_in_process(chest_xray, tmp_path):
    data = small_folder(chest_xray, tmp_path / "d")
    cfg = resolve(dict(data=str(data), val_fraction=0.25, progress=False))
    p = Prefetch(cfg, 32)
    try:
        train, val, _, _ = p.split()
        decoded = p.decoded()
    finally:
        p.close()
    samples = train + val
    errors = [e for d in decoded for e in d.errors]
    assert [path.name for path, _ in errors] == ["truncated.jpeg"]
    assert "truncated.jpeg" in errors[0][1]  # the message names the file
    ok = np.concatenate([d.ok for d in decoded])
    assert [s.path.name for s, k in zip(samples, ok) if not k] == ["truncated.jpeg"]


def test_prefetch_raises_the_childs_error_in_the_parent(tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = resolve(dict(data=str(tmp_path / "empty"), progress=False))
    with pytest.raises(DatasetLayoutError) as in_process:
        split_samples(cfg)
    p = Prefetch(cfg, 32)
    with pytest.raises(DatasetLayoutError) as prefetched:
        p.split()
    p.close()
    assert str(prefetched.value) == str(in_process.value)


def test_prefetch_start_declines_where_it_cannot_help(chest_xray, monkeypatch):
    cfg = resolve(dict(data=str(chest_xray)))
    assert Prefetch.start(cfg, None) is None
    monkeypatch.setenv("PNEUMOSCOPE_PREFETCH", "0")
    assert Prefetch.start(cfg, 64) is None
    monkeypatch.setenv("PNEUMOSCOPE_PREFETCH", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun: every rank prepares in-process
    assert Prefetch.start(cfg, 64) is None


def test_matches_compares_what_decides_the_split(chest_xray):
    cfg = resolve(dict(data=str(chest_xray), limit=20, progress=False))
    p = Prefetch(cfg, 32)
    try:
        assert p.matches(resolve(dict(data=str(chest_xray), limit=20, epochs=3, lr=0.1)))
        assert not p.matches(resolve(dict(data=str(chest_xray), limit=20, seed=1)))
        assert not p.matches(resolve(dict(data=str(chest_xray), limit=21)))
    finally:
        p.close()
