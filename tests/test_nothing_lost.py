"""Nothing lost, second pass (issue 21): what a hostile re-probe of the reorganised code still found,
each reproduced here and fixed. Every test fails on the code before its fix.

Item: input or fault → tests

 1  refine -o naming its own detections file (also via symlink, ``..``, a hard link)
    → test_refine_never_overwrites_its_input
 2  image files missing after extraction (deleted, folder unmounted) → test_missing_image_never_demotes_a_complete_row,
    test_unreadable_image_never_demotes_a_complete_row, test_missing_image_with_changed_annotations_rewrites_only_the_gt
 3  --overwrite --split val → test_overwrite_with_split_deletes_only_that_split
    (and tests/test_integrity.py::test_overwrite_deletes_only_the_store_content_and_says_what)
 4  a split's `rows` chunk of a complete row deleted → test_lost_row_record_is_damage_for_verify_and_train
 5  a GT box reaching outside / wholly outside its image → test_gt_boxes_are_clipped_to_the_image,
    test_gt_box_outside_the_image_is_clipped_and_reported_by_extract
 6  detections without a score, scores outside [0, 1] → test_detection_without_score_is_refused_for_ap,
    test_scores_outside_0_1_are_counted
 7  --set train=null with --epochs / --name → test_nulling_a_config_section_is_refused,
    test_a_section_given_as_a_mapping_keeps_the_yaml_keys
 8  a symlink in the image folder leading outside it, ``sub/../x.png`` inside it
    → test_symlink_out_of_the_image_root_is_refused_and_dotdot_inside_is_accepted
 9  disk full while train writes a checkpoint → test_disk_full_checkpoint_is_one_line_and_keeps_last;
    refine --out into a missing folder / onto a folder → test_refine_refuses_an_unwritable_output_before_any_work
10  misleading messages: bad detections with saved eval boxes → test_bad_detections_are_blamed_not_the_saved_boxes;
    a random-bytes checkpoint → test_unreadable_checkpoint_names_the_problem_not_torch_advice;
    detections of ids in the split without a usable row → test_detections_of_rows_not_usable_are_counted_apart;
    --watch encoder share over several cycles → test_encoder_share_is_of_this_run_only;
    a kept bad row counted twice → test_summary_counts_each_row_once;
    an unreachable S3 endpoint blamed on credentials → test_unreachable_endpoint_is_not_called_credentials
11  two unsharded extracts of one store → test_row_claimed_by_another_process_is_skipped,
    test_two_unsharded_extracts_share_the_rows
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import copy_store, invoke, make_config, one_line_error, reindex, spawn_extract, write_config

from boxrefine.extract.run import Extractor, run_extract
from boxrefine.shared.config import ConfigError
from boxrefine.shared.data.detections import load_detections
from boxrefine.shared.data.records import DataError, load_coco, resolve_image
from boxrefine.shared.model.checkpoint import CheckpointFileError, load_checkpoint
from boxrefine.shared.store.feature_store import FeatureStore, open_store
from boxrefine.shared.store.schema import FIELD, STATE_COMPLETE, STATE_EMPTY


def _states(store: Path, split: str = "train") -> list[int]:
    return open_store(str(store)).split(split).read_rows()[:, FIELD["state"]].tolist()


def _train_image(data: Path, row_of_store: Path, row: int = 1) -> Path:
    """The image file of train row ``row`` of a store made from ``data``."""
    key = int(open_store(str(row_of_store)).split("train").keys()[row])
    rec = next(r for r in load_coco(data / "annotations" / "instances_train.json").images if r.key == key)
    return data / "images" / "train" / rec.file_name


# ------------------------------------------------------------------------------------ item 1
def test_refine_never_overwrites_its_input(demo_root: Path, reference_store: Path, tmp_path: Path) -> None:
    """`refine -d dets.json -o dets.json` exited 0 and replaced the detector's boxes with refined ones."""
    dets = tmp_path / "dets.json"
    shutil.copy(demo_root / "annotations" / "detections_val.json", dets)
    before = dets.read_bytes()
    ckpt = tmp_path / "ck.pt"
    ckpt.write_bytes(b"not looked at: the output is checked first")
    cfg = write_config(tmp_path / "cfg.yaml", demo_root, reference_store)
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.json").symlink_to(dets)
    os.link(dets, tmp_path / "hard.json")
    for out in (dets, tmp_path / "sub" / ".." / "dets.json", tmp_path / "link.json", tmp_path / "hard.json"):
        res, text = invoke("refine", "--config", str(cfg), "--checkpoint", str(ckpt), "--split", "val",
                           "-d", str(dets), "-o", str(out))
        line = one_line_error(res, text)
        assert f"{out}: the output is the detections file ({dets}); refine never overwrites its input" in line
        assert dets.read_bytes() == before
    res, text = invoke("refine", "--config", str(cfg), "--checkpoint", str(ckpt), "--split", "val",
                       "-d", str(dets), "-o", str(ckpt))
    assert "the output is the refiner checkpoint" in one_line_error(res, text)


def test_refine_refuses_an_unwritable_output_before_any_work(demo_root: Path, reference_store: Path,
                                                              tmp_path: Path) -> None:
    """`--out` into a missing folder or onto a folder ended in a traceback after all the work."""
    ckpt = tmp_path / "ck.pt"
    ckpt.write_bytes(b"x")
    cfg = write_config(tmp_path / "cfg.yaml", demo_root, reference_store)
    dets = demo_root / "annotations" / "detections_val.json"
    (tmp_path / "folder").mkdir()
    for out, problem in ((tmp_path / "nowhere" / "r.json", f"the folder {tmp_path / 'nowhere'} does not exist"),
                         (tmp_path / "folder", "the output is a folder")):
        res, text = invoke("refine", "--config", str(cfg), "--checkpoint", str(ckpt), "--split", "val",
                           "-d", str(dets), "-o", str(out))
        assert problem in one_line_error(res, text)


# ------------------------------------------------------------------------------------ item 2
def test_missing_image_never_demotes_a_complete_row(data_copy: Path, demo_root: Path, reference_store: Path,
                                                    tmp_path: Path, sam, capsys) -> None:
    """A deleted image turned its complete row bad (and it dropped out of training); an unmounted image
    folder turned every row bad, and all were encoded again once the same files were back."""
    store = copy_store(reference_store, tmp_path)
    gone = _train_image(data_copy, store)
    gone.unlink()
    res = run_extract(make_config(data_copy, store), model=sam)
    train = res.splits[0]
    assert (train.encoded, train.bad, list(train.missing.values())) == (0, {}, [gone.name])
    assert _states(store) == [STATE_COMPLETE] * 4
    out = capsys.readouterr().err
    assert "train: rows 4: encoded 0, gt-only 0, up to date 3, image missing (row kept) 1, bad 0" in out
    assert f"image missing: {gone.name} — the complete row(s) are kept" in out

    images = data_copy / "images" / "train"
    shutil.move(images, tmp_path / "unmounted")  # the whole image folder gone
    res, out = invoke("extract", "--config", str(write_config(tmp_path / "c.yaml", data_copy, store)))
    assert res.exit_code == 0, out
    assert "train: rows 4: encoded 0, gt-only 0, up to date 0, image missing (row kept) 4, bad 0" in out
    assert _states(store) == [STATE_COMPLETE] * 4
    shutil.move(tmp_path / "unmounted", images)
    shutil.copy2(demo_root / "images" / "train" / gone.name, gone)  # the same file, the same mtime, back
    res = run_extract(make_config(data_copy, store), model=sam)
    assert (res.encoded, res.splits[0].skipped, res.splits[0].missing) == (0, 4, {})


def test_unreadable_image_never_demotes_a_complete_row(data_copy: Path, reference_store: Path, tmp_path: Path,
                                                       sam, monkeypatch) -> None:
    """An image that cannot be looked at (a folder without permission) is no reason to drop its row."""
    import boxrefine.extract.plan as plan

    store = copy_store(reference_store, tmp_path)
    hidden, real = _train_image(data_copy, store), plan.source_fingerprint

    def fingerprint(path: Path) -> tuple[int, int]:
        if path == hidden:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(plan, "source_fingerprint", fingerprint)
    res = run_extract(make_config(data_copy, store), model=sam)
    assert list(res.splits[0].missing.values()) == [f"{hidden.name} (cannot read: Permission denied)"]
    assert (res.encoded, res.splits[0].bad, _states(store)) == (0, {}, [STATE_COMPLETE] * 4)


def test_missing_image_with_changed_annotations_rewrites_only_the_gt(data_copy: Path, reference_store: Path,
                                                                     tmp_path: Path, sam) -> None:
    """The GT needs only the annotations: a missing image's row still gets its new GT, kept complete."""
    store = copy_store(reference_store, tmp_path)
    gone = _train_image(data_copy, store)
    ann_path = data_copy / "annotations" / "instances_train.json"
    coco = json.loads(ann_path.read_text())
    image_id = next(im["id"] for im in coco["images"] if im["file_name"] == gone.name)
    ann = next(a for a in coco["annotations"] if a["image_id"] == image_id)
    ann["bbox"] = [ann["bbox"][0] + 1.0, *ann["bbox"][1:]]
    ann_path.write_text(json.dumps(coco))
    record_before = open_store(str(store)).split("train").read_rows()[1]
    gone.unlink()
    res = run_extract(make_config(data_copy, store), model=sam)
    train = res.splits[0]
    assert (train.encoded, train.gt_only, train.bad, len(train.missing)) == (0, 1, {}, 1)
    split = open_store(str(store)).split("train")
    record = split.read_rows()[1]
    assert record[FIELD["state"]] == STATE_COMPLETE
    assert record[FIELD["src_mtime_ns"]] == record_before[FIELD["src_mtime_ns"]]  # the image's, not "missing"
    _, boxes, info = split.read_gt(1)
    assert boxes[list(info[:, 0]).index(ann["id"]), 0] == pytest.approx(ann["bbox"][0])


# ------------------------------------------------------------------------------------ item 3
def test_overwrite_with_split_deletes_only_that_split(demo_root: Path, reference_store: Path, tmp_path: Path) -> None:
    """`extract --overwrite --split val` deleted train/ too and rebuilt only val."""
    store = copy_store(reference_store, tmp_path)
    train_rows = open_store(str(store)).split("train").read_rows()
    cfg = write_config(tmp_path / "cfg.yaml", demo_root, store)
    res, out = invoke("extract", "--config", str(cfg), "--overwrite", "--split", "val")
    assert res.exit_code == 0, out
    assert f"{store}: --overwrite --split val: deleting split(s) val/; keeping train/" in out
    assert "val: rows 1: encoded 1" in out
    st = open_store(str(store))
    assert st.splits == ["train", "val"]
    np.testing.assert_array_equal(st.split("train").read_rows(), train_rows)


# ------------------------------------------------------------------------------------ item 4
def test_lost_row_record_is_damage_for_verify_and_train(demo_root: Path, reference_store: Path,
                                                        tmp_path: Path) -> None:
    """With the `rows` chunk of a complete row deleted, verify said "damaged 0" and train left the row
    out of every epoch, blaming "being rewritten"."""
    from test_integrity import chunk_file, row_name

    store = copy_store(reference_store, tmp_path)
    chunk_file(store, "train", "rows", 0).unlink()
    res, out = invoke("store", "verify", str(store))
    assert res.exit_code != 0, out
    assert "damaged 1" in out and "the row's record is missing" in out and row_name(demo_root, store, "train", 0) in out
    cfg = write_config(tmp_path / "t.yaml", demo_root, store, refiner={"use_mask": False, "hidden": 16},
                       train={"runs_dir": str(tmp_path / "runs"), "num_workers": 0, "epochs": 1, "batch_images": 2,
                              "boxes_per_image": 2})
    res, out = invoke("train", "--config", str(cfg), "--name", "t")
    line = one_line_error(res, out)
    assert f"split train, {row_name(demo_root, store, 'train', 0)}, array rows: the row's record is missing" in line
    assert "being rewritten" not in out
    res, out = invoke("store", "verify", str(store), "--repair")
    assert _states(store)[0] == 4  # marked damaged: the next extract redoes it


# ------------------------------------------------------------------------------------ item 5
def test_gt_boxes_are_clipped_to_the_image(tmp_path: Path) -> None:
    """A GT box wholly outside its image was a training target with an empty mask."""
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 80}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [90, 70, 20, 20]},
                            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [150, 10, 20, 20]},
                            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]}],
            "categories": [{"id": 1, "name": "x"}]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(coco))
    recs = load_coco(path)
    assert [i.box for i in recs.images[0].instances] == [(90.0, 70.0, 100.0, 80.0), (100.0, 10.0, 100.0, 30.0),
                                                         (10.0, 10.0, 30.0, 30.0)]
    assert (recs.clipped, recs.emptied) == ((1, 2), (2,))
    from boxrefine.shared.geometry.boxes import trainable_gt

    boxes = torch.tensor([i.box for i in recs.images[0].instances])
    assert trainable_gt(boxes, torch.tensor([[1, 1, 0], [2, 1, 0], [3, 1, 0]])).tolist() == [True, False, True]


def test_gt_box_outside_the_image_is_clipped_and_reported_by_extract(data_copy: Path, reference_store: Path,
                                                                     tmp_path: Path, sam, capsys) -> None:
    store = copy_store(reference_store, tmp_path)
    ann_path = data_copy / "annotations" / "instances_train.json"
    coco = json.loads(ann_path.read_text())
    im = coco["images"][0]
    ann = next(a for a in coco["annotations"] if a["image_id"] == im["id"])
    ann["bbox"] = [im["width"] + 5.0, 3.0, 10.0, 10.0]
    ann.pop("segmentation", None)
    ann_path.write_text(json.dumps(coco))
    res = run_extract(make_config(data_copy, store, extract={"splits": ["train"]}), model=sam)
    assert res.splits[0].gt_only == 1 and res.encoded == 0
    err = capsys.readouterr().err
    assert (f"{ann_path}: 1 GT box(es) reach outside their image and are clipped to it, 1 of them wholly outside "
            f"(zero size: never a training target) (e.g. annotation id {ann['id']})") in err
    split = open_store(str(store)).split("train")
    row = next(i for i, k in enumerate(split.keys().tolist()) if k == load_coco(ann_path).images[0].key)
    _, boxes, info = split.read_gt(row)
    box = boxes[list(info[:, 0]).index(ann["id"])]
    assert box[0] == box[2] == im["width"]


# ------------------------------------------------------------------------------------ item 6
def test_detection_without_score_is_refused_for_ap(data_copy: Path, reference_store: Path, tmp_path: Path) -> None:
    """A detection without a score counted as 1.0 in evaluate's AP."""
    from boxrefine.evaluate.run import Evaluator

    path = data_copy / "annotations" / "detections_val.json"
    dets = json.loads(path.read_text())
    del dets[1]["score"]
    path.write_text(json.dumps(dets))
    dummy = tmp_path / "ck" / "x.pt"
    dummy.parent.mkdir()
    dummy.write_bytes(b"x")
    with pytest.raises(DataError) as e:
        Evaluator(make_config(data_copy, reference_store), dummy).setup()
    assert str(e.value).startswith(f"{path}: [1] (image_id {dets[1]['image_id']}): no score;")
    assert "--missing-score" in str(e.value)
    ev = Evaluator(make_config(data_copy, reference_store, evaluate={"missing_score": 0.5}), dummy).setup()
    assert 0.5 in [s for b in ev.coarse.values() for s in b.scores.tolist()]
    cfg = write_config(tmp_path / "cfg.yaml", data_copy, reference_store)
    res, out = invoke("evaluate", "--config", str(cfg), "--checkpoint", str(dummy), "--missing-score", "2")
    assert res.exit_code != 0 and "evaluate.missing_score: Input should be less than or equal to 1" in out


def test_scores_outside_0_1_are_counted(tmp_path: Path, capsys) -> None:
    path = tmp_path / "d.json"
    good = {"image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}
    path.write_text(json.dumps([{**good, "score": 0.5}, {**good, "score": 7.0}, {**good, "score": -1}]))
    out = load_detections(path)
    assert [d[1] for d in out[1]] == [0.5, 7.0, -1.0]  # used as given
    err = capsys.readouterr().err
    assert f"{path}: 2 detection(s) have a score outside [0, 1] (e.g. [1] score 7); used as given" in err


# ------------------------------------------------------------------------------------ item 7
def test_nulling_a_config_section_is_refused(demo_root: Path, tmp_path: Path) -> None:
    """`--set train=null --epochs 3` exited 0 and silently dropped the YAML's whole train section."""
    cfg = write_config(tmp_path / "cfg.yaml", demo_root, tmp_path / "s.zarr",
                       train={"runs_dir": str(tmp_path / "runs"), "lr": 0.123})
    res, out = invoke("train", "--config", str(cfg), "--set", "train=null", "--epochs", "3", "--name", "x")
    assert res.exit_code != 0 and "Traceback" not in out
    assert "train: is a section; it cannot be set to null: set its keys one by one (e.g. --set train.KEY=VALUE)" in out
    assert not (tmp_path / "runs").exists()


def test_a_section_given_as_a_mapping_keeps_the_yaml_keys(demo_root: Path, tmp_path: Path) -> None:
    from boxrefine.shared.config import load_config

    cfg = write_config(tmp_path / "cfg.yaml", demo_root, tmp_path / "s.zarr", train={"lr": 0.123, "epochs": 9})
    loaded = load_config(cfg, {"train": {"epochs": 3}, "train.name": "x"})
    assert (loaded.train.lr, loaded.train.epochs, loaded.train.name) == (0.123, 3, "x")
    with pytest.raises(ConfigError, match="data.splits.val: is a section"):
        load_config(cfg, {"data.splits.val": None})


# ------------------------------------------------------------------------------------ item 8
def test_symlink_out_of_the_image_root_is_refused_and_dotdot_inside_is_accepted(demo_root: Path,
                                                                              tmp_path: Path) -> None:
    """A symlink leading out of the image folder was followed and encoded, while `sub/../good.png`
    (inside it) was refused."""
    from boxrefine.extract.sources import folder_records

    root, outside = tmp_path / "photos", tmp_path / "private"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    src = demo_root / "images" / "train" / "train_0000.jpg"
    shutil.copy(src, root / "good.jpg")
    shutil.copy(src, outside / "secret.jpg")
    (root / "leak.jpg").symlink_to(outside / "secret.jpg")
    (root / "inside.jpg").symlink_to(root / "good.jpg")  # a symlink within the root is fine
    assert resolve_image(root, "sub/../good.jpg") == root / "good.jpg"
    assert resolve_image(root, "inside.jpg") == root / "inside.jpg"
    with pytest.raises(DataError) as e:
        resolve_image(root, "leak.jpg")
    assert str(e.value) == (f"{root / 'leak.jpg'}: a symlink leading outside the image root {root} "
                            f"(to {(outside / 'secret.jpg').resolve()}); not read")
    recs, bad = folder_records(root)
    assert sorted(r.file_name for r in recs.images) == ["good.jpg", "inside.jpg"]
    assert [b["file"] for b in bad.values()] == ["leak.jpg"] and "leading outside" in next(iter(bad.values()))["reason"]


# ------------------------------------------------------------------------------------ item 9
def test_disk_full_checkpoint_is_one_line_and_keeps_last(demo_root: Path, reference_store: Path, tmp_path: Path,
                                                        monkeypatch) -> None:
    """A full disk while train wrote a checkpoint ended in an OSError traceback."""
    real_fsync, saves = os.fsync, []

    def fsync(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        if ".last.pt." in name:
            saves.append(name)
            if len(saves) == 2:  # the second epoch's checkpoint: the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    runs = tmp_path / "runs"
    cfg = write_config(tmp_path / "t.yaml", demo_root, reference_store, refiner={"use_mask": False, "hidden": 16},
                       train={"runs_dir": str(runs), "num_workers": 0, "epochs": 2, "batch_images": 2,
                              "boxes_per_image": 2})
    res, out = invoke("train", "--config", str(cfg), "--name", "full")
    line = one_line_error(res, out)
    assert line == f"error: {runs / 'full' / 'last.pt'}: cannot write: No space left on device"
    assert load_checkpoint(runs / "full" / "last.pt")["state"]["epoch"] == 1  # the first epoch's, intact
    assert not list((runs / "full").glob(".*.tmp"))


# ------------------------------------------------------------------------------------ item 10
def test_bad_detections_are_blamed_not_the_saved_boxes(data_copy: Path, reference_store: Path,
                                                       tmp_path: Path) -> None:
    """Bad detections with saved evaluation boxes said: delete eval_boxes_val.json."""
    from boxrefine.evaluate.run import Evaluator

    dummy = tmp_path / "ck" / "x.pt"
    dummy.parent.mkdir()
    dummy.write_bytes(b"x")
    Evaluator(make_config(data_copy, reference_store), dummy).setup()
    path = data_copy / "annotations" / "detections_val.json"
    dets = json.loads(path.read_text())
    dets[0]["bbox"][2] = -4
    path.write_text(json.dumps(dets))
    with pytest.raises(DataError) as e:
        Evaluator(make_config(data_copy, reference_store), dummy).setup()
    assert str(e.value).startswith(f"{path}: [0] (image_id {dets[0]['image_id']}): bbox has a negative width")
    assert "eval_boxes" not in str(e.value)


def test_unreadable_checkpoint_names_the_problem_not_torch_advice(tmp_path: Path) -> None:
    """A random-bytes checkpoint showed torch's text cut at "Re-running `torch." (weights_only=False)."""
    noise = tmp_path / "noise.pt"
    noise.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    module = tmp_path / "module.pt"
    torch.save({"refiner": torch.nn.Linear(1, 1), "format": 2}, module)
    for path, problem in ((noise, "not a torch checkpoint file: Unsupported operand"),
                          (module, "it holds a torch.nn.modules.linear.Linear object, which is never unpickled")):
        with pytest.raises(CheckpointFileError) as e:
            load_checkpoint(path)
        assert str(e.value).startswith(f"{path}: not a readable checkpoint ({problem}")
        assert "weights_only" not in str(e.value) and "Re-running" not in str(e.value)


def test_detections_of_rows_not_usable_are_counted_apart(tmp_path: Path, capsys) -> None:
    """Detections of images of the split whose rows were not complete were "not in the split"."""
    path = tmp_path / "d.json"
    entries = [{"image_id": i, "category_id": 1, "bbox": [1, 1, 5, 5], "score": 0.5} for i in (1, 2, 2, 3, 9)]
    path.write_text(json.dumps(entries))
    out = load_detections(path, image_ids={1}, split_ids={1, 2, 3})
    assert list(out) == [1]
    err = capsys.readouterr().err
    assert (f"{path}: 3 detection(s) for 2 image(s) of the split without a usable row (bad, damaged or not "
            "extracted) (e.g. 2); ignored") in err
    assert f"{path}: 1 detection(s) for 1 image id(s) not in the split (e.g. 9); ignored" in err


def test_encoder_share_is_of_this_run_only(demo_root: Path, reference_store: Path, tmp_path: Path, capsys) -> None:
    """A --watch cycle without encoder work reported the earlier cycles' encoder time: "= 1555% of wall"."""
    ex = Extractor(make_config(demo_root, copy_store(reference_store, tmp_path)), announce=False).setup()
    ex.encoder_s, ex.encoded = 3.2, 1  # as after an earlier cycle that encoded an image
    res = ex.plan().run()
    assert (res.encoded, res.encoder_s) == (0, 0.0)
    assert "no encoder work" in capsys.readouterr().err


def test_summary_counts_each_row_once(data_copy: Path, reference_store: Path, tmp_path: Path, sam, capsys) -> None:
    """A row recorded bad earlier was counted as up to date and as bad: "rows 4: ... up to date 4, bad 1"."""
    store = copy_store(reference_store, tmp_path)
    _train_image(data_copy, store).write_bytes(b"not an image")
    run_extract(make_config(data_copy, store, extract={"splits": ["train"]}), model=sam)
    capsys.readouterr()
    run_extract(make_config(data_copy, store, extract={"splits": ["train"]}), model=sam)
    assert "train: rows 4: encoded 0, gt-only 0, up to date 3, bad 1" in capsys.readouterr().err


def test_unreachable_endpoint_is_not_called_credentials(tmp_path: Path, monkeypatch) -> None:
    """An S3 endpoint nothing listens on said "check the cloud credentials"."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the request
    for key, value in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ALLOW_HTTP": "true"}.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    res, out = invoke("store", "info", "s3://bxr-nowhere/features.zarr")
    line = one_line_error(res, out)
    assert (f"s3://bxr-nowhere/features.zarr: cannot open the store: cannot reach the storage endpoint "
            f"http://127.0.0.1:{port} (Connection refused): check the endpoint URL and the network") in line
    assert "credentials" not in line


# ------------------------------------------------------------------------------------ item 11
def test_row_claimed_by_another_process_is_skipped(demo_root: Path, reference_store: Path, tmp_path: Path,
                                                   sam) -> None:
    """Two extracts that planned the same rows both encoded every one of them."""
    store = copy_store(reference_store, tmp_path)
    split = FeatureStore.open(str(store), "a").split("train")
    for i in (0, 1):
        split.clear_row(i, int(split.read_record(i)[FIELD["generation"]]) + 1)
    reindex(store)
    ex = Extractor(make_config(demo_root, store, extract={"splits": ["train"]}), sam, announce=False).setup()
    planned = {j.row: j.generation for j in ex.plans[0][1]}
    assert sorted(planned) == [0, 1]
    split.clear_row(0, planned[0])  # the other process's claim, made after this one planned
    res = ex.run()
    assert (res.encoded, res.splits[0].elsewhere) == (1, 1)
    states = _states(store)
    assert states[0] == STATE_EMPTY and states[1:] == [STATE_COMPLETE] * 3  # row 0 is the other's to write


@pytest.mark.slow
def test_two_unsharded_extracts_share_the_rows(demo_root: Path, tmp_path: Path) -> None:
    """Two unsharded extracts started together on one new store: about half the encoder work each."""
    store = tmp_path / "features.zarr"
    cfg = write_config(tmp_path / "cfg.yaml", demo_root, store)
    procs = [spawn_extract(cfg) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    encoded = [sum(int(part.split("encoded ")[1].split(",")[0]) for part in out.splitlines()
                   if ": rows " in part and "encoded " in part) for out in outs]
    assert sum(encoded) <= 7, outs  # 5 images; a race may make both encode a row
    assert all(s == STATE_COMPLETE for name in ("train", "val") for s in _states(store, name))
    res, out = invoke("store", "verify", str(store))
    assert res.exit_code == 0, out
