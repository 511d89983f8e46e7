"""Shared fixtures. The real data lives beside the repository in ../shared/data (never copied here)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PNEUMOSCOPE_SHARED_DATA", REPO.parent / "shared" / "data"))


REQUIRE_SYSTEM_DEPS = "PNEUMOSCOPE_REQUIRE_SYSTEM_DEPS"
INSTALL_HINT = "sudo apt-get install {package}, or bash scripts/install-system-deps.sh"


def require_program(name: str, package: str, candidates: list[str | Path] = ()) -> Path:
    """The path of an outside program a test drives (Debian's chromium, PostgreSQL's initdb, ...): the first of
    ``candidates`` that exists, else ``name`` on $PATH. When it is missing the test is skipped, with the install
    command as the reason; under ``PNEUMOSCOPE_REQUIRE_SYSTEM_DEPS=1`` (CI) a missing program fails the test."""
    for c in candidates:
        if Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c)
    found = shutil.which(name)
    if found:
        return Path(found)
    reason = f"needs Debian's {package} ({name} not found): " + INSTALL_HINT.format(package=package)
    if os.environ.get(REQUIRE_SYSTEM_DEPS) == "1":
        pytest.fail(f"{reason} [{REQUIRE_SYSTEM_DEPS}=1]", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def system_program():
    """``system_program(name, package, candidates)``: see ``require_program``."""
    return require_program


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data (the chest_xray training split and the DICOM test files)."""
    if not (SHARED_DATA / "chest_xray" / "train").is_dir():
        raise FileNotFoundError(
            f"shared data not found at {SHARED_DATA}: clone the project beside ../shared/data "
            "or set PNEUMOSCOPE_SHARED_DATA"
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def chest_xray(shared_data: Path) -> Path:
    return shared_data / "chest_xray"


@pytest.fixture(scope="session")
def dicom_dir(shared_data: Path) -> Path:
    return shared_data / "dicom"


# The tiny model shared by every test that needs a trained checkpoint (trained once per session):
# 300 real training images, 5 epochs at 64 px, lr 3e-3: with fewer epochs (or the default 1e-3) seed_cnn is left
# with nearly constant logits here (temperature fit clipped, all-zero Grad-CAM maps; measured with 3 epochs).
TINY = dict(model="seed_cnn", image_size=64, limit=300, epochs=5, lr=3e-3, batch_size=16, threads=2, progress=False)


@pytest.fixture(scope="session")
def tiny_checkpoint(chest_xray, tmp_path_factory) -> Path:
    from pneumoscope.training.loop import train

    out = tmp_path_factory.getbasetemp() / "tiny_seed_cnn_64"
    if not (out / "best.pt").exists():
        train(dict(TINY, data=str(chest_xray), out=str(out)))
    return out / "best.pt"
