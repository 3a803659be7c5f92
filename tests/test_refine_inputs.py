"""What refine reads, rule by rule (``extract/refine/inputs.py``, ``shared/data/detections.py``):
every entry check of the detections reader, which image a detection names (file name, base name, id,
file stem), and every branch of the pass-through rules (unknown, unreadable, zero-size, outside on each
side, below min_score) at their exact boundaries; the output-path refusals. Small files in tmp_path."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from boxrefine.extract.refine.inputs import (
    LOW_SCORE,
    OUTSIDE,
    UNKNOWN,
    UNREADABLE,
    ZERO_SIZE,
    ImageIndex,
    RefineDetection,
    apply_min_score,
    assign_images,
    check_output,
    load_detection_entries,
)
from boxrefine.shared.data.detections import load_detections, read_detections
from boxrefine.shared.data.records import DataError, ImageRecord
from boxrefine.shared.scoring.predictor import RefineError


def _file(tmp_path: Path, data: Any, name: str = "dets.json") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


def _said(capsys: pytest.CaptureFixture) -> str:
    c = capsys.readouterr()
    return " ".join((c.out + c.err).split())


# ------------------------------------------------------------------------------------ the reader


def test_entries_are_read_as_xyxy_with_their_image_reference(tmp_path: Path) -> None:
    p = _file(tmp_path, [{"image_id": 3, "category_id": 2, "bbox": [1, 2, 3, 4], "score": 0.5},
                         {"image_id": 4.0, "bbox": [0.5, 0, 0, 0]},
                         {"image_id": "000042", "bbox": [0, 0, 1, 1], "score": 1},
                         {"file_name": "a/b.png", "bbox": [0, 0, 1, 1], "score": 0.1, "extra": True},
                         {"image_id": True, "file_name": "c.png", "bbox": [0, 0, 1, 1]}])
    d = read_detections(p)
    assert [x.index for x in d] == [0, 1, 2, 3, 4]
    assert d[0].box == (1.0, 2.0, 4.0, 6.0) and d[0].score == 0.5 and d[0].category_id == 2 and d[0].image_id == 3
    assert d[1].image_id == 4 and isinstance(d[1].image_id, int) and d[1].score is None and d[1].category_id == -1
    assert d[1].box == (0.5, 0.0, 0.5, 0.0)
    assert d[2].image_id == "000042" and d[2].file_name is None
    assert d[3].image_id is None and d[3].file_name == "a/b.png" and d[3].entry["extra"] is True
    assert d[4].image_id is None and d[4].file_name == "c.png"  # a bool is no image id
    wrapped = _file(tmp_path, {"annotations": [{"image_id": 1, "bbox": [0, 0, 1, 1]}]}, "w.json")
    assert len(read_detections(wrapped)) == 1


@pytest.mark.parametrize("text,problem", [
    ("", "empty file"), ("  \n", "empty file"), ("{nope", "not valid JSON"), ('{"a": 1}', "must be a COCO results"),
    ('{"annotations": 3}', "must be a COCO results"), ("[3]", r"\[0\]: expected an object"),
    ('[{"bbox": [0, 0, 1, 1]}]', "needs an image_id .* or a file_name"),
    ('[{"image_id": 4, "bbox": [0, 0, 1]}]', r"\[0\] \(image_id 4\): bbox must be"),
    ('[{"file_name": "a.png", "bbox": [0, 0, 1]}]', r"\[0\] \(a.png\): bbox must be"),
    ('[{"image_id": 1.5, "bbox": [0, 0, 1, 1]}]', "needs an image_id"),
    ('[{"image_id": 1, "file_name": 3, "bbox": [0, 0, 1, 1]}]', None),
    ('[{"image_id": 1}]', "bbox must be"), ('[{"image_id": 1, "bbox": [0, 0, 1]}]', "bbox must be"),
    ('[{"image_id": 1, "bbox": [0, 0, 1, "2"]}]', "bbox must be"),
    ('[{"image_id": 1, "bbox": [0, 0, 1, true]}]', "bbox must be"),
    ('[{"image_id": 1, "bbox": [1e308, 0, 1e308, 1]}]', "bbox must be"),
    ('[{"image_id": 1, "bbox": [0, 1e308, 1, 1e308]}]', "bbox must be"),
    ('[{"image_id": 1, "bbox": [0, 0, -1, 1]}]', "negative width or height"),
    ('[{"image_id": 1, "bbox": [0, 0, 1, -0.5]}]', "negative width or height"),
    ('[{"image_id": 1, "bbox": [0, 0, 0, 0], "score": "high"}]', "score must be a finite number"),
    ('[{"image_id": 1, "bbox": [0, 0, 0, 0], "category_id": 1.5}]', "category_id must be an integer"),
    ('[{"image_id": 1, "bbox": [0, 0, 0, 0], "category_id": null}]', "category_id must be an integer"),
])
def test_every_malformed_entry_is_one_error_naming_file_and_entry(tmp_path: Path, text: str, problem: str | None
                                                                  ) -> None:
    p = _file(tmp_path, text)
    if problem is None:
        assert read_detections(p)[0].file_name is None  # a non-string file_name is ignored beside an id
        return
    with pytest.raises(DataError, match=problem) as e:
        read_detections(p)
    assert str(e.value).startswith(str(p)) and "\n" not in str(e.value)


def test_scores_outside_0_1_are_counted_once(tmp_path: Path, capsys) -> None:
    p = _file(tmp_path, [{"image_id": 1, "bbox": [0, 0, 1, 1], "score": s} for s in (0.0, 1.0, 1.5, -0.1, 0.5)],
              "[bold]dets.json")
    read_detections(p)
    out = _said(capsys)
    assert "[bold]dets.json: 2 detection(s) have a score outside [0, 1] (e.g. [2] score 1.5); used as given" in out
    read_detections(_file(tmp_path, [{"image_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}], "ok.json"))
    assert "outside" not in _said(capsys)


def test_load_detections_groups_by_image_and_drops_others_with_a_count(tmp_path: Path, capsys) -> None:
    p = _file(tmp_path, [{"image_id": 1, "bbox": [0, 0, 2, 2], "score": 0.5, "category_id": 3},
                         {"image_id": 1, "bbox": [1, 1, 2, 2], "score": 0.4},
                         {"image_id": 2, "bbox": [0, 0, 1, 1], "score": 0.3},
                         {"image_id": 9, "bbox": [0, 0, 1, 1], "score": 0.3},
                         {"image_id": 9, "bbox": [0, 0, 1, 1], "score": 0.3},
                         {"image_id": 5, "bbox": [0, 0, 1, 1], "score": 0.3}], "[i]dets.json")
    assert load_detections(p)[1] == [([0.0, 0.0, 2.0, 2.0], 0.5, 3), ([1.0, 1.0, 3.0, 3.0], 0.4, -1)]
    capsys.readouterr()
    got = load_detections(p, image_ids={1, 2}, split_ids={1, 2, 5})
    assert set(got) == {1, 2}
    out = _said(capsys)
    assert "1 detection(s) for 1 image(s) of the split without a usable row" in out and "(e.g. 5)" in out
    assert "2 detection(s) for 1 image id(s) not in the split (e.g. 9); ignored" in out
    assert "[i]dets.json: 2 detection(s)" in out  # the path printed verbatim
    capsys.readouterr()
    load_detections(p, image_ids={1, 2, 5, 9})
    assert "ignored" not in _said(capsys)
    none = _file(tmp_path, [{"image_id": 1, "bbox": [0, 0, 1, 1]}], "none.json")
    with pytest.raises(DataError, match=r"\[0\] \(image_id 1\): no score; .*missing-score"):
        load_detections(none)
    assert load_detections(none, missing_score=0.7) == {1: [([0.0, 0.0, 1.0, 1.0], 0.7, -1)]}
    by_name = _file(tmp_path, [{"image_id": "a", "bbox": [0, 0, 1, 1], "score": 1}], "n.json")
    with pytest.raises(DataError, match="image_id must be an integer .* got 'a'"):
        load_detections(by_name)


# ------------------------------------------------------------------------------------ which image


IMAGES = [(10, "sub/000042.png", 1), (11, "sub/cat.png", 2), (12, "other/cat.png", 3), (13, "dog.jpg", 4),
          (14, "0.png", 5)]


def _det(**kw: Any) -> RefineDetection:
    base = {"index": 0, "entry": {}, "box": (1.0, 1.0, 5.0, 5.0), "score": 0.9, "category_id": 1, "image_id": None,
            "file_name": None}
    return RefineDetection(**{**base, **kw})


def test_detections_name_images_by_path_base_name_id_or_stem() -> None:
    by_id = ImageIndex(IMAGES, by_file=False, source="ann.json")
    assert by_id.key_of(_det(image_id=10)) == 1 and by_id.key_of(_det(image_id=99)) is None
    assert by_id.key_of(_det(image_id="10")) is None  # COCO ids are integers
    assert by_id.key_of(_det(file_name="sub/cat.png")) == 2 and by_id.key_of(_det(file_name="./sub//cat.png")) == 2
    assert by_id.key_of(_det(file_name="dog.jpg", image_id=11)) == 4  # the file name wins
    assert by_id.key_of(_det(file_name="000042.png")) == 1  # a unique base name
    assert by_id.key_of(_det(file_name="../x.png")) is None and by_id.key_of(_det(file_name="/abs.png")) is None
    with pytest.raises(DataError, match=r"ann.json: file_name 'cat.png' matches several images \((\S+cat.png), "
                                        r"(?!\1)\S+cat.png\)"):  # two different files named
        by_id.key_of(_det(file_name="cat.png"))
    folder = ImageIndex(IMAGES, by_file=True, source="folder")
    assert folder.key_of(_det(image_id=42)) == 1 and folder.key_of(_det(image_id="000042")) == 1
    assert folder.key_of(_det(image_id=0)) == 5 and folder.key_of(_det(image_id="00")) == 5
    assert folder.key_of(_det(image_id="dog")) == 4 and folder.key_of(_det(image_id=43)) is None
    with pytest.raises(DataError, match="image_id 'cat' matches several images"):
        folder.key_of(_det(image_id="cat"))


def _records() -> dict[int, ImageRecord]:
    return {k: ImageRecord(i, n, k, 100, 200, (), 1) for i, n, k in IMAGES}  # 200 wide, 100 high


@pytest.mark.parametrize("box,status", [
    ((10.0, 10.0, 20.0, 20.0), None),
    ((10.0, 10.0, 10.0, 20.0), ZERO_SIZE), ((10.0, 10.0, 20.0, 10.0), ZERO_SIZE), ((20.0, 10.0, 10.0, 20.0), ZERO_SIZE),
    ((10.0, 20.0, 20.0, 10.0), ZERO_SIZE),
    ((200.0, 10.0, 250.0, 20.0), OUTSIDE), ((199.9, 10.0, 250.0, 20.0), None),  # right edge
    ((10.0, 100.0, 20.0, 150.0), OUTSIDE), ((10.0, 99.9, 20.0, 150.0), None),  # bottom edge
    ((-50.0, 10.0, 0.0, 20.0), OUTSIDE), ((-50.0, 10.0, 0.1, 20.0), None),  # left edge
    ((10.0, -50.0, 20.0, 0.0), OUTSIDE), ((10.0, -50.0, 20.0, 0.1), None),  # top edge
])
def test_pass_through_rules_at_each_side_of_the_image(box, status) -> None:
    d = _det(image_id=13, box=box)
    assign_images([d], ImageIndex(IMAGES, False, "ann.json"), _records(), {})
    assert d.key == 4 and d.status == status
    if status == OUTSIDE:
        assert d.detail == "box lies outside the 200x100 image"
    if status == ZERO_SIZE:
        assert d.detail == "zero-size box"


def test_unknown_and_unreadable_images_are_passed_through_with_the_reason() -> None:
    index = ImageIndex(IMAGES, False, "ann.json")
    records = _records()
    del records[3]  # known to the index, not a row of the split
    dets = [_det(image_id=99), _det(image_id=12), _det(image_id=11), _det(image_id=13)]
    assign_images(dets, index, records, {2: {"reason": "truncated file"}})
    assert [d.status for d in dets] == [UNKNOWN, UNKNOWN, UNREADABLE, None]
    assert dets[0].detail == "no such image in ann.json" and dets[2].detail == "truncated file"
    assert dets[0].key is None and dets[1].key == 3


def test_min_score_passes_through_lower_scores_only() -> None:
    dets = [_det(score=0.5), _det(score=0.49), _det(score=None), _det(score=0.1, status=UNKNOWN)]
    apply_min_score(dets, 0.5)
    assert [d.status for d in dets] == [None, LOW_SCORE, None, UNKNOWN]  # no score counts as 1.0
    assert dets[1].detail == "score 0.49 below min_score 0.5"
    high = [_det(score=None)]
    apply_min_score(high, 1.5)
    assert high[0].status == LOW_SCORE


def test_detection_entries_keep_every_field(tmp_path: Path) -> None:
    p = _file(tmp_path, [{"image_id": 7, "bbox": [1, 2, 3, 4], "score": 0.2, "category_id": 5, "note": "x"}])
    (d,) = load_detection_entries(p)
    assert isinstance(d, RefineDetection) and (d.index, d.box, d.score, d.category_id, d.image_id) == (
        0, (1.0, 2.0, 4.0, 6.0), 0.2, 5, 7)
    assert d.entry["note"] == "x" and d.key is None and d.status is None and d.detail == "" and d.extra == {}


# ------------------------------------------------------------------------------------ the output path


def test_output_path_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dets = _file(tmp_path, "[]")
    ann = _file(tmp_path, "{}", "ann.json")
    inputs = {"detections": dets, "annotations": ann, "nothing": None}
    check_output(tmp_path / "out.json", inputs)  # fine
    with pytest.raises(RefineError, match="the output is the detections .* never overwrites its input"):
        check_output(dets, inputs)
    with pytest.raises(RefineError, match="the output is the annotations"):
        check_output(tmp_path / "sub" / ".." / "ann.json", inputs)
    link = tmp_path / "hard.json"
    os.link(dets, link)
    with pytest.raises(RefineError, match="the output is the detections"):
        check_output(link, inputs)
    with pytest.raises(RefineError, match="the output is a folder"):
        check_output(tmp_path, inputs)
    with pytest.raises(RefineError, match="the output is the detections"):  # inputs after an absent one count
        check_output(dets, {"checkpoint": None, "detections": dets})
    with pytest.raises(RefineError, match="the folder .*missing does not exist"):
        check_output(tmp_path / "missing" / "out.json", inputs)
    with pytest.raises(RefineError, match="is not a folder"):
        check_output(dets / "out.json", {})
    asked = []

    def no_write(path: Any, mode: int) -> bool:  # a folder without write permission (root writes anywhere)
        asked.append((Path(path), mode))
        return False

    monkeypatch.setattr(os, "access", no_write)
    with pytest.raises(RefineError, match=f"the folder {tmp_path} is not writable"):
        check_output(tmp_path / "out.json", {})
    assert asked == [(tmp_path, os.W_OK | os.X_OK)]
