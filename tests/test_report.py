"""What a reviewer opens: a tiny run's ``eval/report.html`` in a real headless Chromium (no console error,
the table's numbers are metrics.json's, every gallery image loaded; a screenshot is saved), the run's
TensorBoard events read back, and the newcomer's frictions of evaluate (results on stdout, identical
checkpoint files scored once, no stale ``eval/vis/``).

``make test`` installs Debian's ``chromium`` when it is missing and sets BOXREFINE_REQUIRE_BROWSER=1, so
the browser test cannot be skipped there; elsewhere it is skipped without a Chromium.
BOXREFINE_ARTIFACTS=<folder> keeps the screenshot and the report.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from browser import chromium, open_page
from conftest import config_dict, run_cli

# every number cell, gallery image and figure of the page, as JSON
PAGE_FACTS = """JSON.stringify({
  cells: [...document.querySelectorAll('td[data-metric]')].map(td => [td.dataset.metric, +td.dataset.digits,
                                                                       td.textContent]),
  crops: [...document.querySelectorAll('img.crop')].map(i => [i.complete, i.naturalWidth, i.naturalHeight]),
  images: [...document.images].map(i => i.naturalWidth),
  title: document.title, text: document.body.innerText.length})"""


@pytest.fixture(scope="module")
def reviewed(demo_root: Path, reference_store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 3-epoch run (keep_top_k 1: best.pt, last.pt and an epoch file hard-linked), evaluated as a user
    would: ``boxrefine evaluate --checkpoint RUN --noise 0.1,0.3``, with a stale eval/vis/ left before."""
    from conftest import make_config

    from boxrefine.train.recipe import run_train

    root = tmp_path_factory.mktemp("reviewed")
    train = {"runs_dir": str(root / "runs"), "epochs": 3, "batch_images": 2, "boxes_per_image": 4,
             "num_workers": 0, "name": "demo", "keep_top_k": 1, "lr": 0.01}
    refiner = {"use_mask": False, "hidden": 32}
    run = run_train(make_config(demo_root, reference_store, train=train, refiner=refiner)).run_dir
    cfg = root / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(config_dict(demo_root, reference_store, train=train, refiner=refiner,
                                              evaluate={"gallery": 3})))
    shutil.copy(run / "last.pt", run / "snapshot.pt")  # a byte-identical copy, not a link
    (run / "eval" / "vis").mkdir(parents=True)
    (run / "eval" / "vis" / "val_9_old.png").write_bytes(b"stale")
    proc = run_cli("evaluate", "--config", str(cfg), "--checkpoint", str(run), "--noise", "0.1,0.3")
    return {"run": run, "proc": proc, "metrics": json.loads((run / "eval" / "metrics.json").read_text())}


def test_report_in_a_real_browser(reviewed: dict, tmp_path: Path) -> None:
    binary = chromium()
    if binary is None:
        if os.environ.get("BOXREFINE_REQUIRE_BROWSER"):
            pytest.fail("no chromium: `make test` installs it (apt-get install -y chromium)")
        pytest.skip("no chromium installed (make test installs Debian's chromium)")
    report = reviewed["run"] / "eval" / "report.html"
    page = open_page(binary, report.resolve().as_uri(), PAGE_FACTS)
    shot = tmp_path / "report.png"
    shot.write_bytes(page.screenshot)
    if os.environ.get("BOXREFINE_ARTIFACTS"):
        keep = Path(os.environ["BOXREFINE_ARTIFACTS"])
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, keep / "report.png")
        shutil.copy(report, keep / "report.html")
    assert page.errors == []
    facts = json.loads(page.value)
    assert facts["title"] == "boxrefine evaluation: demo"
    assert page.screenshot.startswith(b"\x89PNG") and len(page.screenshot) > 20_000

    metrics = reviewed["metrics"]
    assert len(facts["cells"]) > 50
    for path, digits, text in facts["cells"]:
        value = metrics
        for part in path.split("/"):
            value = value[int(part)] if isinstance(value, list) else value[part]
        assert text == ("—" if value is None else f"{value:.{digits}f}" if digits else str(value)), path
    # the table holds every row of metrics.json: baselines, each distinct checkpoint, the size and band splits
    paths = {p for p, _, _ in facts["cells"]}
    for i in range(len(metrics["checkpoints"])):
        assert {f"checkpoints/{i}/mean_iou", f"checkpoints/{i}/AP", f"checkpoints/{i}/by_size/small/mean_iou",
                f"checkpoints/{i}/by_coarse_iou/0.5-0.75/mean_iou"} <= paths
    assert {"baselines/coarse/AP75", "baselines/zero_shot/mean_iou", "noise/1/refined_mean_iou"} <= paths

    assert facts["crops"], "no gallery image"
    assert all(complete and w > 0 and h > 0 for complete, w, h in facts["crops"])
    assert all(w > 0 for w in facts["images"]) and len(facts["images"]) >= 4 + len(facts["crops"])


def test_report_is_self_contained(reviewed: dict) -> None:
    """One file: no script, nothing fetched (images inline), user data escaped."""
    text = (reviewed["run"] / "eval" / "report.html").read_text()
    assert "<script" not in text and "http://" not in text and "https://" not in text
    assert 'src="data:image/png;base64,' in text and "src=\"http" not in text
    assert "<details><summary>resolved config of the run</summary>" in text
    assert "Robustness to box noise" in text and 'id="noise"' in text


def test_results_on_stdout_progress_on_stderr(reviewed: dict) -> None:
    out, err = reviewed["proc"].stdout, reviewed["proc"].stderr
    assert "evaluate val:" in out and "results in" in out and "coarse" in out
    assert "baselines:" not in out and "evaluate: split val" not in out  # progress and log lines
    assert "baselines:" in err and "evaluate: split val" in err and "evaluate val:" not in err


def test_identical_checkpoints_scored_once_and_stale_vis_removed(reviewed: dict) -> None:
    import hashlib

    run, metrics = reviewed["run"], reviewed["metrics"]
    files = sorted(p.name for p in run.glob("*.pt"))
    contents = {hashlib.sha256((run / f).read_bytes()).hexdigest() for f in files}
    assert len(files) == 4 and len(contents) < len(files)  # hard links (best/epoch/last) and a copy
    rows = metrics["checkpoints"]
    assert len(rows) == len(contents)  # scored once per distinct content
    named = sorted([r["checkpoint"] for r in rows] + [a for r in rows for a in r["aliases"]])
    assert named == sorted(f.removesuffix(".pt") for f in files)
    assert any(r["aliases"] for r in rows)
    assert "identical to another" in reviewed["proc"].stderr
    assert not (run / "eval" / "vis").exists()  # the stale overlays went
    assert "removed" in reviewed["proc"].stderr and "vis" in reviewed["proc"].stderr


def test_split_by_size_and_band_and_robustness(reviewed: dict) -> None:
    """Per size and band the box counts add up to all matched boxes; AP by size is pycocotools' own;
    the robustness curve has one point per --noise level."""
    m = reviewed["metrics"]
    for row in [m["baselines"]["coarse"], *m["checkpoints"]]:
        assert sum(g["boxes"] for g in row["by_size"].values()) == m["boxes"]
        assert sum(g["boxes"] for g in row["by_coarse_iou"].values()) == m["boxes"]
        assert set(row["by_size"]) == {"small", "medium", "large"}
    # AP by size: pycocotools' own APs / APm / APl of the refined results
    import contextlib
    import copy
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    best = next(r for r in m["checkpoints"] if r["checkpoint"] == m["best"])
    results = json.loads((reviewed["run"] / "eval" / "refined_val.json").read_text())
    ann = yaml.safe_load((reviewed["run"] / "config.yaml").read_text())["data"]["splits"]["val"]["annotations"]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ann)
        ev = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), iouType="bbox")
        ev.params.imgIds = sorted({r["image_id"] for r in results})
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    for size, stat in zip(("small", "medium", "large"), ev.stats[3:6], strict=True):
        assert best["by_size"][size]["AP"] == (pytest.approx(stat) if stat >= 0 else None), size
    assert [lv["noise"] for lv in m["noise"]] == [0.1, 0.3]
    assert all(lv["boxes"] == m["boxes"] and 0 <= lv["coarse_mean_iou"] <= 1 for lv in m["noise"])
    # more noise, worse coarse boxes
    assert m["noise"][0]["coarse_mean_iou"] > m["noise"][1]["coarse_mean_iou"]


def test_tensorboard_events_read_back(reviewed: dict) -> None:
    """The run's tb/ holds metrics.jsonl's scalars per epoch: losses, lr, step time, head health, val."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = reviewed["run"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    ea = EventAccumulator(str(run / "tb"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/step_seconds", "head/active_units", "val/loss",
            "val/refined_mean_iou", "val/coarse_mean_iou"} <= tags

    def steps(tag: str) -> list[int]:
        return [e.step for e in ea.Scalars(tag)]

    def values(tag: str) -> list[float]:
        return [e.value for e in ea.Scalars(tag)]

    epochs = [x for x in lines if x["kind"] == "epoch"]
    evals = [x for x in lines if x["kind"] == "eval"]
    assert steps("train/loss") == [x["epoch"] for x in epochs] == [1, 2, 3]  # steps are epochs
    assert values("train/loss") == pytest.approx([x["loss"] for x in epochs], rel=1e-6)  # float32 in the events
    assert steps("val/refined_mean_iou") == [x["epoch"] for x in evals]
    assert values("val/refined_mean_iou") == pytest.approx([x["refined"]["mean_iou"] for x in evals], rel=1e-6)
    assert all(v > 0 for v in values("train/lr"))  # the last epoch's lr is its last step's, not 0.0


def test_predictor_from_run(reviewed: dict, demo_root: Path) -> None:
    """``RefinePredictor.from_run(run)``: the run's best.pt with the HQ-SAM weights its config names (here
    none: the seeded random init); it refines boxes of an image as evaluate does."""
    import numpy as np

    from boxrefine import RefinePredictor
    from boxrefine.shared.data.imageio import read_rgb

    predictor = RefinePredictor.from_run(reviewed["run"], device="cpu", announce=False)
    assert predictor.path == reviewed["run"] / "best.pt" and predictor.sam_checkpoint is None
    image = next((demo_root / "images" / "val").iterdir())
    predictor.set_image(read_rgb(image))
    boxes, _ = predictor.refine([[10.0, 12.0, 60.0, 70.0]])
    assert boxes.shape == (1, 4) and np.isfinite(np.asarray(boxes)).all()
