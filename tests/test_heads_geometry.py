"""The refiner heads' geometry, fast and exact: which features each side's strip reads and in
which direction, where each side moves, the box head's RoI and geometry inputs, the mask regions the
decoder computes, and the loss. The learning test (tests/test_learning.py) only asks whether the recipe
learns; a head that reads a strip backwards must fail here."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from boxrefine.shared.model.box_head import BoxHeadRefiner
from boxrefine.shared.model.heads import build_refiner
from boxrefine.shared.model.refiner import BoxRefiner, ordered, refine_loss
from boxrefine.shared.model.side_head import STRIP_DROPOUT, SideHead, dropout_keep, side_strips, strip_features

BOX = torch.tensor([[320.0, 352.0, 640.0, 608.0]])  # x0, y0, x1, y1 (input px): w 320, h 256


def _ramps(size: int = 64) -> torch.Tensor:
    """1×2×size×size: channel 0 holds each pixel's column, channel 1 its row (RoIAlign, aligned, reads
    ``coordinate - 0.5`` at a point)."""
    cols = torch.arange(size, dtype=torch.float32).expand(size, size)
    return torch.stack([cols, cols.t()])[None]


@pytest.mark.parametrize("reach,along", [(0.25, 15), (0.5, 9)])
def test_strips_run_from_inside_the_box_outwards_on_every_side(reach: float, along: int) -> None:
    """Position k of each strip lies at ``(k·step − reach)`` box sizes outside its coarse side: the left and
    top strips read decreasing x / y, the right and bottom strips increasing; across, each spans the box."""
    across, scale = 5, 1 / 16
    xs, ys, step = side_strips(BOX, reach, across, along)
    assert step == pytest.approx(2 * reach / (along - 1))
    f = strip_features(_ramps(), torch.tensor([0]), xs, ys, scale, across, along)
    assert f.shape == (4, 2, across, along)
    x0, y0, x1, y1 = BOX[0].tolist()
    w, h = x1 - x0, y1 - y0
    u = torch.arange(along) * step - reach  # outwards from the side, in box sizes
    along_x = {0: x0 - u * w, 1: x1 + u * w}  # left strip moves to smaller x, right to larger
    along_y = {2: y0 - u * h, 3: y1 + u * h}
    for side, coord in {**along_x, **along_y}.items():
        channel = 0 if side in along_x else 1
        got = f[side, channel].mean(0)  # the coordinate read at each position along the normal
        torch.testing.assert_close(got, coord * scale - 0.5, atol=1e-4, rtol=0)
    # across the strip: from the box's top to bottom (x strips) and left to right (y strips)
    bin_centres_y = y0 + (torch.arange(across) + 0.5) * h / across
    bin_centres_x = x0 + (torch.arange(across) + 0.5) * w / across
    for side in (0, 1):
        torch.testing.assert_close(f[side, 1].mean(1), bin_centres_y * scale - 0.5, atol=1e-4, rtol=0)
    for side in (2, 3):
        torch.testing.assert_close(f[side, 0].mean(1), bin_centres_x * scale - 0.5, atol=1e-4, rtol=0)

def _pass_channel_0(refiner: BoxRefiner, interm: bool = False) -> None:
    """Projections that pass channel 0 of the embedding (and of the HQ feature) to their channel 0 and
    nothing else: what the head reads is then the test's own pattern."""
    with torch.no_grad():
        for p in [*refiner.proj_emb.parameters(), *refiner.proj_interm.parameters()]:
            p.zero_()
        refiner.proj_emb.weight[0, 0] = 1.0
        if interm:
            refiner.proj_interm.weight[0, 0] = 1.0



def test_strips_of_several_boxes_keep_their_order_and_images() -> None:
    """(4n) strips: left of every box, then right, top, bottom; each box read from its own image."""
    boxes = torch.tensor([[320.0, 352.0, 640.0, 608.0], [100.0, 200.0, 300.0, 260.0]])
    ramps = _ramps()
    fmap = torch.cat([ramps, ramps + 1000.0])  # image 1 reads 1000 more
    xs, ys, step = side_strips(boxes, 0.25, 3, 7)
    f = strip_features(fmap, torch.tensor([0, 1]), xs, ys, 1 / 16, 3, 7)
    assert f.shape == (8, 2, 3, 7)
    single = [strip_features(fmap[i:i + 1], torch.tensor([0]), *side_strips(boxes[i:i + 1], 0.25, 3, 7)[:2],
                             1 / 16, 3, 7) for i in range(2)]
    for side in range(4):
        for i in range(2):
            torch.testing.assert_close(f[2 * side + i], single[i][side])
    assert float(f[1].min()) > 900 and float(f[0].max()) < 100


def test_side_head_soft_argmax_is_the_mean_position_of_the_weights() -> None:
    """The head's offset is Σ p_k·u_k (u_k = (k − c)·step, positive outwards): exactly 0 for uniform
    weights, ±c·step when one end takes all the weight, and linear in between."""
    positions, step = 7, 0.1
    head = SideHead(4, 8, positions)
    head.trunk = nn.Identity()
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                           [-50.0, -50.0, -50.0, -50.0, -50.0, -50.0, 50.0],
                           [50.0, -50.0, -50.0, -50.0, -50.0, -50.0, -50.0],
                           [-50.0, -50.0, -50.0, -50.0, 50.0, 50.0, -50.0],
                           [-50.0, 50.0, -50.0, -50.0, -50.0, -50.0, -50.0]])

    class Fixed(nn.Module):
        def forward(self, profile: torch.Tensor) -> torch.Tensor:
            return logits[:, None]

    head.score = Fixed()
    out = head(torch.zeros(5, 4, 3, positions), step)
    torch.testing.assert_close(out, torch.tensor([0.0, 3 * step, -3 * step, 1.5 * step, -2 * step]),
                               atol=1e-6, rtol=0)


def test_side_head_training_dropout_scales_the_kept_channels() -> None:
    """``keep`` zeroes the dropped channels and divides the kept ones by 1 − STRIP_DROPOUT."""
    head = SideHead(2, 8, 5)
    seen = []

    class Spy(nn.Module):
        def forward(self, strips: torch.Tensor) -> torch.Tensor:
            seen.append(strips.clone())
            return torch.zeros(len(strips), 8, strips.shape[2], strips.shape[3])

    head.trunk = Spy()
    strips = torch.ones(4, 2, 3, 5)
    keep = torch.tensor([[True, False]] * 4)
    head(strips, 0.1, keep)
    assert torch.equal(seen[0][:, 0], torch.full((4, 3, 5), 1 / (1 - STRIP_DROPOUT)))
    assert torch.equal(seen[0][:, 1], torch.zeros(4, 3, 5))
    head(strips, 0.1, None)
    assert torch.equal(seen[1], strips)


def test_dropout_keep_draws_per_image_in_strip_order() -> None:
    """(4N)×C: each image's draw from its own generator, laid out side by side like the strips."""
    gens = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    keep = dropout_keep([2, 1], 16, gens)
    assert keep.shape == (12, 16) and keep.dtype == torch.bool
    a = torch.rand((4, 2, 16), generator=torch.Generator().manual_seed(5)) >= STRIP_DROPOUT
    b = torch.rand((4, 1, 16), generator=torch.Generator().manual_seed(6)) >= STRIP_DROPOUT
    assert torch.equal(keep, torch.cat([a, b], 1).reshape(-1, 16))
    assert 0.2 < keep.float().mean() < 0.8


def _edge_refiner(head: str = "sides", context: float = 1.5) -> BoxRefiner:
    """A side refiner that reads embedding channel 0 and scores each position by it (× 50): every side
    moves to the strongest value of channel 0 near it."""
    refiner = build_refiner(8, roi_size=7, hidden=8, context=context, use_mask=False, head=head).eval()
    _pass_channel_0(refiner)
    refiner.sides.trunk = nn.Identity()

    class Channel0(nn.Module):
        def forward(self, profile: torch.Tensor) -> torch.Tensor:
            return 50.0 * profile[:, :1]

    refiner.sides.score = Channel0()
    return refiner


def test_each_side_moves_to_the_edge_beside_it() -> None:
    """Lines in the embedding 40 px outside the left and right sides and the top side and 40 px inside the
    bottom side: every side moves onto its own line (a strip read backwards would move it 40 px the
    other way, a swapped side would follow the other side's line)."""
    refiner = _edge_refiner()
    emb = torch.zeros(1, 256, 64, 64)
    x0, y0, x1, y1 = BOX[0].tolist()  # 320, 352, 640, 608
    left, right, top, bottom = x0 - 40, x1 + 40, y0 - 40, y1 - 40  # 280, 680, 312, 568: embedding cell centres
    for v in (left, right):
        emb[0, 0, :, int(v // 16)] = 1.0
    for v in (top, bottom):
        emb[0, 0, int(v // 16), :] = 1.0
    with torch.no_grad():
        out = refiner(emb, torch.zeros(1, 64, 64, 8), [BOX.clone()])
    torch.testing.assert_close(out, torch.tensor([[left, top, right, bottom]]), atol=5.0, rtol=0)


def test_side_moves_are_in_box_sizes_of_their_own_axis() -> None:
    """The same relative edge on a wide and on a tall box: each side moves by its own box size."""
    refiner = _edge_refiner()
    box = torch.tensor([[320.0, 160.0, 480.0, 800.0]])  # w 160, h 640
    emb = torch.zeros(1, 256, 64, 64)
    emb[0, 0, :, int((480 + 24) // 16)] = 1.0  # 24 px (0.15 w) right of the right side
    emb[0, 0, int((800 + 88) // 16), :] = 1.0  # 88 px (0.1375 h) below the bottom side
    with torch.no_grad():
        out = refiner(emb, torch.zeros(1, 64, 64, 8), [box])
    assert abs(float(out[0, 2]) - 504.0) <= 3.0 and abs(float(out[0, 3]) - 888.0) <= 6.0
    assert float(out[0, 0]) == pytest.approx(320.0) and float(out[0, 1]) == pytest.approx(160.0)  # nothing there


def test_reach_and_read_factor_follow_the_context() -> None:
    refiner = build_refiner(8, roi_size=7, hidden=8, context=2.0, use_mask=False, head="sides")
    reach, step = refiner.reach()
    assert reach == pytest.approx(0.5) and step == pytest.approx(1 / 14)
    assert refiner.read_factor() == pytest.approx(1 + 2 * (0.5 + 1 / 28))
    box = build_refiner(8, roi_size=7, hidden=8, context=2.5, use_mask=False, head="box")
    assert box.read_factor() == 2.5


def test_mask_regions_cover_what_roi_align_reads_and_no_more() -> None:
    """Low-res pixels (exclusive ends) of the box scaled by the read factor, shifted by half a pixel,
    widened by 1 before and 2 after (the bilinear neighbours and one to spare), clipped to 0..256."""
    refiner = build_refiner(8, roi_size=7, hidden=8, context=2.0, use_mask=True, head="box")  # factor 2.0
    boxes = torch.tensor([[400.0, 400.0, 480.0, 440.0], [0.0, 0.0, 1024.0, 1024.0]])
    # box 0: ×2 about (440, 420) → 360..520 × 380..460 → /4 − 0.5 → 89.5..129.5 × 94.5..114.5
    assert refiner.mask_regions(boxes) == [(88, 93, 132, 117), (0, 0, 256, 256)]
    with pytest.raises(ValueError, match="mask logits"):
        refiner(torch.zeros(1, 256, 64, 64), torch.zeros(1, 64, 64, 8), [boxes[:1]])


def test_box_head_reads_its_context_and_the_box_geometry() -> None:
    """The box head's RoI is the box scaled by ``context`` about its centre, and its geometry input is
    (centre / 1024, size / 1024, log aspect)."""
    refiner = BoxHeadRefiner(8, roi_size=3, hidden=8, context=2.0, use_mask=False).eval()
    seen = {}

    def spy(module: nn.Module, args: tuple) -> None:
        seen["x"] = args[0].clone()

    refiner.mlp.register_forward_pre_hook(spy)
    box = torch.tensor([[100.0, 200.0, 300.0, 320.0]])  # w 200, h 120 (no coordinate equals another)
    _pass_channel_0(refiner)
    emb = _ramps()[:, :1].expand(1, 256, 64, 64).contiguous()  # channel 0: the column
    refiner(emb, torch.zeros(1, 64, 64, 8), [box])
    geom = seen["x"][0, -5:]
    torch.testing.assert_close(geom, torch.tensor([200 / 1024, 260 / 1024, 200 / 1024, 120 / 1024,
                                                   float(torch.log(torch.tensor(200 / 120)))]), atol=1e-6, rtol=0)
    # the RoI: context 2 → x 0..400; what the convs see is the column ramp sampled there
    roi = {}
    refiner.convs.register_forward_pre_hook(lambda m, a: roi.setdefault("x", a[0].clone()))
    refiner(emb, torch.zeros(1, 64, 64, 8), [box])
    cols = roi["x"][0, 0].mean(0)  # projected channel 0 = the column, per RoI bin along x
    torch.testing.assert_close(cols, (torch.tensor([1, 3, 5]) * 400 / 6) / 16 - 0.5, atol=1e-4, rtol=0)


def test_box_head_deltas_are_in_units_of_the_box() -> None:
    """A last layer that outputs (0.1, −0.2, 0.3, 0.5): sides move by those shares of w, h, w, h."""
    refiner = BoxHeadRefiner(8, roi_size=3, hidden=8, context=1.5, use_mask=False).eval()
    with torch.no_grad():
        refiner.mlp[-1].bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.5]))
    box = torch.tensor([[100.0, 200.0, 300.0, 300.0]])
    out = refiner(torch.randn(1, 256, 64, 64), torch.randn(1, 64, 64, 8), [box])
    torch.testing.assert_close(out, torch.tensor([[120.0, 180.0, 360.0, 350.0]]), atol=1e-4, rtol=0)
    assert len(BoxHeadRefiner(8, norm="none").mlp) == 3 and len(BoxHeadRefiner(8).mlp) == 4


def test_refiner_orders_corners_and_keeps_empty_input() -> None:
    torch.testing.assert_close(ordered(torch.tensor([[5.0, 1.0, 2.0, 4.0]])), torch.tensor([[2.0, 1.0, 5.0, 4.0]]))
    refiner = build_refiner(8, hidden=8, use_mask=False, head="sides")
    out = refiner(torch.zeros(1, 256, 64, 64), torch.zeros(1, 64, 64, 8), [torch.zeros((0, 4))])
    assert out.shape == (0, 4)


def test_refine_loss_is_size_normalised_l1_plus_giou() -> None:
    coarse = torch.tensor([[0.0, 0.0, 100.0, 50.0]])
    target = torch.tensor([[10.0, 0.0, 100.0, 50.0]])
    loss, terms = refine_loss(coarse, target, coarse)
    assert terms["l1"] == pytest.approx(10 / 100 / 4)  # one side off by 10 px of a 100 px wide box
    assert terms["giou"] == pytest.approx(1 - 0.9)
    assert float(loss) == pytest.approx(terms["l1"] + terms["giou"])
    loss2, _ = refine_loss(coarse, target, coarse, l1_weight=2.0, giou_weight=0.5)
    assert float(loss2) == pytest.approx(2 * terms["l1"] + 0.5 * terms["giou"])
    tiny = torch.tensor([[0.0, 0.0, 0.5, 0.5]])  # sizes below 1 px count as 1
    _, t = refine_loss(tiny + 1, tiny, tiny)
    assert t["l1"] == pytest.approx(1.0)
    # two boxes: each normalised by its own size, the terms averaged
    pair = torch.cat([coarse, torch.tensor([[0.0, 0.0, 10.0, 20.0]])])
    _, t2 = refine_loss(pair, torch.cat([target, torch.tensor([[0.0, 0.0, 10.0, 22.0]])]), pair)
    assert t2["l1"] == pytest.approx((10 / 100 / 4 + 2 / 20 / 4) / 2)


def test_heads_default_to_the_documented_sizes_and_name_their_health_modules() -> None:
    """``roi_size`` 7, ``hidden`` 64, ``context`` 1.5, mask logits read (docs/architecture.md); head health
    watches each head's hidden ReLU and its N×4 corrections."""
    from boxrefine.shared.model.side_head import SideRefiner

    for cls in (SideRefiner, BoxHeadRefiner):
        r = cls(8)
        assert (r.roi_size, r.hidden_units, r.context, r.use_mask) == (7, 64, 1.5, True), cls
        assert r.in_channels == 128 + 64 + 1
    side = SideRefiner(8)
    relu, out = side.health_modules()
    assert isinstance(relu, nn.ReLU) and relu is side.sides.score[2] and out is side.side_deltas
    assert side.sides.positions == 15 and side.sides.score[0].out_channels == 64
    for norm in ("layer", "none"):
        box = BoxHeadRefiner(8, norm=norm)
        relu, last = box.health_modules()
        assert isinstance(relu, nn.ReLU) and isinstance(last, nn.Linear) and last.out_features == 4
    with pytest.raises(ValueError):
        dropout_keep([1, 2], 4, [torch.Generator()])  # one generator per image, no fewer


def test_the_three_inputs_are_sampled_at_the_same_place() -> None:
    """The embedding and the HQ feature (16 px a cell) and the mask logits (4 px a pixel, through
    tanh(x / 4)) are read at the same input-frame points."""
    refiner = BoxHeadRefiner(1, roi_size=3, hidden=8, context=1.0, use_mask=True).eval()
    _pass_channel_0(refiner, interm=True)
    seen = {}
    refiner.convs.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].clone()))
    box = torch.tensor([[96.0, 160.0, 288.0, 352.0]])  # 192 px square: bins 64 px, centres 128, 192, 256 (x)
    emb = _ramps()[:, :1].expand(1, 256, 64, 64).contiguous()  # column ramp, 16 px a cell
    interm = _ramps()[:, 1:].permute(0, 2, 3, 1).contiguous()  # row ramp, B×H×W×C
    logits = (torch.arange(256, dtype=torch.float32).expand(256, 256) * 0.01)[None, None]  # column ramp, 4 px
    refiner(emb, interm, [box], logits)
    x = seen["x"][0]  # 193 channels: 128 projected embedding, 64 projected interm, the mask
    centres_x, centres_y = torch.tensor([128.0, 192.0, 256.0]), torch.tensor([192.0, 256.0, 320.0])
    torch.testing.assert_close(x[0].mean(0), centres_x / 16 - 0.5, atol=1e-4, rtol=0)
    torch.testing.assert_close(x[128].mean(1), centres_y / 16 - 0.5, atol=1e-4, rtol=0)
    torch.testing.assert_close(x[192].mean(0), torch.tanh((centres_x / 4 - 0.5) * 0.01 / 4), atol=1e-5, rtol=0)
    assert x.shape[0] == 193


def test_strips_and_moves_of_boxes_under_one_pixel_use_one_pixel() -> None:
    tiny = torch.tensor([[100.0, 200.0, 100.5, 200.25]])
    xs, ys, step = side_strips(tiny, 0.25, 3, 7)
    half = 0.25 + step / 2
    torch.testing.assert_close(xs[0], torch.tensor([100.0 - half, 200.0, 100.0 + half, 200.25]))
    torch.testing.assert_close(ys[1], torch.tensor([100.0, 200.25 - half, 100.5, 200.25 + half]))
    refiner = BoxHeadRefiner(8, roi_size=3, hidden=8, use_mask=False).eval()
    with torch.no_grad():
        refiner.mlp[-1].bias.copy_(torch.tensor([0.5, 0.5, 1.0, 1.0]))
    out = refiner(torch.zeros(1, 256, 64, 64), torch.zeros(1, 64, 64, 8), [tiny])
    torch.testing.assert_close(out, torch.tensor([[100.5, 200.5, 101.5, 201.25]]))


def test_refine_loss_normalises_by_the_coarse_size_wherever_the_box_is() -> None:
    coarse = torch.tensor([[100.0, 200.0, 200.0, 250.0]])  # 100 × 50, away from the origin
    target = coarse + torch.tensor([0.0, 10.0, 0.0, 0.0])
    _, terms = refine_loss(coarse, target, coarse)
    assert terms["l1"] == pytest.approx(10 / 50 / 4)


def test_rois_are_read_with_two_aligned_samples_per_bin() -> None:
    """RoIAlign as ``mask_regions`` assumes it (aligned, 2×2 samples per bin): on a random map the strips
    and the box head's RoIs equal torchvision's ``roi_align`` with exactly those settings."""
    from torchvision.ops import roi_align

    from boxrefine.shared.geometry.boxes import expand_boxes

    g = torch.Generator().manual_seed(0)
    fmap = torch.randn(1, 3, 64, 64, generator=g)
    box = torch.tensor([[301.0, 207.0, 517.0, 389.0]])
    xs, ys, _ = side_strips(box, 0.25, 5, 9)
    f = strip_features(fmap, torch.tensor([0]), xs, ys, 1 / 16, 5, 9)
    idx = torch.zeros(2, 1)
    want_x = roi_align(fmap, torch.cat([idx, xs], 1), (5, 9), 1 / 16, 2, True)
    want_y = roi_align(fmap, torch.cat([idx, ys], 1), (9, 5), 1 / 16, 2, True).transpose(2, 3)
    torch.testing.assert_close(f, torch.cat([want_x[:1].flip(-1), want_x[1:], want_y[:1].flip(-1), want_y[1:]]))

    refiner = BoxHeadRefiner(3, roi_size=3, hidden=8, context=1.5, use_mask=True).eval()
    _pass_channel_0(refiner, interm=True)
    seen = {}
    refiner.convs.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].clone()))
    emb = torch.randn(1, 256, 64, 64, generator=g)
    interm = torch.randn(1, 64, 64, 3, generator=g)
    logits = torch.randn(1, 1, 256, 256, generator=g) * 8
    refiner(emb, interm, [box], logits)
    roi = torch.cat([torch.zeros(1, 1), expand_boxes(box, 1.5)], 1)
    x = seen["x"][0]
    torch.testing.assert_close(x[0], roi_align(emb[:, :1], roi, 3, 1 / 16, 2, True)[0, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(x[128], roi_align(interm.permute(0, 3, 1, 2)[:, :1], roi, 3, 1 / 16, 2, True)[0, 0],
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(x[192], torch.tanh(roi_align(logits, roi, 3, 1 / 4, 2, True)[0, 0] / 4),
                               atol=1e-5, rtol=0)


def test_mask_regions_of_a_box_outside_the_frame_are_empty() -> None:
    refiner = build_refiner(8, roi_size=7, hidden=8, context=2.0, use_mask=True, head="box")
    assert refiner.mask_regions(torch.tensor([[-100.0, -100.0, -60.0, -60.0]])) == [(0, 0, 0, 0)]
    assert refiner.mask_regions(torch.tensor([[2000.0, 2000.0, 2100.0, 2100.0]])) == [(256, 256, 256, 256)]
