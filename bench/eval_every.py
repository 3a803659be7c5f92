"""Validation over a whole training run: every epoch vs every N epochs, GT cached vs decoded each time.

Three whole ``train`` runs (setup, epochs, periodic validation, checkpoints) on the same store,
images, boxes and schedule, timed end to end and alternated ``--repeats`` times:

* **seed-style**: validation every epoch, and every validation decodes each image's COCO masks and
  resizes them into SAM's low-res frame first (``RecomputedGTRows`` of ``bench/eval_gt_cache.py``),
  as the seed did; boxrefine's own validation needs no masks, so this row is what re-decoding costs;
* **every epoch, cached GT**: ``train.eval_every: 1`` (pipeline.yaml's default);
* **every N, cached GT**: ``train.eval_every: N`` (default 5, what FAST uses).

Everything else is pipeline.yaml's (``use_mask: true``: the frozen HQ decoder runs in training and
validation alike). ``bench/eval_gt_cache.py`` measures the GT step inside one ``evaluate``. Usage::

    python bench/eval_every.py [--images 8] [--val-images 4] [--epochs 10] [--every 5] [--repeats 1]
                               [--json bench/out/eval_every.json]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.eval_gt_cache import RecomputedGTRows  # noqa: E402
from bench.machine import machine, write_json  # noqa: E402
from bench.workdir import bench_config  # noqa: E402
from boxrefine.extract.run import run_extract  # noqa: E402
from boxrefine.shared.runtime.console import console  # noqa: E402
from boxrefine.shared.store.feature_store import open_store  # noqa: E402
from boxrefine.train.recipe import TrainRecipe  # noqa: E402


def timed_run(cfg: Any, recompute_gt: bool) -> tuple[float, int]:
    """Seconds for one whole training run, and how many validations it ran."""
    t = time.perf_counter()
    rec = TrainRecipe(cfg).setup()
    if recompute_gt:
        val = rec.data.val_name
        RecomputedGTRows.annotations = cfg.data.splits[val].annotations
        RecomputedGTRows.gt_size = open_store(cfg.store.path).identity.gt_mask_size
        rec.data.val_ds = RecomputedGTRows.from_store(cfg.store.path, val)
    res = rec.train()
    seconds = time.perf_counter() - t
    evals = sum(1 for line in (res.run_dir / "metrics.jsonl").read_text().splitlines() if '"kind": "eval"' in line)
    return seconds, evals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8, help="train images")
    ap.add_argument("--val-images", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--every", type=int, default=5, help="N of the every-N run")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--config", type=Path, default=REPO / "pipeline.yaml")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "work")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    variants = (("seed-style: every epoch, GT decoded + resized each time", 1, True),
                ("every epoch, GT cached", 1, False), (f"every {args.every} epochs, GT cached", args.every, False))
    base = bench_config(args.work, args.images, config=args.config, num_val=args.val_images)
    run_extract(base)  # a no-op on a complete store
    runs_dir = Path(base.store.path).parent / "runs-eval-every"
    times: dict[str, list[float]] = {name: [] for name, *_ in variants}
    evals: dict[str, int] = {}
    console.quiet = True
    try:
        for rep in range(args.repeats):
            for i, (name, every, recompute) in enumerate(variants):
                cfg = bench_config(args.work, args.images, config=args.config, num_val=args.val_images, overrides={
                    "train.epochs": args.epochs, "train.eval_every": every, "train.runs_dir": str(runs_dir),
                    "train.name": f"v{i}-r{rep}", "train.num_workers": 0})
                shutil.rmtree(runs_dir / f"v{i}-r{rep}", ignore_errors=True)
                sec, evals[name] = timed_run(cfg, recompute)
                times[name].append(sec)
                print(f"{name}: {sec:.1f} s ({evals[name]} validations)", flush=True)
    finally:
        console.quiet = False
    med = {k: statistics.median(v) for k, v in times.items()}
    last = variants[-1][0]
    out = {"machine": machine(), "train_images": args.images, "val_images": args.val_images, "epochs": args.epochs,
           "every": args.every, "repeats": args.repeats, "use_mask": base.refiner.use_mask, "runs_s": times,
           "median_s": med, "validations": evals,
           "ratio_over_every_n": {k: v / med[last] for k, v in med.items()}}
    print(f"whole run, {args.images} train / {args.val_images} val images, {args.epochs} epochs, median of "
          f"{args.repeats}: " + "; ".join(f"{k} {v:.1f} s ({v / med[last]:.2f}×)" for k, v in med.items()))
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
