"""The feature store: a self-describing, crash-safe Zarr v3 group (local path or fsspec URL).

Layout::

    <root>                      attrs: boxrefine{schema, tool_version}, identity{...}, codec, config
      <split>/                  attrs: annotations{path, sha256}, images_root, max_instances
        keys           (N,)       int64   image_key(file_name) of each row
        image_ids      (N,)       int64   COCO image id of each row
        rows           (N, 9)     int64   per-row record, chunk (1, 9) — see ROW_FIELDS; written LAST
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
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from boxrefine.shared import __version__
from boxrefine.shared.config import PipelineConfig, StoreConfig, dict_differences, is_url
from boxrefine.shared.console import console
from boxrefine.shared.errors import BoxrefineError
from boxrefine.shared.records import ImageRecord
from boxrefine.shared.storage import create_or_open_group, from_storage, require_group, storage_numpy_dtype, to_storage

SCHEMA_VERSION = 2  # 2: GT masks in SAM's exact low-res layout; intensity mapping in the identity
ROW_FIELDS = ("state", "src_size", "src_mtime_ns", "ann_hash", "orig_h", "orig_w", "input_h", "input_w",
              "n_instances")
F = {name: i for i, name in enumerate(ROW_FIELDS)}
STATE_EMPTY, STATE_COMPLETE, STATE_BAD, STATE_STALE = 0, 1, 2, 3
# A row of an upgraded schema-1 store: its features are valid where the image is 8-bit (no intensity
# mapping applies), its GT is in the old layout. Never served; extract rewrites the GT (no encoder work)
# or, for other images, re-encodes the row.
STATE_UPGRADE = 4
STATE_NAMES = {STATE_EMPTY: "empty", STATE_COMPLETE: "complete", STATE_BAD: "bad", STATE_STALE: "stale",
               STATE_UPGRADE: "upgrade"}
FEATURE_ARRAYS = ("image_embeddings", "interm_embeddings")
GT_ARRAYS = ("gt_masks", "gt_boxes", "gt_info")
INDEX_CHUNK = 1 << 16  # rows per chunk of the small per-split index arrays (keys, image_ids)


class StoreError(BoxrefineError, ValueError):
    """A store that cannot be used as asked; the message names the store and the problem."""


@dataclass(frozen=True)
class StoreIdentity:
    """Everything that decides the *values* in a store. Two configs with different identities must
    never write to, or read from, the same store."""

    model_type: str
    checkpoint: str  # "sha256:<hex>" or "random-init:seed=<n>"
    img_size: int
    pixel_mean: tuple[float, ...]
    pixel_std: tuple[float, ...]
    dtype: str
    encoder_precision: str
    gt_mask_size: int
    intensity: str  # how images that are not 8-bit were mapped to 8 bits (shared/imageio.py Intensity)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["pixel_mean"], d["pixel_std"] = list(self.pixel_mean), list(self.pixel_std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoreIdentity:
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        d["pixel_mean"], d["pixel_std"] = tuple(d["pixel_mean"]), tuple(d["pixel_std"])
        return cls(**d)

    def differences(self, other: StoreIdentity) -> list[str]:
        return dict_differences(self.to_dict(), other.to_dict(), ("store has", "config gives"))


def identity_for(cfg: PipelineConfig, checkpoint_fingerprint: str) -> StoreIdentity:
    """The identity a store made (or read) with this config must have."""
    from boxrefine.shared.geometry import IMG_SIZE
    from boxrefine.shared.sam import PIXEL_MEAN, PIXEL_STD

    return StoreIdentity(model_type=cfg.model.type, checkpoint=checkpoint_fingerprint, img_size=IMG_SIZE,
                         pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD, dtype=cfg.store.dtype,
                         encoder_precision=cfg.extract.encoder_precision, gt_mask_size=cfg.store.gt_mask_size,
                         intensity=cfg.data.intensity.mapping().fingerprint)


def open_checked_store(cfg: PipelineConfig, splits: Iterable[str | None] = ()) -> FeatureStore:
    """Open the configured store read-only and refuse it unless it was made with the configured
    model, checkpoint and preprocessing, and unless the GT of ``splits`` comes from the annotation
    files the config names now (what train and evaluate need before using any feature)."""
    from boxrefine.shared.sam import checkpoint_info

    store = open_store(cfg.store.path)
    ckpt = checkpoint_info(cfg.model.type, cfg.model.checkpoint, cfg.model.seed)
    check_identity(cfg.store.path, store.identity, identity_for(cfg, ckpt.fingerprint))
    for name in dict.fromkeys(s for s in splits if s is not None):
        store.split(name).check_annotations(cfg.data.splits[name].annotations)
    return store


def check_identity(store_path: str, store_id: StoreIdentity, wanted: StoreIdentity) -> None:
    diffs = store_id.differences(wanted)
    if diffs:
        raise StoreError(f"{store_path}: store was made with a different model/checkpoint/preprocessing: "
                         + "; ".join(diffs)
                         + ". Use another store path, or --overwrite to rebuild this one.")


def _open_group(path: str, mode: str) -> zarr.Group:
    kwargs: dict[str, Any] = {"zarr_format": 3}
    try:
        return zarr.open_group(path, mode=mode, **kwargs)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        raise StoreError(f"{path}: no feature store here (run `boxrefine extract` first)") from None


class SplitStore:
    """One split of a store. Methods document the row protocol; arrays are opened lazily."""

    def __init__(self, group: zarr.Group, name: str, dtype: str, store_path: str):
        self.group, self.name, self.dtype, self.store_path = group, name, dtype, store_path
        self._arrays: dict[str, zarr.Array] = {}

    def array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    @property
    def n_rows(self) -> int:
        return int(self.array("keys").shape[0])

    @property
    def max_instances(self) -> int:
        return int(self.array("gt_info").shape[1])

    def keys(self) -> np.ndarray:
        return self.array("keys")[:]

    def image_ids(self) -> np.ndarray:
        return self.array("image_ids")[:]

    def read_rows(self) -> np.ndarray:
        """All per-row records, N×len(ROW_FIELDS) int64 (one small chunk per row)."""
        if self.n_rows == 0:
            return np.zeros((0, len(ROW_FIELDS)), np.int64)
        return self.array("rows")[:]

    @property
    def annotations_sha256(self) -> str | None:
        """sha256 of the annotation file this split's GT was extracted from."""
        return (self.group.attrs.get("annotations") or {}).get("sha256")

    def layout_digest(self) -> str | None:
        """sha256 of the published row keys: changes whenever rows are added."""
        return (self.group.attrs.get("layout") or {}).get("keys_sha256")

    def check_annotations(self, path: Path) -> None:
        """Refuse GT extracted from another version of ``path``: stale GT must never be scored or
        trained on silently."""
        from boxrefine.shared.records import file_sha256

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

    def complete_indices(self) -> np.ndarray:
        return np.flatnonzero(self.read_rows()[:, F["state"]] == STATE_COMPLETE)

    def usable_rows(self) -> np.ndarray:
        """The complete rows, for train and evaluate: a split with none is refused (StoreError naming
        the store and the split), one with only some says how many are missing."""
        states = self.read_rows()[:, F["state"]]
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
        return complete

    # ---- writing (extract only) -------------------------------------------------------------
    def clear_row(self, i: int) -> None:
        """Step 1 of rewriting a row: readers stop trusting it before any chunk changes."""
        self.array("rows")[i] = np.zeros(len(ROW_FIELDS), np.int64)

    def write_features(self, i: int, image_embeddings: np.ndarray, interm_embeddings: np.ndarray) -> None:
        self.array("image_embeddings")[i] = image_embeddings
        self.array("interm_embeddings")[i] = interm_embeddings

    def write_gt(self, i: int, masks: np.ndarray, boxes: np.ndarray, info: np.ndarray) -> None:
        """masks k×S×S uint8, boxes k×4 xyxy, info k×3 — padded here to the split's K."""
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

    def commit_row(self, i: int, record: dict[str, int]) -> None:
        """Last step: the row's record, with its state, becomes visible in one atomic write."""
        row = np.zeros(len(ROW_FIELDS), np.int64)
        for k, v in record.items():
            row[F[k]] = int(v)
        self.array("rows")[i] = row

    # ---- reading ----------------------------------------------------------------------------
    def read_features(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embeddings 256×64×64 and interm_embeddings 64×64×C in the storage dtype."""
        emb = from_storage(self.array("image_embeddings")[i], self.dtype)
        interm = from_storage(self.array("interm_embeddings")[i], self.dtype)
        return emb, interm

    def read_gt(self, i: int, n: int, masks: bool = True) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """The first ``n`` instances of row ``i`` (``n`` from its record): masks n×S×S uint8 in SAM's
        low-res frame (None unless ``masks``), boxes n×4 float32 (xyxy, original px), info n×3 int64
        ([annotation id, category id, iscrowd])."""
        boxes = np.asarray(self.array("gt_boxes")[i, :n], np.float32).reshape(-1, 4)
        info = np.asarray(self.array("gt_info")[i, :n], np.int64).reshape(-1, 3)
        return (np.asarray(self.array("gt_masks")[i, :n]) if masks else None), boxes, info

    def bad_images(self) -> dict[int, dict[str, str]]:
        """Bad-image reports from every extract shard, for rows still marked bad."""
        try:
            grp = self.group["bad_images"]
        except KeyError:
            return {}
        reports: dict[int, dict[str, str]] = {}
        for _, sub in sorted(grp.groups()):
            for k, v in sub.attrs.asdict().items():
                reports[int(k)] = v
        if not reports:
            return {}
        rows, keys = self.read_rows(), self.keys()
        bad_keys = set(keys[rows[:, F["state"]] == STATE_BAD].tolist())
        return {k: v for k, v in reports.items() if k in bad_keys}

    def record_bad_images(self, shard: str, reports: dict[int, dict[str, str]]) -> None:
        sub = require_group(require_group(self.group, "bad_images"), shard)
        sub.attrs.put({str(k): v for k, v in sorted(reports.items())})


class FeatureStore:
    """A feature store opened for reading (``mode='r'``) or extraction (``mode='a'``)."""

    def __init__(self, path: str, group: zarr.Group):
        self.path, self.group = path, group
        attrs = group.attrs.asdict()
        meta = attrs.get("boxrefine")
        if not isinstance(meta, dict) or "identity" not in attrs:
            raise StoreError(f"{path}: not a boxrefine feature store (no 'boxrefine' attributes)")
        version = meta.get("schema_version")
        if version == 1:
            raise StoreError(f"{path}: store schema 1 keeps GT masks half a low-res pixel off SAM's frame; run "
                             "`boxrefine extract` with this config to upgrade it in place (GT is rewritten without "
                             "encoder work; only images that are not 8-bit are re-encoded)")
        if version != SCHEMA_VERSION:
            raise StoreError(f"{path}: store schema {version} but this boxrefine reads schema {SCHEMA_VERSION}; "
                             "rebuild it with `boxrefine extract --overwrite`")
        self.attrs = attrs
        self.identity = StoreIdentity.from_dict(attrs["identity"])

    @classmethod
    def open(cls, path: str, mode: str = "r") -> FeatureStore:
        return cls(path, _open_group(path, mode))

    @classmethod
    def open_or_create(cls, cfg: StoreConfig, identity: StoreIdentity, checkpoint: dict[str, Any],
                       config: dict[str, Any], overwrite: bool = False) -> FeatureStore:
        """Open the configured store for writing, creating it if absent. Refuses (StoreError) a store
        whose identity differs from ``identity``, naming both."""
        path = cfg.path
        # A new store's root is written once, attributes included: processes creating it at the same
        # moment write identical metadata, and none ever sees (or leaves) a root without attributes.
        new_attrs = {
            "boxrefine": {"schema_version": SCHEMA_VERSION, "tool_version": __version__},
            "identity": identity.to_dict(),
            "checkpoint": checkpoint,
            "storage": {"dtype": cfg.dtype, "numpy_dtype": str(storage_numpy_dtype(cfg.dtype)),
                        "codec": cfg.codec, "clevel": cfg.clevel},
            "config": config,
        }
        if overwrite:
            group = zarr.open_group(path, mode="w", zarr_format=3, attributes=new_attrs)
        else:
            group = create_or_open_group(path, new_attrs)
        attrs = group.attrs.asdict()
        if attrs.get("boxrefine", {}).get("schema_version") == 1:
            from boxrefine.shared.store_upgrade import upgrade_schema_1

            upgrade_schema_1(path, group, identity)
            attrs = group.attrs.asdict()
        if "boxrefine" in attrs:
            store = cls(path, group)
            check_identity(path, store.identity, identity)
            return store
        if any(True for _ in group.members()):
            time.sleep(0.5)  # another extract process may be creating this store right now
            group = create_or_open_group(path, new_attrs)
            if "boxrefine" in group.attrs.asdict():
                store = cls(path, group)
                check_identity(path, store.identity, identity)
                return store
            raise StoreError(f"{path}: a Zarr group with content but no boxrefine attributes; refusing to "
                             "write into it")
        group.attrs.put(new_attrs)  # an empty Zarr group made by something else
        return cls(path, group)

    @property
    def splits(self) -> list[str]:
        return sorted(name for name, _ in self.group.groups())

    def split(self, name: str) -> SplitStore:
        try:
            grp = self.group[name]
        except KeyError:
            raise StoreError(f"{self.path}: no split {name!r} in the store (has {self.splits})") from None
        return SplitStore(grp, name, self.identity.dtype, self.path)

    def layout_split(self, name: str, records: Iterable[ImageRecord], annotations: dict[str, str],
                     images_root: str, interm_channels: int) -> SplitStore:
        """Create or extend a split's arrays so every record has a row (``shared/store_layout.py``)."""
        from boxrefine.shared.store_layout import layout_split

        return layout_split(self, name, list(records), annotations, images_root, interm_channels)

    def bytes_on_disk(self) -> int | None:
        """Total size of the store's objects (None where the filesystem cannot say)."""
        try:
            import fsspec

            fs, root = fsspec.core.url_to_fs(self.path)
            return int(fs.du(root, total=True))
        except Exception:  # advisory figure only
            return None


def open_store(path: str) -> FeatureStore:
    """Open a store read-only (train/evaluate/info)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FeatureStore.open(path, "r")


__all__ = ["FeatureStore", "SplitStore", "StoreIdentity", "StoreError", "open_store", "is_url", "ROW_FIELDS",
           "STATE_EMPTY", "STATE_COMPLETE", "STATE_BAD", "STATE_STALE", "check_identity", "to_storage",
           "from_storage"]
