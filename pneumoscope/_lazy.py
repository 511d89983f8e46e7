"""Lazy public names for the sub-packages: ``import pneumoscope.models`` must not import torch.

Each room's ``__init__.py`` lists its public API as ``{name: module}``; a name is imported from its module on
first access (PEP 562), so ``pneumoscope --help`` and torch-free modules (``training.config``, ``models.names``)
load nothing heavy.
"""
from __future__ import annotations

import importlib
from typing import Callable


def lazy_api(package: str, api: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose public ``api`` maps each name to its module (relative)."""

    def __getattr__(name: str) -> object:
        if name not in api:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{api[name]}"), name)

    def __dir__() -> list[str]:
        return sorted(api)

    return __getattr__, __dir__
