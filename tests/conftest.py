"""Shared fixtures. The real data lives beside the repository in ../shared/data (never copied here)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PNEUMOSCOPE_SHARED_DATA", REPO.parent / "shared" / "data"))


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
