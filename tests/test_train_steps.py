"""What a training step computes, exactly (``train/steps.py``): the boxes drawn per image change
from epoch to epoch and with the seed and the image, and are identical when drawn again; crowd and
zero-size GT are never targets; detector boxes take half the draws; the learning-rate schedule; the
optimizer step; the loss of a batch. Synthetic tensors, no store."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from boxrefine.shared.config import TrainConfig
from boxrefine.shared.geometry.frames import ImageGeometry
from boxrefine.train.steps import batch_loss, gt_targets, lr_lambda, optimizer_step, seeded_generator, training_boxes

GEO = ImageGeometry.of(480, 640)
GT = torch.tensor([[10.0, 20.0, 110.0, 220.0], [300.0, 100.0, 500.0, 300.0], [50.0, 50.0, 50.0, 90.0],
                   [400.0, 400.0, 600.0, 470.0]])
INFO = torch.tensor([[1, 1, 0], [2, 1, 0], [3, 1, 0], [4, 2, 1]])  # 3: zero width; 4: crowd


class Recorder(nn.Module):
    """Stands in for the refiner: records the coarse boxes and dropout generators it is given and returns
    the coarse boxes (plus a trainable zero)."""

    use_mask = False

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.calls: list[dict[str, Any]] = []

    def mask_regions(self, boxes: torch.Tensor) -> list[tuple[int, int, int, int]]:
        return [(0, 0, 256, 256)] * len(boxes)

    def forward(self, emb, interm, boxes, logits=None, generators=None):
        self.calls.append({"boxes": [b.clone() for b in boxes], "logits": logits,
                           "draws": [float(torch.rand((), generator=g)) for g in generators or []]})
        return torch.cat(boxes) + self.w


def _batch(keys: list[int], rows: list[int] | None = None) -> dict[str, Any]:
    n = len(keys)
    return {"row": rows or list(range(n)), "key": keys, "image_embeddings": torch.zeros(n, 256, 64, 64),
            "interm_embeddings": torch.zeros(n, 64, 64, 8), "gt_boxes": [GT.clone() for _ in keys],
            "gt_info": [INFO.clone() for _ in keys], "geometry": [GEO for _ in keys]}


def _draw(epoch: int, seed: int = 0, keys: tuple[int, ...] = (11, 12), det: dict | None = None,
          **cfg: Any) -> tuple[Recorder, torch.Tensor, dict[str, float], int]:
    rec = Recorder()
    train_cfg = TrainConfig(seed=seed, boxes_per_image=6, jitter=0.2, **cfg)
    loss, terms, n = batch_loss(_batch(list(keys)), rec, None, torch.device("cpu"), None, train_cfg, det or {},
                                epoch)
    return rec, loss, terms, n


def test_boxes_change_from_epoch_to_epoch_and_repeat_exactly() -> None:
    """The per-image draw is seeded by (seed, epoch, row key): the same epoch gives the same boxes and
    dropout draws, run after run; another epoch, seed or image gives others."""
    a, _, _, n = _draw(epoch=3)
    b, _, _, _ = _draw(epoch=3)
    assert n == 12
    for x, y in zip(a.calls[0]["boxes"], b.calls[0]["boxes"], strict=True):
        assert torch.equal(x, y)
    assert a.calls[0]["draws"] == b.calls[0]["draws"]
    for other in (_draw(epoch=4)[0], _draw(epoch=3, seed=1)[0]):
        for x, y in zip(a.calls[0]["boxes"], other.calls[0]["boxes"], strict=True):
            assert not torch.equal(x, y)
        assert all(u != v for u, v in zip(a.calls[0]["draws"], other.calls[0]["draws"], strict=True))
    # the two images of one batch draw differently, and an image draws the same beside any other
    first, second = a.calls[0]["boxes"]
    assert not torch.equal(first, second)
    alone = _draw(epoch=3, keys=(12,))[0]
    assert torch.equal(alone.calls[0]["boxes"][0], second) and alone.calls[0]["draws"] == a.calls[0]["draws"][1:]
    # the dropout generator is not the jitter's
    assert a.calls[0]["draws"][0] != float(torch.rand((), generator=seeded_generator(0, 3, 11)))


def test_seeded_generator_depends_on_every_part_and_their_order() -> None:
    def first(*parts: int) -> float:
        return float(torch.rand((), generator=seeded_generator(*parts)))

    base = first(0, 3, 11)
    assert first(0, 3, 11) == base
    assert len({base, first(1, 3, 11), first(0, 4, 11), first(0, 3, 12), first(3, 0, 11), first(0, 11, 3),
                first(0, 3), first(0, 3, 11, 0)}) == 8
    big = seeded_generator(2**62, 2**62, 2**62)  # any int64 key: the hash stays a valid seed
    assert 0 <= big.initial_seed() < 2**63 - 1


def test_training_boxes_are_jittered_trainable_gt_in_the_image() -> None:
    g = torch.Generator().manual_seed(0)
    coarse, target = training_boxes(GT, INFO, None, GEO, 200, 0.2, g)
    assert coarse.shape == target.shape == (200, 4)
    picked = {tuple(t.tolist()) for t in target}
    assert picked == {tuple(GT[0].tolist()), tuple(GT[1].tolist())}  # never the zero-size or the crowd box
    inside = (coarse[:, 0] > 0) & (coarse[:, 1] > 0)  # not clipped: the noisy-box model's bounds hold
    w, h = target[:, 2] - target[:, 0], target[:, 3] - target[:, 1]
    cw, ch = coarse[:, 2] - coarse[:, 0], coarse[:, 3] - coarse[:, 1]
    cx_shift = ((coarse[:, 0] + coarse[:, 2]) - (target[:, 0] + target[:, 2])) / 2 / w
    cy_shift = ((coarse[:, 1] + coarse[:, 3]) - (target[:, 1] + target[:, 3])) / 2 / h
    for x in (cx_shift[inside], cy_shift[inside], cw[inside] / w[inside] - 1, ch[inside] / h[inside] - 1):
        assert x.abs().max() <= 0.2 + 1e-4 and x.abs().max() > 0.1  # U(-0.2, 0.2): used, and no wider
    assert (coarse[:, 0] >= 0).all() and (coarse[:, 2] <= 640).all() and (coarse[:, 3] <= 480).all()
    assert not torch.equal(coarse, target)
    # no trainable GT: nothing drawn
    c, t = training_boxes(GT[2:], INFO[2:], None, GEO, 5, 0.2, g)
    assert c.shape == t.shape == (0, 4)


def test_detector_boxes_take_about_half_of_the_draws_with_their_targets() -> None:
    det_boxes = torch.tensor([[12.0, 22.0, 108.0, 230.0], [290.0, 90.0, 505.0, 310.0]])
    det = (det_boxes, torch.tensor([0, 1]))
    coarse, target = training_boxes(GT, INFO, det, GEO, 400, 0.2, torch.Generator().manual_seed(1))
    from_det = (coarse[:, None] == det_boxes[None]).all(-1)
    n_det = int(from_det.any(1).sum())
    assert 120 < n_det < 280
    for i in range(2):  # each detector box is trained towards its own GT
        assert (target[from_det[:, i]] == GT[i]).all()
    # an empty detections entry is the same as none
    empty = (torch.zeros((0, 4)), torch.zeros(0, dtype=torch.int64))
    a = training_boxes(GT, INFO, empty, GEO, 10, 0.2, torch.Generator().manual_seed(2))
    b = training_boxes(GT, INFO, None, GEO, 10, 0.2, torch.Generator().manual_seed(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_batch_loss_passes_input_frame_boxes_and_its_detections() -> None:
    rec, loss, terms, n = _draw(epoch=0)
    assert n == 12 and float(loss.detach()) == pytest.approx(terms["l1"] + terms["giou"])
    assert terms["l1"] > 0 and terms["giou"] > 0
    boxes = rec.calls[0]["boxes"][0]
    assert boxes.shape == (6, 4) and float(boxes[:, 2].max()) > 640 * 0.2  # input frame: scaled by 1024/640
    g = seeded_generator(0, 0, 11)
    c, _ = training_boxes(GT, INFO, None, GEO, 6, 0.2, g)
    torch.testing.assert_close(boxes, GEO.boxes_to_input(c))
    # the loss weights apply
    _, loss2, terms2, _ = _draw(epoch=0, l1_weight=2.0, giou_weight=0.0)
    assert float(loss2.detach()) == pytest.approx(2 * terms2["l1"])
    # detector pairs are looked up by row
    det = {1: (torch.tensor([[300.0, 100.0, 480.0, 290.0]]), torch.tensor([1]))}
    rec3, *_ = _draw(epoch=0, det=det)
    assert (rec3.calls[0]["boxes"][1] == GEO.boxes_to_input(det[1][0])).all(-1).any()
    assert not (rec3.calls[0]["boxes"][0] == GEO.boxes_to_input(det[1][0])).all(-1).any()


def test_batch_without_trainable_boxes_has_no_loss() -> None:
    batch = _batch([1])
    batch["gt_info"] = [torch.tensor([[1, 1, 1], [2, 1, 1], [3, 1, 1], [4, 1, 1]])]  # all crowd
    loss, terms, n = batch_loss(batch, Recorder(), None, torch.device("cpu"), None, TrainConfig(), {}, 0)
    assert loss is None and terms == {} and n == 0


def test_batch_loss_runs_the_heads_on_every_box_with_the_refiners_regions() -> None:
    seen = {}

    def heads(emb, interm, boxes, image_index, regions):
        seen.update(boxes=boxes, image_index=image_index, regions=regions)
        return torch.ones(len(boxes), 1, 256, 256), None

    rec = Recorder()
    rec.use_mask = True
    batch_loss(_batch([5, 6]), rec, heads, torch.device("cpu"), None, TrainConfig(boxes_per_image=3), {}, 0)
    assert seen["image_index"].tolist() == [0, 0, 0, 1, 1, 1] and len(seen["regions"]) == 6
    assert torch.equal(seen["boxes"], torch.cat(rec.calls[0]["boxes"]))
    assert rec.calls[0]["logits"].shape == (6, 1, 256, 256) and not rec.calls[0]["logits"].is_inference()


def test_lr_warms_up_linearly_then_decays_by_cosine_to_zero() -> None:
    f = lr_lambda(total_steps=110, warmup_steps=10)
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5)
    assert f(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert f(110) == pytest.approx(0.0, abs=1e-12) and f(500) == pytest.approx(0.0, abs=1e-12)
    g = lr_lambda(total_steps=4, warmup_steps=0)
    assert [g(s) for s in range(5)] == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5,
                                                      0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0])
    assert lr_lambda(5, 5)(5) == pytest.approx(1.0)  # no steps left after warm-up: no division by zero
    one = lr_lambda(total_steps=6, warmup_steps=5)  # one step after warm-up: it decays all the way
    assert [one(5), one(6)] == pytest.approx([1.0, 0.0], abs=1e-12)


def test_optimizer_step_clips_steps_and_schedules() -> None:
    w = nn.Parameter(torch.tensor([1.0, 1.0]))
    opt = torch.optim.SGD([w], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    skipped = optimizer_step((w * torch.tensor([30.0, 40.0])).sum(), opt, scaler, sched, [w], grad_clip=1.0)
    assert skipped is False
    torch.testing.assert_close(w.detach(), torch.tensor([1 - 0.6, 1 - 0.8]))  # gradient (30, 40) clipped to norm 1
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    optimizer_step((w * torch.tensor([3.0, 4.0])).sum(), opt, scaler, sched, [w], grad_clip=None)
    torch.testing.assert_close(w.detach(), torch.tensor([0.4 - 1.5, 0.2 - 2.0]))  # not clipped, lr 0.5
    # float16 scaling: an inf gradient is a skipped step that leaves the weights as they were
    scaler16 = torch.amp.GradScaler("cpu", init_scale=8.0)
    before = w.detach().clone()
    assert optimizer_step((w * float("inf")).sum(), opt, scaler16, sched, [w], grad_clip=1.0) is True
    assert torch.equal(w.detach(), before) and scaler16.get_scale() == 4.0
    assert optimizer_step(w.sum(), opt, scaler16, sched, [w], grad_clip=None) is False


class _Rows:
    def __init__(self, gts: dict[int, Any]):
        self.gts = gts

    def read_gt(self, i: int) -> Any:
        return self.gts[i]


def test_gt_targets_reads_each_row_once_and_lists_zero_size_boxes() -> None:
    import numpy as np

    gts = {0: (None, GT.numpy(), INFO.numpy()), 1: None, 2: (None, GT[:2].numpy(), INFO[:2].numpy())}
    dets = {100: [([12.0, 22.0, 108.0, 230.0], 0.9, 1), ([0.0, 400.0, 5.0, 405.0], 0.8, 1)]}
    pairs: dict[int, Any] = {}
    zero = gt_targets(_Rows(gts), [0, 1, 2], np.array([100, 101, 102]), dets, 0.5, pairs)
    assert zero == [3] and set(pairs) == {0, 2}
    boxes, idx = pairs[0]
    assert boxes.tolist() == [[12.0, 22.0, 108.0, 230.0]] and idx.tolist() == [0]
    assert pairs[2][0].shape == (0, 4)
    no_dets: dict[int, Any] = {}
    assert gt_targets(_Rows(gts), [0, 2], np.array([100, 101, 102]), None, 0.5, no_dets) == [3]
    assert no_dets == {0: None, 2: None}
