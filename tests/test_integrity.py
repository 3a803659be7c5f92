"""Nothing lost, nothing silently wrong (issue 10, part A): store paths that are not stores, checksummed
chunks and row digests (detect, name, repair), re-stamping a store that a failed extract left empty,
checkpoint checksums, environment faults as one line, DataLoader workers that die with extract, and
kill -9 of a real extract at seeded moments. Each test reproduces its failure on the code before
the fix."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_stores_equal, invoke, make_config, spawn_extract, write_config

from boxrefine.extract.run import run_extract
from boxrefine.shared.checkpoints import CKPT_FORMAT, CheckpointFileError, CheckpointSaver, load_checkpoint
from boxrefine.shared.errors import BoxrefineError
from boxrefine.shared.records import load_coco
from boxrefine.shared.rowdata import StoreRows
from boxrefine.shared.store import FeatureStore, StoreError, open_store

ROW = 2  # the train row the damage tests hit
ROW_ARRAYS = ("image_embeddings", "interm_embeddings", "gt_masks", "gt_boxes", "gt_info", "rows")


def _copy(reference_store: Path, tmp_path: Path) -> Path:
    store = tmp_path / "features.zarr"
    shutil.copytree(reference_store, store)
    return store


def chunk_file(store: Path, split: str, array: str, row: int) -> Path:
    """The file holding row ``row`` of ``array`` (one chunk per row; chunk 0 for the index arrays)."""
    base = store / split / array / "c" / str(row)
    return base if base.is_file() else next(p for p in sorted(base.rglob("*")) if p.is_file())


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def one_line_error(res, out: str) -> str:
    assert res.exit_code != 0, out
    assert "Traceback" not in out, out
    lines = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, out
    return lines[0]


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
                                                                 tmp_path: Path) -> None:
    store = _copy(reference_store, tmp_path)
    (store / "notes.txt").write_text("keep me")
    cfg = write_config(tmp_path / "cfg.yaml", demo_root, store)
    res, out = invoke("extract", "--config", str(cfg), "--overwrite", "--split", "val")
    assert res.exit_code == 0, out
    assert "deleting the store's own content: train/, val/, zarr.json" in out
    assert "keeping what is not part of the store: notes.txt" in out
    assert (store / "notes.txt").read_text() == "keep me"
    st = open_store(str(store))
    assert st.splits == ["val"] and st.split("val").complete_indices().tolist() == [0]


# --------------------------------------------------------------------- 2. integrity: detect, report, repair


def _train_cfg(tmp_path: Path, demo_root: Path, store: Path) -> Path:
    return write_config(tmp_path / "train.yaml", demo_root, store, refiner={"use_mask": False},
                        train={"runs_dir": str(tmp_path / "runs"), "num_workers": 0, "epochs": 1})


def test_missing_chunk_of_a_complete_row_is_named_reported_and_redone(reference_store: Path, demo_root: Path,
                                                                      tmp_path: Path, sam) -> None:
    """A deleted feature chunk used to read back as zeros: store info said complete and train exited 0."""
    store = _copy(reference_store, tmp_path)
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
    store = _copy(reference_store, tmp_path)
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
    store = _copy(reference_store, tmp_path)
    name = row_name(demo_root, store, "train", ROW)
    flip_byte(chunk_file(store, "train", array, ROW))
    if array == "rows":  # the record itself: readers refuse the split's damaged row up front
        with pytest.raises(StoreError) as ei:
            StoreRows.from_store(str(store), "train")
        message = str(ei.value)
    else:
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
    store = _copy(reference_store, tmp_path)
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
    store = _copy(reference_store, tmp_path)
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["boxrefine"]["schema_version"] = 1
    (store / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=f"store schema 1 .*rebuild the store: boxrefine extract --overwrite "
                                         f"--store {re.escape(str(store))}$"):
        open_store(str(store))
    from boxrefine.shared.store_files import inspect_store_path

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


# ------------------------------------------------------------------------- 13. environment faults


def _count_encodes(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    import boxrefine.extract.run as er

    calls = {"encode": 0}
    real = er.encode

    def encode(*a, **k):
        calls["encode"] += 1
        return real(*a, **k)

    monkeypatch.setattr(er, "encode", encode)
    return calls


def test_disk_full_stops_within_a_batch_in_one_line(demo_root: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import zarr.storage._local as local

    real_put = local._put

    def put(path, value, exclusive=False):
        if f"{os.sep}c{os.sep}" in str(path) and "embeddings" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_put(path, value, exclusive)

    monkeypatch.setattr(local, "_put", put)
    calls = _count_encodes(monkeypatch)
    store = tmp_path / "features.zarr"
    res, out = invoke("extract", "--config", str(write_config(tmp_path / "cfg.yaml", demo_root, store)))
    line = one_line_error(res, out)
    assert f"{store}: cannot write train row " in line and "disk full" in line
    assert calls["encode"] <= 2  # of 5: the failed write stops the run at the next batch, not at the end


def test_read_only_store_with_nothing_to_do(reference_store: Path, demo_root: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch, sam) -> None:
    import zarr.storage._local as local

    done = _copy(reference_store, tmp_path / "a")
    todo = _copy(reference_store, tmp_path / "b")
    FeatureStore.open(str(todo), "a").split("val").clear_row(0)

    def read_only(path, *a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    async def read_only_async(self, key, *a, **k):
        read_only(self.root / key)

    monkeypatch.setattr(local, "_put", read_only)
    monkeypatch.setattr(local.LocalStore, "delete", read_only_async)
    monkeypatch.setattr(local.LocalStore, "delete_dir", read_only_async)
    res = run_extract(make_config(demo_root, done), model=sam)
    assert res.encoded == 0 and all(s.skipped == s.rows for s in res.splits)
    res, out = invoke("extract", "--config", str(write_config(tmp_path / "cfg.yaml", demo_root, todo)))
    line = one_line_error(res, out)
    assert f"{todo}: cannot write val row 0" in line and "Read-only file system" in line


def test_unreadable_chunk_in_a_loader_worker_is_one_line(reference_store: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import zarr.storage._local as local
    from torch.utils.data import DataLoader

    from boxrefine.shared.rowdata import collate_rows

    real_get = local._get

    def get(path, *a, **k):
        if "interm_embeddings" in str(path) and f"{os.sep}c{os.sep}" in str(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_get(path, *a, **k)

    monkeypatch.setattr(local, "_get", get)  # the forked worker inherits it
    ds = StoreRows.from_store(str(reference_store), "train")
    with pytest.raises(StoreError) as ei:
        for batch in DataLoader(ds, batch_size=2, num_workers=1, collate_fn=collate_rows):
            ds.accept(batch)
    message = str(ei.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(f"{reference_store}: cannot read train/interm_embeddings: Permission denied")


@pytest.mark.parametrize("node", ["", "train", "train/rows"])
def test_corrupt_zarr_json_is_one_line(node: str, reference_store: Path, demo_root: Path, tmp_path: Path) -> None:
    store = _copy(reference_store, tmp_path)
    meta = store / node / "zarr.json" if node else store / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:40])
    res, out = invoke("store", "info", str(store))
    assert f"{meta}: corrupt zarr metadata" in one_line_error(res, out)
    cfg = write_config(tmp_path / "cfg.yaml", demo_root, store)
    res, out = invoke("extract", "--config", str(cfg), *(["--overwrite"] if not node else []))
    if node == "train/rows":  # an array's metadata follows from the layout: extract writes it anew
        assert res.exit_code == 0 and "encoded 0" in out, out
        assert_stores_equal(store, reference_store)
        return
    assert f"{meta}: corrupt zarr metadata" in one_line_error(res, out)
    assert meta.exists()  # a store extract cannot identify is never deleted


@pytest.mark.parametrize("url, package", [("s3://bucket/features.zarr", "s3fs"),
                                          ("gs://bucket/features.zarr", "gcsfs")])
def test_cloud_url_without_its_fsspec_backend(url: str, package: str, demo_root: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # not installed (and never reaches the network)
    res, out = invoke("store", "info", url)
    line = one_line_error(res, out)
    assert line.startswith(f"error: {url}: cannot open") and package in line
    res, out = invoke("extract", "--config", str(write_config(tmp_path / "cfg.yaml", demo_root, url)))
    assert url in one_line_error(res, out) and package in out


def _cloud_error(kind: str) -> Exception:
    """The exceptions s3fs / gcsfs raise for missing or wrong credentials."""
    if kind == "no-credentials":
        cls = type("NoCredentialsError", (Exception,), {"__module__": "botocore.exceptions"})
        return cls("Unable to locate credentials")
    if kind == "google-default":
        cls = type("DefaultCredentialsError", (Exception,), {"__module__": "google.auth.exceptions"})
        return cls("Your default credentials were not found.")
    return PermissionError(errno.EACCES, "The AWS Access Key Id you provided does not exist in our records.")


@pytest.mark.parametrize("protocol, kind, says", [("s3", "no-credentials", "Unable to locate credentials"),
                                                  ("s3", "wrong-key", "Access Key Id you provided does not exist"),
                                                  ("gs", "google-default", "default credentials were not found")])
def test_cloud_credentials_errors_are_one_line(protocol: str, kind: str, says: str, demo_root: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from fsspec.spec import AbstractFileSystem

    registry = sys.modules["fsspec.registry"]  # the module (``fsspec.registry`` is its read-only view)

    error = _cloud_error(kind)

    class Cloud(AbstractFileSystem):
        """Stands in for the cloud backend: every request fails as it does without valid credentials."""

        def _fail(self, *a, **k):
            raise error

        info = ls = _open = cat_file = pipe_file = rm = _fail

    Cloud.protocol = (protocol,)
    monkeypatch.setitem(registry._registry, protocol, Cloud)
    url = f"{protocol}://bucket/features.zarr"
    res, out = invoke("store", "info", url)
    line = one_line_error(res, out)
    assert line.startswith(f"error: {url}: cannot ") and says in line
    res, out = invoke("extract", "--config", str(write_config(tmp_path / "cfg.yaml", demo_root, url)))
    assert url in one_line_error(res, out)


# ----------------------------------------------------------- 14. workers die with their parent


def _children(pid: int) -> list[int]:
    out = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(d))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_decode_workers_exit_when_extract_is_killed(tmp_path: Path) -> None:
    """Workers blocked handing over decoded images used to outlive a kill -9 of extract by minutes."""
    from boxrefine.shared.dev.demo import generate_demo

    generate_demo(tmp_path / "demo", num_train=8, num_val=1, seed=3)
    store = tmp_path / "features.zarr"
    proc = spawn_extract(write_config(tmp_path / "cfg.yaml", tmp_path / "demo", store, extract={"num_workers": 2}))
    kids: list[int] = []
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            kids = _children(proc.pid)
            if len(kids) >= 2 and (store / "train" / "rows" / "c" / "0").exists():
                break
            time.sleep(0.05)
        assert proc.poll() is None and len(kids) >= 2, proc.stdout.read() if proc.stdout else ""
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 5
        while time.time() < deadline and any(map(_alive, kids)):
            time.sleep(0.1)
        assert not [k for k in kids if _alive(k)], "DataLoader workers outlived their parent"
    finally:
        for k in kids:
            if _alive(k):
                os.kill(k, signal.SIGKILL)


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
    from boxrefine.shared.integrity import verify_store

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
