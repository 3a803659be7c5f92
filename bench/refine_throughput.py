"""Refine throughput: boxes/s and images/s of ``boxrefine refine`` on a folder of images, with the
features not yet in the store (the encoder runs once per image, then they are cached) vs cached
(a second run over the same images: no encoder work).

Each repeat refines the folder into a fresh store (uncached), then again into that store (cached),
side by side, with the same HQ-SAM (built once and passed in, as the tests do, so its construction
is not timed) and the same refiner checkpoint. Reported: medians over the repeats of

* the whole run (``RefineRun`` setup → output written, extraction included): boxes/s, images/s;
* the refinement alone (features read + HQ-SAM heads + refiner; ``RefineResult.refine_s``);
* side by side with them, the parts that dominate: the image encoder's time inside the uncached run
  (``RefineResult.encoder_s``) and, with ``--use-mask``, HQ-SAM's prompt encoder + mask decoder alone
  on the same boxes (one pass per image, as refine runs them), so the ratios hold on a busy machine.

Usage::

    python bench/refine_throughput.py [--images 8] [--repeats 3] [--use-mask | --no-use-mask]
                                      [--checkpoint runs/x/best.pt] [--device cpu]
                                      [--json bench/out/refine_throughput.json]

The demo generator makes the images (``--images`` of them, its train split: JPEG, grey, RGBA and
16-bit PNG) and one detection per object (3-8 per image), named by file name. Without --checkpoint
an untrained refiner with the default refiner settings is saved and used: its weights do not change
the cost. HQ-SAM is vit_tiny with random weights (what the test machines have). Other processes on a
shared machine change the figures: read the medians, and the machine line printed with them.
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

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.machine import describe as machine  # noqa: E402
from boxrefine.extract.refine.run import RefineResult, RefineRun  # noqa: E402
from boxrefine.shared.config import PipelineConfig, validate_config  # noqa: E402
from boxrefine.shared.dev.demo import generate_demo  # noqa: E402
from boxrefine.shared.model.checkpoint import CKPT_FORMAT, checkpoint_bytes  # noqa: E402
from boxrefine.shared.model.heads import build_refiner  # noqa: E402
from boxrefine.shared.model.sam import INTERM_CHANNELS, SamHeads, build_hq_sam  # noqa: E402
from boxrefine.shared.model.weights import checkpoint_info  # noqa: E402
from boxrefine.shared.runtime.console import console  # noqa: E402
from boxrefine.shared.runtime.device import resolve_device  # noqa: E402
from boxrefine.shared.runtime.fileio import atomic_write_bytes, atomic_write_json  # noqa: E402
from boxrefine.shared.scoring.predict import box_prompt_logits  # noqa: E402
from boxrefine.shared.scoring.predictor import ImageFeatures  # noqa: E402
from boxrefine.shared.store.identity import identity_for  # noqa: E402


def untrained_checkpoint(cfg: PipelineConfig, path: Path) -> Path:
    """A checkpoint refine accepts, holding a freshly initialised refiner (the cost does not depend
    on the weights)."""
    args = {"interm_channels": INTERM_CHANNELS[cfg.model.type], **cfg.refiner.model_dump()}
    torch.manual_seed(0)
    fp = checkpoint_info(cfg.model.type, cfg.model.checkpoint, cfg.model.seed).fingerprint
    payload = {"format": CKPT_FORMAT, "refiner": build_refiner(**args).state_dict(), "refiner_args": args,
               "config": cfg.to_dict(), "store_identity": identity_for(cfg, fp).to_dict(), "state": {}}
    return atomic_write_bytes(path, checkpoint_bytes(payload))


def folder_detections(root: Path, out: Path) -> tuple[Path, int]:
    """The demo's detections of its train split, naming images by file name (folder mode)."""
    coco = json.loads((root / "annotations" / "instances_train.json").read_text())
    names = {im["id"]: im["file_name"] for im in coco["images"]}
    dets = json.loads((root / "annotations" / "detections_train.json").read_text())
    entries = [{"file_name": names[d["image_id"]], "category_id": d["category_id"], "bbox": d["bbox"],
                "score": d["score"]} for d in dets]
    atomic_write_json(out, entries)
    return out, len(entries)


@torch.no_grad()
def decoder_alone(store: Path, split: str, dets: Path, sam: Any, device: torch.device) -> float:
    """Seconds of HQ-SAM's prompt encoder + mask decoder alone on the detections' boxes, one pass
    per image, on features read from the store beforehand."""
    by_file: dict[str, list[list[float]]] = {}
    for d in json.loads(dets.read_text()):
        x, y, w, h = d["bbox"]
        by_file.setdefault(d["file_name"], []).append([x, y, x + w, y + h])
    feats = [(ImageFeatures.from_store(str(store), split, f), torch.tensor(b, dtype=torch.float32))
             for f, b in by_file.items()]
    heads = SamHeads(sam.prompt_encoder, sam.mask_decoder)
    t0 = time.perf_counter()
    for f, b in feats:
        emb, interm = f.image_embeddings[None].to(device).float(), f.interm_embeddings[None].to(device).float()
        box_prompt_logits(heads, emb, interm, f.geometry.boxes_to_input(b).to(device), device, None)
    return time.perf_counter() - t0


def one_run(cfg: PipelineConfig, store: Path, ckpt: Path, dets: Path, images: Path, sam: Any) -> RefineResult:
    cfg = cfg.model_copy(deep=True)
    cfg.store.path = str(store)
    return RefineRun(cfg, ckpt, dets, out=store.with_suffix(".json"), images=images, model=sam,
                     announce=False).setup().run()


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8, help="images in the folder (demo train images)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--use-mask", action=argparse.BooleanOptionalAction, default=True,
                    help="refiner.use_mask of the untrained refiner (the HQ-SAM decoder runs per box)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="a trained refiner (default: untrained)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "out" / "refine_throughput.json")
    return ap.parse_args()


def summarize(rows: list[dict], a: argparse.Namespace, n_boxes: int) -> dict:
    """The medians of the repeats and the throughputs they give (the JSON the bench writes)."""
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k.endswith("_s")}
    boxes, images = rows[0]["boxes"], rows[0]["images"]
    return {
        "machine": machine(), "device": a.device, "torch_threads": torch.get_num_threads(),
        "model": "vit_tiny, random init", "refiner_use_mask": a.use_mask, "images": images, "boxes": boxes,
        "detections": n_boxes, "repeats": a.repeats, "medians_s": med, "runs": rows,
        "uncached": {"boxes_per_s": boxes / med["uncached_wall_s"], "images_per_s": images / med["uncached_wall_s"]},
        "cached": {"boxes_per_s": boxes / med["cached_wall_s"], "images_per_s": images / med["cached_wall_s"]},
        "refinement_alone": {"boxes_per_s": boxes / med["cached_refine_s"],
                             "images_per_s": images / med["cached_refine_s"]},
        "uncached_over_cached_wall": med["uncached_wall_s"] / med["cached_wall_s"],
        "encoder_share_of_uncached": statistics.median(r["encoder_s"] / r["uncached_wall_s"] for r in rows),
        "refinement_over_decoder_alone": (statistics.median(r["cached_refine_s"] / r["decoder_alone_s"] for r in rows)
                                          if a.use_mask else None),
    }


def main() -> None:
    a = parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="refine-bench-"))
    try:
        generate_demo(tmp / "data", num_train=a.images, num_val=1, seed=0)
        folder = tmp / "data" / "images" / "train"
        dets, n_boxes = folder_detections(tmp / "data", tmp / "detections.json")
        raw = {"data": {"splits": {"train": {"images": str(folder),
                                             "annotations": str(tmp / "data/annotations/instances_train.json")}}},
               "model": {"type": "vit_tiny", "checkpoint": None, "seed": 0, "device": a.device},
               "store": {"path": str(tmp / "unused.zarr")}, "extract": {"num_workers": 2, "batch_size": 1},
               "refiner": {"use_mask": a.use_mask}, "train": {"val_split": None}}
        cfg = validate_config(raw, "<bench>", tmp)
        ckpt = a.checkpoint or untrained_checkpoint(cfg, tmp / "refiner.pt")
        device = resolve_device(a.device)
        sam = build_hq_sam("vit_tiny", None, 0, device, announce=False)
        rows = []
        for r in range(a.repeats):
            store = tmp / f"store-{r}.zarr"
            cold = one_run(cfg, store, ckpt, dets, folder, sam)
            warm = one_run(cfg, store, ckpt, dets, folder, sam)
            assert cold.encoded == a.images and warm.encoded == 0, (cold.encoded, warm.encoded)
            rows.append({"uncached_wall_s": cold.wall_s, "cached_wall_s": warm.wall_s,
                         "uncached_refine_s": cold.refine_s, "cached_refine_s": warm.refine_s,
                         "encoder_s": cold.encoder_s,
                         "decoder_alone_s": decoder_alone(store, warm.split, dets, sam, device) if a.use_mask else 0.0,
                         "boxes": warm.refined, "images": warm.images})
            shutil.rmtree(store)
            console.print(f"repeat {r + 1}: uncached {cold.wall_s:.1f}s, cached {warm.wall_s:.1f}s "
                          f"(refinement {warm.refine_s:.1f}s) for {warm.refined} boxes on {warm.images} images",
                          markup=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    summary = summarize(rows, a, n_boxes)
    med, boxes, images = summary["medians_s"], summary["boxes"], summary["images"]
    a.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.json, summary, indent=1)
    print(f"machine: {summary['machine']} (torch threads {summary['torch_threads']}; shared machines: medians)")
    print(f"{images} images, {boxes} boxes, refiner use_mask={a.use_mask}, medians of {a.repeats} repeat(s):")
    for name, key in (("features not cached (extract + refine)", "uncached"), ("features cached", "cached"),
                      ("refinement alone (cached run)", "refinement_alone")):
        s = summary[key]
        print(f"  {name:<40} {s['boxes_per_s']:7.2f} boxes/s  {s['images_per_s']:6.3f} images/s")
    print(f"  uncached ÷ cached wall time: {summary['uncached_over_cached_wall']:.1f}x; the image encoder is "
          f"{100 * summary['encoder_share_of_uncached']:.0f}% of an uncached run")
    if a.use_mask:
        print(f"  refinement alone ÷ HQ-SAM prompt encoder + mask decoder alone on the same boxes: "
              f"{summary['refinement_over_decoder_alone']:.2f} (median {med['decoder_alone_s']:.1f}s for the decoder)")
    print(f"  → {a.json}")


if __name__ == "__main__":
    main()
