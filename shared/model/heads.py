"""The refiner heads by name (``refiner.head``): the one place that builds a refiner."""

from __future__ import annotations

from boxrefine.shared.model.box_head import NORMS, BoxHeadRefiner
from boxrefine.shared.model.refiner import HEADS, BoxRefiner
from boxrefine.shared.model.side_head import SideRefiner


def build_refiner(interm_channels: int, head: str = "sides", norm: str = "layer", **kwargs: float | int | bool
                  ) -> BoxRefiner:
    """The refiner ``refiner.head`` names, with the other ``refiner`` settings (``norm``: the box head's)."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if head == "sides":
        return SideRefiner(interm_channels, **kwargs)
    if head == "box":
        return BoxHeadRefiner(interm_channels, norm=norm, **kwargs)
    raise ValueError(f"head must be one of {HEADS}, got {head!r}")
