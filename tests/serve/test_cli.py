"""`pneumoscope serve` / `pneumoscope db export` argument handling (through the sub-parsers cli.py adds)."""
from __future__ import annotations

import argparse

import pytest

from pneumoscope.cli import build_parser, main
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


def test_serve_db_in_a_missing_folder_or_not_a_database_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("PNEUMOSCOPE_API_KEY", raising=False)
    a = parse(["serve", "--db", str(tmp_path / "missing" / "s.db")])
    with pytest.raises(ConfigError, match=r"study database .*missing.s\.db: the folder .*missing does not exist"):
        a.func(a)
    (tmp_path / "image.jpeg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 100)
    for argv in (["serve", "--db", str(tmp_path / "image.jpeg")], ["serve", "--workers", "2", "--db",
                                                                    str(tmp_path / "image.jpeg")],
                 ["db", "migrate", "--db", str(tmp_path / "image.jpeg")]):
        a = parse(argv)
        with pytest.raises(ConfigError, match=r"image\.jpeg is not a SQLite database"):
            a.func(a)


def test_workers_default_and_check(caplog):
    assert parse(["serve"]).workers == 1 and parse(["serve", "--workers", "3"]).workers == 3
    assert main(["serve", "--workers", "0"]) == 2  # checked with every option (cli/options.py), before any work
    assert "--workers 0 is invalid: allowed is 1 to 64" in caplog.text
