"""Is the refiner head alive? What training logs every epoch (``head_*`` in metrics.jsonl) and the
warning it prints when the head has collapsed (docs/architecture.md, "The refiner head")."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from boxrefine.shared.model.refiner import BoxRefiner

# HeadHealth thresholds below which training warns that the head has collapsed
COLLAPSE_MIN_ACTIVE = 0.2  # share of hidden units that fired on at least one box of the epoch


COLLAPSE_MIN_SPREAD = 1e-3  # std of the corrections across boxes, in units of the coarse box size


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
