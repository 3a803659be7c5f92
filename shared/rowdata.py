"""A torch Dataset over rows of a feature store: what train and evaluate feed on (never images)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from boxrefine.shared.console import console
from boxrefine.shared.errors import BoxrefineError
from boxrefine.shared.geometry import ImageGeometry
from boxrefine.shared.store import F, SplitStore, StoreDamage, StoreError, open_store


class StoreRows(Dataset):
    """Complete rows of one split. The Zarr handle is opened lazily in each process, so the dataset
    is safe to use from forked DataLoader workers.

    Each item: ``row``, ``key``, ``image_embeddings`` 256×64×64 and ``interm_embeddings`` 64×64×C
    (storage dtype), ``gt_boxes`` n×4 (xyxy, original px), ``gt_info`` n×3, ``geometry`` (the
    row's :class:`~boxrefine.shared.geometry.ImageGeometry`),
    and with ``with_masks`` ``gt_masks`` n×S×S uint8 (already in the low-res mask frame).

    Damage (a row failing its checksums, :class:`StoreDamage`) never crosses a worker boundary as an
    exception: the item carries its message instead (``damage``), and :meth:`accept`, in the main
    process, stops the run (``on_damage="error"``) or reports the row once and drops it ("skip").
    Any other one-line error (an unreadable store) travels the same way and always stops the run.
    """

    def __init__(self, store_path: str, split: str, rows: Sequence[int], records: np.ndarray, keys: np.ndarray,
                 with_masks: bool = False, on_damage: str = "error"):
        self.store_path, self.split_name = store_path, split
        self.rows = [int(r) for r in rows]
        self.records, self.keys = records, keys
        self.with_masks, self.on_damage = with_masks, on_damage
        self.skipped: dict[int, str] = {}  # row → damage, rows left out under on_damage="skip"
        self._split: SplitStore | None = None
        self._pid: int | None = None

    @classmethod
    def from_store(cls, store_path: str, split: str, rows: Sequence[int] | None = None,
                   with_masks: bool = False, on_damage: str = "error") -> StoreRows:
        """Rows ``rows``, by default every usable row (``SplitStore.usable_rows``: damaged records
        follow ``on_damage``; a split with no complete row is refused, a partial one warned about)."""
        sp = open_store(store_path).split(split)
        all_records, complete = sp.usable_rows(on_damage)
        return cls(store_path, split, complete.tolist() if rows is None else rows, all_records, sp.keys(),
                   with_masks, on_damage)

    def split(self) -> SplitStore:
        if self._split is None or self._pid != os.getpid():
            self._split = open_store(self.store_path).split(self.split_name)
            self._pid = os.getpid()
        return self._split

    def __len__(self) -> int:
        return len(self.rows)

    def _damaged(self, i: int, message: str) -> None:
        """Main process: stop, or report row ``i`` once and leave it out from now on."""
        if self.on_damage == "error":
            raise StoreError(message)
        if i not in self.skipped:
            console.print(f"skipped (store.on_damage: skip): {message}", markup=False, style="yellow")
        self.skipped[i] = message

    def read_gt(self, i: int, masks: bool = False) -> tuple[np.ndarray | None, np.ndarray, np.ndarray] | None:
        """Ground truth of store row ``i`` (see ``SplitStore.read_gt``), checked against its record;
        None for a damaged row under ``on_damage="skip"``. Main process only."""
        try:
            return self.split().read_gt(i, masks=masks, record=self.records[i])
        except StoreDamage as e:
            self._damaged(i, str(e))
            return None

    def __getitem__(self, k: int) -> dict[str, Any]:
        i = self.rows[k]
        if i in self.skipped:
            return {"row": i, "damage": self.skipped[i]}
        sp = self.split()
        rec = self.records[i]
        try:
            emb, interm = sp.read_features(i, record=rec)
            gt_masks, gt_boxes, gt_info = sp.read_gt(i, masks=self.with_masks, record=rec)
        except StoreDamage as e:
            return {"row": i, "damage": str(e)}
        except BoxrefineError as e:  # an unreadable store (permissions, network): always stops the run
            return {"row": i, "damage": str(e), "fatal": True}
        item = {
            "row": i, "key": int(self.keys[i]),
            "image_embeddings": emb, "interm_embeddings": interm,
            "gt_boxes": torch.from_numpy(gt_boxes), "gt_info": torch.from_numpy(gt_info),
            "geometry": row_geometry(rec),
        }
        if gt_masks is not None:
            item["gt_masks"] = torch.from_numpy(gt_masks)
        return item

    def accept(self, batch: dict[str, Any]) -> dict[str, Any] | None:
        """A collated batch with its damaged rows handled (main process); None when none is left."""
        for i, message, fatal in batch.pop("damaged", []):
            if fatal:
                raise StoreError(message)
            self._damaged(i, message)
        return batch if batch["row"] else None


def row_geometry(record: np.ndarray) -> ImageGeometry:
    """The frames of a store row, from its record (original and input sizes as extract wrote them)."""
    return ImageGeometry((int(record[F["orig_h"]]), int(record[F["orig_w"]])),
                         (int(record[F["input_h"]]), int(record[F["input_w"]])))


def collate_rows(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the per-image features (same shape for every row); keep the rest as lists. Damaged or
    unreadable rows go to ``damaged`` as (row, message, fatal), for :meth:`StoreRows.accept`. No items (a
    DDP rank's empty part of a step) make a batch with no rows."""
    damaged = [(it["row"], it["damage"], it.get("fatal", False)) for it in items if "damage" in it]
    items = [it for it in items if "damage" not in it]
    if not items:
        return {"row": [], "key": [], "damaged": damaged}
    out: dict[str, Any] = {k: [it[k] for it in items] for k in items[0]}
    out["image_embeddings"] = torch.stack(out["image_embeddings"])
    out["interm_embeddings"] = torch.stack(out["interm_embeddings"])
    if damaged:
        out["damaged"] = damaged
    return out
