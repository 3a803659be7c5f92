"""How fast the training item is read, beside the caches a user would otherwise pick (issue 19).

The training item is what train's DataLoader asks for: ``StoreRows[k]`` = the row's features + its GT
boxes and info, every chunk's crc32c, the row's value digests and the generation re-check. The peers
read only the two feature arrays and check nothing:

* **npy float16 / float32**: one ``.npy`` file per image and feature (MedSAM-style scripts: float32);
* **zarr float32**: micro-sam style, one chunk per image, zarr's default compression, ``arr[i]``;
* **boxrefine**: the store as ``extract`` writes it (``store.codec``: none = the default, zstd, lz4),
  read through ``StoreRows``; "zarr reads" is the default store with ``shared/store/direct.py`` off
  (every chunk through zarr's indexing: the code before issue 19).

Rows: vit_tiny rows are the features and GT of the demo store ``bench/peers.py`` extracts (repeated
to ``--rows`` distinct rows); vit_b rows (interm 64×64×768) have the same image embeddings and GT and
seeded normal interm values (random init gives no real vit_b features; zstd finds as little in them).
Per peer: images/s and decoded feature GB/s read **warm** (page cache) and **cold** (every file of the
peer dropped with ``posix_fadvise(DONTNEED)`` before the pass), in one process and through a
DataLoader with 1 and 2 persistent workers; bytes per image (features; for boxrefine also the whole
row). Every repeat runs every peer (order rotated), medians reported. **S3** (moto's server on
127.0.0.1, as the suite runs it): images/s and requests per row of the default and zstd stores,
direct and through zarr. **Epoch**: train's real DataLoader (``train/data.py``) over the extracted
store with the step replaced by a no-op, beside the CPU training step of the same epoch. **Profile**:
cProfile of ``StoreRows[k]``, zarr reads vs direct reads. ``bench/report.py`` makes the tables.

    python bench/loader.py [--rows 32] [--vit-b-rows 16] [--repeats 7] [--no-s3] [--epoch-repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, Dataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import boxrefine.shared.store.direct as direct  # noqa: E402
from bench.machine import machine, write_json  # noqa: E402
from bench.peers import drop_cache, files_under, train_epoch  # noqa: E402
from bench.workdir import bench_config  # noqa: E402
from boxrefine.extract.run import run_extract  # noqa: E402
from boxrefine.shared.config import StoreConfig  # noqa: E402
from boxrefine.shared.data.records import ImageRecord, Instance  # noqa: E402
from boxrefine.shared.model.sam import build_sam_heads  # noqa: E402
from boxrefine.shared.runtime.device import amp_setting  # noqa: E402
from boxrefine.shared.store.feature_store import FeatureStore, open_store  # noqa: E402
from boxrefine.shared.store.row_index import IndexPart  # noqa: E402
from boxrefine.shared.store.rows import StoreRows, collate_rows  # noqa: E402
from boxrefine.shared.store.schema import FIELD, STATE_COMPLETE  # noqa: E402
from boxrefine.train.data import TrainData  # noqa: E402

FEATURES = ("image_embeddings", "interm_embeddings")
CODECS = ("none", "zstd", "lz4")
DEFAULT = "boxrefine (default: codec none)"
ZARR_READS = "boxrefine default, zarr reads"


def source_rows(cfg: Any) -> list[dict[str, Any]]:
    """The features, GT and sizes of every complete row of the extracted store."""
    split = open_store(cfg.store.path).split(cfg.train.train_split)
    rows = []
    for i in split.complete_indices().tolist():
        rec = split.read_record(i)
        emb, interm = split.read_features(i, record=rec)
        masks, boxes, info = split.read_gt(i, record=rec)
        rows.append({"emb": emb.numpy(), "interm": interm.numpy(), "masks": masks, "boxes": boxes, "info": info,
                     "record": rec})
    return rows


def bench_rows(src: list[dict[str, Any]], n: int, channels: int | None) -> list[dict[str, Any]]:
    """``n`` rows from the source rows; ``channels``: seeded normal interm values of that width (vit_b)."""
    out = []
    for i in range(n):
        row = dict(src[i % len(src)])
        if channels is not None:
            std = float(np.std(row["interm"].astype(np.float32)))
            row["interm"] = (np.random.default_rng(i).standard_normal((64, 64, channels)) * std).astype(np.float16)
        out.append(row)
    return out


class NpyPeer:
    def __init__(self, root: Path, dtype: str):
        self.root, self.dtype = root, np.dtype(dtype)

    def write(self, rows: list[dict[str, Any]]) -> None:
        self.root.mkdir(parents=True)
        for i, row in enumerate(rows):
            np.save(self.root / f"{i}_emb.npy", row["emb"].astype(self.dtype))
            np.save(self.root / f"{i}_interm.npy", row["interm"].astype(self.dtype))

    def item(self, i: int) -> dict[str, Any]:
        return {"row": i, "image_embeddings": torch.from_numpy(np.load(self.root / f"{i}_emb.npy")),
                "interm_embeddings": torch.from_numpy(np.load(self.root / f"{i}_interm.npy"))}

    def files(self) -> list[Path]:
        return files_under(self.root)


class ZarrPeer(NpyPeer):
    """micro-sam style: one chunk per image, zarr's default codecs, float32."""

    def write(self, rows: list[dict[str, Any]]) -> None:
        g = zarr.open_group(str(self.root), mode="w")
        n = len(rows)
        for name, key in (("emb", "emb"), ("interm", "interm")):
            shape = rows[0][key].shape
            arr = g.create_array(name, shape=(n, *shape), chunks=(1, *shape), dtype=self.dtype)
            for i, row in enumerate(rows):
                arr[i] = row[key].astype(self.dtype)
        self.g = zarr.open_group(str(self.root), mode="r")
        self.emb, self.interm = self.g["emb"], self.g["interm"]

    def item(self, i: int) -> dict[str, Any]:
        return {"row": i, "image_embeddings": torch.from_numpy(self.emb[i]),
                "interm_embeddings": torch.from_numpy(self.interm[i])}


class StorePeer:
    """A boxrefine store written through the store's own write calls; read through ``StoreRows``."""

    def __init__(self, root: Path | str, codec: str, identity: Any, use_direct: bool = True):
        self.root, self.codec, self.identity, self.use_direct = root, codec, identity, use_direct
        self.ds: StoreRows | None = None

    def write(self, rows: list[dict[str, Any]]) -> None:
        store = FeatureStore.open_or_create(StoreConfig(path=str(self.root), codec=self.codec), self.identity,
                                            {"kind": "bench"}, {"note": "bench/loader.py"})
        recs = [ImageRecord(image_id=i + 1, file_name=f"{i:05d}.png", key=10_000 + i, height=int(r["record"][
            FIELD["orig_h"]]), width=int(r["record"][FIELD["orig_w"]]), ann_hash=1, instances=tuple(
            Instance(ann_id=j, category_id=1, box=(0, 0, 1, 1), iscrowd=0, segmentation=None)
            for j in range(len(r["boxes"])))) for i, r in enumerate(rows)]
        split = store.layout_split("train", recs, {"path": "bench.json", "sha256": "0"}, "/images",
                                   rows[0]["interm"].shape[-1])
        part = IndexPart(split, (0, 1))
        part.load(split.read_rows())
        split.watch_records(part.set)
        for i, r in enumerate(rows):
            digests = split.write_features(i, r["emb"], r["interm"])
            digests.update(split.write_gt(i, r["masks"], r["boxes"], r["info"]))
            keep = {f: int(r["record"][FIELD[f]]) for f in ("orig_h", "orig_w", "input_h", "input_w")}
            split.commit_row(i, {"state": STATE_COMPLETE, "n_instances": len(r["boxes"]), "generation": 1,
                                 **keep, **digests})
        part.flush()
        self.open()

    def open(self) -> None:
        direct.ENABLED = self.use_direct  # read when a split first reads an array
        try:
            self.ds = StoreRows.from_store(str(self.root), "train")
            self.ds[0]
        finally:
            direct.ENABLED = True

    def item(self, i: int) -> dict[str, Any]:
        direct.ENABLED = self.use_direct  # a DataLoader worker opens the split anew on its first item
        try:
            it = self.ds[i]
        finally:
            direct.ENABLED = True
        assert "damage" not in it and "busy" not in it, it
        return it

    def files(self) -> list[Path]:
        return files_under(Path(self.root))

    def bytes_per_image(self, arrays: tuple[str, ...] | None) -> float:
        root = Path(self.root) / "train"
        folders = [root / a / "c" for a in arrays] if arrays else [root]
        return sum(p.stat().st_size for f in folders for p in files_under(f)) / len(self.ds)


class Items(Dataset):
    def __init__(self, peer: Any, n: int):
        self.peer, self.n = peer, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.peer.item(i)


def make_peers(work: Path, rows: list[dict[str, Any]], identity: Any) -> dict[str, Any]:
    shutil.rmtree(work, ignore_errors=True)
    peers: dict[str, Any] = {"npy float16": NpyPeer(work / "npy16", "float16"),
                             "npy float32": NpyPeer(work / "npy32", "float32"),
                             "zarr float32 (micro-sam)": ZarrPeer(work / "zarr32", "float32")}
    for codec in CODECS:
        peers[DEFAULT if codec == "none" else f"boxrefine codec {codec}"] = StorePeer(work / f"store-{codec}.zarr",
                                                                                      codec, identity)
    for p in peers.values():
        p.write(rows)
    peers[ZARR_READS] = StorePeer(work / "store-none.zarr", "none", identity, use_direct=False)
    peers[ZARR_READS].open()
    return peers


def one_pass(peer: Any, n: int, cold: bool, seed: int = 0) -> float:
    """Seconds per image of one shuffled pass over the rows (cold: the peer's files dropped first)."""
    order = np.random.default_rng(seed).permutation(n).tolist()
    if cold:
        drop_cache(peer.files())
    t0 = time.perf_counter()
    for i in order:
        peer.item(i)
    return (time.perf_counter() - t0) / n


def loader_pass(loader: DataLoader, peer: Any, n: int, cold: bool) -> float:
    if cold:
        drop_cache(peer.files())
    t0 = time.perf_counter()
    for _ in loader:
        pass
    return (time.perf_counter() - t0) / n


def measure(peers: dict[str, Any], n: int, repeats: int, workers: tuple[int, ...]) -> dict[str, Any]:
    """Per peer and mode (process / w workers × warm / cold): medians of s per image, interleaved."""
    times: dict[str, dict[str, list[float]]] = {name: {} for name in peers}
    loaders = {(name, w): DataLoader(Items(p, n), batch_size=2, num_workers=w, collate_fn=collate_rows,
                                     persistent_workers=True, prefetch_factor=2)
               for name, p in peers.items() for w in workers}
    for (name, _), loader in loaders.items():
        loader_pass(loader, peers[name], n, False)  # starts the workers, warms the files
    names = list(peers)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            p, t = peers[name], times[name]
            for temp in ("cold", "warm"):  # the cold pass warms the files for the warm one
                t.setdefault(f"process {temp}", []).append(one_pass(p, n, temp == "cold", r))
            for w in workers:
                for temp in ("cold", "warm"):
                    t.setdefault(f"{w} workers {temp}", []).append(loader_pass(loaders[name, w], p, n, temp == "cold"))
    del loaders
    return {name: {mode: statistics.median(v) for mode, v in t.items()} for name, t in times.items()}


def summarize(peers: dict[str, Any], medians: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    feat16 = rows[0]["emb"].nbytes + rows[0]["interm"].nbytes
    out = {}
    for name, p in peers.items():
        decoded = feat16 * (2 if "float32" in name else 1)
        entry: dict[str, Any] = {"s_per_image": medians[name], "decoded_feature_bytes": decoded}
        if isinstance(p, StorePeer):
            entry["bytes_per_image"] = p.bytes_per_image(FEATURES)
            entry["row_bytes_per_image"] = p.bytes_per_image(None)
        else:
            entry["bytes_per_image"] = sum(f.stat().st_size for f in p.files()) / len(rows)
        out[name] = entry
    return out


def s3_section(rows: list[dict[str, Any]], identity: Any, repeats: int) -> dict[str, Any]:
    from s3server import CountingMotoServer, aws_env, make_bucket

    server = CountingMotoServer()
    server.start()
    os.environ.update(aws_env(server.endpoint))
    make_bucket(server.endpoint, "bench")
    try:
        peers = {}
        for codec in ("none", "zstd"):
            p = StorePeer(f"s3://bench/{codec}.zarr", codec, identity)
            p.write(rows)
            peers[f"boxrefine codec {codec}"] = p
            z = StorePeer(p.root, codec, identity, use_direct=False)
            z.open()
            peers[f"boxrefine codec {codec}, zarr reads"] = z
        times: dict[str, list[float]] = {k: [] for k in peers}
        requests: dict[str, list[float]] = {k: [] for k in peers}
        n = len(rows)
        for r in range(repeats):
            for name, p in peers.items():
                server.reset()
                times[name].append(one_pass(p, n, False, r))
                requests[name].append(server.total() / n)
        return {name: {"s_per_image": statistics.median(times[name]),
                       "requests_per_row": statistics.median(requests[name])} for name in peers}
    finally:
        server.stop()


def epoch_section(cfg: Any, repeats: int) -> dict[str, Any]:
    """Train's own DataLoader over the extracted store, the step a no-op, beside the CPU step's epoch."""
    store = open_store(cfg.store.path)
    data = TrainData(cfg, store)
    loader_s, batches = [], []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        got = [data.dataset.accept(b) for b in data.loader]
        if r:
            loader_s.append(time.perf_counter() - t0)
        batches = got
    heads = build_sam_heads(cfg.model.type, cfg.model.checkpoint, cfg.model.seed, torch.device("cpu"), announce=False)
    amp_dtype = amp_setting(cfg.train.amp, cfg.train.amp_dtype, torch.device("cpu")).dtype
    step_s = [train_epoch(batches, None, cfg, heads, amp_dtype) for _ in range(repeats)]
    data.close()
    return {"images": len(data.dataset), "workers": cfg.train.num_workers, "codec": store.attrs["storage"]["codec"],
            "loader_only_epoch_s": statistics.median(loader_s), "step_epoch_s": statistics.median(step_s)}


def profile_section(peers: dict[str, Any], n: int) -> dict[str, Any]:
    """cProfile of the training item, zarr reads vs direct reads: the functions that take the time."""
    out = {}
    for name in (ZARR_READS, DEFAULT):
        p = peers[name]
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        for _ in range(3):
            for i in range(n):
                p.item(i)
        prof.disable()
        wall = (time.perf_counter() - t0) / (3 * n)
        st = pstats.Stats(prof, stream=io.StringIO())
        total = sum(v[2] for v in st.stats.values())
        top = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:6]
        out[name] = {"ms_per_item_profiled": wall * 1e3,
                     "top": [{"function": f"{Path(k[0]).name}:{k[1]}({k[2]})", "share": v[2] / total,
                              "calls_per_item": v[1] / (3 * n)} for k, v in top]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8, help="demo images extracted (the vit_tiny source rows)")
    ap.add_argument("--rows", type=int, default=32, help="vit_tiny rows per peer")
    ap.add_argument("--vit-b-rows", type=int, default=16, help="vit_b-sized rows per peer (0 = skip)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--epoch-repeats", type=int, default=3, help="loader-only and CPU-step epochs (0 = skip)")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "work")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    res: dict[str, Any] = {"machine_start": machine(), "repeats": args.repeats, "zarr": zarr.__version__}
    print(res["machine_start"]["summary"], flush=True)
    cfg = bench_config(args.work, args.images)
    run_extract(cfg, announce=False)
    src = source_rows(cfg)
    identity = open_store(cfg.store.path).identity
    res["models"] = {}
    for model, n, channels in (("vit_tiny", args.rows, None), ("vit_b", args.vit_b_rows, 768)):
        if not n:
            continue
        rows = bench_rows(src, n, channels)
        peers = make_peers(args.work / "loader" / model, rows, identity)
        medians = measure(peers, n, args.repeats, (1, 2))
        res["models"][model] = {"rows": n, "interm_channels": rows[0]["interm"].shape[-1], "machine": machine(),
                                "peers": summarize(peers, medians, rows)}
        if model == "vit_tiny":
            res["profile"] = profile_section(peers, n)
            if not args.no_s3:
                res["s3"] = {"rows": min(n, 8), **s3_section(rows[:8], identity, max(3, args.repeats // 2))}
        print(f"{model}: done", flush=True)
    if args.epoch_repeats:
        res["epoch"] = epoch_section(cfg, args.epoch_repeats)
    res["machine_end"] = machine()
    print(res["machine_end"]["summary"], flush=True)
    if args.json:
        write_json(args.json, res)


if __name__ == "__main__":
    main()

