"""Box maths and the frame maps at their exact values (``shared/geometry/``): the noisy-box model
draw by draw, clipping at every side, context boxes, pixel-tight mask boxes, which GT may be a target,
paired IoU in chunks, the per-axis scale between frames and the low-res valid region. Tiny tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from boxrefine.shared.geometry.boxes import (
    clip_boxes,
    expand_boxes,
    jitter_boxes,
    mask_boxes,
    paired_iou,
    trainable_gt,
    xyxy_to_xywh,
)
from boxrefine.shared.geometry.frames import (
    EMBED_STRIDE,
    IMG_SIZE,
    LOWRES,
    LOWRES_STRIDE,
    ImageGeometry,
    _integrate,
    input_shape,
)


def test_jitter_is_the_noisy_box_model_draw_by_draw() -> None:
    """u = U(-r, r) per box and coordinate (4 draws, float64, in order): centre + (u0·w, u1·h), size ×
    (1 + u2, 1 + u3), then clipped to the image."""
    boxes = torch.tensor([[100.0, 200.0, 300.0, 260.0], [10.0, 20.0, 50.0, 100.0]])
    r = 0.3
    got = jitter_boxes(boxes, r, (480, 640), torch.Generator().manual_seed(7))
    u = (torch.rand((2, 4), generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 2 - 1) * r
    u = u.float()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2 + u[:, 0] * w, (boxes[:, 1] + boxes[:, 3]) / 2 + u[:, 1] * h
    nw, nh = w * (1 + u[:, 2]), h * (1 + u[:, 3])
    want = torch.stack([cx - nw / 2, cy - nh / 2, cx + nw / 2, cy + nh / 2], -1).clamp(min=0)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (u.abs() > 0.03).all()  # every draw moves something: a dropped term would show
    empty = torch.zeros((0, 4))
    assert jitter_boxes(empty, r, (480, 640), torch.Generator()) is empty


def test_jitter_spans_the_whole_range_on_both_sides() -> None:
    boxes = torch.tensor([[400.0, 400.0, 600.0, 500.0]]).repeat(2000, 1)
    out = jitter_boxes(boxes, 0.2, (2000, 2000), torch.Generator().manual_seed(0))
    w, h = out[:, 2] - out[:, 0], out[:, 3] - out[:, 1]
    for rel in ((out[:, 0] + out[:, 2]) / 2 / 200 - 2.5, (out[:, 1] + out[:, 3]) / 2 / 100 - 4.5,
                w / 200 - 1, h / 100 - 1):
        assert -0.2 - 1e-4 <= float(rel.min()) < -0.18 and 0.18 < float(rel.max()) <= 0.2 + 1e-4
        assert abs(float(rel.mean())) < 0.02


def test_clip_keeps_boxes_inside_and_at_least_min_size_on_every_side() -> None:
    hw = (100, 200)  # H, W
    boxes = torch.tensor([[-10.0, -5.0, 50.0, 60.0],  # left and top outside
                          [150.0, 40.0, 250.0, 130.0],  # right and bottom outside
                          [199.5, 99.8, 300.0, 400.0],  # starts at the far edges
                          [30.0, 30.0, 30.2, 30.1],  # thinner than min_size
                          [-50.0, -50.0, -40.0, -45.0]])  # wholly outside
    got = clip_boxes(boxes, hw)
    want = torch.tensor([[0.0, 0.0, 50.0, 60.0], [150.0, 40.0, 200.0, 100.0], [199.0, 99.0, 200.0, 100.0],
                         [30.0, 30.0, 31.0, 31.0], [0.0, 0.0, 1.0, 1.0]])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(clip_boxes(boxes[3:4], hw, min_size=4.0), torch.tensor([[30.0, 30.0, 34.0, 34.0]]))
    torch.testing.assert_close(clip_boxes(boxes[:2][None], hw)[0], want[:2])  # any leading shape
    # min_size 0: a box ending inside the first pixel keeps its end
    torch.testing.assert_close(clip_boxes(torch.tensor([[-5.0, -5.0, 0.5, 0.25]]), hw, min_size=0.0),
                               torch.tensor([[0.0, 0.0, 0.5, 0.25]]))
    geo = ImageGeometry.of(100, 200)
    torch.testing.assert_close(geo.clip_original(boxes), want)


def test_expand_scales_about_the_centre() -> None:
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    torch.testing.assert_close(expand_boxes(boxes, 1.5), torch.tensor([[5.0, 10.0, 35.0, 70.0]]))
    torch.testing.assert_close(expand_boxes(boxes, 1.0), boxes)
    torch.testing.assert_close(expand_boxes(torch.cat([boxes, boxes + 100]), 3.0),
                               torch.tensor([[-10.0, -20.0, 50.0, 100.0], [90.0, 80.0, 150.0, 200.0]]))


def test_xywh_and_paired_iou_in_chunks() -> None:
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 25.0]])
    b = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [100.0, 100.0, 110.0, 110.0]])
    torch.testing.assert_close(xyxy_to_xywh(a), torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0],
                                                              [5.0, 5.0, 10.0, 20.0]]))
    want = torch.tensor([1.0, 50 / 150, 0.0])
    torch.testing.assert_close(paired_iou(a, b), want)
    torch.testing.assert_close(paired_iou(a, b, chunk=2), want)  # pairs across a chunk border
    torch.testing.assert_close(paired_iou(a.double(), b.half(), chunk=1), want)
    big = torch.rand(5000, 2) * 100
    big = torch.cat([big, big + 10], 1)
    torch.testing.assert_close(paired_iou(big, big), torch.ones(5000))
    empty = paired_iou(torch.zeros((0, 4)), torch.zeros((0, 4)))
    assert empty.shape == (0,) and empty.dtype == torch.float32


def test_mask_boxes_are_pixel_tight_with_a_fallback_for_empty_masks() -> None:
    masks = torch.zeros(3, 8, 10, dtype=torch.bool)
    masks[0, 2:5, 3:6] = True  # rows 2..4, columns 3..5
    masks[2, 7, 9] = True  # the last pixel
    fallback = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    out = mask_boxes(masks, fallback)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[3.0, 2.0, 6.0, 5.0], [1.0, 2.0, 3.0, 4.0], [9.0, 7.0, 10.0, 8.0]]))
    assert fallback[0].tolist() == [0.0, 0.0, 1.0, 1.0]  # not changed in place
    none = mask_boxes(torch.zeros(2, 4, 4, dtype=torch.bool), fallback[:2])
    torch.testing.assert_close(none, fallback[:2].float())


def test_trainable_gt_needs_no_crowd_and_positive_width_and_height() -> None:
    boxes = torch.tensor([[0.0, 0.0, 5.0, 5.0], [0.0, 0.0, 5.0, 5.0], [3.0, 0.0, 3.0, 5.0], [0.0, 4.0, 5.0, 4.0],
                          [2.0, 0.0, 1.0, 5.0], [0.0, 3.0, 5.0, 2.0], [0.0, 0.0, 0.5, 0.5]])
    info = torch.tensor([[1, 1, 0], [2, 1, 1], [3, 1, 0], [4, 1, 0], [5, 1, 0], [6, 1, 0], [7, 1, 0]])
    assert trainable_gt(boxes, info).tolist() == [True, False, False, False, False, False, True]
    empty = trainable_gt(torch.zeros((0, 4)), torch.zeros((0, 3), dtype=torch.int64))
    assert empty.shape == (0,) and empty.dtype == torch.bool
    assert trainable_gt(boxes[:1], info[:1]).tolist() == [True]  # one instance is not none


def test_frame_constants() -> None:
    """docs/architecture.md, "Frames": input 1024, embedding 64×64 (16 px a cell), low-res 256 (4 px)."""
    assert (IMG_SIZE, LOWRES, LOWRES_STRIDE, EMBED_STRIDE) == (1024, 256, 4, 16)
    assert IMG_SIZE // EMBED_STRIDE == 64 and isinstance(LOWRES_STRIDE, int)


@pytest.mark.parametrize("hw,input_hw,valid", [((333, 500), (682, 1024), (171, 256)),
                                                ((500, 333), (1024, 682), (256, 171)),
                                                ((1024, 1024), (1024, 1024), (256, 256)),
                                                ((10, 4000), (3, 1024), (1, 256)),
                                                ((2048, 1536), (1024, 768), (256, 192))])
def test_input_shape_scales_and_valid_region(hw, input_hw, valid) -> None:
    geo = ImageGeometry.of(*hw)
    assert input_shape(*hw) == input_hw and geo.input_hw == input_hw and geo.orig_hw == hw
    assert geo.lowres_valid == valid
    assert geo.lowres_valid_at(64) == tuple(-(-v // 4) for v in (input_hw[0] // 4 + (input_hw[0] % 4 > 0),
                                                                  input_hw[1] // 4 + (input_hw[1] % 4 > 0)))
    assert geo.lowres_valid_at(1024) == input_hw


def test_boxes_map_by_a_separate_scale_per_axis() -> None:
    geo = ImageGeometry((300, 400), (768, 1024))  # sx = 2.56, sy = 2.56
    odd = ImageGeometry((333, 500), (682, 1024))  # sx = 2.048, sy = 2.048048...
    box = torch.tensor([[10.0, 20.0, 110.0, 220.0]])
    torch.testing.assert_close(geo.boxes_to_input(box), box * 2.56)
    sx, sy = 1024 / 500, 682 / 333
    torch.testing.assert_close(odd.boxes_to_input(box), box * torch.tensor([sx, sy, sx, sy]))
    skew = ImageGeometry((100, 100), (50, 200))  # x ×2, y ×0.5: catches a swapped axis
    torch.testing.assert_close(skew.boxes_to_input(box), torch.tensor([[20.0, 10.0, 220.0, 110.0]]))
    torch.testing.assert_close(skew.boxes_to_original(torch.tensor([[20.0, 10.0, 220.0, 110.0]])), box)
    assert skew.boxes_to_input(box.double()).dtype == torch.float64


def test_integrate_is_exact_on_fractional_edges_and_zero_outside() -> None:
    a = np.array([[1.0, 2.0, 3.0, 4.0]])
    got = _integrate(a, np.array([0.0, 0.5, 2.25, 4.0, 5.0]), axis=1)
    np.testing.assert_allclose(got, [[0.5, 0.5 + 2.0 + 0.75, 0.75 * 3 + 4.0, 0.0]])
    col = _integrate(a.T, np.array([-1.0, 1.0, 3.5]), axis=0)
    np.testing.assert_allclose(col, [[1.0], [2.0 + 3.0 + 2.0]])


def test_masks_to_lowres_thresholds_the_covered_share_at_one_half() -> None:
    """A 1024×1024 image (input = original): one low-res pixel is 4×4 px; it is set where ≥ 8 of its 16
    pixels are covered."""
    geo = ImageGeometry.of(1024, 1024)
    m = np.zeros((3, 1024, 1024), np.uint8)
    m[0, 0:4, 0:2] = 1  # 8 of 16: set
    m[1, 0:4, 0:1] = 1
    m[1, 0:3, 1:2] = 1  # 7 of 16: not set
    m[2, 8:12, 12:16] = 1  # a whole pixel at row 2, column 3
    low = geo.masks_to_lowres(m)
    assert low.dtype == np.uint8 and low.shape == (3, 256, 256)
    assert low[0].sum() == 1 and low[0, 0, 0] == 1
    assert low[1].sum() == 0
    assert low[2].sum() == 1 and low[2, 2, 3] == 1
    half = ImageGeometry.of(512, 256)  # input 1024×512: one low-res pixel is 2×2 original px
    m2 = np.zeros((1, 512, 256), np.uint8)
    m2[0, 10:12, 20:22] = 1
    low2 = half.masks_to_lowres(m2)
    assert low2[0].sum() == 1 and low2[0, 5, 10] == 1 and half.lowres_valid == (256, 128)


def test_lowres_boxes_use_the_fallback_only_for_empty_masks() -> None:
    geo = ImageGeometry.of(1024, 1024)
    logits = torch.full((2, 256, 256), -5.0)
    logits[0, 10:20, 30:40] = 5.0
    fallback = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    out = geo.lowres_to_boxes(logits, fallback)
    assert out[1].tolist() == [5.0, 6.0, 7.0, 8.0]
    assert abs(out[0, 0] - 120) <= 2 and abs(out[0, 1] - 40) <= 2 and abs(out[0, 2] - 160) <= 2
    assert abs(out[0, 3] - 80) <= 2
    none = geo.lowres_to_boxes(torch.zeros((0, 256, 256)), torch.zeros((0, 4), dtype=torch.float64))
    assert none.shape == (0, 4) and none.dtype == torch.float32
    # logit 0 is not the mask (SAM thresholds > 0): a zero background leaves the box tight
    logits[0][logits[0] < 0] = 0.0
    zero_bg = geo.lowres_to_boxes(logits[:1], fallback[:1])
    assert (zero_bg - torch.tensor([[120.0, 40.0, 160.0, 80.0]])).abs().max() <= 3
    # any positive logit is the mask, a weak one too
    weak = geo.lowres_to_boxes(logits[:1] * 0.1, fallback[:1])
    assert (weak - torch.tensor([[120.0, 40.0, 160.0, 80.0]])).abs().max() <= 3


def test_an_image_geometry_is_an_immutable_value() -> None:
    import dataclasses

    geo = ImageGeometry.of(333, 500)
    assert geo == ImageGeometry((333, 500), (682, 1024)) and hash(geo) == hash(ImageGeometry.of(333, 500))
    with pytest.raises(dataclasses.FrozenInstanceError):
        geo.orig_hw = (1, 1)  # type: ignore[misc]


def test_xywh_of_a_single_box_and_integrals_along_an_axis_of_one_cell() -> None:
    assert xyxy_to_xywh(torch.tensor([1.0, 2.0, 4.0, 6.0])).tolist() == [1.0, 2.0, 3.0, 4.0]
    got = _integrate(np.array([[2.0, 3.0, 4.0]]), np.array([0.0, 0.5, 1.0]), axis=0)
    np.testing.assert_allclose(got, [[1.0, 1.5, 2.0], [1.0, 1.5, 2.0]])
