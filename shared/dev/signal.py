"""Signal stores: a copy of a feature store whose image embeddings carry the ground truth.

With random-init HQ-SAM (the only weights the test machines have) the features hold almost nothing a
head can use, so a refiner that learns nothing cannot be told from one that is broken. A *signal
store* removes that doubt: it is a copy of a store in which, for every complete row, the first
channels of ``image_embeddings`` are overwritten with the row's own ground truth, taken from the
store's GT masks (SAM's low-res frame, S×S) and average-pooled to the 64×64 embedding grid:

* channel 0: the union of the GT masks;
* channel 1: the instance boundaries (mask pixels with a neighbour outside the mask or the frame);
* channels 2, 3, …: one per instance, in the row's instance order (at most 254; more are dropped);

each multiplied by ``gain`` (3 by default, so the GT stands out of the other channels). Every other
channel, the early-layer ``interm_embeddings`` and the GT itself are left untouched, and the store's
identity is unchanged, so train and evaluate read the copy like the original. The root attribute
``signal_store`` says what was done; ``boxrefine store info`` shows it.

A signal store is for checking that a recipe *learns* (a head that cannot beat the coarse boxes
here is broken); numbers trained on it say nothing about real data. :func:`oracle_boxes` gives the
ceiling of a trivial reader: the box of each coarse box's own instance channel, thresholded.

Developer tooling: library code never imports this module.
"""

from __future__ import annotations

from typing import Any

import fsspec
import numpy as np
import torch
import torch.nn.functional as nnf

from boxrefine.shared.errors import BoxrefineError
from boxrefine.shared.runtime.console import progress
from boxrefine.shared.store.codecs import to_storage
from boxrefine.shared.store.feature_store import FeatureStore, open_store
from boxrefine.shared.store.schema import FIELD, ROW_FIELDS, STATE_COMPLETE

UNION, BOUNDARY, FIRST_INSTANCE = 0, 1, 2
EMBED_CHANNELS, EMBED_GRID = 256, 64  # image_embeddings: 256 × 64 × 64
SIGNAL_ATTR = "signal_store"


class SignalStoreError(BoxrefineError, ValueError):
    """A signal store that cannot be made as asked."""


def signal_channels(gt_masks: np.ndarray | torch.Tensor, gain: float = 3.0, grid: int = EMBED_GRID) -> torch.Tensor:
    """GT masks n×S×S (SAM's low-res frame) → the signal channels (2 + n)×grid×grid, float32:
    union, instance boundaries, then one per instance, each the share of the cell the mask covers,
    times ``gain``."""
    m = torch.as_tensor(np.asarray(gt_masks)).float().clamp(0, 1)
    if m.ndim != 3:
        raise ValueError(f"GT masks must be n×S×S, got shape {tuple(m.shape)}")
    if len(m) == 0:
        s = m.shape[-1] if m.shape[-1] else grid
        m = torch.zeros((0, s, s))
    union = m.amax(0, keepdim=True) if len(m) else torch.zeros((1, *m.shape[1:]))
    # boundary: mask pixels whose 3×3 neighbourhood leaves the mask or the frame (erosion = -maxpool(-m))
    eroded = -nnf.max_pool2d(-nnf.pad(m[:, None], (1, 1, 1, 1)), 3, 1)[:, 0] if len(m) else m
    boundary = (m - eroded).clamp(0, 1).amax(0, keepdim=True) if len(m) else torch.zeros_like(union)
    stack = torch.cat([union, boundary, m], 0)
    return nnf.adaptive_avg_pool2d(stack[None], grid)[0] * gain


def make_signal_store(src: str, dst: str, gain: float = 3.0, overwrite: bool = False) -> dict[str, Any]:
    """Copy the store ``src`` to ``dst`` (local paths or fsspec URLs) and write the GT into the
    copy's image embeddings (see the module docstring). Returns a summary per split."""
    open_store(src)  # refuses what is not a boxrefine store
    fs_dst, root_dst = fsspec.core.url_to_fs(dst)
    if fs_dst.exists(root_dst):
        if not overwrite:
            raise SignalStoreError(f"{dst}: exists; choose another path or pass --overwrite")
        fs_dst.rm(root_dst, recursive=True)
    fs_src, root_src = fsspec.core.url_to_fs(src)
    if type(fs_src) is type(fs_dst):
        fs_src.copy(root_src.rstrip("/"), root_dst, recursive=True)
    else:  # across filesystems: through this process
        for path in fs_src.find(root_src):
            rel = path[len(root_src.rstrip("/")):].lstrip("/")
            fs_dst.pipe_file(f"{root_dst.rstrip('/')}/{rel}", fs_src.cat_file(path))
    store = FeatureStore.open(dst, "a")
    dtype = store.identity.dtype
    summary: dict[str, Any] = {}
    for name in store.splits:
        split_store = store.split(name)
        rows = split_store.read_rows()
        done = np.flatnonzero(rows[:, FIELD["state"]] == STATE_COMPLETE) if len(rows) else np.zeros(0, np.int64)
        dropped = 0
        with progress(f"signal {name}", len(done), unit="img") as bar:
            for i in done.tolist():
                masks, _, _ = split_store.read_gt(i, masks=True, record=rows[i])
                chans = signal_channels(masks, gain)
                if len(chans) > EMBED_CHANNELS:
                    dropped += len(chans) - EMBED_CHANNELS
                    chans = chans[:EMBED_CHANNELS]
                emb, interm = split_store.read_features(i, record=rows[i])
                emb = emb.float()
                emb[:len(chans)] = chans
                # the row protocol: clear the record, write the chunks, commit the record with their digests
                split_store.clear_row(i)
                digests = split_store.write_features(i, to_storage(emb, dtype), to_storage(interm.float(), dtype))
                split_store.commit_row(i, {**dict(zip(ROW_FIELDS, rows[i].tolist(), strict=True)), **digests})
                bar.advance(1)
        summary[name] = {"rows": int(len(done)), "instances_dropped": dropped}
    store.group.attrs[SIGNAL_ATTR] = {
        "source": src, "gain": gain,
        "channels": "0 union of the GT masks, 1 instance boundaries, 2.. one per instance; "
                    "avg-pooled from the store's GT to the embedding grid, times gain; others untouched",
        "purpose": "checks that a refiner recipe learns; never use it to judge real performance",
        "splits": summary,
    }
    return summary


def oracle_boxes(image_embeddings: torch.Tensor, gt_index: torch.Tensor, fallback: torch.Tensor, gain: float,
                 threshold: float = 0.5) -> torch.Tensor:
    """The trivial reader's boxes on a signal store, xyxy in the 1024-px input frame: for each box,
    the cells of its own instance channel (``2 + gt_index``) covered at least ``threshold``, as a
    box of whole cells. Boxes without a GT or with no such cell get ``fallback`` (their coarse box)."""
    out = fallback.clone().float()
    cell = 1024 / image_embeddings.shape[-1]
    for j, g in enumerate(gt_index.tolist()):
        ch = FIRST_INSTANCE + g
        if g < 0 or ch >= image_embeddings.shape[0]:
            continue
        ys, xs = torch.nonzero(image_embeddings[ch].float() >= threshold * gain, as_tuple=True)
        if len(xs):
            out[j] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32) * cell
    return out
