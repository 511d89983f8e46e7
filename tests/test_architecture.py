"""The package's structure: no import circle, arrows only downwards between rooms, a torch-free CLI start."""
from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "pneumoscope"
# lower rooms first; a module may import its own room and the rooms before it, never one after it
ROOMS = ["_lazy", "errors", "progress", "data", "models.names", "models", "config", "inference", "evaluation", "trust",
         "training", "studies", "studydb", "serve", "dicom", "cli", "__main__"]


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(PKG.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Every pneumoscope import of every module (top-level and inside functions), resolved to a module."""
    def resolve(name: str) -> str:
        while name not in mods:
            name = name.rpartition(".")[0]
        return name

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pneumoscope"):
                targets = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("pneumoscope")]
            else:
                continue
            edges[name] |= {resolve(t) for t in targets} - {name}
    return edges


def _room(module: str) -> int:
    rel = module.removeprefix("pneumoscope").lstrip(".")
    return max((i for i, r in enumerate(ROOMS) if rel == r or rel.startswith(r + ".")), default=-1)


def test_no_import_circle():
    edges = _imports(_modules())
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])


def test_imports_only_point_down_and_training_is_imported_only_by_studies_and_cli():
    edges = _imports(_modules())
    up = [(a, b) for a, bs in edges.items() for b in bs if _room(b) > _room(a)]
    assert not up, up
    into_training = {a for a, bs in edges.items() for b in bs
                     if b.startswith("pneumoscope.training") and not a.startswith("pneumoscope.training")}
    assert {_room(a) for a in into_training} <= {ROOMS.index("studies"), ROOMS.index("cli")}, into_training


def test_the_dicom_node_and_the_service_share_the_study_database_not_each_other():
    """dicom/ imports nothing from serve/ (nor FastAPI), serve/ nothing from dicom/: both go through studydb/."""
    edges = _imports(_modules())
    crossing = [(a, b) for a, bs in edges.items() for b in bs
                if (a.startswith("pneumoscope.dicom") and b.startswith("pneumoscope.serve"))
                or (a.startswith("pneumoscope.serve") and b.startswith("pneumoscope.dicom"))]
    assert not crossing, crossing
    for path in (PKG / "dicom").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "fastapi" or n.startswith(("fastapi.", "starlette")) for n in names), (path, names)


def test_no_module_over_400_lines():
    long = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


@pytest.mark.parametrize("room", ["models", "inference", "evaluation", "trust", "training", "serve", "dicom"])
def test_room_api_names_resolve(room):
    mod = importlib.import_module(f"pneumoscope.{room}")
    for name in mod.__all__:
        assert getattr(mod, name) is not None
    with pytest.raises(AttributeError, match="no attribute"):
        mod.not_a_name  # noqa: B018


def test_cli_and_package_import_neither_torch_nor_fastapi():
    code = ("import sys, pneumoscope, pneumoscope.cli, pneumoscope.config, pneumoscope.models.names; "
            "pneumoscope.cli.build_parser(); print(sorted(m for m in ('torch', 'fastapi', 'sklearn', 'monai') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
