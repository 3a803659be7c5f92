"""Extract: images → HQ-SAM encoder (once per image) → the feature store.

Pipeline, so that the encoder never waits on anything else:

    DataLoader workers  : read + decode the image, HQ-SAM's ResizeLongestSide, GT masks resized once
    main thread         : Sam.preprocess + image encoder, batched, on the device
    writer threads      : cast/compress/write each row's chunks, then its record (the commit)

Incremental: a row is skipped when its record is COMPLETE and both the image file (size, mtime) and
its annotations are unchanged; only the GT is rewritten (no encoder work) when just the annotations
changed. ``--shard i/n`` takes rows i, i+n, ... of each split; torchrun sets it from RANK/WORLD_SIZE.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from shared.config import PipelineConfig, parse_shard
from shared.console import console, progress
from shared.imageio import ImageError, decode_rgb, source_fingerprint
from shared.records import (
    DataError,
    ImageRecord,
    instance_mask,
    load_coco,
    preprocess_shape,
    resize_gt_masks,
    resolve_image,
)
from shared.sam import (
    IMG_SIZE,
    INTERM_CHANNELS,
    build_hq_sam,
    checkpoint_info,
    encode,
    resolve_device,
)
from shared.store import (
    STATE_BAD,
    STATE_COMPLETE,
    STATE_EMPTY,
    F,
    FeatureStore,
    SplitStore,
    StoreError,
    identity_for,
    to_storage,
)


class ExtractError(RuntimeError):
    """A fatal extract problem (``--strict`` bad image, ...); rows already written are kept."""


@dataclass
class Job:
    row: int
    record: ImageRecord
    path: Path
    gt_only: bool  # image unchanged, only annotations changed: no decode, no encoder


@dataclass
class SplitSummary:
    split: str
    rows: int
    todo: int = 0
    encoded: int = 0
    gt_only: int = 0
    skipped: int = 0
    bad: dict[int, dict[str, str]] = field(default_factory=dict)


@dataclass
class ExtractResult:
    store: str
    splits: list[SplitSummary]
    wall_s: float
    encoder_s: float
    encoded: int

    @property
    def images_per_s(self) -> float:
        return self.encoded / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def encoder_share(self) -> float:
        return self.encoder_s / self.wall_s if self.wall_s > 0 else 0.0


def _gt_arrays(rec: ImageRecord, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if rec.instances:
        masks = np.stack([instance_mask(a, rec.height, rec.width) for a in rec.instances])
    else:
        masks = np.zeros((0, rec.height, rec.width), np.uint8)
    small = resize_gt_masks(masks, size)
    boxes = np.array([a.box for a in rec.instances], np.float32).reshape(-1, 4)
    info = np.array([[a.ann_id, a.category_id, a.iscrowd] for a in rec.instances], np.int64).reshape(-1, 3)
    return small, boxes, info


class _ImageDataset(Dataset):
    """Decodes and resizes images in DataLoader workers. Never raises for a bad image: it returns
    the reason, so one corrupt file cannot kill the loader."""

    def __init__(self, jobs: list[Job], gt_size: int):
        from segment_anything_hq.utils.transforms import ResizeLongestSide

        self.jobs, self.gt_size = jobs, gt_size
        self.transform = ResizeLongestSide(IMG_SIZE)

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        job = self.jobs[idx]
        rec = job.record
        out: dict[str, Any] = {"idx": idx}
        try:
            fp = source_fingerprint(job.path)
            out["fingerprint"] = fp
            if not job.gt_only:
                data = job.path.read_bytes()
                rgb = decode_rgb(data, job.path)
                h, w = rgb.shape[:2]
                if (h, w) != (rec.height, rec.width):
                    raise ImageError(f"{job.path}: image is {w}x{h} but the annotations say "
                                     f"{rec.width}x{rec.height}")
                out["image"] = torch.from_numpy(self.transform.apply_image(rgb)).permute(2, 0, 1).contiguous()
            out["gt"] = _gt_arrays(rec, self.gt_size)
        except FileNotFoundError:
            out["error"] = f"{job.path}: file not found"
        except (ImageError, DataError) as e:
            out["error"] = str(e)
        except OSError as e:
            out["error"] = f"{job.path}: cannot read: {e.strerror or e}"
        except Exception as e:  # a decoder crash on one file must not stop the run
            out["error"] = f"{job.path}: {type(e).__name__}: {e}"
        return out


def _collate(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


def _shard(cfg: PipelineConfig) -> tuple[int, int]:
    if cfg.extract.shard:
        return parse_shard(cfg.extract.shard)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


def plan_split(split: SplitStore, records: list[ImageRecord], images_root: Path, shard: tuple[int, int]
               ) -> tuple[list[Job], int]:
    """Rows of this shard that need work; returns (jobs, rows skipped as up to date)."""
    keys = split.keys()
    row_of = {int(k): i for i, k in enumerate(keys.tolist())}
    rows = split.read_rows()
    jobs, skipped = [], 0
    i_shard, n_shard = shard
    for rec in records:
        i = row_of[rec.key]
        if i % n_shard != i_shard:
            continue
        path = resolve_image(images_root, rec.file_name)
        try:
            fp = source_fingerprint(path)
        except OSError:
            fp = (-1, -1)
        r = rows[i]
        same_src = (int(r[F["src_size"]]), int(r[F["src_mtime_ns"]])) == fp
        state = int(r[F["state"]])
        if state == STATE_COMPLETE and same_src and int(r[F["ann_hash"]]) == rec.ann_hash:
            skipped += 1
        elif state == STATE_COMPLETE and same_src:
            jobs.append(Job(i, rec, path, gt_only=True))
        elif state == STATE_BAD and same_src and int(r[F["ann_hash"]]) == rec.ann_hash:
            skipped += 1  # still bad and unchanged: its report stays; touching the file retries it
        else:
            jobs.append(Job(i, rec, path, gt_only=False))
    return jobs, skipped


class _Writer:
    """Writes rows on background threads with a bounded queue, so the encoder never waits on
    compression or I/O, and memory stays bounded."""

    def __init__(self, threads: int, max_pending: int):
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="store-writer")
        self.slots = threading.BoundedSemaphore(max_pending)
        self.futures: list[Future] = []

    def submit(self, fn: Any, *args: Any) -> None:
        self.slots.acquire()
        fut = self.pool.submit(fn, *args)
        fut.add_done_callback(lambda _: self.slots.release())
        self.futures.append(fut)
        if len(self.futures) > 256:
            self.raise_errors(done_only=True)

    def raise_errors(self, done_only: bool = False) -> None:
        keep = []
        for f in self.futures:
            if done_only and not f.done():
                keep.append(f)
                continue
            f.result()
        self.futures = keep

    def close(self) -> None:
        try:
            self.raise_errors()
        finally:
            self.pool.shutdown(wait=True)


def _record(rec: ImageRecord, fp: tuple[int, int], state: int, n_inst: int) -> dict[str, int]:
    ih, iw = preprocess_shape(rec.height, rec.width, IMG_SIZE)
    return {"state": state, "src_size": fp[0], "src_mtime_ns": fp[1], "ann_hash": rec.ann_hash,
            "orig_h": rec.height, "orig_w": rec.width, "input_h": ih, "input_w": iw, "n_instances": n_inst}


def _write_row(split: SplitStore, job: Job, fp: tuple[int, int], feats: tuple[np.ndarray, np.ndarray] | None,
               gt: tuple[np.ndarray, np.ndarray, np.ndarray], had_record: bool) -> None:
    if had_record:
        split.clear_row(job.row)
    if feats is not None:
        split.write_features(job.row, *feats)
    split.write_gt(job.row, *gt)
    split.commit_row(job.row, _record(job.record, fp, STATE_COMPLETE, len(gt[1])))


def run_extract(cfg: PipelineConfig, *, model: torch.nn.Module | None = None, announce: bool = True
                ) -> ExtractResult:
    """Fill the configured store; returns what was done. ``model`` lets tests/benchmarks pass a
    ready HQ-SAM; otherwise it is built only if some row needs the encoder."""
    t_start = time.perf_counter()
    ecfg = cfg.extract
    ckpt = checkpoint_info(cfg.model.type, cfg.model.checkpoint, cfg.model.seed)
    identity = identity_for(cfg, ckpt.fingerprint)
    ckpt_attrs = {"kind": ckpt.kind, "fingerprint": ckpt.fingerprint, "sha256": ckpt.sha256,
                  "path": ckpt.path, "official_name": ckpt.official_name, "seed": ckpt.seed}
    store = FeatureStore.open_or_create(cfg.store, identity, ckpt_attrs, cfg.to_dict(), overwrite=ecfg.overwrite)
    shard = _shard(cfg)
    shard_name = f"shard-{shard[0]}-of-{shard[1]}"
    console.print(f"extract → {cfg.store.path}  model {cfg.model.type}, weights {ckpt.describe()}, "
                  f"dtype {cfg.store.dtype}" + (f", {shard_name}" if shard[1] > 1 else ""))

    device = resolve_device(cfg.model.device)
    splits = ecfg.splits or list(cfg.data.splits)
    summaries: list[SplitSummary] = []
    encoder_s, encoded = 0.0, 0

    plans = []
    for name in splits:
        scfg = cfg.data.splits[name]
        recs = load_coco(scfg.annotations)
        split = store.layout_split(name, recs.images,
                                   {"path": str(scfg.annotations), "sha256": recs.sha256},
                                   str(scfg.images), INTERM_CHANNELS[cfg.model.type])
        jobs, skipped = plan_split(split, list(recs.images), scfg.images, shard)
        summ = SplitSummary(name, split.n_rows, todo=len(jobs), skipped=skipped)
        summaries.append(summ)
        plans.append((split, jobs, summ))

    need_encoder = any(not j.gt_only for _, jobs, _ in plans for j in jobs)
    if need_encoder and model is None:
        model = build_hq_sam(cfg.model.type, cfg.model.checkpoint, cfg.model.seed, device, announce=announce)
    if model is not None:
        device = next(model.parameters()).device
    pin = device.type == "cuda"

    for split, jobs, summ in plans:
        if not jobs:
            console.print(f"{split.name}: {summ.rows} rows, all up to date — nothing to do", markup=False)
            continue
        rows_before = split.read_rows()
        loader = DataLoader(_ImageDataset(jobs, cfg.store.gt_mask_size), batch_size=ecfg.batch_size,
                            shuffle=False, num_workers=ecfg.num_workers, collate_fn=_collate,
                            pin_memory=False, prefetch_factor=4 if ecfg.num_workers else None,
                            persistent_workers=False)
        writer = _Writer(ecfg.write_threads, max_pending=max(4, 2 * ecfg.batch_size))
        bad_lock = threading.Lock()
        try:
            with progress(f"extract {split.name}", len(jobs)) as bar:
                for items in loader:
                    ok = []
                    for it in items:
                        job = jobs[it["idx"]]
                        if "error" in it:
                            with bad_lock:
                                summ.bad[job.record.key] = {"file": job.record.file_name, "reason": it["error"]}
                            console.print(f"bad image: {it['error']}", markup=False, style="red")
                            if ecfg.strict:
                                raise ExtractError(f"{it['error']} (--strict)")
                            fp = it.get("fingerprint", (-1, -1))
                            writer.submit(split.commit_row, job.row, _record(job.record, fp, STATE_BAD, 0))
                            continue
                        had = int(rows_before[job.row, F["state"]]) != STATE_EMPTY
                        if job.gt_only:
                            writer.submit(_write_row, split, job, it["fingerprint"], None, it["gt"], had)
                            summ.gt_only += 1
                        else:
                            ok.append((job, it, had))
                    if ok:
                        assert model is not None
                        imgs = [it["image"][None].pin_memory() if pin else it["image"][None] for _, it, _ in ok]
                        t0 = time.perf_counter()
                        emb, interm = encode(model, imgs, ecfg.encoder_precision)
                        emb_np = to_storage(emb, cfg.store.dtype)  # cast on device, then one copy
                        interm_np = to_storage(interm, cfg.store.dtype)
                        encoder_s += time.perf_counter() - t0
                        if cfg.store.dtype == "float16" and not (np.isfinite(emb_np).all()
                                                                 and np.isfinite(interm_np).all()):
                            raise StoreError(f"{cfg.store.path}: features overflow float16 for "
                                             f"{ok[0][0].path}; set store.dtype to bfloat16 or float32")
                        for b, (job, it, had) in enumerate(ok):
                            writer.submit(_write_row, split, job, it["fingerprint"],
                                          (emb_np[b], interm_np[b]), it["gt"], had)
                        summ.encoded += len(ok)
                        encoded += len(ok)
                    bar.advance(len(items))
        finally:
            try:
                writer.close()
            finally:
                if summ.bad:
                    previous = {}
                    try:
                        previous = dict(split.group["bad_images"][shard_name].attrs.asdict())
                    except KeyError:
                        pass
                    merged = {int(k): v for k, v in previous.items()}
                    merged.update(summ.bad)
                    split.record_bad_images(shard_name, merged)
    wall = time.perf_counter() - t_start
    result = ExtractResult(cfg.store.path, summaries, wall, encoder_s, encoded)
    _print_summary(result, store)
    return result


def _print_summary(res: ExtractResult, store: FeatureStore) -> None:
    for s in res.splits:
        console.print(f"{s.split}: rows {s.rows}: encoded {s.encoded}, gt-only {s.gt_only}, "
                      f"up to date {s.skipped}, bad {len(s.bad)}", markup=False)
        for key, rep in s.bad.items():
            console.print(f"    bad: {rep['file']} — {rep['reason']} (key {key})", markup=False)
    if res.encoded:
        console.print(f"{res.encoded} images in {res.wall_s:.1f}s = {res.images_per_s:.2f} img/s; "
                      f"encoder {res.encoder_s:.1f}s = {100 * res.encoder_share:.0f}% of wall time")
    else:
        console.print(f"no encoder work ({res.wall_s:.1f}s)")
