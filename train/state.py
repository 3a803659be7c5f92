"""What a training run carries: its progress (:class:`TrainState`, all that ``--resume`` needs besides
module and optimizer state, saved in every checkpoint), its result, and its one-line error."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from boxrefine.shared.errors import BoxrefineError


class TrainError(BoxrefineError, RuntimeError):
    """A problem that stops training with a one-line message."""


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    best_iou: float | None
    interrupted: bool = False


def zero_partial() -> dict[str, float]:
    """Running sums of an epoch; ``skipped``: optimizer steps the float16 GradScaler skipped (inf/NaN)."""
    return {"loss": 0.0, "l1": 0.0, "giou": 0.0, "n": 0, "boxes": 0, "skipped": 0}


@dataclass
class TrainState:
    """The recipe's progress: with the module/optimizer state dicts, all that resume needs."""

    epoch: int = 0  # epochs fully trained
    step: int = 0  # optimizer steps already done in epoch ``epoch`` (> 0 after a stop mid-epoch)
    partial: dict[str, float] = field(default_factory=zero_partial)  # running sums of that epoch
    pending_eval: bool = False  # epoch ``epoch`` is trained but its validation is not logged yet
    saver: dict[str, Any] = field(default_factory=dict)  # CheckpointSaver bookkeeping (top-k, best)
    health: dict[str, Any] = field(default_factory=dict)  # HeadHealth counts of that epoch

    @property
    def best_iou(self) -> float | None:
        return self.saver.get("best")
