"""The side-wise refiner head (``refiner.head: sides``): each side of a coarse box is moved to where a
1-D distribution over positions near it says the edge is.

Per coarse box and side, a strip of features is RoI-aligned around the side: along the side's normal
it spans ``±reach`` box sizes about the coarse side (``reach = (context − 1) / 2``: the same region
the box head reads with that context), sampled at ``2·roi_size + 1`` positions; across it spans the
box (``roi_size`` samples). The four strips are turned so that their positions run from inside the
box outwards, and one small trunk (shared by the four sides) scores every position; the side moves
to the softmax-weighted mean position (a soft argmax, as in side-aware boundary localisation, Wang et
al., ECCV 2020). Against the box head's flatten → MLP this reads edges the same way wherever they
sit in the RoI and however the box is oriented, and resolves them at 2·roi_size + 1 positions.

While training, whole channels of the strip features are dropped (``STRIP_DROPOUT``). The last layer
starts at zero: uniform weights over positions symmetric about the coarse side, and
the mean is taken as a sum of mirrored differences, so an untrained head returns the coarse box
exactly.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import roi_align

from boxrefine.shared.model.refiner import BoxRefiner

# Channel dropout on the strip features while training (docs/architecture.md, "The refiner head", has
# what it changed on the signal store).
STRIP_DROPOUT = 0.5


class SideHead(nn.Module):
    """Scores positions along each side's normal. ``forward``: strips (4N)×C×A×L (A across, L along,
    inside → outside) → side offsets (4N,) in box sizes, positive outwards."""

    def __init__(self, c_in: int, hidden: int, positions: int):
        super().__init__()
        self.positions = positions
        self.trunk = nn.Sequential(
            nn.Conv2d(c_in, hidden, 3, padding=1), nn.GroupNorm(8, hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.GroupNorm(8, hidden), nn.ReLU(inplace=True),
        )
        self.score = nn.Sequential(nn.Conv1d(hidden, hidden, 3, padding=1), nn.GroupNorm(8, hidden),
                                   nn.ReLU(inplace=True), nn.Conv1d(hidden, 1, 1, bias=False))
        # no bias: the softmax ignores a constant, so its gradient would be rounding noise that AdamW
        # turns into steps of ~lr (and DDP ranks into different weights)
        nn.init.zeros_(self.score[-1].weight)

    def forward(self, strips: torch.Tensor, step: float, keep: torch.Tensor | None = None) -> torch.Tensor:
        """``keep``: (4N)×C booleans, the strip channels kept by training-time dropout (None: all)."""
        if keep is not None:
            strips = strips * (keep[..., None, None].to(strips.device, strips.dtype) / (1 - STRIP_DROPOUT))
        profile = self.trunk(strips).mean(2)  # across the strip → (4N)×hidden×L
        p = torch.softmax(self.score(profile).squeeze(1).float(), -1)  # (4N)×L
        c = self.positions // 2
        k = torch.arange(1, c + 1, device=p.device, dtype=p.dtype)
        # Σ_k p_k·u_k with u symmetric about the coarse side (u_c = 0): exactly 0 for uniform p
        return ((p[:, c + 1:] - p[:, :c].flip(-1)) * k).sum(-1) * step


def dropout_keep(counts: list[int], channels: int, generators: list[torch.Generator] | None) -> torch.Tensor:
    """Which strip channels training keeps, (4N)×C in the strips' order (sides, then boxes), drawn per
    image from its own generator (``generators``, one per image; the global RNG if None), so that an
    image's draw does not depend on which others share its batch or DDP rank."""
    gens = generators if generators is not None else [None] * len(counts)
    per = [torch.rand((4, n, channels), generator=g) >= STRIP_DROPOUT for n, g in zip(counts, gens, strict=True)]
    return torch.cat(per, 1).reshape(-1, channels)


def side_strips(boxes: torch.Tensor, reach: float, across: int, along: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """RoIs of the four side strips of each box (n×4 xyxy): ``(x_strips, y_strips, step)`` with
    x_strips 2n×4 (left sides then right sides; sample along x) and y_strips 2n×4 (top then bottom).
    Bin centres along the normal fall at ``u·size`` from the coarse side for u = −reach … reach in
    steps of ``step`` (box sizes)."""
    step = 2 * reach / (along - 1)
    half = (reach + step / 2)
    x0, y0, x1, y1 = boxes.unbind(1)
    w, h = (x1 - x0).clamp(min=1.0), (y1 - y0).clamp(min=1.0)
    xs = torch.stack([torch.cat([x0, x1]) - half * torch.cat([w, w]), torch.cat([y0, y0]),
                      torch.cat([x0, x1]) + half * torch.cat([w, w]), torch.cat([y1, y1])], 1)
    ys = torch.stack([torch.cat([x0, x0]), torch.cat([y0, y1]) - half * torch.cat([h, h]),
                      torch.cat([x1, x1]), torch.cat([y0, y1]) + half * torch.cat([h, h])], 1)
    return xs, ys, step


def strip_features(fmap: torch.Tensor, image_index: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor,
                   scale: float, across: int, along: int) -> torch.Tensor:
    """RoI-align ``fmap`` (B×C×H×W) over the strips of :func:`side_strips` and turn them so that every
    strip is C×across×along with positions running inside → outside: (4n)×C×A×L ordered left, right,
    top, bottom (n boxes; ``image_index`` n, each box's image)."""
    n = len(image_index)
    idx2 = torch.cat([image_index, image_index]).to(fmap.dtype)[:, None]
    fx = roi_align(fmap, torch.cat([idx2, xs], 1), (across, along), scale, 2, True)  # 2n×C×A×L
    fy = roi_align(fmap, torch.cat([idx2, ys], 1), (along, across), scale, 2, True).transpose(2, 3)
    return torch.cat([fx[:n].flip(-1), fx[n:], fy[:n].flip(-1), fy[n:]])


class SideRefiner(BoxRefiner):
    """The side head (the module docstring) behind the refiner's interface."""

    head = "sides"

    def __init__(self, interm_channels: int, roi_size: int = 7, hidden: int = 64, context: float = 1.5,
                 use_mask: bool = True):
        super().__init__(interm_channels, roi_size, hidden, context, use_mask)
        self.sides = SideHead(self.in_channels, hidden, 2 * roi_size + 1)
        self.side_deltas = nn.Identity()  # N×4 corrections, hooked by head health

    def reach(self) -> tuple[float, float]:
        """How far each side's positions reach beyond (and inside) the coarse side, and their spacing,
        in box sizes."""
        reach = (self.context - 1) / 2
        return reach, 2 * reach / (2 * self.roi_size)

    def read_factor(self) -> float:
        reach, step = self.reach()
        return 1 + 2 * (reach + step / 2)

    def health_modules(self) -> tuple[nn.Module, nn.Module]:
        return self.sides.score[2], self.side_deltas

    def deltas(self, image_embeddings: torch.Tensor, interm_embeddings: torch.Tensor, boxes: list[torch.Tensor],
               coarse: torch.Tensor, mask_logits: torch.Tensor | None,
               generators: list[torch.Generator] | None) -> torch.Tensor:
        a, n_along = self.roi_size, 2 * self.roi_size + 1
        xs, ys, step = side_strips(coarse, self.reach()[0], a, n_along)
        image = torch.cat([torch.full((len(b),), i, device=coarse.device) for i, b in enumerate(boxes)])
        own = torch.arange(len(coarse), device=coarse.device)
        strips = self.inputs(lambda f, scale: strip_features(f, image, xs, ys, scale, a, n_along),
                             lambda f, scale: strip_features(f, own, xs, ys, scale, a, n_along),
                             image_embeddings, interm_embeddings, mask_logits)
        keep = dropout_keep([len(b) for b in boxes], strips.shape[1], generators) \
            if self.training and STRIP_DROPOUT > 0 else None
        u = self.sides(strips, step, keep).view(4, -1)  # left, right, top, bottom
        return self.side_deltas(torch.stack([-u[0], -u[2], u[1], u[3]], 1))
