"""Which client an ``s3://`` store goes through: obstore (``zarr.storage.ObjectStore``, what
``shared/store/objstore.py`` uses) or s3fs (fsspec's ``FsspecStore``, what zarr uses for any other URL).

Against moto's S3 server on 127.0.0.1 (loopback: the figure is the clients' own cost, no network),
each backend writes ``--images`` rows of vit_tiny-sized features (as ``bench/store_open.py`` does,
through ``SplitStore``'s write calls and the row index) and then reads them as a training epoch does
(``StoreRows``: chunks, checksums, generation re-check), alternating, ``--repeats`` times. s3fs is
selected by routing ``s3://`` through fsspec (``objstore.is_s3`` patched to False), i.e. the code before
``shared/store/objstore.py``. Prints the machine, each repeat and the medians. Usage::

    python bench/store_backends.py [--images 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))

import store_open  # noqa: E402

import boxrefine.shared.store.objstore as objstore  # noqa: E402


@contextmanager
def backend(name: str) -> Iterator[None]:
    real = objstore.is_s3
    if name == "s3fs":
        objstore.is_s3 = lambda path: False  # type: ignore[assignment]
    try:
        yield
    finally:
        objstore.is_s3 = real  # type: ignore[assignment]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from s3server import CountingMotoServer, aws_env, make_bucket

    print(f"machine: {store_open.machine()}", flush=True)
    server = CountingMotoServer()
    server.start()
    os.environ.update(aws_env(server.endpoint))
    make_bucket(server.endpoint, "bench")
    names = ("obstore", "s3fs")
    write: dict[str, float] = {}
    read: dict[str, list[float]] = {n: [] for n in names}
    try:
        for name in names:
            with backend(name):
                t0 = time.perf_counter()
                store_open.fill_rows(f"s3://bench/{name}.zarr", args.images)
                write[name] = time.perf_counter() - t0
                print(f"  {name:7s} write {args.images} rows: {write[name]:.2f}s", flush=True)
        for r in range(args.repeats):
            for name in names:
                with backend(name):
                    dt, n = store_open.read_epoch(f"s3://bench/{name}.zarr")
                read[name].append(n / dt)
                print(f"  repeat {r + 1} {name:7s} epoch read: {n / dt:.1f} rows/s", flush=True)
    finally:
        server.stop()
    print("medians:")
    for name in names:
        print(f"  {name:7s}: write {args.images / write[name]:.1f} rows/s (one run), "
              f"epoch read {statistics.median(read[name]):.1f} rows/s")
    print(f"  obstore / s3fs epoch read: {statistics.median(read['obstore']) / statistics.median(read['s3fs']):.2f}x")


if __name__ == "__main__":
    main()
