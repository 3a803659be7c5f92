"""``boxrefine refine``: a trained refiner applied to a detector's boxes on any images."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import typer

from boxrefine.shared.cli.common import config_option, device_option, load_cli_config, set_option, stage_command

app = typer.Typer(help="Refine a detector's boxes with a trained refiner (features from the store, else computed "
                       "and cached there).")


@stage_command(app)
def refine(
    config: Path = config_option(),
    checkpoint: Path = typer.Option(None, "--checkpoint", help="Refiner checkpoint file, or a run folder (its "
                                    "best.pt). Default: refine.checkpoint, else best.pt of the latest run in "
                                    "train.runs_dir (as evaluate)."),
    detections: Path = typer.Option(None, "--detections", "-d", help="COCO results JSON of the detector's boxes "
                                    "(image_id, bbox [x,y,w,h], score). Default: the split's detections."),
    split: str = typer.Option(None, "--split", help="Refine the images of this split of data.splits."),
    images: Path = typer.Option(None, "--images", help="...or of this folder (recursively; detections name images "
                                "by file_name or by image_id = file stem)."),
    coco: Path = typer.Option(None, "--coco", help="With --images: a COCO file listing the images (detections name "
                              "them by its image ids); annotations in it are not needed."),
    out: Path = typer.Option(None, "--out", "-o", help="Output COCO results. Default: <detections>.refined.json "
                             "beside the detections."),
    min_score: float = typer.Option(None, "--min-score", help="refine.min_score: boxes scoring less are not refined."),
    low_score: Literal["keep", "drop"] = typer.Option(
        None, "--low-score", help="refine.low_score: keep (default: boxes below --min-score are passed through "
        "unrefined) or drop (left out of the output)."),
    masks: bool = typer.Option(None, "--masks/--no-masks", help="refine.masks: add HQ-SAM's mask of each refined box "
                               "(COCO RLE, original size) as its segmentation."),
    vis: bool = typer.Option(None, "--vis/--no-vis", help="refine.vis: draw detector (red) and refined (blue) boxes "
                             "of the first refine.vis_count images into <out stem>_vis/."),
    store: str = typer.Option(None, "--store", help="Store path or fsspec URL (store.path)."),
    device: str = device_option(),
    set_: list[str] = set_option(),
) -> None:
    """Writes every detection, in input order: refined box in bbox, input box in bbox_coarse, score kept."""
    cfg = load_cli_config(config, set_, {
        "refine.min_score": min_score, "refine.low_score": low_score, "refine.masks": masks, "refine.vis": vis,
        "store.path": store, "model.device": device,
    })
    from boxrefine.extract.refine.run import run_refine

    run_refine(cfg, checkpoint=checkpoint, detections=detections, out=out, split=split, images=images, coco=coco)
