"""A demo data set of a given size, its config and its store, under one bench work folder, so that
every bench of ``make bench`` measures the same images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from boxrefine.shared.config import PipelineConfig, load_config
from boxrefine.shared.dev.demo import generate_demo

REPO = Path(__file__).resolve().parents[1]


def bench_config(work: Path, n_train: int, model_type: str = "vit_tiny", fast: bool = False,
                 config: Path = REPO / "pipeline.yaml", num_val: int = 1,
                 overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """``config`` pointed at ``work/demo-<n_train>`` (generated once: ``n_train`` train images, 1 val;
    ``demo-<n_train>-<num_val>val`` for more) and at the store ``<that folder>/<model_type>.zarr``, on
    the CPU, with the dotted ``overrides`` last."""
    root = Path(work).resolve() / (f"demo-{n_train}" if num_val == 1 else f"demo-{n_train}-{num_val}val")
    if not (root / "annotations" / "instances_train.json").exists():
        generate_demo(root, num_train=n_train, num_val=num_val, seed=0)
    over = {"model.type": model_type, "model.device": "cpu", "store.path": str(root / f"{model_type}.zarr")}
    for split in ("train", "val"):
        over[f"data.splits.{split}.images"] = str(root / "images" / split)
        over[f"data.splits.{split}.annotations"] = str(root / "annotations" / f"instances_{split}.json")
        over[f"data.splits.{split}.detections"] = str(root / "annotations" / f"detections_{split}.json")
    return load_config(config, {**over, **(overrides or {})}, fast=fast)
