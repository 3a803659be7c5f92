"""What one training step computes: the coarse boxes drawn for an image, and the loss of a batch.

Every random draw comes from a generator seeded by (seed, epoch, row key), never from global RNG
state, so a step gives the same boxes whatever ran before it (resume, DataLoader workers, ranks).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from boxrefine.shared.config import TrainConfig
from boxrefine.shared.geometry.boxes import jitter_boxes, trainable_gt
from boxrefine.shared.geometry.frames import ImageGeometry
from boxrefine.shared.model.refiner import BoxRefiner, refine_loss
from boxrefine.shared.runtime.device import autocast_context
from boxrefine.shared.scoring.coarse import detection_pairs


def seeded_generator(*parts: int) -> torch.Generator:
    """A torch generator seeded by a hash of ``parts`` (e.g. seed, epoch, row key)."""
    h = 0
    for p in parts:
        h = (h * 0x100000001B3 + int(p) + 0x9E3779B97F4A7C15) % (2**63 - 1)
    return torch.Generator().manual_seed(h)


def training_boxes(gt_boxes: torch.Tensor, gt_info: torch.Tensor, det: tuple[torch.Tensor, torch.Tensor] | None,
                   geometry: ImageGeometry, k: int, jitter: float, g: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` (coarse, target) pairs for one image (xyxy, original px): GT boxes jittered with the
    noisy-box model and, when given, real detector boxes matched to GT (half the draws each).
    Crowd GT and zero-size GT boxes are never targets."""
    valid = torch.nonzero(trainable_gt(gt_boxes, gt_info)).flatten()
    if len(valid) == 0:
        return torch.zeros((0, 4)), torch.zeros((0, 4))
    use_det = det is not None and len(det[0]) > 0
    pick_det = (torch.rand(k, generator=g) < 0.5) if use_det else torch.zeros(k, dtype=torch.bool)
    gt_idx = valid[torch.randint(len(valid), (k,), generator=g)]
    coarse = jitter_boxes(gt_boxes[gt_idx].float(), jitter, geometry.orig_hw, g)
    target = gt_boxes[gt_idx].float()
    if use_det and pick_det.any():
        assert det is not None
        j = torch.randint(len(det[0]), (int(pick_det.sum()),), generator=g)
        coarse[pick_det] = det[0][j]
        target[pick_det] = gt_boxes[det[1][j]].float()
    return coarse, target


def lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        done = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
    return f


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   sched: torch.optim.lr_scheduler.LRScheduler, params: Iterable[torch.Tensor],
                   grad_clip: float | None) -> bool:
    """Backward, clip, step and schedule; True when the GradScaler skipped the step (float16: an inf/NaN
    gradient leaves the weights as they were and halves the scale). The learning rate follows the step
    count, skipped steps included."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scale = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(opt)
    scaler.update()
    with warnings.catch_warnings():  # torch warns when the first step was skipped: expected with float16
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
        sched.step()
    return scale is not None and scaler.get_scale() < scale


def batch_loss(batch: dict[str, Any], refiner: BoxRefiner, heads: Any, device: torch.device,
               amp_dtype: torch.dtype | None, train_cfg: TrainConfig,
               det_pairs: dict[int, tuple[torch.Tensor, torch.Tensor]], epoch: int
               ) -> tuple[torch.Tensor | None, dict[str, float], int]:
    """Loss of one batch of store rows (features stacked by ``collate_rows``): draw this epoch's
    coarse boxes per image, run the frozen HQ-SAM heads on them (no grad), then the refiner.
    Returns (loss or None when the batch has no boxes, loss terms, number of boxes)."""
    emb = batch["image_embeddings"].to(device, non_blocking=True).float()
    interm = batch["interm_embeddings"].to(device, non_blocking=True).float()
    coarse_in, target_in = [], []
    for b, row in enumerate(batch["row"]):
        g = seeded_generator(train_cfg.seed, epoch, batch["key"][b])
        c, t = training_boxes(batch["gt_boxes"][b], batch["gt_info"][b], det_pairs.get(row),
                              batch["geometry"][b], train_cfg.boxes_per_image, train_cfg.jitter, g)
        coarse_in.append(batch["geometry"][b].boxes_to_input(c).to(device))
        target_in.append(batch["geometry"][b].boxes_to_input(t).to(device))
    n_boxes = int(sum(len(c) for c in coarse_in))
    if n_boxes == 0:
        return None, {}, 0
    logits = None
    if heads is not None:  # the boxes of every image in one decoder call, logits only where the refiner reads
        boxes = torch.cat(coarse_in)
        image_index = torch.cat([torch.full((len(c),), b) for b, c in enumerate(coarse_in)])
        with torch.inference_mode(), autocast_context(device, amp_dtype):
            regions = getattr(refiner, "module", refiner).mask_regions(boxes)  # the head itself under DDP
            lg, _ = heads(emb, interm, boxes, image_index, regions)
        logits = lg.float().clone()  # a normal tensor again (autograd refuses inference tensors)
    with autocast_context(device, amp_dtype):
        refined = refiner(emb, interm, coarse_in, logits,  # the head's dropout: seeded per image, as its boxes
                          generators=[seeded_generator(train_cfg.seed, epoch, 0xD409, k) for k in batch["key"]])
    loss, terms = refine_loss(refined.float(), torch.cat(target_in), torch.cat(coarse_in),
                              train_cfg.l1_weight, train_cfg.giou_weight)
    return loss, terms, n_boxes


def gt_targets(dataset: Any, rows: list[int], image_ids: Any, dets: dict[int, list[Any]] | None, match_iou: float,
               pairs: dict[int, Any]) -> list[int]:
    """Read the GT of store ``rows`` once: fill ``pairs[row]`` with the detections matched to its GT
    (None without detections) and return the annotation ids of its non-crowd zero-size GT boxes (never
    targets). Rows whose GT is damaged and left out (``store.on_damage: skip``) get no entry."""
    zero_size: list[int] = []
    for i in rows:
        gt = dataset.read_gt(i)
        if gt is None:
            continue
        boxes, info = torch.from_numpy(gt[1]), torch.from_numpy(gt[2])
        zero_size += info[(info[:, 2] == 0) & ~trainable_gt(boxes, info), 0].tolist()
        pairs[i] = detection_pairs(dets.get(int(image_ids[i]), []), boxes, info, match_iou) if dets is not None \
            else None
    return zero_size
