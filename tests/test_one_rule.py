"""One rule of each kind, pinned: the same input gets the same answer wherever it is used.

* detections files: evaluate (and train) and refine read them through ``shared/data/detections.py``,
  so the same malformed file gets the same one-line error from each;
* feature compatibility: evaluate, ``train --resume``, refine / ``RefinePredictor`` and
  ``--reuse-features`` name the same differences (``store.identity.feature_differences``);
* image → encoder input: extract's loader and the predictor feed the encoder the same tensor
  (``model.sam.encoder_input``), the one ``SamPredictor.set_image`` builds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import invoke, make_config, write_config

from boxrefine.shared.data.detections import load_detections
from boxrefine.shared.data.records import DataError
from boxrefine.shared.model.sam import encoder_input
from boxrefine.shared.store.identity import StoreIdentity, feature_differences

GOOD = {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.5}
MALFORMED = {
    "nan_box": [GOOD, {**GOOD, "bbox": [1, 2, math.nan, 3]}],
    "inf_sum": [{**GOOD, "bbox": [1e308, 2, 1e308, 3]}],
    "negative": [{**GOOD, "bbox": [1, 2, -3, 3]}],
    "short_box": [{**GOOD, "bbox": [1, 2, 3]}],
    "nan_score": [{**GOOD, "score": math.nan}],
    "category": [{**GOOD, "category_id": "cat"}],
    "no_image": [{"bbox": [1, 2, 3, 3]}],
    "not_object": [GOOD, 7],
    "not_list": {"x": 1},
}


def _error(fn, path: Path) -> str:
    with pytest.raises(DataError) as e:
        fn(path)
    return str(e.value)


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_detections_file_gets_one_error_everywhere(tmp_path: Path, case: str) -> None:
    from boxrefine.extract.refine.inputs import load_detection_entries

    path = tmp_path / f"{case}.json"
    path.write_text(json.dumps(MALFORMED[case]))  # json writes NaN as detectors do
    evaluate, refine = _error(load_detections, path), _error(load_detection_entries, path)
    assert evaluate == refine and evaluate.startswith(f"{path}: ") and "\n" not in evaluate


def test_detections_read_the_same_way_by_evaluate_and_refine(tmp_path: Path) -> None:
    """String ids and file names are image references for refine; evaluate scores against COCO's
    integer ids and says so for anything else. A missing score is an error for AP unless
    ``missing_score`` gives one, None for refine."""
    from boxrefine.extract.refine.inputs import load_detection_entries

    path = tmp_path / "d.json"
    path.write_text(json.dumps([{**GOOD, "image_id": 3.0}, {"image_id": 4, "bbox": [0, 0, 1, 1]}]))
    assert _error(load_detections, path).endswith(f"{path}: [1] (image_id 4): no score; AP ranks detections by "
                                                 "score: add one to every entry, or set evaluate.missing_score (e.g. "
                                                 "--missing-score 1.0)")
    assert load_detections(path, missing_score=1.0) == {3: [([10.0, 10.0, 30.0, 30.0], 0.5, 1)],
                                                        4: [([0.0, 0.0, 1.0, 1.0], 1.0, -1)]}
    entries = load_detection_entries(path)
    assert [(d.image_id, d.score, d.box) for d in entries] == [(3, 0.5, (10.0, 10.0, 30.0, 30.0)),
                                                               (4, None, (0.0, 0.0, 1.0, 1.0))]
    named = tmp_path / "named.json"
    named.write_text(json.dumps([{**GOOD, "image_id": "plate"}]))
    assert load_detection_entries(named)[0].image_id == "plate"
    assert "image_id must be an integer (the COCO image id)" in _error(load_detections, named)


def _identity(**changes) -> StoreIdentity:
    base = dict(model_type="vit_tiny", checkpoint="random-init:seed=0", img_size=1024, pixel_mean=(1.0, 2.0, 3.0),
                pixel_std=(1.0, 1.0, 1.0), dtype="float16", encoder_precision="float32", gt_mask_size=256,
                intensity="percentile:0.5-99.5")
    return StoreIdentity(**{**base, **changes})


def test_feature_compatibility_is_one_rule_naming_both_values() -> None:
    have, want = _identity(dtype="float32"), _identity()
    assert feature_differences(have, want, ("checkpoint", "store")) == ["dtype: checkpoint 'float32', store 'float16'"]
    assert feature_differences(have.to_dict(), want, ("checkpoint", "store")) == \
        feature_differences(have, want.to_dict(), ("checkpoint", "store"))
    assert feature_differences(_identity(gt_mask_size=128), want, ("a", "b")) == []  # GT only, not the features


def test_evaluate_resume_and_refine_name_the_same_difference(demo_root: Path, reference_store: Path,
                                                             tmp_path: Path) -> None:
    """A checkpoint whose features were stored in another dtype: evaluate, ``train --resume`` and
    refine each refuse it naming ``dtype`` with both values."""
    from boxrefine.evaluate.checkpoints import load_refiner
    from boxrefine.shared.model.checkpoint import checkpoint_bytes, load_checkpoint
    from boxrefine.shared.store.feature_store import open_store
    from boxrefine.train.recipe import TrainError, run_train

    cfg = make_config(demo_root, reference_store, refiner={"use_mask": False, "hidden": 32},
                      train={"runs_dir": str(tmp_path / "runs"), "epochs": 1, "name": "r", "num_workers": 0,
                             "boxes_per_image": 2})
    run = run_train(cfg).run_dir
    ck = load_checkpoint(run / "last.pt")
    ck["store_identity"] = {**ck["store_identity"], "dtype": "bfloat16"}
    ck.pop("checksum")
    (run / "last.pt").write_bytes(checkpoint_bytes(ck))
    wanted = "dtype: checkpoint 'bfloat16', store 'float16'"
    with pytest.raises(Exception) as e:
        load_refiner(run / "last.pt", open_store(str(reference_store)), torch.device("cpu"))
    assert wanted in str(e.value)
    with pytest.raises(TrainError) as e:
        run_train(cfg, resume=run)
    assert wanted in str(e.value)
    cfg_path = write_config(tmp_path / "cfg.yaml", demo_root, reference_store)
    res, text = invoke("refine", "--config", str(cfg_path), "--checkpoint", str(run / "last.pt"), "--split", "val",
                       "--out", str(tmp_path / "out.json"))
    assert res.exit_code == 1 and "dtype: checkpoint 'bfloat16', config 'float16'" in text


def test_extract_and_the_predictor_feed_the_encoder_the_same_input(demo_root: Path, tmp_path: Path,
                                                                   monkeypatch) -> None:
    from segment_anything_hq.utils.transforms import ResizeLongestSide

    from boxrefine.extract.loader import ImageJobs
    from boxrefine.extract.plan import Job
    from boxrefine.shared.data.imageio import read_rgb
    from boxrefine.shared.data.records import load_coco, resolve_image

    recs = load_coco(demo_root / "annotations" / "instances_val.json")
    rec = recs.images[0]
    path = resolve_image(demo_root / "images" / "val", rec.file_name)
    rgb = read_rgb(path)
    want = torch.from_numpy(ResizeLongestSide(1024).apply_image(rgb)).permute(2, 0, 1)  # SamPredictor.set_image
    assert torch.equal(encoder_input(rgb), want) and encoder_input(rgb).dtype == torch.uint8
    item = ImageJobs([Job(0, rec, path, gt_only=False)], 256)[0]
    assert torch.equal(item["image"], want)

    import boxrefine.shared.scoring.predictor as pr
    from boxrefine.shared.data.intensity import Intensity

    class Seen(Exception):
        pass

    def spy(sam, images, precision):
        raise Seen(images)

    monkeypatch.setattr(pr, "encode", spy)
    predictor = object.__new__(pr.RefinePredictor)  # only what encode_images reads before the encoder
    predictor.intensity, predictor._sam = Intensity(), object()
    predictor.identity = _identity()
    with pytest.raises(Seen) as e:
        predictor.encode_images([rgb])
    assert torch.equal(e.value.args[0][0][0], want)
