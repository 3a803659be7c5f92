"""The four folders install as one ``boxrefine`` package (its ``__init__`` in ``boxrefine/``: the Python
API), editable (this venv) and from a wheel; importing the API is quiet."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest
from conftest import REPO

FOLDERS = ("shared", "extract", "train", "evaluate")
ROOT = "boxrefine"  # the package's own __init__: the Python API and __version__


def test_every_package_folder_is_listed_in_pyproject() -> None:
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {"boxrefine." + ".".join(p.parent.relative_to(REPO).parts)
               for f in FOLDERS for p in (REPO / f).rglob("__init__.py")}
    assert set(cfg["packages"]) == on_disk | {"boxrefine"}
    assert cfg["package-dir"] == {"boxrefine": ROOT, **{f"boxrefine.{f}": f for f in FOLDERS}}
    assert [p.name for p in (REPO / ROOT).iterdir() if p.suffix == ".py"] == ["__init__.py"]


def test_python_api_is_quiet_and_versioned(tmp_path: Path) -> None:
    """``from boxrefine import RefinePredictor`` and ``boxrefine.__version__`` (pyproject's version), in a
    fresh process with every warning shown: not one line on stderr, also once HQ-SAM's package loads."""
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    code = ("import sys, numpy as np, boxrefine\n"
            "assert 'torch' not in sys.modules  # import boxrefine stays cheap\n"
            "from boxrefine import RefinePredictor\n"
            "from boxrefine.shared.model.sam import build_sam_heads, encoder_input\n"
            "encoder_input(np.zeros((8, 8, 3), np.uint8))\n"
            "build_sam_heads('vit_tiny', None, 0, 'cpu', announce=False)\n"
            "print(boxrefine.__version__, RefinePredictor.__name__, hasattr(RefinePredictor, 'from_run'))\n")
    out = subprocess.run([sys.executable, "-W", "default", "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [version, "RefinePredictor", "True"]
    assert out.stderr == ""


def test_editable_install_imports_from_the_folders() -> None:
    import boxrefine.evaluate.run as er
    import boxrefine.shared.store.feature_store as st

    assert Path(er.__file__).resolve() == REPO / "evaluate" / "run.py"
    assert Path(st.__file__).resolve() == REPO / "shared" / "store" / "feature_store.py"


@pytest.mark.slow
def test_wheel_installs_beside_a_module_named_evaluate(tmp_path: Path) -> None:
    """Hugging Face's ``evaluate`` (here: any module of that name) and boxrefine coexist."""
    src, wheels = tmp_path / "src", tmp_path / "wheels"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for folder in (*FOLDERS, ROOT):  # a copy: building writes build/ and *.egg-info beside the sources
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(src)], check=True, capture_output=True)
    wheel = next(wheels.glob("boxrefine-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    # the dependencies come from this test's environment; boxrefine itself only from the wheel
    deps = [p for p in sys.path if p.endswith("site-packages")]
    (site / "deps.pth").write_text("\n".join(deps) + "\n")
    py = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True)
    work = tmp_path / "work"
    work.mkdir()
    (work / "evaluate.py").write_text("WHO = 'the other evaluate'\n")
    (work / "train.py").write_text("WHO = 'the other train'\n")
    code = ("import evaluate, train, boxrefine.evaluate.run as er, boxrefine.train.recipe as tr\n"
            "import boxrefine.shared.cli.main\n"
            "from boxrefine import RefinePredictor, __version__\n"
            "assert evaluate.WHO == 'the other evaluate' and train.WHO == 'the other train'\n"
            "assert 'site-packages' in er.__file__ and 'site-packages' in tr.__file__, (er.__file__, tr.__file__)\n"
            "print('ok')\n")
    out = subprocess.run([str(py), "-c", code], cwd=work, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    cli = subprocess.run([str(env_dir / "bin" / "boxrefine"), "--help"], cwd=work, capture_output=True, text=True)
    assert cli.returncode == 0 and "extract" in cli.stdout, cli.stderr
