"""Crash safety (kill -9 mid-run) and concurrent --shard processes on one store."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    assert_stores_equal,
    kill_9_after_rows,
    make_config,
    spawn_extract,
    without_feature_digests,
    write_config,
)

from boxrefine.extract.run import run_extract
from boxrefine.shared.store.feature_store import FeatureStore, open_store


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_equals_uninterrupted(demo_root, reference_store, tmp_path, sam):
    store = tmp_path / "features.zarr"
    cfg_path = write_config(tmp_path / "cfg.yaml", demo_root, store)
    proc = spawn_extract(cfg_path)
    done = kill_9_after_rows(proc, store, timeout=240)
    assert 2 <= done < 5

    # every row a reader can see right after the kill is whole: its chunks equal the uninterrupted run's
    st, ref = open_store(str(store)), open_store(str(reference_store))
    for name in st.splits:
        sp, rp = st.split(name), ref.split(name)
        assert np.array_equal(sp.keys(), rp.keys())
        for i in sp.complete_indices().tolist():
            np.testing.assert_array_equal(without_feature_digests(sp.read_rows()[i]),
                                          without_feature_digests(rp.read_rows()[i]))
            for got, want in zip(sp.read_features(i), rp.read_features(i), strict=True):
                np.testing.assert_allclose(got.float().numpy(), want.float().numpy(), atol=2e-3, rtol=2e-3)
            for got, want in zip(sp.read_gt(i), rp.read_gt(i), strict=True):
                np.testing.assert_array_equal(got, want)

    res = run_extract(make_config(demo_root, store), model=sam)
    assert res.encoded == 5 - done
    assert_stores_equal(store, reference_store)


@pytest.mark.slow
def test_two_concurrent_shards_fill_one_store(demo_root, reference_store, tmp_path):
    store = tmp_path / "features.zarr"
    cfg_path = write_config(tmp_path / "cfg.yaml", demo_root, store)
    procs = [spawn_extract(cfg_path, "--shard", f"{i}/2") for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out
    assert any("encoded" in o for o in outs)
    assert_stores_equal(store, reference_store)


def test_torn_row_is_never_served_and_is_redone(reference_store, demo_root, tmp_path, sam):
    """Simulate a crash between a row's chunk writes and its record: readers skip it, extract redoes it."""
    import shutil

    store = tmp_path / "features.zarr"
    shutil.copytree(reference_store, store)
    FeatureStore.open(str(store), "a").split("train").clear_row(1)  # step 1 of a rewrite ...
    chunk = next((store / "train" / "image_embeddings" / "c" / "1").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    chunk.write_bytes(chunk.read_bytes()[:100])  # ... and a half-written chunk (worst case)
    assert 1 not in open_store(str(store)).split("train").complete_indices().tolist()
    res = run_extract(make_config(demo_root, store), model=sam)
    assert res.encoded == 1
    assert_stores_equal(store, reference_store)
