"""Image decoding in DataLoader workers, and the writer threads that commit rows to the store.

Pipeline, so that the encoder never waits on anything else:

    DataLoader workers  : read + decode the image, HQ-SAM's ResizeLongestSide, GT masks resized once
    main thread         : Sam.preprocess + image encoder, batched, on the device (extract/run.py)
    writer threads      : cast/compress/write each row's chunks, then its record (the commit)
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from boxrefine.extract.plan import Job, gt_arrays, row_record
from boxrefine.shared.data.imageio import decode_rgb, grey_levels, source_fingerprint
from boxrefine.shared.data.intensity import ImageError, Intensity
from boxrefine.shared.data.records import DataError
from boxrefine.shared.model.sam import encoder_input
from boxrefine.shared.store.location import store_access
from boxrefine.shared.store.schema import STATE_COMPLETE
from boxrefine.shared.store.split import SplitStore

MIN_GREY_LEVELS = 16  # fewer after decoding: warn, the encoder sees an almost flat image


class ImageJobs(Dataset):
    """Decodes and resizes the images of ``jobs``. Never raises for a bad image: the item carries the
    reason instead, so one corrupt file cannot kill the loader."""

    def __init__(self, jobs: list[Job], gt_size: int, intensity: Intensity | None = None):
        self.jobs, self.gt_size, self.intensity = jobs, gt_size, intensity or Intensity()

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        job = self.jobs[idx]
        rec = job.record
        out: dict[str, Any] = {"idx": idx}
        try:
            if job.refused:
                raise ImageError(job.refused)
            out["fingerprint"] = job.fingerprint if job.gt_only and job.fingerprint else source_fingerprint(job.path)
            if job.needs_image:
                rgb = decode_rgb(job.path.read_bytes(), job.path, self.intensity)
                levels = grey_levels(rgb)
                if levels < MIN_GREY_LEVELS:
                    out["warning"] = (f"{job.path}: decodes to only {levels} grey level(s) "
                                      f"(data.intensity is {self.intensity.fingerprint}); check the image")
                h, w = rgb.shape[:2]
                if (h, w) != (rec.height, rec.width):
                    raise ImageError(f"{job.path}: image is {w}x{h} but the annotations say "
                                     f"{rec.width}x{rec.height}")
                out["image"] = encoder_input(rgb)
            out["gt"] = gt_arrays(rec, self.gt_size)
        except FileNotFoundError:
            out["error"] = f"{job.path}: file not found"
        except (ImageError, DataError) as e:
            out["error"] = str(e)
        except OSError as e:
            out["error"] = f"{job.path}: cannot read: {e.strerror or e}"
        except Exception as e:  # a decoder crash on one file must not stop the run
            out["error"] = f"{job.path}: {type(e).__name__}: {e}"
        return out


def collate_items(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


def write_row(split: SplitStore, job: Job, fp: tuple[int, int], feats: tuple[np.ndarray, np.ndarray] | None,
              gt: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """The row protocol: clear the old record, write the chunks, then the record (the commit), which
    carries the digests of what was written (features kept by a GT-only rewrite keep theirs) and the
    row's new generation."""
    with store_access(split.store_path, f"write {split.name} row {job.row} ({job.path})"):
        if job.had_record:
            split.clear_row(job.row, job.generation)
        digests = dict(job.kept) if feats is None else split.write_features(job.row, *feats)
        digests.update(split.write_gt(job.row, *gt))
        split.commit_row(job.row, {**row_record(job.record, fp, STATE_COMPLETE, len(gt[1]), job.generation),
                                   **digests})


def copy_row(split: SplitStore, job: Job, fp: tuple[int, int], source: Any,
             gt: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """:func:`write_row` with the features read from ``source`` (``extract/reuse.py``), on a writer thread."""
    assert job.reuse_row is not None
    write_row(split, job, fp, source.read(split.name, job.reuse_row), gt)


def write_bad(split: SplitStore, job: Job, record: dict[str, int]) -> None:
    with store_access(split.store_path, f"write {split.name} row {job.row} ({job.path})"):
        split.commit_row(job.row, record)


class RowWriter:
    """Writes rows on background threads with a bounded queue, so the encoder never waits on
    compression or I/O and memory stays bounded. A failed write is raised by the next ``submit``."""

    def __init__(self, threads: int, max_pending: int):
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="store-writer")
        self.slots = threading.BoundedSemaphore(max_pending)
        self.futures: list[Future] = []

    def submit(self, fn: Any, *args: Any) -> None:
        self.raise_errors(done_only=True)
        self.slots.acquire()
        fut = self.pool.submit(fn, *args)
        fut.add_done_callback(lambda _: self.slots.release())
        self.futures.append(fut)

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
