"""Train stage: run folder, exact resume, learning, subsets, FAST, AMP, store-only operation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import make_config

from boxrefine.shared.config import load_config
from boxrefine.shared.model.checkpoint import load_checkpoint
from boxrefine.shared.store.location import StoreError
from boxrefine.train.control import sample_subset
from boxrefine.train.recipe import TrainError, run_train

REPO = Path(__file__).resolve().parents[1]


def _cfg(demo_root, store, runs, **train):
    base = {"runs_dir": str(runs), "epochs": 2, "batch_images": 2, "boxes_per_image": 4, "num_workers": 0,
            "eval_every": 1, "name": "run"}
    base.update(train)
    return make_config(demo_root, store, train=base, refiner={"use_mask": False, "hidden": 32})


def _interrupt_at_call(monkeypatch, n: int) -> None:
    """Simulate Ctrl-C at the n-th loss computation (after n-1 optimizer steps)."""
    import boxrefine.train.steps as tr

    real, calls = tr.refine_loss, {"n": 0}

    def interrupting(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(tr, "refine_loss", interrupting)


def _assert_same_training(a: Path, b: Path) -> None:
    """Same final refiner weights and the same logged epoch losses."""
    wa, wb = load_checkpoint(a / "last.pt")["refiner"], load_checkpoint(b / "last.pt")["refiner"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    la = [x["loss"] for x in _metrics(a) if x["kind"] == "epoch"]
    lb = [x["loss"] for x in _metrics(b) if x["kind"] == "epoch"]
    assert len(la) == len(lb) and np.allclose(la, lb, rtol=1e-5)


def _iou(a: list[float], b: list[float]) -> float:
    """IoU of two xyxy boxes, written out (independent of torchvision)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tiny_run_writes_run_folder(demo_root, reference_store, tmp_path):
    cfg = make_config(demo_root, reference_store, train={
        "runs_dir": str(tmp_path / "runs"), "epochs": 2, "batch_images": 2, "boxes_per_image": 3,
        "num_workers": 2, "name": "tiny", "keep_top_k": 5, "sample_ratio": 0.75})
    res = run_train(cfg)
    run = tmp_path / "runs" / "tiny"
    assert res.run_dir == run and res.epochs_done == 2
    for f in ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "epoch_001.pt", "epoch_002.pt",
              "curves.png", "subset.json", "eval_boxes_val.json"):
        assert (run / f).is_file(), f
    lines = _metrics(run)
    assert [x["kind"] for x in lines] == ["epoch", "eval", "epoch", "eval"]
    assert all(np.isfinite(x["loss"]) for x in lines if x["kind"] == "epoch")
    # the logged coarse baseline is the mean IoU of the saved validation boxes with their GT boxes,
    # computed here independently from the annotation file
    ev = lines[-1]
    saved = json.loads((run / "eval_boxes_val.json").read_text())["images"]
    ann = json.loads((demo_root / "annotations" / "instances_val.json").read_text())["annotations"]
    ious = []
    for img in saved.values():
        gts = sorted((a for a in ann if a["image_id"] == img["image_id"]), key=lambda a: a["id"])
        for box, gi in zip(img["boxes"], img["gt_index"], strict=True):
            if gi >= 0:
                x, y, w, h = gts[gi]["bbox"]
                ious.append(_iou(box, [x, y, x + w, y + h]))
    assert ev["coarse"]["n"] == ev["refined"]["n"] == len(ious) > 0
    assert ev["coarse"]["mean_iou"] == pytest.approx(float(np.mean(ious)), abs=1e-5)
    # an untrained-looking head would score exactly the coarse boxes; this one moved them
    assert ev["refined"]["mean_iou"] != ev["coarse"]["mean_iou"]
    assert json.loads((run / "subset.json").read_text())["rows"].__len__() == 3  # round(0.75 * 4)
    # the resolved config in the run folder is itself a valid config
    assert load_config(run / "config.yaml").train.name == "tiny"
    ck = load_checkpoint(run / "last.pt")
    assert ck["state"]["epoch"] == 2 and ck["store_identity"]["checkpoint"] == "random-init:seed=0"


def test_resume_after_ctrl_c_mid_epoch_equals_straight_run(demo_root, reference_store, tmp_path, monkeypatch):
    """torchtune-style: 2 epochs straight == interrupted in epoch 2 + --resume, same weights and losses."""
    straight = run_train(_cfg(demo_root, reference_store, tmp_path / "a"))

    _interrupt_at_call(monkeypatch, 3)  # epoch 2, first batch (2 batches per epoch)
    first = run_train(_cfg(demo_root, reference_store, tmp_path / "b"))
    assert first.interrupted and first.epochs_done == 1
    ck = load_checkpoint(first.run_dir / "last.pt")
    assert (ck["state"]["epoch"], ck["state"]["step"]) == (1, 0)
    monkeypatch.undo()
    resumed = run_train(_cfg(demo_root, reference_store, tmp_path / "b"), resume=first.run_dir)
    assert resumed.epochs_done == 2

    _assert_same_training(straight.run_dir, resumed.run_dir)


def test_resume_mid_epoch_after_a_step(demo_root, reference_store, tmp_path, monkeypatch):
    cfg = _cfg(demo_root, reference_store, tmp_path / "a", epochs=1, batch_images=1)
    straight = run_train(cfg)
    _interrupt_at_call(monkeypatch, 3)
    cfg_b = _cfg(demo_root, reference_store, tmp_path / "b", epochs=1, batch_images=1)
    first = run_train(cfg_b)
    assert load_checkpoint(first.run_dir / "last.pt")["state"]["step"] == 2
    monkeypatch.undo()
    resumed = run_train(cfg_b, resume=first.run_dir)
    _assert_same_training(straight.run_dir, resumed.run_dir)


def test_head_overfits_a_fixed_batch(reference_store):
    """The head can fit one fixed batch (boxes drawn once, constant lr): the loss falls far below its
    start. Margins are wide on purpose: CPUs differ in their float kernels (measured on AVX2 and on
    AVX-512 machines, the final loss is a small fraction of the first)."""
    from boxrefine.shared.config import TrainConfig
    from boxrefine.shared.model.heads import build_refiner
    from boxrefine.shared.store.rows import StoreRows, collate_rows
    from boxrefine.train.steps import batch_loss

    ds = StoreRows.from_store(str(reference_store), "train")
    batch = collate_rows([ds[0]])
    tc = TrainConfig(boxes_per_image=16, jitter=0.2, seed=0)
    torch.manual_seed(0)
    refiner = build_refiner(160, hidden=64, use_mask=False)
    opt = torch.optim.AdamW(refiner.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for _ in range(150):
        loss, _, n = batch_loss(batch, refiner, None, torch.device("cpu"), None, tc, {}, epoch=0)  # same boxes
        assert n == 16
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.1
    assert float(np.mean(losses[-10:])) < 0.5 * losses[0], (losses[0], losses[-10:])


def test_sample_ratio_is_seeded_and_sized():
    a, b, c = sample_subset(100, 0.1, 0), sample_subset(100, 0.1, 0), sample_subset(100, 0.1, 1)
    assert len(a) == 10 and np.array_equal(a, b) and not np.array_equal(a, c)
    assert len(sample_subset(7, 0.5, 0)) == 4 and len(sample_subset(3, 0.01, 0)) == 1
    assert np.array_equal(sample_subset(5, 1.0, 3), np.arange(5))


def test_sample_ratio_in_a_run_and_per_epoch(demo_root, reference_store, tmp_path, capsys):
    cfg = _cfg(demo_root, reference_store, tmp_path, epochs=1, sample_ratio=0.5)
    run_train(cfg)
    sub = json.loads((tmp_path / "run" / "subset.json").read_text())
    assert len(sub["rows"]) == 2 and sub["of"] == 4
    assert "2 of 4 images" in capsys.readouterr().err
    assert [x["images"] for x in _metrics(tmp_path / "run") if x["kind"] == "epoch"] == [2]


def test_train_runs_without_images_and_without_image_encoder(store_only, reference_store, tmp_path):
    data = store_only
    cfg = make_config(data, reference_store, train={"runs_dir": str(tmp_path / "runs"), "epochs": 1,
                                                    "num_workers": 0, "name": "noimg", "boxes_per_image": 2},
                      refiner={"use_mask": True, "hidden": 32})
    res = run_train(cfg)
    assert (res.run_dir / "last.pt").is_file()


def test_mismatched_store_refused(demo_root, reference_store, tmp_path):
    cfg = _cfg(demo_root, reference_store, tmp_path)
    cfg.model.seed = 5
    with pytest.raises(StoreError, match="random-init:seed=0.*random-init:seed=5"):
        run_train(cfg)


def test_fast_changes_exactly_the_fast_block(tmp_path):
    normal = load_config(REPO / "pipeline.yaml").to_dict()
    fast_cfg = load_config(REPO / "pipeline.yaml", fast=True)
    fast = fast_cfg.to_dict()
    declared = yaml.safe_load((REPO / "pipeline.yaml").read_text())["fast"]
    flat = {f"{s}.{k}": v for s, kv in declared.items() for k, v in kv.items()}
    assert fast_cfg.fast_applied == flat
    changed = {f"{s}.{k}" for s in normal if isinstance(normal[s], dict) and s not in ("fast", "fast_applied")
               for k in normal[s] if normal[s][k] != fast[s][k]}
    assert changed == {k for k, v in flat.items() if normal[k.split(".")[0]][k.split(".")[1]] != v}
    for k, v in flat.items():
        s, f = k.split(".")
        assert fast[s][f] == v
    # and a CLI flag still wins over the fast block
    assert load_config(REPO / "pipeline.yaml", {"train.sample_ratio": 0.5}, fast=True).train.sample_ratio == 0.5


def test_amp_bf16_autocast_on_cpu(demo_root, reference_store, tmp_path, monkeypatch):
    from boxrefine.shared.model.refiner import BoxRefiner

    seen = []
    real = BoxRefiner.forward

    def spy(self, *a, **k):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real(self, *a, **k)

    monkeypatch.setattr(BoxRefiner, "forward", spy)
    cfg = _cfg(demo_root, reference_store, tmp_path, epochs=1, amp=True, amp_dtype="bfloat16")
    run_train(cfg)
    assert seen and all(on and dt == torch.bfloat16 for on, dt in seen)
    assert np.isfinite(_metrics(tmp_path / "run")[0]["loss"])


def test_existing_run_folder_and_bad_checkpoint(demo_root, reference_store, tmp_path):
    cfg = _cfg(demo_root, reference_store, tmp_path, epochs=1)
    res = run_train(cfg)
    with pytest.raises(TrainError, match="exists"):
        run_train(cfg)
    last = res.run_dir / "last.pt"
    last.write_bytes(last.read_bytes()[:200])
    with pytest.raises(TrainError, match="last.pt: not a readable checkpoint"):
        run_train(cfg, resume=res.run_dir)


def test_amp_resolution():
    from boxrefine.shared.runtime.device import amp_setting, cpu_has_native_bf16

    cpu = torch.device("cpu")
    assert amp_setting("auto", "auto", cpu)[:2] == (None, False)
    assert amp_setting("auto", "auto", cpu).label == "float32 (AMP off)"
    assert amp_setting(False, "bfloat16", cpu).dtype is None
    assert amp_setting(True, "bfloat16", cpu)[:2] == (torch.bfloat16, False)  # forced
    assert amp_setting(True, "bfloat16", cpu).label == "bfloat16 autocast"
    # float16 always trains under a GradScaler, on a CPU too, and says that it is slow there
    fp16 = amp_setting(True, "float16", cpu)
    assert fp16[:2] == (torch.float16, True) and "slower" in fp16.why
    assert fp16.label == "float16 autocast + GradScaler"
    auto = amp_setting(True, "auto", cpu)
    assert auto.scaler is False
    assert auto.dtype == (torch.bfloat16 if cpu_has_native_bf16() else None)
    if auto.dtype is None:  # a float32 run is never labelled AMP
        assert "no native bfloat16" in auto.why and auto.label == "float32 (no AMP on this CPU)"


def test_amp_on_a_cpu_without_native_bf16_runs_float32_and_says_so(monkeypatch):
    import boxrefine.shared.runtime.device as precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    cpu = torch.device("cpu")
    p = precision.amp_setting(True, "auto", cpu)
    assert p.dtype is None and p.requested and p.label == "float32 (no AMP on this CPU)"
    forced = precision.amp_setting(True, "bfloat16", cpu)
    assert forced.dtype == torch.bfloat16 and "as asked" in forced.why
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.amp_setting(True, "auto", cpu).dtype == torch.bfloat16
    assert precision.amp_setting("auto", "auto", cpu).dtype is None  # auto: CUDA only


def _signal_at_step(monkeypatch, n: int, signum: int) -> None:
    """Deliver ``signum`` to this process from inside the n-th optimizer step (between the weight
    update and the step counter: the worst moment)."""
    import os

    from boxrefine.train.recipe import TrainRecipe

    real, calls = TrainRecipe._optimizer_step, {"n": 0}

    def stepping(self, loss):
        real(self, loss)
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(TrainRecipe, "_optimizer_step", stepping)


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_signal_mid_step_saves_and_resume_is_exact(demo_root, reference_store, tmp_path, monkeypatch, signame):
    """SIGTERM is handled like Ctrl-C: the step in flight finishes and is counted, last.pt is saved,
    and resuming gives the straight run's weights and losses (no step repeated or lost)."""
    import signal

    cfg = _cfg(demo_root, reference_store, tmp_path / "a", epochs=2, batch_images=1)
    straight = run_train(cfg)
    _signal_at_step(monkeypatch, 3, getattr(signal, signame))
    cfg_b = _cfg(demo_root, reference_store, tmp_path / "b", epochs=2, batch_images=1)
    first = run_train(cfg_b)
    assert first.interrupted
    state = load_checkpoint(first.run_dir / "last.pt")["state"]
    assert (state["epoch"], state["step"]) == (0, 3)
    monkeypatch.undo()
    run_train(cfg_b, resume=first.run_dir)
    _assert_same_training(straight.run_dir, first.run_dir)


def test_stop_during_validation_logs_each_epoch_once(demo_root, reference_store, tmp_path, monkeypatch):
    """A stop while validating saves a checkpoint that resumes *at the validation*: every epoch and
    every validation appears exactly once in metrics.jsonl."""
    import os
    import signal

    import boxrefine.train.recipe as rc

    real, calls = rc.predict, {"n": 0}

    def predict_then_stop(*a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(rc, "predict", predict_then_stop)
    cfg = _cfg(demo_root, reference_store, tmp_path, epochs=2)
    first = run_train(cfg)
    assert first.interrupted
    assert [(x["kind"], x["epoch"]) for x in _metrics(first.run_dir)] == [("epoch", 1)]
    monkeypatch.undo()
    run_train(cfg, resume=first.run_dir)
    assert [(x["kind"], x["epoch"]) for x in _metrics(first.run_dir)] == \
        [("epoch", 1), ("eval", 1), ("epoch", 2), ("eval", 2)]


def test_resume_refuses_a_changed_refiner_config(demo_root, reference_store, tmp_path):
    cfg = _cfg(demo_root, reference_store, tmp_path, epochs=1)
    res = run_train(cfg)
    cfg.refiner.hidden = 64
    with pytest.raises(TrainError, match=r"refiner\.hidden: checkpoint 32, now 64"):
        run_train(cfg, resume=res.run_dir)


def test_fast_line_says_what_ran() -> None:
    """A fast block's train.amp=True beside a float32 run says so (it read as if AMP ran)."""
    import torch

    from boxrefine.shared.runtime.device import Precision
    from boxrefine.train.tensorboard import fast_summary

    f32 = Precision(None, False, "bfloat16 is emulated on this CPU", requested=True)
    bf16 = Precision(torch.bfloat16, False, "CPU bfloat16 autocast", requested=True)
    applied = {"train.sample_ratio": 0.1, "train.amp": True}
    assert fast_summary(applied, f32) == "train.sample_ratio=0.1, train.amp=True (runs float32 (no AMP on this CPU))"
    assert fast_summary(applied, bf16) == "train.sample_ratio=0.1, train.amp=True"
