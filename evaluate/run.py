"""Score one checkpoint or a whole run folder on the cached, resized ground truth.

Everything comes from the feature store (features, GT boxes and GT masks already in SAM's low-res
frame), the small annotation JSON (for COCO AP) and the fixed evaluation boxes; images are opened
only by ``--vis`` (``evaluate/vis.py``), and the HQ-SAM image encoder is never built.

Outputs, in ``<run folder>/eval/``: ``metrics.json`` / ``metrics.csv`` (one row per checkpoint, the
baselines beside them), ``refined_<split>.json`` (COCO results of the best checkpoint; with several
checkpoints also ``refined_<split>_<stem>.json`` each), ``eval_boxes_<split>.json`` (the fixed
coarse boxes, reused by every later run into the same folder), ``iou_hist.png`` and, with ``--vis``,
``vis/*.png``.

Prediction and metrics are ``shared.scoring.predict`` / ``summarize`` — the same code train's
periodic evaluation runs. The baselines (coarse boxes, HQ-SAM zero-shot boxes, coarse-prompt mask
IoU) do not depend on the checkpoint and are computed once.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich import box
from rich.table import Table

from shared.boxes import paired_iou, xyxy_to_xywh
from shared.checkpoints import CheckpointFileError, load_checkpoint
from shared.config import PipelineConfig
from shared.console import console, progress
from shared.evalboxes import CoarseBoxes, fixed_coarse_boxes
from shared.metrics import IOU_THRESHOLDS, coco_box_ap
from shared.refiner import BoxRefiner
from shared.rowdata import StoreRows
from shared.sam import build_sam_heads, resolve_device
from shared.scoring import ImagePrediction, amp_setting, predict, summarize
from shared.store import F, FeatureStore, open_checked_store

BOX_KEYS = ("mean_iou", *(f"acc@{t}" for t in IOU_THRESHOLDS), "side_err_px")
AP_KEYS = ("AP", "AP50", "AP75")


class EvaluateError(RuntimeError):
    """A problem that stops evaluation with a one-line message."""


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


# ------------------------------------------------------------------------------------ checkpoints
def natural_key(name: str) -> tuple[int, list[Any]]:
    """Numbered checkpoints first, numbers compared as numbers (epoch_2 < epoch_10 < epoch_010b),
    then the named ones alphabetically: epoch_005.pt, epoch_010.pt, best.pt, last.pt."""
    parts = [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]
    return (0 if any(c.isdigit() for c in name) else 1, parts)


def folder_checkpoints(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.suffix == ".pt" and not p.name.startswith(".") and p.is_file()]
    return sorted(files, key=lambda p: natural_key(p.name))


def _activity(run: Path) -> int:
    """When a run folder last changed, from the files directly in it (so that writing its eval/
    subfolder does not make an old run the latest)."""
    stamps = [p.stat().st_mtime_ns for p in run.iterdir() if p.is_file()]
    return max(stamps) if stamps else run.stat().st_mtime_ns


def latest_best(runs_dir: Path) -> Path:
    if not runs_dir.is_dir():
        raise EvaluateError(f"{runs_dir}: no runs folder (train.runs_dir); train first or pass --checkpoint")
    runs = [d for d in runs_dir.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if not runs:
        raise EvaluateError(f"{runs_dir}: no run folders; train first or pass --checkpoint")
    latest = max(runs, key=_activity)
    best = latest / "best.pt"
    if not best.is_file():
        raise EvaluateError(f"{latest}: the latest run has no best.pt (trained without a validation split?); "
                            f"pass --checkpoint {latest}/last.pt or --checkpoint {latest}")
    return best


def resolve_checkpoints(cfg: PipelineConfig, checkpoint: Path | None) -> tuple[list[Path], Path]:
    """(checkpoint files in evaluation order, output folder)."""
    target = checkpoint if checkpoint is not None else cfg.evaluate.checkpoint
    if target is None:
        target = latest_best(cfg.train.runs_dir)
        console.print(f"checkpoint: {target} (best.pt of the latest run in {cfg.train.runs_dir})", markup=False)
    target = Path(target)
    if target.is_dir():
        files = folder_checkpoints(target)
        if not files:
            raise EvaluateError(f"{target}: no *.pt checkpoint files in this folder")
        return files, target / "eval"
    if not target.exists():
        raise EvaluateError(f"{target}: checkpoint not found")
    return [target], target.parent / "eval"


def _identity_differences(ck_identity: Any, store: FeatureStore) -> list[str]:
    if not isinstance(ck_identity, dict):
        return ["the checkpoint records no store identity"]
    now = store.identity.to_dict()
    out = []
    for k in sorted(set(ck_identity) | set(now)):
        a, b = ck_identity.get(k), now.get(k)
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            a, b = list(a), list(b)
        if a != b:
            out.append(f"{k}: checkpoint {a!r}, store {b!r}")
    return out


def load_refiner(path: Path, store: FeatureStore, device: torch.device) -> tuple[BoxRefiner, dict[str, Any]]:
    """Load a training checkpoint and rebuild its refiner from ``refiner_args``; CheckpointFileError
    (one line, naming the file) for anything that cannot be evaluated on this store."""
    ck = load_checkpoint(path)
    diffs = _identity_differences(ck.get("store_identity"), store)
    if diffs:
        raise CheckpointFileError(f"{path}: trained on another feature store ({'; '.join(diffs)})")
    args = ck.get("refiner_args")
    if not isinstance(args, dict):
        raise CheckpointFileError(f"{path}: no refiner_args in the checkpoint")
    try:
        refiner = BoxRefiner(**args)
        refiner.load_state_dict(ck["refiner"])
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointFileError(f"{path}: cannot rebuild the refiner from its refiner_args ({first[:160]})") from None
    info = {"epoch": ck.get("epoch"), "best_iou": ck.get("best_iou")}
    return refiner.to(device).eval(), info


# ------------------------------------------------------------------------------------ helpers
def amp_dtype(cfg: PipelineConfig, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for evaluation: the training rule (``train.amp`` / ``train.amp_dtype``, via
    ``shared.scoring.amp_setting``), without the GradScaler (nothing is trained here)."""
    dtype, _, why = amp_setting(cfg.train.amp, cfg.train.amp_dtype, device)
    if cfg.train.amp is not False and why != "amp off":
        console.print(f"amp: {why}", markup=False)
    return dtype


def _boxes_meta(path: Path) -> dict[str, Any]:
    doc = json.loads(path.read_text())
    doc.pop("images", None)
    return doc


def eval_boxes(cfg: PipelineConfig, split: str, ds: StoreRows, path: Path) -> tuple[dict[int, CoarseBoxes], str]:
    """The fixed evaluation boxes (``fixed_coarse_boxes``: read back from ``path`` when it exists)."""
    existed = path.exists()
    try:
        boxes = fixed_coarse_boxes(cfg, split, ds, path)
        meta = _boxes_meta(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        if not existed:
            raise
        raise EvaluateError(f"{path}: cannot read the saved evaluation boxes ({e}); "
                            "delete it to draw new ones") from None
    missing = [k for k in (int(ds.keys[i]) for i in ds.rows) if k not in boxes]
    if missing:
        raise EvaluateError(f"{path}: the saved evaluation boxes cover {len(ds) - len(missing)} of the {len(ds)} "
                            f"images of split {split!r} (the store changed since); delete the file to draw new "
                            "boxes, or evaluate into another folder")
    source = str(meta.get("source", "?"))
    if existed:
        dets = cfg.data.splits[split].detections
        now = f"detections:{dets}" if dets else "jitter"
        same = source == now and (now != "jitter" or (meta.get("seed") == cfg.evaluate.seed
                                                     and meta.get("jitter") == cfg.evaluate.jitter))
        if not same:
            console.print(f"[yellow]note: reusing the saved evaluation boxes {path} ({source}, seed "
                          f"{meta.get('seed')}, jitter {meta.get('jitter')}), which differ from what the config "
                          "would draw now; delete the file to draw new ones[/yellow]", soft_wrap=True)
    return boxes, source


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


def _num(v: Any) -> Any:
    """JSON-safe: NaN → None."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=False))
    os.replace(tmp, path)


class _AP:
    """COCO box AP of results against the split's annotations, on the evaluated images only."""

    def __init__(self, cfg: PipelineConfig, split: str, source: str, image_ids: list[int]):
        self.coco, self.image_ids, self.reason = None, image_ids, ""
        ann = cfg.data.splits[split].annotations
        if not source.startswith("detections:"):
            self.reason = "no scores (jittered GT boxes)"
            return
        if not ann.is_file():
            console.print(f"[yellow]{ann}: annotation file not found; COCO AP is not computed[/yellow]")
            self.reason = "annotations missing"
            return
        import contextlib

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


def _row(metrics: dict[str, float] | None, ap: dict[str, float | None], mask: float | None) -> dict[str, Any]:
    m = metrics or {}
    return {**{k: _num(m.get(k)) for k in BOX_KEYS}, **ap, "mask_iou": _num(mask)}


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
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, out)


def _write_csv(path: Path, rows: list[dict[str, Any]], baselines: dict[str, dict[str, Any]]) -> None:
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
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)


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

    def add(label: str, r: dict[str, Any], style: str | None = None) -> None:
        table.add_row(label, *(_fmt(r[k], 3) for k in BOX_KEYS[:-1]), _fmt(r["side_err_px"], 1),
                      *(_fmt(r[k], 3) for k in AP_KEYS), _fmt(r["mask_iou"], 3), style=style)

    add("coarse", res.baselines["coarse"], "dim")
    add("zero-shot", res.baselines["zero_shot"], "dim")
    for r in res.rows:
        best = r["checkpoint"] == res.best and len(res.rows) > 1
        add(f"{r['checkpoint']}{' *' if best else ''}", r, "bold" if best else None)
    console.print(table)
    console.print(legend, markup=False, style="dim")
    if len(res.rows) > 1:
        console.print(f"* best (refined mean IoU): {res.best}", markup=False)
    for _, reason in res.skipped:
        console.print(f"[yellow]skipped[/yellow] {reason}", soft_wrap=True)
    console.print(f"results in {res.out_dir}", markup=False)


# ------------------------------------------------------------------------------------ evaluate
def run_evaluate(cfg: PipelineConfig, checkpoint: Path | None = None, split: str | None = None,
                 vis: bool | None = None) -> EvalResult:
    t0 = time.perf_counter()
    ec = cfg.evaluate
    vis = ec.vis if vis is None else vis
    split = split or cfg.eval_split()
    if split is None:
        raise EvaluateError("no evaluation split: set evaluate.split (or --split), train.val_split, or add a "
                            "split named 'val' to data.splits")
    if split not in cfg.data.splits:
        raise EvaluateError(f"split {split!r} is not in data.splits {sorted(cfg.data.splits)}")
    paths, out_dir = resolve_checkpoints(cfg, checkpoint)

    store = open_checked_store(cfg)
    sp = store.split(split)
    ds = StoreRows.from_store(cfg.store.path, split, with_masks=True)
    if len(ds) == 0:
        raise EvaluateError(f"{cfg.store.path}: split {split!r} has no complete rows; run extract first")
    out_dir.mkdir(parents=True, exist_ok=True)
    boxes_path = out_dir / f"eval_boxes_{split}.json"
    coarse, source = eval_boxes(cfg, split, ds, boxes_path)
    ids = sp.image_ids()
    image_ids = {int(ds.keys[i]): int(ids[i]) for i in ds.rows}
    n_boxes = sum(len(coarse[int(ds.keys[i])]) for i in ds.rows)
    console.print(f"evaluate: split {split}, {len(ds)} images, {n_boxes} boxes ({source}), "
                  f"{len(paths)} checkpoint(s) → {out_dir}", markup=False)

    device = resolve_device(cfg.model.device)
    amp = amp_dtype(cfg, device)
    num_workers = cfg.train.num_workers  # DataLoader workers reading the store
    ap = _AP(cfg, split, source, sorted(image_ids.values()))

    def run_predict(desc: str, **kw: Any) -> list[ImagePrediction]:
        with progress(desc, len(ds)) as bar:
            return predict(ds, coarse, device, heads=heads, amp_dtype=amp, batch_images=ec.batch_images,
                           num_workers=num_workers, on_batch=bar.advance, **kw)

    heads = None
    base_preds: list[ImagePrediction] | None = None
    baselines: dict[str, dict[str, Any]] = {}
    summary: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    best_preds: list[ImagePrediction] | None = None
    best_row: dict[str, Any] | None = None
    best_results: list[dict[str, Any]] = []
    several = len(paths) > 1
    for path in paths:
        try:
            refiner, info = load_refiner(path, store, device)
        except CheckpointFileError as e:
            skipped.append((str(path), str(e)))
            console.print(f"[yellow]skipped[/yellow] {e}", soft_wrap=True)
            continue
        if base_preds is None:  # once, and only when there is something to compare with
            heads = build_sam_heads(cfg.model.type, cfg.model.checkpoint, cfg.model.seed, device)
            base_preds = run_predict("baselines", refiner=None, zero_shot=True, masks=True)
            summary = summarize(base_preds)
            baselines = {
                "coarse": _row(summary.get("coarse"), ap(coco_results(base_preds, "coarse", image_ids)),
                               summary.get("mask_iou_coarse")),
                "zero_shot": _row(summary.get("zero_shot"), ap(coco_results(base_preds, "zero_shot", image_ids)),
                                  None),
            }
        preds = run_predict(path.stem, refiner=refiner, masks=True, coarse_masks=False,
                            loss_weights=(cfg.train.l1_weight, cfg.train.giou_weight))
        s = summarize(preds)
        results = coco_results(preds, "refined", image_ids)
        row = {"checkpoint": path.stem, "path": str(path), "epoch": info["epoch"], "boxes": s.get("boxes"),
               **_row(s.get("refined"), ap(results), s.get("mask_iou_refined"))}
        if several:
            f = out_dir / f"refined_{split}_{path.stem}.json"
            _write_json(f, results)
            row["refined_json"] = str(f)
        rows.append(row)
        score = row["mean_iou"] if row["mean_iou"] is not None else -1.0
        if best_row is None or score > (best_row["mean_iou"] if best_row["mean_iou"] is not None else -1.0):
            best_row, best_preds, best_results = row, preds, results
        del refiner

    if not rows:
        reasons = "; ".join(r for _, r in skipped)
        raise EvaluateError(f"no checkpoint evaluated ({len(skipped)} skipped): {reasons}")

    assert best_row is not None and best_preds is not None and base_preds is not None
    files: dict[str, Path] = {"eval_boxes": boxes_path}
    files["refined"] = out_dir / f"refined_{split}.json"
    _write_json(files["refined"], best_results)
    files["iou_hist"] = out_dir / "iou_hist.png"
    plot_iou_hist(base_preds, best_preds, best_row["checkpoint"], files["iou_hist"])
    if vis:
        from evaluate.vis import draw_overlays  # the only image access of this stage

        def gt_of(p: ImagePrediction) -> np.ndarray:
            """Every non-crowd GT box of the image (xyxy, original px), from the store."""
            n = int(ds.records[p.row][F["n_instances"]])
            gb = np.asarray(sp.array("gt_boxes")[p.row, :n], np.float32).reshape(-1, 4)
            crowd = np.asarray(sp.array("gt_info")[p.row, :n]).reshape(-1, 3)[:, 2] != 0
            return gb[~crowd]

        vis_paths = draw_overlays(cfg.data.splits[split].images, cfg.data.splits[split].annotations, best_preds,
                                  gt_of, out_dir / "vis", ec.vis_count, split, best_row["checkpoint"])
        for i, v in enumerate(vis_paths):
            files[f"vis_{i}"] = v

    res = EvalResult(out_dir, split, rows, baselines, skipped, best_row["checkpoint"], boxes_path, source, files,
                     {k: summary.get(k) for k in ("images", "boxes", "unmatched")})
    doc = {"split": split, "store": cfg.store.path, "eval_boxes": {"path": str(boxes_path), "source": source},
           **res.summary, "ap": ap.reason or "pycocotools COCOeval bbox on the evaluated images",
           "baselines": baselines, "checkpoints": rows, "best": res.best,
           "skipped": [{"path": p, "reason": r} for p, r in skipped],
           "amp": str(amp).removeprefix("torch.") if amp else None, "device": str(device),
           "seconds": time.perf_counter() - t0}
    files["metrics_json"] = out_dir / "metrics.json"
    _write_json(files["metrics_json"], doc)
    files["metrics_csv"] = out_dir / "metrics.csv"
    _write_csv(files["metrics_csv"], rows, baselines)
    print_table(res)
    return res

