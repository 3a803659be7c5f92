"""A torch Dataset over rows of a feature store: what train and evaluate feed on (never images)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from boxrefine.shared.geometry import ImageGeometry
from boxrefine.shared.store import F, SplitStore, open_store


class StoreRows(Dataset):
    """Complete rows of one split. The Zarr handle is opened lazily in each process, so the dataset
    is safe to use from forked DataLoader workers.

    Each item: ``row``, ``key``, ``image_embeddings`` 256×64×64 and ``interm_embeddings`` 64×64×C
    (storage dtype), ``gt_boxes`` n×4 (xyxy, original px), ``gt_info`` n×3, ``geometry`` (the
    row's :class:`~boxrefine.shared.geometry.ImageGeometry`),
    and with ``with_masks`` ``gt_masks`` n×S×S uint8 (already in the low-res mask frame).
    """

    def __init__(self, store_path: str, split: str, rows: Sequence[int], records: np.ndarray, keys: np.ndarray,
                 with_masks: bool = False):
        self.store_path, self.split_name = store_path, split
        self.rows = [int(r) for r in rows]
        self.records, self.keys = records, keys
        self.with_masks = with_masks
        self._split: SplitStore | None = None
        self._pid: int | None = None

    @classmethod
    def from_store(cls, store_path: str, split: str, rows: Sequence[int] | None = None,
                   with_masks: bool = False) -> StoreRows:
        """Rows ``rows``, by default every complete row (``SplitStore.usable_rows``: refuses a split
        with none, warns when some are missing)."""
        sp = open_store(store_path).split(split)
        all_records, keys = sp.read_rows(), sp.keys()
        if rows is None:
            rows = sp.usable_rows().tolist()
        return cls(store_path, split, rows, all_records, keys, with_masks)

    def split(self) -> SplitStore:
        if self._split is None or self._pid != os.getpid():
            self._split = open_store(self.store_path).split(self.split_name)
            self._pid = os.getpid()
        return self._split

    def __len__(self) -> int:
        return len(self.rows)

    def read_gt(self, i: int, masks: bool = False) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """Ground truth of store row ``i`` (see ``SplitStore.read_gt``), sized by its record."""
        return self.split().read_gt(i, int(self.records[i][F["n_instances"]]), masks=masks)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i = self.rows[k]
        sp = self.split()
        rec = self.records[i]
        emb, interm = sp.read_features(i)
        gt_masks, gt_boxes, gt_info = self.read_gt(i, masks=self.with_masks)
        item = {
            "row": i, "key": int(self.keys[i]),
            "image_embeddings": emb, "interm_embeddings": interm,
            "gt_boxes": torch.from_numpy(gt_boxes), "gt_info": torch.from_numpy(gt_info),
            "geometry": row_geometry(rec),
        }
        if gt_masks is not None:
            item["gt_masks"] = torch.from_numpy(gt_masks)
        return item


def row_geometry(record: np.ndarray) -> ImageGeometry:
    """The frames of a store row, from its record (original and input sizes as extract wrote them)."""
    return ImageGeometry((int(record[F["orig_h"]]), int(record[F["orig_w"]])),
                         (int(record[F["input_h"]]), int(record[F["input_w"]])))


def collate_rows(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the per-image features (same shape for every row); keep the rest as lists. No items (a
    DDP rank's empty part of a step) make a batch with no rows."""
    if not items:
        return {"row": [], "key": []}
    out: dict[str, Any] = {k: [it[k] for it in items] for k in items[0]}
    out["image_embeddings"] = torch.stack(out["image_embeddings"])
    out["interm_embeddings"] = torch.stack(out["interm_embeddings"])
    return out
