"""The one check of outside programs (tests/conftest.py): skipped with the install command, failed under CI."""
from __future__ import annotations

import pytest

from tests.conftest import REQUIRE_SYSTEM_DEPS, require_program


def test_missing_program_skips_with_the_install_command(monkeypatch, tmp_path):
    monkeypatch.delenv(REQUIRE_SYSTEM_DEPS, raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"needs Debian's chromium .*sudo apt-get install chromium, or "
                                                    r"bash scripts/install-system-deps.sh"):
        require_program("no-such-program-xyz", "chromium", [tmp_path / "absent"])


def test_missing_program_fails_when_system_deps_are_required(monkeypatch):
    monkeypatch.setenv(REQUIRE_SYSTEM_DEPS, "1")
    with pytest.raises(pytest.fail.Exception, match="postgresql"):
        require_program("no-such-program-xyz", "postgresql")


def test_present_program_is_found(tmp_path):
    exe = tmp_path / "tool"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    assert require_program("no-such-program-xyz", "x", [exe]) == exe
    assert require_program("sh", "dash").name == "sh"
