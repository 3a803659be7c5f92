"""A store at ``s3://bucket/path`` against a real S3 API server (moto's server mode on 127.0.0.1,
``tests/s3server.py``): the full pipeline, two concurrent shards, kill -9 mid-extract then rerun,
one-line errors for a missing bucket, wrong credentials or an unreachable endpoint, and the number of
requests that opening a split costs."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import (
    REPO,
    assert_stores_equal,
    kill_9_after_rows,
    make_config,
    spawn_extract,
    without_feature_digests,
    write_config,
)

from boxrefine.extract.run import run_extract
from boxrefine.shared.data.records import ImageRecord
from boxrefine.shared.store.feature_store import FeatureStore, open_store
from boxrefine.shared.store.row_index import IndexPart
from boxrefine.shared.store.rows import StoreRows
from boxrefine.shared.store.schema import STATE_COMPLETE


def _small_train(demo_root, store, runs, **train):
    base = {"runs_dir": str(runs), "epochs": 1, "batch_images": 2, "boxes_per_image": 4, "num_workers": 1,
            "name": "s3run"}
    base.update(train)
    return make_config(demo_root, store, train=base, refiner={"use_mask": False, "hidden": 32})


@pytest.mark.slow
def test_full_pipeline_on_s3(s3, demo_root, reference_store, tmp_path, sam):
    """extract → train → evaluate with the store on S3: the same store as on local disk, and train and
    evaluate read it (DataLoader workers included)."""
    from boxrefine.evaluate.run import run_evaluate
    from boxrefine.train.recipe import run_train

    url = f"{s3}/features.zarr"
    res = run_extract(make_config(demo_root, url, extract={"num_workers": 1}), model=sam)
    assert res.encoded == 5
    assert_stores_equal(url, reference_store)
    assert run_extract(make_config(demo_root, url), model=sam).encoded == 0  # incremental on S3 too
    cfg = _small_train(demo_root, url, tmp_path / "runs")
    trained = run_train(cfg)
    assert trained.epochs_done == 1 and (trained.run_dir / "best.pt").is_file()
    ev = run_evaluate(cfg, trained.run_dir / "best.pt")
    assert ev.rows and ev.rows[0]["mean_iou"] > 0  # one checkpoint scored from the S3 store


@pytest.mark.slow
def test_two_concurrent_shards_fill_one_s3_store(s3, demo_root, reference_store, tmp_path):
    url = f"{s3}/features.zarr"
    cfg_path = write_config(tmp_path / "cfg.yaml", demo_root, url)
    procs = [spawn_extract(cfg_path, "--shard", f"{i}/2") for i in range(2)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out
    assert_stores_equal(url, reference_store)
    # readers see every row through the row index the two shards wrote (each its own part)
    assert len(StoreRows.from_store(url, "train")) == 4


@pytest.mark.slow
def test_kill_9_mid_extract_on_s3_then_rerun_equals_uninterrupted(s3, demo_root, reference_store, tmp_path, sam):
    url = f"{s3}/features.zarr"
    proc = spawn_extract(write_config(tmp_path / "cfg.yaml", demo_root, url))
    done = kill_9_after_rows(proc, url, timeout=300)
    assert 2 <= done < 5
    st, ref = open_store(url), open_store(str(reference_store))
    for name in st.splits:  # whatever a reader can see right after the kill is whole
        sp, rp = st.split(name), ref.split(name)
        for i in sp.complete_indices().tolist():
            np.testing.assert_array_equal(without_feature_digests(sp.read_rows()[i]),
                                          without_feature_digests(rp.read_rows()[i]))
    res = run_extract(make_config(demo_root, url), model=sam)
    assert res.encoded == 5 - done
    assert_stores_equal(url, reference_store)


def _cli(*args, timeout=120):
    """``boxrefine ARGS`` as a process; (returncode, output, seconds)."""
    env = {**os.environ, "CI": "true", "PYTHONWARNINGS": "ignore", "COLUMNS": "250", "NO_COLOR": "1"}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "boxrefine.shared.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)  # the guard against a hang
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t0


def _one_error_line(rc, out):
    assert rc != 0 and "Traceback" not in out, out
    lines = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, out
    return lines[0]


@pytest.mark.slow
def test_missing_bucket_wrong_credentials_and_no_server_fail_in_one_line(s3, s3_server, demo_root, tmp_path,
                                                                          monkeypatch):
    """Each ends at once in one line naming the store (the process limit is only the guard against a
    hang: requests give up within seconds, CONNECT_TIMEOUT / RETRY_TIMEOUT in shared/store/objstore.py)."""
    import moto.settings

    missing = "s3://bxr-no-such-bucket/features.zarr"
    for args in (("store", "info", missing),
                 ("extract", "--config", str(write_config(tmp_path / "m.yaml", demo_root, missing))),
                 ("train", "--config", str(write_config(tmp_path / "t.yaml", demo_root, missing)))):
        rc, out, seconds = _cli(*args)
        line = _one_error_line(rc, out)
        assert missing in line and "bucket does not exist" in line, line
        print(f"missing bucket, {args[0]}: one-line error after {seconds:.1f} s (process start included)")

    url = f"{s3}/features.zarr"
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the server now checks keys
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
    for args in (("store", "info", url),
                 ("extract", "--config", str(write_config(tmp_path / "c.yaml", demo_root, url)))):
        rc, out, seconds = _cli(*args)
        line = _one_error_line(rc, out)
        print(f"wrong credentials, {args[0]}: one-line error after {seconds:.1f} s (process start included)")
        assert url in line and "PermissionDenied" in line and "check the cloud credentials" in line, line
    monkeypatch.undo()

    from s3server import closed_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")  # nothing listens there
    rc, out, seconds = _cli("store", "info", url)
    line = _one_error_line(rc, out)
    assert url in line and "cannot" in line, line
    print(f"unreachable endpoint: one-line error after {seconds:.1f} s")


def _split_of(url: str, n: int) -> None:
    """A store whose train split has ``n`` complete rows (records only: opening a split reads no
    features), written as extract writes it, with its row index."""
    from boxrefine.shared.config import StoreConfig
    from boxrefine.shared.store.identity import StoreIdentity

    ident = StoreIdentity("vit_tiny", "random-init:seed=0", 1024, (0.0,) * 3, (1.0,) * 3, "float16", "float32", 256,
                          "percentile")
    store = FeatureStore.open_or_create(StoreConfig(path=url), ident, {}, {})
    recs = [ImageRecord(image_id=k, file_name=f"{k:05d}.png", key=k + 1, height=8, width=8, instances=(),
                        ann_hash=1) for k in range(n)]
    split = store.layout_split("train", recs, {"path": "a.json", "sha256": "0"}, "images", 160)
    part = IndexPart(split, (0, 1))
    part.load(split.read_rows())
    split.watch_records(part.set)
    for k in range(n):
        split.commit_row(k, {"state": STATE_COMPLETE, "orig_h": 8, "orig_w": 8, "generation": 1})
    part.flush()


def test_opening_a_split_costs_a_bounded_number_of_requests(s3, s3_server, tmp_path):
    """Opening a split (what train and evaluate do: records, keys, the StoreRows) reads the row index,
    not one record per row: the same number of requests for 10 and for 120 rows."""
    counts = {}
    for n in (10, 120):
        url = f"{s3}/rows{n}.zarr"
        _split_of(url, n)
        s3_server.reset()
        ds = StoreRows.from_store(url, "train")
        counts[n] = s3_server.total()
        assert len(ds) == n
    print(f"requests to open a split: {counts}")
    assert counts[10] == counts[120] < 40, counts


def test_a_training_item_costs_five_requests_and_damage_is_found(s3, s3_server, tmp_path, monkeypatch):
    """A row read from S3 (``shared/store/direct.py``): its four chunks fetched together, then its record
    (the generation check): 5 requests (3 without instances), the same values as zarr's reads; a flipped
    byte is damage."""
    import obstore
    from test_direct_reads import INSTANCES, make_store, read, same

    from boxrefine.shared.store.objstore import s3_store

    url = make_store(f"{s3}/direct.zarr", "none")
    ds = StoreRows.from_store(url, "train")
    ds[0]  # opens the split and its arrays' metadata
    s3_server.reset()
    for k in range(len(ds)):
        assert "damage" not in ds[k]
    assert s3_server.total() == sum(5 if k else 3 for k in INSTANCES), s3_server.counts  # no GT chunk for k=0
    for row in range(len(INSTANCES)):
        same(read(url, row, True, monkeypatch), read(url, row, False, monkeypatch))
    store = s3_store(url.removeprefix("s3://").split("/")[0])
    key = "direct.zarr/train/interm_embeddings/c/2/0/0/0"
    data = bytearray(obstore.get(store, key).bytes())
    data[len(data) // 2] ^= 0x10
    obstore.put(store, key, bytes(data))
    got = read(url, 2, True, monkeypatch)
    assert got == read(url, 2, False, monkeypatch)
    assert got[0] == "StoreDamage" and "array interm_embeddings: the chunk fails its crc32c checksum" in got[1]
