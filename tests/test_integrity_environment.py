"""Environment faults end in one line naming the path and the cause, never a traceback (issue 10,
item 13: a full disk, a read-only store, an unreadable chunk in a DataLoader worker, a corrupt
zarr.json, an fsspec URL without its backend, missing or wrong cloud credentials), and DataLoader
workers die with their parent (item 14). Each test reproduces its failure on the code before the fix."""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_stores_equal, copy_store, invoke, make_config, one_line_error, spawn_extract, write_config

from boxrefine.extract.run import run_extract
from boxrefine.shared.store.feature_store import FeatureStore
from boxrefine.shared.store.location import StoreError
from boxrefine.shared.store.rows import StoreRows

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

    done = copy_store(reference_store, tmp_path / "a")
    todo = copy_store(reference_store, tmp_path / "b")
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


@pytest.mark.parametrize("use_direct", [True, False])
def test_unreadable_chunk_in_a_loader_worker_is_one_line(reference_store: Path, use_direct: bool,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Through zarr's reads and the direct ones (shared/store/direct.py) alike."""
    import zarr.storage._local as local
    from torch.utils.data import DataLoader

    import boxrefine.shared.store.direct as direct
    from boxrefine.shared.store.rows import collate_rows

    real_get, real_read = local._get, direct.read_file

    def unreadable(path: object) -> None:
        if "interm_embeddings" in str(path) and f"{os.sep}c{os.sep}" in str(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    def get(path, *a, **k):
        unreadable(path)
        return real_get(path, *a, **k)

    def read_file(path, *a, **k):
        unreadable(path)
        return real_read(path, *a, **k)

    monkeypatch.setattr(direct, "ENABLED", use_direct)  # the forked worker inherits these
    monkeypatch.setattr(local, "_get", get)
    monkeypatch.setattr(direct, "read_file", read_file)
    ds = StoreRows.from_store(str(reference_store), "train")
    with pytest.raises(StoreError) as ei:
        for batch in DataLoader(ds, batch_size=2, num_workers=1, collate_fn=collate_rows):
            ds.accept(batch)
    message = str(ei.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(f"{reference_store}: cannot read train/interm_embeddings: Permission denied")


@pytest.mark.parametrize("node", ["", "train", "train/rows"])
def test_corrupt_zarr_json_is_one_line(node: str, reference_store: Path, demo_root: Path, tmp_path: Path) -> None:
    store = copy_store(reference_store, tmp_path)
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


@pytest.mark.parametrize("url, package", [("s3://bucket/features.zarr", "obstore"),
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
    """The exception gcsfs raises without credentials."""
    assert kind == "google-default"
    cls = type("DefaultCredentialsError", (Exception,), {"__module__": "google.auth.exceptions"})
    return cls("Your default credentials were not found.")


# s3:// goes through obstore, not fsspec: its credential errors are met for real against moto's S3
# server in tests/test_s3.py
@pytest.mark.parametrize("protocol, kind, says", [("gs", "google-default", "default credentials were not found")])
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
