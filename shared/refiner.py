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

from typing import Any

import torch
from torch import nn
from torchvision.ops import generalized_box_iou_loss, roi_align

from boxrefine.shared.boxes import expand_boxes
from boxrefine.shared.geometry import EMBED_STRIDE, LOWRES, LOWRES_STRIDE

NORMS = ("layer", "none")  # normalisation before the hidden ReLU of the MLP
# HeadHealth thresholds below which training warns that the head has collapsed
COLLAPSE_MIN_ACTIVE = 0.2  # share of hidden units that fired on at least one box of the epoch
COLLAPSE_MIN_SPREAD = 1e-3  # std of the corrections across boxes, in units of the coarse box size


class BoxRefiner(nn.Module):
    def __init__(self, interm_channels: int, roi_size: int = 7, hidden: int = 256, context: float = 1.5,
                 use_mask: bool = True, norm: str = "layer"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.roi_size, self.context, self.use_mask = roi_size, context, use_mask
        self.proj_emb = nn.Conv2d(256, 128, 1)
        self.proj_interm = nn.Conv2d(interm_channels, 64, 1)
        c_in = 128 + 64 + (1 if use_mask else 0)
        self.convs = nn.Sequential(
            nn.Conv2d(c_in, hidden, 3, padding=1), nn.GroupNorm(8, hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.GroupNorm(8, hidden), nn.ReLU(inplace=True),
        )
        self.flatten = nn.Flatten()
        # + the coarse box's geometry (centre, size, log-aspect) in the 1024-px frame. The hidden layer
        # sees hidden·roi²+5 inputs: without a norm its pre-activations drift by ~lr·fan-in per AdamW
        # step and the ReLUs die (see HeadHealth); LayerNorm keeps them centred.
        # norm "none" keeps the layout (and state-dict keys) of the head before the option existed
        self.mlp = nn.Sequential(nn.Linear(hidden * roi_size * roi_size + 5, hidden),
                                 *([nn.LayerNorm(hidden)] if norm == "layer" else []),
                                 nn.ReLU(inplace=True), nn.Linear(hidden, 4))
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


class HeadHealth:
    """Is the head alive? Accumulates, over the boxes of every forward pass while attached (a context
    manager), which hidden units of the MLP fire and what the head predicts:

    * ``active_units``: share of hidden units positive (after the ReLU) for at least one box;
    * ``firing``: mean share of hidden units positive per box;
    * ``delta_abs``: mean |delta| of the side corrections, in units of the coarse box's w/h;
    * ``delta_spread``: their standard deviation across boxes, mean of the four sides. A head whose
      hidden units are all dead returns ``coarse + constant``: spread 0.

    ``state`` (plain lists and floats) lets a resumed epoch carry on counting.
    """

    def __init__(self, refiner: BoxRefiner, state: dict[str, Any] | None = None):
        self.refiner = refiner
        hidden = refiner.mlp[0].out_features
        st = state or {}
        self.ever = torch.tensor(st.get("ever", [False] * hidden), dtype=torch.bool)
        self.n = int(st.get("n", 0))
        self.firing_sum = float(st.get("firing_sum", 0.0))
        self.abs_sum = float(st.get("abs_sum", 0.0))
        self.d_sum = torch.tensor(st.get("d_sum", [0.0] * 4), dtype=torch.float64)
        self.d_sq = torch.tensor(st.get("d_sq", [0.0] * 4), dtype=torch.float64)
        self._hooks: list[Any] = []

    def state(self) -> dict[str, Any]:
        return {"ever": self.ever.tolist(), "n": self.n, "firing_sum": self.firing_sum, "abs_sum": self.abs_sum,
                "d_sum": self.d_sum.tolist(), "d_sq": self.d_sq.tolist()}

    def _on_hidden(self, _m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        on = out.detach() > 0
        self.ever |= on.any(0).cpu()
        self.firing_sum += float(on.float().mean(1).sum())

    def _on_deltas(self, _m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        d = out.detach().double().cpu()
        self.n += len(d)
        self.abs_sum += float(d.abs().mean(1).sum())
        self.d_sum += d.sum(0)
        self.d_sq += (d * d).sum(0)

    def __enter__(self) -> HeadHealth:
        self._hooks = [self.refiner.mlp[-2].register_forward_hook(self._on_hidden),  # the hidden ReLU
                       self.refiner.mlp[-1].register_forward_hook(self._on_deltas)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def summary(self) -> dict[str, float]:
        if self.n == 0:
            return {}
        mean = self.d_sum / self.n
        spread = (self.d_sq / self.n - mean * mean).clamp(min=0).sqrt().mean()
        return {"active_units": float(self.ever.float().mean()), "firing": self.firing_sum / self.n,
                "delta_abs": self.abs_sum / self.n, "delta_spread": float(spread)}


def head_collapse(health: dict[str, float], min_active: float = COLLAPSE_MIN_ACTIVE,
                  min_spread: float = COLLAPSE_MIN_SPREAD) -> str | None:
    """Why a head looks collapsed (a :meth:`HeadHealth.summary`), or None when it looks alive."""
    if not health:
        return None
    if health["active_units"] < min_active:
        return (f"only {health['active_units']:.0%} of the hidden units fired on any box "
                f"(dead ReLUs; below {min_active:.0%})")
    if health["delta_spread"] < min_spread:
        return (f"the corrections hardly vary between boxes (spread {health['delta_spread']:.2g} of the box "
                f"size): refined ≈ coarse + constant")
    return None
