"""Autocast on this machine: what bfloat16 / float16 cost per training step and how far they move the
refined boxes from float32, side by side in one run.

1. the demo data, a random-init vit_tiny store and its signal copy (``bench/refiner_learning.py``'s
   ``build_stores``; the GT written into the embeddings, so a trained head really moves the boxes);
2. one refiner trained in float32 on the signal store (``use_mask: true``: the frozen HQ decoder's
   logits feed the head, so both models run under autocast), and one trained the same way in bfloat16;
3. **agreement**: the float32-trained refiner's val boxes (``scoring.predict``, what evaluate and
   refine run) at each precision, against the same boxes in float32: per-box max |side difference|
   in pixels (median, 95th percentile, max) beside how far the boxes moved from the coarse ones;
4. **cost**: one training step (decoder + refiner forward/backward + optimizer, the same batch and
   boxes) per precision, the precisions interleaved in every repeat; median seconds and ÷ float32.

Usage::

    python bench/precision.py [--epochs 20] [--repeats 5] [--json bench/out/precision.json]
    python bench/precision.py --quick      # 4 train / 2 val images, 6 epochs, 2 repeats
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
from bench.refiner_learning import build_stores, make_config, train_row  # noqa: E402
from boxrefine.shared.model.checkpoint import load_checkpoint, refiner_from_checkpoint  # noqa: E402
from boxrefine.shared.model.heads import build_refiner  # noqa: E402
from boxrefine.shared.model.sam import INTERM_CHANNELS, build_sam_heads  # noqa: E402
from boxrefine.shared.runtime.device import amp_setting, cpu_has_native_bf16  # noqa: E402
from boxrefine.shared.scoring.coarse import fixed_coarse_boxes  # noqa: E402
from boxrefine.shared.scoring.metrics import box_metrics  # noqa: E402
from boxrefine.shared.scoring.predict import predict  # noqa: E402
from boxrefine.shared.store.rows import StoreRows, collate_rows  # noqa: E402
from boxrefine.train.steps import batch_loss  # noqa: E402

DTYPES: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def agreement(cfg, run: Path, device: torch.device) -> dict[str, Any]:
    """The run's last.pt on the val split at each precision vs float32."""
    refiner = refiner_from_checkpoint(load_checkpoint(run / "last.pt"), run / "last.pt").to(device)
    heads = build_sam_heads(cfg.model.type, cfg.model.checkpoint, cfg.model.seed, device, announce=False)
    ds = StoreRows.from_store(cfg.store.path, "val")
    coarse = fixed_coarse_boxes(cfg, "val", ds, run / "eval_boxes_val.json")
    out: dict[str, Any] = {}
    for name, dtype in DTYPES.items():
        t0 = time.perf_counter()
        preds = predict(ds, coarse, device, refiner=refiner, heads=heads, amp_dtype=dtype)
        ok = torch.cat([p.gt_index >= 0 for p in preds])
        refined, gt = torch.cat([p.refined for p in preds]), torch.cat([p.gt for p in preds])
        out[name] = {"refined": refined, "metrics": box_metrics(refined[ok], gt[ok]),
                     "seconds": time.perf_counter() - t0}
    base = out["float32"]["refined"]
    moved = (base - torch.cat([p.coarse for p in preds])).abs().amax(1)
    res = {"boxes": len(base), "moved_px": quantiles(moved)}
    for name, r in out.items():
        diff = (r["refined"] - base).abs().amax(1)
        res[name] = {"diff_px": quantiles(diff), "mean_iou": r["metrics"]["mean_iou"],
                     "acc@0.75": r["metrics"]["acc@0.75"], "seconds": r["seconds"]}
    return res


def quantiles(x: torch.Tensor) -> dict[str, float]:
    x = x.double()
    return {"median": float(x.median()), "p95": float(x.quantile(0.95)), "max": float(x.max())}


def step_costs(cfg, repeats: int, device: torch.device) -> dict[str, Any]:
    """One training step per precision on the same batch, interleaved; median seconds."""
    ds = StoreRows.from_store(cfg.store.path, cfg.train.train_split)
    batch = collate_rows([ds[i] for i in range(min(cfg.train.batch_images, len(ds)))])
    heads = build_sam_heads(cfg.model.type, cfg.model.checkpoint, cfg.model.seed, device, announce=False)
    times: dict[str, list[float]] = {name: [] for name in DTYPES}
    for r in range(repeats + 1):  # the first round warms the kernels up and is not counted
        for name, dtype in DTYPES.items():
            torch.manual_seed(0)
            refiner = build_refiner(INTERM_CHANNELS[cfg.model.type], **cfg.refiner.model_dump()).to(device)
            opt = torch.optim.AdamW(refiner.parameters(), lr=cfg.train.lr)
            scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
            t0 = time.perf_counter()
            loss, _, _ = batch_loss(batch, refiner, heads, device, dtype, cfg.train, {}, 0)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r:
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"images": len(batch["row"]), "boxes_per_image": cfg.train.boxes_per_image, "median_s": med,
            "ratio": {name: med[name] / med["float32"] for name in med}, "runs": times}


def table(res: dict[str, Any]) -> list[str]:
    agr, cost = res["agreement"], res["steps"]
    mv = agr["moved_px"]
    out = [f"Val boxes: {agr['boxes']}; the float32-trained refiner moved them from the coarse boxes by median "
           f"{mv['median']:.1f} px (p95 {mv['p95']:.1f}, max {mv['max']:.1f}; max over the 4 sides, original pixels).",
           "", "| precision | step (s) | ÷ float32 | val mean IoU | Acc@0.75 "
           "| Δ vs float32 boxes, px: median / p95 / max |", "|---|---:|---:|---:|---:|---|"]
    for name in DTYPES:
        a, d = agr[name], agr[name]["diff_px"]
        out.append(f"| {name} | {cost['median_s'][name]:.3f} | {cost['ratio'][name]:.2f}× | {a['mean_iou']:.4f} | "
                   f"{a['acc@0.75']:.3f} | {d['median']:.3f} / {d['p95']:.3f} / {d['max']:.3f} |")
    tf, tb = res["trained_fp32"], res["trained_bf16"]
    out += ["", f"Trained in float32: final val mean IoU {tf['final']['mean_iou']:.4f}; trained in "
            f"{tb['precision']}: {tb['final']['mean_iou']:.4f} (coarse {tf['coarse']['mean_iou']:.4f})."]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "precision", help="work folder (kept)")
    ap.add_argument("--num-train", type=int, default=8)
    ap.add_argument("--num-val", type=int, default=4)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--gain", type=float, default=30.0, help="multiplier of the GT channels")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="4 train / 2 val images, 6 epochs, 2 repeats")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    if args.quick:
        args.num_train, args.num_val, args.epochs, args.repeats = 4, 2, 6, 2
        args.out = args.out.with_name(args.out.name + "-quick")
    args.use_mask, args.set, args.eval_every = True, [], args.epochs
    device = torch.device(args.device)
    t0 = time.perf_counter()
    _, signal = build_stores(args.out, args)
    runs = {}
    for tag, amp in (("fp32", False), ("bf16", True)):
        cfg = make_config(args.out, signal, args, lr=args.lr, amp=amp, amp_dtype="bfloat16", name=f"precision-{tag}")
        shutil.rmtree(args.out / "runs" / f"precision-{tag}", ignore_errors=True)
        runs[tag] = {**train_row(cfg), "precision": amp_setting(amp, "bfloat16", device).label}
    cfg = make_config(args.out, signal, args, lr=args.lr, amp=False)
    res = {"machine": machine(), "native_bf16": cpu_has_native_bf16(),
           "args": {k: str(v) for k, v in vars(args).items()},
           "agreement": agreement(cfg, Path(runs["fp32"]["run"]), device),
           "steps": step_costs(cfg, args.repeats, device), "trained_fp32": runs["fp32"], "trained_bf16": runs["bf16"]}
    for r in res["agreement"].values():
        if isinstance(r, dict):
            r.pop("refined", None)
    res["seconds"] = time.perf_counter() - t0
    print(f"{res['machine']['summary']}; native bf16: {res['native_bf16']}")
    print("\n".join(table(res)))
    if args.json:
        write_json(args.json, res)


if __name__ == "__main__":
    main()
