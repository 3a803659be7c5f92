"""The bad-image reports of a split: what each extract shard could not read, by row key.

Each shard writes its own ``bad_images/<shard>`` group (attrs ``{key: {"file", "reason"}}``), so
concurrent shards never write the same object; a reader merges them and keeps only the rows whose
record still says bad (a row re-extracted since is no longer reported).
"""

from __future__ import annotations

import zarr

from boxrefine.shared.store.codecs import require_group
from boxrefine.shared.store.schema import FIELD, STATE_BAD
from boxrefine.shared.store.split import SplitStore


def bad_images(split: SplitStore) -> dict[int, dict[str, str]]:
    """Bad-image reports from every extract shard of ``split``, for rows still marked bad."""
    try:
        grp = split.group["bad_images"]
    except KeyError:
        return {}
    reports: dict[int, dict[str, str]] = {}
    for _, sub in sorted(grp.groups()):
        reports.update(_reports(sub))
    if not reports:
        return {}
    rows, keys = split.records(), split.keys()
    bad_keys = set(keys[rows[:, FIELD["state"]] == STATE_BAD].tolist())
    return {k: v for k, v in reports.items() if k in bad_keys}


def shard_reports(split: SplitStore, shard: str) -> dict[int, dict[str, str]]:
    """The bad-image reports ``shard`` recorded for ``split`` (all of them, whatever the rows say now)."""
    try:
        return _reports(split.group["bad_images"][shard])
    except KeyError:
        return {}


def _reports(shard_group: zarr.Group) -> dict[int, dict[str, str]]:
    """One shard's reports by row key (the attrs keep the keys as strings)."""
    return {int(k): v for k, v in shard_group.attrs.asdict().items()}


def record_bad_images(split: SplitStore, shard: str, reports: dict[int, dict[str, str]]) -> None:
    """Replace ``shard``'s bad-image reports of ``split`` with ``reports``."""
    sub = require_group(require_group(split.group, "bad_images"), shard)
    sub.attrs.put({str(k): v for k, v in sorted(reports.items())})
