"""What evaluate writes besides the metrics: ``iou_hist.png`` and ``report.html`` (figures, galleries of
the boxes that gained and lost most, the run's training curves and config, the robustness curve).

Images are opened only for the galleries, through ``evaluate/vis.py`` (imported here only then), and
only when the split's image folder is there: evaluate still runs from the store alone, and the report
then says why it has no gallery.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from boxrefine.evaluate.breakdown import MatchedBoxes
from boxrefine.evaluate.figures import (
    COARSE,
    REFINED,
    ZERO_SHOT,
    gain_hist,
    robustness,
    scatter,
    training_curves,
    write_iou_hist,
)
from boxrefine.evaluate.page import GalleryEntry, ReportParts, render
from boxrefine.shared.data.intensity import Intensity
from boxrefine.shared.runtime.console import console
from boxrefine.shared.runtime.fileio import atomic_write_text
from boxrefine.shared.scoring.predict import ImagePrediction
from boxrefine.shared.store.rows import StoreRows


def clear_vis(folder: Path) -> None:
    """Remove an earlier evaluation's overlays (``eval/vis/``), announced."""
    if folder.is_dir():
        shutil.rmtree(folder)
        console.print(f"removed {folder} (overlays of an earlier evaluation)", markup=False)


def pick(gain: np.ndarray, count: int) -> tuple[list[int], list[int]]:
    """Indices of the ``count`` boxes that gained most (gain > 0) and lost most (gain < 0)."""
    order = np.argsort(-gain, kind="stable")
    gained = [int(i) for i in order[:count] if gain[i] > 0]
    lost = [int(i) for i in order[::-1][:count] if gain[i] < 0]
    return gained, lost


def galleries(matched: MatchedBoxes, refined: np.ndarray, refined_iou: np.ndarray, ds: StoreRows, images: Path,
              annotations: Path, count: int, intensity: Intensity
              ) -> tuple[list[GalleryEntry], list[GalleryEntry], str]:
    """(gained most, lost most, why a gallery is missing or incomplete)."""
    if count == 0:
        return [], [], "No galleries: evaluate.gallery is 0."
    if not Path(images).is_dir():
        return [], [], (f"No galleries: the image folder {images} is not here (evaluate ran from the feature store "
                        "alone; the galleries need the images).")
    from boxrefine.evaluate.vis import GalleryBox, gallery_crops  # opens images: only here

    gained, lost = pick(refined_iou - matched.coarse_iou, count)
    chosen = gained + lost
    boxes = [GalleryBox(int(ds.keys[matched.row[i]]), matched.gt[i], matched.coarse[i], refined[i],
                        float(matched.coarse_iou[i]), float(refined_iou[i])) for i in chosen]
    pngs, names, problem = gallery_crops(images, annotations, boxes, intensity)
    entries = [GalleryEntry(png, f"{name or 'image'}, box {int(matched.index[i])}", b.coarse_iou, b.refined_iou)
               for i, b, png, name in zip(chosen, boxes, pngs, names, strict=True)]
    note = f"Some crops are missing: {problem}" if problem else ""
    return entries[:len(gained)], entries[len(gained):], note


def training_parts(run: Path, parts: ReportParts) -> None:
    """The run's curves (metrics.jsonl) and resolved config (config.yaml), when ``run`` is a run folder."""
    log, config = run / "metrics.jsonl", run / "config.yaml"
    try:
        lines = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        lines = []
    if lines:
        parts.figures["curves"] = training_curves(lines)
    else:
        parts.curves_note = f"No training curves: {log} is not there (the checkpoints are not in a run folder)."
    try:
        parts.config_text = config.read_text()
    except OSError:
        parts.config_text = None


def write_figures_and_report(doc: dict[str, Any], files: dict[str, Path], matched: MatchedBoxes,
                             best_preds: list[ImagePrediction], ds: StoreRows, images: Path, annotations: Path,
                             gallery: int, intensity: Intensity) -> None:
    """``files["iou_hist"]`` and ``files["report"]`` from metrics.json's ``doc`` and the per-box IoUs."""
    refined = matched.refined_boxes(best_preds)
    refined_iou = matched.refined_iou(best_preds)
    best = doc["best"]
    write_iou_hist(files["iou_hist"], [("coarse (before)", matched.coarse_iou, COARSE),
                                       ("HQ-SAM zero-shot", matched.zero_shot_iou, ZERO_SHOT),
                                       (f"refined: {best} (after)", refined_iou, REFINED)])
    run = files["report"].parent.parent
    parts = ReportParts(run.name)
    if len(matched):
        parts.figures["scatter"] = scatter(matched.coarse_iou, refined_iou, best)
        parts.figures["gain"] = gain_hist(matched.coarse_iou, refined_iou)
    parts.gained, parts.lost, parts.gallery_note = galleries(matched, refined, refined_iou, ds, images, annotations,
                                                             gallery, intensity)
    training_parts(run, parts)
    if doc.get("noise"):
        parts.figures["robustness"] = robustness(doc["noise"])
    atomic_write_text(files["report"], render(doc, parts))
