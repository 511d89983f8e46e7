"""Bad config values, bad checkpoints and unreadable files, in-process (#18): each refused with a message naming
the key or file, the value and what is allowed; never torch's advice to weaken its safe loader."""
from __future__ import annotations

import os
import pickle
import zipfile

import pytest

from pneumoscope.config import load_config
from pneumoscope.errors import CheckpointError, ConfigError

D = "data: x\n"
BAD_YAML = [  # YAML text -> message part
    ("epochs: true", "epochs=True is invalid: expected an integer, got bool"),
    ("image_size: 150.7", "image_size=150.7 is invalid: expected a whole number (no fraction)"),
    ("image_size: 100000", "image_size=100000 is invalid: allowed range [16, 1024]"),
    ("image_size: 8", "allowed range [16, 1024]"),
    ("epochs: 0", "epochs=0 is invalid: allowed range [1, 1000]"),
    ("epochs: ten", "epochs='ten' is invalid: expected an integer"),
    ("batch_size: 1", "batch_size=1 is invalid: allowed range [2, 4096]"),
    ("batch_size: 100000", "allowed range [2, 4096]"),
    ("lr: 0", "lr=0 is invalid: allowed range (0, 10]"),
    ("lr: 11", "allowed range (0, 10]"),
    ("lr: .nan", "expected a finite number"),
    ("val_fraction: 1", "val_fraction=1 is invalid: allowed range (0, 1)"),
    ("threads: 300", "threads=300 is invalid: allowed range [0, 256]"),
    ("workers: -1", "workers=-1 is invalid: allowed range [0, 256]"),
    ("augment: 1", "augment=1 is invalid: expected true or false"),
    ("augment: maybe", "augment='maybe' is invalid: expected true or false"),
    ("labels: tri", "labels='tri' is invalid: choose binary, ternary"),
    ("model_kwargs: [1, 2]", "model_kwargs=[1, 2] is invalid: expected a mapping"),
    ("label_smoothing: 0.5", "allowed range [0, 0.5)"),
    ("data: [a, b]", "expected a single text value"),
]


@pytest.mark.parametrize("text,msg", BAD_YAML)
def test_bad_yaml_values_are_refused_naming_key_value_and_range(tmp_path, text, msg):
    y = tmp_path / "c.yaml"
    y.write_text(D + text + "\n")
    with pytest.raises(ConfigError, match="config file .*c.yaml: value ") as e:
        load_config(y)
    assert msg in str(e.value)


def test_a_flag_never_hides_an_invalid_yaml_value_and_flags_are_checked_the_same(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text(D + "epochs: true\n")
    with pytest.raises(ConfigError, match="c.yaml: value epochs=True"):
        load_config(y, epochs=3)
    with pytest.raises(ConfigError, match=r"image_size=100000 is invalid: allowed range \[16, 1024\]"):
        load_config(None, data="x", image_size=100000)


def test_legitimate_values_are_accepted(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text(D + "epochs: 3.0\naugment: no\nhflip: yes\nlr: '1e-3'\nimage_size: 1024\nmodel_kwargs: {bn_momentum: 0.01}\n")
    c = load_config(y)
    assert (c.epochs, c.augment, c.hflip, c.lr, c.image_size) == (3, False, True, 1e-3, 1024)


def _checkpoints(tmp_path):
    import torch

    from pneumoscope.inference.default_model import default_checkpoint

    real = default_checkpoint().read_bytes()
    files = {"zero.pt": b"", "random.pt": os.urandom(4096), "text.pt": b"just some notes\n" * 20,
             "pickle.pt": pickle.dumps({"x": [1, 2]}), "truncated.pt": real[:len(real) // 2],
             "pop_empty.pt": b"."}  # torch's weights-only unpickler: IndexError 'pop from empty list'
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with zipfile.ZipFile(tmp_path / "zip.pt", "w") as z:
        z.writestr("a.txt", "a zip, not torch's")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "linear.pt")
    torch.save({"a": 1}, tmp_path / "dict.pt")
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "state_dict.pt")
    return sorted(p for p in tmp_path.iterdir() if p.suffix == ".pt")


def test_garbage_checkpoints_say_what_a_checkpoint_is(tmp_path):
    from pneumoscope.models.checkpoint import load_checkpoint

    paths = _checkpoints(tmp_path)
    assert len(paths) == 10
    for p in paths:
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(p)
        msg = str(e.value)
        assert msg.startswith(f"{p} is not a pneumoscope checkpoint (expected a file written by pneumoscope train, "
                              "with keys arch, preprocess, label_names, state_dict)"), msg
        assert "weights_only" not in msg and "safe_globals" not in msg and "\n" not in msg, msg


def test_unreadable_file_is_an_error_row_not_a_lost_batch(bundled_predictor, items, tmp_path, monkeypatch):
    """PermissionError (tests run as root, so chmod cannot make a file unreadable: open is made to refuse)."""
    import builtins

    from tests.bad_input.corpus import write_items

    good, locked = write_items([items[0]], tmp_path)[0], tmp_path / "locked.jpeg"
    locked.write_bytes(items[0].data)
    real_open = builtins.open

    def guarded(f, *a, **kw):
        if str(f) == str(locked):
            raise PermissionError(13, "Permission denied", str(f))
        return real_open(f, *a, **kw)

    monkeypatch.setattr(builtins, "open", guarded)
    r_good, r_locked = bundled_predictor.predict([good, locked])
    assert r_good.label in ("NORMAL", "PNEUMONIA")
    assert r_locked.error == (f"{locked}: permission denied; make the file readable (chmod a+r) or run as a user "
                                 "who can read it")
