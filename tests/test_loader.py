"""Train's DataLoader settings: ``train.prefetch_batches`` (the read-ahead of each worker) and pinned
memory on CUDA (the batches are then copied with ``non_blocking``: ``train/steps.py``)."""

from __future__ import annotations

from pathlib import Path

from conftest import make_config

from boxrefine.shared.store.feature_store import open_store
from boxrefine.train.data import TrainData


def test_prefetch_depth_and_pinned_memory_reach_the_loader(reference_store: Path, demo_root: Path) -> None:
    cfg = make_config(demo_root, reference_store, train={"num_workers": 1, "prefetch_batches": 5})
    data = TrainData(cfg, open_store(str(reference_store)), pin_memory=True)
    assert data.loader.prefetch_factor == 5 and data.loader.pin_memory
    cfg = make_config(demo_root, reference_store, train={"num_workers": 0})
    data = TrainData(cfg, open_store(str(reference_store)))
    assert data.loader.prefetch_factor is None and not data.loader.pin_memory
