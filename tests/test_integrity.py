"""Nothing lost, nothing silently wrong (issue 10, part A): store paths that are not stores, checksummed
chunks and row digests (detect, name, repair), re-stamping a store that a failed extract left empty,
checkpoint checksums, and kill -9 of a real extract at seeded moments. Environment faults and
DataLoader workers are in ``test_integrity_environment.py``. Each numbered item's test reproduces
its failure on the code before the fix."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_stores_equal, copy_store, invoke, make_config, one_line_error, spawn_extract, write_config

from boxrefine.extract.run import run_extract
from boxrefine.shared.data.records import load_coco
from boxrefine.shared.errors import BoxrefineError
from boxrefine.shared.model.checkpoint import CKPT_FORMAT, CheckpointFileError, load_checkpoint
from boxrefine.shared.store.feature_store import open_store
from boxrefine.shared.store.location import StoreError
from boxrefine.shared.store.rows import StoreRows
from boxrefine.train.checkpoints import CheckpointSaver

ROW = 2  # the train row the damage tests hit
ROW_ARRAYS = ("image_embeddings", "interm_embeddings", "gt_masks", "gt_boxes", "gt_info", "rows")


def chunk_file(store: Path, split: str, array: str, row: int) -> Path:
    """The file holding row ``row`` of ``array`` (one chunk per row; chunk 0 for the index arrays)."""
    base = store / split / array / "c" / str(row)
    return base if base.is_file() else next(p for p in sorted(base.rglob("*")) if p.is_file())


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def row_name(demo_root: Path, store: Path, split: str, row: int) -> str:
    """What a damage message must say of a row: its image id and image file."""
    key = int(open_store(str(store)).split(split).keys()[row])
    rec = next(r for r in load_coco(demo_root / "annotations" / f"instances_{split}.json").images if r.key == key)
    return f"row {row} (image id {rec.image_id}, {demo_root / 'images' / split / rec.file_name})"


# ------------------------------------------------------------------------------ 1. data loss


def test_store_path_that_is_not_a_store_is_never_written_or_deleted(data_copy: Path, tmp_path: Path) -> None:
    """`--store data/demo` (a typo) used to delete the images, the annotations and a notes file."""
    (data_copy / "notes.txt").write_text("my notes")
    before = sorted(str(p.relative_to(data_copy)) for p in data_copy.rglob("*"))
    cfg = write_config(tmp_path / "cfg.yaml", data_copy, tmp_path / "features.zarr")
    for extra in (["--overwrite"], []):
        res, out = invoke("extract", "--config", str(cfg), "--store", str(data_copy), *extra)
        line = one_line_error(res, out)
        assert f"{data_copy}: not empty and not a boxrefine feature store" in line
        assert sorted(str(p.relative_to(data_copy)) for p in data_copy.rglob("*")) == before
    assert (data_copy / "notes.txt").read_text() == "my notes"


def test_overwrite_deletes_only_the_store_content_and_says_what(reference_store: Path, demo_root: Path,
                                                                 tmp_path: Path, capsys) -> None:
    """The whole store's content, and nothing else (with --split only the split named: see
    tests/test_nothing_lost.py::test_overwrite_with_split_deletes_only_that_split)."""
    from boxrefine.shared.config import StoreConfig
    from boxrefine.shared.store.feature_store import FeatureStore

    store = copy_store(reference_store, tmp_path)
    (store / "notes.txt").write_text("keep me")
    identity = open_store(str(store)).identity
    res, out = invoke("extract", "--config", str(write_config(tmp_path / "cfg.yaml", demo_root, store)), "--overwrite",
                      "--store", str(store), "--set", "model.type=vit_b", "--split", "val")
    assert "--overwrite --split val rebuilds only those splits" in one_line_error(res, out)
    assert open_store(str(store)).splits == ["train", "val"]  # refused before anything was deleted
    FeatureStore.open_or_create(StoreConfig(path=str(store)), identity, {}, {}, overwrite=True)
    out = capsys.readouterr().err
    assert "deleting the store's own content: train/, val/, zarr.json" in out
    assert "keeping what is not part of the store: notes.txt" in out
    assert (store / "notes.txt").read_text() == "keep me"
    assert open_store(str(store)).splits == []


# --------------------------------------------------------------------- 2. integrity: detect, report, repair


def _train_cfg(tmp_path: Path, demo_root: Path, store: Path) -> Path:
    return write_config(tmp_path / "train.yaml", demo_root, store, refiner={"use_mask": False},
                        train={"runs_dir": str(tmp_path / "runs"), "num_workers": 0, "epochs": 1})


def test_missing_chunk_of_a_complete_row_is_named_reported_and_redone(reference_store: Path, demo_root: Path,
                                                                      tmp_path: Path, sam) -> None:
    """A deleted feature chunk used to read back as zeros: store info said complete and train exited 0."""
    store = copy_store(reference_store, tmp_path)
    chunk_file(store, "train", "image_embeddings", ROW).unlink()
    res, out = invoke("train", "--config", str(_train_cfg(tmp_path, demo_root, store)), "--name", "t")
    line = one_line_error(res, out)
    assert f"split train, {row_name(demo_root, store, 'train', ROW)}, array image_embeddings" in line
    assert f"boxrefine store verify --repair {store}" in line

    res, out = invoke("store", "verify", str(store))
    one_line_error(res, out)
    assert "rows checked 5, damaged 1, repaired 0" in out
    res, out = invoke("store", "verify", "--repair", str(store))
    assert res.exit_code == 0, out
    assert "rows checked 5, damaged 1, repaired 1" in out and "run `boxrefine extract`" in out
    res, out = invoke("store", "info", str(store))
    assert re.search(r"train\W+3\W+4\W+0\W+0\W+1\W", out), out  # complete 3 of 4, damaged 1

    assert run_extract(make_config(demo_root, store), model=sam).encoded == 1
    assert_stores_equal(store, reference_store)
    res, out = invoke("store", "verify", str(store))
    assert res.exit_code == 0 and "rows checked 5, damaged 0" in out, out


def test_on_damage_skip_trains_without_the_damaged_row(reference_store: Path, demo_root: Path,
                                                       tmp_path: Path) -> None:
    store = copy_store(reference_store, tmp_path)
    chunk_file(store, "train", "interm_embeddings", ROW).unlink()
    res, out = invoke("train", "--config", str(_train_cfg(tmp_path, demo_root, store)), "--name", "t",
                      "--set", "store.on_damage=skip")
    assert res.exit_code == 0, out
    assert out.count("skipped (store.on_damage: skip)") == 1
    assert f"{row_name(demo_root, store, 'train', ROW)}, array interm_embeddings" in out
    epoch = json.loads((tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()[0])
    assert epoch["images"] == 3


@pytest.mark.parametrize("array", ROW_ARRAYS)
def test_flipped_byte_in_a_row_array_is_named_and_redone(array: str, reference_store: Path, demo_root: Path,
                                                         tmp_path: Path, sam) -> None:
    """Flipped bits used to be served (gt_boxes, rows) or end in a blosc traceback naming no file."""
    store = copy_store(reference_store, tmp_path)
    name = row_name(demo_root, store, "train", ROW)
    flip_byte(chunk_file(store, "train", array, ROW))
    # the record itself ("rows") too: the split opens through the row index, and reading the row
    # checks its record again (SplitStore.read_row), which fails its checksum
    ds = StoreRows.from_store(str(store), "train", with_masks=True)
    items = [ds[k] for k in range(len(ds))]
    assert [it["row"] for it in items if "damage" in it] == [ROW]
    message = next(it["damage"] for it in items if "damage" in it)
    assert f"split train, {name}, array {array}: " in message

    res, out = invoke("store", "verify", "--repair", str(store))
    assert res.exit_code == 0 and "damaged 1, repaired 1" in out, out
    assert f"damaged: split train, {name}, array {array}" in out
    assert run_extract(make_config(demo_root, store), model=sam).encoded == 1
    assert_stores_equal(store, reference_store)


@pytest.mark.parametrize("array", ["keys", "image_ids"])
def test_flipped_byte_in_a_split_index_is_named(array: str, reference_store: Path, demo_root: Path,
                                                tmp_path: Path, sam) -> None:
    store = copy_store(reference_store, tmp_path)
    flip_byte(chunk_file(store, "train", array, 0))
    split = open_store(str(store)).split("train")
    with pytest.raises(StoreError, match=f"damaged store: split train, array {array}: "):
        split.keys() if array == "keys" else split.image_ids()
    res, out = invoke("store", "verify", str(store))
    assert f"array {array}" in one_line_error(res, out) + out
    if array == "image_ids":  # extract rewrites it from the annotations
        assert run_extract(make_config(demo_root, store), model=sam).encoded == 0
        assert_stores_equal(store, reference_store)
    else:  # the row layout is lost: only a rebuild helps, and the message says so
        with pytest.raises(StoreError, match="rebuild the store with `boxrefine extract --overwrite`"):
            run_extract(make_config(demo_root, store), model=sam)


def test_store_of_the_previous_schema_is_refused_with_how_to_rebuild(reference_store: Path, tmp_path: Path) -> None:
    """The current schema checksums every chunk; a store of an older one has no checksums to trust."""
    store = copy_store(reference_store, tmp_path)
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["boxrefine"]["schema_version"] = 1
    (store / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=f"store schema 1; .*boxrefine extract --store NEW_STORE --reuse-features "
                                         f"{re.escape(str(store))}$"):
        open_store(str(store))
    from boxrefine.shared.store.location import inspect_store_path

    assert inspect_store_path(str(store)).kind == "store"  # so --overwrite may delete and rebuild it


# ------------------------------------------------------------- 3. a store left by a failed extract


def test_store_left_by_a_failed_checkpoint_is_restamped(demo_root: Path, tmp_path: Path, sam) -> None:
    bad = tmp_path / "sam_hq_vit_tiny.pth"
    bad.write_bytes(b"not a checkpoint" * 64)
    store = tmp_path / "features.zarr"
    only_val = {"splits": ["val"]}
    with pytest.raises(BoxrefineError, match="cannot load checkpoint"):
        run_extract(make_config(demo_root, store, model={"checkpoint": str(bad)}, extract=only_val), announce=False)
    assert open_store(str(store)).identity.checkpoint.startswith("sha256:")  # stamped, no complete row
    res = run_extract(make_config(demo_root, store, extract=only_val), model=sam)
    assert res.encoded == 1
    assert open_store(str(store)).identity.checkpoint == "random-init:seed=0"


# ------------------------------------------------------------------------ 4. checkpoint checksums


def test_flipped_byte_in_checkpoint_weights_is_reported(tmp_path: Path) -> None:
    w = torch.arange(4096, dtype=torch.float32)
    CheckpointSaver(tmp_path, 0).save(
        lambda saver: {"format": CKPT_FORMAT, "refiner": {"w": w}, "state": {"epoch": 1, "saver": saver}}, 1)
    path = tmp_path / "last.pt"
    assert torch.equal(load_checkpoint(path)["refiner"]["w"], w)
    data = bytearray(path.read_bytes())
    at = data.find(w[1000:1004].numpy().tobytes())
    assert at > 0
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointFileError, match=f"^{re.escape(str(path))}: checkpoint content fails its checksum"):
        load_checkpoint(path)


# ------------------------------------------------------------------------------ fault injection


def _chunks_written(store: Path) -> int:
    """Chunk files in the store (zarr's temp files excluded): grows as extract commits rows."""
    if not store.exists():
        return -1
    return sum(1 for p in store.rglob("*") if p.is_file() and p.name != "zarr.json" and ".partial" not in p.name)


@pytest.mark.slow
def test_kill_9_at_seeded_chunk_counts_then_rerun_equals_uninterrupted(demo_root: Path, reference_store: Path,
                                                                       tmp_path: Path, sam) -> None:
    """kill -9 of a real extract at 5 seeded points, chosen by counting the chunk files written so
    far (0 = as soon as the store exists); each rerun is killed in turn at the next point, and the
    last rerun completes. After every kill the store verifies clean (no torn row is served, nothing
    complete is damaged), and the end result equals an uninterrupted extract."""
    from boxrefine.shared.store.verify import verify_store

    store = tmp_path / "features.zarr"
    cfg = write_config(tmp_path / "cfg.yaml", demo_root, store)
    total = _chunks_written(reference_store)
    targets = sorted(random.Random(10).sample(range(0, total - 6), 5))  # leave the last row: the run must not end
    for target in targets:
        proc = spawn_extract(cfg)
        deadline = time.time() + 240
        while _chunks_written(store) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        while target == 0 and not (store / "zarr.json").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, f"extract ended before chunk {target} of {targets}:\n{proc.stdout.read()}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if (store / "zarr.json").exists():
            report = verify_store(open_store(str(store)))
            assert report.clean, [str(e) for e in report.damaged + report.split_problems]
    run_extract(make_config(demo_root, store), model=sam)  # the last rerun
    assert_stores_equal(store, reference_store)
    report = verify_store(open_store(str(store)))
    assert report.clean and report.checked == 5
