"""Extract: images → HQ-SAM encoder (once per image) → the feature store.

``Extractor(cfg).setup()`` opens or creates the store (refusing one made with another identity),
lays out every split and plans the rows this process must do (``extract/plan.py``); ``run()``
decodes in DataLoader workers, encodes in batches on the device and commits rows from writer
threads (``extract/loader.py``). The model is built only when some row needs the encoder.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from boxrefine.extract.claims import RowClaims
from boxrefine.extract.loader import ImageJobs, RowWriter, collate_items, copy_row, write_bad, write_row
from boxrefine.extract.overwrite import open_output_store
from boxrefine.extract.plan import Job, SplitSummary, plan_split, row_record, shard_of
from boxrefine.extract.reuse import FeatureSource, mark_reusable
from boxrefine.extract.sources import split_records
from boxrefine.shared.config import PipelineConfig
from boxrefine.shared.data.records import SplitRecords
from boxrefine.shared.errors import BoxrefineError
from boxrefine.shared.model.sam import INTERM_CHANNELS, build_hq_sam, encode
from boxrefine.shared.model.weights import checkpoint_info
from boxrefine.shared.runtime.console import console, progress
from boxrefine.shared.runtime.device import encoder_precision_note, resolve_device
from boxrefine.shared.runtime.signals import StopSignals
from boxrefine.shared.runtime.workers import worker_init
from boxrefine.shared.store.bad_images import bad_images, record_bad_images, shard_reports
from boxrefine.shared.store.codecs import to_storage
from boxrefine.shared.store.identity import identity_for
from boxrefine.shared.store.location import StoreError, store_access
from boxrefine.shared.store.row_index import IndexPart
from boxrefine.shared.store.schema import FIELD, STATE_BAD, STATE_STALE
from boxrefine.shared.store.split import SplitStore


class ExtractError(BoxrefineError, RuntimeError):
    """A fatal extract problem (``--strict`` bad image, ...); rows already written are kept."""


@dataclass
class ExtractResult:
    store: str
    splits: list[SplitSummary]
    wall_s: float
    encoder_s: float
    encoded: int
    stopped: bool = False  # ended early by SIGTERM/SIGINT (the rows in flight were committed)

    @property
    def images_per_s(self) -> float:
        return self.encoded / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def encoder_share(self) -> float:
        return self.encoder_s / self.wall_s if self.wall_s > 0 else 0.0


class Extractor:
    """``setup()`` (open the store, :meth:`plan`) → ``run()``; ``--watch`` calls plan → run again and
    again (``extract/watch.py``). ``stop`` (a :class:`StopSignals`) ends a run after the batch in flight,
    its rows committed."""

    def __init__(self, cfg: PipelineConfig, model: torch.nn.Module | None = None, announce: bool = True,
                 stop: StopSignals | None = None, quiet: bool = False, all_bad_is_error: bool = True):
        """``all_bad_is_error``: a split whose every image is bad ends the run with an error (refine
        passes the boxes of bad images through instead, and says False)."""
        self.cfg, self.ecfg = cfg, cfg.extract
        self.model, self.announce, self.stop, self.quiet = model, announce, stop, quiet
        self.encoder_s, self.encoded = 0.0, 0
        self.rows_done = 0  # rows processed (encoded, rewritten, reused or found bad) since the start
        self.all_bad_is_error = all_bad_is_error

    def setup(self) -> Extractor:
        """Open (or create) the store, then plan every split (:meth:`plan`)."""
        self.t_start = time.perf_counter()
        cfg = self.cfg
        ckpt = checkpoint_info(cfg.model.type, cfg.model.checkpoint, cfg.model.seed)
        ckpt_attrs = {"kind": ckpt.kind, "fingerprint": ckpt.fingerprint, "sha256": ckpt.sha256,
                      "path": ckpt.path, "official_name": ckpt.official_name, "seed": ckpt.seed}
        identity = identity_for(cfg, ckpt.fingerprint)
        self.source = FeatureSource(self.ecfg.reuse_features, identity) if self.ecfg.reuse_features else None
        self.store = open_output_store(cfg, identity, ckpt_attrs)
        self.shard = shard_of(cfg)
        self.shard_name = f"shard-{self.shard[0]}-of-{self.shard[1]}"
        console.print(f"extract → {cfg.store.path}  model {cfg.model.type}, weights {ckpt.describe()}, "
                      f"dtype {cfg.store.dtype}" + (f", {self.shard_name}" if self.shard[1] > 1 else ""),
                      markup=False)
        self.parts: dict[str, IndexPart] = {}  # what this process knows of its rows' records, per split
        self.told: set[tuple[Any, str]] = set()  # annotation files whose clipped GT boxes were reported
        return self.plan()

    def plan(self) -> Extractor:
        """Read the annotation files, lay out every split and plan the rows of this shard that need work
        (again on every cycle of ``--watch``: new images, changed images, changed annotations)."""
        cfg = self.cfg
        self.t_start = time.perf_counter()
        self.plans: list[tuple[SplitStore, list[Job], SplitSummary]] = []
        self.records: dict[str, SplitRecords] = {}
        for name in self.ecfg.splits or list(cfg.data.splits):
            split_cfg = cfg.data.splits[name]
            recs, unreadable = split_records(split_cfg)  # images-only splits: sizes from the image headers
            self.records[name] = recs
            self._report_clipped(recs)
            ann = {"path": str(split_cfg.annotations) if split_cfg.annotations else None, "sha256": recs.sha256,
                   "ground_truth": recs.ground_truth}
            split = self.store.layout_split(name, recs.images, ann, str(split_cfg.images),
                                            INTERM_CHANNELS[cfg.model.type])
            rows = self._records(split)
            jobs, summary, kept_bad = plan_split(split, list(recs.images), split_cfg.images, self.shard, rows)
            for rep in unreadable.values():
                console.print(f"bad image: {rep['reason']}", markup=False, style="red")
            summary.bad.update(unreadable)
            summary.no_row = len(unreadable)
            if self.source is not None:
                mark_reusable(self.source, name, jobs)
            if kept_bad:
                reports = bad_images(split)
                summary.kept_bad = {r.key: reports.get(r.key, {"file": r.file_name, "reason": f"{r.file_name}: bad"})
                                 for r in kept_bad}
                if self.ecfg.strict:
                    raise ExtractError(self._strict_message(name, summary.kept_bad))
            self.plans.append((split, jobs, summary))
        return self

    def _report_clipped(self, recs: SplitRecords) -> None:
        """Say once per annotation file how many GT boxes reach outside their image (clipped to it, as
        the masks are) and how many lie wholly outside (zero size once clipped: never a target)."""
        if not recs.clipped or (recs.annotations, recs.sha256) in self.told:
            return
        self.told.add((recs.annotations, recs.sha256))
        wholly = f", {len(recs.emptied)} of them wholly outside (zero size: never a training target)" \
            if recs.emptied else ""
        console.print(f"{recs.annotations}: {len(recs.clipped)} GT box(es) reach outside their image and are clipped "
                      f"to it{wholly} (e.g. annotation id {(recs.emptied or recs.clipped)[0]})", style="yellow",
                      markup=False)

    def _records(self, split: SplitStore) -> np.ndarray:
        """The split's records for planning: read from the rows themselves on the first plan; on later
        cycles of ``--watch``, what this process knows (it is the only writer of its rows) plus the
        rows added since and the index's newer records (rows ``store verify --repair`` marked)."""
        part = self.parts.get(split.name)
        if part is None or part.known.shape[0] > split.n_rows:
            rows = split.read_rows()
            part = self.parts[split.name] = IndexPart(split, self.shard)
            part.load(rows)
        else:
            rows = part.grow(split, split.marked_stale)
        split.watch_records(part.set)
        return rows

    def bad_images(self, split: str) -> dict[int, dict[str, str]]:
        """The images of ``split`` that planning found bad or unreadable: {row key: {"file", "reason"}}."""
        return next(summary.bad for split_store, _, summary in self.plans if split_store.name == split)

    def restrict(self, split: str, keys: set[int]) -> None:
        """Do only the rows of ``split`` whose key is in ``keys`` (refine: the images with boxes to refine)."""
        for split_store, jobs, summary in self.plans:
            if split_store.name == split:
                jobs[:] = [j for j in jobs if j.record.key in keys]
                summary.todo = len(jobs)

    def _strict_message(self, split: str, kept_bad: dict[int, dict[str, str]]) -> str:
        reasons = sorted(rep["reason"] for rep in kept_bad.values())
        more = f"; and {len(reasons) - 3} more" if len(reasons) > 3 else ""
        return (f"{self.cfg.store.path}: split {split!r}: --strict, and {len(reasons)} image(s) are recorded bad by "
                f"an earlier run: {'; '.join(reasons[:3])}{more}. Fix them (a changed file is retried), remove them "
                "from the annotations, or run without --strict")

    def run(self) -> ExtractResult:
        cfg = self.cfg
        encoder_s0, encoded0 = self.encoder_s, self.encoded  # this run's share (``--watch`` runs again and again)
        self.device = resolve_device(cfg.model.device)
        if self.model is None and any(j.needs_image for _, jobs, _ in self.plans for j in jobs):
            self.model = build_hq_sam(cfg.model.type, cfg.model.checkpoint, cfg.model.seed, self.device,
                                      announce=self.announce)
        if self.model is not None:
            self.device = next(self.model.parameters()).device
            slow = encoder_precision_note(self.ecfg.encoder_precision, self.device)
            if slow and not self.quiet:
                console.print(f"warning: {slow}", style="yellow", markup=False)
        for split, jobs, summary in self.plans:
            if self.stopping:
                break
            if not jobs:
                if not self.quiet:
                    console.print(f"{split.name}: {summary.rows} rows, all up to date — nothing to do", markup=False)
                self._flush_index(split, required=False)
                continue
            self.extract_split(split, jobs, summary)
        res = ExtractResult(cfg.store.path, [s for _, _, s in self.plans], time.perf_counter() - self.t_start,
                            self.encoder_s - encoder_s0, self.encoded - encoded0, stopped=self.stopping)
        if not (self.quiet and not any(s.todo for s in res.splits)):
            print_summary(res)
        if self.stopping:
            return res
        unusable = [m for split, _, summary in self.plans if (m := self._all_bad(split, summary))]
        if unusable and self.all_bad_is_error:
            raise ExtractError("; ".join(unusable))
        return res

    def _all_bad(self, split: SplitStore, summary: SplitSummary) -> str | None:
        """The error when every image of a split is bad (a wrong image folder, typically): extract ends
        non-zero instead of leaving train a split with nothing in it."""
        states = self.parts[split.name].records()[:, FIELD["state"]]
        states = states[states != STATE_STALE]
        if len(states) == 0 or not (states == STATE_BAD).all():
            return None  # some row is complete, or still to do (e.g. by another shard)
        example = next(iter({**summary.kept_bad, **summary.bad, **bad_images(split)}.values()), {}).get("reason", "?")
        return (f"{self.cfg.store.path}: split {split.name!r}: all {len(states)} images are bad (e.g. {example}); "
                f"check data.splits.{split.name}.images ({self.cfg.data.splits[split.name].images})")

    def extract_split(self, split: SplitStore, jobs: list[Job], summary: SplitSummary) -> None:
        ecfg = self.ecfg
        loader = DataLoader(ImageJobs(jobs, self.cfg.store.gt_mask_size, self.cfg.data.intensity.mapping()),
                            batch_size=ecfg.batch_size,
                            shuffle=False, num_workers=ecfg.num_workers, collate_fn=collate_items,
                            prefetch_factor=4 if ecfg.num_workers else None, worker_init_fn=worker_init())
        writer = RowWriter(ecfg.write_threads, max_pending=max(4, 2 * ecfg.batch_size))
        claims = RowClaims(split)
        lock = threading.Lock()
        failed = True  # until the loop ends: a failure of the index write must not hide the first error
        try:
            with progress(f"extract {split.name}", len(jobs)) as bar:
                for items in loader:
                    to_encode = []
                    for it in items:
                        job = jobs[it["idx"]]
                        if "warning" in it:
                            console.print(f"warning: {it['warning']}", style="yellow", markup=False)
                        if "error" in it:
                            self._bad(split, job, it, summary, writer, lock)
                        elif job.gt_only:
                            writer.submit(write_row, split, job, it["fingerprint"], None, it["gt"])
                            summary.gt_only += 1
                        elif job.reuse_row is not None:
                            writer.submit(copy_row, split, job, it["fingerprint"], self.source, it["gt"])
                            summary.reused += 1
                        else:
                            to_encode.append((job, it))
                    to_encode = self._claim(claims, to_encode, summary)
                    if to_encode:
                        self._encode(split, to_encode, writer)
                        summary.encoded += len(to_encode)
                    writer.raise_errors(done_only=True)  # a failed write (disk full) stops the run here
                    bar.advance(len(items))
                    self.rows_done += len(items)
                    self.parts[split.name].maybe_flush()
                    if self.stopping:  # SIGTERM/SIGINT: the rows of this batch are committed below, then stop
                        break
            failed = False
        finally:
            try:
                writer.close()  # raises a failed row write
            except BaseException:
                failed = True
                raise
            finally:
                claims.close(self.parts[split.name])
                self._record_bad(split, summary)
                if not (self.stop is not None and self.stop.forced):
                    self._flush_index(split, required=not failed)

    def _claim(self, claims: RowClaims, batch: list[tuple[Job, dict[str, Any]]], summary: SplitSummary
               ) -> list[tuple[Job, dict[str, Any]]]:
        """The part of ``batch`` whose rows this process holds (``extract/claims.py``); rows another
        extract process took since this one planned are skipped, and counted."""
        if not batch:
            return batch
        held = claims.take([job for job, _ in batch])
        if not all(held) and not summary.elsewhere:
            console.print(f"{summary.split}: another extract process is filling this store: each takes the rows the "
                          "other has not claimed", markup=False)
        summary.elsewhere += held.count(False)
        return [item for item, mine in zip(batch, held, strict=True) if mine]

    def _bad(self, split: SplitStore, job: Job, it: dict[str, Any], summary: SplitSummary, writer: RowWriter,
             lock: threading.Lock) -> None:
        with lock:
            summary.bad[job.record.key] = {"file": job.record.file_name, "reason": it["error"]}
        console.print(f"bad image: {it['error']}", markup=False, style="red")
        if self.ecfg.strict:
            raise ExtractError(f"{it['error']} (--strict)")
        writer.submit(write_bad, split, job, row_record(job.record, it.get("fingerprint", (-1, -1)), STATE_BAD, 0,
                                                        job.generation))

    def _encode(self, split: SplitStore, batch: list[tuple[Job, dict[str, Any]]], writer: RowWriter) -> None:
        assert self.model is not None
        cfg = self.cfg
        pin = self.device.type == "cuda"
        imgs = [it["image"][None].pin_memory() if pin else it["image"][None] for _, it in batch]
        t0 = time.perf_counter()
        emb, interm = encode(self.model, imgs, self.ecfg.encoder_precision)
        emb_np = to_storage(emb, cfg.store.dtype)  # cast on the device, then one copy
        interm_np = to_storage(interm, cfg.store.dtype)
        self.encoder_s += time.perf_counter() - t0
        if cfg.store.dtype == "float16" and not (np.isfinite(emb_np).all() and np.isfinite(interm_np).all()):
            raise StoreError(f"{cfg.store.path}: features overflow float16 for {batch[0][0].path}; set store.dtype "
                             "to bfloat16 or float32")
        for b, (job, it) in enumerate(batch):
            writer.submit(write_row, split, job, it["fingerprint"], (emb_np[b], interm_np[b]), it["gt"])
        self.encoded += len(batch)

    @property
    def stopping(self) -> bool:
        return self.stop is not None and self.stop.requested

    def _flush_index(self, split: SplitStore, required: bool) -> None:
        """Write this process's part of the split's row index if it changed. With nothing done, or after
        another error (``required`` False), a failure is only a warning: a read-only store stays usable,
        and the first error is the one reported."""
        try:
            self.parts[split.name].flush()
        except BoxrefineError as e:
            if required:
                raise
            console.print(f"warning: the row index was not updated: {e}", style="yellow", markup=False)

    def _record_bad(self, split: SplitStore, summary: SplitSummary) -> None:
        if not summary.bad:
            return
        merged = {**shard_reports(split, self.shard_name), **summary.bad}
        with store_access(split.store_path, f"record the bad images of {split.name}"):
            record_bad_images(split, self.shard_name, merged)


def run_extract(cfg: PipelineConfig, *, model: torch.nn.Module | None = None, announce: bool = True
                ) -> ExtractResult:
    """Fill the configured store; returns what was done. ``model`` lets tests/benchmarks pass a
    ready HQ-SAM; otherwise it is built only if some row needs the encoder."""
    return Extractor(cfg, model, announce).setup().run()


def print_summary(res: ExtractResult) -> None:
    """Per split, what each row came to (each row counted once), then the encoder's throughput."""
    for s in res.splits:
        bad_rows = len(s.bad) - s.no_row + len(s.kept_bad)
        console.print(f"{s.split}: rows {s.rows}: encoded {s.encoded}, gt-only {s.gt_only}, "
                      + (f"features reused {s.reused}, " if s.reused else "")
                      + f"up to date {s.skipped - len(s.kept_bad)}, "
                      + (f"done by another process {s.elsewhere}, " if s.elsewhere else "")
                      + (f"image missing (row kept) {len(s.missing)}, " if s.missing else "")
                      + f"bad {bad_rows}"
                      + (f" (+{s.no_row} unreadable image(s) without a row)" if s.no_row else ""), markup=False)
        for key, rep in s.bad.items():
            console.print(f"    bad: {rep['file']} — {rep['reason']} (key {key})", markup=False)
        for key, rep in s.kept_bad.items():
            console.print(f"    bad: {rep['file']} — {rep['reason']} (key {key}; recorded earlier, file unchanged)",
                          markup=False)
        print_missing(s)
    if res.encoded:
        console.print(f"{res.encoded} images in {res.wall_s:.1f}s = {res.images_per_s:.2f} img/s; "
                      f"encoder {res.encoder_s:.1f}s = {100 * res.encoder_share:.0f}% of wall time", markup=False)
    else:
        console.print(f"no encoder work ({res.wall_s:.1f}s)", markup=False)


def print_missing(s: SplitSummary, shown: int = 5) -> None:
    """The complete rows kept although their image file is missing (a few by name, then a count)."""
    if not s.missing:
        return
    names = sorted(s.missing.values())
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    console.print(f"    image missing: {', '.join(names[:shown])}{more} — the complete row(s) are kept (train and "
                  "evaluate need only the store); check the image folder if they should be there", style="yellow",
                  markup=False)
