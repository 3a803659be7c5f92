"""What evaluate writes and prints: COCO results and AP, metric rows, the CSV and the comparison table
(the plots are ``evaluate/figures.py``, the HTML report ``evaluate/page.py``)."""

from __future__ import annotations

import contextlib
import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table
from rich.text import Text

from boxrefine.shared.config import PipelineConfig
from boxrefine.shared.geometry.boxes import xyxy_to_xywh
from boxrefine.shared.runtime.console import console, result_console
from boxrefine.shared.runtime.fileio import atomic_write_text
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

    def __call__(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        """AP, AP50, AP75 and the same per COCO size (``"small": {...}``); None where not computed."""
        if self.coco is None:
            return dict.fromkeys(AP_KEYS)
        if any(r["category_id"] not in self.cat_ids for r in results):
            self.reason = "detections with category ids not in the annotations"
            return dict.fromkeys(AP_KEYS)
        ap = coco_box_ap(self.coco, results, self.image_ids, by_size=True)
        return {k: ({kk: (vv if vv >= 0 else None) for kk, vv in v.items()} if isinstance(v, dict)
                    else v if v >= 0 else None) for k, v in ap.items()}  # -1: no GT to score against


def metric_row(metrics: dict[str, float] | None, ap: dict[str, Any], mask: float | None) -> dict[str, Any]:
    m = metrics or {}
    return {**{k: json_num(m.get(k)) for k in BOX_KEYS}, **{k: ap.get(k) for k in AP_KEYS}, "mask_iou": json_num(mask)}


def write_csv(path: Path, rows: list[dict[str, Any]], baselines: dict[str, dict[str, Any]]) -> None:
    base_cols = {"coarse_mean_iou": baselines["coarse"]["mean_iou"],
                 "zero_shot_mean_iou": baselines["zero_shot"]["mean_iou"],
                 "coarse_AP": baselines["coarse"]["AP"], "zero_shot_AP": baselines["zero_shot"]["AP"],
                 "mask_iou_coarse": baselines["coarse"]["mask_iou"]}
    cols = ["checkpoint", "aliases", "epoch", "boxes", *BOX_KEYS, *AP_KEYS, "mask_iou", *base_cols, "path"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({**base_cols, **r, "aliases": " ".join(r.get("aliases", []))})
    atomic_write_text(path, buf.getvalue())


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:.{digits}f}"


def print_table(res: EvalResult) -> None:
    """Coarse boxes, the HQ-SAM zero-shot baseline and every checkpoint, on the same boxes (stdout: the
    command's result; skipped checkpoints are warnings, on stderr)."""
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
        aliases = f" (= {', '.join(r['aliases'])})" if r.get("aliases") else ""
        add(Text(f"{r['checkpoint']}{aliases}{' *' if best else ''}"), r, "bold" if best else None)  # verbatim
    result_console.print(table)
    result_console.print(legend, markup=False, style="dim")
    if len(res.rows) > 1:
        result_console.print(f"* best (refined mean IoU): {res.best}", markup=False)
    for _, reason in res.skipped:
        console.print(Text.assemble(("skipped ", "yellow"), reason), soft_wrap=True)
    result_console.print(f"results in {res.out_dir}", markup=False)
