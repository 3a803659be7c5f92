"""The trainable box refiner: corrections to the four sides of a coarse box from cached HQ-SAM
features (train fits it, evaluate runs it, so it lives here).

Per coarse box, in the 1024-px model-input frame, from the image embedding (256 ch), the early-layer
HQ feature (C ch) and optionally the frozen HQ-SAM mask logits for that box prompt, RoI-aligned with
torchvision.ops, one of two heads (``refiner.head``):

  * ``sides`` (default, ``shared/side_head.py``): per side a strip of features across the coarse side,
    reaching ``(context − 1) / 2`` box sizes inside and outside it; a shared conv trunk scores
    ``2·roi_size + 1`` positions along the strip and the side moves to their softmax-weighted mean;
  * ``box`` (the earlier head): the box expanded by ``context``, ``roi_size``², two convs, a flatten
    and an MLP predicting (dx0, dy0, dx1, dy1) in units of the coarse box's w/h.

Either way the last layer starts at zero, so an untrained refiner returns the coarse box unchanged.
On the signal store (``bench/refiner_learning.py``) the side head reaches val mean IoU ~0.79 where
the box head stops at ~0.72 (DEVELOPERS.md, "Does the refiner learn?").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.ops import generalized_box_iou_loss, roi_align

from boxrefine.shared.boxes import expand_boxes
from boxrefine.shared.geometry import EMBED_STRIDE, LOWRES, LOWRES_STRIDE
from boxrefine.shared.side_head import STRIP_DROPOUT, SideHead, dropout_keep, side_strips, strip_features

NORMS = ("layer", "none")  # normalisation before the hidden ReLU of the MLP
HEADS = ("sides", "box")  # flatten → MLP of the whole RoI | a 1-D soft argmax per side (shared/side_head.py)
# HeadHealth thresholds below which training warns that the head has collapsed
COLLAPSE_MIN_ACTIVE = 0.2  # share of hidden units that fired on at least one box of the epoch
COLLAPSE_MIN_SPREAD = 1e-3  # std of the corrections across boxes, in units of the coarse box size


class BoxRefiner(nn.Module):
    def __init__(self, interm_channels: int, roi_size: int = 7, hidden: int = 64, context: float = 1.5,
                 use_mask: bool = True, norm: str = "layer", head: str = "sides"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        self.roi_size, self.context, self.use_mask, self.head = roi_size, context, use_mask, head
        self.hidden_units = hidden
        self.proj_emb = nn.Conv2d(256, 128, 1)
        self.proj_interm = nn.Conv2d(interm_channels, 64, 1)
        c_in = 128 + 64 + (1 if use_mask else 0)
        if head == "sides":
            self.sides = SideHead(c_in, hidden, 2 * roi_size + 1)
            self.side_deltas = nn.Identity()  # N×4 corrections, hooked by HeadHealth
            return
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
          generators: one per image; the side head's training-time dropout draws each image's mask from
            its own (the global RNG if None).
        Returns:
          refined boxes N×4, xyxy, 1024-px input frame.
        """
        coarse = torch.cat(boxes).float()
        if len(coarse) == 0:
            return coarse
        if self.head == "sides":
            return self._forward_sides(image_embeddings, interm_embeddings, boxes, coarse, mask_logits, generators)
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
        return _valid(coarse + deltas * wh)


    def reach(self) -> tuple[float, float]:
        """Side head: how far each side's positions reach beyond (and inside) the coarse side, and their
        spacing, in box sizes."""
        reach = (self.context - 1) / 2
        return reach, 2 * reach / (2 * self.roi_size)

    def read_factor(self) -> float:
        """The coarse box scaled by this about its centre bounds every feature the head reads."""
        if self.head == "sides":
            reach, step = self.reach()
            return 1 + 2 * (reach + step / 2)
        return self.context

    def _forward_sides(self, image_embeddings: torch.Tensor, interm_embeddings: torch.Tensor,
                       boxes: list[torch.Tensor], coarse: torch.Tensor, mask_logits: torch.Tensor | None,
                       generators: list[torch.Generator] | None) -> torch.Tensor:
        a, n_along = self.roi_size, 2 * self.roi_size + 1
        reach, _ = self.reach()
        xs, ys, step = side_strips(coarse, reach, a, n_along)
        image_index = torch.cat([torch.full((len(b),), i, device=coarse.device) for i, b in enumerate(boxes)])
        f_emb = strip_features(image_embeddings.float(), image_index, xs, ys, 1 / EMBED_STRIDE, a, n_along)
        f_int = strip_features(interm_embeddings.permute(0, 3, 1, 2).float(), image_index, xs, ys,
                               1 / EMBED_STRIDE, a, n_along)
        feats = [self.proj_emb(f_emb), self.proj_interm(f_int)]
        if self.use_mask:
            if mask_logits is None:
                raise ValueError("this refiner uses mask logits (use_mask=True) but none were given")
            own = torch.arange(len(coarse), device=coarse.device)
            f_mask = strip_features(mask_logits.float(), own, xs, ys, 1 / LOWRES_STRIDE, a, n_along)
            feats.append(torch.tanh(f_mask / 4))
        strips = torch.cat([f.to(feats[0].dtype) for f in feats], 1)
        keep = dropout_keep([len(b) for b in boxes], strips.shape[1], generators) \
            if self.training and STRIP_DROPOUT > 0 else None
        u = self.sides(strips, step, keep).view(4, -1)  # left, right, top, bottom
        deltas = self.side_deltas(torch.stack([-u[0], -u[2], u[1], u[3]], 1))
        size = (coarse[:, 2:] - coarse[:, :2]).clamp(min=1.0)
        return _valid(coarse + deltas * size.repeat(1, 2))

    def health_modules(self) -> tuple[nn.Module, nn.Module]:
        """(the hidden ReLU, the module whose output is the N×4 corrections) that HeadHealth watches."""
        if self.head == "sides":
            return self.sides.score[2], self.side_deltas
        return self.mlp[-2], self.mlp[-1]


def _valid(boxes: torch.Tensor) -> torch.Tensor:
    """Boxes (n×4 xyxy) kept valid for the losses: x1 ≥ x0, y1 ≥ y0."""
    return torch.cat([torch.minimum(boxes[:, :2], boxes[:, 2:]), torch.maximum(boxes[:, :2], boxes[:, 2:])], 1)


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
        hidden = refiner.hidden_units
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
        if on.dim() == 3:  # side head: (4N)×hidden×positions → N×hidden: fired for any side and position
            on = on.any(-1).view(4, -1, on.shape[1]).any(0)
        self.ever |= on.any(0).cpu()
        self.firing_sum += float(on.float().mean(1).sum())

    def _on_deltas(self, _m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        d = out.detach().double().cpu()
        self.n += len(d)
        self.abs_sum += float(d.abs().mean(1).sum())
        self.d_sum += d.sum(0)
        self.d_sq += (d * d).sum(0)

    def __enter__(self) -> HeadHealth:
        hidden, deltas = self.refiner.health_modules()
        self._hooks = [hidden.register_forward_hook(self._on_hidden), deltas.register_forward_hook(self._on_deltas)]
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
    # a head that moves the boxes (|delta| well above the spread floor) but all by the same amount; one
    # that hardly moves them yet (the first steps from its zero-initialised last layer) is not collapsed
    if health["delta_spread"] < min_spread and health["delta_abs"] >= 10 * min_spread:
        return (f"the corrections hardly vary between boxes (spread {health['delta_spread']:.2g} of the box "
                f"size): refined ≈ coarse + constant")
    return None
