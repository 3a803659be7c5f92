"""Static layering rules, checked on the source with ``ast`` (every import, including ones inside
functions): ``shared`` never imports a stage (except the composition root ``shared/cli.py``), no stage
imports another stage, and only ``extract`` opens images (``cv2`` / ``shared.imageio``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

STAGES = ("extract", "train", "evaluate")
PACKAGES = ("shared", *STAGES)
COMPOSITION_ROOT = "shared/cli.py"
# DESIGN.md invariant 1 names one exception to "only extract opens images": `evaluate --vis`, which
# draws boxes over the images. It lives in this one module, which evaluate imports only for --vis.
IMAGE_EXCEPTIONS = ("evaluate/vis.py",)


def _module_name(path: Path, root: Path = REPO) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, root: Path = REPO) -> set[str]:
    """Absolute names of every module ``path`` imports (``from a.b import c`` gives a.b and a.b.c)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    package = _module_name(path, root).split(".")
    if not is_pkg:
        package = package[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call) and _is_dynamic_import(node):
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.add(arg.value)
    return found


def _is_dynamic_import(node: ast.Call) -> bool:
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
    return name in ("import_module", "__import__") and bool(node.args)


def _top(name: str) -> str:
    return name.split(".")[0]


def _sources(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


ALL_SOURCES = [p for pkg in PACKAGES for p in _sources(pkg)]


def _rel(p: Path) -> str:
    return p.relative_to(REPO).as_posix()


def test_sources_found() -> None:
    rels = {_rel(p) for p in ALL_SOURCES}
    assert {"shared/cli.py", "shared/store.py", "extract/run.py", "train/cli.py", "evaluate/cli.py"} <= rels


def test_import_collector_sees_nested_relative_and_dynamic_imports(tmp_path: Path) -> None:
    """The checker itself must not be blind: function-level, relative and dynamic imports count."""
    fake = tmp_path / "train" / "fake.py"
    fake.parent.mkdir()
    fake.write_text("import os\n"
                    "def f():\n"
                    "    from extract.run import run_extract\n"
                    "    import cv2 as c\n"
                    "from . import cli\n"
                    "from .sub.mod import thing\n"
                    "from shared import imageio\n"
                    "import importlib\n"
                    "importlib.import_module('evaluate.cli')\n")
    got = imports_of(fake, root=tmp_path)
    assert {"os", "extract.run", "cv2", "train.cli", "train.sub.mod", "shared.imageio", "evaluate.cli"} <= got


@pytest.mark.parametrize("path", [p for p in ALL_SOURCES if _top(_module_name(p)) == "shared"], ids=_rel)
def test_shared_never_imports_a_stage(path: Path) -> None:
    if _rel(path) == COMPOSITION_ROOT:
        return
    bad = sorted(m for m in imports_of(path) if _top(m) in STAGES)
    assert not bad, f"{_rel(path)} imports stage module(s) {bad}; only {COMPOSITION_ROOT} may"


def test_composition_root_mounts_every_stage() -> None:
    tops = {_top(m) for m in imports_of(REPO / COMPOSITION_ROOT)}
    assert set(STAGES) <= tops


@pytest.mark.parametrize("path", [p for p in ALL_SOURCES if _top(_module_name(p)) in STAGES], ids=_rel)
def test_no_stage_imports_another_stage(path: Path) -> None:
    own = _top(_module_name(path))
    bad = sorted(m for m in imports_of(path) if _top(m) in STAGES and _top(m) != own)
    assert not bad, f"{_rel(path)} ({own}) imports other stage(s): {bad}"


@pytest.mark.parametrize("path", [p for p in ALL_SOURCES if _top(_module_name(p)) in ("train", "evaluate")],
                         ids=_rel)
def test_only_extract_opens_images(path: Path) -> None:
    if _rel(path) in IMAGE_EXCEPTIONS:
        return
    bad = sorted(m for m in imports_of(path)
                 if _top(m) == "cv2" or m == "shared.imageio" or m.startswith("shared.imageio."))
    assert not bad, f"{_rel(path)} imports {bad}: only the extract stage decodes images"
