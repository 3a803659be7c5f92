"""The refiner demonstrably learns: on a small *signal store* (a copy of a demo store whose image
embeddings carry the GT, ``shared/dev/signal.py``) it beats the coarse boxes clearly at two learning
rates a factor 3 apart with most hidden units alive, and on the plain random-init store the checkpoint
that evaluate and refine use (best.pt, the best validated epoch) does no harm.

Thresholds are the issue's; the margins were measured with the default side head over train seeds 0
and 1 (DEVELOPERS.md, "Does the refiner learn?"): refined − coarse +0.168…+0.180 (≥ 0.06 asked),
Acc@0.75 ×5.0…5.3 (×2 asked), 100 % of the hidden units active (≥ 50 % asked). On the plain store
the final epoch can be worse than coarse (−0.025 and −0.002: the head memorises the random features of
8 training images); the check is on best.pt, validated every 5 epochs, as a user gets it (+0.003,
+0.004). The earlier box head
(``refiner.head: box``) passes the signal cases with less margin (+0.08…+0.095).

This test asks only whether the recipe learns; its margins tolerate a head that reads a strip
backwards or moves a side the wrong way. The head's geometry (which features each side's strip reads,
in which direction, where each side moves) is pinned exactly by fast unit tests,
``tests/test_heads_geometry.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_config

pytestmark = pytest.mark.slow

EPOCHS = 30
# The test's signal store writes the GT at gain 30 (the bench uses the 3). With 8 training
# images at gain 3 the head memorises the random channels instead: refined 0.627 (lr 1e-3) and 0.620
# (3e-3) vs coarse 0.633 after 20 epochs, 0.629 after 35 of 40.
SIGNAL_GAIN = 30.0
# refined val mean IoU must beat coarse by this much on the signal store, and Acc@0.75 at least double
MIN_IOU_GAIN, MIN_ACC75_RATIO = 0.06, 2.0
MIN_ACTIVE_UNITS = 0.5  # share of hidden units that fire in the last epoch
MAX_PLAIN_LOSS = 0.02  # on the plain random-init store: refined (best.pt) ≥ coarse − this


@pytest.fixture(scope="module")
def learning_stores(sam, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """8 train / 8 val demo images, their random-init store and its signal copy (the same data as
    ``bench/refiner_learning.py --num-train 8 --num-val 8``)."""
    from boxrefine.extract.run import run_extract
    from boxrefine.shared.dev.demo import generate_demo
    from boxrefine.shared.dev.signal import make_signal_store

    root = tmp_path_factory.mktemp("learning")
    generate_demo(root / "data", num_train=8, num_val=8, seed=0)
    plain = root / "features.zarr"
    run_extract(make_config(root / "data", plain), model=sam, announce=False)
    signal = root / "signal.zarr"
    make_signal_store(str(plain), str(signal), SIGNAL_GAIN)
    return root / "data", plain, signal


def _train(data: Path, store: Path, runs: Path, lr: float, eval_every: int = EPOCHS) -> tuple[list[dict], dict]:
    """(validations, last epoch entry) of a short run with the default head, use_mask off."""
    from boxrefine.train.recipe import run_train

    cfg = make_config(data, store, refiner={"use_mask": False},
                      train={"runs_dir": str(runs), "name": "run", "epochs": EPOCHS, "lr": lr, "batch_images": 2,
                             "boxes_per_image": 8, "eval_every": eval_every, "keep_top_k": 0, "num_workers": 0})
    res = run_train(cfg)
    lines = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x["kind"] == "eval"], [x for x in lines if x["kind"] == "epoch"][-1]


@pytest.mark.parametrize("lr", [1e-3, 3e-3])
def test_refiner_learns_on_a_signal_store(learning_stores, tmp_path: Path, lr: float) -> None:
    data, _, signal = learning_stores
    evals, last = _train(data, signal, tmp_path, lr)
    ev = evals[-1]
    coarse, refined = ev["coarse"], ev["refined"]
    summary = (f"lr {lr:g}: coarse {coarse['mean_iou']:.3f} / {coarse['acc@0.75']:.3f}, refined "
               f"{refined['mean_iou']:.3f} / {refined['acc@0.75']:.3f}, active {last['head_active_units']:.2f}")
    assert refined["mean_iou"] >= coarse["mean_iou"] + MIN_IOU_GAIN, summary
    assert refined["acc@0.75"] >= MIN_ACC75_RATIO * coarse["acc@0.75"], summary
    assert last["head_active_units"] >= MIN_ACTIVE_UNITS and last["head_collapsed"] is None, summary


def test_refiner_does_no_harm_on_the_plain_store(learning_stores, tmp_path: Path) -> None:
    data, plain, _ = learning_stores
    evals, last = _train(data, plain, tmp_path, 1e-3, eval_every=5)
    best = max(evals, key=lambda x: x["refined"]["mean_iou"])  # what best.pt holds
    assert len(evals) == EPOCHS // 5 and (tmp_path / "run" / "best.pt").exists()
    assert best["refined"]["mean_iou"] >= best["coarse"]["mean_iou"] - MAX_PLAIN_LOSS, evals
    assert last["head_collapsed"] is None, last
