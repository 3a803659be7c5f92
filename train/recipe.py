"""The training recipe (in the spirit of torchtune's recipes): setup → train → validate → save, and
resume from any checkpoint it saved.

``TrainRecipe(cfg, resume).setup()`` opens the store (refusing a mismatched one), loads the data,
builds the model and optimizer, and only then makes the run folder; a new run that fails (or is
stopped at once) before its first checkpoint removes the folder it made, and a folder left by a
start that was killed before its first checkpoint is reused, so neither blocks the name.
``train()`` runs the epochs. Everything ``--resume`` needs besides module and optimizer state is one
:class:`~boxrefine.train.state.TrainState`, saved in every checkpoint.

Run folder ``runs/<name>/``: ``config.yaml`` (resolved, with what FAST changed), ``metrics.jsonl``
(one line per epoch and per validation) and ``tb/`` (its scalars for TensorBoard; both
``train/tensorboard.py``), ``last.pt`` / ``best.pt`` / ``epoch_NNN.pt`` (top-k by val mean IoU,
:class:`~boxrefine.train.checkpoints.CheckpointSaver`), ``eval_boxes_<split>.json`` (the fixed
validation boxes), ``subset.json``, ``curves.png`` and with ``--follow`` ``rows_epoch_NNN.json`` (the
rows each epoch trained on, ``train/follow.py``).

Stopping: the first SIGINT (Ctrl-C) or SIGTERM finishes the step in flight, saves ``last.pt`` and
exits; resuming continues exactly (every draw is seeded by (seed, epoch, row key), see
``train/steps.py``). A second signal stops at once; the last saved checkpoint stays valid.

Under torchrun the recipe trains with DDP (``train/distributed.py``): ``train.batch_images`` stays the
global batch, each rank reads its part of every step, and the ranks agree on every decision (stop
after this step? the run's name, the validation result). Only rank 0 writes the run folder; every
rank resumes from the same ``last.pt``.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml

from boxrefine.shared.config import PipelineConfig
from boxrefine.shared.model.checkpoint import CKPT_FORMAT, CheckpointFileError, load_checkpoint
from boxrefine.shared.model.heads import build_refiner
from boxrefine.shared.model.sam import INTERM_CHANNELS, build_sam_heads
from boxrefine.shared.runtime.console import console, progress
from boxrefine.shared.runtime.device import amp_setting, resolve_device
from boxrefine.shared.runtime.distributed import ProcessGroup
from boxrefine.shared.runtime.fileio import atomic_write_json, atomic_write_text
from boxrefine.shared.scoring.coarse import fixed_coarse_boxes
from boxrefine.shared.scoring.predict import predict, summarize
from boxrefine.shared.store.feature_store import open_checked_store
from boxrefine.shared.store.identity import feature_differences
from boxrefine.shared.yamlkeys import dict_differences
from boxrefine.train.checkpoints import CheckpointSaver
from boxrefine.train.control import StopSignals, discard_unsaved_run, restore_rng, rng_state, unsaved_start
from boxrefine.train.curves import plot_curves
from boxrefine.train.data import TrainData
from boxrefine.train.distributed import gather_in_order, idle_loss, rank_weight, step_totals, wrap_ddp
from boxrefine.train.follow import FollowRows, wait_for_rows
from boxrefine.train.health import HeadHealth, head_collapse
from boxrefine.train.state import TrainError, TrainResult, TrainState, zero_partial
from boxrefine.train.steps import batch_loss, lr_lambda, optimizer_step
from boxrefine.train.tensorboard import RunLog, epoch_entry, epoch_summary, fast_summary

# Config sections a resumed run must share with its checkpoint: they decide the weights' shapes (the
# store's identity, checked separately, decides the features). Other differences (epochs, lr, ...)
# are reported and used.
FROZEN_ON_RESUME = ("refiner",)


class TrainRecipe:
    def __init__(self, cfg: PipelineConfig, resume: Path | None = None):
        self.cfg, self.train_cfg = cfg, cfg.train
        self.resume_ck: dict[str, Any] | None = None
        self.run: Path | None = None
        self.made_run = False  # this start made self.run (a new run, not a resumed one)
        if resume is not None:
            self.resume_ck, self.run = self._read_resume(resume)
        self.state = TrainState()
        self.runlog: RunLog | None = None
        self.last_lr: float | None = None  # the learning rate of the last optimizer step

    # ------------------------------------------------------------------------------------ setup
    def _read_resume(self, resume: Path) -> tuple[dict[str, Any], Path]:
        ck_path = resume / "last.pt" if resume.is_dir() else resume
        try:
            ckpt = load_checkpoint(ck_path)
        except CheckpointFileError as e:
            raise TrainError(str(e)) from None
        diffs = dict_differences(ckpt["config"], self.cfg.to_dict(), ("checkpoint", "now"))
        frozen = [d for d in diffs if d.split(".")[0] in FROZEN_ON_RESUME]
        if frozen:
            raise TrainError(f"{ck_path}: cannot resume with a changed {'/'.join(FROZEN_ON_RESUME)} config: "
                             + "; ".join(frozen))
        if diffs:
            console.print(f"--resume: the config differs from the checkpoint's ({len(diffs)}):", style="yellow",
                          markup=False)
            for d in diffs:
                console.print(f"  {d}", markup=False)
        return ckpt, ck_path.parent

    def setup(self) -> TrainRecipe:
        cfg, train_cfg = self.cfg, self.train_cfg
        if train_cfg.follow:
            wait_for_rows(cfg.store.path, train_cfg.train_split)
        self.store = open_checked_store(cfg, (train_cfg.train_split, cfg.val_split()))
        diffs = feature_differences(self.resume_ck["store_identity"], self.store.identity, ("checkpoint", "store")) \
            if self.resume_ck is not None else []
        if diffs:
            raise TrainError(f"{cfg.store.path}: store differs from the one this checkpoint was trained on: "
                             + "; ".join(diffs))
        self.device = resolve_device(cfg.model.device)
        self.pg = ProcessGroup(self.device)  # torchrun: DDP over its ranks; otherwise a world of one
        try:
            self._setup()
        except BaseException:
            self.pg.close()
            raise
        return self

    def _setup(self) -> None:
        cfg, train_cfg, pg = self.cfg, self.train_cfg, self.pg
        self.precision = amp_setting(train_cfg.amp, train_cfg.amp_dtype, self.device)
        self.amp_dtype, use_scaler = self.precision.dtype, self.precision.scaler
        console.print(f"precision: {self.precision.why}" + (f"; DDP over {pg.world} ranks ({pg.backend}), global batch "
                                                 f"{train_cfg.batch_images} images" if pg.active else ""), markup=False)
        if cfg.fast_applied:
            console.print(f"FAST mode: {fast_summary(cfg.fast_applied, self.precision)}", markup=False)
        self.data = TrainData(cfg, self.store, pg.rank, pg.world, pin_memory=self.device.type == "cuda")
        self._setup_model(use_scaler)
        if self.resume_ck is not None:
            self._load_state(self.resume_ck)
        self.model = wrap_ddp(self.refiner, self.device, pg)  # after loading: every rank starts from last.pt
        if self.resume_ck is None:
            self.run = pg.broadcast(pg.main_first(self._new_run_dir))  # one name (a timestamp) on every rank
        try:
            self._write_run_files()
        except BaseException:
            self._discard_if_unsaved()
            raise

    def _setup_model(self, use_scaler: bool) -> None:
        cfg, train_cfg = self.cfg, self.train_cfg
        self.heads = build_sam_heads(cfg.model.type, cfg.model.checkpoint, cfg.model.seed, self.device) \
            if cfg.refiner.use_mask else None
        torch.manual_seed(train_cfg.seed)
        self.refiner_args = {"interm_channels": INTERM_CHANNELS[cfg.model.type], **cfg.refiner.model_dump()}
        self.refiner = build_refiner(**self.refiner_args).to(self.device)
        self.opt = torch.optim.AdamW(self.refiner.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
        steps = self.data.steps_per_epoch
        # --follow: set per epoch
        self.lr_plan = lr_lambda(train_cfg.epochs * steps, int(train_cfg.warmup_epochs * steps))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda step: self.lr_plan(step))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)

    def _load_state(self, ckpt: dict[str, Any]) -> None:
        self.refiner.load_state_dict(ckpt["refiner"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        restore_rng(ckpt["rng"])
        self.state = TrainState(**ckpt["state"])
        console.print(f"resuming {self.run} at epoch {self.state.epoch + 1}, step {self.state.step}", markup=False)

    def _new_run_dir(self) -> Path:
        name = self.train_cfg.name or time.strftime("%Y%m%d-%H%M%S")
        run = self.train_cfg.runs_dir / name
        if run.exists() and any(run.iterdir()):
            if not unsaved_start(run):
                raise TrainError(f"{run}: run folder exists; choose another train.name or --resume it")
            console.print(f"{run}: reusing the folder of a start that never saved a checkpoint", style="yellow",
                          markup=False)
            shutil.rmtree(run)
        run.mkdir(parents=True, exist_ok=True)
        self.made_run = True
        return run

    def _discard_if_unsaved(self) -> bool:
        """After a failure: remove the run folder this start made (rank 0 alone makes it) if it holds no
        checkpoint yet."""
        if not (self.made_run and self.run is not None and discard_unsaved_run(self.run)):
            return False
        console.print(f"{self.run}: removed (the run ended before its first checkpoint)", style="yellow",
                      markup=False)
        return True

    def _write_run_files(self) -> None:
        """Rank 0 writes the run files; the validation boxes it draws (or reads back) go to every rank."""
        assert self.run is not None
        pg, data, run = self.pg, self.data, self.run
        self.saver = CheckpointSaver(run, self.train_cfg.keep_top_k, self.state.saver)
        self.metrics_path = run / "metrics.jsonl"
        self.runlog = RunLog(run) if pg.is_main else None

        def write() -> Any:
            if self.resume_ck is None:
                atomic_write_text(run / "config.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
            first = data.subset(0)
            atomic_write_json(run / "subset.json", {"split": self.train_cfg.train_split, "rows": first.tolist(),
                                                    "image_ids": data.image_ids[first].tolist(),
                                                    "of": int(len(data.rows))})
            if data.val_ds is None:
                return None
            return fixed_coarse_boxes(self.cfg, data.val_name, data.val_ds, run / f"eval_boxes_{data.val_name}.json")

        self.val_boxes = pg.broadcast(pg.main_first(write))

    # ------------------------------------------------------------------------------------ training
    def train(self) -> TrainResult:
        try:
            return self._train()
        except BaseException:
            if self.runlog is not None:
                self.runlog.close()  # before a run folder without a checkpoint is removed
            self._discard_if_unsaved()
            raise
        finally:
            if self.runlog is not None:
                self.runlog.close()
            self.pg.close()

    def _stopping(self) -> bool:
        """Whether to stop here: a stop requested on any rank, agreed by all of them (a collective: the
        ranks ask at the same points; DDP ranks that stopped at different steps would deadlock)."""
        agreed = self.pg.any(self.stop.requested)
        if agreed:
            self.stop.requested = True
        return agreed

    def _say(self, message: str, **kwargs: Any) -> None:
        """A line about the run as a whole: printed by rank 0 only."""
        if self.pg.is_main:
            console.print(message, markup=False, **kwargs)

    def _train(self) -> TrainResult:
        t_start = time.perf_counter()
        interrupted = False
        with StopSignals() as stop:
            self.stop = stop
            try:
                if self.state.pending_eval:
                    self._end_of_epoch()
                while self.state.epoch < self.train_cfg.epochs and not self._stopping():
                    self.train_epoch()
                    if not self._stopping():
                        self._end_of_epoch()
            except KeyboardInterrupt:  # a second signal, or one no handler caught (not the main thread)
                stop.requested = True
            finally:
                self.data.close()
            if stop.forced:
                interrupted = True
                if not self._discard_if_unsaved():
                    self._say(f"stopped at once; {self.run / 'last.pt'} is the last save", style="yellow")
            elif stop.requested:
                interrupted = True
                self.save()
                self._say(f"stopped: saved {self.run / 'last.pt'} (epoch {self.state.epoch + 1}, step "
                          f"{self.state.step}); continue with: boxrefine train --resume {self.run}", style="yellow")
        best = self.state.best_iou
        self._say(f"run {self.run}: {self.state.epoch} epoch(s) in {time.perf_counter() - t_start:.1f}s"
                  + (f", best val mean IoU {best:.4f}" if best is not None else ""))
        return TrainResult(self.run, self.state.epoch, best, interrupted)

    def train_epoch(self) -> None:
        """Train epoch ``state.epoch`` from step ``state.step``; returns early when the ranks agree to stop.
        Each rank computes its part of a step; the logged sums are the step's global values."""
        st, train_cfg, pg = self.state, self.train_cfg, self.pg
        if train_cfg.follow:
            self._follow_rows()
        order_len = len(self.data.epoch_order(st.epoch))
        self.data.sampler.set_epoch(st.epoch, st.step)
        self.refiner.train()
        t0, images_before, steps_before = time.perf_counter(), st.partial["n"], st.step
        assert self.data.loader is not None
        # head health counts this rank's boxes (under DDP rank 0's share of every step is what is logged)
        health = HeadHealth(self.refiner, st.health)
        with progress(f"epoch {st.epoch + 1}/{train_cfg.epochs}", order_len, unit="img") as bar, health:
            bar.advance(min(st.step * train_cfg.batch_images, order_len))
            for raw in self.data.loader:
                batch = self.data.dataset.accept(raw)  # damaged rows: stop, or left out (store.on_damage)
                n_img = len(batch["row"]) if batch is not None else 0
                loss, terms, n_boxes = batch_loss(batch, self.model, self.heads, self.device, self.amp_dtype, train_cfg,
                                                  self.data.det_pairs, st.epoch) if n_img else (None, {}, 0)
                idle = None
                if loss is None and pg.active:  # DDP's forward may talk to the other ranks: every rank runs one
                    idle = idle_loss(self.model, self.refiner_args["interm_channels"], self.cfg.refiner.use_mask,
                                     self.device, self.amp_dtype)
                step = step_totals(pg, loss, terms, n_boxes, n_img)
                if step.boxes:  # some rank has boxes: every rank steps (DDP's backward needs them all)
                    self._optimizer_step((loss if loss is not None else idle) * rank_weight(pg, n_boxes, step))
                    for k, v in (("loss", step.loss), ("l1", step.l1), ("giou", step.giou)):
                        st.partial[k] += v * step.images
                    st.partial["n"] += step.images
                    st.partial["boxes"] += step.boxes
                st.step += 1
                st.health = health.state()
                bar.advance(step.images, postfix=f"loss {st.partial['loss'] / max(st.partial['n'], 1):.4f}")
                if self._stopping():
                    return
        self._log_epoch(health.summary(), time.perf_counter() - t0, images_before, st.step - steps_before)
        last = st.epoch + 1 == train_cfg.epochs
        st.epoch, st.step, st.partial, st.health = st.epoch + 1, 0, zero_partial(), {}
        st.pending_eval = self.data.val_ds is not None and (st.epoch % train_cfg.eval_every == 0 or last)
        if st.pending_eval:
            self.save()  # a stop during validation resumes at the validation, not the epoch

    def _log_epoch(self, head: dict[str, float], seconds: float, images_before: float, steps: int) -> None:
        """The epoch's line in metrics.jsonl (losses, the lr of its last step, speed, precision, head
        health) and its summary."""
        st, p = self.state, self.state.partial
        lr = self.last_lr if self.last_lr is not None else self.opt.param_groups[0]["lr"]
        entry = epoch_entry(st.epoch + 1, p, lr, seconds, images_before, steps, self.pg.world, self.precision.label)
        if self.scaler.is_enabled():
            entry.update(skipped_steps=int(p.get("skipped", 0)), grad_scale=self.scaler.get_scale())
        why = head_collapse(head)
        entry.update({f"head_{k}": v for k, v in head.items()}, head_collapsed=why)
        self.log(entry)
        for line, style in epoch_summary(entry, head, why):
            self._say(line, **({"style": style} if style else {}))

    def _follow_rows(self) -> None:
        """``--follow``: train this epoch on the rows complete when it starts, recorded by rank 0 (or read
        back from the record when resuming it) and the same on every rank."""
        assert self.run is not None
        follow, epoch = FollowRows.of(self.run, self.cfg), self.state.epoch
        rows = self.pg.broadcast(self.pg.main_first(lambda: follow.rows(epoch)))
        assert rows is not None
        self.data.split = follow.split()  # the split may have grown since (new images)
        self.data.use_rows(self.data.split.records(), rows)
        self.lr_plan = lr_lambda(*self.pg.broadcast(self.pg.main_first(
            lambda: follow.schedule(epoch, self.train_cfg.epochs, self.train_cfg.warmup_epochs))))

    def _optimizer_step(self, loss: torch.Tensor) -> None:
        # under DDP the gradients are averaged over the ranks in backward, so every rank skips alike
        self.last_lr = self.opt.param_groups[0]["lr"]  # what this step uses (the scheduler moves it after)
        if optimizer_step(loss, self.opt, self.scaler, self.sched, self.refiner.parameters(), self.train_cfg.grad_clip):
            self.state.partial["skipped"] = self.state.partial.get("skipped", 0) + 1

    def _end_of_epoch(self) -> None:
        """Validate (when due), then save last / best / top-k."""
        st = self.state
        metric = None
        if st.pending_eval:
            ev = self.validate()
            if ev is None:  # stopped during validation: resume validates again
                return
            self.log({"kind": "eval", "epoch": st.epoch, "split": self.data.val_name, **ev})
            metric = ev["refined"]["mean_iou"]
            self._say(f"  validation ({self.data.val_name}): refined mean IoU {metric:.4f} (coarse "
                      f"{ev['coarse']['mean_iou']:.4f}), val loss {ev['val_loss']:.4f}")
            st.pending_eval = False
            if self.pg.is_main:
                plot_curves(self.metrics_path, self.run / "curves.png")
        self.save(metric)

    def validate(self) -> dict[str, Any] | None:
        """Periodic validation with the code evaluate runs (``predict`` + ``summarize``), each rank on its
        share of the images, summarised on rank 0 and shared; None when a stop was requested meanwhile."""
        assert self.data.val_ds is not None and self.val_boxes is not None
        t0 = time.perf_counter()
        train_cfg, pg = self.train_cfg, self.pg
        part = self.data.val_part(pg.rank, pg.world)
        assert part is not None
        with progress("validate", len(part)) as bar:
            preds = predict(part, self.val_boxes, self.device, refiner=self.refiner, heads=self.heads,
                            amp_dtype=self.amp_dtype, batch_images=self.cfg.evaluate.batch_images, num_workers=0,
                            loss_weights=(train_cfg.l1_weight, train_cfg.giou_weight), on_batch=bar.advance,
                            should_stop=lambda: self.stop.requested)
        if self._stopping():
            return None
        every = gather_in_order(pg, preds)
        out = None
        if every is not None:
            out = summarize(every)
            out["val_loss"] = train_cfg.l1_weight * out.get("loss_l1", float("nan")) + \
                train_cfg.giou_weight * out.get("loss_giou", float("nan"))
            out["seconds"] = time.perf_counter() - t0
        return pg.broadcast(out)

    # ------------------------------------------------------------------------------------ saving
    def log(self, entry: dict[str, Any]) -> None:
        if self.runlog is not None:  # rank 0
            self.runlog.log(entry)

    def save(self, metric: float | None = None) -> None:
        if self.pg.is_main:
            self.saver.save(self._payload, self.state.epoch, metric)

    def _payload(self, saver_state: dict[str, Any]) -> dict[str, Any]:
        self.state.saver = saver_state
        return {"format": CKPT_FORMAT, "state": asdict(self.state), "refiner": self.refiner.state_dict(),
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": rng_state(), "config": self.cfg.to_dict(),
                "store_identity": self.store.identity.to_dict(), "store_path": self.cfg.store.path,
                "refiner_args": self.refiner_args}


def run_train(cfg: PipelineConfig, resume: Path | None = None) -> TrainResult:
    """Train as configured (or continue ``resume``: a run folder or a checkpoint file); under torchrun,
    as one rank of a DDP run."""
    return TrainRecipe(cfg, resume).setup().train()
