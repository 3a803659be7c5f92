"""Extract planning: which rows of a split need work, and what each row's ground truth and record are.

Incremental: a row is skipped when its record is COMPLETE and both the image file (size, mtime) and
its annotations are unchanged; only the GT is rewritten (no decode, no encoder) when just the
annotations changed. Any other row (empty, torn, DAMAGED, a record failing its checksum) is redone.
A COMPLETE row whose image file is missing (deleted, or its folder not mounted) is never demoted: it
is kept as it is (its GT still rewritten when only the annotations changed) and counted as missing.
``--shard i/n`` takes rows i, i+n, ... of each split; torchrun sets it from RANK/WORLD_SIZE.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from boxrefine.shared.config import PipelineConfig
from boxrefine.shared.data.imageio import source_fingerprint
from boxrefine.shared.data.records import DataError, ImageRecord, instance_mask, resolve_image
from boxrefine.shared.geometry.frames import ImageGeometry
from boxrefine.shared.runtime.shards import parse_shard
from boxrefine.shared.store.schema import DIGEST, FEATURE_ARRAYS, FIELD, STATE_BAD, STATE_COMPLETE, STATE_EMPTY
from boxrefine.shared.store.split import SplitStore


@dataclass
class Job:
    row: int
    record: ImageRecord
    path: Path
    gt_only: bool  # image unchanged, only annotations changed: no decode, no encoder
    generation: int = 1  # the generation this write gives the row (its record's + 1)
    had_record: bool = False  # the row has a record to clear first (crash protocol)
    kept: dict[str, int] = field(default_factory=dict)  # gt_only: the record's feature digests, carried over
    reuse_row: int | None = None  # features copied from this row of --reuse-features (extract/reuse.py)
    fingerprint: tuple[int, int] | None = None  # gt_only: the record's source (size, mtime); the file is not read
    refused: str | None = None  # why the image file is never read (a symlink leading outside the image root)

    @property
    def needs_image(self) -> bool:
        """Whether the image is decoded and encoded (neither a GT-only rewrite nor reused features)."""
        return not self.gt_only and self.reuse_row is None


@dataclass
class SplitSummary:
    split: str
    rows: int
    todo: int = 0
    encoded: int = 0
    gt_only: int = 0
    reused: int = 0  # features copied from --reuse-features instead of encoded
    skipped: int = 0  # up to date (kept bad rows included)
    bad: dict[int, dict[str, str]] = field(default_factory=dict)  # found bad by this run, by key
    kept_bad: dict[int, dict[str, str]] = field(default_factory=dict)  # recorded bad earlier, file unchanged
    missing: dict[int, str] = field(default_factory=dict)  # complete rows kept while their image is missing: file
    no_row: int = 0  # of ``bad``: images-only files whose size is unknown (they get no row)
    elsewhere: int = 0  # rows another extract process claimed after this one planned (extract/claims.py)


def shard_of(cfg: PipelineConfig) -> tuple[int, int]:
    """(i, n): ``extract.shard``, else torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    if cfg.extract.shard:
        return parse_shard(cfg.extract.shard)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


def plan_split(split: SplitStore, records: list[ImageRecord], images_root: Path, shard: tuple[int, int],
               rows: np.ndarray) -> tuple[list[Job], SplitSummary, list[ImageRecord]]:
    """Rows of this shard that need work; returns (jobs, the split's summary so far: rows skipped as up
    to date, complete rows kept while their image is missing, the records of the skipped rows that are
    bad: recorded bad by an earlier run, their file unchanged since).

    A complete row whose image file is unchanged gets a GT-only job (no decode, no encoder) when just
    its annotations changed, but only while the annotated image size is the stored one: a new
    width/height re-encodes the image. ``rows``: the split's records (``SplitStore.read_rows``)."""
    row_of = {int(k): i for i, k in enumerate(split.keys().tolist())}
    jobs, kept_bad = [], []
    summary = SplitSummary(split.name, split.n_rows)
    i_shard, n_shard = shard
    for rec in records:
        i = row_of[rec.key]
        if i % n_shard != i_shard:
            continue
        refused = why = None  # why: the image cannot be seen for another reason than being gone
        try:
            path = resolve_image(images_root, rec.file_name)
            fp: tuple[int, int] | None = source_fingerprint(path)
        except DataError as e:  # a symlink leading outside the image root: never read
            path, fp, refused, why = images_root / rec.file_name, None, str(e), "leads outside the image root"
        except (FileNotFoundError, NotADirectoryError):
            fp = None  # missing
        except OSError as e:
            fp, why = None, f"cannot read: {e.strerror or e}"
        r = rows[i]
        stored = (int(r[FIELD["src_size"]]), int(r[FIELD["src_mtime_ns"]]))
        same_src = stored == (fp or (-1, -1))
        same_size = (int(r[FIELD["orig_h"]]), int(r[FIELD["orig_w"]])) == (rec.height, rec.width)
        same_ann = int(r[FIELD["ann_hash"]]) == rec.ann_hash
        state = int(r[FIELD["state"]])
        write = {"generation": int(r[FIELD["generation"]]) + 1, "had_record": state != STATE_EMPTY}
        if state == STATE_COMPLETE and fp is None:
            # finished work is kept: the store is all train needs
            summary.missing[rec.key] = rec.file_name + (f" ({why})" if why else "")
            same_src = True  # for the GT: it needs the annotations only
            if same_ann or not same_size:
                continue
        if state in (STATE_COMPLETE, STATE_BAD) and same_src and same_ann:
            summary.skipped += 1  # up to date; a bad row keeps its report until the file changes
            if state == STATE_BAD:
                kept_bad.append(rec)
        elif state == STATE_COMPLETE and same_src and same_size:
            kept = {DIGEST[a]: int(r[FIELD[DIGEST[a]]]) for a in FEATURE_ARRAYS}
            jobs.append(Job(i, rec, path, gt_only=True, kept=kept, fingerprint=stored, **write))
        else:
            jobs.append(Job(i, rec, path, gt_only=False, refused=refused, **write))
    summary.todo = len(jobs)
    return jobs, summary, kept_bad


def gt_arrays(rec: ImageRecord, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(masks k×S×S uint8 laid out as SAM lays out its low-res masks (``ImageGeometry.masks_to_lowres``),
    boxes k×4 xyxy original px, info k×3)."""
    if rec.instances:
        masks = np.stack([instance_mask(a, rec.height, rec.width) for a in rec.instances])
    else:
        masks = np.zeros((0, rec.height, rec.width), np.uint8)
    small = ImageGeometry.of(rec.height, rec.width).masks_to_lowres(masks, size)
    boxes = np.array([a.box for a in rec.instances], np.float32).reshape(-1, 4)
    info = np.array([[a.ann_id, a.category_id, a.iscrowd] for a in rec.instances], np.int64).reshape(-1, 3)
    return small, boxes, info


def row_record(rec: ImageRecord, fp: tuple[int, int], state: int, n_inst: int, generation: int = 1) -> dict[str, int]:
    """The store record of a row (see ``ROW_FIELDS``), written last as the row's commit."""
    ih, iw = ImageGeometry.of(rec.height, rec.width).input_hw
    return {"state": state, "src_size": fp[0], "src_mtime_ns": fp[1], "ann_hash": rec.ann_hash,
            "orig_h": rec.height, "orig_w": rec.width, "input_h": ih, "input_w": iw, "n_instances": n_inst,
            "generation": generation}
