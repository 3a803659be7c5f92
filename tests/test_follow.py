"""``train --follow``: each epoch trains on the rows complete when it starts (an extractor fills the
store meanwhile), records them, and ``--resume`` trains a resumed epoch on exactly its recorded rows."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from conftest import copy_store, make_config
from test_train import _assert_same_training

from boxrefine.shared.model.checkpoint import load_checkpoint
from boxrefine.shared.store.feature_store import FeatureStore
from boxrefine.shared.store.row_index import IndexPart
from boxrefine.shared.store.schema import FIELD, ROW_FIELDS
from boxrefine.train import follow
from boxrefine.train.recipe import TrainRecipe, run_train


class Extractor:
    """Stands in for an extractor filling the train split: rows ``missing`` start cleared (their chunks
    stay), :meth:`finish` commits them again (a new generation), updating the row index as extract does."""

    def __init__(self, store: Path, missing: list[int]):
        self.split = FeatureStore.open(str(store), "a").split("train")
        self.part = IndexPart(self.split, (0, 1))
        self.part.load(self.split.read_rows())
        self.split.watch_records(self.part.set)
        self.saved = {i: self.split.read_record(i).copy() for i in missing}
        for i, rec in self.saved.items():
            self.split.clear_row(i, int(rec[FIELD["generation"]]) + 1)
        self.part.flush()

    def finish(self, i: int) -> None:
        rec = self.saved[i].copy()
        rec[FIELD["generation"]] += 2
        self.split.commit_row(i, dict(zip(ROW_FIELDS, rec.tolist(), strict=True)))
        self.part.flush()


def _cfg(demo_root: Path, store: Path, runs: Path):
    return make_config(demo_root, store, train={"runs_dir": str(runs), "epochs": 2, "batch_images": 1,
                                                "boxes_per_image": 4, "num_workers": 0, "eval_every": 1,
                                                "name": "run", "follow": True},
                       refiner={"use_mask": False, "hidden": 32})


def _finish_before_epoch(monkeypatch, ex: Extractor, epoch: int, row: int) -> None:
    real = follow.FollowRows.rows

    def rows(self, e):
        if e == epoch and not follow.epoch_file(self.run, e).exists():
            ex.finish(row)
        return real(self, e)

    monkeypatch.setattr(follow.FollowRows, "rows", rows)


def _recorded(run: Path, epoch: int) -> list[int]:
    return json.loads(follow.epoch_file(run, epoch).read_text())["rows"]


def test_follow_epochs_use_the_rows_complete_at_their_start_and_resume_exactly(demo_root, reference_store, tmp_path,
                                                                                monkeypatch):
    # straight: epoch 1 on rows 0, 1; row 2 completes before epoch 2 starts
    ex = Extractor(copy_store(reference_store, tmp_path / "a"), [2, 3])
    _finish_before_epoch(monkeypatch, ex, 1, 2)
    straight = run_train(_cfg(demo_root, Path(ex.split.store_path), tmp_path / "ra"))
    assert straight.epochs_done == 2
    assert sorted(_recorded(straight.run_dir, 0)) == [0, 1] and sorted(_recorded(straight.run_dir, 1)) == [0, 1, 2]
    epochs = [json.loads(ln) for ln in (straight.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["images"] for e in epochs if e["kind"] == "epoch"] == [2, 3]

    # the same, stopped by SIGTERM in epoch 2's first step; row 3 completes before --resume, which
    # still trains epoch 2 on the rows it started with
    ex = Extractor(copy_store(reference_store, tmp_path / "b"), [2, 3])
    _finish_before_epoch(monkeypatch, ex, 1, 2)
    real, calls = TrainRecipe._optimizer_step, {"n": 0}

    def stepping(self, loss):
        real(self, loss)
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(TrainRecipe, "_optimizer_step", stepping)
    cfg_b = _cfg(demo_root, Path(ex.split.store_path), tmp_path / "rb")
    first = run_train(cfg_b)
    assert first.interrupted and load_checkpoint(first.run_dir / "last.pt")["state"]["epoch"] == 1
    monkeypatch.undo()
    ex.finish(3)
    resumed = run_train(cfg_b, resume=first.run_dir)
    assert resumed.epochs_done == 2 and sorted(_recorded(first.run_dir, 1)) == [0, 1, 2]
    _assert_same_training(straight.run_dir, first.run_dir)
