"""The trainable box refiner: corrections to the four sides of a coarse box from cached HQ-SAM
features (train fits it, evaluate and refine run it).

Per coarse box, in the 1024-px model-input frame, a head reads the image embedding (256 ch), the
early-layer HQ feature (C ch) and optionally the frozen HQ-SAM mask logits for that box prompt,
RoI-aligned with torchvision.ops (:class:`BoxRefiner`: the interface and the parts both heads share).
``refiner.head`` picks one (``shared/model/heads.py``, :func:`build_refiner`):

  * ``sides`` (default, :class:`~boxrefine.shared.model.side_head.SideRefiner`): per side a strip of
    features across the coarse side, reaching ``(context − 1) / 2`` box sizes inside and outside it; a
    shared conv trunk scores ``2·roi_size + 1`` positions along the strip and the side moves to their
    softmax-weighted mean;
  * ``box`` (:class:`~boxrefine.shared.model.box_head.BoxHeadRefiner`): the box expanded by
    ``context``, ``roi_size``², two convs, a flatten and an MLP predicting (dx0, dy0, dx1, dy1) in
    units of the coarse box's w/h.

Either way the last layer starts at zero, so an untrained refiner returns the coarse box unchanged.
docs/architecture.md ("The refiner head") compares the two.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision.ops import generalized_box_iou_loss

from boxrefine.shared.geometry.boxes import expand_boxes
from boxrefine.shared.geometry.frames import EMBED_STRIDE, LOWRES, LOWRES_STRIDE

HEADS = ("sides", "box")
Sample = Callable[[torch.Tensor, float], torch.Tensor]  # (feature map, its scale) → features per RoI


class BoxRefiner(nn.Module):
    """The refiner's interface: ``forward`` (coarse boxes → refined boxes), ``mask_regions`` (the mask
    logits it reads) and ``health_modules`` (what training's head-health check watches); and what
    both heads share: the 1×1 projections of the two features and the mask-logit channel.

    A head implements :meth:`deltas`, :meth:`read_factor` and :meth:`health_modules`."""

    head = ""

    def __init__(self, interm_channels: int, roi_size: int = 7, hidden: int = 64, context: float = 1.5,
                 use_mask: bool = True):
        super().__init__()
        self.roi_size, self.context, self.use_mask = roi_size, context, use_mask
        self.hidden_units = hidden
        self.proj_emb = nn.Conv2d(256, 128, 1)
        self.proj_interm = nn.Conv2d(interm_channels, 64, 1)
        self.in_channels = 128 + 64 + (1 if use_mask else 0)

    def mask_regions(self, boxes: torch.Tensor) -> list[tuple[int, int, int, int]]:
        """Per coarse box (n×4 xyxy, input frame): the low-res pixels (x0, y0, x1, y1, exclusive
        ends) that :meth:`forward` reads of its mask logits — RoIAlign (aligned, 2 samples per bin)
        samples inside the box scaled by :meth:`read_factor`, shifted by half a pixel, and reads each
        sample's bilinear neighbours — with one pixel to spare. The frozen decoder computes only these
        (``SamHeads(..., regions=...)``); ``tests/test_hq_decoder.py`` checks the refiner's output is
        the same as with whole masks."""
        ctx = expand_boxes(boxes.float(), self.read_factor()) / LOWRES_STRIDE - 0.5
        lo = (torch.floor(ctx[:, :2]) - 1).clamp(0, LOWRES)
        hi = (torch.floor(ctx[:, 2:]) + 3).clamp(0, LOWRES)
        return [tuple(int(v) for v in r) for r in torch.cat([lo, hi], 1).tolist()]

    def forward(self, image_embeddings: torch.Tensor, interm_embeddings: torch.Tensor, boxes: list[torch.Tensor],
                mask_logits: torch.Tensor | None = None, generators: list[torch.Generator] | None = None
                ) -> torch.Tensor:
        """
        Args:
          image_embeddings: B×256×64×64.  interm_embeddings: B×64×64×C.
          boxes: B tensors n_i×4, coarse xyxy in the 1024-px input frame.
          mask_logits: N×1×256×256 (N = Σn_i, same order) from the frozen HQ decoder, if use_mask.
          generators: one per image; training-time dropout draws each image's mask from its own (the
            global RNG if None).
        Returns:
          refined boxes N×4, xyxy, 1024-px input frame, float32 (under autocast too).
        """
        coarse = torch.cat(boxes).float()
        if len(coarse) == 0:
            return coarse
        if self.use_mask and mask_logits is None:
            raise ValueError("this refiner uses mask logits (use_mask=True) but none were given")
        deltas = self.deltas(image_embeddings, interm_embeddings, boxes, coarse, mask_logits, generators).float()
        size = (coarse[:, 2:] - coarse[:, :2]).clamp(min=1.0)
        return ordered(coarse + deltas * size.repeat(1, 2))

    def inputs(self, by_image: Sample, by_box: Sample, image_embeddings: torch.Tensor,
               interm_embeddings: torch.Tensor, mask_logits: torch.Tensor | None) -> torch.Tensor:
        """What a head convolves: the projected embedding and HQ feature sampled per RoI (``by_image``
        samples a B-image map at each box's RoIs), and, with ``use_mask``, ``tanh(logits / 4)`` sampled
        from each box's own mask (``by_box``). RoIAlign runs in float32 (features may be stored in 16
        bits); the projections follow autocast."""
        feats = [self.proj_emb(by_image(image_embeddings.float(), 1 / EMBED_STRIDE)),
                 self.proj_interm(by_image(interm_embeddings.permute(0, 3, 1, 2).float(), 1 / EMBED_STRIDE))]
        if self.use_mask:
            assert mask_logits is not None
            feats.append(torch.tanh(by_box(mask_logits.float(), 1 / LOWRES_STRIDE) / 4))
        return torch.cat([f.to(feats[0].dtype) for f in feats], 1)

    def deltas(self, image_embeddings: torch.Tensor, interm_embeddings: torch.Tensor, boxes: list[torch.Tensor],
               coarse: torch.Tensor, mask_logits: torch.Tensor | None,
               generators: list[torch.Generator] | None) -> torch.Tensor:
        """N×4 side corrections (x0, y0, x1, y1) in units of the coarse box's width / height."""
        raise NotImplementedError

    def read_factor(self) -> float:
        """The coarse box scaled by this about its centre bounds every feature the head reads."""
        raise NotImplementedError

    def health_modules(self) -> tuple[nn.Module, nn.Module]:
        """(the hidden ReLU, the module whose output is the N×4 corrections) that head health watches."""
        raise NotImplementedError


def ordered(boxes: torch.Tensor) -> torch.Tensor:
    """Boxes (n×4 xyxy) with their corners ordered, as the losses need: x1 ≥ x0, y1 ≥ y0."""
    return torch.cat([torch.minimum(boxes[:, :2], boxes[:, 2:]), torch.maximum(boxes[:, :2], boxes[:, 2:])], 1)


def refine_loss(refined: torch.Tensor, target: torch.Tensor, coarse: torch.Tensor, l1_weight: float = 1.0,
                giou_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """L1 on sides normalised by the coarse box size + GIoU loss (torchvision.ops); all n×4 xyxy."""
    wh = (coarse[:, 2:] - coarse[:, :2]).clamp(min=1.0).repeat(1, 2)
    l1 = ((refined - target).abs() / wh).mean()
    giou = generalized_box_iou_loss(refined, target, reduction="mean")
    loss = l1_weight * l1 + giou_weight * giou
    return loss, {"l1": float(l1.detach()), "giou": float(giou.detach())}
