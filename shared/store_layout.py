"""Laying out a split: the arrays that give every annotated image a row.

The layout (which key is which row) is a pure function of the records and the last *published*
layout: new images are appended in file-name order, so concurrent shards laying out one split
compute, and write, identical metadata (docs/architecture.md, "Crash protocol").
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import zarr
from zarr.errors import ContainsArrayError, ContainsGroupError

from boxrefine.shared.records import ImageRecord
from boxrefine.shared.storage import compressors, require_group, storage_numpy_dtype
from boxrefine.shared.store import (
    INDEX_CHUNK,
    ROW_FIELDS,
    STATE_STALE,
    F,
    FeatureStore,
    SplitStore,
    StoreDamage,
    StoreError,
)
from boxrefine.shared.store_files import store_access


def keys_digest(keys: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(keys, dtype="<i8").tobytes()).hexdigest()


def layout_split(store: FeatureStore, name: str, records: list[ImageRecord], annotations: dict[str, str],
                 images_root: str, interm_channels: int) -> SplitStore:
    """Create or extend a split's arrays so every record has a row; rows of images no longer in
    the annotations are marked STALE. Idempotent: concurrent shards computing the same layout
    write identical metadata, and a layout that is already right writes nothing (a read-only
    store with nothing to do stays readable)."""
    with store_access(store.path, f"lay out split {name}"):
        return _layout(store, name, records, annotations, images_root, interm_channels)


def _layout(store: FeatureStore, name: str, records: list[ImageRecord], annotations: dict[str, str],
            images_root: str, interm_channels: int) -> SplitStore:
    storage = store.attrs["storage"]
    dt = storage_numpy_dtype(storage["dtype"])
    comp = compressors(storage["codec"], storage["clevel"], dt.itemsize)
    comp_i64 = compressors(storage["codec"], storage["clevel"], 8)
    comp_mask = compressors(storage["codec"], storage["clevel"], 1)
    plain = compressors("none", 0, 8)  # small arrays: only the crc32c checksum
    s = store.identity.gt_mask_size
    k_needed = max([len(r.instances) for r in records] + [1])
    grp = store.group[name] if name in store.splits else require_group(store.group, name)
    if name not in store.splits:
        raise StoreError(f"{store.path}: cannot create split group {name!r}")
    split = SplitStore(grp, name, store.identity.dtype, store.path)

    def require(arr_name: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: Any,
                fill: Any, codecs: Any) -> zarr.Array:
        try:
            return grp.create_array(arr_name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill,
                                    compressors=codecs, overwrite=False)
        except (ContainsArrayError, ContainsGroupError, FileExistsError):
            return grp[arr_name]

    # Only a *published* layout counts: arrays another shard is creating right now may still hold
    # fill values. From the published layout and the records, every process computes the same
    # new layout (new images appended in file-name order), so concurrent writes are identical.
    published = grp.attrs.get("layout")
    if published and "keys" in grp:
        existing = split.keys()[: int(published["n_rows"])]
        if keys_digest(existing) != published["keys_sha256"]:
            raise StoreError(f"{store.path}/{name}: row keys do not match the published layout; "
                             "the store was changed by something else — rebuild it with --overwrite")
    else:
        existing = np.zeros(0, np.int64)
    known = {int(k): i for i, k in enumerate(existing.tolist())}
    new = [r for r in records if r.key not in known]
    n_old, n = len(existing), len(existing) + len(new)
    k_old = int(grp["gt_info"].shape[1]) if (published and "gt_info" in grp) else 0
    k_max = max(k_old, k_needed, int(published.get("max_instances", 0)) if published else 0)

    specs = {
        "keys": ((n,), (INDEX_CHUNK,), np.int64, 0, comp_i64),
        "image_ids": ((n,), (INDEX_CHUNK,), np.int64, -1, comp_i64),
        "rows": ((n, len(ROW_FIELDS)), (1, len(ROW_FIELDS)), np.int64, 0, plain),
        "image_embeddings": ((n, 256, 64, 64), (1, 256, 64, 64), dt, 0, comp),
        "interm_embeddings": ((n, 64, 64, interm_channels), (1, 64, 64, interm_channels), dt, 0, comp),
        "gt_masks": ((n, k_max, s, s), (1, k_max, s, s), np.uint8, 0, comp_mask),
        "gt_boxes": ((n, k_max, 4), (1, k_max, 4), np.float32, np.nan, plain),
        "gt_info": ((n, k_max, 3), (1, k_max, 3), np.int64, -1, plain),
    }
    for arr_name, (shape, chunks, dtype, fill, codecs) in specs.items():
        arr = require(arr_name, shape, chunks, dtype, fill, codecs)
        if arr_name == "interm_embeddings" and arr.shape[-1] != interm_channels:
            raise StoreError(f"{store.path}/{name}: interm_embeddings has {arr.shape[-1]} channels, "
                             f"model gives {interm_channels}")
        if tuple(arr.shape) != shape:
            arr.resize(shape)
    keys = np.concatenate([existing, np.array([r.key for r in new], np.int64)])
    if new:
        grp["keys"][n_old:n] = keys[n_old:]
    # image ids of existing rows may change with a new annotation file
    wanted = {r.key: r.image_id for r in records}
    new_ids = np.array([wanted.get(int(k), -1) for k in keys.tolist()], np.int64)
    split = SplitStore(grp, name, store.identity.dtype, store.path)  # arrays may have been resized
    try:
        same_ids = np.array_equal(split.image_ids(), new_ids)
    except StoreDamage:  # a damaged image_ids chunk: rewritten from the annotations below
        same_ids = False
    if n and not same_ids:
        grp["image_ids"][:] = new_ids
    gone = [i for i, k in enumerate(keys.tolist()) if k not in wanted]
    rows = split.read_rows() if gone else None
    for i in gone:
        if rows[i, F["state"]] != STATE_STALE:  # image left the annotations: never served again
            split.array("rows")[i] = np.array([STATE_STALE] + [0] * (len(ROW_FIELDS) - 1), np.int64)
    attrs = {"annotations": annotations, "images_root": images_root, "max_instances": k_max,
             "layout": {"n_rows": n, "keys_sha256": keys_digest(keys), "max_instances": k_max}}
    if any(grp.attrs.get(k) != v for k, v in attrs.items()):
        grp.attrs.update(attrs)
    return SplitStore(grp, name, store.identity.dtype, store.path)
