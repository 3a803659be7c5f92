"""What training reads: the train split's usable rows and the detector boxes matched to their GT, the
seeded subset and order of every epoch, the loader of this rank's part of each step, and the
validation rows (all of them, or this rank's share).

Every epoch's subset and order come from (seed, epoch) alone, so every rank of a DDP run computes the
same order and takes its own part of each step's slice of it (``EpochSampler``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from boxrefine.shared.config import PipelineConfig
from boxrefine.shared.data.detections import load_detections
from boxrefine.shared.runtime.console import console
from boxrefine.shared.runtime.workers import worker_context, worker_init
from boxrefine.shared.store.feature_store import FeatureStore
from boxrefine.shared.store.rows import StoreRows, collate_rows
from boxrefine.train.control import EpochSampler, sample_subset
from boxrefine.train.steps import gt_targets, seeded_generator


class TrainData:
    def __init__(self, cfg: PipelineConfig, store: FeatureStore, rank: int = 0, world: int = 1,
                 pin_memory: bool = False):
        train_cfg = self.train_cfg = cfg.train
        self.cfg, self.rank, self.world, self.pin_memory = cfg, rank, world, pin_memory
        self.split = store.split(train_cfg.train_split)
        on_damage = cfg.store.on_damage
        # both splits are checked before any work: no complete row is refused, damage follows on_damage
        records, rows = self.split.usable_rows(on_damage)
        self.val_name = cfg.val_split()
        self.val_ds = StoreRows.from_store(cfg.store.path, self.val_name, on_damage=on_damage) \
            if self.val_name else None
        self.det_pairs: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self.loader: DataLoader | None = None
        self.use_rows(records, rows)
        console.print(f"train: {len(self.subset(0))} of {len(self.rows)} images "
                      f"(sample_ratio {train_cfg.sample_ratio}, "
                      f"seed {train_cfg.seed}{', redrawn each epoch' if train_cfg.resample_each_epoch else ''})"
                      + (", each epoch from the rows complete when it starts (--follow)" if train_cfg.follow else ""),
                      markup=False)

    def use_rows(self, records: np.ndarray, rows: np.ndarray) -> None:
        """Train on store ``rows`` (``records``: the split's records): the dataset, the GT targets of rows
        not seen yet (zero-size boxes, detections matched to GT) and the loader. ``train --follow`` calls
        it again at the start of every epoch with the rows complete then (``train/follow.py``)."""
        cfg, train_cfg = self.cfg, self.train_cfg
        self.records, self.rows = records, rows
        self.keys, self.image_ids = self.split.keys(), self.split.image_ids()
        self.dataset = StoreRows(cfg.store.path, train_cfg.train_split, rows.tolist(), records, self.keys,
                                 on_damage=cfg.store.on_damage)
        split_cfg = cfg.data.splits[train_cfg.train_split]
        new = [i for i in rows.tolist() if i not in self.det_pairs]
        dets = (load_detections(split_cfg.detections, {int(self.image_ids[i]) for i in rows.tolist()} - {-1},
                                set(self.image_ids.tolist()) - {-1}, missing_score=0.0)  # train reads no score
                if (train_cfg.use_detections and split_cfg.detections and new) else None)
        zero_size = gt_targets(self.dataset, new, self.image_ids, dets, train_cfg.match_iou, self.det_pairs)
        if zero_size:
            console.print(f"{cfg.store.path}: split {train_cfg.train_split!r}: {len(zero_size)} zero-size GT "
                          f"box(es) (e.g. annotation id {min(zero_size)}; a box wholly outside its image is clipped "
                          "to zero size) are never training targets", style="yellow", markup=False)
        position = {int(r): k for k, r in enumerate(rows.tolist())}
        self.sampler = EpochSampler(lambda epoch: [position[int(r)] for r in self.epoch_order(epoch)],
                                    train_cfg.batch_images, self.rank, self.world)
        self.loader = DataLoader(
            self.dataset, batch_sampler=self.sampler, num_workers=train_cfg.num_workers, collate_fn=collate_rows,
            pin_memory=self.pin_memory, persistent_workers=train_cfg.num_workers > 0,
            prefetch_factor=train_cfg.prefetch_batches if train_cfg.num_workers else None, worker_init_fn=worker_init(),
            multiprocessing_context=worker_context(cfg.store.path, train_cfg.num_workers))

    def subset(self, epoch: int) -> np.ndarray:
        """Store rows trained on in ``epoch`` (seeded; redrawn per epoch if configured)."""
        seed = self.train_cfg.seed + (epoch if self.train_cfg.resample_each_epoch else 0)
        return self.rows[sample_subset(len(self.rows), self.train_cfg.sample_ratio, seed)]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Store rows of ``epoch`` in their seeded training order (the same on every rank)."""
        subset = self.subset(epoch)
        return subset[torch.randperm(len(subset), generator=seeded_generator(self.train_cfg.seed, epoch)).numpy()]

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps of an epoch (the subset has the same size every epoch)."""
        return self.sampler.steps(len(self.subset(0)))

    def val_part(self, rank: int, world: int) -> StoreRows | None:
        """The validation rows rank ``rank`` of ``world`` scores: every ``world``-th from the ``rank``-th."""
        if self.val_ds is None or world == 1:
            return self.val_ds
        ds = self.val_ds
        return StoreRows(ds.store_path, ds.split_name, ds.rows[rank::world], ds.records, ds.keys, ds.with_masks,
                         ds.on_damage)

    def close(self) -> None:
        """Shut the persistent DataLoader workers down."""
        self.loader = None
