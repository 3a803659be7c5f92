"""boxrefine's feature store beside the caches a user would otherwise pick, on the same images in one run.

Peers (features = HQ-SAM ``image_embeddings`` 256×64×64 + the early-layer ``interm_embeddings``):

* **npy float32**: one ``.npy`` file per image and feature (what MedSAM-style scripts do);
* **zarr float32**: micro-sam style, one chunk per image, zarr's default compression;
* **boxrefine**: the store ``boxrefine extract`` writes (float16, ``store.codec: none`` by default,
  crc32c per chunk), read through ``StoreRows`` (every read verified);
* **no cache**: decode, resize and encode every image inside the training loop (the naive baseline).

Per peer: bytes per image, write time per image, read throughput of one shuffled epoch warm (page
cache) and cold (every file dropped with ``posix_fadvise(DONTNEED)`` first), and the time of one
training epoch (``train.steps.batch_loss`` + AdamW, same boxes, same order) reading from it.
Then, per model, the naive epoch vs the cached epoch vs the cached FAST epoch (``fast:`` block),
and streamed-from-store vs in-memory epochs (DataLoader workers fresh per epoch, persistent, none).

    python bench/peers.py [--images 8] [--vit-b-images 2] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.machine import machine, write_json  # noqa: E402
from bench.workdir import bench_config  # noqa: E402
from boxrefine.extract.run import run_extract  # noqa: E402
from boxrefine.shared.data.imageio import read_rgb  # noqa: E402
from boxrefine.shared.data.records import load_coco, resolve_image  # noqa: E402
from boxrefine.shared.model.heads import build_refiner  # noqa: E402
from boxrefine.shared.model.sam import (  # noqa: E402
    INTERM_CHANNELS,
    build_hq_sam,
    build_sam_heads,
    encode,
    encoder_input,
)
from boxrefine.shared.runtime.device import amp_setting  # noqa: E402
from boxrefine.shared.store.codecs import compressors  # noqa: E402
from boxrefine.shared.store.rows import StoreRows, collate_rows  # noqa: E402
from boxrefine.train.control import sample_subset  # noqa: E402
from boxrefine.train.steps import batch_loss  # noqa: E402

CPU = torch.device("cpu")
ALL = {"peers", "speedup", "datapath"}
Feats = tuple[torch.Tensor, torch.Tensor]


def files_under(path: Path) -> list[Path]:
    return [p for p in Path(path).rglob("*") if p.is_file()]


def drop_cache(paths: Iterable[Path]) -> None:
    """Write back and drop every file from the page cache (a cold read follows)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class NpyPeer:
    name = "npy float32"

    def __init__(self, root: Path, n: int, channels: int):
        self.root = root
        root.mkdir(parents=True)

    def write(self, i: int, emb: np.ndarray, interm: np.ndarray) -> None:
        np.save(self.root / f"{i}_emb.npy", emb)
        np.save(self.root / f"{i}_interm.npy", interm)

    def read(self, i: int) -> Feats:
        return (torch.from_numpy(np.load(self.root / f"{i}_emb.npy")),
                torch.from_numpy(np.load(self.root / f"{i}_interm.npy")))

    def files(self) -> list[Path]:
        return files_under(self.root)


class ZarrPeer(NpyPeer):
    """One chunk per image; ``codecs`` None = zarr's default compression."""

    name = "zarr float32"
    dtype, codecs = np.float32, None

    def __init__(self, root: Path, n: int, channels: int):
        self.root = root
        g = zarr.open_group(str(root), mode="w")
        kw = {} if self.codecs is None else {"compressors": self.codecs}
        self.emb = g.create_array("emb", shape=(n, 256, 64, 64), chunks=(1, 256, 64, 64), dtype=self.dtype, **kw)
        self.interm = g.create_array("interm", shape=(n, 64, 64, channels), chunks=(1, 64, 64, channels),
                                     dtype=self.dtype, **kw)

    def write(self, i: int, emb: np.ndarray, interm: np.ndarray) -> None:
        self.emb[i] = emb.astype(self.dtype)
        self.interm[i] = interm.astype(self.dtype)

    def read(self, i: int) -> Feats:
        return torch.from_numpy(self.emb[i]).float(), torch.from_numpy(self.interm[i]).float()


class StoreFormat(ZarrPeer):
    """Writes as the store lays out features (float16, ``store.codec: none`` + crc32c, one chunk per row)."""

    name = "boxrefine"
    dtype, codecs = np.float16, compressors("none", 3, 2)


class StoreFormatZstd(ZarrPeer):
    """The store's layout with ``store.codec: zstd`` (Blosc zstd 3, byte shuffle): the codec choice alone."""

    name = "boxrefine, zstd"
    dtype, codecs = np.float16, compressors("zstd", 3, 2)


class StoreFormatLz4(ZarrPeer):
    """The store's layout with ``store.codec: lz4`` (Blosc lz4, byte shuffle): the codec choice alone."""

    name = "boxrefine, lz4"
    dtype, codecs = np.float16, compressors("lz4", 3, 2)


class StorePeer:
    """Reads through the real store (``StoreRows``: checksums verified on every read)."""

    def __init__(self, cfg, split: str):
        self.ds = StoreRows.from_store(cfg.store.path, split)
        self.root = Path(cfg.store.path) / split

    def read(self, i: int) -> Feats:
        it = self.ds[i]
        return it["image_embeddings"].float(), it["interm_embeddings"].float()

    def files(self) -> list[Path]:
        return files_under(self.root / "image_embeddings") + files_under(self.root / "interm_embeddings")


def read_epoch(peer, n: int, seed: int, cold: bool) -> float:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    if cold:
        drop_cache(peer.files())
    t0 = time.perf_counter()
    for i in order:
        peer.read(i)
    return time.perf_counter() - t0


class Naive:
    """Decode, resize and encode the images of a batch (the encoder in the training loop)."""

    def __init__(self, cfg, keys: list[int]):
        self.sam = build_hq_sam(cfg.model.type, cfg.model.checkpoint, cfg.model.seed, CPU, announce=False)
        scfg = cfg.data.splits[cfg.train.train_split]
        self.images = scfg.images
        self.names = {r.key: r.file_name for r in load_coco(scfg.annotations).images}

    def __call__(self, keys: list[int]) -> Feats:
        ims = [encoder_input(read_rgb(resolve_image(self.images, self.names[k])))[None]
               for k in keys]
        return encode(self.sam, ims)


def train_epoch(batches: list[dict], feats: Callable[[dict], Feats] | None, cfg, heads, amp_dtype) -> float:
    """One epoch of training steps over ``batches`` (GT and geometry in memory), the features of each
    batch from ``feats`` (None: the batch's own)."""
    torch.manual_seed(0)
    r = build_refiner(INTERM_CHANNELS[cfg.model.type], **cfg.refiner.model_dump())
    opt = torch.optim.AdamW(r.parameters(), lr=cfg.train.lr)
    t0 = time.perf_counter()
    for batch in batches:
        if feats is not None:
            emb, interm = feats(batch)
            batch = {**batch, "image_embeddings": emb, "interm_embeddings": interm}
        loss, _, _ = batch_loss(batch, r, heads, CPU, amp_dtype, cfg.train, {}, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def train_epochs(cfg, store: StorePeer, peers: dict, keys: list[int], naive: Naive,
                 repeats: int) -> tuple[dict[str, list[float]], float]:
    """Seconds of training epochs (same order and boxes) reading from each cache, and of one no-cache epoch."""
    amp_dtype = amp_setting(cfg.train.amp, cfg.train.amp_dtype, CPU).dtype
    heads = build_sam_heads(cfg.model.type, cfg.model.checkpoint, cfg.model.seed, CPU, announce=False)
    order = list(range(len(keys)))
    random.Random(0).shuffle(order)
    bs = cfg.train.batch_images
    batches = [collate_rows([store.ds[i] for i in order[s:s + bs]]) for s in range(0, len(order), bs)]
    index = {k: i for i, k in enumerate(keys)}

    def reader(p) -> Callable[[dict], Feats]:
        def feats_of(batch: dict) -> Feats:
            got = [p.read(index[k]) for k in batch["key"]]
            return torch.stack([g[0] for g in got]), torch.stack([g[1] for g in got])
        return feats_of

    trained = ("npy float32", "zarr float32", "boxrefine")
    runs: dict[str, list[float]] = {name: [] for name in trained}
    for r in range(repeats):
        for name in trained[r % 3:] + trained[:r % 3]:  # each cache goes first in turn (load drifts)
            runs[name].append(train_epoch(batches, reader(peers[name]), cfg, heads, amp_dtype))
    return runs, train_epoch(batches, lambda b: naive(b["key"]), cfg, heads, amp_dtype)


def peers_section(cfg, work: Path, repeats: int, read_repeats: int) -> dict:
    split = cfg.train.train_split
    run_extract(cfg, announce=False)
    store = StorePeer(cfg, split)
    n, ch = len(store.ds), INTERM_CHANNELS[cfg.model.type]
    keys = [int(store.ds.keys[r]) for r in store.ds.rows]
    naive = Naive(cfg, keys)
    t0 = time.perf_counter()
    feats = [naive([k]) for k in keys]  # float32, as every peer gets them
    encode_s = (time.perf_counter() - t0) / n
    out: dict = {"images": n, "encoder_s_per_image": encode_s, "peers": {}}
    root = work / "peers"
    shutil.rmtree(root, ignore_errors=True)
    peers: dict = {}
    classes = (NpyPeer, ZarrPeer, StoreFormat, StoreFormatZstd, StoreFormatLz4)
    writes: dict[str, list[float]] = {cls.name: [] for cls in classes}
    for _ in range(repeats):  # round robin: a change of load hits every peer alike
        for cls in classes:
            shutil.rmtree(root / cls.name, ignore_errors=True)
            p = peers[cls.name] = cls(root / cls.name, n, ch)
            t0 = time.perf_counter()
            for i, (e, m) in enumerate(feats):
                p.write(i, e[0].numpy(), m[0].numpy())
            writes[cls.name].append((time.perf_counter() - t0) / n)
    out["zarr_default_codecs"] = str(peers[ZarrPeer.name].emb.compressors)
    for name, p in peers.items():
        out["peers"][name] = {"write_s_per_image": med(writes[name]),
                              "bytes_per_image": sum(f.stat().st_size for f in p.files()) / n}
    # boxrefine: written as the store does above; read through the real store (and, for the codec
    # alone, as plain zarr arrays with the store's codecs: none, zstd and lz4)
    out["peers"]["boxrefine, zarr read"] = dict(out["peers"]["boxrefine"])
    peers["boxrefine, zarr read"] = peers["boxrefine"]
    out["peers"]["boxrefine"]["bytes_per_image"] = sum(f.stat().st_size for f in store.files()) / n
    peers["boxrefine"] = store
    reads = {name: {"warm": [], "cold": []} for name in peers}
    for r in range(read_repeats):  # round robin, a cold and a warm epoch of each peer per round
        for name, p in peers.items():
            reads[name]["cold"].append(n / read_epoch(p, n, r, cold=True))
            reads[name]["warm"].append(n / read_epoch(p, n, r, cold=False))  # the cold epoch warmed it
    for name in peers:
        out["peers"][name].update(read_warm_img_s=med(reads[name]["warm"]), read_cold_img_s=med(reads[name]["cold"]))
    out["read_repeats"] = read_repeats
    # a training epoch reading from each (same order and boxes); no cache = the encoder in the loop
    runs, naive_s = train_epochs(cfg, store, peers, keys, naive, repeats)
    for name, epochs in runs.items():
        out["peers"][name]["epoch_s"] = med(epochs)
    out["peers"]["no cache"] = {"epoch_s": naive_s}
    out["train_runs_s"] = runs
    return out


def speedup_section(cfg, fast_cfg, repeats: int, naive_repeats: int) -> dict:
    """Naive vs cached vs cached FAST epochs for one model, plus the store-streaming variants."""
    run_extract(cfg, announce=False)
    split = cfg.train.train_split
    ds = StoreRows.from_store(cfg.store.path, split)
    n = len(ds)
    keys = [int(ds.keys[r]) for r in ds.rows]
    amp_dtype = amp_setting(cfg.train.amp, cfg.train.amp_dtype, CPU).dtype
    fast_amp = amp_setting(fast_cfg.train.amp, fast_cfg.train.amp_dtype, CPU).dtype
    heads = build_sam_heads(cfg.model.type, cfg.model.checkpoint, cfg.model.seed, CPU, announce=False)
    bs = cfg.train.batch_images
    in_memory = list(DataLoader(ds, batch_size=bs, num_workers=0, collate_fn=collate_rows))
    fast_rows = [ds.rows[i] for i in sample_subset(n, fast_cfg.train.sample_ratio, fast_cfg.train.seed)]
    fast_ds = StoreRows(cfg.store.path, split, fast_rows, ds.records, ds.keys)
    workers = cfg.train.num_workers

    def loader(dataset, num_workers: int, persistent: bool = False) -> DataLoader:
        return DataLoader(dataset, batch_size=bs, num_workers=num_workers, collate_fn=collate_rows,
                          persistent_workers=persistent and num_workers > 0)

    persistent = loader(ds, workers, True)
    train_epoch(persistent, None, cfg, heads, amp_dtype)  # its workers start here, as in training's 1st epoch
    naive = Naive(cfg, keys)
    res: dict[str, list[float]] = {"memory": [], "store, no workers": [], f"store, {workers} workers fresh": [],
                                   f"store, {workers} workers persistent": [], "fast": [], "naive": []}
    for r in range(repeats):
        res["memory"].append(train_epoch(in_memory, None, cfg, heads, amp_dtype))
        res["store, no workers"].append(train_epoch(loader(ds, 0), None, cfg, heads, amp_dtype))
        res[f"store, {workers} workers fresh"].append(train_epoch(loader(ds, workers), None, cfg, heads, amp_dtype))
        res[f"store, {workers} workers persistent"].append(train_epoch(persistent, None, cfg, heads, amp_dtype))
        res["fast"].append(train_epoch(DataLoader(fast_ds, batch_size=fast_cfg.train.batch_images,
                                                  collate_fn=collate_rows), None, fast_cfg, heads, fast_amp))
        if r < naive_repeats:
            res["naive"].append(train_epoch(in_memory, lambda b: naive(b["key"]), cfg, heads, amp_dtype))
    return {"model": cfg.model.type, "images": n, "fast_images": len(fast_ds), "batch_images": bs,
            "boxes_per_image": cfg.train.boxes_per_image, "workers": workers,
            "median_s": {k: med(v) for k, v in res.items()}, "runs_s": res}


def data_path_section(cfg, repeats: int, large: int = 8) -> dict:
    """Streamed vs in-memory epochs with the head alone (``refiner.use_mask: false``: no HQ decoder in
    the step, so the data path is most of the epoch), for the data set once and ``large`` times over."""
    run_extract(cfg, announce=False)
    cfg = cfg.model_copy(update={"refiner": cfg.refiner.model_copy(update={"use_mask": False})})
    ds = StoreRows.from_store(cfg.store.path, cfg.train.train_split)
    bs, workers = cfg.train.batch_images, cfg.train.num_workers
    amp_dtype = amp_setting(cfg.train.amp, cfg.train.amp_dtype, CPU).dtype
    out = {}
    for size, times in (("small", 1), ("large", large)):
        rows = StoreRows(cfg.store.path, ds.split_name, ds.rows * times, ds.records, ds.keys)
        memory = list(DataLoader(rows, batch_size=bs, collate_fn=collate_rows))
        persistent = DataLoader(rows, batch_size=bs, num_workers=workers, collate_fn=collate_rows,
                                persistent_workers=workers > 0)
        train_epoch(persistent, None, cfg, None, amp_dtype)  # starts its workers
        res: dict[str, list[float]] = {"memory": [], "store, no workers": [], f"store, {workers} workers fresh": [],
                                       f"store, {workers} workers persistent": []}
        for _ in range(repeats):
            res["memory"].append(train_epoch(memory, None, cfg, None, amp_dtype))
            res["store, no workers"].append(train_epoch(DataLoader(rows, batch_size=bs, collate_fn=collate_rows),
                                                        None, cfg, None, amp_dtype))
            res[f"store, {workers} workers fresh"].append(train_epoch(
                DataLoader(rows, batch_size=bs, num_workers=workers, collate_fn=collate_rows), None, cfg, None,
                amp_dtype))
            res[f"store, {workers} workers persistent"].append(train_epoch(persistent, None, cfg, None, amp_dtype))
        # the loaders alone (no step): how fast the data path can deliver the epoch
        alone: dict[str, list[float]] = {"no workers": [], f"{workers} workers fresh": [],
                                         f"{workers} workers persistent": []}
        for _ in range(repeats):
            loaders = {"no workers": DataLoader(rows, batch_size=bs, collate_fn=collate_rows),
                       f"{workers} workers fresh": DataLoader(rows, batch_size=bs, num_workers=workers,
                                                              collate_fn=collate_rows),
                       f"{workers} workers persistent": persistent}
            for name, loader in loaders.items():  # a non-persistent loader starts its workers per epoch
                t0 = time.perf_counter()
                for _batch in loader:
                    pass
                alone[name].append(time.perf_counter() - t0)
        out[size] = {"images": len(rows), "median_s": {k: med(v) for k, v in res.items()}, "runs_s": res,
                     "loader_alone_s": {k: med(v) for k, v in alone.items()}}
    return {"model": cfg.model.type, "batch_images": bs, "workers": workers, "repeats": repeats, **out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=REPO / "pipeline.yaml")
    ap.add_argument("--images", type=int, default=8, help="train images (vit_tiny)")
    ap.add_argument("--vit-b-images", type=int, default=2, help="train images for vit_b (0 = skip vit_b)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--read-repeats", type=int, default=9, help="shuffled read epochs per cache (cheap)")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "work")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--only", default="peers,speedup,datapath",
                    help="sections to run (comma-separated); with --json, the others are kept from that file")
    args = ap.parse_args()
    only = set(args.only.split(","))
    old = json.loads(args.json.read_text()) if args.json and args.json.exists() and only != ALL else {}
    res: dict = {**old, "machine_start": machine(), "repeats": args.repeats, "zarr": zarr.__version__}
    cfg = bench_config(args.work, args.images, config=args.config)
    if "peers" in only:
        res["peers"] = {**peers_section(cfg, args.work, args.repeats, args.read_repeats), "machine": machine(),
                        "repeats": args.repeats}
        print(json.dumps(res["peers"]["peers"], indent=1), flush=True)
    if "datapath" in only:
        res["datapath"] = data_path_section(cfg, args.repeats)
        print(json.dumps({k: res["datapath"][k]["median_s"] for k in ("small", "large")}, indent=1), flush=True)
    if "speedup" in only:
        res["speedup"] = [speedup_section(cfg, bench_config(args.work, args.images, fast=True, config=args.config),
                                          args.repeats, args.repeats)]
        print(json.dumps(res["speedup"][-1]["median_s"], indent=1), flush=True)
    if "speedup" in only and args.vit_b_images:
        b = bench_config(args.work, args.vit_b_images, "vit_b", config=args.config)
        bf = bench_config(args.work, args.vit_b_images, "vit_b", fast=True, config=args.config)
        res["speedup"].append(speedup_section(b, bf, 1, 1))
        print(json.dumps(res["speedup"][-1]["median_s"], indent=1), flush=True)
    res["machine_end"] = machine()
    if args.json:
        write_json(args.json, res)


if __name__ == "__main__":
    main()
