"""Laying out a split: the arrays that give every annotated image a row.

The layout (which key is which row) is a pure function of the records and the last *published*
layout: new images are appended in file-name order, so concurrent shards laying out one split
compute, and write, identical metadata (docs/architecture.md, "Crash protocol").
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.errors import ContainsArrayError, ContainsGroupError

from boxrefine.shared.data.records import ImageRecord
from boxrefine.shared.store.codecs import compressors, mask_codec, require_group, storage_numpy_dtype
from boxrefine.shared.store.identity import StoreIdentity
from boxrefine.shared.store.location import StoreError, store_access
from boxrefine.shared.store.schema import FIELD, INDEX_CHUNK, ROW_FIELDS, STATE_STALE
from boxrefine.shared.store.split import SplitStore, StoreDamage


def keys_digest(keys: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(keys, dtype="<i8").tobytes()).hexdigest()


@dataclass(frozen=True)
class Target:
    """Where a split is laid out: the store's root group and path, its identity and storage settings."""

    root: zarr.Group
    path: str
    identity: StoreIdentity
    storage: dict[str, Any]  # the store's "storage" attribute: dtype, codec, clevel


def layout_split(target: Target, name: str, records: list[ImageRecord], annotations: dict[str, str],
                 images_root: str, interm_channels: int) -> SplitStore:
    """Create or extend a split's arrays so every record has a row; rows of images no longer in
    the annotations are marked STALE. Idempotent: concurrent shards computing the same layout
    write identical metadata, and a layout that is already right writes nothing (a read-only
    store with nothing to do stays readable)."""
    with store_access(target.path, f"lay out split {name}"):
        exists = name in target.root
        grp = target.root[name] if exists else require_group(target.root, name)
        if name not in target.root:
            raise StoreError(f"{target.path}: cannot create split group {name!r}")
        split = SplitStore(grp, name, target.identity.dtype, target.path)
        existing, published = _published_keys(target, split)
        new = [r for r in records if r.key not in set(existing.tolist())]
        n = len(existing) + len(new)
        k_old = int(grp["gt_info"].shape[1]) if (published and "gt_info" in grp) else 0
        k_max = max([k_old, int(published.get("max_instances", 0)) if published else 0]
                    + [len(r.instances) for r in records] + [1])
        _size_arrays(target, grp, n, k_max, interm_channels, name)
        keys = np.concatenate([existing, np.array([r.key for r in new], np.int64)])
        if new:
            grp["keys"][len(existing):n] = keys[len(existing):]
        split = SplitStore(grp, name, target.identity.dtype, target.path)  # arrays may have been resized
        wanted = {r.key: r.image_id for r in records}
        _write_image_ids(grp, split, keys, wanted)
        marked = _mark_gone(split, keys, wanted)
        attrs = {"annotations": annotations, "images_root": images_root, "max_instances": k_max,
                 "layout": {"n_rows": n, "keys_sha256": keys_digest(keys), "max_instances": k_max}}
        if any(grp.attrs.get(k) != v for k, v in attrs.items()):
            grp.attrs.update(attrs)
        return SplitStore(grp, name, target.identity.dtype, target.path, marked_stale=marked)


def _published_keys(target: Target, split: SplitStore) -> tuple[np.ndarray, dict[str, Any] | None]:
    """The row keys of the *published* layout (and the layout): only it counts, since arrays another
    shard is creating right now may still hold fill values. From it and the records every process
    computes the same new layout (new images appended in file-name order)."""
    published = split.group.attrs.get("layout")
    if not (published and "keys" in split.group):
        return np.zeros(0, np.int64), published
    existing = split.keys()[: int(published["n_rows"])]
    if keys_digest(existing) != published["keys_sha256"]:
        raise StoreError(f"{target.path}/{split.name}: row keys do not match the published layout; "
                         "the store was changed by something else — rebuild it with --overwrite")
    return existing, published


def _size_arrays(target: Target, grp: zarr.Group, n: int, k_max: int, interm_channels: int, name: str) -> None:
    """Create the split's arrays, or resize them to ``n`` rows and ``k_max`` instances."""
    storage = target.storage
    dt = storage_numpy_dtype(storage["dtype"])

    def codecs(itemsize: int) -> list[Any]:
        return compressors(storage["codec"], storage["clevel"], itemsize)

    plain = compressors("none", 0, 8)  # small arrays: only the crc32c checksum
    # GT masks and the index arrays: Blosc always (zstd when the features are stored without one)
    masks, index = (compressors(mask_codec(storage["codec"]), storage["clevel"], size) for size in (1, 8))
    s, c = target.identity.gt_mask_size, interm_channels
    specs = {
        "keys": ((n,), (INDEX_CHUNK,), np.int64, 0, index),
        "image_ids": ((n,), (INDEX_CHUNK,), np.int64, -1, index),
        "rows": ((n, len(ROW_FIELDS)), (1, len(ROW_FIELDS)), np.int64, 0, plain),
        "image_embeddings": ((n, 256, 64, 64), (1, 256, 64, 64), dt, 0, codecs(dt.itemsize)),
        "interm_embeddings": ((n, 64, 64, c), (1, 64, 64, c), dt, 0, codecs(dt.itemsize)),
        "gt_masks": ((n, k_max, s, s), (1, k_max, s, s), np.uint8, 0, masks),
        "gt_boxes": ((n, k_max, 4), (1, k_max, 4), np.float32, np.nan, plain),
        "gt_info": ((n, k_max, 3), (1, k_max, 3), np.int64, -1, plain),
    }
    for arr_name, (shape, chunks, dtype, fill, comp) in specs.items():
        try:
            arr = grp.create_array(arr_name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill,
                                   compressors=comp, overwrite=False)
        except (ContainsArrayError, ContainsGroupError, FileExistsError):
            arr = grp[arr_name]
        if arr_name == "interm_embeddings" and arr.shape[-1] != interm_channels:
            raise StoreError(f"{target.path}/{name}: interm_embeddings has {arr.shape[-1]} channels, "
                             f"model gives {interm_channels}")
        if tuple(arr.shape) != shape:
            arr.resize(shape)


def _write_image_ids(grp: zarr.Group, split: SplitStore, keys: np.ndarray, wanted: dict[int, int]) -> None:
    """The image id of every row (existing rows' ids may change with a new annotation file)."""
    new_ids = np.array([wanted.get(int(k), -1) for k in keys.tolist()], np.int64)
    try:
        same_ids = np.array_equal(split.image_ids(), new_ids)
    except StoreDamage:  # a damaged image_ids chunk: rewritten from the annotations
        same_ids = False
    if len(keys) and not same_ids:
        grp["image_ids"][:] = new_ids


def _mark_gone(split: SplitStore, keys: np.ndarray, wanted: dict[int, int]) -> dict[int, np.ndarray]:
    """Mark STALE the rows whose image left the annotations (never served again); their new records."""
    gone = [i for i, k in enumerate(keys.tolist()) if k not in wanted]
    rows = split.read_rows(np.array(gone, np.int64)) if gone else None
    marked = {}
    for i in gone:
        if rows[i, FIELD["state"]] != STATE_STALE:
            marked[i] = split.mark(i, STATE_STALE, int(rows[i, FIELD["generation"]]) + 1)
    return marked
