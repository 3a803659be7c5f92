"""Static layering rules, checked on the source with ``ast`` (every import, including ones inside
functions), in the ``boxrefine.*`` namespace the folders are installed under: ``shared`` never imports a
stage (except the composition root ``shared/cli/main.py``), library code in ``shared`` never imports
the CLI plumbing in ``shared/cli``, no stage imports another stage, only ``extract`` opens images
(``cv2`` / ``boxrefine.shared.imageio``), and nothing imports the old top-level names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

STAGES = ("extract", "train", "evaluate")
PACKAGES = ("shared", *STAGES)
COMPOSITION_ROOT = "shared/cli/main.py"
NS = "boxrefine"
# docs/architecture.md (invariant 1) names one exception to "only extract opens images": `evaluate --vis`, which
# draws boxes over the images. It lives in this one module, which evaluate imports only for --vis.
IMAGE_EXCEPTIONS = ("evaluate/vis.py",)


def _module_name(path: Path, root: Path = REPO) -> str:
    """``shared/store.py`` → ``boxrefine.shared.store`` (the installed name of the file)."""
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([NS, *parts])


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
    """The boxrefine package a module belongs to (``boxrefine.train.recipe`` → ``train``); other
    modules give their top-level name (``cv2``)."""
    parts = name.split(".")
    return parts[1] if parts[0] == NS and len(parts) > 1 else parts[0]


def _sources(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


ALL_SOURCES = [p for pkg in PACKAGES for p in _sources(pkg)]


def _rel(p: Path) -> str:
    return p.relative_to(REPO).as_posix()


def test_sources_found() -> None:
    rels = {_rel(p) for p in ALL_SOURCES}
    assert {"shared/cli/main.py", "shared/store.py", "extract/run.py", "train/cli.py", "evaluate/cli.py"} <= rels


def test_import_collector_sees_nested_relative_and_dynamic_imports(tmp_path: Path) -> None:
    """The checker itself must not be blind: function-level, relative and dynamic imports count."""
    fake = tmp_path / "train" / "fake.py"
    fake.parent.mkdir()
    fake.write_text("import os\n"
                    "def f():\n"
                    "    from boxrefine.extract.run import run_extract\n"
                    "    import cv2 as c\n"
                    "from . import cli\n"
                    "from .sub.mod import thing\n"
                    "from boxrefine.shared import imageio\n"
                    "import importlib\n"
                    "importlib.import_module('evaluate.cli')\n")
    got = imports_of(fake, root=tmp_path)
    assert {"os", "boxrefine.extract.run", "cv2", "boxrefine.train.cli", "boxrefine.train.sub.mod",
            "boxrefine.shared.imageio", "evaluate.cli"} <= got


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
                 if _top(m) == "cv2" or m == f"{NS}.shared.imageio" or m.startswith(f"{NS}.shared.imageio."))
    assert not bad, f"{_rel(path)} imports {bad}: only the extract stage decodes images"


@pytest.mark.parametrize("path", ALL_SOURCES, ids=_rel)
def test_no_old_top_level_imports(path: Path) -> None:
    """Every project import goes through the ``boxrefine`` namespace: a bare ``evaluate`` or ``train``
    would pick up another package of that name (Hugging Face's ``evaluate``) or fail when installed."""
    bad = sorted(m for m in imports_of(path) if m.split(".")[0] in PACKAGES)
    assert not bad, f"{_rel(path)} imports {bad}; use boxrefine.<package>"


@pytest.mark.parametrize("path", [p for p in ALL_SOURCES if _top(_module_name(p)) == "shared"
                                  and not _rel(p).startswith(("shared/cli/", "shared/dev/"))], ids=_rel)
def test_library_code_never_imports_cli_plumbing(path: Path) -> None:
    bad = sorted(m for m in imports_of(path) if m.startswith((f"{NS}.shared.cli", f"{NS}.shared.dev", "typer")))
    assert not bad, f"{_rel(path)} is library code but imports {bad}"
