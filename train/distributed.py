"""DDP for the training recipe: what makes W ranks train as one process with the same global batch.

* Each rank computes the loss of its part of the step (``train/data.py``); :func:`step_totals` sums
  box counts and loss sums over the ranks in one all-reduce, so every rank knows the step's global
  mean loss (what one process logs) and its own share of the boxes.
* The rank backpropagates ``loss × W·n_rank / N`` (:func:`rank_weight`): DDP averages gradients over
  the W ranks, so the sum is the gradient of the global mean over all N boxes, exactly what one
  process computes, also when the ranks hold different numbers of boxes.
* A rank with no boxes in a step still runs DDP's forward, on a zero loss that reaches every parameter
  (:func:`idle_loss`), before the step's all-reduce like the other ranks (DDP's forward may itself talk
  to the other ranks: the collectives must come in the same order everywhere), and its backward when
  the others train (DDP's gradient all-reduce needs every rank). A step with no boxes on any rank is
  skipped by all, as one process skips it.
* Validation is sharded (every W-th image per rank) and the predictions are gathered on rank 0 in
  one-process order (:func:`gather_in_order`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from boxrefine.shared.runtime.device import autocast_context
from boxrefine.shared.runtime.distributed import ProcessGroup

T = TypeVar("T")


def wrap_ddp(module: nn.Module, device: torch.device, pg: ProcessGroup) -> nn.Module:
    """``module`` under DDP when there are several ranks (the head has no BatchNorm: no buffers to sync)."""
    if not pg.active:
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False)


@dataclass
class StepTotals:
    """One step over all ranks: box and image counts, and the mean loss terms over all its boxes."""

    boxes: int
    images: int
    loss: float
    l1: float
    giou: float


def step_totals(pg: ProcessGroup, loss: torch.Tensor | None, terms: dict[str, float], boxes: int,
                images: int) -> StepTotals:
    """Sum this rank's part of a step with the other ranks' parts (one all-reduce)."""
    mean = (float(loss.detach()), terms["l1"], terms["giou"]) if loss is not None else (0.0, 0.0, 0.0)
    n, n_img, s_loss, s_l1, s_giou = pg.all_sum([boxes, images, *(boxes * v for v in mean)])
    n_boxes = round(n)
    if n_boxes == 0:
        return StepTotals(0, round(n_img), 0.0, 0.0, 0.0)
    if not pg.active:  # one process: its own values, untouched by the multiply/divide round trip
        return StepTotals(n_boxes, round(n_img), *mean)
    return StepTotals(n_boxes, round(n_img), s_loss / n, s_l1 / n, s_giou / n)


def rank_weight(pg: ProcessGroup, boxes: int, totals: StepTotals) -> float:
    """The factor on this rank's mean loss that turns DDP's gradient average into the global mean."""
    return 1.0 if not pg.active else pg.world * boxes / totals.boxes


def idle_loss(model: nn.Module, interm_channels: int, use_mask: bool, device: torch.device,
              amp_dtype: torch.dtype | None) -> torch.Tensor:
    """A zero loss through every parameter of the refiner ``model`` (one dummy box on zero features),
    for a rank with nothing to train on in a step."""
    emb = torch.zeros(1, 256, 64, 64, device=device)
    interm = torch.zeros(1, 64, 64, interm_channels, device=device)
    box = torch.tensor([[0.0, 0.0, 64.0, 64.0]], device=device)
    logits = torch.zeros(1, 1, 256, 256, device=device) if use_mask else None
    with autocast_context(device, amp_dtype):
        out = model(emb, interm, [box], logits)
    return out.float().sum() * 0.0


def gather_in_order(pg: ProcessGroup, part: list[T]) -> list[T] | None:
    """Every rank's part on rank 0, back in one-process order, when rank r holds items r, r+W, ...
    (None on the other ranks)."""
    parts = pg.gather(part)
    if parts is None:
        return None
    out: list[T] = [None] * sum(len(p) for p in parts)  # type: ignore[list-item]
    for r, p in enumerate(parts):
        out[r::pg.world] = p
    return out
