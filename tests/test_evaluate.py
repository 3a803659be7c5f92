"""Evaluate stage: folders of checkpoints in natural order, bad checkpoints skipped, fixed evaluation
boxes, COCO AP / results JSON, masks from the store, no images and no image encoder (except --vis), CLI.

Runs that need HQ-SAM's real heads use a small detections file (4 boxes on the one val image: the
decoder costs ~0.5 s per box on 2 CPU cores); tests about plumbing use ``FakeHeads``.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import re
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import REPO, coco_stats, invoke, make_config, write_config
from pycocotools.coco import COCO

import boxrefine.evaluate.run as er
from boxrefine.evaluate.run import EvaluateError, amp_dtype, natural_key, resolve_checkpoints, run_evaluate
from boxrefine.evaluate.vis import COARSE_COLOUR, GT_COLOUR, REFINED_COLOUR
from boxrefine.shared.model.checkpoint import checkpoint_bytes
from boxrefine.shared.model.heads import build_refiner
from boxrefine.shared.scoring.coarse import CoarseBoxes, fixed_coarse_boxes, load_coarse_boxes
from boxrefine.shared.scoring.predict import predict, summarize
from boxrefine.shared.store.location import StoreError
from boxrefine.shared.store.rows import StoreRows


class FakeHeads(torch.nn.Module):
    """A cheap stand-in for HQ-SAM's prompt encoder + HQ decoder: the mask is the prompt box itself."""

    def forward(self, emb: torch.Tensor, interm: torch.Tensor, boxes: torch.Tensor, image_index=None, regions=None):
        lg = torch.full((len(boxes), 1, 256, 256), -1.0)
        for i, (x0, y0, x1, y1) in enumerate((boxes / 4).round().long().clamp(0, 256).tolist()):
            lg[i, 0, y0:y1, x0:x1] = 1.0
        return lg, torch.ones(len(boxes), 1)


@pytest.fixture
def fake_heads(monkeypatch):
    monkeypatch.setattr(er, "build_sam_heads", lambda *a, **k: FakeHeads())


@pytest.fixture(scope="module")
def trained(demo_root: Path, reference_store: Path, tmp_path_factory) -> Path:
    """A tiny run: epoch_001.pt, epoch_002.pt, best.pt, last.pt. Read-only: copy what you change."""
    from boxrefine.train.recipe import run_train

    runs = tmp_path_factory.mktemp("runs")
    cfg = make_config(demo_root, reference_store,
                      train={"runs_dir": str(runs), "epochs": 2, "batch_images": 2, "boxes_per_image": 4,
                             "num_workers": 0, "name": "r", "keep_top_k": 5},
                      refiner={"use_mask": False, "hidden": 32})
    return run_train(cfg).run_dir


@pytest.fixture(scope="module")
def small_dets(demo_root: Path, tmp_path_factory) -> Path:
    """3 real detections of the val image + 1 far from every object (a false positive for AP)."""
    dets = json.loads((demo_root / "annotations" / "detections_val.json").read_text())[:3]
    dets.append({"image_id": dets[0]["image_id"], "category_id": dets[0]["category_id"],
                 "bbox": [1.0, 1.0, 3.0, 3.0], "score": 0.05})
    path = tmp_path_factory.mktemp("dets") / "detections_val.json"
    path.write_text(json.dumps(dets))
    return path


def _cfg(data: Path, store: Path, runs: Path | None = None, dets: Path | None = None, **evaluate):
    cfg = make_config(data, store, train={"runs_dir": str(runs or data / "runs"), "num_workers": 0},
                      refiner={"use_mask": False, "hidden": 32}, evaluate=evaluate)
    cfg.data.splits["val"].detections = dets  # None: seeded jitter of GT
    return cfg


def _spy_predict(monkeypatch) -> list[dict]:
    calls: list[dict] = []
    real = er.predict

    def spy(ds, coarse, device, **kw):
        calls.append({"coarse": coarse, **kw})
        return real(ds, coarse, device, **kw)

    monkeypatch.setattr(er, "predict", spy)
    return calls


def _box_metrics(boxes_xywh: list[list[float]], eval_boxes: Path, ann: Path) -> tuple[float, float]:
    """Mean IoU and mean |side error| of boxes (in the order of the saved evaluation boxes of the one val
    image) against their matched GT, from the annotation file, written out with numpy."""
    saved = next(iter(json.loads(eval_boxes.read_text())["images"].values()))
    gts = sorted(json.loads(ann.read_text())["annotations"], key=lambda a: a["id"])
    gts = [a for a in gts if a["image_id"] == saved["image_id"]]
    ious, sides = [], []
    for (x, y, w, h), gi in zip(boxes_xywh, saved["gt_index"], strict=True):
        if gi < 0:
            continue
        p = np.array([x, y, x + w, y + h])
        gx, gy, gw, gh = gts[gi]["bbox"]
        g = np.array([gx, gy, gx + gw, gy + gh])
        inter = np.prod(np.clip(np.minimum(p[2:], g[2:]) - np.maximum(p[:2], g[:2]), 0, None))
        ious.append(inter / (w * h + gw * gh - inter))
        sides.append(np.abs(p - g).mean())
    return float(np.mean(ious)), float(np.mean(sides))


def _coarse_mask_iou(cfg, eval_boxes: Path) -> float:
    """HQ-SAM's low-res mask for each matched coarse box vs its stored GT mask, by hand."""
    from boxrefine.shared.model.sam import build_sam_heads

    heads = build_sam_heads("vit_tiny", None, 0, "cpu", announce=False)
    ds = StoreRows.from_store(cfg.store.path, "val", with_masks=True)
    item = ds[0]
    saved = json.loads(eval_boxes.read_text())["images"][str(item["key"])]
    (oh, ow), (ih, iw) = item["geometry"].orig_hw, item["geometry"].input_hw
    boxes = torch.tensor(saved["boxes"]) * torch.tensor([iw / ow, ih / oh, iw / ow, ih / oh])
    with torch.no_grad():
        logits, _ = heads(item["image_embeddings"][None].float(), item["interm_embeddings"][None].float(), boxes)
    rows, cols = -(-ih // 4), -(-iw // 4)  # low-res pixels holding image content; the padding is not scored
    ious = []
    for k, gi in enumerate(saved["gt_index"]):
        if gi >= 0:
            pred, gt = logits[k, 0, :rows, :cols].numpy() > 0, item["gt_masks"][gi, :rows, :cols].numpy() > 0
            union = (pred | gt).sum()
            ious.append((pred & gt).sum() / union if union else 1.0)
    return float(np.mean(ious))


# ------------------------------------------------------------------------------------ units
def test_natural_order() -> None:
    names = ["last.pt", "epoch_10.pt", "best.pt", "epoch_2.pt", "epoch_005.pt", "epoch_1.pt"]
    assert sorted(names, key=natural_key) == ["epoch_1.pt", "epoch_2.pt", "epoch_005.pt", "epoch_10.pt",
                                              "best.pt", "last.pt"]


def test_amp_dtype_follows_train_amp(demo_root: Path, reference_store: Path) -> None:
    from boxrefine.shared.runtime.device import cpu_has_native_bf16

    cfg = _cfg(demo_root, reference_store)
    cpu = torch.device("cpu")
    assert amp_dtype(cfg, cpu) is None  # auto: on for CUDA only
    cfg.train.amp = True  # on CPU: bf16 only where the CPU has it natively (train's rule)
    assert amp_dtype(cfg, cpu) == (torch.bfloat16 if cpu_has_native_bf16() else None)
    cfg.train.amp_dtype = "bfloat16"
    assert amp_dtype(cfg, cpu) == torch.bfloat16
    cfg.train.amp_dtype = "float16"
    assert amp_dtype(cfg, cpu) == torch.float16


def test_run_module_imports_images_only_lazily() -> None:
    """evaluate/run.py must not pull in the image code at import time: only --vis imports evaluate.vis."""
    tree = ast.parse((REPO / "evaluate" / "run.py").read_text())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            top.add(node.module or "")
    assert not {m for m in top if m.startswith(("evaluate.vis", "cv2", "shared.data.imageio"))}


def test_default_checkpoint_is_best_of_latest_run(demo_root: Path, reference_store: Path, trained: Path,
                                                  tmp_path: Path) -> None:
    """The one "latest checkpoint" rule (shared/model/runs.py), which refine follows too."""
    from boxrefine.extract.refine.run import refiner_checkpoint
    from boxrefine.shared.model.runs import NoCheckpointError

    runs = tmp_path / "runs"
    cfg = _cfg(demo_root, reference_store, runs)
    with pytest.raises(NoCheckpointError, match="no runs folder"):
        resolve_checkpoints(cfg, None)
    runs.mkdir()
    with pytest.raises(NoCheckpointError, match="no run folder holds a checkpoint"):
        refiner_checkpoint(cfg, None)
    old, new = runs / "old", runs / "new"
    for d in (old, new):
        d.mkdir()
        shutil.copy(trained / "best.pt", d / "best.pt")
        (d / "metrics.jsonl").write_text("{}\n")
    past = time.time() - 1000
    for f in old.iterdir():
        os.utime(f, (past, past))
    (old / "eval").mkdir()  # writing an old run's eval/ must not make it the latest
    assert resolve_checkpoints(cfg, None) == ([new / "best.pt"], new / "eval")
    assert refiner_checkpoint(cfg, None) == new / "best.pt"  # refine: the same rule, the same file
    newest = runs / "newest"
    newest.mkdir()
    (newest / "last.pt").write_bytes(b"x")
    with pytest.raises(NoCheckpointError, match=r"newest: the run has no best\.pt"):
        resolve_checkpoints(cfg, None)
    cfg.evaluate.checkpoint = old / "best.pt"  # evaluate.checkpoint wins over the latest run
    assert resolve_checkpoints(cfg, None) == ([old / "best.pt"], old / "eval")
    cfg.refine.checkpoint = old  # a run folder: refine applies its best.pt
    assert refiner_checkpoint(cfg, None) == old / "best.pt"
    assert resolve_checkpoints(cfg, new) == ([new / "best.pt"], new / "eval")  # a folder: its *.pt files
    with pytest.raises(EvaluateError, match="not found"):
        resolve_checkpoints(cfg, tmp_path / "nope.pt")
    with pytest.raises(EvaluateError, match=r"no \*\.pt"):
        resolve_checkpoints(cfg, old / "eval")


def test_predict_keeps_metrics_when_an_image_has_no_boxes(demo_root: Path, reference_store: Path) -> None:
    """An image without coarse boxes must not hide the zero-shot and mask metrics of the others."""
    cfg = _cfg(demo_root, reference_store, dets=demo_root / "annotations" / "detections_train.json")
    ds = StoreRows.from_store(str(reference_store), "train", with_masks=True)
    coarse = fixed_coarse_boxes(cfg, "train", ds, None)
    empty_key = int(ds.keys[ds.rows[1]])
    coarse[empty_key] = CoarseBoxes(torch.zeros((0, 4)), torch.zeros(0, dtype=torch.int64), torch.zeros(0),
                                    torch.zeros(0, dtype=torch.int64))
    refiner = build_refiner(160, hidden=32, use_mask=False)
    kw = {"refiner": refiner, "heads": FakeHeads(), "batch_images": 2}
    s = summarize(predict(ds, coarse, torch.device("cpu"), zero_shot=True, masks=True, **kw))
    assert s["images"] == 4 and {"zero_shot", "refined", "mask_iou_coarse", "mask_iou_refined"} <= set(s)
    assert s["zero_shot"]["mean_iou"] == pytest.approx(s["coarse"]["mean_iou"], abs=0.05)  # mask = box
    # per checkpoint, evaluate leaves the coarse-prompt mask (a baseline) out
    s = summarize(predict(ds, coarse, torch.device("cpu"), masks=True, coarse_masks=False, **kw))
    assert "mask_iou_refined" in s and "mask_iou_coarse" not in s


# ------------------------------------------------------------------------------------ evaluate
def _check_scores_against_the_files(res, cfg, ann: Path, small_dets: Path, out: Path) -> None:
    """Box metrics equal an independent computation from the files evaluate wrote (the refined JSON is
    rounded to 0.01 px) and the annotation file; mask IoU and COCO AP likewise."""
    base = res.baselines
    coarse_xywh = [d["bbox"] for d in json.loads(small_dets.read_text())]
    for r, boxes in ((base["coarse"], coarse_xywh),
                     *((r, [d["bbox"] for d in json.loads(Path(r["refined_json"]).read_text())]) for r in res.rows)):
        mean_iou, side = _box_metrics(boxes, out / "eval_boxes_val.json", ann)
        assert r["mean_iou"] == pytest.approx(mean_iou, abs=1e-3) and r["side_err_px"] == pytest.approx(side, abs=0.01)
    assert base["zero_shot"]["mask_iou"] is None and base["zero_shot"]["mean_iou"] is not None
    # mask IoU of the coarse prompt: HQ-SAM's own mask vs the stored GT masks, recomputed here
    assert base["coarse"]["mask_iou"] == pytest.approx(_coarse_mask_iou(cfg, out / "eval_boxes_val.json"), abs=1e-6)

    # COCO AP: ours == pycocotools on the same files, for the input detections and a refined file
    assert [base["coarse"][k] for k in ("AP", "AP50", "AP75")] == pytest.approx(
        coco_stats(ann, small_dets, [1]), abs=1e-9)
    row = res.rows[1]
    assert [row[k] for k in ("AP", "AP50", "AP75")] == pytest.approx(
        coco_stats(ann, out / "refined_val_epoch_10.json", [1]), abs=1e-9)


def _check_refined_results_load(ann: Path, small_dets: Path, out: Path) -> None:
    """loadRes accepts the refined results; xywh; scores and categories carried over from the detections."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann))
        dt = gt.loadRes(str(out / "refined_val.json"))
    anns = dt.loadAnns(dt.getAnnIds())
    dets = json.loads(small_dets.read_text())
    assert len(anns) == len(dets)
    assert sorted((a["score"], a["category_id"]) for a in anns) == sorted((d["score"], d["category_id"]) for d in dets)
    assert all(a["bbox"][2] > 0 and a["bbox"][3] > 0 for a in anns)


def test_folder_natural_order_bad_checkpoints_skipped_ap_and_results(
        demo_root: Path, reference_store: Path, trained: Path, small_dets: Path, tmp_path: Path,
        monkeypatch, capsys) -> None:
    """Real HQ-SAM heads. Two good checkpoints → two rows in natural order; a corrupt file and a
    checkpoint of another store are reported by name and skipped; baselines computed once; COCO AP
    equals pycocotools run directly on the same files; the refined JSON loads with loadRes."""
    folder = tmp_path / "x"
    folder.mkdir()
    shutil.copy(trained / "epoch_001.pt", folder / "epoch_2.pt")
    shutil.copy(trained / "epoch_002.pt", folder / "epoch_10.pt")
    (folder / "broken.pt").write_bytes(b"this is not a checkpoint")
    ck = torch.load(trained / "last.pt", weights_only=True)
    ck["store_identity"]["checkpoint"] = "sha256:" + "0" * 64
    (folder / "other_store.pt").write_bytes(checkpoint_bytes(ck))
    calls = _spy_predict(monkeypatch)

    cfg = _cfg(demo_root, reference_store, dets=small_dets)
    res = run_evaluate(cfg, folder)
    err = capsys.readouterr().err
    out = folder / "eval"
    assert res.out_dir == out
    assert [r["checkpoint"] for r in res.rows] == ["epoch_2", "epoch_10"]
    assert {Path(p).name for p, _ in res.skipped} == {"broken.pt", "other_store.pt"}
    reasons = " ".join(r for _, r in res.skipped)
    assert "broken.pt: not a readable checkpoint" in reasons and "other_store.pt: trained on another" in reasons
    assert "broken.pt" in err and "other_store.pt" in err and "epoch_10" in err
    # the baselines ran once, the checkpoints without re-scoring the coarse-prompt mask
    assert [c.get("zero_shot", False) for c in calls] == [True, False, False]
    assert [c.get("coarse_masks") for c in calls[1:]] == [False, False]
    assert all(c["coarse"] is calls[0]["coarse"] for c in calls)

    doc = json.loads((out / "metrics.json").read_text())
    assert [r["checkpoint"] for r in doc["checkpoints"]] == ["epoch_2", "epoch_10"]
    assert doc["images"] == 1 and doc["boxes"] + doc["unmatched"] == 4
    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[1].startswith("epoch_2,") and csv_lines[2].startswith("epoch_10,")
    for f in ("refined_val.json", "refined_val_epoch_2.json", "refined_val_epoch_10.json", "iou_hist.png",
              "eval_boxes_val.json"):
        assert (out / f).is_file(), f
    assert not (out / "vis").exists()
    best_file = out / f"refined_val_{res.best}.json"
    assert json.loads((out / "refined_val.json").read_text()) == json.loads(best_file.read_text())

    _check_scores_against_the_files(res, cfg, demo_root / "annotations" / "instances_val.json", small_dets, out)
    _check_refined_results_load(demo_root / "annotations" / "instances_val.json", small_dets, out)


@pytest.fixture(scope="module")
def evaluated_with_images(demo_root: Path, reference_store: Path, trained: Path, small_dets: Path,
                          tmp_path_factory) -> dict:
    """metrics.json of best.pt (real heads) evaluated in a normal environment, images present."""
    run = tmp_path_factory.mktemp("with-images")
    shutil.copy(trained / "best.pt", run / "best.pt")
    run_evaluate(_cfg(demo_root, reference_store, dets=small_dets), run / "best.pt")
    return json.loads((run / "eval" / "metrics.json").read_text())


def test_runs_without_images_and_without_image_encoder(evaluated_with_images: dict, store_only: Path,
                                                       reference_store: Path, trained: Path, small_dets: Path,
                                                       tmp_path: Path) -> None:
    """Real heads; the image folder is gone, the image encoder cannot be built, and GT masks cannot be
    decoded or resized: everything comes from the store, and the numbers are those of a run with images."""
    data = store_only
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained / "best.pt", run / "best.pt")

    res = run_evaluate(_cfg(data, reference_store, dets=small_dets), run / "best.pt")
    assert [r["checkpoint"] for r in res.rows] == ["best"] and res.best == "best"
    want = evaluated_with_images
    assert res.baselines == want["baselines"]
    assert {k: v for k, v in res.rows[0].items() if k != "path"} == \
        {k: v for k, v in want["checkpoints"][0].items() if k != "path"}
    assert res.rows[0]["mask_iou"] is not None and res.rows[0]["AP"] is not None  # annotation JSON still there
    out = run / "eval"
    assert (out / "refined_val.json").is_file() and not (out / "refined_val_best.json").exists()
    # the report is written from the store alone and says why it has no gallery
    assert "No galleries: the image folder" in (out / "report.html").read_text()


def test_eval_boxes_fixed_across_runs_and_checkpoints(demo_root: Path, reference_store: Path, trained: Path,
                                                      tmp_path: Path, monkeypatch, fake_heads, capsys) -> None:
    """Without detections: a seeded jitter of GT, saved in eval/ and read back by every later run and
    for every checkpoint, even when the config's seed changes (with a note)."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    shutil.rmtree(run / "eval", ignore_errors=True)
    cfg = _cfg(demo_root, reference_store)
    first = run_evaluate(cfg, run / "best.pt")
    saved = run / "eval" / "eval_boxes_val.json"
    assert first.eval_boxes == saved and first.source == "jitter"
    assert all(first.rows[0][k] is None for k in ("AP", "AP50", "AP75"))  # jittered GT carries no scores
    content, mtime = saved.read_bytes(), saved.stat().st_mtime_ns
    boxes, meta = load_coarse_boxes(saved)
    assert meta["source"] == "jitter" and meta["seed"] == cfg.evaluate.seed
    assert sum(len(b) for b in boxes.values()) == 8  # every GT of the val image

    calls = _spy_predict(monkeypatch)
    cfg.evaluate.seed = 99  # the saved boxes still win
    second = run_evaluate(cfg, run)
    assert "reusing the saved evaluation boxes" in capsys.readouterr().err
    assert saved.read_bytes() == content and saved.stat().st_mtime_ns == mtime
    # epoch_001, epoch_002, best, last: best and last are hard links to epoch_002, scored once
    assert [(r["checkpoint"], r["aliases"]) for r in second.rows] == [("epoch_001", []),
                                                                      ("epoch_002", ["best", "last"])]
    assert len(calls) == 3  # the baselines and two checkpoints
    for c in calls:
        assert c["coarse"].keys() == boxes.keys()
        for k in boxes:
            assert torch.equal(c["coarse"][k].boxes, boxes[k].boxes)
    assert second.baselines["coarse"] == first.baselines["coarse"]
    same = next(r for r in second.rows if "best" in r["aliases"])
    assert (same["mean_iou"], same["side_err_px"]) == (first.rows[0]["mean_iou"], first.rows[0]["side_err_px"])

    # a fresh folder with the other seed draws other boxes (the seed matters)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(trained / "best.pt", other / "best.pt")
    third = run_evaluate(cfg, other / "best.pt")
    assert third.baselines["coarse"]["mean_iou"] != first.baselines["coarse"]["mean_iou"]


def test_vis_writes_overlays(demo_root: Path, reference_store: Path, trained: Path, small_dets: Path,
                             tmp_path: Path, fake_heads) -> None:
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained / "best.pt", run / "best.pt")
    res = run_evaluate(_cfg(demo_root, reference_store, dets=small_dets, vis_count=3), run / "best.pt", vis=True)
    pngs = sorted((run / "eval" / "vis").glob("*.png"))
    assert len(pngs) == 1 and pngs[0].name.startswith("val_1_")  # one val image in the demo fixture
    out = cv2.cvtColor(cv2.imread(str(pngs[0])), cv2.COLOR_BGR2RGB)
    doc = json.loads((demo_root / "annotations" / "instances_val.json").read_text())["images"][0]
    h, w = doc["height"], doc["width"]
    band = out.shape[0] - h
    assert band > 0 and out.shape[1] == w  # the legend sits in a band above the image, not over it
    img = out[band:]
    for colour in (GT_COLOUR, REFINED_COLOUR):
        assert int((img == np.array(colour, np.uint8)).all(-1).sum()) > 50, colour
    # the refined box is drawn over the coarse one: where the head left a box unmoved the coarse box is
    # hidden, so its colour is only required somewhere in the picture (legend included)
    assert int((out == np.array(COARSE_COLOUR, np.uint8)).all(-1).sum()) > 0, COARSE_COLOUR
    # away from the boxes, the image is the picture the encoder saw (the same decoding as extract)
    from boxrefine.shared.data.imageio import read_rgb

    orig = read_rgb(demo_root / "images" / "val" / doc["file_name"])
    assert (img == orig).all(-1).mean() > 0.8
    assert res.files["vis_0"] == pngs[0]


def test_legend_never_hides_a_small_image() -> None:
    from boxrefine.evaluate.vis import line_width, with_legend

    img = np.full((30, 40, 3), 77, np.uint8)
    out = with_legend(img, [("ground truth", GT_COLOUR), ("refined (epoch_010)", REFINED_COLOUR)])
    assert out.shape[1] > 40 and (out[-30:, :40] == 77).all()  # widened for the text; the image untouched
    assert line_width((30, 40)) == 1 and line_width((3000, 4000)) == 10


def test_mismatched_store_refused(demo_root: Path, reference_store: Path, trained: Path) -> None:
    cfg = _cfg(demo_root, reference_store)
    cfg.model.seed = 5
    with pytest.raises(StoreError, match="random-init:seed=0.*random-init:seed=5"):
        run_evaluate(cfg, trained / "best.pt")


# ------------------------------------------------------------------------------------ CLI
def test_cli_folder_table_and_all_corrupt(demo_root: Path, reference_store: Path, trained: Path,
                                          small_dets: Path, tmp_path: Path, fake_heads) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", demo_root, reference_store,
                       train={"runs_dir": str(tmp_path / "runs"), "num_workers": 0})
    raw = cfg.read_text().replace(str(demo_root / "annotations" / "detections_val.json"), str(small_dets))
    cfg.write_text(raw)
    folder = tmp_path / "x"
    folder.mkdir()
    shutil.copy(trained / "epoch_001.pt", folder / "epoch_001.pt")
    shutil.copy(trained / "epoch_002.pt", folder / "epoch_002.pt")
    res, out = invoke("evaluate", "--config", str(cfg), "--checkpoint", str(folder))
    assert res.exit_code == 0, out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if re.match(r"^\s*boxes\s+IoU", line))
    labels = [line.split()[0] for line in lines[header + 2:header + 6]]
    assert labels == ["coarse", "zero-shot", "epoch_001", "epoch_002"], out
    assert (folder / "eval" / "metrics.json").is_file()

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.pt").write_bytes(b"\x00" * 10)
    (bad / "b.pt").write_text("{}")
    res, out = invoke("evaluate", "--config", str(cfg), "--checkpoint", str(bad))
    assert res.exit_code != 0
    assert "no checkpoint evaluated" in out and "a.pt" in out and "b.pt" in out
    res, out = invoke("evaluate", "--config", str(cfg), "--checkpoint", str(tmp_path / "nothing.pt"))
    assert res.exit_code == 1 and "nothing.pt: checkpoint not found" in out
    res, out = invoke("evaluate", "--config", str(cfg), "--split", "nope")
    assert res.exit_code == 2 and "evaluate.split" in out
