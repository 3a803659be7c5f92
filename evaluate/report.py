"""What evaluate writes and prints: COCO results and AP, metric rows, the IoU histogram, the CSV and
the comparison table."""

from __future__ import annotations

import contextlib
import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich import box
from rich.table import Table
from rich.text import Text

from boxrefine.shared.config import PipelineConfig
from boxrefine.shared.geometry.boxes import paired_iou, xyxy_to_xywh
from boxrefine.shared.runtime.console import console
from boxrefine.shared.runtime.fileio import atomic_savefig, atomic_write_text
from boxrefine.shared.scoring.metrics import IOU_THRESHOLDS, coco_box_ap
from boxrefine.shared.scoring.predict import ImagePrediction

BOX_KEYS = ("mean_iou", *(f"acc@{t}" for t in IOU_THRESHOLDS), "side_err_px")
AP_KEYS = ("AP", "AP50", "AP75")


@dataclass
class EvalResult:
    out_dir: Path
    split: str
    rows: list[dict[str, Any]]  # one per evaluated checkpoint, in evaluation (natural) order
    baselines: dict[str, dict[str, Any]]  # "coarse", "zero_shot"
    skipped: list[tuple[str, str]]  # (checkpoint path, reason)
    best: str | None  # name of the best checkpoint (highest refined mean IoU)
    eval_boxes: Path
    source: str  # "jitter" or "detections:<path>"
    files: dict[str, Path] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


def coco_results(preds: list[ImagePrediction], attr: str, image_ids: dict[int, int]) -> list[dict[str, Any]]:
    """Boxes of ``attr`` ("coarse" | "zero_shot" | "refined") in COCO results format, each with the
    score and category of the input box it came from."""
    out = []
    for p in preds:
        boxes = getattr(p, attr)
        if boxes is None or len(boxes) == 0:
            continue
        for b, s, c in zip(xyxy_to_xywh(boxes.float()).tolist(), p.scores.tolist(), p.category_id.tolist(),
                           strict=True):
            out.append({"image_id": image_ids[p.key], "category_id": int(c), "bbox": [round(v, 2) for v in b],
                        "score": round(float(s), 6)})
    return out


def json_num(v: Any) -> Any:
    """JSON-safe: NaN → None."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class APScorer:
    """COCO box AP of results against the split's annotations, on the evaluated images only."""

    def __init__(self, cfg: PipelineConfig, split: str, source: str, image_ids: list[int]):
        self.coco, self.image_ids, self.reason = None, image_ids, ""
        ann = cfg.data.splits[split].annotations
        if not source.startswith("detections:"):
            self.reason = "no scores (jittered GT boxes)"
            return
        if not ann.is_file():
            console.print(f"{ann}: annotation file not found; COCO AP is not computed", style="yellow", markup=False)
            self.reason = "annotations missing"
            return
        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(str(ann))
        self.cat_ids = set(self.coco.getCatIds())

    def __call__(self, results: list[dict[str, Any]]) -> dict[str, float | None]:
        if self.coco is None:
            return dict.fromkeys(AP_KEYS)
        if any(r["category_id"] not in self.cat_ids for r in results):
            self.reason = "detections with category ids not in the annotations"
            return dict.fromkeys(AP_KEYS)
        ap = coco_box_ap(self.coco, results, self.image_ids)
        return {k: (v if v >= 0 else None) for k, v in ap.items()}  # -1: no GT to score against


def metric_row(metrics: dict[str, float] | None, ap: dict[str, float | None], mask: float | None) -> dict[str, Any]:
    m = metrics or {}
    return {**{k: json_num(m.get(k)) for k in BOX_KEYS}, **ap, "mask_iou": json_num(mask)}


def plot_iou_hist(base: list[ImagePrediction], best: list[ImagePrediction] | None, best_name: str | None,
                  out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gt = torch.cat([p.gt for p in base]) if base else torch.zeros((0, 4))
    ok = ~torch.isnan(gt).any(1)

    def ious(preds: list[ImagePrediction] | None, attr: str) -> np.ndarray | None:
        if not preds or any(getattr(p, attr) is None for p in preds):
            return None
        return paired_iou(torch.cat([getattr(p, attr) for p in preds])[ok], gt[ok]).numpy()

    bins = np.linspace(0, 1, 41)
    fig, ax = plt.subplots(figsize=(7, 4))
    for vals, label, style in ((ious(base, "coarse"), "coarse (before)", {"alpha": 0.45, "color": "tab:red"}),
                               (ious(base, "zero_shot"), "HQ-SAM zero-shot",
                                {"histtype": "step", "linewidth": 1.5, "color": "tab:gray"}),
                               (ious(best, "refined"), f"refined: {best_name} (after)",
                                {"alpha": 0.45, "color": "tab:blue"})):
        if vals is not None and len(vals):
            ax.hist(vals, bins=bins, label=f"{label}, mean {vals.mean():.3f}", **style)
    for t in IOU_THRESHOLDS:
        ax.axvline(t, color="k", linestyle=":", linewidth=0.8)
    ax.set_xlabel("IoU to ground truth")
    ax.set_ylabel("boxes")
    ax.set_xlim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, out)
    plt.close(fig)


def write_csv(path: Path, rows: list[dict[str, Any]], baselines: dict[str, dict[str, Any]]) -> None:
    base_cols = {"coarse_mean_iou": baselines["coarse"]["mean_iou"],
                 "zero_shot_mean_iou": baselines["zero_shot"]["mean_iou"],
                 "coarse_AP": baselines["coarse"]["AP"], "zero_shot_AP": baselines["zero_shot"]["AP"],
                 "mask_iou_coarse": baselines["coarse"]["mask_iou"]}
    cols = ["checkpoint", "epoch", "boxes", *BOX_KEYS, *AP_KEYS, "mask_iou", *base_cols, "path"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({**base_cols, **r})
    atomic_write_text(path, buf.getvalue())


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:.{digits}f}"


def print_table(res: EvalResult) -> None:
    """Coarse boxes, the HQ-SAM zero-shot baseline and every checkpoint, on the same boxes."""
    s = res.summary
    table = Table(box=box.SIMPLE_HEAD, collapse_padding=True, title_justify="left",
                  title=f"evaluate {res.split}: {s.get('images')} images, {s.get('boxes')} boxes matched to GT"
                        + (f" ({s['unmatched']} unmatched)" if s.get("unmatched") else ""))
    legend = (f"eval boxes: {res.source}. IoU: mean box IoU to GT; ≥t: share of boxes with IoU ≥ t; side: "
              "mean |side error| in px; AP: COCO box AP (needs scored detections); mask: IoU of HQ-SAM's mask "
              "prompted by the row's box with the GT mask")
    table.add_column("boxes", no_wrap=True)
    for name in ("IoU", "≥.5", "≥.75", "≥.9", "side", "AP", "AP50", "AP75", "mask"):
        table.add_column(name, justify="right", no_wrap=True)

    def add(label: str | Text, r: dict[str, Any], style: str | None = None) -> None:
        table.add_row(label, *(_fmt(r[k], 3) for k in BOX_KEYS[:-1]), _fmt(r["side_err_px"], 1),
                      *(_fmt(r[k], 3) for k in AP_KEYS), _fmt(r["mask_iou"], 3), style=style)

    add("coarse", res.baselines["coarse"], "dim")
    add("zero-shot", res.baselines["zero_shot"], "dim")
    for r in res.rows:
        best = r["checkpoint"] == res.best and len(res.rows) > 1
        add(Text(f"{r['checkpoint']}{' *' if best else ''}"), r, "bold" if best else None)  # a file name: verbatim
    console.print(table)
    console.print(legend, markup=False, style="dim")
    if len(res.rows) > 1:
        console.print(f"* best (refined mean IoU): {res.best}", markup=False)
    for _, reason in res.skipped:
        console.print(Text.assemble(("skipped ", "yellow"), reason), soft_wrap=True)
    console.print(f"results in {res.out_dir}", markup=False)
