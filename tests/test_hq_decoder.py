"""``SamHeads.forward`` (``shared/model/hq_decoder.py``) against the package's ``MaskDecoderHQ.forward``
(``bench/package_decoder.py``).

vit_tiny heads with random weights; random features for several images; boxes of every kind (the
whole frame, at the edges, small, large). Tolerances are relative to the logits' scale: the two
differ by float rounding only (~1e-6 of the scale measured), while a decoder one halo pixel short, or
regions one pixel short of what the refiner reads, differ by far more (``test_tolerance_catches``).
"""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import REPO

from boxrefine.shared.model import hq_decoder
from boxrefine.shared.model.heads import build_refiner
from boxrefine.shared.model.refiner import HEADS
from boxrefine.shared.model.sam import INTERM_CHANNELS, build_sam_heads

sys.path.insert(0, str(REPO / "bench"))
from package_decoder import package_decode  # noqa: E402  (the reference: the package's decoder, unchanged)

N_IMAGES, N_BOXES = 3, 4
REL_TOL = 1e-4  # of the largest |logit|; float rounding measured ~1e-6 of it


def _boxes(g: torch.Generator) -> torch.Tensor:
    xy = torch.rand(N_BOXES, 2, generator=g) * 900
    b = torch.cat([xy, xy + torch.rand(N_BOXES, 2, generator=g) * 300 + 8], 1)
    b[0] = torch.tensor([0.0, 0.0, 1024.0, 1024.0])  # the whole frame
    b[1] = torch.tensor([1000.0, 3.0, 1024.0, 60.0])  # a thin box at the corner
    return b


@pytest.fixture(scope="module")
def case() -> dict:
    heads = build_sam_heads("vit_tiny", None, 0, "cpu", announce=False)
    g = torch.Generator().manual_seed(7)
    emb = torch.randn(N_IMAGES, 256, 64, 64, generator=g)
    interm = torch.randn(N_IMAGES, 64, 64, INTERM_CHANNELS["vit_tiny"], generator=g)
    boxes = [_boxes(g) for _ in range(N_IMAGES)]
    with torch.no_grad():
        ref = [package_decode(heads, emb[b:b + 1], interm[b:b + 1], boxes[b]) for b in range(N_IMAGES)]
    refiners = {}
    for head in HEADS:
        refiner = build_refiner(INTERM_CHANNELS["vit_tiny"], head=head)
        last = refiner.mlp[-1] if head == "box" else refiner.sides.score[-1]
        # zero-initialised: make it read (the side head's scores need more to move a side by pixels)
        torch.nn.init.normal_(last.weight, std=0.01 if head == "box" else 1.0, generator=g)
        refiners[head] = refiner.eval()
    return {"heads": heads, "emb": emb, "interm": interm, "boxes": boxes, "refiners": refiners,
            "all": torch.cat(boxes), "index": torch.cat([torch.full((N_BOXES,), b) for b in range(N_IMAGES)]),
            "logits": torch.cat([r[0] for r in ref]), "iou": torch.cat([r[1] for r in ref])}


def _inside(regions: list[tuple[int, int, int, int]], shape: torch.Size) -> torch.Tensor:
    m = torch.zeros(shape, dtype=torch.bool)
    for k, (x0, y0, x1, y1) in enumerate(regions):
        m[k, :, y0:y1, x0:x1] = True
    return m


def _max_rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max())


def test_whole_masks_match_the_package(case):
    """No regions: every logit and IoU prediction, boxes of several images in one call."""
    with torch.no_grad():
        logits, iou = case["heads"](case["emb"], case["interm"], case["all"], case["index"])
    assert logits.shape == case["logits"].shape
    assert _max_rel(logits, case["logits"]) < REL_TOL
    assert _max_rel(iou, case["iou"]) < REL_TOL
    with torch.no_grad():  # one image, no image_index: the default
        one, _ = case["heads"](case["emb"][1:2], case["interm"][1:2], case["boxes"][1])
    assert _max_rel(one, case["logits"][N_BOXES:2 * N_BOXES]) < REL_TOL


def test_regions_match_inside_and_are_zero_outside(case):
    regions = case["refiners"]["box"].mask_regions(case["all"])
    regions[2] = (10, 20, 11, 21)  # a single pixel
    with torch.no_grad():
        logits, _ = case["heads"](case["emb"], case["interm"], case["all"], case["index"], regions)
    inside = _inside(regions, logits.shape)
    assert (logits[~inside] == 0).all()
    assert float((logits - case["logits"])[inside].abs().max() / case["logits"].abs().max()) < REL_TOL


def _refined(case, head: str, logits: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return case["refiners"][head](case["emb"], case["interm"], case["boxes"], logits)


def _read_outside(case, head: str, regions: list[tuple[int, int, int, int]]) -> float:
    """The largest |d refined / d logit| outside ``regions``: what the refiner reads there."""
    logits = case["logits"].clone().requires_grad_(True)
    refined = case["refiners"][head](case["emb"], case["interm"], case["boxes"], logits)
    (grad,) = torch.autograd.grad(refined.sum(), logits)
    return float(grad[~_inside(regions, grad.shape)].abs().max())


@pytest.mark.parametrize("head", HEADS)
def test_refiner_reads_only_its_regions(case, head: str):
    """``mask_regions`` covers every logit the refiner reads (zero gradient outside), so it gives the
    same boxes from region-only logits as from whole masks; the masks do matter (zero logits move
    its boxes by more than a pixel). Regions two pixels short miss some of what it reads."""
    regions = case["refiners"][head].mask_regions(case["all"])
    assert _read_outside(case, head, regions) == 0
    with torch.no_grad():
        logits, _ = case["heads"](case["emb"], case["interm"], case["all"], case["index"], regions)
    full = _refined(case, head, case["logits"])
    assert (full - _refined(case, head, torch.zeros_like(logits))).abs().max() > 1.0
    assert (_refined(case, head, logits) - full).abs().max() < 1e-3  # px, boxes of hundreds of px
    short = [(x0 + 2, y0 + 2, x1 - 2, y1 - 2) if x0 > 0 and y0 > 0 else (x0, y0, x1, y1)
             for x0, y0, x1, y1 in regions]
    assert _read_outside(case, head, short) > 0


def test_tolerance_catches(case, monkeypatch):
    """The checks above fail for a decoder one halo pixel short (regions two pixels short: above)."""
    regions = case["refiners"]["box"].mask_regions(case["all"])
    monkeypatch.setattr(hq_decoder, "HALO", 1)
    with torch.no_grad():
        logits, _ = case["heads"](case["emb"], case["interm"], case["all"], case["index"], regions)
    inside = _inside(regions, logits.shape)
    assert float((logits - case["logits"])[inside].abs().max() / case["logits"].abs().max()) > 10 * REL_TOL
