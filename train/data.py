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

from boxrefine.shared.boxes import trainable_gt
from boxrefine.shared.config import PipelineConfig
from boxrefine.shared.console import console
from boxrefine.shared.evalboxes import detection_pairs, load_detections, sample_subset
from boxrefine.shared.rowdata import StoreRows, collate_rows
from boxrefine.shared.store import FeatureStore
from boxrefine.shared.workers import worker_init
from boxrefine.train.control import EpochSampler
from boxrefine.train.steps import seeded_generator


class TrainData:
    def __init__(self, cfg: PipelineConfig, store: FeatureStore, rank: int = 0, world: int = 1,
                 pin_memory: bool = False):
        tc = self.tc = cfg.train
        self.split = store.split(tc.train_split)
        on_damage = cfg.store.on_damage
        # both splits are checked before any work: no complete row is refused, damage follows on_damage
        self.records, self.rows = self.split.usable_rows(on_damage)
        self.val_name = cfg.val_split()
        self.val_ds = StoreRows.from_store(cfg.store.path, self.val_name, on_damage=on_damage) \
            if self.val_name else None
        self.keys = self.split.keys()
        self.image_ids = self.split.image_ids()
        self.dataset = StoreRows(cfg.store.path, tc.train_split, self.rows.tolist(), self.records, self.keys,
                                 on_damage=on_damage)
        scfg = cfg.data.splits[tc.train_split]
        dets = (load_detections(scfg.detections, set(self.image_ids.tolist()) - {-1})
                if (tc.use_detections and scfg.detections) else None)
        self.det_pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        zero_size: list[int] = []  # annotation ids of non-crowd GT boxes without area: never targets
        for i in self.rows.tolist():
            gt = self.dataset.read_gt(i)
            if gt is None:  # damaged, left out (store.on_damage: skip)
                continue
            boxes, info = torch.from_numpy(gt[1]), torch.from_numpy(gt[2])
            zero_size += info[(info[:, 2] == 0) & ~trainable_gt(boxes, info), 0].tolist()
            if dets is not None:
                self.det_pairs[i] = detection_pairs(dets.get(int(self.image_ids[i]), []), boxes, info, tc.match_iou)
        if zero_size:
            console.print(f"{cfg.store.path}: split {tc.train_split!r}: {len(zero_size)} zero-size GT box(es) (e.g. "
                          f"annotation id {min(zero_size)}) are never training targets", style="yellow", markup=False)
        console.print(f"train: {len(self.subset(0))} of {len(self.rows)} images (sample_ratio {tc.sample_ratio}, "
                      f"seed {tc.seed}{', redrawn each epoch' if tc.resample_each_epoch else ''})", markup=False)
        position = {int(r): k for k, r in enumerate(self.rows.tolist())}
        self.sampler = EpochSampler(lambda epoch: [position[int(r)] for r in self.epoch_order(epoch)],
                                    tc.batch_images, rank, world)
        self.loader: DataLoader | None = DataLoader(
            self.dataset, batch_sampler=self.sampler, num_workers=tc.num_workers, collate_fn=collate_rows,
            pin_memory=pin_memory, persistent_workers=tc.num_workers > 0,
            prefetch_factor=2 if tc.num_workers else None, worker_init_fn=worker_init())

    def subset(self, epoch: int) -> np.ndarray:
        """Store rows trained on in ``epoch`` (seeded; redrawn per epoch if configured)."""
        seed = self.tc.seed + (epoch if self.tc.resample_each_epoch else 0)
        return self.rows[sample_subset(len(self.rows), self.tc.sample_ratio, seed)]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Store rows of ``epoch`` in their seeded training order (the same on every rank)."""
        subset = self.subset(epoch)
        return subset[torch.randperm(len(subset), generator=seeded_generator(self.tc.seed, epoch)).numpy()]

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
