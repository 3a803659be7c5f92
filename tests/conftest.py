"""Shared fixtures: a tiny seeded demo dataset, one random-init vit_tiny, and a reference store
built once per session (the encoder costs ~2 s per image on 2 CPU cores)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning, module="pycocotools")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["BOXREFINE_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 train images (JPEG, grayscale PNG, RGBA PNG, 16-bit PNG) + 1 val image. Read-only: copy it."""
    from boxrefine.shared.dev.demo import generate_demo

    root = tmp_path_factory.mktemp("demo")
    generate_demo(root, num_train=4, num_val=1, seed=3)
    return root


def config_dict(data_root: Path, store_path: Path | str, **sections: dict[str, Any]) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "data": {"splits": {
            split: {"images": str(data_root / "images" / split),
                    "annotations": str(data_root / "annotations" / f"instances_{split}.json"),
                    "detections": str(data_root / "annotations" / f"detections_{split}.json")}
            for split in ("train", "val")}},
        "model": {"type": "vit_tiny", "checkpoint": None, "seed": 0, "device": "cpu"},
        "store": {"path": str(store_path)},
        "extract": {"num_workers": 0, "batch_size": 1},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def make_config(data_root: Path, store_path: Path | str, **sections: dict[str, Any]):
    from boxrefine.shared.config import validate_config

    return validate_config(config_dict(data_root, store_path, **sections), "<test>", Path.cwd())


def write_config(path: Path, data_root: Path, store_path: Path | str, **sections: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config_dict(data_root, store_path, **sections)))
    return path


@pytest.fixture(scope="session")
def sam():
    from boxrefine.shared.model.sam import build_hq_sam

    return build_hq_sam("vit_tiny", None, 0, "cpu", announce=False)


@pytest.fixture(scope="session")
def reference_store(demo_root: Path, sam, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted extract of the demo data. Read-only: copy it before changing anything."""
    from boxrefine.extract.run import run_extract

    store = tmp_path_factory.mktemp("ref") / "features.zarr"
    res = run_extract(make_config(demo_root, store, extract={"num_workers": 2}), model=sam)
    assert res.encoded == 5
    return store


@pytest.fixture
def data_copy(demo_root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(demo_root, dst)
    return dst


def run_cli(*args: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess:
    env = {**os.environ, "CI": "true", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "boxrefine.shared.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"boxrefine {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def store_only(demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the demo data WITHOUT its images, in a process where the image encoder cannot be
    built and images/GT masks cannot be decoded: what train and evaluate must cope with."""
    import segment_anything_hq  # noqa: F401

    import boxrefine.shared.data.records as records
    import boxrefine.shared.model.sam as sm
    from boxrefine.shared.geometry.frames import ImageGeometry

    data = tmp_path / "store-only-data"
    shutil.copytree(demo_root, data)
    shutil.rmtree(data / "images")
    bs = sys.modules["segment_anything_hq.build_sam"]
    monkeypatch.setattr(sm, "build_hq_sam", lambda *a, **k: pytest.fail("image encoder built"))
    for cls in ("TinyViT", "ImageEncoderViT"):
        monkeypatch.setattr(bs, cls, lambda *a, **k: pytest.fail("an image encoder was constructed"))
    monkeypatch.setattr("cv2.imread", lambda *a, **k: pytest.fail("image opened"))
    monkeypatch.setattr("cv2.imdecode", lambda *a, **k: pytest.fail("image decoded"))
    monkeypatch.setattr(records, "instance_mask", lambda *a, **k: pytest.fail("GT mask decoded again"))
    monkeypatch.setattr(ImageGeometry, "masks_to_lowres", lambda *a, **k: pytest.fail("GT masks resized again"))
    return data


STORE_ARRAYS = ("keys", "image_ids", "image_embeddings", "interm_embeddings", "gt_masks", "gt_boxes", "gt_info")


def without_feature_digests(records: Any) -> Any:
    """Row records without the digests of the features, which differ across processes wherever a
    float16 value rounds the other way (see :func:`assert_stores_equal`), and without the generation."""
    import numpy as np

    from boxrefine.shared.store.schema import DIGEST, FEATURE_ARRAYS, FIELD

    digests = [FIELD[DIGEST[x]] for x in FEATURE_ARRAYS]
    history = [FIELD["generation"]]  # how often a row was written, not content
    return np.delete(records, digests + history, axis=-1)


def assert_stores_equal(a: Path, b: Path) -> None:
    """Two stores hold the same rows: records, keys, GT and everything else equal; features equal
    within float16 rounding (processes with other thread counts sum in another order, so a few
    float16 values round the other way — and so do the feature digests in the records)."""
    import numpy as np

    import boxrefine.shared.store.feature_store as st

    sa, sb = st.open_store(str(a)), st.open_store(str(b))
    assert sa.identity == sb.identity
    for name in ("train", "val"):
        pa, pb = sa.split(name), sb.split(name)
        np.testing.assert_array_equal(without_feature_digests(pa.read_rows()),
                                      without_feature_digests(pb.read_rows()))
        for arr in STORE_ARRAYS:
            x, y = pa.array(arr)[:], pb.array(arr)[:]
            if arr.endswith("embeddings"):
                np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), atol=2e-3, rtol=2e-3)
                assert np.mean(x == y) > 0.99
            else:
                np.testing.assert_array_equal(x, y)


def spawn_extract(cfg_path: Path, *extra: str) -> subprocess.Popen:
    """``boxrefine extract`` as a real process (one thread: as a separate process would run)."""
    env = {**os.environ, "CI": "true", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "boxrefine.shared.cli", "extract", "--config", str(cfg_path), *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def complete_rows(store: Path) -> int:
    from boxrefine.shared.store.feature_store import open_store
    from boxrefine.shared.store.schema import FIELD, STATE_COMPLETE

    try:
        st = open_store(str(store))
        return sum(int((st.split(s).read_rows()[:, FIELD["state"]] == STATE_COMPLETE).sum()) for s in st.splits)
    except Exception:
        return 0


def kill_9_after_rows(proc: subprocess.Popen, store: Path | str, rows: int = 2, timeout: float = 300) -> int:
    """``kill -9`` a running extract once ``store`` holds ``rows`` complete rows; returns how many it
    holds after the kill."""
    import signal
    import time

    deadline = time.time() + timeout
    while complete_rows(store) < rows and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, f"extract ended before it could be killed:\n{proc.stdout.read()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return complete_rows(store)


def reindex(store: Path | str) -> None:
    """Rewrite the row index (the part a single extract writes) from the row records, as the next
    extract does: for tests that set records directly instead of through extract."""
    from boxrefine.shared.store.feature_store import FeatureStore
    from boxrefine.shared.store.row_index import IndexPart

    st = FeatureStore.open(str(store), "a")
    for name in st.splits:
        sp = st.split(name)
        part = IndexPart(sp, (0, 1))
        part.load(sp.read_rows())
        part.flush()


def copy_store(reference_store: Path, tmp_path: Path) -> Path:
    """A writable copy of a (session, read-only) store."""
    store = tmp_path / "features.zarr"
    shutil.copytree(reference_store, store)
    return store


def one_line_error(res: Any, out: str) -> str:
    """The single ``error: ...`` line of a failed CLI run (no traceback)."""
    assert res.exit_code != 0, out
    assert "Traceback" not in out, out
    lines = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, out
    return lines[0]


CLI_ENV = {"CI": "true", "COLUMNS": "250", "NO_COLOR": "1"}
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def invoke(*args: str) -> tuple[Any, str]:
    """Run ``boxrefine ARGS`` in-process (typer's CliRunner); (result, output without ANSI codes).
    An exception other than an exit is re-raised: it is a bug, not a CLI error."""
    from typer.testing import CliRunner

    from boxrefine.shared.cli.main import app

    res = CliRunner().invoke(app, list(args), env=CLI_ENV)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res, _ANSI.sub("", res.output)


def coco_stats(ann: Path, results: Path | list, image_ids: list[int] | None = None) -> list[float]:
    """AP, AP50, AP75 from pycocotools on its own, as its README runs it."""
    import contextlib
    import copy
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann))
        ev = COCOeval(gt, gt.loadRes(str(results) if isinstance(results, Path) else copy.deepcopy(results)),
                      iouType="bbox")
        if image_ids is not None:
            ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(x) for x in ev.stats[:3]]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1, counting requests (tests/s3server.py)."""
    from s3server import CountingMotoServer

    srv = CountingMotoServer()
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def s3(s3_server, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """``s3://<a new bucket>`` on the loopback S3 server, with the AWS environment (inherited by the
    processes a test starts) pointing every client at it and at nothing else."""
    import uuid

    from s3server import aws_env, make_bucket

    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_SHARED_CREDENTIALS_FILE",
                "AWS_CONFIG_FILE", "AWS_ALLOW_HTTP"):
        monkeypatch.delenv(key, raising=False)
    for key, value in aws_env(s3_server.endpoint).items():
        monkeypatch.setenv(key, value)
    bucket = f"bxr-{uuid.uuid4().hex[:12]}"
    make_bucket(s3_server.endpoint, bucket)
    return f"s3://{bucket}"
