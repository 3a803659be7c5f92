"""``extract --reuse-features OLD``: copy the features of unchanged images from another store instead
of running the encoder.

What it is for: rebuilding a store whose layout changed (a schema-1 store — GT half a low-res pixel
off SAM's frame, no chunk checksums — or another GT size, codec or path, e.g. moving to S3) with
no encoder work for the images whose features are still right. A row of ``OLD`` is reused when the
image file is unchanged (same size and mtime), its size is the annotated one, and its features are
what the new store would compute: the same model, checkpoint, input size, pixel statistics,
encoder precision and storage dtype (refused otherwise, naming both values) and, for images that are
not 8-bit, the same intensity mapping (schema 1 decoded 16-bit images by ÷257, which is the
``none`` mapping). Everything else is extracted as usual; GT is always recomputed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr

from boxrefine.extract.plan import Job
from boxrefine.shared.data.imageio import is_8bit_file, source_fingerprint
from boxrefine.shared.store.identity import FEATURE_FIELDS, StoreIdentity, feature_differences
from boxrefine.shared.store.location import StoreError, store_access
from boxrefine.shared.store.objstore import zarr_location
from boxrefine.shared.store.schema import FIELD, STATE_COMPLETE

# The feature fields but the intensity mapping: a store made under another mapping still gives its rows of
# 8-bit images (no mapping applies to them; ``same_mapping`` below).
FEATURE_IDENTITY = tuple(f for f in FEATURE_FIELDS if f != "intensity")
LEGACY_INTENSITY = "none"  # schema 1 had no intensity option: 16-bit ÷ 257, float images refused


class FeatureSource:
    """The rows of another store whose features can be copied (any schema since 1)."""
    def __init__(self, path: str, identity: StoreIdentity):
        self.path = path
        with store_access(path, "open the store to reuse features from"):
            try:
                self.group = zarr.open_group(zarr_location(path, "r"), mode="r", zarr_format=3)
            except (FileNotFoundError, zarr.errors.GroupNotFoundError):
                raise StoreError(f"{path}: no feature store here to reuse features from") from None
        attrs = self.group.attrs.asdict()
        old = attrs.get("identity")
        if not isinstance(old, dict) or "boxrefine" not in attrs:
            raise StoreError(f"{path}: not a boxrefine feature store (no 'boxrefine' attributes)")
        diffs = feature_differences(old, identity, ("that store has", "this config gives"), FEATURE_IDENTITY)
        if diffs:
            raise StoreError(f"{path}: cannot reuse its features, they were computed differently: " + "; ".join(diffs))
        self.same_mapping = old.get("intensity", LEGACY_INTENSITY) == identity.intensity
        self.schema = attrs["boxrefine"].get("schema_version")
        self._splits: dict[str, dict[str, Any]] = {}

    def _split(self, name: str) -> dict[str, Any] | None:
        if name not in self._splits:
            try:
                grp = self.group[name]
                keys = np.asarray(grp["keys"][:])
                rows = np.asarray(grp["rows"][:]) if len(keys) else np.zeros((0, 9), np.int64)
            except KeyError:
                self._splits[name] = {}
                return None
            self._splits[name] = {"group": grp, "row_of": {int(k): i for i, k in enumerate(keys.tolist())},
                                  "rows": rows}
        return self._splits[name] or None

    def row_for(self, split: str, job: Job, fp: tuple[int, int]) -> int | None:
        """The row of ``OLD`` holding this job's image with the features it needs, or None."""
        old_split = self._split(split)
        i = old_split["row_of"].get(job.record.key) if old_split else None
        if i is None:
            return None
        r = old_split["rows"][i]
        ok = (int(r[FIELD["state"]]) == STATE_COMPLETE
              and (int(r[FIELD["src_size"]]), int(r[FIELD["src_mtime_ns"]])) == fp
              and (int(r[FIELD["orig_h"]]), int(r[FIELD["orig_w"]])) == (job.record.height, job.record.width))
        if not ok:
            return None
        if not self.same_mapping and not _is_8bit(job.path):
            return None
        return i

    def read(self, split: str, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(image_embeddings, interm_embeddings) of a row, as stored (the storage dtype)."""
        grp = self._split(split)["group"]  # type: ignore[index]
        with store_access(self.path, f"read {split} row {row} to reuse its features"):
            return np.asarray(grp["image_embeddings"][row]), np.asarray(grp["interm_embeddings"][row])


def _is_8bit(path: Path) -> bool:
    try:
        return is_8bit_file(path)
    except OSError:
        return False  # unreadable now: extracting it reports why


def mark_reusable(source: FeatureSource, split: str, jobs: list[Job]) -> int:
    """Set ``job.reuse_row`` on the full jobs whose features ``source`` holds; returns how many."""
    n = 0
    for job in jobs:
        if job.gt_only:
            continue
        try:
            fp = source_fingerprint(job.path)
        except OSError:
            continue
        job.reuse_row = source.row_for(split, job, fp)
        n += job.reuse_row is not None
    return n
