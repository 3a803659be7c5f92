"""Run the refiner (and the frozen HQ-SAM heads) over store rows and score the result.

One implementation, called by train's periodic evaluation and by the evaluate stage. Everything is
computed from the store: boxes against cached GT boxes, masks against GT masks that extract already
resized into SAM's low-res frame — nothing is resized here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as nnf
from torch.utils.data import DataLoader

from boxrefine.shared.geometry.frames import ImageGeometry
from boxrefine.shared.model.hq_decoder import Region
from boxrefine.shared.model.refiner import BoxRefiner, refine_loss
from boxrefine.shared.model.sam import SamHeads
from boxrefine.shared.runtime.device import autocast_context
from boxrefine.shared.runtime.workers import worker_context, worker_init
from boxrefine.shared.scoring.coarse import CoarseBoxes
from boxrefine.shared.scoring.metrics import box_metrics, mask_iou
from boxrefine.shared.store.rows import StoreRows, collate_rows


@dataclass
class ImagePrediction:
    """All boxes xyxy in original pixels; ``gt`` is NaN where a coarse box matches no GT."""

    row: int
    key: int
    coarse: torch.Tensor
    gt: torch.Tensor
    gt_index: torch.Tensor
    scores: torch.Tensor
    category_id: torch.Tensor
    refined: torch.Tensor | None = None
    zero_shot: torch.Tensor | None = None
    mask_iou_coarse: torch.Tensor | None = None
    mask_iou_refined: torch.Tensor | None = None
    loss_terms: dict[str, float] = field(default_factory=dict)


def box_prompt_logits(heads: SamHeads, emb: torch.Tensor, interm: torch.Tensor, boxes_in: torch.Tensor,
                      device: torch.device, amp_dtype: torch.dtype | None,
                      regions: Sequence[Region] | None = None) -> torch.Tensor:
    """HQ-SAM's low-res mask logits (n×1×256×256, float32) for box prompts (n×4, input px) on ONE
    image (``emb`` 1×256×64×64, ``interm`` 1×64×64×C); ``regions``: per box the low-res pixels
    needed (``BoxRefiner.mask_regions``; 0 elsewhere), None = whole masks."""
    with autocast_context(device, amp_dtype):
        logits, _ = heads(emb, interm, boxes_in, regions=regions)
    return logits.float()


def apply_refiner(refiner: BoxRefiner, emb: torch.Tensor, interm: torch.Tensor, boxes_in: list[torch.Tensor],
                  logits: list[torch.Tensor | None], device: torch.device, amp_dtype: torch.dtype | None
                  ) -> torch.Tensor:
    """Refined boxes (Σn×4, input px, float32) of a batch of images: ``boxes_in`` and ``logits`` (the
    box prompts' mask logits, None for an image without boxes) per image. Evaluate and
    ``boxrefine.shared.predictor`` both run this, so the two give the same boxes."""
    mask_in = None
    if refiner.use_mask:
        parts = [lg for lg in logits if lg is not None]
        mask_in = torch.cat(parts) if parts else None
    with autocast_context(device, amp_dtype):
        refined = refiner(emb, interm, boxes_in, mask_in)
    return refined.float()


@torch.no_grad()
def predict(dataset: StoreRows, coarse: dict[int, CoarseBoxes], device: torch.device, *,
            refiner: BoxRefiner | None, heads: SamHeads | None, amp_dtype: torch.dtype | None = None,
            batch_images: int = 2, num_workers: int = 0, zero_shot: bool = False, masks: bool = False,
            coarse_masks: bool | None = None, loss_weights: tuple[float, float] = (1.0, 1.0),
            on_batch: Callable[[int], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> list[ImagePrediction]:
    """Coarse boxes (keyed by row key) → refined / zero-shot boxes and mask IoUs, per image.

    ``heads`` (frozen prompt encoder + HQ decoder) is needed when the refiner uses mask logits, for
    ``zero_shot`` (box of HQ-SAM's mask from the coarse prompt) and for ``masks`` (mask IoU).
    ``coarse_masks`` (default: ``masks``) says whether to score the coarse-prompt mask too; it does
    not depend on the refiner, so evaluate computes it once and passes False per checkpoint.
    Images without coarse boxes get empty tensors, never None, so they do not hide a metric.
    ``on_batch`` hears how many rows each batch took; ``should_stop`` is asked after every batch, and
    when it says yes, what is done so far is returned.
    """
    run = _Prediction(coarse, device, refiner, heads, amp_dtype, zero_shot, masks,
                      masks if coarse_masks is None else coarse_masks, loss_weights)
    loader = DataLoader(dataset, batch_size=batch_images, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_rows, pin_memory=device.type == "cuda", worker_init_fn=worker_init(),
                        multiprocessing_context=worker_context(dataset.store_path, num_workers))
    out: list[ImagePrediction] = []
    if refiner is not None:
        refiner.eval()
    for raw in loader:
        n_seen = len(raw["row"]) + len(raw.get("damaged", [])) + len(raw.get("busy", []))
        batch = dataset.accept(raw)  # damaged rows: stop, or left out (store.on_damage)
        if batch is not None:
            out.extend(run.batch(batch))
        if on_batch is not None:
            on_batch(n_seen)
        if batch is not None and should_stop is not None and should_stop():
            break
    return out


@dataclass
class _Prediction:
    """What :func:`predict` computes for a batch of rows."""

    coarse: dict[int, CoarseBoxes]
    device: torch.device
    refiner: BoxRefiner | None
    heads: SamHeads | None
    amp_dtype: torch.dtype | None
    zero_shot: bool
    masks: bool
    coarse_masks: bool
    loss_weights: tuple[float, float]

    def batch(self, batch: dict[str, Any]) -> list[ImagePrediction]:
        emb = batch["image_embeddings"].to(self.device, non_blocking=True).float()
        interm = batch["interm_embeddings"].to(self.device, non_blocking=True).float()
        images = [self._image(batch, b, emb, interm) for b in range(len(batch["row"]))]
        preds = [p for p, _, _ in images]
        if self.refiner is not None:
            boxes_in, logits = [x for _, x, _ in images], [x for _, _, x in images]
            refined = apply_refiner(self.refiner, emb, interm, boxes_in, logits, self.device, self.amp_dtype)
            start = 0
            for b, p in enumerate(preds):
                self._refined(batch, b, p, refined[start:start + len(p.coarse)], boxes_in[b], emb, interm)
                start += len(p.coarse)
        return preds

    def _image(self, batch: dict[str, Any], b: int, emb: torch.Tensor, interm: torch.Tensor
               ) -> tuple[ImagePrediction, torch.Tensor, torch.Tensor | None]:
        """Image ``b``'s prediction with its baselines, its boxes in the input frame and, where anything
        reads them, the mask logits of its coarse boxes."""
        cb, geo = self.coarse[batch["key"][b]], batch["geometry"][b]
        gt = torch.full((len(cb), 4), float("nan"))
        matched = cb.gt_index >= 0
        gt[matched] = batch["gt_boxes"][b][cb.gt_index[matched]]
        p = ImagePrediction(batch["row"][b], batch["key"][b], cb.boxes, gt, cb.gt_index, cb.scores, cb.category_id)
        box_in = geo.boxes_to_input(cb.boxes).to(self.device)
        if self.heads is None:
            return p, box_in, None
        if not len(cb):
            p.zero_shot = torch.zeros((0, 4)) if self.zero_shot else None
            p.mask_iou_coarse = torch.zeros(0) if self.coarse_masks else None
            return p, box_in, None
        whole = self.zero_shot or self.coarse_masks
        if not whole and not (self.refiner is not None and self.refiner.use_mask):
            return p, box_in, None
        # only the refiner reads them: compute the logits where it reads them
        regions = None if whole else self.refiner.mask_regions(box_in)  # type: ignore[union-attr]
        logits = box_prompt_logits(self.heads, emb[b:b + 1], interm[b:b + 1], box_in, self.device, self.amp_dtype,
                                   regions)
        if self.zero_shot:
            p.zero_shot = geo.clip_original(geo.lowres_to_boxes(logits[:, 0], cb.boxes.to(self.device)).cpu())
        if self.coarse_masks:
            p.mask_iou_coarse = _mask_iou(logits, batch["gt_masks"][b], cb.gt_index, geo)
        return p, box_in, logits

    def _refined(self, batch: dict[str, Any], b: int, p: ImagePrediction, r_in: torch.Tensor, box_in: torch.Tensor,
                 emb: torch.Tensor, interm: torch.Tensor) -> None:
        """Fill ``p`` from image ``b``'s refined boxes ``r_in`` (input frame): the boxes, the loss terms
        on its matched boxes and, with ``masks``, the refined boxes' mask IoU."""
        geo = batch["geometry"][b]
        p.refined = geo.clip_original(geo.boxes_to_original(r_in).cpu())
        ok = p.gt_index >= 0
        if ok.any():
            tgt_in = geo.boxes_to_input(p.gt[ok]).to(self.device)
            dev_ok = ok.to(self.device)
            _, terms = refine_loss(r_in[dev_ok], tgt_in, box_in[dev_ok], *self.loss_weights)
            p.loss_terms = {**terms, "n": int(ok.sum())}
        if self.masks and self.heads is not None:
            if not len(r_in):
                p.mask_iou_refined = torch.zeros(0)
                return
            lg = box_prompt_logits(self.heads, emb[b:b + 1], interm[b:b + 1], r_in, self.device, self.amp_dtype)
            p.mask_iou_refined = _mask_iou(lg, batch["gt_masks"][b], p.gt_index, geo)


def _mask_iou(logits: torch.Tensor, gt_masks: torch.Tensor, gt_index: torch.Tensor, geo: ImageGeometry
              ) -> torch.Tensor:
    """IoU of each box's predicted low-res mask (``logits > 0``) with its GT mask (NaN when
    unmatched), both cropped to the image's valid low-res region first: what the mask decoder says
    about the padding is outside the image and never scored. GT masks are stored at the evaluation
    resolution; predictions are resized to it only when ``store.gt_mask_size`` is not 256."""
    out = torch.full((len(gt_index),), float("nan"))
    ok = gt_index >= 0
    if not ok.any():
        return out
    pred = logits[ok.to(logits.device), 0] > 0
    gt = gt_masks[gt_index[ok]].to(pred.device).bool()
    if gt.shape[-1] != pred.shape[-1]:
        pred = nnf.interpolate(pred[:, None].float(), size=gt.shape[-2:], mode="nearest")[:, 0] > 0.5
    rows, cols = geo.lowres_valid_at(gt.shape[-1])
    out[ok] = mask_iou(pred[..., :rows, :cols], gt[..., :rows, :cols]).cpu()
    return out


def summarize(preds: list[ImagePrediction]) -> dict[str, Any]:
    """Metrics over all matched boxes, side by side on the same boxes."""
    def cat(attr: str) -> torch.Tensor | None:
        parts = [getattr(p, attr) for p in preds]
        if any(x is None for x in parts) or not parts:
            return None
        return torch.cat(parts)

    coarse, gt = cat("coarse"), cat("gt")
    out: dict[str, Any] = {"images": len(preds)}
    if coarse is None or gt is None:
        return out
    ok = ~torch.isnan(gt).any(1)
    out["boxes"], out["unmatched"] = int(ok.sum()), int((~ok).sum())
    out["coarse"] = box_metrics(coarse[ok], gt[ok])
    for name in ("zero_shot", "refined"):
        v = cat(name)
        if v is not None:
            out[name] = box_metrics(v[ok], gt[ok])
    for name in ("mask_iou_coarse", "mask_iou_refined"):
        v = cat(name)
        if v is not None:
            out[name] = float(v[ok].mean()) if ok.any() else float("nan")
    terms = [p.loss_terms for p in preds if p.loss_terms]
    if terms:
        n = sum(t["n"] for t in terms)
        out["loss_l1"] = sum(t["l1"] * t["n"] for t in terms) / n
        out["loss_giou"] = sum(t["giou"] * t["n"] for t in terms) / n
    return out
