"""Upgrading a schema-1 store in place, without encoder work where the features stay valid.

Schema 1 laid GT masks out with cv2 INTER_NEAREST straight into the 256 frame (half a low-res pixel
off SAM's frame) and decoded 16-bit images by ÷257 with no intensity option. Its features are
exactly what schema 2 computes for 8-bit images, in every intensity mode. The upgrade therefore
marks every complete row ``STATE_UPGRADE`` (never served; extract rewrites its GT, or re-encodes it
when the image turns out not to be 8-bit and the configured mapping is not ``none``), lets bad rows
be retried (float images are supported now), then stamps the new schema and identity.

Run it from one process (a plain ``boxrefine extract``): a second process upgrading at the same
moment can only leave rows for the next run to finish, never serve a wrong one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from boxrefine.shared.console import console
from boxrefine.shared.store import (
    ROW_FIELDS,
    SCHEMA_VERSION,
    STATE_BAD,
    STATE_COMPLETE,
    STATE_EMPTY,
    STATE_UPGRADE,
    F,
    StoreError,
    StoreIdentity,
    check_identity,
)


def upgrade_schema_1(path: str, group: zarr.Group, identity: StoreIdentity) -> None:
    attrs = group.attrs.asdict()
    old = dict(attrs["identity"])
    old.setdefault("intensity", identity.intensity)  # compared below without it: schema 1 had no option
    check_identity(path, StoreIdentity.from_dict(old), identity)
    counts = {"gt": 0, "retry": 0}
    for _, split in group.groups():
        if "rows" not in split:
            continue
        rows = split["rows"]
        records = rows[:] if rows.shape[0] else np.zeros((0, len(ROW_FIELDS)), np.int64)
        for i, rec in enumerate(records):
            state = int(rec[F["state"]])
            if state == STATE_COMPLETE:
                new = rec.copy()
                new[F["state"]] = STATE_UPGRADE
                rows[i] = new
                counts["gt"] += 1
            elif state == STATE_BAD:
                rows[i] = np.array([STATE_EMPTY] + [0] * (len(ROW_FIELDS) - 1), np.int64)
                counts["retry"] += 1
    meta: dict[str, Any] = {**attrs["boxrefine"], "schema_version": SCHEMA_VERSION, "upgraded_from": 1}
    group.attrs.update({"boxrefine": meta, "identity": identity.to_dict()})
    if group.attrs.asdict()["boxrefine"].get("schema_version") != SCHEMA_VERSION:
        raise StoreError(f"{path}: could not stamp schema {SCHEMA_VERSION} while upgrading")
    console.print(f"{path}: upgraded from schema 1: {counts['gt']} row(s) get their GT rewritten in SAM's exact "
                  f"low-res layout (no encoder work for 8-bit images), {counts['retry']} bad row(s) are retried",
                  style="yellow", markup=False)
