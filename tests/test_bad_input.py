"""The bad-input catalogue (issue 10, items 5-12, 15, 16): input that used to be accepted silently or
half-handled, each reproduced here and answered with a one-line error or a warning.

Item: input or fault → tests (items 1-4, 13, 14 are store integrity and environment faults, elsewhere).

 5  wrong image folder: every image of a split bad → test_every_image_of_a_split_bad_fails_extract;
    a split with no / only some complete rows → test_split_without_complete_rows_is_refused_before_any_work,
    test_partly_extracted_split_warns
 6  box-only annotation with a negative origin → test_box_fill_is_clipped_to_the_image
 7  --strict on a store already holding bad rows → test_strict_fails_on_bad_rows_already_in_the_store
 8  NaN/Inf in detections → test_non_finite_detections_are_refused_naming_file_and_entry,
    test_saved_evaluation_boxes_with_nan_are_refused; detections of unknown images →
    test_detections_for_unknown_images_are_counted
 9  train failing after it started → test_failed_start_leaves_no_run_folder; a start killed before its first
    checkpoint → test_leftover_of_a_killed_start_neither_blocks_nor_confuses
10  --resume with a changed refiner config / a missing run → test_resume_with_changed_refiner_or_missing_run_is_one_line
11  --set not YAML → test_set_value_that_is_not_yaml_is_one_line; --set KEY=null → test_set_null_sets_none;
    a key twice in the YAML → test_duplicate_yaml_keys_are_refused
12  rich markup in user data ([raw], [/b], [x, y, w, h]) → test_cli_prints_bracketed_paths_verbatim,
    test_warnings_keep_their_brackets, test_every_console_print_is_verbatim
15  SIGTERM in train, Ctrl-C in validation → tests/test_train.py: test_signal_mid_step_saves_and_resume_is_exact,
    test_stop_during_validation_logs_each_epoch_once
16  zero-size GT box → test_zero_size_gt_box_is_never_a_target, test_zero_size_gt_boxes_are_reported_once_per_split
"""

from __future__ import annotations

import ast
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, config_dict, invoke, make_config, reindex, write_config

from boxrefine.extract.run import ExtractError, run_extract
from boxrefine.shared.config import ConfigError, load_config
from boxrefine.shared.store.feature_store import FeatureStore, open_store
from boxrefine.shared.store.location import StoreError
from boxrefine.shared.store.schema import FIELD, STATE_BAD
from boxrefine.train.recipe import TrainError, run_train


def _store_copy(reference_store: Path, tmp_path: Path, name: str = "features.zarr") -> Path:
    dst = tmp_path / name
    shutil.copytree(reference_store, dst)
    return dst


def _set_states(store: Path, split: str, rows: list[int], state: int) -> None:
    sp = FeatureStore.open(str(store), "a").split(split)
    for i in rows:
        rec = sp.read_rows()[i].copy()
        rec[FIELD["state"]] = state
        sp.array("rows")[i] = rec
    reindex(store)  # as extract's row index would say


def _train_cfg(demo_root: Path, store: Path, runs: Path, **train):
    base = {"runs_dir": str(runs), "epochs": 1, "batch_images": 2, "boxes_per_image": 2, "num_workers": 0,
            "name": "run"}
    base.update(train)
    return make_config(demo_root, store, train=base, refiner={"use_mask": False, "hidden": 16})


def _error_lines(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith("error: ")]


# ------------------------------------------------------------------------------------ item 5
def test_every_image_of_a_split_bad_fails_extract(demo_root: Path, tmp_path: Path, sam) -> None:
    """A wrong image folder made every image "bad" and extract exited 0; then train ran into it."""
    wrong = tmp_path / "no-such-images"
    cfg = make_config(demo_root, tmp_path / "s.zarr", extract={"splits": ["train"]})
    cfg.data.splits["train"].images = wrong
    with pytest.raises(ExtractError) as e:
        run_extract(cfg, model=sam)
    msg = str(e.value)
    assert "\n" not in msg
    assert "split 'train'" in msg and "all 4 images are bad" in msg and str(wrong) in msg
    # the bad rows are recorded; a rerun (nothing to retry) says the same
    states = open_store(str(tmp_path / "s.zarr")).split("train").read_rows()[:, FIELD["state"]]
    assert (states == STATE_BAD).all()
    with pytest.raises(ExtractError, match="all 4 images are bad"):
        run_extract(cfg, model=sam)


def test_split_without_complete_rows_is_refused_before_any_work(demo_root: Path, reference_store: Path,
                                                                tmp_path: Path, monkeypatch) -> None:
    """Train used to run a whole epoch on a store whose validation split had no complete row, then die
    with KeyError: 'refined'. Both splits are checked before the run folder exists."""
    import boxrefine.train.recipe as rc

    store = _store_copy(reference_store, tmp_path)
    _set_states(store, "val", [0], STATE_BAD)
    monkeypatch.setattr(rc, "batch_loss", lambda *a, **k: pytest.fail("trained on a store without val rows"))
    cfg = _train_cfg(demo_root, store, tmp_path / "runs")
    with pytest.raises(StoreError) as e:
        run_train(cfg)
    assert str(e.value) == (f"{store}: split 'val' has no complete rows (0 of 1 images; 1 bad, listed by "
                            "`boxrefine store info`); run extract first")
    assert not (tmp_path / "runs").exists()

    from boxrefine.evaluate.run import Evaluator

    dummy = tmp_path / "some.pt"
    dummy.write_bytes(b"x")
    with pytest.raises(StoreError, match=r"split 'val' has no complete rows \(0 of 1 images"):
        Evaluator(cfg, dummy).setup()

    _set_states(store, "train", [0, 1, 2, 3], STATE_BAD)
    with pytest.raises(StoreError, match=r"split 'train' has no complete rows \(0 of 4 images; 4 bad"):
        run_train(cfg)


def test_partly_extracted_split_warns(demo_root: Path, reference_store: Path, tmp_path: Path, capsys) -> None:
    from boxrefine.evaluate.run import Evaluator

    store = _store_copy(reference_store, tmp_path)
    sp = FeatureStore.open(str(store), "a").split("train")
    sp.clear_row(2)  # an extract that has not reached this row yet
    reindex(store)
    cfg = _train_cfg(demo_root, store, tmp_path / "runs")
    run_train(cfg)
    err = capsys.readouterr().err
    assert f"{store}: split 'train': 3 of 4 images complete; run extract" in err
    dummy = tmp_path / "some.pt"
    dummy.write_bytes(b"x")
    Evaluator(cfg, dummy, split="train").setup()
    assert "split 'train': 3 of 4 images complete; run extract" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ item 6
def test_box_fill_is_clipped_to_the_image() -> None:
    """Negative numpy slice indices: [-0.5, 10, 50, 50] filled columns W-1.. instead of 0..50."""
    from boxrefine.shared.data.records import Instance, instance_mask

    def fill(box: tuple[float, float, float, float]) -> np.ndarray:
        return instance_mask(Instance(1, 1, box, 0, None), 100, 120)

    m = fill((-0.5, 10.0, 49.5, 60.0))  # COCO [-0.5, 10, 50, 50]
    want = np.zeros((100, 120), np.uint8)
    want[10:60, 0:50] = 1
    np.testing.assert_array_equal(m, want)
    m = fill((-5.0, -7.0, 3.0, 4.0))
    assert m[:4, :3].all() and m.sum() == 12
    m = fill((100.0, 90.0, 130.0, 110.0))  # past the right and bottom edges
    assert m[90:, 100:].all() and m.sum() == 10 * 20
    assert fill((-30.0, -30.0, -10.0, -10.0)).sum() == 0  # wholly outside: empty, not a wrapped-around block


# ------------------------------------------------------------------------------------ item 7
def test_strict_fails_on_bad_rows_already_in_the_store(data_copy: Path, reference_store: Path, tmp_path: Path,
                                                       sam) -> None:
    """`--strict` on a store that already held bad rows exited 0 reporting "bad 0"."""
    store = _store_copy(reference_store, tmp_path)
    (data_copy / "images" / "train" / "train_0001.png").write_bytes(b"not an image")
    res = run_extract(make_config(data_copy, store), model=sam)
    assert len(res.splits[0].bad) == 1
    cfg = write_config(tmp_path / "cfg.yaml", data_copy, store)
    res, out = invoke("extract", "--config", str(cfg), "--strict")
    assert res.exit_code == 1, out
    errors = _error_lines(out)
    assert len(errors) == 1, out
    assert "split 'train'" in errors[0] and "--strict" in errors[0]
    assert "train_0001.png" in errors[0] and "bad" in errors[0]
    res, out = invoke("extract", "--config", str(cfg))  # without --strict: reported, not fatal
    assert res.exit_code == 0, out
    assert "train: rows 4: encoded 0, gt-only 0, up to date 3, bad 1" in out


# ------------------------------------------------------------------------------------ item 8
@pytest.mark.parametrize("field,value,problem", [("score", "NaN", "score"), ("score", "Infinity", "score"),
                                                 ("bbox", "[Infinity, 1, 2, 3]", "bbox")])
def test_non_finite_detections_are_refused_naming_file_and_entry(demo_root: Path, reference_store: Path,
                                                                 tmp_path: Path, field: str, value: str,
                                                                 problem: str) -> None:
    """A NaN score went through evaluate and crashed writing JSON (no file named); the NaN stayed cached."""
    dets = json.loads((demo_root / "annotations" / "detections_val.json").read_text())
    texts = [json.dumps(d) for d in dets]
    d1 = dict(dets[1])
    d1[field] = "@@"
    texts[1] = json.dumps(d1).replace('"@@"', value)
    bad = tmp_path / "dets [raw].json"
    bad.write_text("[" + ", ".join(texts) + "]")
    raw = config_dict(demo_root, reference_store)
    raw["data"]["splits"]["val"]["detections"] = str(bad)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    ckpt_dir = tmp_path / "ck"
    ckpt_dir.mkdir()
    (ckpt_dir / "x.pt").write_bytes(b"not a checkpoint")
    res, out = invoke("evaluate", "--config", str(cfg), "--checkpoint", str(ckpt_dir / "x.pt"))
    assert res.exit_code == 1, out
    errors = _error_lines(out)
    assert len(errors) == 1, out
    assert errors[0].startswith(f"error: {bad}: [1] (image_id {dets[1]['image_id']}): {problem}"), errors[0]
    assert not (ckpt_dir / "eval" / "eval_boxes_val.json").exists()


def test_saved_evaluation_boxes_with_nan_are_refused(demo_root: Path, reference_store: Path, tmp_path: Path) -> None:
    """A NaN that reached the saved evaluation boxes stayed there and was reused by every later run."""
    from boxrefine.evaluate.run import EvaluateError, Evaluator

    cfg = make_config(demo_root, reference_store)
    dummy = tmp_path / "ck" / "x.pt"
    dummy.parent.mkdir()
    dummy.write_bytes(b"x")
    Evaluator(cfg, dummy).setup()
    saved = tmp_path / "ck" / "eval" / "eval_boxes_val.json"
    doc = json.loads(saved.read_text())
    first = next(iter(doc["images"].values()))
    first["scores"][0] = float("nan")
    saved.write_text(json.dumps(doc))
    with pytest.raises(EvaluateError) as e:
        Evaluator(cfg, dummy).setup()
    assert str(e.value).startswith(f"{saved}: cannot read the saved evaluation boxes ({saved}: image_id "
                                   f"{first['image_id']}: a box or score is not a finite number)")


def test_detections_for_unknown_images_are_counted(demo_root: Path, tmp_path: Path, capsys) -> None:
    from boxrefine.shared.data.detections import load_detections

    dets = json.loads((demo_root / "annotations" / "detections_val.json").read_text())
    extra = [{"image_id": 999, "category_id": 1, "bbox": [1, 1, 5, 5], "score": 0.5},
             {"image_id": 998, "category_id": 1, "bbox": [1, 1, 5, 5], "score": 0.5},
             {"image_id": 999, "category_id": 1, "bbox": [2, 1, 5, 5], "score": 0.4}]
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(dets + extra))
    known = {int(d["image_id"]) for d in dets}
    out = load_detections(path, known)
    assert set(out) == known
    err = capsys.readouterr().err
    assert f"{path}: 3 detection(s) for 2 image id(s) not in the split (e.g. 998); ignored" in err
    load_detections(path)  # without the split's ids: nothing to compare, nothing said
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------ item 9
@pytest.mark.parametrize("where,fault", [("eval_boxes", RuntimeError), ("eval_boxes", KeyboardInterrupt),
                                         ("first_step", RuntimeError)])
def test_failed_start_leaves_no_run_folder(demo_root: Path, reference_store: Path, tmp_path: Path,
                                           monkeypatch, where: str, fault: type[BaseException]) -> None:
    """A train that failed after making runs/<name>/ left config.yaml there: the name was blocked and
    a bare `evaluate` picked that run and failed. (Ctrl-C before training starts is a KeyboardInterrupt.)"""
    import boxrefine.shared.scoring.coarse as eb
    import boxrefine.train.recipe as rc

    def boom(*a, **k):
        raise fault(f"injected failure at {where}")

    if where == "eval_boxes":
        monkeypatch.setattr(eb, "save_coarse_boxes", boom)
    else:
        monkeypatch.setattr(rc, "batch_loss", boom)
    cfg = _train_cfg(demo_root, reference_store, tmp_path / "runs", name="x")
    with pytest.raises(fault, match="injected"):
        run_train(cfg)
    assert not (tmp_path / "runs" / "x").exists()
    monkeypatch.undo()
    assert run_train(cfg).epochs_done == 1  # the name is free


def test_leftover_of_a_killed_start_neither_blocks_nor_confuses(demo_root: Path, reference_store: Path,
                                                                tmp_path: Path) -> None:
    """kill -9 before the first checkpoint leaves a run folder no cleanup can remove: train reuses it,
    and a bare evaluate picks the latest run that has checkpoints."""
    from boxrefine.evaluate.run import resolve_checkpoints

    runs = tmp_path / "runs"
    good = run_train(_train_cfg(demo_root, reference_store, runs, name="good")).run_dir
    dead = runs / "dead"
    dead.mkdir()
    (dead / "config.yaml").write_text("{}")
    (dead / "subset.json").write_text("{}")
    os.utime(dead / "config.yaml", (1e10, 1e10))  # newer than anything in `good`
    cfg = _train_cfg(demo_root, reference_store, runs, name="dead")
    assert resolve_checkpoints(cfg, None) == ([good / "best.pt"], good / "eval")
    assert run_train(cfg).epochs_done == 1
    # a folder with anything else in it is still refused
    other = runs / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(TrainError, match="run folder exists"):
        run_train(_train_cfg(demo_root, reference_store, runs, name="other"))
    assert (other / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------ item 10
def test_resume_with_changed_refiner_or_missing_run_is_one_line(demo_root: Path, reference_store: Path,
                                                                tmp_path: Path) -> None:
    """(Fixed by issue 7's work.) Both used to end in a traceback / a misleading 'config.yaml: cannot read'."""
    raw = config_dict(demo_root, reference_store)
    raw["train"] = {"runs_dir": str(tmp_path / "runs"), "epochs": 1, "num_workers": 0, "boxes_per_image": 2}
    raw["refiner"] = {"use_mask": False, "hidden": 16}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    res, out = invoke("train", "--config", str(cfg), "--name", "r")
    assert res.exit_code == 0, out
    run = tmp_path / "runs" / "r"
    res, out = invoke("train", "--resume", str(run), "--set", "refiner.hidden=32", "--epochs", "2")
    assert res.exit_code == 1
    assert out.strip() == (f"error: {run}/last.pt: cannot resume with a changed refiner config: "
                           "refiner.hidden: checkpoint 16, now 32")
    missing = tmp_path / "runs" / "doesnotexist"
    res, out = invoke("train", "--resume", str(missing))
    assert res.exit_code == 1
    assert out.strip() == f"error: {missing}: no such run folder or checkpoint to resume"


# ------------------------------------------------------------------------------------ item 11
def test_set_value_that_is_not_yaml_is_one_line(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "data", tmp_path / "s.zarr")
    for value in ("train.lr=[1", "train.lr={a: 1, a: 2}", "train.lr=@x"):
        res, out = invoke("train", "--config", str(cfg), "--set", value)
        assert res.exit_code == 2, out
        assert out.splitlines()[0] == "error: --set: 1 config error(s):"
        assert out.splitlines()[1].startswith("  train.lr: not a valid YAML value"), out
        assert "Traceback" not in out


def test_set_null_sets_none(tmp_path: Path) -> None:
    """`--set train.grad_clip=null` was dropped with the unset CLI flags, so clipping could not be
    turned off from the command line."""
    from boxrefine.shared.cli.common import load_cli_config

    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "data", tmp_path / "s.zarr",
                       model={"checkpoint": str(tmp_path / "sam.pth")})
    got = load_cli_config(cfg, ["train.grad_clip=null", "model.checkpoint=~"], {"train.epochs": None})
    assert got.train.grad_clip is None and got.model.checkpoint is None
    assert got.train.epochs == 20  # an unset flag still changes nothing
    assert load_cli_config(cfg, [], {"train.epochs": 3}).train.epochs == 3


def test_duplicate_yaml_keys_are_refused(tmp_path: Path) -> None:
    """Last-one-wins duplicates hid a typo'd or pasted-twice option."""
    text = yaml.safe_dump(config_dict(tmp_path / "data", tmp_path / "s.zarr"), sort_keys=False)
    text += "train:\n  lr: 0.1\n  epochs: 3\n  lr: 0.2\n"
    lines = text.splitlines()
    first, second = (i + 1 for i, ln in enumerate(lines) if ln == "  lr: 0.1" or ln == "  lr: 0.2")
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.errors == [("train.lr", f"duplicate key (lines {first} and {second}); remove one")]
    base = yaml.safe_dump(config_dict(tmp_path / "data", tmp_path / "s.zarr"), sort_keys=False)
    path.write_text(base + "train:\n  lr: 0.1\ntrain:\n  epochs: 4\n")
    n = len(base.splitlines())
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.errors == [("train", f"duplicate key (lines {n + 1} and {n + 3}); remove one")]
    # YAML merge keys are not duplicates
    path.write_text(yaml.safe_dump(config_dict(tmp_path / "data", tmp_path / "s.zarr"))
                    + "x_defaults: &d {lr: 0.1}\n")
    with pytest.raises(ConfigError, match="x_defaults: unknown key"):
        load_config(path)


# ------------------------------------------------------------------------------------ item 12
def test_cli_prints_bracketed_paths_verbatim(demo_root: Path, reference_store: Path, tmp_path: Path) -> None:
    """Messages went through rich markup: `[raw]` vanished from paths and `[/b]` crashed the printer."""
    weird = tmp_path / "a [raw] b [/b] c"
    weird.mkdir(parents=True)
    store = _store_copy(reference_store, weird)
    res, out = invoke("store", "info", str(store))
    assert res.exit_code == 0, out
    assert out.splitlines()[0].startswith(f"{store}  (boxrefine schema")
    cfg = write_config(weird / "cfg [x, y, w, h].yaml", demo_root, store)
    folder = weird / "run [inf, 1]"
    folder.mkdir()
    (folder / "broken [bold].pt").write_bytes(b"garbage")
    res, out = invoke("evaluate", "--config", str(cfg), "--checkpoint", str(folder))
    assert res.exit_code == 1, out
    assert f"skipped {folder / 'broken [bold].pt'}: not a readable checkpoint" in out
    assert f"1 checkpoint(s) → {folder / 'eval'}" in out
    res, out = invoke("evaluate", "--config", str(cfg), "--checkpoint", str(weird / "[missing].pt"))
    assert out.strip() == f"error: {weird / '[missing].pt'}: checkpoint not found"


def test_warnings_keep_their_brackets(capsys) -> None:
    from boxrefine.shared.runtime.console import warn_loud

    warn_loud("random weights", "values [inf, 1.0] at [x, y, w, h] in /data/[raw]/[/b]")
    assert capsys.readouterr().err.strip() == \
        "WARNING [random weights] values [inf, 1.0] at [x, y, w, h] in /data/[raw]/[/b]"


def test_every_console_print_is_verbatim() -> None:
    """Every console.print of a string passes markup=False (style= gives colour); rich renderables
    must be built from rich.text.Text. A source scan, as test_layering does for imports."""
    offenders = []
    for folder in ("extract", "train", "evaluate", "shared"):
        for path in sorted((REPO / folder).rglob("*.py")):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "print" and isinstance(node.func.value, ast.Name)
                        and "console" in node.func.value.id):
                    continue
                kw = {k.arg: k.value for k in node.keywords}
                verbatim = isinstance(kw.get("markup"), ast.Constant) and kw["markup"].value is False
                first = node.args[0] if node.args else None
                is_text = isinstance(first, (ast.Constant, ast.JoinedStr, ast.BinOp))
                if is_text and not verbatim:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, f"console.print of a string without markup=False: {offenders}"


# ------------------------------------------------------------------------------------ item 16
def test_zero_size_gt_box_is_never_a_target() -> None:
    from boxrefine.shared.geometry.frames import ImageGeometry
    from boxrefine.train.steps import training_boxes

    gt = torch.tensor([[10.0, 10.0, 10.0, 50.0], [5.0, 5.0, 40.0, 45.0], [20.0, 30.0, 60.0, 30.0]])
    info = torch.tensor([[1, 1, 0], [2, 1, 0], [3, 1, 0]])
    g = torch.Generator().manual_seed(0)
    _, target = training_boxes(gt, info, None, ImageGeometry.of(100, 100), 32, 0.25, g)
    assert len(target) == 32 and (target == gt[1]).all()
    _, target = training_boxes(gt[[0, 2]], info[[0, 2]], None, ImageGeometry.of(100, 100), 8, 0.25, g)
    assert len(target) == 0


def test_zero_size_gt_boxes_are_reported_once_per_split(data_copy: Path, reference_store: Path, tmp_path: Path,
                                                        sam, capsys) -> None:
    ann_path = data_copy / "annotations" / "instances_train.json"
    coco = json.loads(ann_path.read_text())
    coco["annotations"][3]["bbox"][2] = 0.0
    coco["annotations"][7]["bbox"][3] = 0.0
    ids = sorted(coco["annotations"][k]["id"] for k in (3, 7))
    ann_path.write_text(json.dumps(coco))
    store = _store_copy(reference_store, tmp_path)
    run_extract(make_config(data_copy, store, extract={"splits": ["train"]}), model=sam)  # GT only
    capsys.readouterr()
    run_train(_train_cfg(data_copy, store, tmp_path / "runs", epochs=2))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "zero-size" in ln]
    assert lines == [f"{store}: split 'train': 2 zero-size GT box(es) (e.g. annotation id {ids[0]}; a box wholly "
                     "outside its image is clipped to zero size) are never training targets"], err
