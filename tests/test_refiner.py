"""The refiner head on its own: untrained it returns the coarse boxes, HeadHealth sees dead units, and
the signal-store channels hold the GT they claim to."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from boxrefine.shared.dev.signal import oracle_boxes, signal_channels
from boxrefine.shared.model.box_head import NORMS
from boxrefine.shared.model.heads import build_refiner
from boxrefine.train.health import HeadHealth, head_collapse


def _inputs(n_img: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn((n_img, 256, 64, 64), generator=g)
    interm = torch.randn((n_img, 64, 64, 160), generator=g)
    boxes = []
    for _ in range(n_img):
        xy = torch.rand((5, 2), generator=g) * 700
        wh = 20 + torch.rand((5, 2), generator=g) * 300
        boxes.append(torch.cat([xy, xy + wh], 1))
    return emb, interm, boxes


@pytest.mark.parametrize("head,norm", [("box", n) for n in NORMS] + [("sides", "layer")])
@pytest.mark.parametrize("roi_size,context", [(7, 1.5), (14, 2.0), (5, 3.0)])
def test_untrained_refiner_returns_the_coarse_boxes(head: str, norm: str, roi_size: int, context: float) -> None:
    torch.manual_seed(0)
    refiner = build_refiner(160, roi_size=roi_size, hidden=32, context=context, use_mask=False, norm=norm, head=head)
    emb, interm, boxes = _inputs()
    with torch.no_grad():
        out = refiner(emb, interm, boxes)
    assert torch.equal(out, torch.cat(boxes))


def test_unknown_norm_or_head_refused() -> None:
    with pytest.raises(ValueError, match="norm must be one of"):
        build_refiner(160, norm="batch")
    with pytest.raises(ValueError, match="head must be one of"):
        build_refiner(160, head="mlp")


def test_side_head_moves_each_side_along_its_own_normal() -> None:
    """Scores that pick the outermost position move every side outwards by ``reach`` box sizes (left and
    top decrease, right and bottom increase); the innermost, inwards by as much."""
    refiner = build_refiner(160, roi_size=7, hidden=32, context=2.0, use_mask=False, head="sides")
    emb, interm, boxes = _inputs()
    coarse = torch.cat(boxes)
    size = (coarse[:, 2:] - coarse[:, :2]).repeat(1, 2)
    outward = torch.tensor([-1.0, -1.0, 1.0, 1.0])

    class Pick(torch.nn.Module):  # stands in for the scoring layers: one position wins
        def __init__(self, position: int):
            super().__init__()
            self.position = position

        def forward(self, profile: torch.Tensor) -> torch.Tensor:
            logits = torch.full((len(profile), 1, profile.shape[-1]), -30.0)
            logits[..., self.position] = 30.0
            return logits

    for position, sign in ((-1, 1.0), (0, -1.0)):
        refiner.sides.score = Pick(position)
        with torch.no_grad():
            out = refiner(emb, interm, boxes)
        assert torch.allclose((out - coarse) / size, sign * 0.5 * outward, atol=1e-4)


def test_head_health_counts_units_and_corrections() -> None:
    torch.manual_seed(0)
    refiner = build_refiner(160, hidden=32, use_mask=False, head="box")
    torch.nn.init.normal_(refiner.mlp[3].weight, std=0.1)
    emb, interm, boxes = _inputs()
    with torch.no_grad(), HeadHealth(refiner) as health:
        refiner(emb, interm, boxes)
    h = health.summary()
    assert 0.5 < h["active_units"] <= 1.0 and 0.0 < h["firing"] < 1.0  # LayerNorm: about half fire per box
    assert h["delta_abs"] > 0 and h["delta_spread"] > 0
    assert head_collapse(h) is None
    # the hooks are gone after the block, and the counts survive a round trip through state()
    refiner(emb, interm, boxes)
    again = HeadHealth(refiner, health.state())
    assert again.summary() == pytest.approx(h)

    # kill every hidden unit: refined = coarse + constant, which the health check names
    with torch.no_grad():
        refiner.mlp[1].bias.fill_(-10.0)
        refiner.mlp[3].bias.fill_(0.05)
    with torch.no_grad(), HeadHealth(refiner) as dead:
        refiner(emb, interm, boxes)
    d = dead.summary()
    assert d["active_units"] == 0.0 and d["delta_spread"] < 1e-6 and d["delta_abs"] == pytest.approx(0.05)
    assert "dead ReLUs" in head_collapse(d)
    assert "coarse + constant" in head_collapse({**h, "delta_spread": 0.0})
    # a head that has hardly moved the boxes yet (its first steps from zero) is not collapsed
    assert head_collapse({**h, "delta_spread": 0.0, "delta_abs": 5e-4}) is None
    assert head_collapse({}) is None


def test_side_head_dropout_is_drawn_per_image() -> None:
    """Training-time dropout draws each image's mask from that image's generator: an image gives the
    same boxes alone as beside another (what makes a DDP rank's part of a batch train like one process)."""
    refiner = build_refiner(160, hidden=32, use_mask=False, head="sides").train()
    torch.nn.init.normal_(refiner.sides.score[-1].weight, std=1.0)
    emb, interm, boxes = _inputs()

    def gen(k: int) -> torch.Generator:
        return torch.Generator().manual_seed(k)

    both = refiner(emb, interm, boxes, generators=[gen(1), gen(2)])
    alone = refiner(emb[1:], interm[1:], boxes[1:], generators=[gen(2)])
    assert torch.equal(both[len(boxes[0]):], alone)
    other = refiner(emb[1:], interm[1:], boxes[1:], generators=[gen(3)])
    assert not torch.equal(alone, other)  # the mask does depend on the draw


def test_head_health_watches_the_side_head() -> None:
    """The side head's hidden units are per box (any side, any position) and its corrections N×4."""
    torch.manual_seed(0)
    refiner = build_refiner(160, hidden=32, use_mask=False, head="sides")
    torch.nn.init.normal_(refiner.sides.score[-1].weight, std=0.1)
    emb, interm, boxes = _inputs()
    with torch.no_grad(), HeadHealth(refiner) as health:
        refiner(emb, interm, boxes)
    h = health.summary()
    assert health.n == 10 and 0.5 < h["active_units"] <= 1.0 and 0.0 < h["firing"] <= 1.0
    assert h["delta_abs"] > 0 and h["delta_spread"] > 0 and head_collapse(h) is None
    with torch.no_grad():
        refiner.sides.score[1].bias.fill_(-10.0)  # the norm before the hidden ReLU: every unit dead
    with torch.no_grad(), HeadHealth(refiner) as dead:
        refiner(emb, interm, boxes)
    assert dead.summary()["active_units"] == 0.0 and "dead ReLUs" in head_collapse(dead.summary())


def test_signal_channels_hold_union_boundary_and_instances() -> None:
    masks = np.zeros((2, 256, 256), np.uint8)
    masks[0, 0:64, 0:64] = 1  # 16×16 embedding cells, exactly
    masks[1, 128:130, 200:256] = 1  # a thin strip: half of one cell row
    ch = signal_channels(masks, gain=3.0)
    assert ch.shape == (4, 64, 64)
    assert torch.allclose(ch[2, :16, :16], torch.full((16, 16), 3.0)) and float(ch[2, 16:].abs().sum()) == 0.0
    assert torch.allclose(ch[3, 32, 50:64], torch.full((14,), 1.5))
    assert torch.allclose(ch[0], torch.maximum(ch[2], ch[3]))  # disjoint masks: union = max
    # boundary: only the border ring of the square (its inside cells are 0), the whole strip
    assert float(ch[1, 5, 5]) == 0.0 and float(ch[1, 0, 0]) > 0 and float(ch[1, 15, 15]) > 0
    assert torch.allclose(ch[1, 32, 51:63], ch[3, 32, 51:63])
    assert signal_channels(np.zeros((0, 256, 256), np.uint8)).shape == (2, 64, 64)


def test_oracle_reads_each_box_from_its_own_channel() -> None:
    masks = np.zeros((2, 256, 256), np.uint8)
    masks[0, 16:48, 20:60] = 1  # input px: y 64..192, x 80..240
    masks[1, 100:140, 100:180] = 1
    emb = torch.zeros((256, 64, 64))
    ch = signal_channels(masks)
    emb[:len(ch)] = ch
    coarse = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3)
    out = oracle_boxes(emb, torch.tensor([1, 0, -1]), coarse, gain=3.0)
    assert out[1].tolist() == [80.0, 64.0, 240.0, 192.0]
    assert out[0].tolist() == [400.0, 400.0, 720.0, 560.0]
    assert out[2].tolist() == coarse[2].tolist()  # no GT: the coarse box


def test_signal_store_is_a_verified_copy_with_the_gt_in_its_embeddings(reference_store, tmp_path) -> None:
    """The copy passes `store verify` (each rewritten row is committed with its new digests) and its
    first channels are the GT's; the source is untouched."""
    from boxrefine.shared.dev.signal import SIGNAL_ATTR, make_signal_store
    from boxrefine.shared.store.feature_store import open_store
    from boxrefine.shared.store.verify import verify_store

    dst = tmp_path / "signal.zarr"
    summary = make_signal_store(str(reference_store), str(dst))
    assert summary["train"]["rows"] == 4 and summary["val"]["rows"] == 1
    sig, src = open_store(str(dst)), open_store(str(reference_store))
    assert sig.group.attrs[SIGNAL_ATTR]["gain"] == 3.0
    report = verify_store(sig)
    assert report.checked == 5 and not report.damaged
    sp, sp0 = sig.split("train"), src.split("train")
    masks, _, _ = sp.read_gt(0)
    emb, interm = sp.read_features(0)
    emb0, interm0 = sp0.read_features(0)
    ch = signal_channels(masks)
    assert torch.allclose(emb[:len(ch)].float(), ch, atol=0.02)
    assert torch.equal(emb[len(ch):], emb0[len(ch):]) and torch.equal(interm, interm0)


def test_checkpoint_from_before_the_norm_option_rebuilds_the_head_it_holds(tmp_path) -> None:
    """refiner_args without ``norm`` or ``head`` (checkpoints written before they existed) name the box
    head without a norm, whose state-dict keys are unchanged; the rebuilt head gives the same boxes."""
    from boxrefine.shared.model.checkpoint import refiner_from_checkpoint

    torch.manual_seed(0)
    old = build_refiner(160, hidden=32, use_mask=False, norm="none", head="box")
    assert sorted(k for k in old.state_dict() if k.startswith("mlp")) == [
        "mlp.0.bias", "mlp.0.weight", "mlp.2.bias", "mlp.2.weight"]
    torch.nn.init.normal_(old.mlp[-1].weight, std=0.01)
    args = {"interm_channels": 160, "roi_size": 7, "hidden": 32, "context": 1.5, "use_mask": False}
    rebuilt = refiner_from_checkpoint({"refiner": old.state_dict(), "refiner_args": args}, tmp_path / "old.pt")
    assert rebuilt.head == "box"  # and without ``head``: the box head, the only one there was
    emb, interm, boxes = _inputs()
    with torch.no_grad():
        assert torch.equal(rebuilt(emb, interm, boxes), old.eval()(emb, interm, boxes))
