"""What the store's checksums cost: write time, read time and bytes per image, with and without them.

Both variants run side by side in one process, alternating, ``--repeats`` times, through the code
extract and train use (``SplitStore.write_features`` / ``write_gt`` / ``commit_row``, then
``StoreRows`` items with GT masks, as a training or evaluation step reads them):

* checksums: the store as it is (zarr's crc32c codec closing every array's codec chain, the crc32c
  digests of each row's values in its record, both checked on every read);
* none: the same code with the crc32c codec left out and the digests not computed (``digest`` is
  replaced by a constant), i.e. the store before checksums.

Rows hold vit_tiny-sized features (image_embeddings 256×64×64, interm_embeddings 64×64×160,
float16) drawn from a normal distribution, and the GT of the demo annotations (masks resized to
256×256). Reads come from the page cache: the figure is the CPU cost, not the disk's. Prints the
machine, per-repeat figures and medians. Usage::

    python bench/store_checksums.py [--images 16] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import boxrefine.shared.store.codecs as storage  # noqa: E402
import boxrefine.shared.store.split as store_split  # noqa: E402
from bench.machine import describe as machine  # noqa: E402
from boxrefine.extract.plan import gt_arrays, row_record  # noqa: E402
from boxrefine.shared.config import StoreConfig  # noqa: E402
from boxrefine.shared.data.records import load_coco  # noqa: E402
from boxrefine.shared.dev.demo import generate_demo  # noqa: E402
from boxrefine.shared.store.feature_store import FeatureStore  # noqa: E402
from boxrefine.shared.store.identity import StoreIdentity  # noqa: E402
from boxrefine.shared.store.rows import StoreRows  # noqa: E402
from boxrefine.shared.store.schema import STATE_COMPLETE  # noqa: E402


@contextmanager
def without_checksums() -> Iterator[None]:
    """The store before checksums: no crc32c codec, no digests (a constant passes every check)."""
    from zarr.codecs import Crc32cCodec

    real_compressors, real_digest = storage.compressors, storage.digest

    def compressors(*a: Any) -> list[Any]:
        return [c for c in real_compressors(*a) if not isinstance(c, Crc32cCodec)] or None  # type: ignore[return-value]

    import boxrefine.shared.store.layout as layout

    layout.compressors, store_split.digest = compressors, lambda a: 0
    try:
        yield
    finally:
        layout.compressors, store_split.digest = real_compressors, real_digest


def one_run(root: Path, recs: list, rows: list[tuple], checksums: bool) -> dict[str, float]:
    path = root / f"store-{'crc' if checksums else 'none'}.zarr"
    shutil.rmtree(path, ignore_errors=True)
    ident = StoreIdentity("vit_tiny", "random-init:seed=0", 1024, (0.0,) * 3, (1.0,) * 3, "float16", "float32", 256)
    with (without_checksums() if not checksums else nullcontext()):
        store = FeatureStore.open_or_create(StoreConfig(path=str(path)), ident, {}, {})
        split = store.layout_split("train", recs, {"path": "-", "sha256": "-"}, "-", 160)
        t0 = time.perf_counter()
        for i, (rec, emb, interm, gt) in enumerate(rows):
            digests = split.write_features(i, emb, interm)
            digests.update(split.write_gt(i, *gt))
            split.commit_row(i, {**row_record(rec, (1, 1), STATE_COMPLETE, len(gt[1])), **digests})
        write_s = (time.perf_counter() - t0) / len(rows)
        ds = StoreRows.from_store(str(path), "train", with_masks=True)
        t0 = time.perf_counter()
        for k in range(len(ds)):
            assert "damage" not in ds[k]
        read_s = (time.perf_counter() - t0) / len(ds)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return {"write_ms": 1e3 * write_s, "read_ms": 1e3 * read_s, "bytes": size / len(rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate_demo(root / "demo", num_train=args.images, num_val=1, seed=0)
        recs = list(load_coco(root / "demo" / "annotations" / "instances_train.json").images)
        rng = np.random.default_rng(0)
        rows = [(rec, rng.normal(0, 1, (256, 64, 64)).astype(np.float16),
                 rng.normal(0, 1, (64, 64, 160)).astype(np.float16), gt_arrays(rec, 256)) for rec in recs]
        runs: dict[str, list[dict[str, float]]] = {"none": [], "checksums": []}
        for r in range(args.repeats):
            for name in ("none", "checksums"):
                runs[name].append(one_run(root, recs, rows, name == "checksums"))
                f = runs[name][-1]
                print(f"repeat {r + 1} {name:9s}: write {f['write_ms']:.2f} ms/image, read {f['read_ms']:.2f} "
                      f"ms/image, {f['bytes'] / 2**20:.4f} MiB/image")
    med = {name: {k: statistics.median(f[k] for f in fs) for k in fs[0]} for name, fs in runs.items()}
    print(f"machine: {machine()}; {args.images} images (vit_tiny-sized float16 rows), {args.repeats} repeats")
    for k, unit in (("write_ms", "ms/image"), ("read_ms", "ms/image"), ("bytes", "bytes/image")):
        a, b = med["none"][k], med["checksums"][k]
        print(f"median {k:8s}: none {a:,.2f}  checksums {b:,.2f} {unit}  (ratio {b / a:.3f})")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "images": args.images, "runs": runs, "median": med},
                                        indent=1))


if __name__ == "__main__":
    main()
