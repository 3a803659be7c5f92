"""Where one training step spends its time, before and after the fast HQ decoder (shared/model/hq_decoder.py).

One step of ``train.batch_images`` store rows with ``train.boxes_per_image`` jittered boxes each (the
same boxes for both variants), split into its parts and timed ``--repeats`` times (medians):

* feature read: ``StoreRows[i]`` for each row + ``collate_rows`` (page cache warm);
* frozen HQ decoder, *before*: the package's ``MaskDecoderHQ.forward`` once per image, whole masks
  (``bench/package_decoder.py``); *after*: ``SamHeads.forward`` — every box of the step in one call,
  per-image work once, only the logits the refiner reads (``BoxRefiner.mask_regions``);
* refiner forward + loss + backward; optimizer step.

    python bench/step_profile.py [--images 4] [--repeats 5] [--work bench/out/work] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.machine import machine, write_json  # noqa: E402
from bench.package_decoder import package_decode  # noqa: E402
from bench.workdir import bench_config  # noqa: E402
from boxrefine.extract.run import run_extract  # noqa: E402
from boxrefine.shared.model.heads import build_refiner  # noqa: E402
from boxrefine.shared.model.refiner import refine_loss  # noqa: E402
from boxrefine.shared.model.sam import INTERM_CHANNELS, build_sam_heads  # noqa: E402
from boxrefine.shared.runtime.device import amp_setting, autocast_context  # noqa: E402
from boxrefine.shared.store.rows import StoreRows, collate_rows  # noqa: E402
from boxrefine.train.steps import seeded_generator, training_boxes  # noqa: E402

PARTS = ("feature read", "frozen HQ decoder", "refiner fwd+bwd", "optimizer")


def profile(cfg, repeats: int) -> dict:
    split = cfg.train.train_split
    run_extract(cfg, announce=False)  # no-op when the store is complete
    device = torch.device("cpu")
    precision = amp_setting(cfg.train.amp, cfg.train.amp_dtype, device)
    amp_dtype = precision.dtype
    heads = build_sam_heads(cfg.model.type, cfg.model.checkpoint, cfg.model.seed, device, announce=False)
    ds = StoreRows.from_store(cfg.store.path, split)
    tc = cfg.train
    items = list(range(min(tc.batch_images, len(ds))))
    batch = collate_rows([ds[i] for i in items])
    coarse, target = [], []
    for b in range(len(items)):  # the same boxes every repeat and for both variants
        c, t = training_boxes(batch["gt_boxes"][b], batch["gt_info"][b], None, batch["geometry"][b],
                              tc.boxes_per_image, tc.jitter, seeded_generator(tc.seed, 0, batch["key"][b]))
        coarse.append(batch["geometry"][b].boxes_to_input(c))
        target.append(batch["geometry"][b].boxes_to_input(t))
    boxes = torch.cat(coarse)
    index = torch.cat([torch.full((len(c),), b) for b, c in enumerate(coarse)])
    torch.manual_seed(0)
    refiner = build_refiner(INTERM_CHANNELS[cfg.model.type], **{**cfg.refiner.model_dump(), "use_mask": True})
    opt = torch.optim.AdamW(refiner.parameters(), lr=tc.lr)

    def tick(t0: float) -> float:
        return time.perf_counter() - t0

    rows = {"before": [], "after": []}
    for _ in range(repeats):
        for variant in ("before", "after"):
            t = {}
            t0 = time.perf_counter()
            b = collate_rows([ds[i] for i in items])
            emb, interm = b["image_embeddings"].float(), b["interm_embeddings"].float()
            t["feature read"] = tick(t0)
            t0 = time.perf_counter()
            with torch.inference_mode(), autocast_context(device, amp_dtype):
                if variant == "before":
                    lg = torch.cat([package_decode(heads, emb[k:k + 1], interm[k:k + 1], c)[0]
                                    for k, c in enumerate(coarse)])
                else:
                    lg = heads(emb, interm, boxes, index, refiner.mask_regions(boxes))[0]
            logits = lg.float().clone()
            t["frozen HQ decoder"] = tick(t0)
            t0 = time.perf_counter()
            with autocast_context(device, amp_dtype):
                refined = refiner(emb, interm, coarse, logits)
            loss, _ = refine_loss(refined.float(), torch.cat(target), boxes, tc.l1_weight, tc.giou_weight)
            opt.zero_grad()
            loss.backward()
            t["refiner fwd+bwd"] = tick(t0)
            t0 = time.perf_counter()
            opt.step()
            t["optimizer"] = tick(t0)
            rows[variant].append(t)
    med = {v: {p: statistics.median(r[p] for r in rows[v]) for p in PARTS} for v in rows}
    for v in med:
        med[v]["step"] = statistics.median(sum(r.values()) for r in rows[v])
    return {"images": len(items), "boxes": len(boxes), "model": cfg.model.type, "amp": precision.label,
            "repeats": repeats, "median_s": med, "runs": rows}


def table(res: dict) -> str:
    med = res["median_s"]
    lines = ["| part | before (s) | after (s) | before ÷ after |", "|---|---:|---:|---:|"]
    for p in (*PARTS, "step"):
        a, b = med["before"][p], med["after"][p]
        lines.append(f"| {p} | {a:.3f} | {b:.3f} | {a / b:.1f}× |" if b > 0 else f"| {p} | {a:.3f} | {b:.3f} | – |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=REPO / "pipeline.yaml")
    ap.add_argument("--images", type=int, default=4, help="train images of the demo data set")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "work")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    res = profile(bench_config(args.work, args.images, config=args.config), args.repeats)
    res["machine"] = machine()
    print(f"{res['machine']['summary']}\none step: {res['images']} images, {res['boxes']} boxes, {res['model']}, "
          f"amp {res['amp']}; medians of {res['repeats']} repeats\n{table(res)}")
    if args.json:
        write_json(args.json, res)


if __name__ == "__main__":
    main()
