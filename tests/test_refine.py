"""``boxrefine refine`` and the Python predictor: the same boxes as evaluate on the demo val split, a
folder of never-extracted images encoded once and cached (a second run does no encoder work), the
predictor equal to the CLI, and bad input as one-line errors or per-box reports.

One refiner with ``use_mask: true`` (so HQ-SAM's real heads are part of every refined box) is trained
once for the module; images are copied from the session demo data (the encoder costs ~2 s each)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import invoke, make_config, one_line_error, write_config
from PIL import Image
from pycocotools import mask as mask_utils

import boxrefine.extract.run as xr
from boxrefine.shared.model.checkpoint import checkpoint_bytes
from boxrefine.shared.scoring.predictor import ImageFeatures, RefineError, RefinePredictor
from boxrefine.shared.store.feature_store import open_store


@pytest.fixture(scope="module")
def refiner(demo_root: Path, reference_store: Path, tmp_path_factory) -> Path:
    """best.pt of a 1-epoch run with the mask logits as input. Read-only."""
    from boxrefine.train.recipe import run_train

    runs = tmp_path_factory.mktemp("runs")
    cfg = make_config(demo_root, reference_store,
                      train={"runs_dir": str(runs), "epochs": 1, "batch_images": 2, "boxes_per_image": 3,
                             "num_workers": 0, "name": "r"},
                      refiner={"use_mask": True, "hidden": 32})
    return run_train(cfg).run_dir / "best.pt"


@pytest.fixture
def store(reference_store: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "features.zarr"
    shutil.copytree(reference_store, dst)
    return dst


@pytest.fixture
def folder(demo_root: Path, tmp_path: Path) -> Path:
    """Three never-extracted images: a JPEG, an RGBA PNG in a subfolder, and one no detection names."""
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    shutil.copy(demo_root / "images" / "train" / "train_0000.jpg", d / "000042.jpg")
    shutil.copy(demo_root / "images" / "train" / "train_0002.png", d / "sub" / "plate.png")
    shutil.copy(demo_root / "images" / "train" / "train_0001.png", d / "unused.png")
    (d / "notes.txt").write_text("not an image")
    return d


def _cfg(tmp_path: Path, demo_root: Path, store: Path, **sections) -> Path:
    return write_config(tmp_path / "cfg.yaml", demo_root, store, **sections)


def _dets(path: Path, entries: list) -> Path:
    path.write_text(json.dumps(entries))
    return path


FOLDER_DETS = [{"image_id": 42, "category_id": 1, "bbox": [100.0, 100.0, 50.0, 80.0], "score": 0.9},
               {"file_name": "sub/plate.png", "category_id": 2, "bbox": [30.5, 40.0, 60.0, 70.0], "score": 0.7},
               {"image_id": "plate", "category_id": 1, "bbox": [200.0, 150.0, 90.0, 40.0], "score": 0.8}]


def _count_encoder(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = xr.encode

    def spy(model, images, precision="float32"):
        calls.append(len(images))
        return real(model, images, precision)

    monkeypatch.setattr(xr, "encode", spy)
    return calls


# ------------------------------------------------------------------------------------ same boxes as evaluate
def test_val_split_gives_evaluates_refined_boxes(demo_root: Path, store: Path, refiner: Path, tmp_path: Path,
                                                monkeypatch) -> None:
    """The demo val split with its detections file: refine's boxes are exactly the boxes of evaluate's
    refined_val.json for the same checkpoint, from the store (no encoder work), scores and the input
    boxes kept."""
    from boxrefine.evaluate.run import run_evaluate

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(refiner, run / "best.pt")
    run_evaluate(make_config(demo_root, store, train={"num_workers": 0}), run / "best.pt")
    evaluated = json.loads((run / "eval" / "refined_val.json").read_text())

    calls = _count_encoder(monkeypatch)
    cfg = _cfg(tmp_path, demo_root, store)
    out = tmp_path / "refined.json"
    res, text = invoke("refine", "--config", str(cfg), "--checkpoint", str(run), "--split", "val", "--out", str(out))
    assert res.exit_code == 0, text
    assert calls == []
    refined = json.loads(out.read_text())
    dets = json.loads((demo_root / "annotations" / "detections_val.json").read_text())
    assert len(refined) == len(dets) == len(evaluated) == 8
    assert [r["bbox"] for r in refined] == [e["bbox"] for e in evaluated]
    assert [r["bbox_coarse"] for r in refined] == [d["bbox"] for d in dets]
    assert [(r["score"], r["image_id"], r["category_id"]) for r in refined] == \
        [(d["score"], d["image_id"], d["category_id"]) for d in dets]
    assert all(r["refined"] for r in refined) and refined != dets
    assert "8 of 8 boxes refined" in text


# ------------------------------------------------------------------------------------ a folder, cached
def test_folder_encoded_once_then_cached(demo_root: Path, store: Path, refiner: Path, folder: Path,
                                         tmp_path: Path, monkeypatch) -> None:
    """Images never extracted: the ones with detections are encoded into the store (an images-only
    split), the others not at all; a second run does no encoder work (HQ-SAM's image encoder is not
    even built) and writes the same file."""
    dets = _dets(tmp_path / "dets.json", FOLDER_DETS)
    cfg = _cfg(tmp_path, demo_root, store)
    calls = _count_encoder(monkeypatch)
    args = ("refine", "--config", str(cfg), "--checkpoint", str(refiner), "--images", str(folder),
            "--detections", str(dets))
    res, text = invoke(*args, "--vis")
    assert res.exit_code == 0, text
    assert sum(calls) == 2  # 000042.jpg and sub/plate.png; unused.png has no detection
    assert sorted(p.name for p in (tmp_path / "dets.refined_vis").iterdir()) == ["1_000042.png", "2_plate.png"]
    out = tmp_path / "dets.refined.json"
    first = out.read_bytes()
    got = json.loads(first)
    assert [g["refined"] for g in got] == [True, True, True]
    assert [g["bbox_coarse"] for g in got] == [d["bbox"] for d in FOLDER_DETS]
    assert [g["bbox"] for g in got] != [d["bbox"] for d in FOLDER_DETS]

    st = open_store(str(store))
    name = next(s for s in st.splits if s.startswith("refine-photos-"))
    split = st.split(name)
    assert not split.has_ground_truth and split.n_rows == 3 and len(split.complete_indices()) == 2

    calls.clear()
    monkeypatch.setattr(xr, "build_hq_sam", lambda *a, **k: pytest.fail("HQ-SAM with its image encoder built"))
    res, text = invoke(*args)
    assert res.exit_code == 0, text
    assert calls == [] and "no encoder work" in text
    assert out.read_bytes() == first


def test_predictor_gives_the_cli_boxes(demo_root: Path, store: Path, refiner: Path, folder: Path,
                                       tmp_path: Path, monkeypatch) -> None:
    """RefinePredictor.set_image on the decoded pixels, and set_store_row on the cached row, give the
    CLI's boxes; refine returns deltas = refined − given; masks are at the original size."""
    dets = _dets(tmp_path / "dets.json", FOLDER_DETS[1:])
    cfg = _cfg(tmp_path, demo_root, store)
    res, text = invoke("refine", "--config", str(cfg), "--checkpoint", str(refiner), "--images", str(folder),
                       "--detections", str(dets), "--out", str(tmp_path / "out.json"), "--masks")
    assert res.exit_code == 0, text
    cli = json.loads((tmp_path / "out.json").read_text())
    given = np.array([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in FOLDER_DETS[1:])], np.float32)

    predictor = RefinePredictor(refiner, sam_checkpoint=None, device="cpu", announce=False)
    rgba = np.asarray(Image.open(folder / "sub" / "plate.png"))  # what a user has in hand: RGBA, decoded by PIL
    predictor.set_image(rgba)
    boxes, deltas = predictor.refine(given)
    xywh = [[round(float(v), 2) for v in (b[0], b[1], b[2] - b[0], b[3] - b[1])] for b in torch.from_numpy(boxes)]
    assert xywh == [c["bbox"] for c in cli]
    np.testing.assert_allclose(deltas, boxes - given, atol=1e-4)
    masks = predictor.masks(boxes)
    assert masks.shape == (2, *rgba.shape[:2]) and masks.dtype == bool
    for c, m in zip(cli, masks, strict=True):  # --masks: the same masks, as COCO RLE at the original size
        assert np.array_equal(mask_utils.decode({**c["segmentation"], "counts": c["segmentation"]["counts"].encode()}),
                              m.astype(np.uint8))

    from_store = RefinePredictor(refiner, device="cpu", announce=False)
    split = next(s for s in open_store(str(store)).splits if s.startswith("refine-photos-"))
    from_store.set_store_row(str(store), split, "sub/plate.png")
    assert np.array_equal(from_store.refine(given)[0], boxes)

    # the batched form: pixels (encoded here) and cached features mixed, each image's boxes as alone
    cached = ImageFeatures.from_store(str(store), split, "sub/plate.png")
    batch = from_store.refine_batch([rgba, cached], [given, given[:1]])
    np.testing.assert_allclose(batch[0][0], boxes, atol=1e-3)
    np.testing.assert_allclose(batch[1][0], boxes[:1], atol=1e-3)

    seen: list[np.ndarray] = []  # image_format="BGR" (as cv2 reads): the encoder gets RGB
    monkeypatch.setattr(from_store, "encode_images", lambda images: seen.append(images[0]) or [cached])
    from_store.set_image(rgba[..., [2, 1, 0, 3]], image_format="BGR")
    assert np.array_equal(seen[0], rgba)


# ------------------------------------------------------------------------------------ bad input
def test_bad_detection_entries_are_one_line_errors(demo_root: Path, store: Path, refiner: Path,
                                                   tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, demo_root, store)
    good = {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.5}
    cases = {
        "nan": ([good, {**good, "bbox": [1, 2, math.nan, 3]}], r"\[1\] \(image_id 1\): bbox must be \[x, y, w, h\]"),
        "inf": ([{**good, "bbox": [math.inf, 2, 3, 3]}], r"\[0\] \(image_id 1\): bbox must be"),
        "negative": ([{**good, "bbox": [1, 2, -3, 3]}], r"\[0\] \(image_id 1\): bbox has a negative width or height"),
        "score": ([{**good, "score": math.nan}], r"score must be a finite number"),
        "no_image": ([{"bbox": [1, 2, 3, 3]}], r"needs an image_id"),
        "not_list": ({"x": 1}, r"detections must be a COCO results list"),
    }
    for name, (entries, message) in cases.items():
        dets = tmp_path / f"{name}.json"
        dets.write_text(json.dumps(entries))  # json writes NaN / Infinity as detectors do
        res, text = invoke("refine", "--config", str(cfg), "--checkpoint", str(refiner), "--split", "val",
                           "--detections", str(dets))
        assert res.exit_code == 1, (name, text)
        line = next(ln for ln in text.splitlines() if ln.startswith("error:"))
        assert str(dets) in line, (name, text)
        assert re.search(message, line), (name, line)
        assert not (tmp_path / f"{name}.refined.json").exists()

    empty = tmp_path / "empty.json"
    empty.write_text("")
    res, text = invoke("refine", "--config", str(cfg), "--checkpoint", str(refiner), "--split", "val",
                       "--detections", str(empty))
    assert res.exit_code == 1 and f"error: {empty}: empty file" in text


def test_unknown_images_outside_boxes_and_scores_are_passed_through(demo_root: Path, store: Path, refiner: Path,
                                                                    tmp_path: Path, monkeypatch) -> None:
    """Per-box reports: every detection is in the output, in input order; the ones that cannot be
    refined keep their box with refined: false and the reason. Only detections to refine cost work."""
    cfg = _cfg(tmp_path, demo_root, store)
    dets = _dets(tmp_path / "d.json", [
        {"image_id": 1, "category_id": 1, "bbox": [100, 100, 40, 60], "score": 0.9, "id": 7},
        {"image_id": 77, "category_id": 1, "bbox": [100, 100, 40, 60], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [900, 100, 40, 60], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 0, 60], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [120, 80, 40, 60], "score": 0.1},
        {"image_id": 1, "category_id": 1, "bbox": [-20, -20, 80, 60], "score": 0.9},
    ])
    res, text = invoke("refine", "--config", str(cfg), "--checkpoint", str(refiner), "--split", "val",
                       "--detections", str(dets), "--min-score", "0.5")
    assert res.exit_code == 0, text
    out = json.loads((tmp_path / "d.refined.json").read_text())
    assert [o["refined"] for o in out] == [True, False, False, False, False, True]  # a box partly outside: refined
    assert out[0]["id"] == 7 and out[0]["bbox_coarse"] == [100, 100, 40, 60]
    reasons = [o.get("reason") for o in out]
    assert reasons[1].startswith("no such image in ") and reasons[2] == "box lies outside the 600x800 image"
    assert reasons[3] == "zero-size box" and reasons[4] == "score 0.1 below min_score 0.5"
    assert all(o["bbox"] == o["bbox_coarse"] for o in out if not o["refined"])
    for r in reasons[1:5]:
        assert r in text
    x, y, w, h = out[5]["bbox"]
    assert x >= 0 and y >= 0 and x + w <= 600 and y + h <= 800  # refined boxes are clipped to the image

    res, text = invoke("refine", "--config", str(cfg), "--checkpoint", str(refiner), "--split", "val",
                       "--detections", str(dets), "--min-score", "0.5", "--low-score", "drop")
    assert res.exit_code == 0, text
    assert len(json.loads((tmp_path / "d.refined.json").read_text())) == 5 and "dropped below min_score" in text

    # every detection names an unknown image: a one-line error; an empty list: an empty result, no work
    only_unknown = _dets(tmp_path / "u.json", [{"image_id": 5, "bbox": [1, 1, 5, 5], "score": 1}])
    res, text = invoke("refine", "--config", str(cfg), "--checkpoint", str(refiner), "--split", "val",
                       "--detections", str(only_unknown))
    assert res.exit_code == 1 and "none of the 1 detections names an image of" in text and "5" in text
    calls = _count_encoder(monkeypatch)
    res, text = invoke("refine", "--config", str(cfg), "--checkpoint", str(refiner), "--split", "val",
                       "--detections", str(_dets(tmp_path / "none.json", [])))
    assert res.exit_code == 0 and json.loads((tmp_path / "none.refined.json").read_text()) == [] and calls == []


def test_missing_and_unreadable_images_are_reported_and_passed_through(demo_root: Path, store: Path, refiner: Path,
                                                                        tmp_path: Path) -> None:
    """A COCO file listing images without annotations: one image missing, one not an image, one
    truncated (its header reads, its pixels do not: extract marks its row bad). Their detections are
    passed through with the reason; the readable image is refined."""
    d = tmp_path / "imgs"
    d.mkdir()
    jpeg = (demo_root / "images" / "val" / "val_0000.jpg").read_bytes()
    (d / "ok.jpg").write_bytes(jpeg)
    (d / "trunc.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    coco = tmp_path / "images.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "ok.jpg"}, {"id": 2, "file_name": "gone.jpg"},
                                           {"id": 3, "file_name": "broken.png"}, {"id": 4, "file_name": "trunc.jpg"}]}))
    dets = _dets(tmp_path / "d.json", [{"image_id": i, "category_id": 1, "bbox": [50, 60, 40, 30], "score": 1.0}
                                       for i in (1, 2, 3, 4)])
    cfg = _cfg(tmp_path, demo_root, store)
    res, text = invoke("refine", "--config", str(cfg), "--checkpoint", str(refiner), "--images", str(d),
                       "--coco", str(coco), "--detections", str(dets))
    assert res.exit_code == 0, text
    out = json.loads((tmp_path / "d.refined.json").read_text())
    assert [o["refined"] for o in out] == [True, False, False, False]
    assert "gone.jpg: file not found" in out[1]["reason"] and "broken.png" in out[2]["reason"]
    assert "trunc.jpg: truncated JPEG" in out[3]["reason"]
    assert "gone.jpg: file not found" in text and "passed through unrefined: 3 image unreadable" in text


def test_checkpoint_of_another_model_or_mapping_is_refused(demo_root: Path, store: Path, refiner: Path,
                                                           tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, demo_root, store)
    ck = torch.load(refiner, weights_only=True)
    for field, value, shown in (("model_type", "vit_b", "model_type: checkpoint 'vit_b', config 'vit_tiny'"),
                                ("intensity", "none", "intensity: checkpoint 'none', config 'percentile:0.5-99.5'"),
                                ("checkpoint", "random-init:seed=3",
                                 "random-init:seed=3")):
        other = {**ck, "store_identity": {**ck["store_identity"], field: value}}
        path = tmp_path / f"{field}.pt"
        path.write_bytes(checkpoint_bytes(other))
        res, text = invoke("refine", "--config", str(cfg), "--checkpoint", str(path), "--split", "val")
        assert res.exit_code == 1, text
        line = next(ln for ln in text.splitlines() if ln.startswith("error:"))
        assert str(path) in line and shown in line, line
    # a head that cannot be rebuilt from its recorded refiner_args
    (tmp_path / "arch.pt").write_bytes(checkpoint_bytes({**ck, "refiner_args": {**ck["refiner_args"], "hidden": 64}}))
    res, text = invoke("refine", "--config", str(cfg), "--checkpoint", str(tmp_path / "arch.pt"), "--split", "val")
    assert res.exit_code == 1 and "arch.pt: cannot rebuild the refiner from its refiner_args" in text

    # the Python predictor given other HQ-SAM weights than the refiner's features came from
    weights = tmp_path / "sam.pth"
    torch.save({"image_encoder.x": torch.zeros(1)}, weights)
    with pytest.raises(RefineError, match=r"trained on features of HQ-SAM weights random-init:seed=0, but the "
                                          r"HQ-SAM weights given are sha256:"):
        RefinePredictor(refiner, sam_checkpoint=weights, device="cpu", announce=False)


def test_output_written_atomically(demo_root: Path, store: Path, refiner: Path, tmp_path: Path, monkeypatch) -> None:
    """A failure while the result is written leaves the previous file whole and no temp file behind, and is
    one line naming the file."""
    import boxrefine.shared.runtime.fileio as fileio

    cfg = _cfg(tmp_path, demo_root, store)
    out = tmp_path / "out.json"
    out.write_text("previous")
    dets = _dets(tmp_path / "d.json", [{"image_id": 1, "category_id": 1, "bbox": [100, 100, 40, 60], "score": 0.9}])

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(fileio.os, "replace", crash)
    res, text = invoke("refine", "--config", str(cfg), "--checkpoint", str(refiner), "--split", "val",
                       "--detections", str(dets), "--out", str(out))
    assert one_line_error(res, text) == f"error: {out}: cannot write: disk full"
    assert out.read_text() == "previous"
    assert sorted(os.listdir(tmp_path)) == sorted(["cfg.yaml", "d.json", "features.zarr", "out.json"])
