"""The CUDA paths (marked ``gpu``; skipped without a CUDA device, so `make test` on a CPU machine only
lists them). ``make gpu-check`` runs them on a CUDA machine before it measures: train, evaluate and
refine under float16 + GradScaler and bfloat16, extract with a float16 encoder, a DDP step over a
1-rank NCCL group, and the pinned-memory loader."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from conftest import invoke, make_config, write_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

CUDA = {"model": {"type": "vit_tiny", "checkpoint": None, "seed": 0, "device": "cuda"}}


def _cfg(demo_root: Path, store: Path, tmp_path: Path, amp_dtype: str, **sections):
    return make_config(demo_root, store, **CUDA, refiner={"use_mask": True, "hidden": 32},
                       train={"runs_dir": str(tmp_path / "runs"), "name": "gpu", "epochs": 2, "batch_images": 2,
                              "boxes_per_image": 4, "num_workers": 2, "amp": "auto", "amp_dtype": amp_dtype},
                       **sections)


@pytest.mark.parametrize("amp_dtype", ["float16", "bfloat16"])
def test_train_evaluate_refine_on_cuda(demo_root, reference_store, tmp_path, amp_dtype):
    from boxrefine.evaluate.run import run_evaluate
    from boxrefine.train.recipe import run_train

    cfg = _cfg(demo_root, reference_store, tmp_path, amp_dtype)
    res = run_train(cfg)
    lines = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [x for x in lines if x["kind"] == "epoch"]
    scaler = amp_dtype == "float16"
    assert epochs[0]["precision"] == f"{amp_dtype} autocast" + (" + GradScaler" if scaler else "")
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in epochs)
    if scaler:
        assert epochs[-1]["grad_scale"] * 2 ** sum(e["skipped_steps"] for e in epochs) == 2.0**16
    assert any(x["kind"] == "eval" for x in lines)
    ev = run_evaluate(cfg, res.run_dir / "best.pt")
    m = json.loads((ev.out_dir / "metrics.json").read_text())
    assert m["amp"] == amp_dtype and m["device"].startswith("cuda")
    assert torch.isfinite(torch.tensor(m["checkpoints"][0]["mean_iou"]))
    assert torch.isfinite(torch.tensor(m["checkpoints"][0]["mask_iou"]))

    path = write_config(tmp_path / "cfg.yaml", demo_root, reference_store, **CUDA,
                        train={"amp": "auto", "amp_dtype": amp_dtype})
    out = tmp_path / "refined.json"
    r, text = invoke("refine", "--config", str(path), "--checkpoint", str(res.run_dir / "best.pt"), "--split", "val",
                     "--out", str(out), "--masks")
    assert r.exit_code == 0, text
    assert f"amp: CUDA {amp_dtype} autocast" in text
    assert all("segmentation" in d for d in json.loads(out.read_text()))


def test_extract_with_a_float16_encoder_on_cuda(demo_root, reference_store, tmp_path):
    import numpy as np

    from boxrefine.extract.run import run_extract
    from boxrefine.shared.store.feature_store import open_store

    store = tmp_path / "fp16.zarr"
    cfg = make_config(demo_root, store, **CUDA, extract={"encoder_precision": "float16", "num_workers": 2})
    assert run_extract(cfg, announce=False).encoded == 5
    assert open_store(str(store)).identity.encoder_precision == "float16"
    for name in ("image_embeddings", "interm_embeddings"):
        a = np.asarray(open_store(str(store)).split("train").array(name)[:], np.float32)
        b = np.asarray(open_store(str(reference_store)).split("train").array(name)[:], np.float32)
        assert np.isfinite(a).all()
        assert np.linalg.norm(a - b) <= 0.1 * np.linalg.norm(b), name  # the float32 CPU encoder's features


def test_ddp_step_over_a_one_rank_nccl_group(demo_root, reference_store):
    """DistributedDataParallel over NCCL (world of one) around the refiner, a bf16 autocast step."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from boxrefine.shared.model.heads import build_refiner
    from boxrefine.shared.model.sam import build_sam_heads
    from boxrefine.shared.store.rows import StoreRows, collate_rows
    from boxrefine.train.steps import batch_loss

    cfg = make_config(demo_root, reference_store, **CUDA, train={"boxes_per_image": 4})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, device_id=dev)
    try:
        refiner = build_refiner(160, use_mask=True).to(dev)
        model = DistributedDataParallel(refiner, device_ids=[0], broadcast_buffers=False)
        heads = build_sam_heads("vit_tiny", None, 0, dev, announce=False)
        ds = StoreRows.from_store(str(reference_store), "train")
        batch = collate_rows([ds[0], ds[1]])
        opt = torch.optim.AdamW(refiner.parameters(), lr=1e-3)
        loss, _, n = batch_loss(batch, model, heads, dev, torch.bfloat16, cfg.train, {}, 0)
        loss.backward()
        assert n == 8 and torch.isfinite(loss)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in refiner.parameters())
        opt.step()
    finally:
        dist.destroy_process_group()


def test_training_loader_pins_memory_on_cuda(demo_root, reference_store, tmp_path):
    from boxrefine.shared.store.feature_store import open_store
    from boxrefine.train.data import TrainData

    cfg = _cfg(demo_root, reference_store, tmp_path, "bfloat16")
    data = TrainData(cfg, open_store(str(reference_store)), pin_memory=True)
    data.sampler.set_epoch(0, 0)
    batch = next(iter(data.loader))
    assert batch["image_embeddings"].is_pinned() and batch["interm_embeddings"].is_pinned()
    x = batch["image_embeddings"].to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert x.is_cuda
