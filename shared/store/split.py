"""One split of the feature store: its rows, their records, and the checks every read makes.

A row's record (``rows``, one chunk per row, ``ROW_FIELDS``) is its commit (docs/architecture.md,
"Crash protocol") and carries the crc32c of the values of each of the row's arrays
(``crc_<array>``); every chunk also ends with the crc32c of its stored bytes (zarr's ``crc32c``
codec). A read that fails either check raises :class:`StoreDamage`, naming split, row, image file and
array (docs/architecture.md, "Integrity"). Each record also holds the row's ``generation`` (incremented
by every write of the row), and :meth:`SplitStore.read_row` checks the record again after reading the
chunks, so a row rewritten while it is read is read again or left out, never served torn
(docs/architecture.md, "Concurrent readers"). Readers open a split through the row index
(``shared/store/row_index.py``), not one request per row.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from boxrefine.shared.data.records import file_sha256, load_coco
from boxrefine.shared.errors import first_line
from boxrefine.shared.runtime.console import console
from boxrefine.shared.store.codecs import digest, from_storage
from boxrefine.shared.store.direct import ChunkDamage, DirectReader
from boxrefine.shared.store.location import StoreError, raise_environment, store_access
from boxrefine.shared.store.row_index import read_index
from boxrefine.shared.store.schema import (
    DIGEST,
    FIELD,
    REPAIR,
    ROW_FIELDS,
    STATE_BAD,
    STATE_COMPLETE,
    STATE_DAMAGED,
    STATE_EMPTY,
    STATE_NAMES,
    STATE_STALE,
)


class RowBusy(Exception):
    """A row that was rewritten (or cleared) while it was being read and is not complete now, or kept
    changing: not damage; the reader leaves it out this time (``SplitStore.read_row``)."""
    def __init__(self, row: int, record: np.ndarray | None = None):
        super().__init__(f"row {row} is being rewritten")
        self.row, self.record = row, record


class StoreDamage(StoreError):
    """Content of a store that fails its checksums. ``detail`` names split, row, image file and
    array (without the store path and the repair hint)."""
    def __init__(self, path: str, detail: str, split: str, row: int | None, array: str, hint: str = REPAIR):
        super().__init__(f"{path}: damaged store: {detail}; {hint.format(path=path)}")
        self.detail, self.split, self.row, self.array = detail, split, row, array


def _reason(e: BaseException) -> str:
    text = str(e)
    if "checksum do not match" in text:
        return "the chunk fails its crc32c checksum (its stored bytes changed)"
    return f"the chunk cannot be decoded ({type(e).__name__}: {first_line(e, 120) if text.strip() else ''})"


class SplitStore:
    """One split of a store. Methods document the row protocol; arrays are opened lazily. Reads
    check every chunk's checksum and every row's digests (:class:`StoreDamage` on a mismatch)."""
    def __init__(self, group: zarr.Group, name: str, dtype: str, store_path: str,
                 marked_stale: dict[int, np.ndarray] | None = None):
        """``marked_stale``: the records of the rows that laying the split out just marked stale."""
        self.group, self.name, self.dtype, self.store_path = group, name, dtype, store_path
        self._arrays: dict[str, zarr.Array] = {}
        self.damaged_records: dict[int, StoreDamage] = {}  # rows whose record failed its checksum (read_rows)
        self._files: dict[int, str] | None = None
        self.on_record: Callable[[int, np.ndarray], None] | None = None
        self.marked_stale: dict[int, np.ndarray] = marked_stale or {}
        self.direct = DirectReader(group, self.array)  # a row's chunks without zarr's per-call cost

    def watch_records(self, callback: Callable[[int, np.ndarray], None]) -> None:
        """Call ``callback(row, record)`` with every record this split writes (the row index's part)."""
        self.on_record = callback

    def array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            with store_access(self.store_path, f"open {self.name}/{name}"):
                self._arrays[name] = self.group[name]
        return self._arrays[name]

    def _get(self, name: str, sel: Any, row: int | None) -> np.ndarray:
        """``array(name)[sel]``; a chunk failing its checksum raises StoreDamage for ``row``."""
        arr = self.array(name)
        try:
            return arr[sel]
        except (ValueError, RuntimeError) as e:  # crc32c mismatch (ValueError), codec failure
            raise self.damage(row, name, _reason(e)) from None
        except Exception as e:
            raise_environment(self.store_path, f"read {self.name}/{name}", e)
            raise

    def _row(self, name: str, i: int, n: int | None = None) -> tuple[np.ndarray, int | None]:
        """Row ``i`` of ``name`` (``n``: its first n along axis 1) and the crc32c of its values when the
        read already has it; straight from the chunk objects where ``shared/store/direct.py`` can."""
        if not self.direct.handles(name):
            return np.asarray(self._get(name, i if n is None else (i, slice(0, n)), i)), None
        try:
            return self.direct.read(name, i, n)
        except ChunkDamage as e:
            raise self.damage(i, name, e.reason) from None
        except Exception as e:
            raise_environment(self.store_path, f"read {self.name}/{name}", e)
            raise

    def damage(self, row: int | None, array: str, reason: str) -> StoreDamage:
        where = f"split {self.name}" + (f", row {row} ({self.describe_row(row)})" if row is not None else "")
        hint = REPAIR
        if row is None:
            hint = ("`boxrefine extract` rewrites it" if array == "image_ids" else
                    "the split's row layout is lost: rebuild the store with `boxrefine extract --overwrite`")
        return StoreDamage(self.store_path, f"{where}, array {array}: {reason}", self.name, row, array, hint)

    def describe_row(self, i: int) -> str:
        """``image id 17, /data/images/0003.png``: what the store and its annotation file say of row i."""
        parts = []
        try:
            parts.append(f"image id {int(self.image_ids()[i])}")
            key = int(self.keys()[i])
        except StoreError:
            return "image unknown: the split's index arrays are damaged"
        if self._files is None:
            self._files = {}
            try:

                ann = self.group.attrs.get("annotations", {}).get("path")
                root = self.group.attrs.get("images_root", "")
                self._files = {r.key: f"{root}/{r.file_name}" for r in load_coco(ann).images}
            except Exception:  # advisory: the annotation file may have moved or changed
                pass
        parts.append(self._files.get(key, "file not in the current annotation file"))
        return ", ".join(parts)

    @property
    def n_rows(self) -> int:
        return int(self.array("keys").shape[0])

    @property
    def max_instances(self) -> int:
        return int(self.array("gt_info").shape[1])

    def keys(self) -> np.ndarray:
        return self._get("keys", slice(None), None)

    def image_ids(self) -> np.ndarray:
        return self._get("image_ids", slice(None), None)

    def read_rows(self, rows: np.ndarray | None = None) -> np.ndarray:
        """The per-row records (the truth: one small chunk per row), N×len(ROW_FIELDS) int64, or only
        those of ``rows`` (the others zero). A record that fails its checksum reads as state DAMAGED
        (extract redoes it) and is listed in ``damaged_records``. Costs one request per row: readers
        open a split with :meth:`records` (the row index) instead."""
        self.damaged_records = {}
        n = int(self.array("rows").shape[0])
        out = np.zeros((n, len(ROW_FIELDS)), np.int64)
        which = np.arange(n) if rows is None else np.asarray(rows, np.int64)
        if len(which) == 0:
            return out
        try:  # one call; a record failing its checksum fails it, then each row is read alone
            out[which] = self._get("rows", slice(None) if rows is None else (which, slice(None)), None)
            return out
        except StoreDamage:
            pass
        for i in which.tolist():
            try:
                out[i] = self._get("rows", i, i)
            except StoreDamage as e:
                out[i, FIELD["state"]] = STATE_DAMAGED
                self.damaged_records[i] = e
        return out

    def records(self) -> np.ndarray:
        """Every row's record as the row index has it (``shared/store/row_index.py``: a few requests), rows
        the index does not cover read from their own records. For train, evaluate and info: a row it
        lists may have been rewritten since, which ``read_row`` notices; extract and verify use
        :meth:`read_rows`."""

        self.array("rows")  # its metadata (one small read): corrupt, it is reported here as before the index
        index = read_index(self)
        if index is None:
            return self.read_rows()
        merged, covered = index
        if covered.all():
            self.damaged_records = {}
            return merged
        rest = np.flatnonzero(~covered)
        truth = self.read_rows(rest)
        merged[rest] = truth[rest]
        return merged

    def read_record(self, i: int) -> np.ndarray:
        return self._row("rows", i)[0]

    def complete_indices(self) -> np.ndarray:
        return np.flatnonzero(self.read_rows()[:, FIELD["state"]] == STATE_COMPLETE)

    def usable_rows(self, on_damage: str = "error") -> tuple[np.ndarray, np.ndarray]:
        """(all records, indices of the complete rows), for train and evaluate. A record failing its
        checksum stops the run (``store.on_damage: error``) or is reported and left out (``skip``); a
        split with no complete row is refused (StoreError naming the store and the split), one with
        only some says how many are missing."""
        records = self.records()
        for err in self.damaged_records.values():
            if on_damage == "error":
                raise err
            console.print(f"skipped (store.on_damage: skip): {err}", markup=False, style="yellow")
        states = records[:, FIELD["state"]]
        n_images = int((states != STATE_STALE).sum())  # stale rows left the annotations
        complete = np.flatnonzero(states == STATE_COMPLETE)
        n_bad = int((states == STATE_BAD).sum())
        bad = f"{n_bad} bad, listed by `boxrefine store info`" if n_bad else ""
        if len(complete) == 0:
            raise StoreError(f"{self.store_path}: split {self.name!r} has no complete rows (0 of {n_images} images"
                             + (f"; {bad}" if bad else "") + "); run extract first")
        if len(complete) < n_images:
            missing = n_images - len(complete) - n_bad
            console.print(f"{self.store_path}: split {self.name!r}: {len(complete)} of {n_images} images complete"
                          + ("; run extract" if missing else "") + (f" ({bad})" if bad else ""),
                          style="yellow", markup=False)
        return records, complete

    @property
    def annotations_sha256(self) -> str | None:
        """sha256 of the annotation file this split's GT was extracted from."""
        return (self.group.attrs.get("annotations") or {}).get("sha256")

    @property
    def has_ground_truth(self) -> bool:
        """False for an images-only split (extracted from a folder or a COCO file without annotations):
        its rows hold features and no GT."""
        return (self.group.attrs.get("annotations") or {}).get("ground_truth", True) is not False

    def require_ground_truth(self) -> None:
        """Refuse an images-only split where ground truth is needed (training, scoring)."""
        if not self.has_ground_truth:
            source = (self.group.attrs.get("annotations") or {}).get("path") or self.group.attrs.get("images_root")
            raise StoreError(f"{self.store_path}: split {self.name!r} holds images only (no annotations, from "
                             f"{source}): nothing to train on or score; `boxrefine refine` uses such splits")

    def layout_digest(self) -> str | None:
        """sha256 of the published row keys: changes whenever rows are added."""
        return (self.group.attrs.get("layout") or {}).get("keys_sha256")

    def check_annotations(self, path: Path) -> None:
        """Refuse GT extracted from another version of ``path``: stale GT must never be scored or
        trained on silently."""

        try:
            now = file_sha256(path)
        except OSError:
            console.print(f"warning: {path}: annotations not readable; cannot check that the store's GT of split "
                          f"{self.name!r} is current", style="yellow", markup=False)
            return
        if now != self.annotations_sha256:
            raise StoreError(f"{path}: annotations changed since extract (split {self.name!r} of {self.store_path} "
                             f"has sha256 {str(self.annotations_sha256)[:12]}…, the file {now[:12]}…): run "
                             "`boxrefine extract` (GT only, no encoder work)")

    # ---- writing (extract only) -------------------------------------------------------------
    def _put_record(self, i: int, row: np.ndarray) -> np.ndarray:
        """Write row ``i``'s record and tell the row index (``on_record``); returns the record."""
        self.array("rows")[i] = row
        if self.on_record is not None:
            self.on_record(i, row)
        return row

    def mark(self, i: int, state: int, generation: int) -> np.ndarray:
        """Write a record holding only ``state`` and ``generation``; returns it."""
        row = np.zeros(len(ROW_FIELDS), np.int64)
        row[FIELD["state"]], row[FIELD["generation"]] = state, generation
        return self._put_record(i, row)

    def clear_row(self, i: int, generation: int = 0) -> None:
        """Step 1 of rewriting a row (as ``generation``): readers stop trusting it before any chunk changes."""
        self.mark(i, STATE_EMPTY, generation)

    def next_generation(self, i: int) -> int:
        """The generation a new write of row ``i`` gets: its record's + 1 (the row index's when the record
        itself is unreadable, so that the new record supersedes the index's)."""
        try:
            own = int(self.read_record(i)[FIELD["generation"]])
        except StoreDamage:
            own = 0
        index = read_index(self)  # a record that is lost or unreadable: the index's generation counts too
        return 1 + max(own, int(index[0][i, FIELD["generation"]]) if index is not None and i < len(index[0]) else 0)

    def mark_damaged(self, i: int) -> np.ndarray:
        """``store verify --repair``: readers stop trusting the row and extract recomputes it."""
        return self.mark(i, STATE_DAMAGED, self.next_generation(i))

    def write_features(self, i: int, image_embeddings: np.ndarray, interm_embeddings: np.ndarray) -> dict[str, int]:
        """Write a row's features; returns their digests for the row's record."""
        self.array("image_embeddings")[i] = image_embeddings
        self.array("interm_embeddings")[i] = interm_embeddings
        return {DIGEST["image_embeddings"]: digest(image_embeddings),
                DIGEST["interm_embeddings"]: digest(interm_embeddings)}

    def write_gt(self, i: int, masks: np.ndarray, boxes: np.ndarray, info: np.ndarray) -> dict[str, int]:
        """masks k×S×S uint8, boxes k×4 xyxy, info k×3 — padded here to the split's K. Returns the
        digests of the k instances as stored, for the row's record."""
        k_max, k = self.max_instances, len(boxes)
        if k > k_max:
            raise StoreError(f"{self.store_path}/{self.name}: row {i} has {k} instances, layout holds {k_max}")
        s = self.array("gt_masks").shape[-1]
        pm = np.zeros((k_max, s, s), np.uint8)
        pb = np.full((k_max, 4), np.nan, np.float32)
        pi = np.full((k_max, 3), -1, np.int64)
        pm[:k], pb[:k], pi[:k] = masks, boxes, info
        self.array("gt_masks")[i] = pm
        self.array("gt_boxes")[i] = pb
        self.array("gt_info")[i] = pi
        return {DIGEST["gt_masks"]: digest(pm[:k]), DIGEST["gt_boxes"]: digest(pb[:k]),
                DIGEST["gt_info"]: digest(pi[:k])}

    def commit_row(self, i: int, record: dict[str, int]) -> np.ndarray:
        """Last step: the row's record, with its state (and generation), becomes visible in one atomic
        write. Returns the record written."""
        row = np.zeros(len(ROW_FIELDS), np.int64)
        for k, v in record.items():
            row[FIELD[k]] = int(v)
        return self._put_record(i, row)

    # ---- reading ----------------------------------------------------------------------------
    def _checked(self, i: int, name: str, record: np.ndarray, n: int | None = None) -> np.ndarray:
        a, crc = self._row(name, i, n)
        if (digest(a) if crc is None else crc) != int(record[FIELD[DIGEST[name]]]):
            raise self.damage(i, name, "its values differ from the row's record (a missing, truncated or "
                                       "replaced chunk)")
        return a

    def read_features(self, i: int, record: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embeddings 256×64×64 and interm_embeddings 64×64×C in the storage dtype, checked
        against the row's record (read here unless given)."""
        record = self.read_record(i) if record is None else record
        emb = from_storage(self._checked(i, "image_embeddings", record), self.dtype)
        interm = from_storage(self._checked(i, "interm_embeddings", record), self.dtype)
        return emb, interm

    def read_gt(self, i: int, masks: bool = True, record: np.ndarray | None = None
                ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """The row's instances (their number from its record): masks n×S×S uint8 in SAM's low-res
        frame (None unless ``masks``), boxes n×4 float32 (xyxy, original px), info n×3 int64
        ([annotation id, category id, iscrowd]), checked against the record."""
        record = self.read_record(i) if record is None else record
        n = int(record[FIELD["n_instances"]])
        boxes = self._checked(i, "gt_boxes", record, n).astype(np.float32, copy=False).reshape(-1, 4)
        info = self._checked(i, "gt_info", record, n).astype(np.int64, copy=False).reshape(-1, 3)
        return (self._checked(i, "gt_masks", record, n) if masks else None), boxes, info

    def read_row(self, i: int, record: np.ndarray, features: bool = True, masks: bool = True,
                 retries: int = 2) -> tuple[np.ndarray, tuple[Any, ...]]:
        """Row ``i`` read consistently: its chunks are checked against ``record``, then its record is read
        again. Unchanged: the row is returned as ``(record, (emb, interm, gt_masks, gt_boxes, gt_info))``
        (``emb``/``interm`` None unless ``features``) and a failed check is damage (:class:`StoreDamage`).
        Changed (the row was rewritten meanwhile: another generation) and complete: read again with the
        new record, at most ``retries`` times. Not complete now, or still changing: :class:`RowBusy` —
        chunks of one write are never combined with the record of another, nor reported as damage."""
        for _ in range(retries + 1):
            try:
                self.direct.prefetch(i, int(record[FIELD["n_instances"]]), features, masks)
                emb, interm = self.read_features(i, record=record) if features else (None, None)
                parts, damage = (emb, interm, *self.read_gt(i, masks=masks, record=record)), None
            except StoreDamage as e:
                parts, damage = (), e
            finally:
                self.direct.release()
            now = self.read_record(i)  # after every chunk: the generation check
            if np.array_equal(now, record):
                if damage is not None:
                    raise damage
                return record, parts
            if int(now[FIELD["generation"]]) < int(record[FIELD["generation"]]):
                raise self.lost_record(i, record)  # a rewrite never lowers the generation: the record is gone
            if int(now[FIELD["state"]]) != STATE_COMPLETE:
                raise RowBusy(i, now)
            record = now
        raise RowBusy(i, record)

    def lost_record(self, i: int, known: np.ndarray) -> StoreDamage:
        """The damage of a row whose record reads as never written (its chunk is gone: a missing chunk
        reads as the fill value) while ``known`` (the row index's copy) says it was written."""
        state = STATE_NAMES.get(int(known[FIELD["state"]]), "?")
        return self.damage(i, "rows", f"the row's record is missing (its chunk is gone; the row index says it was "
                                      f"{state}, generation {int(known[FIELD['generation']])})")
