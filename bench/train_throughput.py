"""Train throughput on the demo data, measured side by side in one process.

(a) data path: one epoch streamed from the store (persistent DataLoader workers over StoreRows, as
    train/data.py reads it) vs the same epoch from batches already in memory — same rows, same
    steps (``train.steps.batch_loss`` + optimizer). Target: store ≥ 0.9× the in-memory throughput.
(b) caching: an epoch with the HQ-SAM image encoder in the loop (decode, resize, encode every image
    every step — the naive pipeline) vs the cached epoch over the same images, and vs the FAST epoch
    (the fast: block of pipeline.yaml).

    python bench/train_throughput.py [--config pipeline.yaml] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from boxrefine.extract.run import run_extract  # noqa: E402
from boxrefine.shared.config import load_config  # noqa: E402
from boxrefine.shared.data.imageio import read_rgb  # noqa: E402
from boxrefine.shared.data.records import load_coco, resolve_image  # noqa: E402
from boxrefine.shared.dev.demo import generate_demo  # noqa: E402
from boxrefine.shared.model.heads import build_refiner  # noqa: E402
from boxrefine.shared.model.sam import (  # noqa: E402
    INTERM_CHANNELS,
    build_hq_sam,
    build_sam_heads,
    encode,
    encoder_input,
)
from boxrefine.shared.runtime.device import amp_setting  # noqa: E402
from boxrefine.shared.store.rows import StoreRows, collate_rows  # noqa: E402
from boxrefine.train.control import sample_subset  # noqa: E402
from boxrefine.train.steps import batch_loss  # noqa: E402


def make_refiner(cfg, device):
    torch.manual_seed(0)
    r = build_refiner(INTERM_CHANNELS[cfg.model.type], **cfg.refiner.model_dump()).to(device)
    return r, torch.optim.AdamW(r.parameters(), lr=cfg.train.lr)


def run_epoch(batches, cfg, heads, device, amp_dtype) -> float:
    refiner, opt = make_refiner(cfg, device)
    t0 = time.perf_counter()
    for batch in batches:
        loss, _, _ = batch_loss(batch, refiner, heads, device, amp_dtype, cfg.train, {}, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=REPO / "pipeline.yaml")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    return ap.parse_args()


def summarize(rows: list[dict], t_naive: float, n: int, nf: int, cfg, json_path: Path | None) -> None:
    """Prints the medians of the repeats (and writes them to ``json_path`` when given)."""
    med = {k: statistics.median(x[k] for x in rows) for k in rows[0]}
    print(f"\n{n} training images ({nf} in FAST), batch {cfg.train.batch_images}, {cfg.train.boxes_per_image} "
          f"boxes/image, use_mask={cfg.refiner.use_mask}, {torch.get_num_threads()} torch threads")
    print(f"(a) store vs in-memory throughput: {statistics.median(x['memory_s'] / x['store_s'] for x in rows):.3f}"
          f"  (median of {len(rows)}; target ≥ 0.9)")
    print(f"(b) naive epoch with the encoder in the loop: {t_naive:.1f}s; cached epoch, same images: "
          f"{med['store_s']:.1f}s → {t_naive / med['store_s']:.1f}x; cached FAST epoch: {med['fast_s']:.2f}s → "
          f"{t_naive / med['fast_s']:.1f}x")
    if json_path:
        json_path.write_text(json.dumps({"repeats": rows, "naive_s": t_naive, "images": n, "fast_images": nf,
                                         "median": med}, indent=1))


def main() -> None:
    args = parse_args()
    cfg = load_config(args.config)
    fast = load_config(args.config, fast=True)
    split = cfg.train.train_split
    scfg = cfg.data.splits[split]
    if not scfg.annotations.exists():
        generate_demo(scfg.annotations.parent.parent)
    run_extract(cfg)  # no-op when the store is complete
    device = torch.device("cpu")
    amp_dtype = amp_setting(cfg.train.amp, cfg.train.amp_dtype, device).dtype
    heads = build_sam_heads(cfg.model.type, cfg.model.checkpoint, cfg.model.seed, device, announce=False) \
        if cfg.refiner.use_mask else None
    ds = StoreRows.from_store(cfg.store.path, split)
    bs = cfg.train.batch_images

    def store_loader(dataset):
        """As ``train/data.py`` reads the store: workers started once and kept for every epoch (a
        loader made anew per epoch spends each epoch's first seconds starting its workers)."""
        loader = DataLoader(dataset, batch_size=bs, num_workers=cfg.train.num_workers, collate_fn=collate_rows,
                            persistent_workers=cfg.train.num_workers > 0)
        next(iter(loader))  # start the workers
        return loader

    in_memory = list(DataLoader(ds, batch_size=bs, num_workers=0, collate_fn=collate_rows))
    fast_rows = [ds.rows[i] for i in sample_subset(len(ds), fast.train.sample_ratio, fast.train.seed)]
    fast_ds = StoreRows(cfg.store.path, split, fast_rows, ds.records, ds.keys)

    # naive: decode + resize + encode each image inside the step (what boxrefine avoids)
    sam = build_hq_sam(cfg.model.type, cfg.model.checkpoint, cfg.model.seed, device, announce=False)

    names = {r.key: r.file_name for r in load_coco(scfg.annotations).images}

    def naive_batches():
        for batch in in_memory:
            ims = [encoder_input(read_rgb(resolve_image(scfg.images, names[k])))[None]
                   for k in batch["key"]]
            emb, interm = encode(sam, ims)
            yield {**batch, "image_embeddings": emb, "interm_embeddings": interm}

    rows = []
    stream, stream_fast = store_loader(ds), store_loader(fast_ds)
    for r in range(args.repeats):
        t_store = run_epoch(stream, cfg, heads, device, amp_dtype)
        t_mem = run_epoch(in_memory, cfg, heads, device, amp_dtype)
        t_fast = run_epoch(stream_fast, fast, heads, device, amp_dtype)
        rows.append({"store_s": t_store, "memory_s": t_mem, "fast_s": t_fast})
        print(f"repeat {r}: epoch from store {t_store:.2f}s, from memory {t_mem:.2f}s "
              f"(store throughput = {t_mem / t_store:.3f}x memory), FAST epoch {t_fast:.2f}s", flush=True)
    t_naive = run_epoch(naive_batches(), cfg, heads, device, amp_dtype)
    summarize(rows, t_naive, len(ds), len(fast_ds), cfg, args.json)


if __name__ == "__main__":
    main()
