"""A torch Dataset over rows of a feature store: what train and evaluate feed on (never images)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from boxrefine.shared.errors import BoxrefineError
from boxrefine.shared.geometry.frames import ImageGeometry
from boxrefine.shared.runtime.console import console
from boxrefine.shared.store.feature_store import open_store
from boxrefine.shared.store.location import StoreError
from boxrefine.shared.store.schema import FIELD
from boxrefine.shared.store.split import RowBusy, SplitStore, StoreDamage


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

    Rows may be rewritten while they are read (an extract running beside train): every read checks the
    row's record again after its chunks (``SplitStore.read_row``), so a rewritten row is read again in
    its new version, and one being rewritten right now is left out of this pass (``busy``: reported
    once per row by :meth:`accept`), never served torn nor reported as damage.
    """

    def __init__(self, store_path: str, split: str, rows: Sequence[int], records: np.ndarray, keys: np.ndarray,
                 with_masks: bool = False, on_damage: str = "error"):
        self.store_path, self.split_name = store_path, split
        self.rows = [int(r) for r in rows]
        self.records, self.keys = records, keys
        self.with_masks, self.on_damage = with_masks, on_damage
        self.skipped: dict[int, str] = {}  # row → damage, rows left out under on_damage="skip"
        self.busy: set[int] = set()  # rows left out of a pass because they were being rewritten
        self._split: SplitStore | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for spawned DataLoader workers (``shared/runtime/workers.py``): each opens the store anew."""
        return {**self.__dict__, "_split": None, "_pid": None}

    @classmethod
    def from_store(cls, store_path: str, split: str, rows: Sequence[int] | None = None,
                   with_masks: bool = False, on_damage: str = "error") -> StoreRows:
        """Rows ``rows``, by default every usable row (``SplitStore.usable_rows``: damaged records
        follow ``on_damage``; a split with no complete row is refused, a partial one warned about)."""
        split_store = open_store(store_path).split(split)
        all_records, complete = split_store.usable_rows(on_damage)
        return cls(store_path, split, complete.tolist() if rows is None else rows, all_records, split_store.keys(),
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
            _, (_, _, *gt) = self.split().read_row(i, self.records[i], features=False, masks=masks)
            return tuple(gt)  # type: ignore[return-value]
        except StoreDamage as e:
            self._damaged(i, str(e))
            return None
        except RowBusy:
            self._busy([i])
            return None

    def __getitem__(self, k: int) -> dict[str, Any]:
        i = self.rows[k]
        if i in self.skipped:
            return {"row": i, "damage": self.skipped[i]}
        split_store = self.split()
        try:
            rec, (emb, interm, gt_masks, gt_boxes, gt_info) = split_store.read_row(i, self.records[i],
                                                                                   masks=self.with_masks)
        except StoreDamage as e:
            return {"row": i, "damage": str(e)}
        except RowBusy:
            return {"row": i, "busy": True}
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
        self._busy(batch.pop("busy", []))
        return batch if batch["row"] else None

    def _busy(self, rows: list[int]) -> None:
        new = [i for i in rows if i not in self.busy]
        if new:
            console.print(f"{self.store_path}: split {self.split_name!r}: row(s) {new} are being rewritten "
                          "(by extract) and are left out this time", style="yellow", markup=False)
        self.busy.update(rows)


def row_geometry(record: np.ndarray) -> ImageGeometry:
    """The frames of a store row, from its record (original and input sizes as extract wrote them)."""
    return ImageGeometry((int(record[FIELD["orig_h"]]), int(record[FIELD["orig_w"]])),
                         (int(record[FIELD["input_h"]]), int(record[FIELD["input_w"]])))


def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack``; in a DataLoader worker straight into shared memory (as torch's ``default_collate``),
    so that handing the batch to the main process copies nothing more."""
    out = None
    if get_worker_info() is not None:
        first = tensors[0]
        storage = first._typed_storage()._new_shared(first.numel() * len(tensors), device=first.device)
        out = first.new(storage).resize_(len(tensors), *first.shape)
    return torch.stack(tensors, out=out)


def collate_rows(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the per-image features (same shape for every row); keep the rest as lists. Damaged or
    unreadable rows go to ``damaged`` as (row, message, fatal), rows being rewritten to ``busy``, for
    :meth:`StoreRows.accept`. No items (a DDP rank's empty part of a step) make a batch with no rows."""
    damaged = [(it["row"], it["damage"], it.get("fatal", False)) for it in items if "damage" in it]
    busy = [it["row"] for it in items if "busy" in it]
    items = [it for it in items if "damage" not in it and "busy" not in it]
    if not items:
        return {"row": [], "key": [], "damaged": damaged, "busy": busy}
    out: dict[str, Any] = {k: [it[k] for it in items] for k in items[0]}
    out["image_embeddings"] = stack(out["image_embeddings"])
    out["interm_embeddings"] = stack(out["interm_embeddings"])
    if damaged:
        out["damaged"] = damaged
    if busy:
        out["busy"] = busy
    return out
