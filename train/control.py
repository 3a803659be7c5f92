"""Run control for the recipe: the per-epoch sampler, stop signals, global RNG state, and the run
folder of a start that never saved a checkpoint."""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from boxrefine.shared.runtime.signals import StopSignals

__all__ = ["EpochSampler", "StopSignals", "rng_state", "restore_rng", "unsaved_start", "discard_unsaved_run"]


class EpochSampler(Sampler[list[int]]):
    """The batches of an epoch, as a DataLoader ``batch_sampler``: per step, this rank's part of the
    step's slice of ``order_of(epoch)`` (dataset positions).

    ``batch_size`` is the global batch: step s covers positions [s·B, (s+1)·B) of the order, and rank
    r of W takes every W-th of them from the r-th, so the ranks together see exactly the batch one
    process would (a part may be empty when a step holds fewer than W images). ``set_epoch`` picks the
    epoch and the steps already done (resume), as ``DistributedSampler.set_epoch`` does, so persistent
    DataLoader workers serve every epoch instead of being started anew."""

    def __init__(self, order_of: Callable[[int], Sequence[int]], batch_size: int, rank: int = 0, world: int = 1):
        self.order_of, self.batch_size, self.rank, self.world = order_of, batch_size, rank, world
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip_steps: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_steps

    def steps(self, n: int) -> int:
        """Steps of an epoch of ``n`` images."""
        return -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order, b = list(self.order_of(self.epoch)), self.batch_size
        for s in range(self.skip, self.steps(len(order))):
            yield order[s * b:(s + 1) * b][self.rank::self.world]

    def __len__(self) -> int:
        return max(0, self.steps(len(self.order_of(self.epoch))) - self.skip)


def rng_state() -> dict[str, Any]:
    """Global RNG states (tensors, ints and lists only, so ``weights_only`` loading accepts them)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "numpy": [keys.tolist(), int(pos), int(has_gauss), float(gauss)]}


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


# What a start writes before its first checkpoint (plus hidden temp files of fileio.atomic_write).
_START_FILES = ("config.yaml", "subset.json", "metrics.jsonl", "curves.png")


def unsaved_start(run: Path) -> bool:
    """True when ``run`` holds only what a start writes before its first checkpoint: the leftover of a
    start that failed or was killed (kill -9 leaves it; nothing in it can be resumed)."""
    for p in run.iterdir():
        n = p.name
        if n == "tb" and p.is_dir():  # TensorBoard events (train/tensorboard.py)
            continue
        if not p.is_file() or not (n in _START_FILES or (n.startswith(("eval_boxes_", "rows_epoch_"))
                                                         and n.endswith(".json"))
                                   or (n.startswith(".") and n.endswith(".tmp"))):
            return False
    return True


def discard_unsaved_run(run: Path) -> bool:
    """Remove a run folder that this start made when no checkpoint was saved in it (so the name stays
    free and a bare ``evaluate`` never picks it). Returns whether it was removed."""
    if not run.is_dir() or any(run.glob("*.pt")) or not unsaved_start(run):
        return False
    shutil.rmtree(run, ignore_errors=True)
    return True


def sample_subset(n: int, ratio: float, seed: int) -> np.ndarray:
    """A seeded subset of ``round(ratio·n)`` (≥ 1) positions out of n, sorted (``train.sample_ratio``)."""
    k = max(1, int(round(ratio * n))) if n else 0
    if k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))

