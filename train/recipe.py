"""The training recipe (in the spirit of torchtune's recipes): setup → train → validate → save, and
resume from any checkpoint it saved.

``TrainRecipe(cfg, resume).setup()`` opens the store (refusing a mismatched one), loads the data,
builds the model and optimizer, and only then makes the run folder, so a run that cannot start
leaves nothing behind. ``train()`` runs the epochs. Everything ``--resume`` needs besides module
and optimizer state is one :class:`TrainState`, saved in every checkpoint.

Run folder ``runs/<name>/``: ``config.yaml`` (resolved, with what FAST changed), ``metrics.jsonl``
(one line per epoch and per validation), ``last.pt`` / ``best.pt`` / ``epoch_NNN.pt`` (top-k by val
mean IoU, :class:`~boxrefine.shared.checkpoints.CheckpointSaver`), ``eval_boxes_<split>.json`` (the
fixed validation boxes), ``subset.json`` and ``curves.png``.

Stopping: the first SIGINT (Ctrl-C) or SIGTERM finishes the step in flight, saves ``last.pt`` and
exits; resuming continues exactly (every draw is seeded by (seed, epoch, row key), see
``train/steps.py``). A second signal stops at once; the last saved checkpoint stays valid.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader

from boxrefine.shared.checkpoints import CKPT_FORMAT, CheckpointFileError, CheckpointSaver, load_checkpoint
from boxrefine.shared.config import PipelineConfig, dict_differences
from boxrefine.shared.console import console, progress
from boxrefine.shared.errors import BoxrefineError
from boxrefine.shared.evalboxes import detection_pairs, fixed_coarse_boxes, load_detections, sample_subset
from boxrefine.shared.fileio import atomic_write_json, atomic_write_text
from boxrefine.shared.refiner import BoxRefiner, HeadHealth, head_collapse
from boxrefine.shared.rowdata import StoreRows, collate_rows
from boxrefine.shared.sam import INTERM_CHANNELS, build_sam_heads, resolve_device
from boxrefine.shared.scoring import amp_setting, predict, summarize
from boxrefine.shared.store import open_checked_store
from boxrefine.train.control import EpochSampler, StopSignals, restore_rng, rng_state
from boxrefine.train.curves import plot_curves
from boxrefine.train.steps import batch_loss, lr_lambda, seeded_generator

# Config sections a resumed run must share with its checkpoint: they decide the weights' shapes (the
# store's identity, checked separately, decides the features). Other differences (epochs, lr, ...)
# are reported and used.
FROZEN_ON_RESUME = ("refiner",)


class TrainError(BoxrefineError, RuntimeError):
    """A problem that stops training with a one-line message."""


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    best_iou: float | None
    interrupted: bool = False


def _zero_partial() -> dict[str, float]:
    return {"loss": 0.0, "l1": 0.0, "giou": 0.0, "n": 0, "boxes": 0}


@dataclass
class TrainState:
    """The recipe's progress: with the module/optimizer state dicts, all that resume needs."""

    epoch: int = 0  # epochs fully trained
    step: int = 0  # optimizer steps already done in epoch ``epoch`` (> 0 after a stop mid-epoch)
    partial: dict[str, float] = field(default_factory=_zero_partial)  # running sums of that epoch
    pending_eval: bool = False  # epoch ``epoch`` is trained but its validation is not logged yet
    saver: dict[str, Any] = field(default_factory=dict)  # CheckpointSaver bookkeeping (top-k, best)
    health: dict[str, Any] = field(default_factory=dict)  # HeadHealth counts of that epoch

    @property
    def best_iou(self) -> float | None:
        return self.saver.get("best")


class TrainRecipe:
    def __init__(self, cfg: PipelineConfig, resume: Path | None = None):
        self.cfg, self.tc = cfg, cfg.train
        self.resume_ck: dict[str, Any] | None = None
        self.run: Path | None = None
        if resume is not None:
            self.resume_ck, self.run = self._read_resume(resume)
        self.state = TrainState()

    # ------------------------------------------------------------------------------------ setup
    def _read_resume(self, resume: Path) -> tuple[dict[str, Any], Path]:
        ck_path = resume / "last.pt" if resume.is_dir() else resume
        try:
            ck = load_checkpoint(ck_path)
        except CheckpointFileError as e:
            raise TrainError(str(e)) from None
        diffs = dict_differences(ck["config"], self.cfg.to_dict(), ("checkpoint", "now"))
        frozen = [d for d in diffs if d.split(".")[0] in FROZEN_ON_RESUME]
        if frozen:
            raise TrainError(f"{ck_path}: cannot resume with a changed {'/'.join(FROZEN_ON_RESUME)} config: "
                             + "; ".join(frozen))
        if diffs:
            console.print(f"--resume: the config differs from the checkpoint's ({len(diffs)}):", style="yellow")
            for d in diffs:
                console.print(f"  {d}", markup=False)
        return ck, ck_path.parent

    def setup(self) -> TrainRecipe:
        cfg, tc = self.cfg, self.tc
        self.store = open_checked_store(cfg)
        if self.resume_ck is not None and self.resume_ck["store_identity"] != self.store.identity.to_dict():
            raise TrainError(f"{cfg.store.path}: store differs from the one this checkpoint was trained on")
        self.device = resolve_device(cfg.model.device)
        self.amp_dtype, use_scaler, amp_note = amp_setting(tc.amp, tc.amp_dtype, self.device)
        console.print(f"precision: {amp_note}", markup=False)
        if cfg.fast_applied:
            console.print(f"FAST mode: {', '.join(f'{k}={v}' for k, v in cfg.fast_applied.items())}", markup=False)
        self._setup_data()
        self._setup_model(use_scaler)
        if self.resume_ck is not None:
            self._load_state(self.resume_ck)
        else:
            self.run = self._new_run_dir()
        self._write_run_files()
        return self

    def _setup_data(self) -> None:
        cfg, tc = self.cfg, self.tc
        self.train_split = self.store.split(tc.train_split)
        self.train_rows = self.train_split.complete_indices()
        if len(self.train_rows) == 0:
            raise TrainError(f"{cfg.store.path}: split {tc.train_split!r} has no complete rows; run extract first")
        self.records, self.keys = self.train_split.read_rows(), self.train_split.keys()
        self.image_ids = self.train_split.image_ids()
        self.dataset = StoreRows(cfg.store.path, tc.train_split, self.train_rows.tolist(), self.records, self.keys)
        scfg = cfg.data.splits[tc.train_split]
        dets = load_detections(scfg.detections) if (tc.use_detections and scfg.detections) else None
        self.det_pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if dets is not None:
            for i in self.train_rows.tolist():
                _, gt_boxes, gt_info = self.dataset.read_gt(i)
                self.det_pairs[i] = detection_pairs(dets.get(int(self.image_ids[i]), []), torch.from_numpy(gt_boxes),
                                                    torch.from_numpy(gt_info), tc.match_iou)
        first = self.subset(0)
        console.print(f"train: {len(first)} of {len(self.train_rows)} images (sample_ratio {tc.sample_ratio}, "
                      f"seed {tc.seed}{', redrawn each epoch' if tc.resample_each_epoch else ''})")
        self.position = {int(r): k for k, r in enumerate(self.train_rows.tolist())}
        self.sampler = EpochSampler(lambda epoch: [self.position[int(r)] for r in self.epoch_order(epoch)])
        self.loader = DataLoader(self.dataset, batch_size=tc.batch_images, sampler=self.sampler,
                                 num_workers=tc.num_workers, collate_fn=collate_rows,
                                 pin_memory=self.device.type == "cuda", persistent_workers=tc.num_workers > 0,
                                 prefetch_factor=2 if tc.num_workers else None)
        self.val_name = cfg.val_split()
        self.val_ds = StoreRows.from_store(cfg.store.path, self.val_name) if self.val_name else None

    def _setup_model(self, use_scaler: bool) -> None:
        cfg, tc = self.cfg, self.tc
        self.heads = build_sam_heads(cfg.model.type, cfg.model.checkpoint, cfg.model.seed, self.device) \
            if cfg.refiner.use_mask else None
        torch.manual_seed(tc.seed)
        self.refiner_args = {"interm_channels": INTERM_CHANNELS[cfg.model.type], **cfg.refiner.model_dump()}
        self.refiner = BoxRefiner(**self.refiner_args).to(self.device)
        self.opt = torch.optim.AdamW(self.refiner.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        self.steps_per_epoch = math.ceil(len(self.subset(0)) / tc.batch_images)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(tc.epochs * self.steps_per_epoch, int(tc.warmup_epochs * self.steps_per_epoch)))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)

    def _load_state(self, ck: dict[str, Any]) -> None:
        self.refiner.load_state_dict(ck["refiner"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.scaler.load_state_dict(ck["scaler"])
        restore_rng(ck["rng"])
        self.state = TrainState(**ck["state"])
        console.print(f"resuming {self.run} at epoch {self.state.epoch + 1}, step {self.state.step}", markup=False)

    def _new_run_dir(self) -> Path:
        name = self.tc.name or time.strftime("%Y%m%d-%H%M%S")
        run = self.tc.runs_dir / name
        if run.exists() and any(run.iterdir()):
            raise TrainError(f"{run}: run folder exists; choose another train.name or --resume it")
        run.mkdir(parents=True, exist_ok=True)
        return run

    def _write_run_files(self) -> None:
        assert self.run is not None
        self.saver = CheckpointSaver(self.run, self.tc.keep_top_k, self.state.saver)
        self.metrics_path = self.run / "metrics.jsonl"
        if self.resume_ck is None:
            atomic_write_text(self.run / "config.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        first = self.subset(0)
        atomic_write_json(self.run / "subset.json", {"split": self.tc.train_split, "rows": first.tolist(),
                                                     "image_ids": self.image_ids[first].tolist(),
                                                     "of": int(len(self.train_rows))})
        self.val_boxes = None
        if self.val_ds is not None:
            self.val_boxes = fixed_coarse_boxes(self.cfg, self.val_name, self.val_ds,
                                                self.run / f"eval_boxes_{self.val_name}.json")

    # ------------------------------------------------------------------------------------ data order
    def subset(self, epoch: int) -> np.ndarray:
        """Store rows trained on in ``epoch`` (seeded; redrawn per epoch if configured)."""
        seed = self.tc.seed + (epoch if self.tc.resample_each_epoch else 0)
        return self.train_rows[sample_subset(len(self.train_rows), self.tc.sample_ratio, seed)]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Store rows of ``epoch`` in their seeded training order."""
        subset = self.subset(epoch)
        return subset[torch.randperm(len(subset), generator=seeded_generator(self.tc.seed, epoch)).numpy()]

    # ------------------------------------------------------------------------------------ training
    def train(self) -> TrainResult:
        t_start = time.perf_counter()
        interrupted = False
        with StopSignals() as stop:
            self.stop = stop
            try:
                if self.state.pending_eval:
                    self._end_of_epoch()
                while self.state.epoch < self.tc.epochs and not stop.requested:
                    self.train_epoch()
                    if not stop.requested:
                        self._end_of_epoch()
            except KeyboardInterrupt:  # a second signal, or one no handler caught (not the main thread)
                stop.requested = True
            finally:
                self.loader = None  # shuts persistent DataLoader workers down
            if stop.forced:
                interrupted = True
                console.print(f"stopped at once; {self.run / 'last.pt'} is the last save", style="yellow",
                              markup=False)
            elif stop.requested:
                interrupted = True
                self.save()
                console.print(f"stopped: saved {self.run / 'last.pt'} (epoch {self.state.epoch + 1}, step "
                              f"{self.state.step}); continue with: boxrefine train --resume {self.run}",
                              style="yellow", markup=False)
        best = self.state.best_iou
        console.print(f"run {self.run}: {self.state.epoch} epoch(s) in {time.perf_counter() - t_start:.1f}s"
                      + (f", best val mean IoU {best:.4f}" if best is not None else ""), markup=False)
        return TrainResult(self.run, self.state.epoch, best, interrupted)

    def train_epoch(self) -> None:
        """Train epoch ``state.epoch`` from step ``state.step``; returns early on a stop request."""
        st, tc = self.state, self.tc
        order_len = len(self.epoch_order(st.epoch))
        skip = st.step * tc.batch_images
        self.sampler.set_epoch(st.epoch, skip)
        self.refiner.train()
        t0 = time.perf_counter()
        health = HeadHealth(self.refiner, st.health)
        with progress(f"epoch {st.epoch + 1}/{tc.epochs}", order_len, unit="img") as bar, health:
            bar.advance(skip)
            for batch in self.loader:
                n_img = len(batch["row"])
                loss, terms, n_boxes = batch_loss(batch, self.refiner, self.heads, self.device, self.amp_dtype, tc,
                                                  self.det_pairs, st.epoch)
                if loss is not None:
                    self._optimizer_step(loss)
                    for k, v in (("loss", loss.item()), ("l1", terms["l1"]), ("giou", terms["giou"])):
                        st.partial[k] += v * n_img
                    st.partial["n"] += n_img
                    st.partial["boxes"] += n_boxes
                st.step += 1
                st.health = health.state()
                bar.advance(n_img, postfix=f"loss {st.partial['loss'] / max(st.partial['n'], 1):.4f}")
                if self.stop.requested:
                    return
        p, dt = st.partial, time.perf_counter() - t0
        n = max(p["n"], 1)
        entry = {"kind": "epoch", "epoch": st.epoch + 1, "loss": p["loss"] / n, "l1": p["l1"] / n,
                 "giou": p["giou"] / n, "lr": self.opt.param_groups[0]["lr"], "images": p["n"],
                 "boxes": p["boxes"], "seconds": dt, "images_per_s": (p["n"] - skip) / max(dt, 1e-9)}
        head = health.summary()
        why = head_collapse(head)
        entry.update({f"head_{k}": v for k, v in head.items()}, head_collapsed=why)
        self.log(entry)
        console.print(f"epoch {st.epoch + 1}: loss {entry['loss']:.4f} (l1 {entry['l1']:.4f}, giou "
                      f"{entry['giou']:.4f}), {entry['images_per_s']:.2f} img/s"
                      + (f", head: {head['active_units']:.0%} units active, mean |delta| {head['delta_abs']:.3f}"
                         if head else ""), markup=False)
        if why:
            console.print(f"warning: the refiner head has collapsed in epoch {st.epoch + 1}: {why}",
                          style="yellow", markup=False)
        last = st.epoch + 1 == tc.epochs
        st.epoch, st.step, st.partial, st.health = st.epoch + 1, 0, _zero_partial(), {}
        st.pending_eval = self.val_ds is not None and (st.epoch % tc.eval_every == 0 or last)
        if st.pending_eval:
            self.save()  # a stop during validation resumes at the validation, not the epoch

    def _optimizer_step(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.tc.grad_clip:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.refiner.parameters(), self.tc.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()

    def _end_of_epoch(self) -> None:
        """Validate (when due), then save last / best / top-k."""
        st = self.state
        metric = None
        if st.pending_eval:
            ev = self.validate()
            if ev is None:  # stopped during validation: resume validates again
                return
            self.log({"kind": "eval", "epoch": st.epoch, "split": self.val_name, **ev})
            metric = ev["refined"]["mean_iou"]
            console.print(f"  val {self.val_name}: refined mean IoU {metric:.4f} (coarse "
                          f"{ev['coarse']['mean_iou']:.4f}), val loss {ev['val_loss']:.4f}", markup=False)
            st.pending_eval = False
            plot_curves(self.metrics_path, self.run / "curves.png")
        self.save(metric)

    def validate(self) -> dict[str, Any] | None:
        """Periodic validation with the code evaluate runs (``predict`` + ``summarize``); None when a
        stop was requested meanwhile."""
        assert self.val_ds is not None and self.val_boxes is not None
        t0 = time.perf_counter()
        tc = self.tc
        with progress("validate", len(self.val_ds)) as bar:
            preds = predict(self.val_ds, self.val_boxes, self.device, refiner=self.refiner, heads=self.heads,
                            amp_dtype=self.amp_dtype, batch_images=self.cfg.evaluate.batch_images, num_workers=0,
                            loss_weights=(tc.l1_weight, tc.giou_weight), on_batch=bar.advance,
                            should_stop=lambda: self.stop.requested)
        if self.stop.requested:
            return None
        out = summarize(preds)
        out["val_loss"] = tc.l1_weight * out.get("loss_l1", float("nan")) + \
            tc.giou_weight * out.get("loss_giou", float("nan"))
        out["seconds"] = time.perf_counter() - t0
        return out

    # ------------------------------------------------------------------------------------ saving
    def log(self, entry: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def save(self, metric: float | None = None) -> None:
        self.saver.save(self._payload, self.state.epoch, metric)

    def _payload(self, saver_state: dict[str, Any]) -> dict[str, Any]:
        self.state.saver = saver_state
        return {"format": CKPT_FORMAT, "state": asdict(self.state), "refiner": self.refiner.state_dict(),
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": rng_state(), "config": self.cfg.to_dict(),
                "store_identity": self.store.identity.to_dict(), "store_path": self.cfg.store.path,
                "refiner_args": self.refiner_args}


def run_train(cfg: PipelineConfig, resume: Path | None = None) -> TrainResult:
    """Train as configured (or continue ``resume``: a run folder or a checkpoint file)."""
    return TrainRecipe(cfg, resume).setup().train()
