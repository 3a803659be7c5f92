"""Accuracy beside the speed-ups: what each shortcut costs in refined val mean IoU, on the signal store.

Random-init features carry no signal, so accuracy is compared on signal stores (``boxrefine dev
signal-store``: the GT written into the image embeddings; see ``bench/refiner_learning.py``), built
from the same demo images twice: one extracted as float32, one as float16 (the default). Per seed,
with the same boxes, order and schedule:

* **reference**: float32 store, ``train.amp: false``;
* **defaults**: float16 store, ``train.amp: true`` — AMP as the machine runs it (CUDA: bfloat16, or
  float16 + GradScaler; a CPU without native bfloat16 runs float32 and then this row isolates the
  storage dtype; the report says which ran);
* **FAST**: the float16 store with the ``fast:`` block of pipeline.yaml applied (``make train FAST=1``:
  10 % of the images, AMP, 4 images per step, validation every 5 epochs).

The goal (issue 13): the defaults within 0.5 points of mean IoU of the reference. FAST trades
accuracy for time by design; the row says how much. Usage::

    python bench/accuracy.py [--seeds 0 1] [--epochs 40] [--json bench/out/accuracy.json]
    python bench/accuracy.py --quick      # 8 train / 4 val images, 20 epochs, one seed
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.machine import machine, write_json  # noqa: E402
from bench.refiner_learning import build_stores, lr_tag, make_config, train_row  # noqa: E402
from boxrefine.shared.runtime.console import console  # noqa: E402
from boxrefine.shared.runtime.device import amp_setting  # noqa: E402
from boxrefine.train.control import sample_subset  # noqa: E402

GOAL_POINTS = 0.5  # defaults vs reference, in points of mean IoU
VARIANTS = (  # name, store dtype, FAST, train.amp
    ("reference: float32 store, AMP off", "float32", False, False),
    ("defaults: float16 store, AMP on", "float16", False, True),
    ("FAST: float16 store, fast: block", "float16", True, True),
)


def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    work = args.out.resolve()
    work.mkdir(parents=True, exist_ok=True)
    signal = {dtype: build_stores(work, args, f"-{dtype}", {"dtype": dtype})[1] for dtype in ("float32", "float16")}
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        args.seed = seed
        for i, (name, dtype, fast, amp) in enumerate(VARIANTS):
            run_name = f"acc{i}-s{seed}-lr{lr_tag(args.lr)}"
            cfg = make_config(work, signal[dtype], args, {"dtype": dtype}, fast, lr=args.lr, amp=amp, name=run_name)
            shutil.rmtree(work / "runs" / run_name, ignore_errors=True)
            console.print(f"== seed {seed}: {name}", markup=False)
            out = train_row(cfg)
            precision = amp_setting(cfg.train.amp, cfg.train.amp_dtype, torch.device(args.device))
            rows.append({"variant": name, "seed": seed, "store_dtype": dtype, "fast": fast, "amp": precision.label,
                         "amp_ran": precision.dtype is not None, "amp_why": precision.why,
                         "train_images": len(sample_subset(args.num_train, cfg.train.sample_ratio, cfg.train.seed)),
                         "eval_every": cfg.train.eval_every, "batch_images": cfg.train.batch_images, **out})
    ref = {r["seed"]: r["final"]["mean_iou"] for r in rows if r["variant"] == VARIANTS[0][0]}
    deltas = {name: [100 * (r["final"]["mean_iou"] - ref[r["seed"]]) for r in rows if r["variant"] == name]
              for name, *_ in VARIANTS[1:]}
    median_delta = {k: statistics.median(v) for k, v in deltas.items()}
    return {"machine": machine(), "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "rows": rows, "delta_points": deltas, "median_delta_points": median_delta,
            "goal_points": GOAL_POINTS, "goal_met": goal_met(rows, median_delta[VARIANTS[1][0]]),
            "seconds": time.perf_counter() - t0}


def goal_met(rows: list[dict[str, Any]], delta: float) -> bool | None:
    """Whether the defaults row is within the goal of the reference; None (not measured) when AMP could
    not run there: that row then measures the storage dtype alone, not AMP."""
    if not all(r["amp_ran"] for r in rows if r["variant"] == VARIANTS[1][0]):
        return None
    return abs(delta) <= GOAL_POINTS


def verdict(met: bool | None) -> str:
    return {True: "met", False: "NOT met", None: "not measured (AMP did not run on this machine)"}[met]


def table(res: dict[str, Any]) -> list[str]:
    """The report's rows: per variant the median over seeds of the final epoch, and Δ vs the reference."""
    out = ["| variant | train images | AMP as run | val mean IoU | Acc@0.75 | Δ mean IoU vs reference (points) "
           "| train time (s) |", "|---|---:|---|---:|---:|---:|---:|"]
    for name, *_ in VARIANTS:
        rs = [r for r in res["rows"] if r["variant"] == name]
        iou = statistics.median(r["final"]["mean_iou"] for r in rs)
        acc = statistics.median(r["final"]["acc@0.75"] for r in rs)
        secs = statistics.median(r["seconds"] for r in rs)
        d = res["median_delta_points"].get(name)
        delta = "—" if d is None else f"{d:+.1f} ({', '.join(f'{x:+.1f}' for x in res['delta_points'][name])})"
        out.append(f"| {name} | {rs[0]['train_images']} | {rs[0]['amp']} | {iou:.3f} | {acc:.3f} | {delta} "
                   f"| {secs:.0f} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "accuracy", help="work folder (kept)")
    ap.add_argument("--num-train", type=int, default=16)
    ap.add_argument("--num-val", type=int, default=8)
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the demo data")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="train.seed values (paired runs)")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--eval-every", type=int, default=5, help="validation every N epochs (FAST uses its own)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--gain", type=float, default=3.0, help="multiplier of the GT channels")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="8 train / 4 val images, 20 epochs, seed 0 only")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    if args.quick:
        args.num_train, args.num_val, args.epochs, args.seeds = 8, 4, 20, [0]
        args.out = args.out.with_name(args.out.name + "-quick")
    args.set, args.use_mask, args.seed = [], False, args.seeds[0]  # what refiner_learning.make_config reads
    res = run(args)
    print(f"# Accuracy beside the speed-ups ({res['machine']['summary']})\n")
    print("\n".join(table(res)))
    print(f"\nGoal: defaults within {GOAL_POINTS} points of the reference → "
          f"{verdict(res['goal_met'])}; {res['seconds']:.0f} s in all.")
    if args.json:
        write_json(args.json, res)


if __name__ == "__main__":
    main()
