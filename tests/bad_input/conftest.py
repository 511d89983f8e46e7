"""Fixtures of the bad-input corpus (#18): the corpus written once per session, the bundled model loaded once."""
from __future__ import annotations

import pytest

from tests.bad_input.corpus import image_items


@pytest.fixture(scope="session")
def items(chest_xray, dicom_dir):
    return image_items(chest_xray, dicom_dir)


@pytest.fixture(scope="session")
def bundled_predictor():
    from pneumoscope.inference.loader import load

    return load(None, device="cpu")
