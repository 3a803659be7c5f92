"""Does the refiner head learn? The signal-store comparison, from scratch, side by side.

With random-init HQ-SAM the features carry almost nothing a head can use, so the demo cannot tell
"no signal" from "broken head". This benchmark builds a store whose features hold the answer and
checks that the head finds it:

1. the demo data (``shared.dev.demo.generate_demo``: 16 train / 8 val images by default);
2. ``extract`` into a random-init vit_tiny store;
3. a signal copy of it (``boxrefine dev signal-store``: GT union / boundaries / one channel per
   instance written into ``image_embeddings``);
4. ``train`` on the signal store at each learning rate (the refiner settings of pipeline.yaml,
   ``use_mask: false`` unless ``--use-mask``), and once on the plain store for reference;
5. the table: coarse boxes, refined (final epoch and best epoch on val) and the oracle ceiling (the
   box of each coarse box's own instance channel, thresholded at half a cell), with the share of
   hidden units active in the last epoch.

Everything is rebuilt under ``--out`` (default bench/out/refiner_learning) unless ``--reuse``;
results go to ``<out>/refiner_learning-<tag>.json`` and ``.md``, with the machine and load, and
one line per variant is appended to ``<out>/variants.md``. Usage::

    python bench/refiner_learning.py [--epochs 40] [--lrs 1e-3 3e-3]
    python bench/refiner_learning.py --reuse --tag roi14 --set refiner.roi_size=14 --no-plain
    python bench/refiner_learning.py --quick      # smoke run, ~a minute

Done-when targets (issue 9): refined val mean IoU ≥ 0.74 and Acc@0.75 ≥ 0.50 at every lr, with ≥ 50 %
active hidden units.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.machine import describe as machine  # noqa: E402
from boxrefine.extract.run import run_extract  # noqa: E402
from boxrefine.shared.config import PipelineConfig, validate_config  # noqa: E402
from boxrefine.shared.dev.demo import generate_demo  # noqa: E402
from boxrefine.shared.dev.signal import make_signal_store, oracle_boxes  # noqa: E402
from boxrefine.shared.runtime.console import console  # noqa: E402
from boxrefine.shared.runtime.fileio import atomic_write_json, atomic_write_text  # noqa: E402
from boxrefine.shared.scoring.coarse import fixed_coarse_boxes  # noqa: E402
from boxrefine.shared.scoring.metrics import box_metrics  # noqa: E402
from boxrefine.shared.store.rows import StoreRows  # noqa: E402
from boxrefine.train.recipe import run_train  # noqa: E402

TARGET_IOU, TARGET_ACC75, TARGET_ACTIVE = 0.74, 0.50, 0.50


def overrides(sets: list[str]) -> dict[str, dict[str, Any]]:
    """``--set refiner.roi_size=14`` … → {"refiner": {"roi_size": 14}} (values parsed as YAML)."""
    out: dict[str, dict[str, Any]] = {}
    for item in sets:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in ("refiner", "train"):
            raise SystemExit(f"--set {item}: expected refiner.KEY=VALUE or train.KEY=VALUE")
        out.setdefault(section, {})[name] = yaml.safe_load(value)
    return out


def make_config(work: Path, store: Path, args: argparse.Namespace, store_settings: dict[str, Any] | None = None,
                fast: bool = False, **train: Any) -> PipelineConfig:
    """The bench's config: demo data under ``work``, ``store`` (with ``store_settings``, e.g. its dtype),
    the ``--set`` overrides and ``train``; ``fast`` applies the ``fast:`` block of pipeline.yaml last,
    as ``make train FAST=1`` does."""
    data = work / "data"
    sets = overrides(args.set)
    raw = {
        "data": {"splits": {s: {"images": str(data / "images" / s),
                                "annotations": str(data / "annotations" / f"instances_{s}.json"),
                                "detections": str(data / "annotations" / f"detections_{s}.json")}
                            for s in ("train", "val")}},
        "model": {"type": "vit_tiny", "checkpoint": None, "seed": 0, "device": args.device},
        "store": {"path": str(store), **(store_settings or {})},
        "extract": {"num_workers": 0},
        "refiner": {"use_mask": args.use_mask, **sets.get("refiner", {})},
        "train": {"runs_dir": str(work / "runs"), "epochs": args.epochs, "eval_every": args.eval_every,
                  "batch_images": 2, "boxes_per_image": 8, "keep_top_k": 0, "num_workers": 0, "seed": args.seed,
                  **sets.get("train", {}), **train},
    }
    if fast:
        raw["fast"] = yaml.safe_load((REPO / "pipeline.yaml").read_text())["fast"]
    return validate_config(raw, "<bench>", work, fast=fast)


def build_stores(work: Path, args: argparse.Namespace, stem: str = "",
                 store_settings: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """The demo data under ``work`` (generated once), a random-init store of it and the store's signal
    copy: ``(work/features<stem>.zarr, work/signal<stem>-gain<G>.zarr)``; what exists is kept."""
    plain, signal = work / f"features{stem}.zarr", work / f"signal{stem}-gain{args.gain:g}.zarr"
    if not (work / "data" / "annotations" / "instances_val.json").exists():
        generate_demo(work / "data", num_train=args.num_train, num_val=args.num_val, seed=args.data_seed)
    run_extract(make_config(work, plain, args, store_settings))  # a no-op on a complete store
    if not signal.exists():
        make_signal_store(str(plain), str(signal), args.gain)
    return plain, signal


def oracle_metrics(cfg: PipelineConfig, signal: Path, boxes_file: Path, gain: float) -> dict[str, float]:
    """The trivial reader of the signal store on the validation boxes (shared.dev.signal.oracle_boxes)."""
    ds = StoreRows.from_store(str(signal), "val")
    coarse = fixed_coarse_boxes(cfg, "val", ds, boxes_file)
    pred, gt = [], []
    for k in range(len(ds)):
        item = ds[k]
        cb, geo = coarse[item["key"]], item["geometry"]
        ok = cb.gt_index >= 0
        o = oracle_boxes(item["image_embeddings"].float(), cb.gt_index, geo.boxes_to_input(cb.boxes), gain)
        pred.append(geo.clip_original(geo.boxes_to_original(o))[ok])
        gt.append(item["gt_boxes"][cb.gt_index[ok]])
    return box_metrics(torch.cat(pred), torch.cat(gt))


def train_row(cfg: PipelineConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = run_train(cfg)
    lines = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if x["kind"] == "eval"]
    epochs = [x for x in lines if x["kind"] == "epoch"]
    best = max(evals, key=lambda x: x["refined"]["mean_iou"])
    return {"lr": cfg.train.lr, "store": cfg.store.path, "coarse": evals[-1]["coarse"],
            "final": evals[-1]["refined"], "best": best["refined"], "best_epoch": best["epoch"],
            "active_units": epochs[-1].get("head_active_units"), "firing": epochs[-1].get("head_firing"),
            "delta_abs": epochs[-1].get("head_delta_abs"),
            "collapsed_epochs": sum(1 for x in epochs if x.get("head_collapsed")),
            "seconds": time.perf_counter() - t0, "run": str(res.run_dir)}


def markdown(report: dict[str, Any]) -> str:
    def cells(m: dict[str, float]) -> str:
        return f"{m['mean_iou']:.3f} | {m['acc@0.5']:.3f} | {m['acc@0.75']:.3f} | {m['acc@0.9']:.3f}"

    a = report["args"]
    out = [f"# Refiner learning on the signal store ({report['machine']})", "",
           f"Demo data {a['num_train']} train / {a['num_val']} val images (seed {a['data_seed']}), "
           f"{report['val_boxes']} val detector boxes; {a['epochs']} epochs, batch {report['batch']}, "
           f"refiner {report['refiner']}.", "",
           "| boxes | store | lr | mean IoU | Acc@0.5 | Acc@0.75 | Acc@0.9 | active units "
           "| best epoch (IoU / Acc@0.75) |",
           "|---|---|---|---|---|---|---|---|---|",
           f"| coarse | — | — | {cells(report['coarse'])} | — | — |"]
    for r in report["runs"]:
        out.append(f"| refined (final) | {r['kind']} | {r['lr']:g} | {cells(r['final'])} | "
                   f"{r['active_units']:.0%} | {r['best_epoch']} ({r['best']['mean_iou']:.3f} / "
                   f"{r['best']['acc@0.75']:.3f}) |")
    out.append(f"| oracle | signal | — | {cells(report['oracle'])} | — | — |")
    out += ["", f"Targets at every lr on the signal store: mean IoU ≥ {TARGET_IOU}, Acc@0.75 ≥ {TARGET_ACC75}, "
            f"active units ≥ {TARGET_ACTIVE:.0%} → **{'met' if report['targets_met'] else 'NOT met'}**.",
            f"Total wall time {report['seconds']:.0f} s.", ""]
    return "\n".join(out)


def lr_tag(lr: float) -> str:
    """1e-3 → "1e-3" (run names allow [A-Za-z0-9_-] only)."""
    return f"{lr:.0e}".replace("e-0", "e-").replace("+", "").replace(".", "_")


def variant_line(report: dict[str, Any]) -> str:
    """One row of ``variants.md``: the variant's signal-store runs (final epoch) and the plain run."""
    def f(r: dict[str, Any]) -> str:
        return f"{r['final']['mean_iou']:.3f} / {r['final']['acc@0.75']:.3f} ({r['active_units']:.0%})"

    sig = {r["lr"]: r for r in report["runs"] if r["kind"] == "signal"}
    plain = next((r for r in report["runs"] if r["kind"] == "plain"), None)
    a = report["args"]
    return (f"| {a['tag']} | {' '.join(a['set']) or 'defaults'} | {a['num_train']}/{a['num_val']}, {a['epochs']} ep, "
            f"seed {a['seed']} | {report['coarse']['mean_iou']:.3f} / {report['coarse']['acc@0.75']:.3f} | "
            + "; ".join(f"lr {lr:g}: {f(r)}" for lr, r in sig.items())
            + f" | {f(plain) if plain else '—'} | {report['oracle']['mean_iou']:.3f} / "
              f"{report['oracle']['acc@0.75']:.3f} | {report['seconds']:.0f} s |")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "refiner_learning")
    ap.add_argument("--num-train", type=int, default=16)
    ap.add_argument("--num-val", type=int, default=8)
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the demo data")
    ap.add_argument("--seed", type=int, default=0, help="train.seed (weights init, box draws)")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    ap.add_argument("--gain", type=float, default=3.0, help="multiplier of the GT channels")
    ap.add_argument("--use-mask", action="store_true", help="also feed HQ-SAM mask logits (costs the decoder)")
    ap.add_argument("--no-plain", action="store_true", help="skip the reference run on the plain store")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a refiner/train setting for this variant (repeatable), e.g. refiner.roi_size=14")
    ap.add_argument("--tag", default="defaults", help="name of the variant (run folders, report file names)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 4 train / 2 val images, 2 epochs, lr 1e-3 only (targets not expected)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reuse", action="store_true", help="keep data, stores and other variants' runs under --out")
    args = ap.parse_args()
    if args.quick:
        args.num_train, args.num_val, args.epochs, args.eval_every, args.lrs = 4, 2, 2, 1, [1e-3]
    return args


def main() -> None:
    args = parse_args()
    t0 = time.perf_counter()
    work = args.out.resolve()
    if work.exists() and not args.reuse:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    plain, signal = build_stores(work, args)

    runs = []
    for lr in args.lrs:
        console.print(f"== {args.tag}: signal store, lr {lr:g}", markup=False)
        name = f"{args.tag}-signal-lr{lr_tag(lr)}"
        shutil.rmtree(work / "runs" / name, ignore_errors=True)
        runs.append({"kind": "signal", **train_row(make_config(work, signal, args, lr=lr, name=name))})
    if not args.no_plain:
        lr = args.lrs[0]
        console.print(f"== {args.tag}: plain random-init store, lr {lr:g}", markup=False)
        name = f"{args.tag}-plain-lr{lr_tag(lr)}"
        shutil.rmtree(work / "runs" / name, ignore_errors=True)
        runs.append({"kind": "plain", **train_row(make_config(work, plain, args, lr=lr, name=name))})
    cfg = make_config(work, signal, args)
    oracle = oracle_metrics(cfg, signal, Path(runs[0]["run"]) / "eval_boxes_val.json", args.gain)
    sig = [r for r in runs if r["kind"] == "signal"]
    met = all(r["final"]["mean_iou"] >= TARGET_IOU and r["final"]["acc@0.75"] >= TARGET_ACC75
              and (r["active_units"] or 0) >= TARGET_ACTIVE for r in sig)
    report = {"machine": machine(), "load": os.getloadavg(),
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "refiner": cfg.refiner.model_dump(), "batch": f"{cfg.train.batch_images}×{cfg.train.boxes_per_image}",
              "val_boxes": runs[0]["coarse"]["n"], "coarse": runs[0]["coarse"], "oracle": oracle, "runs": runs,
              "targets": {"mean_iou": TARGET_IOU, "acc@0.75": TARGET_ACC75, "active_units": TARGET_ACTIVE},
              "targets_met": met, "seconds": time.perf_counter() - t0}
    atomic_write_json(work / f"refiner_learning-{args.tag}.json", report)
    md = markdown(report)
    atomic_write_text(work / f"refiner_learning-{args.tag}.md", md)
    table = work / "variants.md"
    head = ("| variant | settings | data, schedule | coarse IoU / Acc@0.75 | signal store: refined IoU / Acc@0.75 "
            "(active units) | plain store | oracle | time |\n|---|---|---|---|---|---|---|---|\n")
    prev = table.read_text() if table.exists() else head
    atomic_write_text(table, prev + variant_line(report) + "\n")
    print(md)


if __name__ == "__main__":
    main()
