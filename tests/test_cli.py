"""The ``boxrefine`` command, in-process through typer's CliRunner: the mounted stages, exit codes,
config errors listed by key, ``store info``, and a no-op incremental extract."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import yaml
from conftest import config_dict, invoke, write_config


def test_help_lists_every_command() -> None:
    res, out = invoke("--help")
    assert res.exit_code == 0
    for cmd in ("demo-data", "extract", "train", "evaluate", "refine", "store"):
        assert re.search(rf"^\W*{re.escape(cmd)}\b", out, re.M), f"{cmd} missing from --help:\n{out}"


def test_no_args_shows_help() -> None:
    res, out = invoke()
    assert res.exit_code != 0  # no_args_is_help
    assert "Usage" in out


def test_train_fast_via_cli_and_resume(reference_store: Path, demo_root: Path, tmp_path: Path) -> None:
    """`boxrefine train --fast` applies the fast: block (printed and saved); `--resume` continues the run
    from its own saved config, and a config error exits 2 naming the key."""
    raw = config_dict(demo_root, reference_store)
    raw["train"] = {"runs_dir": str(tmp_path / "runs"), "epochs": 1, "num_workers": 0, "boxes_per_image": 2}
    raw["refiner"] = {"use_mask": False, "hidden": 16}
    raw["fast"] = {"train": {"sample_ratio": 0.5, "eval_every": 3}}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    res, out = invoke("train", "--config", str(cfg), "--fast", "--name", "f")
    assert res.exit_code == 0, out
    assert "FAST mode:" in out and "train.sample_ratio=0.5" in out and "train.eval_every=3" in out
    saved = yaml.safe_load((tmp_path / "runs" / "f" / "config.yaml").read_text())
    assert saved["fast_applied"] == {"train.sample_ratio": 0.5, "train.eval_every": 3}
    assert saved["train"]["sample_ratio"] == 0.5
    res, out = invoke("train", "--resume", str(tmp_path / "runs" / "f"), "--epochs", "2")
    assert res.exit_code == 0, out
    assert "train.epochs: checkpoint 1, now 2" in out and "2 epoch(s)" in out
    res, out = invoke("train", "--config", str(cfg), "--set", "train.lr=-1")
    assert res.exit_code == 2 and "train.lr" in out


def test_extract_config_errors_listed_by_key(tmp_path: Path) -> None:
    raw = config_dict(tmp_path / "data", tmp_path / "s.zarr", extract={"batch_size": 0, "bogus": 1})
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    res, out = invoke("extract", "--config", str(bad))
    assert res.exit_code == 2
    assert f"{bad}: 2 config error(s)" in out
    assert re.search(r"^\s+extract\.batch_size: .*greater than or equal to 1", out, re.M)
    assert re.search(r"^\s+extract\.bogus: unknown key", out, re.M)
    assert not (tmp_path / "s.zarr").exists(), "nothing may be written when the config is invalid"


def test_extract_set_and_flags_are_validated(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(config_dict(tmp_path / "data", tmp_path / "s.zarr")))
    res, out = invoke("extract", "--config", str(cfg), "--set", "store.dtype=float8", "--device", "gpu")
    assert res.exit_code == 2
    assert re.search(r"^\s+store\.dtype: ", out, re.M)
    assert re.search(r"^\s+model\.device: ", out, re.M)
    res, out = invoke("extract", "--config", str(cfg), "--set", "nonsense")
    assert res.exit_code == 2 and "KEY=VALUE" in out


def test_extract_missing_config_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such.yaml"
    res, out = invoke("extract", "--config", str(missing))
    assert res.exit_code == 2
    assert str(missing) in out
    assert "cannot read" in out


def test_store_info(reference_store: Path) -> None:
    res, out = invoke("store", "info", str(reference_store))
    assert res.exit_code == 0, out
    assert str(reference_store) in out
    assert re.search(r"^model\s+vit_tiny, input 1024px", out, re.M)
    assert "random-init:seed=0" in out and "random init" in out
    assert re.search(r"^storage\s+float16 \(numpy float16\), codec none", out, re.M)
    # split table: name, complete, total, bad, stale
    assert re.search(r"\btrain\b\W+4\W+4\W+0\W+0\b", out), out
    assert re.search(r"\bval\b\W+1\W+1\W+0\W+0\b", out), out
    assert re.search(r"on disk\s+[\d.]+ (KiB|MiB), [\d.]+ (KiB|MiB) per complete image", out), out


def test_store_info_not_a_store(tmp_path: Path) -> None:
    res, out = invoke("store", "info", str(tmp_path))
    assert res.exit_code != 0
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1, out
    assert lines[0].startswith(f"error: {tmp_path}: ")
    assert "no feature store here" in lines[0]
    assert "Traceback" not in out


def test_store_info_foreign_zarr(tmp_path: Path) -> None:
    import zarr

    path = tmp_path / "plain.zarr"
    zarr.open_group(str(path), mode="w", zarr_format=3).create_group("x")
    res, out = invoke("store", "info", str(path))
    assert res.exit_code != 0
    assert out.strip() == f"error: {path}: not a boxrefine feature store (no 'boxrefine' attributes)"


def test_extract_on_complete_store_does_no_encoder_work(reference_store: Path, demo_root: Path,
                                                        tmp_path: Path) -> None:
    store = tmp_path / "features.zarr"
    shutil.copytree(reference_store, store)
    cfg = write_config(tmp_path / "cfg.yaml", demo_root, store)
    res, out = invoke("extract", "--config", str(cfg))
    assert res.exit_code == 0, out
    assert "no encoder work" in out
    assert "train: rows 4: encoded 0, gt-only 0, up to date 4, bad 0" in out
    assert "val: rows 1: encoded 0, gt-only 0, up to date 1, bad 0" in out


def test_extract_refuses_store_of_other_dtype(reference_store: Path, demo_root: Path, tmp_path: Path) -> None:
    store = tmp_path / "features.zarr"
    shutil.copytree(reference_store, store)
    cfg = write_config(tmp_path / "cfg.yaml", demo_root, store)
    res, out = invoke("extract", "--config", str(cfg), "--set", "store.dtype=float32")
    assert res.exit_code == 1
    assert "dtype: store has 'float16', config gives 'float32'" in out
    assert "Traceback" not in out
