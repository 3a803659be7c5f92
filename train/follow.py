"""``boxrefine train --follow``: train while an extractor fills the store (docs/architecture.md,
"Concurrent readers").

Each epoch starts from the rows of the training split that are complete when it starts (read through
the row index) and records them, before its first step, in ``runs/<name>/rows_epoch_NNN.json``
(rows, their keys and image ids). A resumed run reads that file for the epoch it resumes, so
``--resume`` trains on exactly the rows the epoch started with, however much the store grew since.

The learning-rate schedule is planned in steps: an epoch of ``S`` steps that starts after ``D`` steps
plans the cosine decay to end at ``D + (epochs - e) * S`` (warm-up: ``warmup_epochs`` of the first
epoch's steps), recomputed from the recorded epochs on resume.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from boxrefine.shared.config import PipelineConfig
from boxrefine.shared.errors import BoxrefineError
from boxrefine.shared.runtime.console import console
from boxrefine.shared.runtime.fileio import atomic_write_json
from boxrefine.shared.store.feature_store import open_store
from boxrefine.shared.store.location import StoreError
from boxrefine.shared.store.split import SplitStore
from boxrefine.train.control import sample_subset

PREFIX = "rows_epoch_"
WAIT_S = 5.0  # how often a follower waiting for its first complete row looks again


def epoch_file(run: Path, epoch: int) -> Path:
    return run / f"{PREFIX}{epoch + 1:03d}.json"


class FollowRows:
    """The rows of each epoch of a ``--follow`` run (see the module docstring)."""

    def __init__(self, run: Path, store_path: str, split: str, on_damage: str, sample_ratio: float,
                 resample: bool, seed: int, batch_images: int):
        self.run, self.store_path, self.split_name, self.on_damage = run, store_path, split, on_damage
        self.sample_ratio, self.resample, self.seed, self.batch_images = sample_ratio, resample, seed, batch_images

    @classmethod
    def of(cls, run: Path, cfg: PipelineConfig) -> FollowRows:
        train_cfg = cfg.train
        return cls(run, cfg.store.path, train_cfg.train_split, cfg.store.on_damage, train_cfg.sample_ratio,
                   train_cfg.resample_each_epoch, train_cfg.seed, train_cfg.batch_images)

    def split(self) -> SplitStore:
        return open_store(self.store_path).split(self.split_name)

    def rows(self, epoch: int) -> np.ndarray:
        """The store rows of ``epoch``: recorded for it, or the rows complete now (then recorded)."""
        split_store = self.split()
        path = epoch_file(self.run, epoch)
        keys = split_store.keys()
        if path.is_file():
            saved = json.loads(path.read_text())
            rows = np.asarray(saved["rows"], np.int64)
            if len(rows) and (rows.max() >= len(keys) or not np.array_equal(keys[rows], saved["keys"])):
                raise StoreError(f"{path}: the rows this epoch started with are not in {self.store_path} any more "
                                 "(the store was rebuilt); start a new run")
            return rows
        rows = split_store.usable_rows(self.on_damage)[1]
        atomic_write_json(path, {"epoch": epoch + 1, "split": self.split_name, "rows": rows.tolist(),
                                 "keys": keys[rows].tolist(), "image_ids": split_store.image_ids()[rows].tolist(),
                                 "of_rows": int(len(keys)), "recorded": time.time()})
        console.print(f"epoch {epoch + 1} (--follow): {len(rows)} complete rows of {len(keys)}", markup=False)
        return rows

    def steps(self, epoch: int) -> int:
        """Optimizer steps of a recorded epoch."""
        saved = json.loads(epoch_file(self.run, epoch).read_text())
        n = len(sample_subset(len(saved["rows"]), self.sample_ratio,
                              self.seed + (epoch if self.resample else 0)))
        return math.ceil(n / self.batch_images)

    def schedule(self, epoch: int, epochs: int, warmup_epochs: float) -> tuple[int, int]:
        """(total steps, warm-up steps) of the learning-rate plan from epoch ``epoch`` on."""
        done = sum(self.steps(k) for k in range(epoch))
        return done + (epochs - epoch) * self.steps(epoch), int(warmup_epochs * self.steps(0))


def wait_for_rows(store_path: str, split: str) -> None:
    """Before a ``--follow`` run: wait until the store has a complete row of ``split`` (an extractor may
    have just started; Ctrl-C or SIGTERM stop the wait as any process)."""
    told = False
    while True:
        try:
            open_store(store_path).split(split).usable_rows("skip")
            return
        except BoxrefineError as e:
            if not any(m in str(e) for m in ("no complete rows", "no split", "no feature store here")):
                raise
            if not told:
                console.print(f"--follow: waiting for a complete row of split {split!r} in {store_path}",
                              style="yellow", markup=False)
                told = True
        time.sleep(WAIT_S)
