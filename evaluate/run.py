"""Score one checkpoint or a whole run folder on the cached ground truth.

Everything comes from the feature store (features, GT boxes and GT masks already in SAM's low-res
frame), the small annotation JSON (for COCO AP) and the fixed evaluation boxes; images are opened
only by ``--vis`` (``evaluate/vis.py``), and the HQ-SAM image encoder is never built.

Outputs, in ``<run folder>/eval/``: ``report.html`` (``evaluate/outputs.py``: the page a reviewer
opens), ``metrics.json`` / ``metrics.csv`` (one row per distinct checkpoint, with the names of the files
holding the same bytes, the baselines beside them; each split by object size and coarse-IoU band),
``refined_<split>.json`` (COCO results of the best checkpoint; with several checkpoints also
``refined_<split>_<stem>.json`` each), ``eval_boxes_<split>.json`` (the fixed coarse boxes, reused by
every later run into the same folder), ``iou_hist.png`` and, with ``--vis``, ``vis/*.png`` (an earlier
run's ``vis/`` is removed first).

Prediction and metrics are ``boxrefine.shared.scoring.predict`` / ``summarize``, the code train's
periodic evaluation runs. The baselines (coarse boxes, HQ-SAM zero-shot boxes, coarse-prompt mask
IoU) do not depend on the checkpoint and are computed once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from boxrefine.evaluate.breakdown import MatchedBoxes
from boxrefine.evaluate.checkpoints import (  # noqa: F401  (natural_key: part of this module's API)
    EvaluateError,
    load_refiner,
    natural_key,
    resolve_checkpoints,
    unique_checkpoints,
)
from boxrefine.evaluate.noise import robustness_curve
from boxrefine.evaluate.outputs import clear_vis, write_figures_and_report
from boxrefine.evaluate.report import APScorer, EvalResult, coco_results, metric_row, print_table, write_csv
from boxrefine.shared.config import PipelineConfig
from boxrefine.shared.model.checkpoint import CheckpointFileError
from boxrefine.shared.model.sam import build_sam_heads
from boxrefine.shared.runtime.console import console, progress
from boxrefine.shared.runtime.device import inference_precision, resolve_device
from boxrefine.shared.runtime.fileio import atomic_write_json
from boxrefine.shared.scoring.coarse import CoarseBoxes, SavedBoxesError, fixed_coarse_boxes
from boxrefine.shared.scoring.predict import ImagePrediction, predict, summarize
from boxrefine.shared.store.feature_store import open_checked_store
from boxrefine.shared.store.rows import StoreRows


def amp_dtype(cfg: PipelineConfig, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for evaluation: the training rule (``train.amp`` / ``train.amp_dtype``, via
    ``amp_setting``), without the GradScaler (nothing is trained here)."""
    precision = inference_precision(cfg.train.amp, cfg.train.amp_dtype, device)
    if precision.dtype is not None or precision.requested:
        console.print(f"amp: {precision.why}", markup=False)
    return precision.dtype


def eval_boxes(cfg: PipelineConfig, split: str, ds: StoreRows, path: Path) -> tuple[dict[int, CoarseBoxes], str]:
    """The fixed evaluation boxes (``fixed_coarse_boxes``: read back from ``path`` when it exists)."""
    existed = path.exists()
    try:
        boxes = fixed_coarse_boxes(cfg, split, ds, path)
    except SavedBoxesError as e:  # the saved file is the problem (a bad detections file names itself)
        raise EvaluateError(str(e)) from None
    meta = json.loads(path.read_text())
    meta.pop("images", None)
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
            console.print(f"note: reusing the saved evaluation boxes {path} ({source}, seed {meta.get('seed')}, "
                          f"jitter {meta.get('jitter')}), which differ from what the config would draw now; "
                          "delete the file to draw new ones", style="yellow", markup=False)
    return boxes, source


class Evaluator:
    """One evaluation: ``setup`` (split, checkpoints, store, fixed boxes), then per checkpoint
    ``score``, the baselines computed once before the first, then ``finish`` writes the outputs."""

    def __init__(self, cfg: PipelineConfig, checkpoint: Path | None = None, split: str | None = None,
                 vis: bool | None = None):
        self.cfg, self.eval_cfg = cfg, cfg.evaluate
        self.vis = self.eval_cfg.vis if vis is None else vis
        self.split = split or cfg.eval_split()
        self.checkpoint = checkpoint
        self.rows: list[dict[str, Any]] = []
        self.skipped: list[tuple[str, str]] = []
        self.heads: Any = None
        self.base_preds: list[ImagePrediction] | None = None
        self.baselines: dict[str, dict[str, Any]] = {}
        self.summary: dict[str, Any] = {}
        self.best: tuple[dict[str, Any], list[ImagePrediction], list[dict[str, Any]], Any] | None = None

    def setup(self) -> Evaluator:
        cfg, split = self.cfg, self.split
        if split is None:
            raise EvaluateError("no evaluation split: set evaluate.split (or --split), train.val_split, or add a "
                                "split named 'val' to data.splits")
        if split not in cfg.data.splits:
            raise EvaluateError(f"split {split!r} is not in data.splits {sorted(cfg.data.splits)}")
        files, self.out_dir = resolve_checkpoints(cfg, self.checkpoint)
        self.paths = unique_checkpoints(files)  # byte-identical files (best.pt = last.pt = epoch_NNN.pt) once
        self.store = open_checked_store(cfg, (split,))
        # refuses a split without usable rows; damaged rows follow store.on_damage
        self.ds = StoreRows.from_store(cfg.store.path, split, with_masks=True, on_damage=cfg.store.on_damage)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.boxes_path = self.out_dir / f"eval_boxes_{split}.json"
        self.coarse, self.source = eval_boxes(cfg, split, self.ds, self.boxes_path)
        ids = self.store.split(split).image_ids()
        self.image_ids = {int(self.ds.keys[i]): int(ids[i]) for i in self.ds.rows}
        n_boxes = sum(len(b) for b in self.coarse.values())
        same = len(files) - len(self.paths)
        console.print(f"evaluate: split {split}, {len(self.ds)} images, {n_boxes} boxes ({self.source}), "
                      f"{len(self.paths)} checkpoint(s)" + (f" ({len(files)} files, {same} identical to another)"
                                                            if same else "") + f" → {self.out_dir}", markup=False)
        self.device = resolve_device(cfg.model.device)
        self.amp = amp_dtype(cfg, self.device)
        self.ap = APScorer(cfg, split, self.source, sorted(self.image_ids.values()))
        return self

    def _predict(self, desc: str, coarse: dict[int, CoarseBoxes] | None = None, **kw: Any) -> list[ImagePrediction]:
        """``predict`` over the split (the fixed evaluation boxes unless ``coarse`` is given)."""
        boxes = self.coarse if coarse is None else coarse
        with progress(desc, len(self.ds)) as bar:
            preds = predict(self.ds, boxes, self.device, heads=self.heads, amp_dtype=self.amp,
                            batch_images=self.eval_cfg.batch_images, num_workers=self.cfg.train.num_workers,
                            on_batch=bar.advance, **kw)
        if self.ds.skipped:  # damaged rows left out (store.on_damage: skip): AP is scored without them
            left_out = {int(self.ds.keys[i]) for i in self.ds.skipped}
            self.ap.image_ids = sorted(v for k, v in self.image_ids.items() if k not in left_out)
            preds = [p for p in preds if p.row not in self.ds.skipped]
        return preds

    def _baselines(self) -> None:
        """Coarse boxes, zero-shot boxes and the coarse-prompt mask IoU: once, before the first checkpoint."""
        cfg = self.cfg
        self.heads = build_sam_heads(cfg.model.type, cfg.model.checkpoint, cfg.model.seed, self.device)
        self.base_preds = self._predict("baselines", refiner=None, zero_shot=True, masks=True)
        s = self.summary = summarize(self.base_preds)
        self.matched = MatchedBoxes.of(self.base_preds, self.ds, cfg.data.splits[self.split].annotations)
        m = self.matched
        for name, ious, mask in (("coarse", m.coarse_iou, s.get("mask_iou_coarse")),
                                 ("zero_shot", m.zero_shot_iou, None)):
            ap = self.ap(coco_results(self.base_preds, name, self.image_ids))
            self.baselines[name] = {**metric_row(s.get(name), ap, mask), **m.split(ious, ap)}

    def score(self, path: Path, aliases: list[str] | None = None) -> None:
        """Score one checkpoint (``aliases``: the other files holding it); one that cannot be evaluated
        here is reported and skipped."""
        try:
            refiner, info = load_refiner(path, self.store, self.device)
        except CheckpointFileError as e:
            self.skipped.append((str(path), str(e)))
            console.print(f"skipped {e}", style="yellow", markup=False)
            return
        if self.base_preds is None:
            self._baselines()
        preds = self._predict(path.stem, refiner=refiner, masks=True, coarse_masks=False,
                              loss_weights=(self.cfg.train.l1_weight, self.cfg.train.giou_weight))
        s = summarize(preds)
        results = coco_results(preds, "refined", self.image_ids)
        ap = self.ap(results)
        row = {"checkpoint": path.stem, "path": str(path), "aliases": aliases or [], "epoch": info["epoch"],
               "boxes": s.get("boxes"), **metric_row(s.get("refined"), ap, s.get("mask_iou_refined")),
               **self.matched.split(self.matched.refined_iou(preds), ap)}
        if len(self.paths) > 1:
            f = self.out_dir / f"refined_{self.split}_{path.stem}.json"
            atomic_write_json(f, results, indent=1)
            row["refined_json"] = str(f)
        self.rows.append(row)
        score = row["mean_iou"] if row["mean_iou"] is not None else -1.0
        if self.best is None or score > (self.best[0]["mean_iou"] if self.best[0]["mean_iou"] is not None else -1.0):
            self.best = (row, preds, results, refiner)

    def finish(self, seconds: float) -> EvalResult:
        if not self.rows:
            reasons = "; ".join(r for _, r in self.skipped)
            raise EvaluateError(f"no checkpoint evaluated ({len(self.skipped)} skipped): {reasons}")
        assert self.best is not None and self.base_preds is not None
        best_row, best_preds, best_results, best_refiner = self.best
        out, split = self.out_dir, self.split
        files: dict[str, Path] = {"eval_boxes": self.boxes_path, "refined": out / f"refined_{split}.json",
                                  "iou_hist": out / "iou_hist.png", "metrics_json": out / "metrics.json",
                                  "metrics_csv": out / "metrics.csv", "report": out / "report.html"}
        atomic_write_json(files["refined"], best_results, indent=1)
        clear_vis(out / "vis")  # an earlier run's overlays never sit beside these metrics
        if self.vis:
            for i, v in enumerate(self._draw(best_preds, best_row["checkpoint"])):
                files[f"vis_{i}"] = v
        res = EvalResult(out, split, self.rows, self.baselines, self.skipped, best_row["checkpoint"],
                         self.boxes_path, self.source, files,
                         {k: self.summary.get(k) for k in ("images", "boxes", "unmatched")})
        doc = {"split": split, "store": self.cfg.store.path,
               "eval_boxes": {"path": str(self.boxes_path), "source": self.source}, **res.summary,
               "ap": self.ap.reason or "pycocotools COCOeval bbox on the evaluated images",
               "baselines": self.baselines, "checkpoints": self.rows, "best": res.best,
               "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
               "noise": self._robustness(best_refiner),
               "amp": str(self.amp).removeprefix("torch.") if self.amp else None, "device": str(self.device),
               "seconds": seconds}
        atomic_write_json(files["metrics_json"], doc, indent=1)
        write_csv(files["metrics_csv"], self.rows, self.baselines)
        split_cfg = self.cfg.data.splits[split]
        write_figures_and_report(doc, files, self.matched, best_preds, self.ds,
                                 split_cfg.images, split_cfg.annotations, self.eval_cfg.gallery,
                                 self.cfg.data.intensity.mapping())
        print_table(res)
        return res

    def _robustness(self, refiner: Any) -> list[dict[str, Any]]:
        """``evaluate.noise``: the best checkpoint on GT jittered at each level (``evaluate/noise.py``)."""
        if not self.eval_cfg.noise:
            return []
        return robustness_curve(self.eval_cfg.noise, self.ds, self.eval_cfg.seed, refiner,
                                lambda coarse, **kw: self._predict("noise", coarse=coarse, **kw))

    def _draw(self, preds: list[ImagePrediction], label: str) -> list[Path]:
        from boxrefine.evaluate.vis import draw_overlays  # the only image access of this stage

        def gt_of(p: ImagePrediction) -> np.ndarray:
            """Every non-crowd GT box of the image (xyxy, original px), from the store."""
            _, boxes, info = self.ds.read_gt(p.row)
            return boxes[info[:, 2] == 0]

        split_cfg = self.cfg.data.splits[self.split]
        return draw_overlays(split_cfg.images, split_cfg.annotations, preds, gt_of, self.out_dir / "vis",
                             self.eval_cfg.vis_count,
                             self.split, label, self.cfg.data.intensity.mapping())


def run_evaluate(cfg: PipelineConfig, checkpoint: Path | None = None, split: str | None = None,
                 vis: bool | None = None) -> EvalResult:
    """Evaluate ``checkpoint`` (a file or a folder; default: best.pt of the latest run) on ``split``."""
    t0 = time.perf_counter()
    ev = Evaluator(cfg, checkpoint, split, vis).setup()
    for path, aliases in ev.paths:
        ev.score(path, aliases)
    return ev.finish(time.perf_counter() - t0)
