"""Which checkpoints a run keeps: ``last.pt`` always, ``best.pt`` (the best validated epoch) and the
epoch files of the ``keep_top_k`` best epochs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from boxrefine.shared.model.checkpoint import checkpoint_bytes
from boxrefine.shared.runtime.fileio import atomic_link, atomic_write_bytes


def epoch_file(epoch: int) -> str:
    return f"epoch_{epoch:03d}.pt"


class CheckpointSaver:
    """Keeps last, best and the top-k epochs of one run folder (higher metric is better); files that
    hold the same checkpoint are hard links to one file.

    Its bookkeeping (:meth:`state`) is saved inside every checkpoint, so a resumed run prunes
    exactly as an uninterrupted one would.
    """

    def __init__(self, folder: Path, keep_top_k: int, state: dict[str, Any] | None = None):
        self.folder, self.keep_top_k = Path(folder), keep_top_k
        state = state or {}
        self.top: list[tuple[float, int]] = [(float(m), int(e)) for m, e in state.get("top", [])]
        self.best: float | None = state.get("best")

    def state(self) -> dict[str, Any]:
        return {"top": [[m, e] for m, e in self.top], "best": self.best}

    def save(self, payload: Callable[[dict[str, Any]], dict[str, Any]], epoch: int,
             metric: float | None = None) -> list[Path]:
        """Write ``payload(saver_state)`` to last.pt and, given ``metric``, to best.pt and
        ``epoch_NNN.pt`` as they qualify. Returns the files written."""
        is_best = metric is not None and (self.best is None or metric > self.best)
        keep = (metric is not None and self.keep_top_k > 0
                and (len(self.top) < self.keep_top_k or metric > self.top[-1][0]))
        dropped: list[tuple[float, int]] = []
        if keep:
            assert metric is not None
            self.top = sorted([*self.top, (metric, epoch)], key=lambda x: (-x[0], x[1]))
            self.top, dropped = self.top[:self.keep_top_k], self.top[self.keep_top_k:]
        if is_best:
            self.best = metric
        data = checkpoint_bytes(payload(self.state()))
        last = atomic_write_bytes(self.folder / "last.pt", data)
        # the epoch file and best.pt of this epoch are the same checkpoint: hard links to last.pt (a later
        # last.pt replaces its own name only)
        names = ([epoch_file(epoch)] if keep else []) + (["best.pt"] if is_best else [])
        written = [last] + [atomic_link(last, self.folder / n, data) for n in names]
        for _, e in dropped:
            (self.folder / epoch_file(e)).unlink(missing_ok=True)
        return written
