"""One geometry for every frame, checked against HQ-SAM's own code (``ResizeLongestSide`` and
``Sam.postprocess_masks``), never against itself."""

from __future__ import annotations

import types

import cv2
import numpy as np
import pytest
import torch
from segment_anything_hq.modeling.sam import Sam
from segment_anything_hq.utils.transforms import ResizeLongestSide

from boxrefine.shared.geometry.frames import ImageGeometry, input_shape

_SAM = types.SimpleNamespace(image_encoder=types.SimpleNamespace(img_size=1024))  # what postprocess_masks reads


def sam_postprocess(lowres: torch.Tensor, geo: ImageGeometry) -> torch.Tensor:
    """The package's own ``Sam.postprocess_masks`` (n×256×256 → n×H×W)."""
    return Sam.postprocess_masks(_SAM, lowres[:, None].float(), geo.input_hw, geo.orig_hw)[:, 0]


def test_input_shape_matches_hq_sam() -> None:
    sizes = [1, 2, 3, 7, 100, 255, 256, 257, 333, 480, 511, 512, 513, 640, 1000, 1023, 1024, 1025, 1999, 4032]
    for long_side in (16, 256, 1024):
        for h in sizes:
            for w in sizes:
                assert input_shape(h, w, long_side) == ResizeLongestSide.get_preprocess_shape(h, w, long_side)


def test_boxes_map_like_apply_boxes_and_back() -> None:
    rng = np.random.default_rng(0)
    for h, w in ((333, 500), (500, 333), (17, 1000), (1024, 1024), (4032, 3024)):
        geo = ImageGeometry.of(h, w)
        boxes = rng.uniform(0, min(h, w), (5, 4)).astype(np.float32)
        want = ResizeLongestSide(1024).apply_boxes(boxes, (h, w))
        got = geo.boxes_to_input(torch.from_numpy(boxes))
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
        np.testing.assert_allclose(geo.boxes_to_original(got).numpy(), boxes, rtol=1e-5, atol=1e-3)


def test_lowres_to_original_is_sam_postprocess() -> None:
    geo = ImageGeometry.of(333, 500)
    logits = torch.randn(3, 256, 256)
    torch.testing.assert_close(geo.lowres_to_original(logits[:, None])[:, 0], sam_postprocess(logits, geo))


def _random_objects(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """Ellipses, rectangles and hexagon-ish polygons, ≥ 32 px across, in landscape, portrait and odd-sized
    images (200–1000 px a side)."""
    out = []
    for _ in range(n):
        h, w = int(rng.integers(200, 1000)), int(rng.integers(200, 1000))
        m = np.zeros((h, w), np.uint8)
        side = rng.uniform(32, min(h, w) * 0.6)
        cx, cy = rng.uniform(side / 2, w - side / 2), rng.uniform(side / 2, h - side / 2)
        kind = int(rng.integers(3))
        if kind == 0:
            cv2.ellipse(m, (int(cx), int(cy)), (int(side / 2), int(side / 2 * rng.uniform(0.5, 1))),
                        float(rng.uniform(0, 180)), 0, 360, 1, -1)
        elif kind == 1:
            m[int(cy - side / 2 * rng.uniform(0.5, 1)):int(cy + side / 2), int(cx - side / 2):int(cx + side / 2)] = 1
        else:
            ang = np.linspace(0, 2 * np.pi, 7)[:-1]
            r = side / 2 * rng.uniform(0.6, 1, 6)
            cv2.fillPoly(m, [np.stack([cx + r * np.cos(ang), cy + r * np.sin(ang)], 1).astype(np.int32)], 1)
        out.append(m)
    return out


def test_lowres_gt_is_what_sam_postprocess_inverts() -> None:
    """Stored-frame GT taken back to the original size by SAM's postprocess_masks: high IoU with the
    original masks and no centroid shift. (On this set, cv2 INTER_NEAREST straight to the 256 frame, the
    old layout, gives mean IoU 0.945 and a shift of +0.50 / +0.51 low-res px; the exact layout 0.976 and
    -0.003 / -0.018.)"""
    ious, dx, dy = [], [], []
    for m in _random_objects(np.random.default_rng(0), 150):
        geo = ImageGeometry.of(*m.shape)
        low = geo.masks_to_lowres(m[None])
        assert low.shape == (1, 256, 256) and low.dtype == np.uint8
        rows, cols = geo.lowres_valid
        assert not low[0, rows:].any() and not low[0, :, cols:].any(), "nothing in the padding"
        back = (sam_postprocess(torch.from_numpy(low).float() - 0.5, geo) > 0)[0].numpy()
        fg = m > 0
        ious.append((back & fg).sum() / (back | fg).sum())
        to_lowres = geo.input_hw[1] / geo.orig_hw[1] / 4
        (y0, x0), (y1, x1) = (np.argwhere(fg).mean(0), np.argwhere(back).mean(0))
        dx.append((x1 - x0) * to_lowres)
        dy.append((y1 - y0) * to_lowres)
    assert np.mean(ious) >= 0.97, np.mean(ious)
    assert abs(np.mean(dx)) < 0.15 and abs(np.mean(dy)) < 0.15, (np.mean(dx), np.mean(dy))


def test_lowres_gt_of_no_instances_and_other_sizes() -> None:
    geo = ImageGeometry.of(40, 60)
    assert geo.masks_to_lowres(np.zeros((0, 40, 60), np.uint8)).shape == (0, 256, 256)
    full = geo.masks_to_lowres(np.ones((1, 40, 60), np.uint8), size=64)
    rows, cols = geo.lowres_valid_at(64)
    assert (rows, cols) == (43, 64) and full[0, :rows - 1, :cols].all() and not full[0, rows:].any()


def test_valid_region_is_fractional_aware() -> None:
    """333×500: the input is 682×1024, i.e. 170.5 low-res rows; the half row holds image content."""
    geo = ImageGeometry.of(333, 500)
    assert geo.input_hw == (682, 1024) and geo.lowres_valid == (171, 256)


@pytest.mark.parametrize("hw", [(333, 500), (640, 480)])
def test_padding_is_never_scored(hw: tuple[int, int]) -> None:
    """A prediction that is perfect inside the valid region and noise in the padding: mask IoU 1.0,
    and a zero-shot box equal to the GT box within 4 input px."""
    from boxrefine.shared.scoring.predict import _mask_iou

    geo = ImageGeometry.of(*hw)
    h, w = hw
    m = np.zeros((1, h, w), np.uint8)
    m[0, h // 3: h // 3 + h // 4, w // 4: w // 4 + w // 3] = 1
    gt = torch.from_numpy(geo.masks_to_lowres(m))
    rows, cols = geo.lowres_valid
    logits = torch.where(gt[:, None].bool(), 5.0, -5.0).float()
    noise = torch.rand(1, 1, 256, 256, generator=torch.Generator().manual_seed(0)) > 0.5
    pad = torch.ones(256, 256, dtype=torch.bool)
    pad[:rows, :cols] = False
    logits[:, :, pad] = torch.where(noise[:, :, pad], 5.0, -5.0)
    assert float(_mask_iou(logits, gt, torch.tensor([0]), geo)[0]) == 1.0
    box = geo.lowres_to_boxes(logits[:, 0], torch.zeros(1, 4))
    ys, xs = np.nonzero(m[0])
    want = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
    assert (geo.boxes_to_input(geo.clip_original(box)) - geo.boxes_to_input(want)).abs().max() <= 4.0
