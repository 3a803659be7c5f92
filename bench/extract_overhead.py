"""Extract overhead: wall time of `extract` ÷ pure encoder time for the same images.

Both are measured side by side in one process on the demo data, alternating, ``--repeats`` times:

* pure encoder: images already decoded, resized and in memory; time only ``encode()`` (the HQ-SAM
  image encoder with ``Sam.preprocess``), in the same batch size extract uses;
* extract: ``run_extract`` into a fresh store (decode in DataLoader workers, GT resize, encoder,
  cast, compression, writes, commits), with the model already built (model build time is reported
  separately, since it does not scale with the data set).

Prints per-repeat figures and the median ratio; target ≤ 1.10. Usage::

    python bench/extract_overhead.py [--data data/demo] [--repeats 3] [--batch-size 1] [--num-workers 2]
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

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from boxrefine.extract.run import run_extract  # noqa: E402
from boxrefine.shared.config import validate_config  # noqa: E402
from boxrefine.shared.data.imageio import read_rgb  # noqa: E402
from boxrefine.shared.data.records import load_coco, resolve_image  # noqa: E402
from boxrefine.shared.dev.demo import generate_demo  # noqa: E402
from boxrefine.shared.model.sam import build_hq_sam, encode, encoder_input  # noqa: E402


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO / "data" / "demo")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--num-workers", default="2,0",
                    help="comma-separated DataLoader worker counts, each timed in every repeat")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if not (args.data / "annotations" / "instances_train.json").exists():
        generate_demo(args.data)
    splits = {s: {"images": str(args.data / "images" / s),
                  "annotations": str(args.data / "annotations" / f"instances_{s}.json")} for s in ("train", "val")}
    inputs = []
    for sc in splits.values():
        for rec in load_coco(Path(sc["annotations"])).images:
            inputs.append(encoder_input(read_rgb(resolve_image(Path(sc["images"]), rec.file_name)))[None])
    n = len(inputs)

    t0 = time.perf_counter()
    sam = build_hq_sam("vit_tiny", None, 0, "cpu", announce=False)
    build_s = time.perf_counter() - t0
    encode(sam, inputs[:1])  # warm-up (first call allocates)

    workers = [int(w) for w in str(args.num_workers).split(",")]
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="boxrefine-bench-"))
    try:
        for r in range(args.repeats):
            t_enc = 0.0
            for i in range(0, n, args.batch_size):
                t = time.perf_counter()
                encode(sam, inputs[i:i + args.batch_size])
                t_enc += time.perf_counter() - t
            row = {"encoder_s": t_enc}
            for w in workers:
                store = tmp / f"features-{r}-{w}.zarr"
                cfg = validate_config({"data": {"splits": splits}, "model": {"device": "cpu"},
                                       "store": {"path": str(store)},
                                       "extract": {"batch_size": args.batch_size, "num_workers": w}},
                                      "<bench>", REPO)
                res = run_extract(cfg, model=sam, announce=False)
                assert res.encoded == n, res
                row[f"extract_s_w{w}"] = res.wall_s
                row[f"ratio_w{w}"] = res.wall_s / t_enc
                row[f"encoder_share_w{w}"] = res.encoder_share
                shutil.rmtree(store)
            rows.append(row)
            print(f"repeat {r}: pure encoder {t_enc:.1f}s ({t_enc / n:.2f} s/img); "
                  + ", ".join(f"extract with {w} workers {row[f'extract_s_w{w}']:.1f}s → ratio "
                              f"{row[f'ratio_w{w}']:.3f}" for w in workers), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    med = {w: statistics.median(r[f"ratio_w{w}"] for r in rows) for w in workers}
    summary = {"images": n, "batch_size": args.batch_size, "workers": workers,
               "torch_threads": torch.get_num_threads(), "model_build_s": build_s, "repeats": rows,
               "median_ratio": med, "median_s_per_image_encoder": statistics.median(r["encoder_s"] for r in rows) / n}
    print(f"\n{n} images, vit_tiny random init, batch {args.batch_size}, "
          f"{torch.get_num_threads()} torch threads; model build {build_s:.1f}s (not included)")
    for w in workers:
        print(f"median extract/encoder ratio with {w} decode workers over {len(rows)} repeats: {med[w]:.3f}"
              f"  (target ≤ 1.10)")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
