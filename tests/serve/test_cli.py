"""`pneumoscope serve` / `pneumoscope db export` argument handling (through the sub-parsers cli.py adds)."""
from __future__ import annotations

import argparse

import pytest

from pneumoscope.cli import build_parser
from pneumoscope.errors import CheckpointError, ConfigError


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def test_serve_defaults():
    a = parse(["serve"])
    assert (a.checkpoint, a.db, a.host, a.port, a.api_key, a.pseudonymize) == (
        None, "pneumoscope-studies.db", "127.0.0.1", 8000, None, False)
    assert a.max_upload_mb == 20.0
    a = parse(["db", "export", "--db", "s.db", "--out", "x"])
    assert (a.db, a.format, a.out) == ("s.db", "csv", "x")


def test_missing_checkpoint_is_a_clear_error_before_serving(tmp_path, monkeypatch):
    monkeypatch.delenv("PNEUMOSCOPE_API_KEY", raising=False)
    a = parse(["serve", "--checkpoint", str(tmp_path / "nope.pt"), "--db", str(tmp_path / "s.db")])
    with pytest.raises(CheckpointError, match="nope.pt not found"):
        a.func(a)


def test_pseudonymize_needs_a_secret_salt(tmp_path, monkeypatch):
    monkeypatch.setenv("PNEUMOSCOPE_PSEUDONYM_SALT", "short")
    a = parse(["serve", "--pseudonymize", "--db", str(tmp_path / "s.db")])
    with pytest.raises(ConfigError, match="PNEUMOSCOPE_PSEUDONYM_SALT"):
        a.func(a)
