"""Autocast on every path, on any CPU: ``train.amp_dtype`` forces bfloat16 or float16 autocast (CPU
autocast supports both), so these tests run the 16-bit paths whether or not the CPU has native bf16.

Each test checks that autocast really ran (a global forward hook records the dtype that the decoder's
and the refiner's layers returned), that what leaves a model is float32 and finite, and that the
results agree with float32 within tolerances measured on this code (``bench/precision.py``). float16
on a CPU runs convolutions through a slow reference kernel, so the inputs stay tiny: 1-2 images, 2-3
boxes."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, invoke, make_config, write_config

from boxrefine.shared.model.heads import build_refiner
from boxrefine.shared.model.refiner import refine_loss
from boxrefine.shared.model.sam import build_sam_heads
from boxrefine.shared.store.rows import StoreRows

DTYPES = [torch.bfloat16, torch.float16]
NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


@contextmanager
def output_dtypes():
    """{module class name: set of dtypes its forward returned} for every module run inside."""
    seen: dict[str, set[torch.dtype]] = {}

    def hook(module, _inp, out):
        for t in out if isinstance(out, tuple) else (out,):
            if isinstance(t, torch.Tensor):
                seen.setdefault(type(module).__name__, set()).add(t.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def _row(store: Path, split: str = "val"):
    item = StoreRows.from_store(str(store), split)[0]
    geo = item["geometry"]
    return (item["image_embeddings"].float()[None], item["interm_embeddings"].float()[None],
            geo.boxes_to_input(item["gt_boxes"][:3].float()))


# ------------------------------------------------------------------------------------ the models alone
@pytest.mark.parametrize("dtype", DTYPES, ids=NAMES.get)
@pytest.mark.parametrize("regions", [False, True], ids=["whole", "regions"])
def test_decoder_runs_in_autocast_and_returns_float32(reference_store: Path, dtype: torch.dtype, regions: bool):
    emb, interm, boxes = _row(reference_store)
    heads = build_sam_heads("vit_tiny", None, 0, "cpu", announce=False)
    regs = build_refiner(160).mask_regions(boxes) if regions else None
    ref, iou_ref = heads(emb, interm, boxes, regions=regs)
    with output_dtypes() as seen, torch.autocast("cpu", dtype=dtype):
        logits, iou = heads(emb, interm, boxes, regions=regs)
    assert dtype in seen["Linear"] and dtype in seen["MLP"]  # the transformer and the IoU head ran in 16 bits
    assert logits.dtype == iou.dtype == torch.float32
    assert torch.isfinite(logits).all() and torch.isfinite(iou).all()
    # measured: bf16 max |Δ| 1.6 % of the largest logit, signs 99.6 % equal; fp16 0.15 %, 99.96 %
    assert (logits - ref).abs().max() <= 0.1 * ref.abs().max()
    assert ((logits > 0) == (ref > 0)).float().mean() >= 0.98
    assert (iou - iou_ref).abs().max() <= 0.05


@pytest.mark.parametrize("dtype", DTYPES, ids=NAMES.get)
@pytest.mark.parametrize("head", ["sides", "box"])
@pytest.mark.parametrize("use_mask", [True, False], ids=["mask", "nomask"])
def test_refiner_forward_backward_in_autocast(reference_store: Path, dtype, head: str, use_mask: bool):
    """A refiner with random (non-zero) last layers, so that it moves the boxes: under autocast its
    layers run in ``dtype``, the boxes come out float32 within 10 % of the float32 move (measured
    1.3-3.3 % for bf16, ≤ 0.5 % for fp16), and every gradient is finite."""
    emb, interm, boxes = _row(reference_store)
    torch.manual_seed(0)
    logits = torch.randn(len(boxes), 1, 256, 256) if use_mask else None
    refiner = build_refiner(160, head=head, use_mask=use_mask, hidden=32)
    for p in refiner.parameters():
        if not p.abs().sum():
            torch.nn.init.normal_(p, std=0.5)
    refiner.eval()
    ref = refiner(emb, interm, [boxes], logits)
    with output_dtypes() as seen, torch.autocast("cpu", dtype=dtype):
        out = refiner(emb, interm, [boxes], logits)
    assert dtype in seen["Conv2d"] and out.dtype == torch.float32
    moved = (ref - boxes).abs().max()
    assert moved > 1.0
    assert (out - ref).abs().max() <= 0.1 * moved
    refiner.train()
    with torch.autocast("cpu", dtype=dtype):
        out = refiner(emb, interm, [boxes], logits)
    loss, terms = refine_loss(out.float(), boxes + 5.0, boxes)
    loss.backward()
    grads = [p.grad for p in refiner.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(torch.isfinite(torch.tensor(v)) for v in terms.values())


# ------------------------------------------------------------------------------------ the stages
def _small_dets(demo_root: Path, tmp_path: Path, n: int = 2) -> Path:
    """The val split's first ``n`` detector boxes: the whole-mask paths (zero-shot, mask IoU, --masks)
    cost seconds per box in float16 on a CPU."""
    dets = json.loads((demo_root / "annotations" / "detections_val.json").read_text())[:n]
    path = tmp_path / "dets_val.json"
    path.write_text(json.dumps(dets))
    return path


def _stage_config(demo_root, store, tmp_path, dtype, head, use_mask, **train):
    cfg = make_config(demo_root, store, refiner={"head": head, "use_mask": use_mask, "hidden": 32},
                      train={"runs_dir": str(tmp_path / "runs"), "name": "amp", "epochs": 1, "batch_images": 2,
                             "boxes_per_image": 2, "num_workers": 0, "sample_ratio": 0.5, "amp": True,
                             "amp_dtype": NAMES[dtype], **train})
    cfg.data.splits["val"].detections = _small_dets(demo_root, tmp_path)
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("dtype,head,use_mask", [
    (torch.bfloat16, "sides", True), (torch.bfloat16, "box", False),
    (torch.float16, "box", True), (torch.float16, "sides", False)], ids=["bf16-sides-mask", "bf16-box",
                                                                        "fp16-box-mask", "fp16-sides"])
def test_train_validate_evaluate_refine_in_autocast(demo_root, reference_store, tmp_path, dtype, head, use_mask):
    from boxrefine.evaluate.run import run_evaluate
    from boxrefine.shared.scoring.predictor import RefinePredictor
    from boxrefine.train.recipe import run_train

    cfg = _stage_config(demo_root, reference_store, tmp_path, dtype, head, use_mask)
    with output_dtypes() as seen:
        res = run_train(cfg)
    assert dtype in seen["Conv2d"]  # the refiner's convolutions (training and validation)
    if use_mask:
        assert dtype in seen["MLP"]  # the frozen decoder
    lines = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    epoch, val = lines[0], lines[1]
    label = f"{NAMES[dtype]} autocast" + (" + GradScaler" if dtype == torch.float16 else "")
    assert epoch["precision"] == label
    assert all(torch.isfinite(torch.tensor(epoch[k])) for k in ("loss", "l1", "giou"))
    assert val["kind"] == "eval" and torch.isfinite(torch.tensor(val["refined"]["mean_iou"]))
    if dtype == torch.float16:  # the GradScaler's scale starts at 2**16 and halves at every skipped step
        assert epoch["grad_scale"] * 2 ** epoch["skipped_steps"] == 2.0**16

    with output_dtypes() as seen:  # evaluate: coarse, zero-shot and mask IoU baselines, then the checkpoint
        ev = run_evaluate(cfg, res.run_dir / "best.pt")
    assert dtype in seen["MLP"]
    m = json.loads((ev.out_dir / "metrics.json").read_text())
    assert m["amp"] == NAMES[dtype]
    ck, base = m["checkpoints"][0], m["baselines"]
    for v in (base["coarse"]["mean_iou"], base["coarse"]["mask_iou"], base["zero_shot"]["mean_iou"],
              ck["mean_iou"], ck["mask_iou"], ck["AP"]):
        assert v is not None and torch.isfinite(torch.tensor(v))

    cfg_path = write_config(tmp_path / "cfg.yaml", demo_root, reference_store,
                            train={"amp": True, "amp_dtype": NAMES[dtype]})
    out = tmp_path / "refined.json"
    r, text = invoke("refine", "--config", str(cfg_path), "--checkpoint", str(res.run_dir / "best.pt"), "--split",
                     "val", "--detections", str(cfg.data.splits["val"].detections), "--out", str(out), "--masks")
    assert r.exit_code == 0, text
    assert f"amp: CPU {NAMES[dtype]} autocast" in text
    refined = json.loads(out.read_text())
    assert len(refined) == 2 and all("segmentation" in d and "bbox_coarse" in d for d in refined)

    predictor = RefinePredictor(res.run_dir / "best.pt", device="cpu", amp_dtype=dtype, announce=False)
    predictor.set_store_row(str(reference_store), "val", _val_file(demo_root))
    coarse = [[d["bbox_coarse"][0], d["bbox_coarse"][1], d["bbox_coarse"][0] + d["bbox_coarse"][2],
               d["bbox_coarse"][1] + d["bbox_coarse"][3]] for d in refined]
    with output_dtypes() as seen:
        boxes, _ = predictor.refine(coarse)
    assert dtype in seen["Conv2d"]
    got = [[round(float(v), 2) for v in (b[0], b[1], b[2] - b[0], b[3] - b[1])] for b in boxes]
    assert got == [d["bbox"] for d in refined]  # the predictor gives the CLI's boxes under autocast too


def _val_file(demo_root: Path) -> str:
    ann = json.loads((demo_root / "annotations" / "instances_val.json").read_text())
    return ann["images"][0]["file_name"]


@pytest.mark.slow
def test_cli_train_fast_forced_bfloat16(demo_root, reference_store, tmp_path):
    """``boxrefine train --fast`` (FAST: AMP on) with autocast forced, as ``make train FAST=1`` runs on a
    CPU with native bf16."""
    cfg = write_config(tmp_path / "cfg.yaml", demo_root, reference_store,
                       train={"runs_dir": str(tmp_path / "runs"), "name": "fast", "epochs": 1, "num_workers": 0,
                              "boxes_per_image": 2, "amp_dtype": "bfloat16"}, refiner={"use_mask": True},
                       fast=yaml.safe_load((REPO / "pipeline.yaml").read_text())["fast"])
    r, text = invoke("train", "--config", str(cfg), "--fast")
    assert r.exit_code == 0, text
    assert "precision: CPU bfloat16 autocast" in text and "train.amp=True" in text
    epoch = json.loads((tmp_path / "runs" / "fast" / "metrics.jsonl").read_text().splitlines()[0])
    assert epoch["precision"] == "bfloat16 autocast" and torch.isfinite(torch.tensor(epoch["loss"]))


# ------------------------------------------------------------------------------------ float16's GradScaler
def test_float16_gradscaler_skips_the_step_of_an_inf_gradient(demo_root, reference_store, tmp_path, monkeypatch):
    """A step whose gradient is inf leaves the weights as they were and halves the scale; the epoch
    counts it (metrics.jsonl ``skipped_steps``) and training goes on with finite weights."""
    from boxrefine.train.recipe import TrainRecipe, run_train

    real, seen = TrainRecipe._optimizer_step, []

    def step(self, loss):
        before = {k: v.detach().clone() for k, v in self.refiner.state_dict().items()}
        scale = self.scaler.get_scale()
        hooks = []
        if not seen:  # the first step: one gradient becomes inf
            p = next(self.refiner.parameters())
            hooks.append(p.register_hook(lambda g: torch.full_like(g, float("inf"))))
        real(self, loss)
        for h in hooks:
            h.remove()
        after = self.refiner.state_dict()
        seen.append((scale, self.scaler.get_scale(), all(torch.equal(before[k], after[k]) for k in before)))

    monkeypatch.setattr(TrainRecipe, "_optimizer_step", step)
    cfg = _stage_config(demo_root, reference_store, tmp_path, torch.float16, "sides", False, sample_ratio=1.0)
    res = run_train(cfg)
    assert len(seen) == 2
    scale0, scale1, unchanged = seen[0]
    assert unchanged and scale1 == scale0 / 2  # skipped: the weights as they were, the scale halved
    epoch = json.loads((res.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    skipped = sum(1 for s0, s1, _ in seen if s1 < s0)
    assert epoch["skipped_steps"] == skipped >= 1 and epoch["grad_scale"] == seen[-1][1]
    weights = torch.load(res.run_dir / "last.pt", weights_only=True)["refiner"]
    assert all(torch.isfinite(v).all() for v in weights.values())


# ------------------------------------------------------------------------------------ agreement with float32
@pytest.mark.slow
def test_refined_boxes_in_autocast_agree_with_float32_on_a_signal_store(demo_root, reference_store, tmp_path):
    """A refiner trained on a signal store (the GT in the embeddings), so that it really moves the boxes,
    gives the same boxes in bf16 and fp16 autocast as in float32: within 0.5 px, where this setting
    measured at most 0.015 px (bf16) and 0.003 px (fp16) over 20 boxes moved by a median 5 px (train
    seeds 0 and 1). A box whose coordinates were computed in bf16 would be off by up to 4 px."""
    from boxrefine.shared.dev.signal import make_signal_store
    from boxrefine.shared.model.checkpoint import load_checkpoint, refiner_from_checkpoint
    from boxrefine.shared.scoring.coarse import fixed_coarse_boxes
    from boxrefine.shared.scoring.predict import predict
    from boxrefine.train.recipe import run_train

    signal = tmp_path / "signal.zarr"
    make_signal_store(str(reference_store), str(signal), 30.0)
    cfg = make_config(demo_root, signal, refiner={"use_mask": True},
                      train={"runs_dir": str(tmp_path / "runs"), "name": "sig", "epochs": 8, "batch_images": 2,
                             "boxes_per_image": 8, "num_workers": 0, "lr": 3e-3, "eval_every": 8, "keep_top_k": 0})
    run = run_train(cfg).run_dir
    refiner = refiner_from_checkpoint(load_checkpoint(run / "last.pt"), run / "last.pt")
    heads = build_sam_heads("vit_tiny", None, 0, "cpu", announce=False)
    ds = StoreRows.from_store(str(signal), "train")
    coarse = fixed_coarse_boxes(cfg, "train", ds, None)
    boxes = {}
    for dtype in (None, *DTYPES):
        preds = predict(ds, coarse, torch.device("cpu"), refiner=refiner, heads=heads, amp_dtype=dtype)
        boxes[dtype] = torch.cat([p.refined for p in preds])
    moved = (boxes[None] - torch.cat([p.coarse for p in preds])).abs().amax(1)
    assert moved.median() >= 1.0, moved
    for dtype in DTYPES:
        assert boxes[dtype].dtype == torch.float32
        assert (boxes[dtype] - boxes[None]).abs().max() <= 0.5, dtype


# ------------------------------------------------------------------------------------ extract
@pytest.mark.slow
def test_extract_with_a_bfloat16_encoder(demo_root, reference_store, tmp_path):
    """``extract.encoder_precision: bfloat16`` runs the image encoder under autocast, records it in the
    store identity and writes features close to the float32 encoder's (measured relative L2 difference
    1.7 % for the embedding, 1.1 % for the interm feature)."""
    import numpy as np

    from boxrefine.extract.run import run_extract
    from boxrefine.shared.store.feature_store import open_store

    store = tmp_path / "bf16.zarr"
    cfg = make_config(demo_root, store, extract={"encoder_precision": "bfloat16", "splits": ["val"]})
    with output_dtypes() as seen:
        assert run_extract(cfg, announce=False).encoded == 1
    assert torch.bfloat16 in seen["Linear"]
    assert open_store(str(store)).identity.encoder_precision == "bfloat16"
    for name in ("image_embeddings", "interm_embeddings"):
        a = np.asarray(open_store(str(store)).split("val").array(name)[:], np.float32)
        b = np.asarray(open_store(str(reference_store)).split("val").array(name)[:], np.float32)
        assert np.isfinite(a).all()
        assert np.linalg.norm(a - b) <= 0.1 * np.linalg.norm(b), name


# ------------------------------------------------------------------------------------ make gpu-check
@pytest.mark.slow
def test_gpu_check_without_cuda_and_its_smoke_run(tmp_path):
    """``bench/gpu_check.py`` says that nothing was measured without CUDA (exit 0), and ``--smoke`` runs
    its measuring code on the CPU at a tiny size, so the script cannot rot where no GPU ever runs it."""
    import subprocess
    import sys

    env = {"CI": "true", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}
    plain = subprocess.run([sys.executable, "bench/gpu_check.py"], cwd=REPO, env=env, capture_output=True, text=True)
    assert plain.returncode == 0 and plain.stdout.strip() == "no CUDA device: nothing measured"
    out = tmp_path / "gpu.json"
    smoke = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", "--work", str(tmp_path / "w"),
                            "--json", str(out)], cwd=REPO, env=env, capture_output=True, text=True)
    assert smoke.returncode == 0, smoke.stdout + smoke.stderr
    res = json.loads(out.read_text())
    assert res["step"]["float32"]["ms"] > 0 and res["encoder"]["vit_tiny bfloat16"]["images_per_s"] > 0
    assert "| training step ms" in smoke.stdout and res["eval"]["evaluate_s"] > 0
