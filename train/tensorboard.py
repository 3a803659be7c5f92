"""A run's log: ``metrics.jsonl`` (the source of truth, one JSON line per epoch and per validation) and
TensorBoard event files beside it (``runs/<name>/tb/``; ``tensorboard --logdir runs`` shows every run)
holding its scalars, written as each line is logged.

Steps are epochs. Tags: ``train/`` (loss, l1, giou, lr, images_per_s, step_seconds and, with a
GradScaler, skipped_steps and grad_scale), ``head/`` (the head's health) and ``val/`` (val_loss,
refined and coarse mean IoU and accuracies). A resumed run adds an event file beside the first one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from boxrefine.shared.runtime.device import Precision
from boxrefine.shared.runtime.fileio import atomic_append_text

TRAIN_KEYS = ("loss", "l1", "giou", "lr", "images_per_s", "step_seconds", "skipped_steps", "grad_scale")


class RunLog:
    """metrics.jsonl and the TensorBoard events of one run folder (rank 0 writes it: the caller decides).
    The event writer opens on the first line logged and is closed by :meth:`close`."""

    def __init__(self, run: Path):
        self.path, self.tb_dir, self.writer = run / "metrics.jsonl", run / "tb", None

    def log(self, entry: dict[str, Any]) -> None:
        atomic_append_text(self.path, json.dumps(entry) + "\n")
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter  # loads tensorboard: only when a run logs

            self.writer = SummaryWriter(log_dir=str(self.tb_dir))
        for tag, value in scalars(entry).items():
            self.writer.add_scalar(tag, value, int(entry["epoch"]))
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def scalars(entry: dict[str, Any]) -> dict[str, float]:
    """The TensorBoard scalars (tag → value) of one metrics.jsonl line."""
    out: dict[str, float] = {}
    if entry.get("kind") == "epoch":
        out.update({f"train/{k}": entry[k] for k in TRAIN_KEYS if isinstance(entry.get(k), int | float)})
        out.update({f"head/{k.removeprefix('head_')}": v for k, v in entry.items()
                    if k.startswith("head_") and isinstance(v, int | float) and not isinstance(v, bool)})
    elif entry.get("kind") == "eval":
        if isinstance(entry.get("val_loss"), int | float):
            out["val/loss"] = entry["val_loss"]
        for which in ("refined", "coarse", "zero_shot"):
            for k, v in (entry.get(which) or {}).items():
                if k != "n" and isinstance(v, int | float):
                    out[f"val/{which}_{k}"] = v
    return {k: float(v) for k, v in out.items() if v == v}  # NaN: nothing to plot


def epoch_entry(epoch: int, partial: dict[str, float], lr: float, seconds: float, images_before: float, steps: int,
                ranks: int, precision: str) -> dict[str, Any]:
    """An epoch's metrics.jsonl line from its running sums (``TrainState.partial``): mean losses, the
    learning rate of its last step, speed (images/s of this start, seconds per step), ranks, precision."""
    n = max(partial["n"], 1)
    return {"kind": "epoch", "epoch": epoch, "loss": partial["loss"] / n, "l1": partial["l1"] / n,
            "giou": partial["giou"] / n, "lr": lr, "images": partial["n"], "boxes": partial["boxes"],
            "seconds": seconds, "images_per_s": (partial["n"] - images_before) / max(seconds, 1e-9),
            "step_seconds": seconds / max(steps, 1), "ranks": ranks, "precision": precision}


def fast_summary(applied: dict[str, Any], precision: Precision) -> str:
    """``FAST mode: k=v, ...`` with what ran where the fast block asked for AMP that this device does not
    run (``train.amp=True`` beside a float32 run would read as if AMP ran)."""
    items = []
    for k, v in applied.items():
        note = f" (runs {precision.label})" if k.startswith("train.amp") and precision.dtype is None else ""
        items.append(f"{k}={v}{note}")
    return ", ".join(items)


def epoch_summary(entry: dict[str, Any], head: dict[str, float], collapsed: str | None) -> list[tuple[str, str | None]]:
    """The lines (text, style) that say an epoch's metrics.jsonl ``entry`` on the console."""
    out: list[tuple[str, str | None]] = [(
        f"epoch {entry['epoch']}: loss {entry['loss']:.4f} (l1 {entry['l1']:.4f}, giou {entry['giou']:.4f}), "
        f"{entry['images_per_s']:.2f} img/s"
        + (f", head: {head['active_units']:.0%} units active, mean |delta| {head['delta_abs']:.3f}" if head else ""),
        None)]
    if entry.get("skipped_steps"):
        out.append((f"  float16: {entry['skipped_steps']} step(s) skipped on inf/NaN gradients (GradScaler; "
                    f"scale now {entry['grad_scale']:g})", None))
    if collapsed:
        out.append((f"warning: the refiner head has collapsed in epoch {entry['epoch']}: {collapsed}", "yellow"))
    return out
