"""Tiny stores for the store's tests: a store with one split of four images whose rows are small
(GT masks S×S, C interm channels), rows of seeded random values, and writing a row the way extract does
(clear, chunks, commit)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from boxrefine.shared.config import StoreConfig
from boxrefine.shared.data.records import ImageRecord
from boxrefine.shared.store.codecs import to_storage
from boxrefine.shared.store.feature_store import FeatureStore
from boxrefine.shared.store.identity import StoreIdentity
from boxrefine.shared.store.schema import STATE_COMPLETE

S, C = 16, 8  # GT mask size and interm channels: tiny rows


def tiny_identity(dtype: str = "float16", **changes: Any) -> StoreIdentity:
    """The identity of a random-init vit_tiny store with S×S GT masks (``changes`` replace its fields)."""
    values: dict[str, Any] = dict(model_type="vit_tiny", checkpoint="random-init:seed=0", img_size=1024,
                                  pixel_mean=(123.675, 116.28, 103.53), pixel_std=(58.395, 57.12, 57.375),
                                  dtype=dtype, encoder_precision="float32", gt_mask_size=S,
                                  intensity="percentile:0.5-99.5")
    return StoreIdentity(**{**values, **changes})


def make_images(n: int = 4, k: int = 3, first: int = 0) -> list[ImageRecord]:
    return [ImageRecord(image_id=100 + i, file_name=f"img{i:03d}.png", key=5000 + i, height=48, width=64,
                        instances=tuple(range(k)), ann_hash=7) for i in range(first, first + n)]


def new_store(tmp_path: Path, dtype: str = "float16", images: list[ImageRecord] | None = None,
           codec: str = "zstd") -> tuple[FeatureStore, Any]:
    path = str(tmp_path / "features.zarr")
    store = FeatureStore.open_or_create(StoreConfig(path=path, dtype=dtype, gt_mask_size=S, codec=codec),
                                        tiny_identity(dtype), {"kind": "random-init", "seed": 0}, {"note": "test"})
    split = store.layout_split("train", images or make_images(), {"path": str(tmp_path / "none.json"), "sha256": "ab"},
                               "/images", C)
    return store, split


def make_row(seed: int, k: int = 2) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    masks = np.zeros((k, S, S), np.uint8)
    masks[:, 2 + seed % 5: 9, 3:12] = 1
    return {"emb": torch.randn(256, 64, 64, generator=g), "interm": torch.randn(64, 64, C, generator=g),
            "masks": masks, "boxes": rng.uniform(0, 40, (k, 4)).astype(np.float32),
            "info": np.stack([np.arange(k) + 10 * seed, np.full(k, 1 + seed), np.zeros(k)], 1).astype(np.int64)}


def write_row(split: Any, i: int, row: dict[str, Any], generation: int = 1, dtype: str = "float16") -> np.ndarray:
    k = len(row["boxes"])
    split.clear_row(i, generation)
    digests = split.write_features(i, to_storage(row["emb"], dtype), to_storage(row["interm"], dtype))
    digests.update(split.write_gt(i, row["masks"], row["boxes"], row["info"]))
    return split.commit_row(i, {"state": STATE_COMPLETE, "orig_h": 48, "orig_w": 64, "input_h": 768,
                                "input_w": 1024, "n_instances": k, "generation": generation, **digests})


def read_all(split: Any, i: int) -> None:
    split.read_features(i)
    split.read_gt(i)
