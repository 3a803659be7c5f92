"""``boxrefine refine``: a trained refiner applied to a detector's boxes on any images.

It lives in the extract stage because it opens images: the features of every image with boxes to
refine come from the store when they are there (same model, checkpoint, intensity mapping: the store
identity, else refused naming both values) and are computed and cached by the :class:`Extractor`
otherwise, so a second run over the same images does no encoder work. The refinement is
``shared/scoring/predictor.py``'s :class:`RefinePredictor` (the computation evaluate runs).

``RefineRun(cfg, ...).setup()`` checks the checkpoint against the config, reads the detections,
lays out the split and plans the encoder work for the images that need it; ``run()`` extracts,
refines in batches of ``refine.batch_images`` images, and writes a COCO results file atomically:
every input detection, in input order, with its score and extra fields kept, the refined box in
``bbox`` and the input box in ``bbox_coarse`` (``refined: false`` and a ``reason`` for a box passed
through: unknown or unreadable image, zero-size box, box outside its image, score below
``refine.min_score`` with ``refine.low_score: keep``).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

from boxrefine.extract.refine.inputs import (
    LOW_SCORE,
    UNKNOWN,
    UNREADABLE,
    ImageIndex,
    RefineDetection,
    apply_min_score,
    assign_images,
    check_output,
    load_detection_entries,
)
from boxrefine.extract.run import Extractor
from boxrefine.shared.config import PipelineConfig, SplitConfig
from boxrefine.shared.data.imageio import read_rgb
from boxrefine.shared.data.intensity import ImageError
from boxrefine.shared.data.overlay import COARSE_COLOUR, REFINED_COLOUR, draw_boxes, line_width, with_legend, write_png
from boxrefine.shared.data.records import DataError, ImageRecord, resolve_image
from boxrefine.shared.geometry.boxes import xyxy_to_xywh
from boxrefine.shared.model.runs import latest_checkpoint, run_best
from boxrefine.shared.model.weights import checkpoint_info
from boxrefine.shared.runtime.console import console, progress
from boxrefine.shared.runtime.device import inference_precision, resolve_device
from boxrefine.shared.runtime.fileio import atomic_write_json
from boxrefine.shared.scoring.predictor import ImageFeatures, RefineError, RefinePredictor
from boxrefine.shared.store.bad_images import bad_images
from boxrefine.shared.store.feature_store import open_store
from boxrefine.shared.store.identity import identity_for
from boxrefine.shared.store.rows import row_geometry
from boxrefine.shared.store.schema import FIELD, STATE_COMPLETE, STATE_NAMES
from boxrefine.shared.store.split import SplitStore, StoreDamage

MAX_REPORTED = 5  # per reason, the passed-through detections printed one by one


@dataclass
class RefineResult:
    out: Path
    split: str
    detections: int
    refined: int  # boxes refined
    images: int  # images whose boxes were refined
    passed: dict[str, int]  # boxes passed through unrefined, by reason
    dropped: int  # boxes below min_score left out (refine.low_score: drop)
    encoded: int  # images the encoder ran on
    wall_s: float
    refine_s: float  # the refinement alone (features read + HQ-SAM heads + refiner), without extract
    encoder_s: float = 0.0  # of the extraction before it, the image encoder's time
    vis: list[Path] = field(default_factory=list)

    @property
    def boxes_per_s(self) -> float:
        return self.refined / self.refine_s if self.refine_s > 0 else 0.0

    @property
    def images_per_s(self) -> float:
        return self.images / self.refine_s if self.refine_s > 0 else 0.0


def refiner_checkpoint(cfg: PipelineConfig, path: Path | None) -> Path:
    """The checkpoint refine applies: ``path`` (``--checkpoint``, else ``refine.checkpoint``; a file or
    a run folder, its best.pt), else best.pt of the latest run in ``train.runs_dir`` — the rule
    evaluate follows (``shared/model/runs.py``)."""
    path, how = latest_checkpoint(path if path is not None else cfg.refine.checkpoint, cfg.train.runs_dir)
    if how != "given":
        console.print(f"checkpoint: {path} ({how})", markup=False)
    if path.is_dir():
        return run_best(path)
    if not path.exists():
        raise RefineError(f"{path}: checkpoint not found")
    return path


def split_for(cfg: PipelineConfig, split: str | None, images: Path | None, coco: Path | None
              ) -> tuple[str, SplitConfig]:
    """The split to refine: a configured one, or a folder of images (with an optional COCO file
    listing them), cached in the store as ``refine-<folder>-<hash>`` unless a configured split has
    exactly that folder and annotation file."""
    if (split is None) == (images is None):
        raise RefineError("give either --split NAME (a split of data.splits) or --images FOLDER")
    if split is not None:
        if coco is not None:
            raise RefineError("--coco goes with --images, not with --split")
        if split not in cfg.data.splits:
            raise RefineError(f"split {split!r} is not in data.splits {sorted(cfg.data.splits)}")
        return split, cfg.data.splits[split]
    assert images is not None
    images, coco = images.resolve(), coco.resolve() if coco is not None else None
    for name, split_cfg in cfg.data.splits.items():
        annotations = split_cfg.annotations.resolve() if split_cfg.annotations else None
        if split_cfg.images.resolve() == images and annotations == coco:
            return name, split_cfg
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", images.name).strip("-")[:32] or "images"
    digest = hashlib.sha256(f"{images}|{coco or ''}".encode()).hexdigest()[:8]
    return f"refine-{slug}-{digest}", SplitConfig(images=images, annotations=coco)


class RefineRun:
    def __init__(self, cfg: PipelineConfig, checkpoint: Path | None = None, detections: Path | None = None,
                 out: Path | None = None, split: str | None = None, images: Path | None = None,
                 coco: Path | None = None, model: torch.nn.Module | None = None, announce: bool = True):
        self.cfg, self.refine_cfg = cfg, cfg.refine
        self.checkpoint = refiner_checkpoint(cfg, checkpoint)
        self.name, self.split_cfg = split_for(cfg, split, images, coco)
        self.detections_path = detections if detections is not None else self.split_cfg.detections
        if self.detections_path is None:
            raise RefineError(f"no detections: pass --detections (split {self.name!r} configures none)")
        self.out = out or self.detections_path.with_name(f"{self.detections_path.stem}.refined.json")
        check_output(self.out, {"detections file": self.detections_path, "refiner checkpoint": self.checkpoint,
                                "COCO file": self.split_cfg.annotations})
        self.model, self.announce = model, announce

    def setup(self) -> RefineRun:
        self.t0 = time.perf_counter()
        cfg = self.cfg
        device = resolve_device(cfg.model.device)
        wanted = identity_for(cfg, checkpoint_info(cfg.model.type, cfg.model.checkpoint, cfg.model.seed).fingerprint)
        precision = inference_precision(cfg.train.amp, cfg.train.amp_dtype, device)
        if precision.dtype is not None or precision.requested:
            console.print(f"amp: {precision.why}", markup=False)
        amp = precision.dtype
        self.predictor = RefinePredictor(self.checkpoint, cfg.model.checkpoint, device, amp, self.announce,
                                         expect=(wanted, "config"))
        self.dets = load_detection_entries(self.detections_path)
        console.print(f"refine: {len(self.dets)} detections from {self.detections_path}, checkpoint {self.checkpoint}, "
                      f"split {self.name} ({self.split_cfg.images})", markup=False)
        # all images bad is no error here: their detections are passed through, reported
        self.extractor = Extractor(self._extract_config(), self.model, self.announce, all_bad_is_error=False)
        self.extractor.setup()
        recs = self.extractor.records[self.name]
        unreadable = self.extractor.bad_images(self.name)
        images = [(r.image_id, r.file_name, r.key) for r in recs.images]
        images += [(rep["image_id"], rep["file"], key) for key, rep in unreadable.items()]
        source = f"{self.split_cfg.annotations or self.split_cfg.images}"
        self.records: dict[int, ImageRecord] = {r.key: r for r in recs.images}
        assign_images(self.dets, ImageIndex(images, self.split_cfg.annotations is None, source), self.records,
                      unreadable)
        unknown = [d for d in self.dets if d.status == UNKNOWN]
        if self.dets and len(unknown) == len(self.dets):
            ref = unknown[0].entry.get("image_id", unknown[0].entry.get("file_name"))
            raise RefineError(f"{self.detections_path}: none of the {len(self.dets)} detections names an image of "
                              f"{source} (e.g. {ref!r}); check --detections, --images and --coco")
        apply_min_score(self.dets, self.refine_cfg.min_score)
        self.extractor.restrict(self.name, {d.key for d in self.dets if d.status is None})
        return self

    def _extract_config(self) -> PipelineConfig:
        """The config extract runs with: this one split, all of its rows, never strict, never overwriting."""
        cfg = self.cfg.model_copy(deep=True)
        cfg.data.splits[self.name] = self.split_cfg
        cfg.extract.splits, cfg.extract.shard = [self.name], None
        cfg.extract.strict, cfg.extract.overwrite = False, False
        return cfg

    def run(self) -> RefineResult:
        todo = [d for d in self.dets if d.status is None]
        encoded, encoder_s = 0, 0.0
        if todo:
            extracted = self.extractor.run()
            encoded, encoder_s = extracted.encoded, extracted.encoder_s
            if self.extractor.model is not None:
                self.predictor.use_sam(self.extractor.model)  # HQ-SAM is built: its heads are the ones needed
        t_refine = time.perf_counter()
        images = self._refine(todo)
        refine_s = time.perf_counter() - t_refine
        keep = [d for d in self.dets if not (d.status == LOW_SCORE and self.refine_cfg.low_score == "drop")]
        try:
            atomic_write_json(self.out, [self._entry(d) for d in keep])
        except ValueError as e:  # a non-finite number in a field boxrefine does not read
            raise DataError(f"{self.detections_path}: cannot write the results as JSON ({e})") from None
        passed = Counter(d.status for d in keep if d.status is not None)
        res = RefineResult(self.out, self.name, len(self.dets), sum(d.status is None for d in self.dets), images,
                           dict(passed), len(self.dets) - len(keep), encoded, time.perf_counter() - self.t0, refine_s,
                           encoder_s)
        if self.refine_cfg.vis:
            res.vis = self._draw()
        self._report(res)
        return res

    def _refine(self, todo: list[RefineDetection]) -> int:
        """Refine the detections in ``todo`` (in place: ``extra``), a batch of images at a time in
        store-row order; returns the number of images refined."""
        if not todo:
            return 0
        split_store = open_store(self.cfg.store.path).split(self.name)
        rows, row_of = split_store.read_rows(), {int(k): i for i, k in enumerate(split_store.keys().tolist())}
        by_key: dict[int, list[RefineDetection]] = {}
        for d in todo:
            by_key.setdefault(int(d.key), []).append(d)
        reports = bad_images(split_store)
        for key in list(by_key):
            state = int(rows[row_of[key], FIELD["state"]])
            if state != STATE_COMPLETE:
                why = reports.get(key, {}).get("reason") or f"no features (store row {STATE_NAMES.get(state, state)})"
                for d in by_key.pop(key):
                    d.status, d.detail = UNREADABLE, why
        order = sorted(by_key, key=lambda k: row_of[k])
        n, done, boxes_done = self.refine_cfg.batch_images, 0, 0
        with progress("refine", len(order), unit="img") as bar:
            for start in range(0, len(order), n):
                chunk = order[start:start + n]
                feats = {k: f for k in chunk
                         if (f := self._features(split_store, row_of[k], rows[row_of[k]], by_key[k]))}
                refined = self.predictor.refine_features(
                    list(feats.values()), [torch.tensor([list(d.box) for d in by_key[k]], dtype=torch.float32)
                                           for k in feats])
                for (k, f), r in zip(feats.items(), refined, strict=True):
                    masks = self.predictor.masks(r, f) if self.refine_cfg.masks else None
                    for j, d in enumerate(by_key[k]):
                        d.extra["refined"] = r[j]
                        if masks is not None:
                            d.extra["segmentation"] = rle(masks[j])
                done, boxes_done = done + len(feats), boxes_done + sum(len(by_key[k]) for k in feats)
                bar.advance(len(chunk), postfix=f"{boxes_done} boxes")
        return done

    def _features(self, split_store: SplitStore, row: int, record: np.ndarray, dets: list[RefineDetection]
                  ) -> ImageFeatures | None:
        """A row's features, checked against its record. A row failing its checksums stops the run
        (``store.on_damage: error``) or has its detections passed through (``skip``)."""
        try:
            emb, interm = split_store.read_features(row, record=record)
        except StoreDamage as e:
            if self.cfg.store.on_damage == "error":
                raise
            for d in dets:
                d.status, d.detail = UNREADABLE, str(e)
            return None
        return ImageFeatures(emb, interm, row_geometry(record))

    def _entry(self, d: RefineDetection) -> dict[str, Any]:
        """The output entry of a detection: the input entry, its box refined (or why not)."""
        e = {**d.entry, "bbox_coarse": d.entry["bbox"]}
        if "refined" not in d.extra:
            e.update(refined=False, reason=d.detail)
            return e
        e["bbox"] = [round(v, 2) for v in xyxy_to_xywh(d.extra["refined"].float()).tolist()]
        e["refined"] = True
        if "segmentation" in d.extra:
            if "segmentation" in d.entry:
                e["segmentation_coarse"] = d.entry["segmentation"]
            e["segmentation"] = d.extra["segmentation"]
        return e

    def _draw(self) -> list[Path]:
        """Overlays of the first ``refine.vis_count`` images with refined boxes: detector boxes red,
        refined boxes blue, beside the output file (``<out stem>_vis/``)."""
        folder = self.out.with_name(f"{self.out.stem}_vis")
        keys = list(dict.fromkeys(int(d.key) for d in self.dets if "refined" in d.extra))[: self.refine_cfg.vis_count]
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for key in keys:
            rec = self.records[key]
            try:
                img = read_rgb(resolve_image(self.split_cfg.images, rec.file_name), self.cfg.data.intensity.mapping())
            except (ImageError, DataError) as e:
                console.print(f"--vis: {e}; skipped", style="yellow", markup=False)
                continue
            t = line_width(img.shape[:2])
            dets = [d for d in self.dets if d.key == key]
            draw_boxes(img, np.array([d.box for d in dets], np.float32), COARSE_COLOUR, 2 * t)
            draw_boxes(img, np.stack([d.extra["refined"].numpy() for d in dets if "refined" in d.extra]),
                       REFINED_COLOUR, t)
            img = with_legend(img, [("detector", COARSE_COLOUR), (f"refined ({self.checkpoint.name})", REFINED_COLOUR)])
            dst = folder / f"{rec.image_id}_{Path(rec.file_name).stem}.png"
            write_png(dst, img)
            written.append(dst)
        return written

    def _report(self, res: RefineResult) -> None:
        for status in res.passed:
            dets = [d for d in self.dets if d.status == status]
            for d in dets[:MAX_REPORTED]:
                ref = d.entry.get("image_id", d.entry.get("file_name"))
                console.print(f"not refined: [{d.index}] image {ref}: {d.detail}", style="yellow", markup=False)
            if len(dets) > MAX_REPORTED:
                console.print(f"not refined: ... and {len(dets) - MAX_REPORTED} more ({status})", style="yellow",
                              markup=False)
        passed = ", ".join(f"{n} {s}" for s, n in sorted(res.passed.items()))
        console.print(f"refine: {res.refined} of {res.detections} boxes refined on {res.images} images"
                      + (f"; passed through unrefined: {passed}" if passed else "")
                      + (f"; dropped below min_score {self.refine_cfg.min_score}: {res.dropped}" if res.dropped else "")
                      + f" → {res.out}", markup=False)
        if res.refined:
            console.print(f"{res.boxes_per_s:.1f} boxes/s, {res.images_per_s:.2f} img/s (refinement alone; "
                          f"{res.encoded} images encoded, {res.wall_s:.1f}s in all)", markup=False)
        for p in res.vis:
            console.print(f"vis: {p}", markup=False)


def rle(mask: np.ndarray) -> dict[str, Any]:
    """A binary H×W mask as COCO RLE with a text ``counts`` (JSON-ready), via pycocotools."""
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")}


def run_refine(cfg: PipelineConfig, **kw: Any) -> RefineResult:
    """Refine a detector's boxes as configured (see :class:`RefineRun` for the arguments)."""
    return RefineRun(cfg, **kw).setup().run()


__all__ = ["RefineRun", "RefineResult", "run_refine", "UNREADABLE", "UNKNOWN"]
