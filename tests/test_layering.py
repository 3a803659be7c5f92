"""The house's import rules, checked on the source with ``ast`` (every import, including ones inside
functions; not those under ``if TYPE_CHECKING:``, which never run), in the ``boxrefine.*`` namespace
the folders are installed under (docs/architecture.md, "Layering and the import namespace"):

* the library (``shared``) is a stack of named sub-packages, each importing only its own floor and
  the floors below (:data:`FLOORS`); no module imports its own package (``__init__`` re-exports);
* there is no import loop anywhere in the package (here ``TYPE_CHECKING`` imports count too);
* ``shared`` never imports a stage, except the composition root ``shared/cli/main.py``; library code
  never imports the CLI plumbing (``shared/cli``, typer); no stage imports another stage;
* only ``extract`` opens images (``cv2``, ``shared/data/imageio.py``), checked through every import
  chain: train, evaluate and the config load no image library; nothing imports bare top-level names.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

STAGES = ("extract", "train", "evaluate")
PACKAGES = ("shared", *STAGES)
COMPOSITION_ROOT = "shared/cli/main.py"
NS = "boxrefine"
# The library's floors, bottom first: a module imports modules of its own floor or below.
FLOORS = (
    ("shared", "shared.errors", "shared.yamlkeys"),
    ("shared.runtime",),  # console, files, signals, workers, torchrun ranks, device and precision
    ("shared.data",),  # COCO annotations and detections, intensity mapping, image decoding, drawing
    ("shared.config",),  # pipeline.yaml: one typed model per section
    ("shared.geometry",),  # the frames and box maths
    ("shared.model",),  # HQ-SAM, the fast HQ decoder, the refiner heads, checkpoints
    ("shared.store",),  # the feature store
    ("shared.scoring",),  # predictions, coarse boxes, metrics, the refine predictor
    ("shared.dev",),  # the demo data set and signal stores (library code of the dev commands)
    ("shared.cli",),  # the command line: the composition root and its commands
)
IMAGE_MODULES = ("cv2", f"{NS}.shared.data.imageio")
# docs/architecture.md (invariant 1) names one exception to "only extract opens images": `evaluate --vis`, which
# draws boxes over the images. It lives in this one module, which evaluate imports only when it draws (--vis,
# and the report's gallery crops when the image folder is there: evaluate/outputs.py).
IMAGE_EXCEPTIONS = ("evaluate/vis.py",)


def _module_name(path: Path, root: Path = REPO) -> str:
    """``shared/store/split.py`` → ``boxrefine.shared.store.split`` (the installed name of the file)."""
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([NS, *parts])


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out |= {id(c) for stmt in node.body for c in ast.walk(stmt)}
    return out


def imports_of(path: Path, root: Path = REPO, type_checking: bool = False) -> set[str]:
    """Absolute names of every module ``path`` imports (``from a.b import c`` gives a.b and a.b.c);
    those under ``if TYPE_CHECKING:`` only with ``type_checking``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = set() if type_checking else _type_checking_nodes(tree)
    is_pkg = path.name == "__init__.py"
    package = _module_name(path, root).split(".")
    if not is_pkg:
        package = package[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
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
MODULES = {_module_name(p): p for p in ALL_SOURCES}


def _rel(p: Path) -> str:
    return p.relative_to(REPO).as_posix()


def graph(type_checking: bool = False) -> dict[str, set[str]]:
    """boxrefine module → the boxrefine modules it imports (a name imported from a module is the module)."""
    return {m: {i for i in imports_of(p, type_checking=type_checking) if i in MODULES and i != m}
            for m, p in MODULES.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def floor(module: str) -> int | None:
    """The floor of a library module (None for a stage)."""
    name = module.removeprefix(f"{NS}.")
    best = None
    for k, names in enumerate(FLOORS):
        for n in names:
            if (name == n or name.startswith(n + ".")) and (best is None or len(n) > len(best[1])):
                best = (k, n)
    return best[0] if best else None


def test_sources_found() -> None:
    rels = {_rel(p) for p in ALL_SOURCES}
    assert {"shared/cli/main.py", "shared/store/feature_store.py", "extract/run.py", "train/cli.py",
            "evaluate/cli.py", "extract/refine/run.py"} <= rels


def test_import_collector_sees_nested_relative_and_dynamic_imports(tmp_path: Path) -> None:
    """The checker itself must not be blind: function-level, relative and dynamic imports count;
    imports under ``if TYPE_CHECKING:`` (never run) do not."""
    fake = tmp_path / "train" / "fake.py"
    fake.parent.mkdir()
    fake.write_text("import os\n"
                    "from typing import TYPE_CHECKING\n"
                    "if TYPE_CHECKING:\n"
                    "    from boxrefine.evaluate.run import Evaluator\n"
                    "def f():\n"
                    "    from boxrefine.extract.run import run_extract\n"
                    "    import cv2 as c\n"
                    "from . import cli\n"
                    "from .sub.mod import thing\n"
                    "from boxrefine.shared.data import imageio\n"
                    "import importlib\n"
                    "importlib.import_module('evaluate.cli')\n")
    got = imports_of(fake, root=tmp_path)
    assert {"os", "boxrefine.extract.run", "cv2", "boxrefine.train.cli", "boxrefine.train.sub.mod",
            "boxrefine.shared.data.imageio", "evaluate.cli"} <= got
    assert "boxrefine.evaluate.run" not in got
    assert "boxrefine.evaluate.run" in imports_of(fake, root=tmp_path, type_checking=True)


def test_the_cycle_finder_finds_a_loop() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_loop_in_the_package() -> None:
    """No loop, counting function-local imports and those made only for type annotations."""
    found = cycles(graph(type_checking=True))
    assert not found, f"import loops (function-local and TYPE_CHECKING imports included): {found}"


def test_every_library_module_has_a_floor() -> None:
    lost = sorted(m for m in MODULES if _top(m) == "shared" and floor(m) is None)
    assert not lost, f"library modules outside FLOORS: {lost}"


@pytest.mark.parametrize("path", [p for p in ALL_SOURCES if _top(_module_name(p)) == "shared"
                                  and _rel(p) != COMPOSITION_ROOT], ids=_rel)
def test_library_imports_only_its_floor_and_below(path: Path) -> None:
    me = _module_name(path)
    up = sorted(i for i in imports_of(path) if i in MODULES and floor(i) is not None and floor(i) > floor(me))
    assert not up, f"{_rel(path)} (floor {FLOORS[floor(me)][0]}) imports modules above it: {up}"


@pytest.mark.parametrize("path", [p for p in ALL_SOURCES if p.name != "__init__.py"], ids=_rel)
def test_no_module_imports_its_own_package(path: Path) -> None:
    """A package's ``__init__`` may re-export its modules; a module importing the package itself would
    run into a half-initialised ``__init__``."""
    package = _module_name(path).rsplit(".", 1)[0]
    own = {i for i in imports_of(path) if i == package}
    assert not own, f"{_rel(path)} imports its own package {package}: import the module that defines the name"


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


def _reaches(start: str, g: dict[str, set[str]], skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Every module ``start`` loads through boxrefine modules (``skip``: modules imported only on
    request), with the module that imports it."""
    seen = {start: ""}
    todo = [start]
    while todo:
        m = todo.pop()
        for i in imports_of(MODULES[m]):
            if i not in seen and i not in skip:
                seen[i] = m
                if i in MODULES:
                    todo.append(i)
    return seen


@pytest.mark.parametrize("path", [p for p in ALL_SOURCES if _top(_module_name(p)) in ("train", "evaluate")
                                  or _rel(p) == "shared/config.py"], ids=_rel)
def test_only_extract_opens_images(path: Path) -> None:
    """Through every chain of imports (function-local ones included): an image library reached from
    train, evaluate or the config names the module that imports it."""
    if _rel(path) in IMAGE_EXCEPTIONS:
        return
    skip = tuple(_module_name(REPO / p) for p in IMAGE_EXCEPTIONS)
    reached = _reaches(_module_name(path), graph(), skip)
    bad = {m: reached[m] for m in reached if _top(m) == "cv2" or m in IMAGE_MODULES}
    assert not bad, f"{_rel(path)} loads image code: {bad} (module → the module importing it)"


def test_train_evaluate_and_the_config_load_no_image_library() -> None:
    """The same, as Python runs it: importing the train and evaluate entry points and the config
    leaves cv2 unloaded."""
    code = ("import sys, boxrefine.shared.config, boxrefine.train.recipe, boxrefine.evaluate.run; "
            "print(sorted(m for m in sys.modules if m == 'cv2' or m.endswith('.imageio')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


@pytest.mark.parametrize("path", ALL_SOURCES, ids=_rel)
def test_no_old_top_level_imports(path: Path) -> None:
    """Every project import goes through the ``boxrefine`` namespace: a bare ``evaluate`` or ``train``
    would pick up another package of that name (Hugging Face's ``evaluate``) or fail when installed."""
    bad = sorted(m for m in imports_of(path) if m.split(".")[0] in PACKAGES)
    assert not bad, f"{_rel(path)} imports {bad}; use boxrefine.<package>"


@pytest.mark.parametrize("path", [p for p in ALL_SOURCES if _top(_module_name(p)) == "shared"
                                  and not _rel(p).startswith("shared/cli/")], ids=_rel)
def test_library_code_never_imports_cli_plumbing(path: Path) -> None:
    bad = sorted(m for m in imports_of(path) if m.startswith(f"{NS}.shared.cli") or _top(m) == "typer")
    assert not bad, f"{_rel(path)} is library code but imports {bad}"
