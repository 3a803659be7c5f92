"""``boxrefine store verify``: read every complete row of a store and check it (docs/architecture.md,
"Integrity"), and with ``repair`` mark the damaged rows so that the next extract recomputes them.

Every chunk is read through the same checks train and evaluate make (crc32c of the stored bytes,
then the row record's digests of the values), so a row verify passes is a row they accept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from boxrefine.shared.store.feature_store import FeatureStore
from boxrefine.shared.store.location import StoreError, store_access
from boxrefine.shared.store.row_index import IndexPart, read_index
from boxrefine.shared.store.schema import FIELD, STATE_COMPLETE, STATE_DAMAGED
from boxrefine.shared.store.split import SplitStore, StoreDamage


@dataclass
class VerifyReport:
    checked: int = 0  # rows whose record says complete (or whose record failed its checksum)
    damaged: list[StoreDamage] = field(default_factory=list)  # one per damaged row (its first problem)
    split_problems: list[StoreError] = field(default_factory=list)  # damaged index arrays / metadata
    repaired: int = 0  # damaged rows marked DAMAGED for extract to recompute

    @property
    def clean(self) -> bool:
        return not self.damaged and not self.split_problems


def lost_records(split: SplitStore, records: np.ndarray) -> dict[int, StoreDamage]:
    """Rows whose record (``records``: ``split.read_rows()``) reads as never written while the row
    index holds a written one: their record chunk was lost, and the row with it."""
    index = read_index(split)
    if index is None:
        return {}
    merged, covered = index
    n = min(len(records), len(merged))
    never = (records[:n] == 0).all(axis=1)
    lost = np.flatnonzero(never & covered[:n] & (merged[:n, FIELD["generation"]] > 0))
    return {int(i): split.lost_record(int(i), merged[i]) for i in lost}


def rows_to_check(split: SplitStore) -> tuple[list[int], list[StoreDamage]]:
    """Complete rows, and the damage of records that fail their own checksum or are lost (read as
    never written while the row index says they were written)."""
    rows = split.read_rows()
    complete = [int(i) for i in (rows[:, FIELD["state"]] == STATE_COMPLETE).nonzero()[0]]
    return complete, [*split.damaged_records.values(), *lost_records(split, rows).values()]


def check_row(split: SplitStore, i: int) -> StoreDamage | None:
    """Read all of row ``i`` with every check; its first damage, or None."""
    try:
        record = split.read_record(i)
        split.read_features(i, record=record)
        split.read_gt(i, masks=True, record=record)
    except StoreDamage as e:
        return e
    return None


def verify_store(store: FeatureStore, splits: list[str] | None = None, repair: bool = False,
                 on_row: Callable[[], None] | None = None) -> VerifyReport:
    """Check the rows of ``splits`` (default: all). ``store`` must be open for writing to ``repair``.
    ``on_row()`` is called after each row read (progress)."""
    report = VerifyReport()
    for name in splits or store.splits:
        split = store.split(name)
        try:
            split.keys()
            split.image_ids()
            complete, damaged = rows_to_check(split)
        except StoreError as e:  # a damaged index array, or unreadable metadata: the split cannot be walked
            report.split_problems.append(e)
            continue
        report.checked += len(complete) + len(damaged)
        for i in complete:
            err = check_row(split, i)
            if err is not None:
                damaged.append(err)
            if on_row is not None:
                on_row()
        report.damaged += damaged
        if repair and damaged:
            part = IndexPart(split, (0, 1), name="verify")  # readers learn of the marks through the row index
            part.load(split.read_rows())
            split.watch_records(part.set)
            with store_access(store.path, f"mark damaged rows of {name}"):
                for err in damaged:
                    assert err.row is not None
                    split.mark_damaged(err.row)
                    report.repaired += 1
            part.flush()
    return report


def count_rows(store: FeatureStore, splits: list[str] | None = None) -> int:
    """How many rows ``verify_store`` will read (for a progress bar)."""
    total = 0
    for name in splits or store.splits:
        try:
            total += int((store.split(name).records()[:, FIELD["state"]] == STATE_COMPLETE).sum())
        except StoreError:
            pass
    return total


__all__ = ["VerifyReport", "verify_store", "count_rows", "check_row", "STATE_DAMAGED"]
