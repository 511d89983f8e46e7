"""Progress bars only on a terminal: ``pneumoscope train`` into a log file writes lines, no carriage-return frames."""
from __future__ import annotations

import io
import os
import subprocess
import sys

from pneumoscope.progress import bar


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_is_off_unless_stderr_is_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert bar(range(3)).disable is True
    monkeypatch.setattr(sys, "stderr", _Tty())
    b = bar(range(3), file=sys.stderr)
    assert b.disable is False and list(b) == [0, 1, 2]
    assert bar(range(3), disable=True, file=sys.stderr).disable is True  # the caller's choice is kept


def test_train_into_a_log_file_has_no_carriage_return_frames(chest_xray, tmp_path):
    log = tmp_path / "train.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as err:
        r = subprocess.run([sys.executable, "-m", "pneumoscope", "train", "--data", str(chest_xray), "--model",
                            "seed_cnn", "--out", str(tmp_path / "run"), "--limit", "60", "--epochs", "1",
                            "--image-size", "64", "--threads", "2"],
                           stdout=subprocess.DEVNULL, stderr=err, env=env, timeout=600)
    text = log.read_bytes()
    assert r.returncode == 0, text[-3000:]
    assert b"\r" not in text
    assert text.count(b"epoch 1/1") == 1, text[-3000:]  # one line per epoch
