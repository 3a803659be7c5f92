"""The box head (``refiner.head: box``): the coarse box scaled by ``context`` about its centre,
RoI-aligned at ``roi_size``², two 3×3 conv + GroupNorm + ReLU, a flatten, the box geometry (centre,
size, log-aspect in the 1024-px frame), ``Linear → LayerNorm → ReLU → Linear(4)``: side corrections
in units of the box's width / height.

The hidden layer sees ``hidden·roi_size² + 5`` inputs: without a norm its pre-activations drift by
about lr·fan-in per AdamW step and the ReLUs die; LayerNorm (``norm: layer``) keeps them centred.
``norm: none`` keeps the layout (and state-dict keys) of checkpoints trained without it.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import roi_align

from boxrefine.shared.geometry.boxes import expand_boxes
from boxrefine.shared.model.refiner import BoxRefiner

NORMS = ("layer", "none")  # normalisation before the hidden ReLU of the MLP


class BoxHeadRefiner(BoxRefiner):
    head = "box"

    def __init__(self, interm_channels: int, roi_size: int = 7, hidden: int = 64, context: float = 1.5,
                 use_mask: bool = True, norm: str = "layer"):
        super().__init__(interm_channels, roi_size, hidden, context, use_mask)
        self.convs = nn.Sequential(
            nn.Conv2d(self.in_channels, hidden, 3, padding=1), nn.GroupNorm(8, hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.GroupNorm(8, hidden), nn.ReLU(inplace=True),
        )
        self.flatten = nn.Flatten()
        self.mlp = nn.Sequential(nn.Linear(hidden * roi_size * roi_size + 5, hidden),
                                 *([nn.LayerNorm(hidden)] if norm == "layer" else []),
                                 nn.ReLU(inplace=True), nn.Linear(hidden, 4))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def read_factor(self) -> float:
        return self.context

    def health_modules(self) -> tuple[nn.Module, nn.Module]:
        return self.mlp[-2], self.mlp[-1]

    def deltas(self, image_embeddings: torch.Tensor, interm_embeddings: torch.Tensor, boxes: list[torch.Tensor],
               coarse: torch.Tensor, mask_logits: torch.Tensor | None,
               generators: list[torch.Generator] | None) -> torch.Tensor:
        ctx = expand_boxes(coarse, self.context)
        image = torch.cat([torch.full((len(b), 1), i, dtype=ctx.dtype, device=ctx.device) for i, b in enumerate(boxes)])
        own = torch.arange(len(ctx), dtype=ctx.dtype, device=ctx.device)[:, None]
        s = self.roi_size
        x = self.inputs(lambda f, scale: roi_align(f, torch.cat([image, ctx], 1), s, scale, 2, True),
                        lambda f, scale: roi_align(f, torch.cat([own, ctx], 1), s, scale, 2, True),
                        image_embeddings, interm_embeddings, mask_logits)
        x = self.flatten(self.convs(x))
        size = (coarse[:, 2:] - coarse[:, :2]).clamp(min=1.0)
        geom = torch.cat([(coarse[:, :2] + coarse[:, 2:]) / 2048, size / 1024,
                          torch.log(size[:, :1] / size[:, 1:])], 1)
        return self.mlp(torch.cat([x, geom.to(x.dtype)], 1))
