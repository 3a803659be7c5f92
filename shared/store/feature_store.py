"""The feature store: a self-describing, crash-safe Zarr v3 group (local path or fsspec URL).

Layout::

    <root>                      attrs: boxrefine{schema, tool_version}, identity{...}, codec, config
      <split>/                  attrs: annotations{path, sha256, ground_truth}, images_root, max_instances
        keys           (N,)       int64   image_key(file_name) of each row
        image_ids      (N,)       int64   COCO image id of each row
        rows           (N, 15)    int64   per-row record, chunk (1, 15) — see ROW_FIELDS; written LAST
        row_index/<part>  (N, 15) int64   the records as a few chunks, for readers (shared/store/row_index.py)
        image_embeddings  (N, 256, 64, 64)  storage dtype, one chunk per row
        interm_embeddings (N, 64, 64, C)    storage dtype, one chunk per row (C = 160/768/1024/1280)
        gt_masks       (N, K, S, S) uint8   GT instance masks in SAM's low-res frame (S = gt_mask_size)
        gt_boxes       (N, K, 4)  float32   GT boxes, xyxy, original pixels (NaN padding)
        gt_info        (N, K, 3)  int64     [annotation id, category id, iscrowd] (-1 padding)
        bad_images/shard-<i>-of-<n>   attrs: {key: {"file", "reason"}} per extract shard

Protocol (docs/architecture.md, "Crash protocol"): a writer first clears a row's record (state EMPTY) if it had
one, then writes the row's chunks, then writes its record with state COMPLETE. Each key is written
atomically (zarr's LocalStore writes a temp file and renames; object stores PUT whole objects), each
row lives in its own chunks, so a reader that trusts only COMPLETE records never sees a torn row,
and processes working on disjoint rows never touch the same object.

Integrity (docs/architecture.md, "Integrity"): every chunk ends with a crc32c of its stored bytes, and
a row's record holds the crc32c of the values of each of its arrays (``crc_<array>``), so a flipped
bit, a truncated, missing or swapped chunk of a complete row is detected on read and raised as
:class:`StoreDamage` naming split, row, image file and array. ``boxrefine store verify --repair``
marks such rows DAMAGED and extract recomputes them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import zarr

from boxrefine.shared import __version__
from boxrefine.shared.config import PipelineConfig, StoreConfig
from boxrefine.shared.data.records import ImageRecord
from boxrefine.shared.model.weights import checkpoint_info
from boxrefine.shared.runtime.console import console
from boxrefine.shared.store.codecs import storage_numpy_dtype
from boxrefine.shared.store.identity import StoreIdentity, check_identity, identity_for
from boxrefine.shared.store.layout import Target, layout_split
from boxrefine.shared.store.location import StoreError, delete_store_content, inspect_store_path, store_access
from boxrefine.shared.store.objstore import location_fs, zarr_location
from boxrefine.shared.store.schema import SCHEMA_CHANGES, SCHEMA_VERSION
from boxrefine.shared.store.split import SplitStore


def open_checked_store(cfg: PipelineConfig, splits: Iterable[str | None] = ()) -> FeatureStore:
    """Open the configured store read-only and refuse it unless it was made with the configured
    model, checkpoint and preprocessing, and unless the GT of ``splits`` comes from the annotation
    files the config names now (what train and evaluate need before using any feature)."""
    store = open_store(cfg.store.path)
    ckpt = checkpoint_info(cfg.model.type, cfg.model.checkpoint, cfg.model.seed)
    check_identity(cfg.store.path, store.identity, identity_for(cfg, ckpt.fingerprint))
    for name in dict.fromkeys(s for s in splits if s is not None):
        split, annotations = store.split(name), cfg.data.splits[name].annotations
        split.require_ground_truth()
        if annotations is None:
            raise StoreError(f"split {name!r} is images only in the config (data.splits.{name}.annotations is not "
                             "set): nothing to train on or score")
        split.check_annotations(annotations)
    return store


def _open_group(path: str, mode: str) -> zarr.Group:
    with store_access(path, "open the store"):
        try:
            return zarr.open_group(zarr_location(path, mode), mode=mode, zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            fs, root = location_fs(path)
            fs.exists(root)  # a missing bucket, or credentials that cannot list it, say so here
            raise StoreError(f"{path}: no feature store here (run `boxrefine extract` first)") from None


class FeatureStore:
    """A feature store opened for reading (``mode='r'``) or extraction (``mode='a'``)."""
    def __init__(self, path: str, group: zarr.Group):
        self.path, self.group = path, group
        attrs = group.attrs.asdict()
        meta = attrs.get("boxrefine")
        if not isinstance(meta, dict) or "identity" not in attrs:
            raise StoreError(f"{path}: not a boxrefine feature store (no 'boxrefine' attributes)")
        version = meta.get("schema_version")
        if isinstance(version, int) and version < SCHEMA_VERSION:
            changes = "; ".join(v for k, v in SCHEMA_CHANGES.items() if k > version)
            raise StoreError(f"{path}: store schema {version}; this boxrefine reads schema {SCHEMA_VERSION} "
                             f"({changes}). Rebuild it into a new store "
                             "without encoder work for unchanged images: "
                             f"boxrefine extract --store NEW_STORE --reuse-features {path}")
        if version != SCHEMA_VERSION:
            raise StoreError(f"{path}: store schema {version}, made by a newer boxrefine (this one reads schema "
                             f"{SCHEMA_VERSION}); upgrade boxrefine")
        self.attrs = attrs
        self.identity = StoreIdentity.from_dict(attrs["identity"])

    @classmethod
    def open(cls, path: str, mode: str = "r") -> FeatureStore:
        return cls(path, _open_group(path, mode))

    @classmethod
    def open_or_create(cls, cfg: StoreConfig, identity: StoreIdentity, checkpoint: dict[str, Any],
                       config: dict[str, Any], overwrite: bool = False,
                       splits: list[str] | None = None) -> FeatureStore:
        """Open the configured store for writing, creating it if the path is absent or an empty folder.

        Refuses (StoreError) any other non-empty path: extract never writes into, or deletes, what is
        not a boxrefine store. ``overwrite`` deletes only a store's own content, and says what; with
        ``splits`` only those splits (the store must have this identity). A store made with another
        identity is refused naming both, unless it holds no complete row (e.g. a first extract that
        failed to load its checkpoint): then it is re-stamped."""
        path = cfg.path
        where = inspect_store_path(path)
        if where.kind == "foreign":
            raise StoreError(f"{path}: not empty and not a boxrefine feature store (holds "
                             f"{', '.join(where.other[:5])}{', ...' if len(where.other) > 5 else ''}); extract "
                             "neither writes into nor deletes such a folder (with or without --overwrite): "
                             "choose a new or empty store path")
        if where.kind == "store" and overwrite and splits:
            store = cls.open(path, "a")
            diffs = store.identity.differences(identity)
            if diffs:
                raise StoreError(f"{path}: --overwrite --split {' '.join(splits)} rebuilds only those splits, but the "
                                 f"store was made otherwise ({'; '.join(diffs)}): --overwrite without --split "
                                 "rebuilds the whole store")
            store.delete_splits(splits)
            return store
        if where.kind == "store" and overwrite:
            _delete(where, "--overwrite")
        elif where.kind == "store":
            store = cls.open(path, "a")
            diffs = store.identity.differences(identity)
            if not diffs:
                return store
            if any(len(store.split(name).complete_indices()) for name in store.splits):
                check_identity(path, store.identity, identity)
            _delete(where, f"re-stamping (it holds no complete row; {'; '.join(diffs)})")
        attrs = {
            "boxrefine": {"schema_version": SCHEMA_VERSION, "tool_version": __version__},
            "identity": identity.to_dict(),
            "checkpoint": checkpoint,
            "storage": {"dtype": cfg.dtype, "numpy_dtype": str(storage_numpy_dtype(cfg.dtype)),
                        "codec": cfg.codec, "clevel": cfg.clevel},
            "config": config,
        }
        try:  # one write of zarr.json with its attributes: no reader ever sees a store without them
            with store_access(path, "create the store"):
                group = zarr.create_group(zarr_location(path, "a"), attributes=attrs, zarr_format=3, overwrite=False)
        except zarr.errors.ContainsGroupError:  # another extract process created it a moment ago
            store = cls.open(path, "a")
            check_identity(path, store.identity, identity)
            return store
        return cls(path, group)

    def delete_splits(self, names: list[str]) -> None:
        """``--overwrite --split``: delete the named splits' groups (and only those), saying what."""
        present = self.splits
        gone = [n for n in names if n in present]
        kept = [n for n in present if n not in names]
        console.print(f"{self.path}: --overwrite --split {' '.join(names)}: deleting split(s) "
                      f"{', '.join(f'{n}/' for n in gone) or '(none in the store yet)'}"
                      + (f"; keeping {', '.join(f'{n}/' for n in kept)}" if kept else ""),
                      markup=False, style="yellow")
        with store_access(self.path, "delete splits"):
            for name in gone:
                del self.group[name]

    @property
    def splits(self) -> list[str]:
        with store_access(self.path, "list the store's splits"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zarr warns of files that are not part of the store
            return sorted(name for name, _ in self.group.groups())

    def split(self, name: str) -> SplitStore:
        try:
            with store_access(self.path, f"open split {name}"):
                grp = self.group[name]
        except KeyError:
            raise StoreError(f"{self.path}: no split {name!r} in the store (has {self.splits})") from None
        return SplitStore(grp, name, self.identity.dtype, self.path)

    def layout_split(self, name: str, records: Iterable[ImageRecord], annotations: dict[str, str],
                     images_root: str, interm_channels: int) -> SplitStore:
        """Create or extend a split's arrays so every record has a row (``shared/store/layout.py``)."""
        return layout_split(Target(self.group, self.path, self.identity, self.attrs["storage"]), name, list(records),
                            annotations, images_root, interm_channels)

    def bytes_on_disk(self) -> int | None:
        """Total size of the store's objects (None where the filesystem cannot say)."""
        try:
            fs, root = location_fs(self.path)
            return int(fs.du(root, total=True))
        except Exception:  # advisory figure only
            return None


def _delete(where: Any, why: str) -> None:
    """Delete a store's own content (``store_files.delete_store_content``), saying what first."""
    kept = f"; keeping what is not part of the store: {', '.join(where.other)}" if where.other else ""
    own = ", ".join([*(f"{n}/" if not n.endswith(".partial") else n for n in where.own), "zarr.json"])
    console.print(f"{where.path}: {why}: deleting the store's own content: {own}{kept}", markup=False,
                  style="yellow")
    delete_store_content(where)


def open_store(path: str) -> FeatureStore:
    """Open a store read-only (train/evaluate/info)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FeatureStore.open(path, "r")
