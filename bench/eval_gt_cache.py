"""Evaluate with cached GT vs GT recomputed per image: what storing resized GT masks in the store buys.

Both variants run the whole ``run_evaluate`` (baselines + one checkpoint, HQ-SAM heads, mask IoU,
COCO AP, outputs) on the same store, checkpoint and fixed evaluation boxes, alternating
``--repeats`` times:

* cached (the real path): GT masks read from the store, already in SAM's low-res frame;
* recomputed: for every image, each time it is scored, the original COCO masks are decoded
  (``shared.data.records.instance_mask``) and resized with cv2 (``resize_gt_masks``) first.

It also times the GT step alone, per image: reading the cached masks vs decode + resize.
Prints medians and ratios (recomputed ÷ cached). Usage::

    python bench/eval_gt_cache.py [--data data/demo] [--store DATA/features.zarr] [--split val]
                                  [--checkpoint runs/x/best.pt] [--repeats 3] [--json bench/out/eval_gt_cache.json]

Missing demo data is generated (shared.dev.demo) and a missing store extracted (only the split used).
Without --checkpoint an untrained refiner with the default refiner settings is saved and used: the
refiner's weights do not change the cost.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import boxrefine.evaluate.run as er  # noqa: E402
from boxrefine.extract.plan import gt_arrays  # noqa: E402
from boxrefine.shared.config import PipelineConfig, validate_config  # noqa: E402
from boxrefine.shared.data.records import load_coco  # noqa: E402
from boxrefine.shared.dev.demo import generate_demo  # noqa: E402
from boxrefine.shared.model.checkpoint import CKPT_FORMAT, checkpoint_bytes  # noqa: E402
from boxrefine.shared.model.heads import build_refiner  # noqa: E402
from boxrefine.shared.model.sam import INTERM_CHANNELS  # noqa: E402
from boxrefine.shared.runtime.console import console  # noqa: E402
from boxrefine.shared.store.feature_store import open_store  # noqa: E402
from boxrefine.shared.store.rows import StoreRows  # noqa: E402
from boxrefine.shared.store.schema import FIELD  # noqa: E402


def recompute_gt(records: dict[int, Any], key: int, size: int) -> np.ndarray:
    """What evaluation without the cache would do per image: decode every instance mask at full
    resolution and resize it into SAM's low-res frame (extract's own GT code)."""
    return gt_arrays(records[key], size)[0]


class RecomputedGTRows(StoreRows):
    """StoreRows whose ``gt_masks`` come from the COCO file, decoded and resized on every access."""

    annotations: Path
    gt_size: int

    @classmethod
    def from_store(cls, store_path: str, split: str, rows=None, with_masks: bool = False,
                   on_damage: str = "error") -> RecomputedGTRows:
        base = StoreRows.from_store(store_path, split, rows, with_masks=False, on_damage=on_damage)
        ds = cls(base.store_path, base.split_name, base.rows, base.records, base.keys, with_masks=False,
                 on_damage=on_damage)
        ds.coco = {r.key: r for r in load_coco(cls.annotations).images}
        return ds

    def __getitem__(self, k: int) -> dict[str, Any]:
        item = super().__getitem__(k)
        item["gt_masks"] = torch.from_numpy(recompute_gt(self.coco, item["key"], self.gt_size))
        return item


def make_config(args: argparse.Namespace) -> PipelineConfig:
    data = args.data
    splits = {s: {"images": str(data / "images" / s), "annotations": str(data / "annotations" / f"instances_{s}.json"),
                  "detections": str(data / "annotations" / f"detections_{s}.json")} for s in ("train", "val")}
    raw = {"data": {"splits": splits}, "model": {"type": "vit_tiny", "checkpoint": None, "seed": 0, "device": "auto"},
           "store": {"path": str(args.store)}, "extract": {"splits": [args.split], "num_workers": 2},
           "train": {"num_workers": 0}, "evaluate": {"split": args.split, "batch_images": 2}}
    return validate_config(raw, "<bench>", REPO)


def untrained_checkpoint(cfg: PipelineConfig, path: Path) -> Path:
    store = open_store(cfg.store.path)
    torch.manual_seed(0)
    refiner = build_refiner(INTERM_CHANNELS[cfg.model.type], **cfg.refiner.model_dump())
    path.write_bytes(checkpoint_bytes({
        "format": CKPT_FORMAT, "refiner": refiner.state_dict(), "state": {"epoch": 0}, "config": cfg.to_dict(),
        "store_identity": store.identity.to_dict(), "store_path": cfg.store.path,
        "refiner_args": {"interm_channels": INTERM_CHANNELS[cfg.model.type], **cfg.refiner.model_dump()}}))
    return path


def gt_step_times(cfg: PipelineConfig, split: str, repeats: int) -> dict[str, float]:
    """Seconds per image for the GT step alone: cached read vs decode + resize (medians)."""
    sp = open_store(cfg.store.path).split(split)
    recs = sp.read_rows()
    rows, keys = sp.complete_indices().tolist(), sp.keys()
    coco = {r.key: r for r in load_coco(cfg.data.splits[split].annotations).images}
    size = open_store(cfg.store.path).identity.gt_mask_size
    cached, recomputed = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        a = [np.asarray(sp.array("gt_masks")[i, :int(recs[i, FIELD["n_instances"]])]) for i in rows]
        cached.append((time.perf_counter() - t) / len(rows))
        t = time.perf_counter()
        b = [recompute_gt(coco, int(keys[i]), size) for i in rows]
        recomputed.append((time.perf_counter() - t) / len(rows))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True)), "cached GT differs from recomputed GT"
    return {"cached_ms": 1e3 * statistics.median(cached), "recomputed_ms": 1e3 * statistics.median(recomputed)}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO / "data" / "demo")
    ap.add_argument("--store", type=Path, help="default: DATA/features.zarr")
    ap.add_argument("--split", default="val")
    ap.add_argument("--checkpoint", type=Path, help="default: an untrained refiner with default settings")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    args.store = args.store or args.data / "features.zarr"
    return args


def main() -> None:
    args = parse_args()
    if not (args.data / "annotations" / f"instances_{args.split}.json").exists():
        generate_demo(args.data)
    cfg = make_config(args)
    if not args.store.exists():
        from boxrefine.extract.run import run_extract

        run_extract(cfg)
    ds = StoreRows.from_store(cfg.store.path, args.split)
    work = Path(tempfile.mkdtemp(prefix="eval_gt_cache_"))  # outputs go here, never into a real run folder
    if args.checkpoint:
        ckpt = work / args.checkpoint.name
        shutil.copy(args.checkpoint, ckpt)
    else:
        ckpt = untrained_checkpoint(cfg, work / "bench.pt")
    out_dir = ckpt.parent / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    boxes, _ = er.eval_boxes(cfg, args.split, ds, out_dir / f"eval_boxes_{args.split}.json")  # fixed before timing
    n_boxes = sum(len(b) for b in boxes.values())

    RecomputedGTRows.annotations = cfg.data.splits[args.split].annotations
    RecomputedGTRows.gt_size = open_store(cfg.store.path).identity.gt_mask_size
    real_rows = er.StoreRows
    times: dict[str, list[float]] = {"cached": [], "recomputed": []}
    metrics: dict[str, Any] = {}
    console.quiet = True
    try:
        for _ in range(args.repeats):
            for name, rows_cls in (("cached", real_rows), ("recomputed", RecomputedGTRows)):
                er.StoreRows = rows_cls
                t = time.perf_counter()
                res = er.run_evaluate(cfg, ckpt, args.split, vis=False)
                times[name].append(time.perf_counter() - t)
                metrics[name] = (res.baselines["coarse"]["mask_iou"], res.rows[0]["mask_iou"])
                print(f"{name:>10}: {times[name][-1]:.2f} s", flush=True)
    finally:
        er.StoreRows = real_rows
        console.quiet = False
        shutil.rmtree(work, ignore_errors=True)
    assert metrics["cached"] == metrics["recomputed"], f"mask IoU differs: {metrics}"
    gt = gt_step_times(cfg, args.split, max(args.repeats, 5))
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"split": args.split, "images": len(ds), "boxes": n_boxes, "device": str(er.resolve_device(cfg.model.device)),
           "torch_threads": torch.get_num_threads(), "repeats": args.repeats,
           "checkpoint": str(args.checkpoint or "untrained refiner"),
           "use_mask": cfg.refiner.use_mask, "eval_s": times, "median_eval_s": med,
           "eval_ratio_recomputed_over_cached": med["recomputed"] / med["cached"],
           "gt_step_ms_per_image": gt, "gt_step_ratio": gt["recomputed_ms"] / gt["cached_ms"],
           "mask_iou_coarse_refined": metrics["cached"]}
    print(f"evaluation of one checkpoint on {len(ds)} {args.split} images ({n_boxes} boxes), "
          f"median of {args.repeats}: cached GT {med['cached']:.2f} s, recomputed GT {med['recomputed']:.2f} s, "
          f"ratio {out['eval_ratio_recomputed_over_cached']:.3f}")
    print(f"GT step alone, per image: cached {gt['cached_ms']:.2f} ms, decode + resize {gt['recomputed_ms']:.2f} ms, "
          f"ratio {out['gt_step_ratio']:.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
