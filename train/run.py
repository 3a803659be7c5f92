"""Train the box refiner from the feature store alone (never images, never the image encoder).

Run folder ``runs/<name>/``: ``config.yaml`` (resolved, with what FAST changed), ``metrics.jsonl``
(one line per epoch and per evaluation), ``last.pt`` / ``best.pt`` / ``epoch_NNN.pt``,
``eval_boxes_<split>.json`` (the fixed validation boxes), ``subset.json`` and ``curves.png``.

Determinism: the epoch order, the subset and every jittered box come from generators seeded by
(seed, epoch, row key), not from global RNG state, so a resumed run (also from a Ctrl-C mid-epoch)
continues exactly, whatever the number of DataLoader workers.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader

from shared.boxes import jitter_boxes, scale_boxes
from shared.checkpoints import CKPT_FORMAT, CheckpointFileError, atomic_save, load_checkpoint
from shared.config import PipelineConfig
from shared.console import console, progress
from shared.evalboxes import CoarseBoxes, detection_pairs, fixed_coarse_boxes, load_detections, sample_subset
from shared.refiner import BoxRefiner, refine_loss
from shared.rowdata import StoreRows, collate_rows
from shared.sam import INTERM_CHANNELS, build_sam_heads, resolve_device
from shared.scoring import amp_setting, autocast_context, predict, summarize
from shared.store import F, open_checked_store


class TrainError(RuntimeError):
    """A problem that stops training with a one-line message."""


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    best_iou: float | None
    interrupted: bool = False


def _rng_state() -> dict[str, Any]:
    """Global RNG states (tensors, ints and lists only, so weights_only loading accepts them)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "numpy": [keys.tolist(), int(pos), int(has_gauss), float(gauss)]}


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


# ------------------------------------------------------------------------------------------- helpers
def _generator(*parts: int) -> torch.Generator:
    h = 0
    for p in parts:
        h = (h * 0x100000001B3 + int(p) + 0x9E3779B97F4A7C15) % (2**63 - 1)
    return torch.Generator().manual_seed(h)


def training_boxes(gt_boxes: torch.Tensor, gt_info: torch.Tensor, det: tuple[torch.Tensor, torch.Tensor] | None,
                   hw: tuple[int, int], k: int, jitter: float, g: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` (coarse, target) pairs for one image: GT boxes jittered with the noisy-box model and,
    when given, real detector boxes matched to GT (half the draws each)."""
    valid = torch.nonzero(gt_info[:, 2] == 0).flatten() if len(gt_info) else torch.zeros(0, dtype=torch.int64)
    if len(valid) == 0:
        return torch.zeros((0, 4)), torch.zeros((0, 4))
    use_det = det is not None and len(det[0]) > 0
    pick_det = (torch.rand(k, generator=g) < 0.5) if use_det else torch.zeros(k, dtype=torch.bool)
    gt_idx = valid[torch.randint(len(valid), (k,), generator=g)]
    coarse = jitter_boxes(gt_boxes[gt_idx].float(), jitter, hw, g)
    target = gt_boxes[gt_idx].float()
    if use_det and pick_det.any():
        j = torch.randint(len(det[0]), (int(pick_det.sum()),), generator=g)
        coarse[pick_det] = det[0][j]
        target[pick_det] = gt_boxes[det[1][j]].float()
    return coarse, target


def _lr_lambda(total_steps: int, warmup_steps: int):
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_ = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))
    return f


def _run_dir(cfg: PipelineConfig) -> Path:
    name = cfg.train.name or time.strftime("%Y%m%d-%H%M%S")
    run = cfg.train.runs_dir / name
    if run.exists() and any(run.iterdir()):
        raise TrainError(f"{run}: run folder exists; choose another train.name or --resume it")
    run.mkdir(parents=True, exist_ok=True)
    return run


def _dump_config(cfg: PipelineConfig, run: Path) -> None:
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_differences(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: checkpoint {a!r}, now {b!r}")
    return out


def plot_curves(metrics_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
    tr = [x for x in lines if x["kind"] == "epoch"]
    ev = [x for x in lines if x["kind"] == "eval"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot([x["epoch"] for x in tr], [x["loss"] for x in tr], "o-", label="train loss")
    if ev:
        ax[0].plot([x["epoch"] for x in ev], [x["val_loss"] for x in ev], "s-", label="val loss")
        ax[1].plot([x["epoch"] for x in ev], [x["refined"]["mean_iou"] for x in ev], "s-", label="refined")
        ax[1].plot([x["epoch"] for x in ev], [x["coarse"]["mean_iou"] for x in ev], "--", label="coarse boxes")
    ax[0].set_xlabel("epoch")
    ax[0].legend()
    ax[1].set_xlabel("epoch")
    ax[1].set_ylabel("val mean IoU")
    if ev:
        ax[1].legend()
    fig.tight_layout()
    tmp = out.with_name(".curves.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, out)


# ------------------------------------------------------------------------------------------- training
def batch_loss(batch: dict[str, Any], refiner: BoxRefiner, heads: Any, device: torch.device,
               amp_dtype: torch.dtype | None, tc: Any, det_pairs: dict[int, tuple[torch.Tensor, torch.Tensor]],
               epoch: int) -> tuple[torch.Tensor | None, dict[str, float], int]:
    """Loss of one batch of store rows (features stacked by ``collate_rows``): draw this epoch's
    coarse boxes per image, run the frozen HQ-SAM heads on them (no grad), then the refiner."""
    emb = batch["image_embeddings"].to(device, non_blocking=True).float()
    interm = batch["interm_embeddings"].to(device, non_blocking=True).float()
    coarse_in, target_in, logits = [], [], []
    for b, row in enumerate(batch["row"]):
        g = _generator(tc.seed, epoch, batch["key"][b])
        c, t = training_boxes(batch["gt_boxes"][b], batch["gt_info"][b], det_pairs.get(row),
                              batch["orig_hw"][b], tc.boxes_per_image, tc.jitter, g)
        oh, ih = batch["orig_hw"][b], batch["input_hw"][b]
        coarse_in.append(scale_boxes(c, oh, ih).to(device))
        target_in.append(scale_boxes(t, oh, ih).to(device))
        if heads is not None and len(c):
            with torch.no_grad(), autocast_context(device, amp_dtype):
                lg, _ = heads(emb[b:b + 1], interm[b:b + 1], coarse_in[-1])
            logits.append(lg.float())
    n_boxes = int(sum(len(c) for c in coarse_in))
    if n_boxes == 0:
        return None, {}, 0
    with autocast_context(device, amp_dtype):
        refined = refiner(emb, interm, coarse_in, torch.cat(logits) if logits else None)
    loss, terms = refine_loss(refined.float(), torch.cat(target_in), torch.cat(coarse_in),
                              tc.l1_weight, tc.giou_weight)
    return loss, terms, n_boxes


def run_train(cfg: PipelineConfig, resume: Path | None = None) -> TrainResult:
    t_start = time.perf_counter()
    tc = cfg.train
    ck: dict[str, Any] | None = None
    if resume is not None:
        ck_path = resume / "last.pt" if resume.is_dir() else resume
        try:
            ck = load_checkpoint(ck_path)
        except CheckpointFileError as e:
            raise TrainError(str(e)) from None
        run = ck_path.parent
        diffs = config_differences(ck["config"], cfg.to_dict())
        if diffs:
            console.print(f"[yellow]--resume: the config differs from the checkpoint's ({len(diffs)}):[/yellow]")
            for d in diffs:
                console.print(f"  {d}", markup=False)
        console.print(f"resuming {run} at epoch {ck['epoch'] + 1}, step {ck['step']}")
    else:
        run = _run_dir(cfg)
        _dump_config(cfg, run)

    store = open_checked_store(cfg)
    if ck is not None and ck["store_identity"] != store.identity.to_dict():
        raise TrainError(f"{cfg.store.path}: store differs from the one this checkpoint was trained on")
    device = resolve_device(cfg.model.device)
    amp_dtype, use_scaler, amp_note = amp_setting(cfg.train.amp, cfg.train.amp_dtype, device)
    console.print(f"precision: {amp_note}", markup=False)
    if cfg.fast_applied:
        console.print(f"FAST mode: {', '.join(f'{k}={v}' for k, v in cfg.fast_applied.items())}", markup=False)

    # ---- data
    tr_split = store.split(tc.train_split)
    tr_all = tr_split.complete_indices()
    if len(tr_all) == 0:
        raise TrainError(f"{cfg.store.path}: split {tc.train_split!r} has no complete rows; run extract first")
    records, keys, ids = tr_split.read_rows(), tr_split.keys(), tr_split.image_ids()
    scfg = cfg.data.splits[tc.train_split]
    dets = load_detections(scfg.detections) if (tc.use_detections and scfg.detections) else None

    def subset_for(epoch: int) -> np.ndarray:
        seed = tc.seed + (epoch if tc.resample_each_epoch else 0)
        return tr_all[sample_subset(len(tr_all), tc.sample_ratio, seed)]

    first = subset_for(0)
    console.print(f"train: {len(first)} of {len(tr_all)} images (sample_ratio {tc.sample_ratio}, seed {tc.seed}"
                  f"{', redrawn each epoch' if tc.resample_each_epoch else ''})")
    (run / "subset.json").write_text(json.dumps({"split": tc.train_split, "rows": first.tolist(),
                                                 "image_ids": ids[first].tolist(), "of": int(len(tr_all))}))
    det_pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    if dets is not None:
        for i in tr_all.tolist():
            n = int(records[i, F["n_instances"]])
            gb = torch.from_numpy(np.asarray(tr_split.array("gt_boxes")[i, :n], np.float32))
            gi = torch.from_numpy(np.asarray(tr_split.array("gt_info")[i, :n], np.int64))
            det_pairs[i] = detection_pairs(dets.get(int(ids[i]), []), gb, gi, tc.match_iou)

    val_name = cfg.val_split()
    val_ds = StoreRows.from_store(cfg.store.path, val_name) if val_name else None
    val_boxes = fixed_coarse_boxes(cfg, val_name, val_ds, run / f"eval_boxes_{val_name}.json") if val_ds else None

    # ---- model
    heads = build_sam_heads(cfg.model.type, cfg.model.checkpoint, cfg.model.seed, device) \
        if cfg.refiner.use_mask else None
    torch.manual_seed(tc.seed)
    refiner = BoxRefiner(INTERM_CHANNELS[cfg.model.type], cfg.refiner.roi_size, cfg.refiner.hidden,
                         cfg.refiner.context, cfg.refiner.use_mask).to(device)
    opt = torch.optim.AdamW(refiner.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    steps_per_epoch = math.ceil(len(first) / tc.batch_images)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(tc.epochs * steps_per_epoch, int(tc.warmup_epochs * steps_per_epoch)))
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    start_epoch, start_step, best = 0, 0, None
    partial = {"loss": 0.0, "l1": 0.0, "giou": 0.0, "n": 0, "boxes": 0}
    if ck is not None:
        refiner.load_state_dict(ck["refiner"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        _restore_rng(ck["rng"])
        start_epoch, start_step, best = ck["epoch"], ck["step"], ck.get("best_iou")
        partial = ck.get("partial") or partial

    def save(path: Path, epoch: int, step: int, part: dict[str, Any]) -> None:
        atomic_save({"format": CKPT_FORMAT, "refiner": refiner.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch, "step": step,
                     "partial": part, "best_iou": best, "rng": _rng_state(), "config": cfg.to_dict(),
                     "store_identity": store.identity.to_dict(), "store_path": cfg.store.path,
                     "refiner_args": {"interm_channels": INTERM_CHANNELS[cfg.model.type],
                                      **cfg.refiner.model_dump()}}, path)

    metrics_path = run / "metrics.jsonl"

    def log(entry: dict[str, Any]) -> None:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    pin = device.type == "cuda"
    interrupted = False
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, tc.epochs):
            subset = subset_for(epoch)
            order = subset[torch.randperm(len(subset), generator=_generator(tc.seed, epoch)).numpy()]
            skip = start_step * tc.batch_images if epoch == start_epoch else 0
            ds = StoreRows(cfg.store.path, tc.train_split, order[skip:].tolist(), records, keys)
            loader = DataLoader(ds, batch_size=tc.batch_images, shuffle=False, num_workers=tc.num_workers,
                                collate_fn=collate_rows, pin_memory=pin,
                                persistent_workers=False, prefetch_factor=2 if tc.num_workers else None)
            refiner.train()
            if epoch != start_epoch:
                partial = {"loss": 0.0, "l1": 0.0, "giou": 0.0, "n": 0, "boxes": 0}
            step = start_step if epoch == start_epoch else 0
            t_epoch = time.perf_counter()
            with progress(f"epoch {epoch + 1}/{tc.epochs}", len(order), unit="img") as bar:
                bar.advance(skip)
                for batch in loader:
                    loss, terms, n_boxes = batch_loss(batch, refiner, heads, device, amp_dtype, tc, det_pairs, epoch)
                    if loss is None:
                        step += 1
                        bar.advance(len(batch["row"]))
                        continue
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    if tc.grad_clip:
                        scaler.unscale_(opt)
                        torch.nn.utils.clip_grad_norm_(refiner.parameters(), tc.grad_clip)
                    scaler.step(opt)
                    scaler.update()
                    sched.step()
                    step += 1
                    nb = len(batch["row"])
                    partial["loss"] += loss.item() * nb
                    partial["l1"] += terms["l1"] * nb
                    partial["giou"] += terms["giou"] * nb
                    partial["n"] += nb
                    partial["boxes"] += n_boxes
                    bar.advance(nb, postfix=f"loss {partial['loss'] / partial['n']:.4f}")
            n = max(partial["n"], 1)
            dt = time.perf_counter() - t_epoch
            entry = {"kind": "epoch", "epoch": epoch + 1, "loss": partial["loss"] / n, "l1": partial["l1"] / n,
                     "giou": partial["giou"] / n, "lr": opt.param_groups[0]["lr"], "images": partial["n"],
                     "boxes": partial["boxes"], "seconds": dt, "images_per_s": partial["n"] / max(dt, 1e-9)}
            log(entry)
            console.print(f"epoch {epoch + 1}: loss {entry['loss']:.4f} (l1 {entry['l1']:.4f}, giou "
                          f"{entry['giou']:.4f}), {entry['images_per_s']:.2f} img/s")
            last = epoch + 1 == tc.epochs
            if val_ds is not None and ((epoch + 1) % tc.eval_every == 0 or last):
                ev = evaluate_epoch(cfg, refiner, heads, val_ds, val_boxes, device, amp_dtype)
                log({"kind": "eval", "epoch": epoch + 1, "split": val_name, **ev})
                iou = ev["refined"]["mean_iou"]
                console.print(f"  val {val_name}: refined mean IoU {iou:.4f} (coarse {ev['coarse']['mean_iou']:.4f})"
                              f", val loss {ev['val_loss']:.4f}")
                if best is None or iou > best:
                    best = iou
                    save(run / "best.pt", epoch + 1, 0, {})
            save(run / "last.pt", epoch + 1, 0, {})
            if (epoch + 1) % tc.save_every == 0:
                save(run / f"epoch_{epoch + 1:03d}.pt", epoch + 1, 0, {})
            if last or (epoch + 1) % tc.eval_every == 0:
                plot_curves(metrics_path, run / "curves.png")
            start_step = 0
    except KeyboardInterrupt:
        interrupted = True
        save(run / "last.pt", epoch, step, partial)
        console.print(f"[yellow]interrupted: saved {run / 'last.pt'} (epoch {epoch + 1}, step {step}); "
                      f"continue with: boxrefine train --resume {run}[/yellow]")
    done = epoch + 1 if not interrupted else epoch
    console.print(f"run {run}: {done} epoch(s) in {time.perf_counter() - t_start:.1f}s"
                  + (f", best val mean IoU {best:.4f}" if best is not None else ""))
    return TrainResult(run, done, best, interrupted)


def evaluate_epoch(cfg: PipelineConfig, refiner: BoxRefiner, heads: Any, ds: StoreRows,
                   boxes: dict[int, CoarseBoxes], device: torch.device, amp_dtype: torch.dtype | None
                   ) -> dict[str, Any]:
    """Periodic validation: the same prediction and metric code evaluate uses (no masks, no vis)."""
    t0 = time.perf_counter()
    with progress("validate", len(ds)) as bar:
        preds = predict(ds, boxes, device, refiner=refiner, heads=heads, amp_dtype=amp_dtype,
                        batch_images=cfg.evaluate.batch_images, num_workers=0,
                        loss_weights=(cfg.train.l1_weight, cfg.train.giou_weight), on_batch=bar.advance)
    out = summarize(preds)
    out["val_loss"] = cfg.train.l1_weight * out.get("loss_l1", float("nan")) + \
        cfg.train.giou_weight * out.get("loss_giou", float("nan"))
    out["seconds"] = time.perf_counter() - t0
    return out
