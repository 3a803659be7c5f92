"""``extract --watch``: the extractor as a service — picks up new images and changed annotations, stops
on SIGTERM within one batch (exit 0), at once on a second signal, and publishes its state, which
``store info`` shows (a stale heartbeat as "not running")."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_stores_equal, complete_rows, copy_store, invoke, make_config, spawn_extract, write_config

from boxrefine.extract.run import run_extract
from boxrefine.shared.store.feature_store import open_store
from boxrefine.shared.store.location import write_store_file
from boxrefine.shared.store.schema import FIELD
from boxrefine.shared.store.watchers import STALE_S, WatcherState, read_watchers


def _state(shard: str, heartbeat: float, status: str) -> WatcherState:
    return WatcherState(shard=shard, host="node7", pid=4242, started=heartbeat - 100, interval_s=60.0,
                        heartbeat=heartbeat, status=status, cycle=3, rows_done=12, rows_todo=5, images_per_s=1.5)


def test_store_info_shows_watchers_and_a_stale_heartbeat_as_not_running(reference_store, tmp_path):
    store = copy_store(reference_store, tmp_path)
    now = time.time()
    for st in (_state("shard-0-of-3", now, "extracting"), _state("shard-1-of-3", now - STALE_S - 30, "idle"),
               _state("shard-2-of-3", now - 5000, "stopped")):
        write_store_file(str(store), st.key, json.dumps(st.__dict__).encode())
    res, out = invoke("store", "info", str(store))
    assert res.exit_code == 0, out
    assert "extract watchers (1 running)" in out
    line = {ln.split(":")[0].strip(): ln for ln in out.splitlines() if "shard-" in ln}
    assert "running, extracting" in line["shard-0-of-3"] and "node7 pid 4242" in line["shard-0-of-3"]
    assert "rows done 12, to do 5, 1.50 images/s" in line["shard-0-of-3"]
    assert "not running (last heartbeat" in line["shard-1-of-3"]
    assert "stopped at" in line["shard-2-of-3"]
    # --overwrite counts the watchers' folder as the store's own content (deleted with it)
    from boxrefine.shared.store.location import inspect_store_path

    assert "watchers" in inspect_store_path(str(store)).own


def _wait(what, cond, proc, timeout=300.0, every=0.2):
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"watcher ended while waiting for {what}:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def _add_image(data: Path, src: str, new: str) -> None:
    """A new image in the train split (a copy of ``src`` with its annotations)."""
    shutil.copy(data / "images" / "train" / src, data / "images" / "train" / new)
    ann_path = data / "annotations" / "instances_train.json"
    ann = json.loads(ann_path.read_text())
    old = next(im for im in ann["images"] if im["file_name"] == src)
    image_id = max(im["id"] for im in ann["images"]) + 1
    ann["images"].append({**old, "id": image_id, "file_name": new})
    next_id = max(a["id"] for a in ann["annotations"]) + 1
    for k, a in enumerate([a for a in ann["annotations"] if a["image_id"] == old["id"]]):
        ann["annotations"].append({**a, "id": next_id + k, "image_id": image_id})
    ann_path.write_text(json.dumps(ann))


@pytest.mark.slow
def test_watch_picks_up_new_images_and_changed_annotations_then_sigterm_exits_0(data_copy, reference_store, tmp_path):
    store = copy_store(reference_store, tmp_path)
    proc = spawn_extract(write_config(tmp_path / "cfg.yaml", data_copy, store), "--watch", "--interval", "0.5")
    try:
        _wait("the first cycle", lambda: any(w.cycle >= 1 and w.status == "idle" for w in read_watchers(str(store))),
              proc)
        _add_image(data_copy, "train_0001.png", "train_0100.png")
        ann_path = data_copy / "annotations" / "instances_val.json"
        ann = json.loads(ann_path.read_text())
        ann["annotations"][0]["category_id"] = 99  # a changed annotation: a GT-only rewrite
        ann_path.write_text(json.dumps(ann))
        val = lambda: open_store(str(store)).split("val")  # noqa: E731
        _wait("the new image", lambda: complete_rows(store) == 6, proc)
        _wait("the changed annotation", lambda: 99 in val().read_gt(0)[2][:, 1].tolist(), proc)
        st = open_store(str(store)).split("train")
        new_row = int(np.flatnonzero(st.keys() == st.keys()[-1])[0])
        assert new_row == 4 and int(st.read_rows()[new_row, FIELD["generation"]]) == 1
        for got, want in zip(st.read_features(4), st.read_features(1), strict=True):  # the same picture
            np.testing.assert_allclose(got.float().numpy(), want.float().numpy(), atol=2e-3, rtol=2e-3)
        assert int(val().read_rows()[0, FIELD["generation"]]) == 2  # rewritten once
        _wait("the state", lambda: read_watchers(str(store))[0].rows_done >= 2, proc, timeout=30)
        res, out = invoke("store", "info", str(store))
        assert "shard-0-of-1: running" in out, out
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    (w,) = read_watchers(str(store))
    assert w.status == "stopped" and w.pid == proc.pid and w.rows_done >= 2
    assert "stopped at" in invoke("store", "info", str(store))[1]


@pytest.mark.slow
def test_sigterm_commits_the_batch_in_flight_and_a_second_signal_exits_at_once(demo_root, reference_store, tmp_path,
                                                                               sam):
    store = tmp_path / "features.zarr"
    cfg = write_config(tmp_path / "cfg.yaml", demo_root, store)
    proc = spawn_extract(cfg, "--watch", "--interval", "30")
    _wait("a first row", lambda: complete_rows(store) >= 1, proc, every=0.05)
    at_signal = complete_rows(store)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    after = complete_rows(store)
    assert at_signal <= after <= at_signal + 2 and after < 5, (at_signal, after, out)  # within one batch
    assert read_watchers(str(store))[0].status == "stopped"

    proc = spawn_extract(cfg, "--watch", "--interval", "30")
    _wait("the encoder at work", lambda: any(w.status == "extracting" for w in read_watchers(str(store))), proc,
          every=0.05)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, out
    assert "stopped at once" in out
    res = run_extract(make_config(demo_root, store), model=sam)  # rows in flight are redone, as after kill -9
    assert complete_rows(store) == 5 and res.encoded >= 1
    assert_stores_equal(store, reference_store)


def test_a_second_watcher_of_the_same_shard_is_refused(reference_store, demo_root, tmp_path):
    store = copy_store(reference_store, tmp_path)
    other = _state("shard-0-of-1", time.time(), "idle")
    write_store_file(str(store), other.key, json.dumps(other.__dict__).encode())
    res, out = invoke("extract", "--config", str(write_config(tmp_path / "c.yaml", demo_root, store)), "--watch")
    assert res.exit_code != 0 and "already served by a running watcher" in out and "node7 pid 4242" in out, out
