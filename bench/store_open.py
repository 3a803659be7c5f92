"""What opening a split costs, with and without the row index, and how fast an epoch reads rows from a
local store and from an S3 store (moto's server on 127.0.0.1, loopback: no network figure).

* open: a synthetic split of ``--rows`` rows whose records say complete (one record chunk per row, as
  extract's commits leave them) is opened as train and evaluate open it
  (``SplitStore.usable_rows``). "index" reads the row index (``shared/store/row_index.py``); "no index"
  is the same store with the ``row_index`` folder moved away, which reads every record as the code
  before the index did (``SplitStore.read_rows``). Both alternate, ``--repeats`` times.
* epoch: ``--images`` rows of vit_tiny-sized features (256×64×64 and 64×64×160 float16, random) and
  small GT are read once each through ``StoreRows`` (as a training epoch reads them, checksums and
  generation re-check included), from a local store and from the same rows on S3, alternating.

Prints the machine, each repeat and the medians. Needs moto (the test extra) for ``--s3``. Usage::

    python bench/store_open.py [--rows 100000] [--repeats 5] [--images 32] [--no-s3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from store_checksums import machine  # noqa: E402

from boxrefine.shared.config import StoreConfig  # noqa: E402
from boxrefine.shared.data.records import ImageRecord  # noqa: E402
from boxrefine.shared.store.feature_store import FeatureStore, open_store  # noqa: E402
from boxrefine.shared.store.identity import StoreIdentity  # noqa: E402
from boxrefine.shared.store.row_index import INDEX, IndexPart  # noqa: E402
from boxrefine.shared.store.rows import StoreRows  # noqa: E402
from boxrefine.shared.store.schema import FIELD, ROW_FIELDS, STATE_COMPLETE  # noqa: E402


def identity() -> StoreIdentity:
    return StoreIdentity(model_type="vit_tiny", checkpoint="random-init:seed=0", img_size=1024,
                         pixel_mean=(123.675, 116.28, 103.53), pixel_std=(58.395, 57.12, 57.375), dtype="float16",
                         encoder_precision="float32", gt_mask_size=16, intensity="percentile:0.5-99.5")


def new_split(path: str, n: int, channels: int) -> Any:
    store = FeatureStore.open_or_create(StoreConfig(path=path, gt_mask_size=16), identity(),
                                        {"kind": "random-init", "seed": 0}, {"note": "bench/store_open.py"})
    recs = [ImageRecord(image_id=i + 1, file_name=f"img_{i:06d}.jpg", key=1000 + i, height=480, width=640,
                        instances=(), ann_hash=7) for i in range(n)]
    return store.layout_split("train", recs, {"path": "synthetic.json", "sha256": "0"}, "/images", channels)


def bench_open(root: Path, n: int, repeats: int) -> dict[str, list[float]]:
    path = root / "open.zarr"
    split = new_split(str(path), n, 8)
    rows = np.zeros((n, len(ROW_FIELDS)), np.int64)
    rows[:, FIELD["state"]], rows[:, FIELD["generation"]] = STATE_COMPLETE, 1
    t0 = time.perf_counter()
    split.array("rows")[:] = rows
    part = IndexPart(split, (0, 1))
    part.load(split.read_rows())
    part.flush()
    print(f"open: wrote {n} row records and the index in {time.perf_counter() - t0:.1f}s", flush=True)
    index, away = path / "train" / INDEX, root / "index.away"
    out: dict[str, list[float]] = {"index": [], "no index": []}
    for r in range(repeats):
        for variant in ("index", "no index"):
            if variant == "no index":
                index.rename(away)
            try:
                t0 = time.perf_counter()
                _, complete = open_store(str(path)).split("train").usable_rows("error")
                dt = time.perf_counter() - t0
            finally:
                if away.exists():
                    away.rename(index)
            assert len(complete) == n
            out[variant].append(dt)
            print(f"  open repeat {r + 1} {variant:8s}: {dt:.3f}s", flush=True)
    return out


def fill_rows(path: str, n: int) -> None:
    split = new_split(path, n, 160)
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((256, 64, 64)).astype(np.float16)
    interm = rng.standard_normal((64, 64, 160)).astype(np.float16)
    masks = (rng.random((1, 16, 16)) < 0.3).astype(np.uint8)
    boxes = rng.uniform(0, 400, (1, 4)).astype(np.float32)
    info = np.array([[1, 1, 0]], np.int64)
    part = IndexPart(split, (0, 1))
    part.load(split.read_rows())
    split.watch_records(part.set)
    for i in range(n):
        digests = split.write_features(i, emb, interm)
        digests.update(split.write_gt(i, masks, boxes, info))
        split.commit_row(i, {"state": STATE_COMPLETE, "orig_h": 480, "orig_w": 640, "input_h": 768,
                             "input_w": 1024, "n_instances": 1, "generation": 1, **digests})
    part.flush()


def read_epoch(path: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    ds = StoreRows.from_store(path, "train", with_masks=True)
    for k in range(len(ds)):
        assert "damage" not in ds[k] and "busy" not in ds[k]
    return time.perf_counter() - t0, len(ds)


def bench_epoch(root: Path, n: int, repeats: int, s3: bool) -> dict[str, list[float]]:
    local = str(root / "epoch.zarr")
    fill_rows(local, n)
    where = {"local": local}
    server = None
    if s3:
        from s3server import CountingMotoServer, aws_env, make_bucket

        server = CountingMotoServer()
        server.start()
        os.environ.update(aws_env(server.endpoint))
        make_bucket(server.endpoint, "bench")
        where["s3"] = "s3://bench/epoch.zarr"
        t0 = time.perf_counter()
        fill_rows(where["s3"], n)
        print(f"epoch: wrote {n} rows to S3 (moto, loopback) in {time.perf_counter() - t0:.1f}s", flush=True)
    out: dict[str, list[float]] = {k: [] for k in where}
    try:
        for r in range(repeats):
            for name, path in where.items():
                dt, rows = read_epoch(path)
                out[name].append(rows / dt)
                print(f"  epoch repeat {r + 1} {name:5s}: {rows} rows in {dt:.2f}s = {rows / dt:.1f} rows/s",
                      flush=True)
    finally:
        if server is not None:
            server.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000, help="rows of the split opened (default 100000)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--images", type=int, default=32, help="rows read per epoch (default 32)")
    ap.add_argument("--no-s3", action="store_true", help="local epoch reads only (no moto)")
    ap.add_argument("--skip-open", action="store_true", help="the epoch figures only")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    print(f"machine: {machine()}", flush=True)
    results: dict[str, Any] = {"machine": machine(), "rows": args.rows, "images": args.images}
    root = Path(tempfile.mkdtemp(prefix="store_open_"))
    try:
        if not args.skip_open:
            results["open_s"] = bench_open(root, args.rows, args.repeats)
        results["epoch_rows_per_s"] = bench_epoch(root, args.images, args.repeats, not args.no_s3)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("medians:")
    for k, v in results.get("open_s", {}).items():
        print(f"  open {args.rows} rows, {k}: {statistics.median(v):.3f}s")
    if "open_s" in results:
        ratio = statistics.median(results["open_s"]["no index"]) / statistics.median(results["open_s"]["index"])
        print(f"  no index / index: {ratio:.1f}x")
    for k, v in results["epoch_rows_per_s"].items():
        print(f"  epoch read {k}: {statistics.median(v):.1f} rows/s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
