"""The ``boxrefine`` command, in-process through typer's CliRunner: the mounted stages, exit codes,
config errors listed by key, ``store info``, and a no-op incremental extract."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import yaml
from conftest import config_dict, invoke, one_line_error, run_cli, write_config


def test_help_lists_every_command() -> None:
    res, out = invoke("--help")
    assert res.exit_code == 0
    for cmd in ("demo-data", "extract", "train", "evaluate", "refine", "store", "dev"):
        assert re.search(rf"^\W*{re.escape(cmd)}\b", out, re.M), f"{cmd} missing from --help:\n{out}"


def test_cli_conventions() -> None:
    """--version, -h everywhere, leaf commands take options (a stray argument is named, never "No such
    command"), choices shown instead of a type."""
    from boxrefine import __version__

    res, out = invoke("--version")
    assert res.exit_code == 0 and out.strip() == f"boxrefine {__version__}"
    for args in ((), ("train",), ("evaluate",), ("refine",), ("store",), ("store", "info"), ("dev",)):
        res, out = invoke(*args, "-h")
        assert res.exit_code == 0 and "Usage: boxrefine" in out, (args, out)
    for leaf in ("demo-data", "extract", "train", "evaluate", "refine"):
        res, out = invoke(leaf, "-h")
        assert f"Usage: boxrefine {leaf} [OPTIONS]" in out and "COMMAND" not in out, out
    res, out = invoke("train", "--set", "train.lr", "3e-4")
    assert res.exit_code == 2 and "No such command" not in out and "3e-4" in out, out
    res, out = invoke("refine", "-h")
    assert "<keep|drop>" in out and "<str>" not in out.split("--low-score")[1].split("\n")[0]


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
    raw["fast"] = {"train": {"sample_ratio": 0.5, "eval_every": 3, "amp": True}}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    res, out = invoke("train", "--config", str(cfg), "--fast", "--name", "f")
    assert res.exit_code == 0, out
    assert "FAST mode:" in out and "train.sample_ratio=0.5" in out and "train.eval_every=3" in out
    # the fast block's amp=True says what ran where AMP cannot run (a float32 CPU), never just "amp=True"
    import torch

    from boxrefine.shared.runtime.device import amp_setting

    ran = amp_setting(True, "auto", torch.device("cpu"))
    assert ("train.amp=True (runs float32" in out) == (ran.dtype is None), out
    assert "  validation (val): refined mean IoU" in out and "val val" not in out
    saved = yaml.safe_load((tmp_path / "runs" / "f" / "config.yaml").read_text())
    assert saved["fast_applied"] == {"train.sample_ratio": 0.5, "train.eval_every": 3, "train.amp": True}
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


def test_store_info_of_the_config_on_stdout(reference_store: Path, demo_root: Path, tmp_path: Path) -> None:
    """`store info` without a path reads store.path of --config (what `make demo` runs), and prints it on
    stdout: `boxrefine store info > info.txt` captures it."""
    cfg = write_config(tmp_path / "c.yaml", demo_root, reference_store)
    proc = run_cli("store", "info", "--config", str(cfg))
    assert str(reference_store) in proc.stdout and re.search(r"^model\s+vit_tiny", proc.stdout, re.M)
    assert proc.stderr.strip() == ""


def test_demo_data_goes_where_the_config_reads_it(tmp_path: Path) -> None:
    """`make demo CONFIG=other.yaml` writes the demo where other.yaml's splits read it, not data/demo;
    a config whose splits are not in the demo layout is refused in one line."""
    cfg = write_config(tmp_path / "other.yaml", tmp_path / "elsewhere", tmp_path / "f.zarr")
    res, out = invoke("demo-data", "--config", str(cfg), "--num-train", "1", "--num-val", "1")
    assert res.exit_code == 0, out
    assert (tmp_path / "elsewhere" / "annotations" / "instances_train.json").is_file()
    assert (tmp_path / "elsewhere" / "images" / "val").is_dir()
    raw = yaml.safe_load(cfg.read_text())
    raw["data"]["splits"]["val"]["images"] = str(tmp_path / "pics")
    cfg.write_text(yaml.safe_dump(raw))
    res, out = invoke("demo-data", "--config", str(cfg))
    assert "not the demo layout" in one_line_error(res, out)


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
