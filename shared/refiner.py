"""The trainable box refiner: corrections to the four sides of a coarse box from cached HQ-SAM
features (train fits it, evaluate runs it, so it lives here).

Per coarse box, in the 1024-px model-input frame:
  * RoIAlign (torchvision.ops) of the image embedding (256 ch) and the early-layer HQ feature
    (C ch) over the box expanded by ``context`` (so the head sees past wrong edges);
  * optionally the frozen HQ-SAM mask logits for that box prompt, RoI-aligned the same way;
  * a small conv + MLP head predicts (dx0, dy0, dx1, dy1) in units of the coarse box's w/h.
The last layer starts at zero, so an untrained refiner returns the coarse box unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import generalized_box_iou_loss, roi_align

from boxrefine.shared.boxes import expand_boxes
from boxrefine.shared.geometry import EMBED_STRIDE, LOWRES, LOWRES_STRIDE


class BoxRefiner(nn.Module):
    def __init__(self, interm_channels: int, roi_size: int = 7, hidden: int = 256, context: float = 1.5,
                 use_mask: bool = True):
        super().__init__()
        self.roi_size, self.context, self.use_mask = roi_size, context, use_mask
        self.proj_emb = nn.Conv2d(256, 128, 1)
        self.proj_interm = nn.Conv2d(interm_channels, 64, 1)
        c_in = 128 + 64 + (1 if use_mask else 0)
        self.convs = nn.Sequential(
            nn.Conv2d(c_in, hidden, 3, padding=1), nn.GroupNorm(8, hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.GroupNorm(8, hidden), nn.ReLU(inplace=True),
        )
        self.flatten = nn.Flatten()
        # + the coarse box's geometry (centre, size, log-aspect) in the 1024-px frame
        self.mlp = nn.Sequential(nn.Linear(hidden * roi_size * roi_size + 5, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, 4))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def mask_regions(self, boxes: torch.Tensor) -> list[tuple[int, int, int, int]]:
        """Per coarse box (n×4 xyxy, input frame): the low-res pixels (x0, y0, x1, y1, exclusive
        ends) that :meth:`forward` reads of its mask logits — RoIAlign (aligned, 2 samples per bin)
        samples inside the context box shifted by half a pixel and reads each sample's bilinear
        neighbours — with one pixel to spare. The frozen decoder computes only these
        (``SamHeads(..., regions=...)``); ``tests/test_hq_decoder.py`` checks the refiner's output is
        the same as with whole masks."""
        ctx = expand_boxes(boxes.float(), self.context) / LOWRES_STRIDE - 0.5
        lo = (torch.floor(ctx[:, :2]) - 1).clamp(0, LOWRES)
        hi = (torch.floor(ctx[:, 2:]) + 3).clamp(0, LOWRES)
        return [tuple(int(v) for v in r) for r in torch.cat([lo, hi], 1).tolist()]

    def forward(self, image_embeddings: torch.Tensor, interm_embeddings: torch.Tensor, boxes: list[torch.Tensor],
                mask_logits: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
          image_embeddings: B×256×64×64.  interm_embeddings: B×64×64×C.
          boxes: B tensors n_i×4, coarse xyxy in the 1024-px input frame.
          mask_logits: N×1×256×256 (N = Σn_i, same order) from the frozen HQ decoder, if use_mask.
        Returns:
          refined boxes N×4, xyxy, 1024-px input frame.
        """
        coarse = torch.cat(boxes).float()
        if len(coarse) == 0:
            return coarse
        ctx = expand_boxes(coarse, self.context)
        idx = torch.cat([torch.full((len(b), 1), i, dtype=coarse.dtype, device=coarse.device)
                         for i, b in enumerate(boxes)])
        rois = torch.cat([idx, ctx], 1)
        s = self.roi_size
        # RoIAlign in float32 (features may be stored float16/bfloat16); the convs follow autocast
        f_emb = roi_align(image_embeddings.float(), rois, s, 1 / EMBED_STRIDE, 2, True)
        f_int = roi_align(interm_embeddings.permute(0, 3, 1, 2).float(), rois, s, 1 / EMBED_STRIDE, 2, True)
        feats = [self.proj_emb(f_emb), self.proj_interm(f_int)]
        if self.use_mask:
            if mask_logits is None:
                raise ValueError("this refiner uses mask logits (use_mask=True) but none were given")
            own = torch.cat([torch.arange(len(ctx), device=ctx.device, dtype=ctx.dtype)[:, None], ctx], 1)
            f_mask = roi_align(mask_logits.float(), own, s, 1 / LOWRES_STRIDE, 2, True)
            feats.append(torch.tanh(f_mask / 4))
        x = self.flatten(self.convs(torch.cat([f.to(feats[0].dtype) for f in feats], 1)))
        size = (coarse[:, 2:] - coarse[:, :2]).clamp(min=1.0)
        geom = torch.cat([(coarse[:, :2] + coarse[:, 2:]) / 2048, size / 1024,
                          torch.log(size[:, :1] / size[:, 1:])], 1)
        deltas = self.mlp(torch.cat([x, geom.to(x.dtype)], 1)).float()
        wh = size.repeat(1, 2)
        refined = coarse + deltas * wh
        # keep boxes valid for the losses: x1 ≥ x0, y1 ≥ y0
        lo = torch.minimum(refined[:, :2], refined[:, 2:])
        hi = torch.maximum(refined[:, :2], refined[:, 2:])
        return torch.cat([lo, hi], 1)


def refine_loss(refined: torch.Tensor, target: torch.Tensor, coarse: torch.Tensor, l1_weight: float = 1.0,
                giou_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """L1 on sides normalised by the coarse box size + GIoU loss (torchvision.ops); all n×4 xyxy."""
    wh = (coarse[:, 2:] - coarse[:, :2]).clamp(min=1.0).repeat(1, 2)
    l1 = ((refined - target).abs() / wh).mean()
    giou = generalized_box_iou_loss(refined, target, reduction="mean")
    loss = l1_weight * l1 + giou_weight * giou
    return loss, {"l1": float(l1.detach()), "giou": float(giou.detach())}
