"""THE reader of detections files: COCO results JSON, as MMDetection, Detectron2 and Ultralytics export
them (a list of ``{image_id, category_id, bbox [x, y, w, h], score}``, or an object with such an
``annotations`` list). Evaluate, train and refine read detections through it, so the same file gets
the same error everywhere.

A malformed file or entry (not JSON, not a list, an entry that is not an object, no image reference,
a box that is not four finite numbers or has a negative width or height, a score or category that is
not a number) is a one-line :class:`DataError` naming the file and the entry. An entry names its
image by ``image_id`` (an integer, or a string such as a file stem) or by ``file_name``; a missing
``score`` is None here, and each use says what that means: evaluate ranks boxes by score for AP, so
there it is an error naming the entry unless ``evaluate.missing_score`` gives the value to use; train
does not read scores; refine keeps the entry as it is (``refine.min_score`` counts it as 1.0). Scores
outside [0, 1] are used as given, with one warning that counts them.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from boxrefine.shared.data.records import DataError, is_integral, is_number
from boxrefine.shared.runtime.console import console
from boxrefine.shared.runtime.fileio import read_bytes

SHAPE = "a COCO results list [{image_id, bbox [x, y, w, h], score}, ...]"


@dataclass
class Detection:
    """One checked entry of a detections file."""

    index: int  # position in the file
    entry: dict[str, Any]  # the entry as read (refine copies it to its output)
    box: tuple[float, float, float, float]  # xyxy, original px
    score: float | None  # None: the entry has no score
    category_id: int  # -1: the entry has none
    image_id: int | str | None  # an integral float id is read as an int
    file_name: str | None


def read_detections(path: Path) -> list[Detection]:
    """Every entry of a detections file, checked (see the module docstring)."""
    raw = read_bytes(path, DataError, "detections file")
    if not raw.strip():
        raise DataError(f"{path}: empty file; expected {SHAPE} (an empty list [] means no detections)")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: detections are not valid JSON: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        data = data["annotations"]
    if not isinstance(data, list):
        raise DataError(f"{path}: detections must be {SHAPE}")
    dets = [_entry(path, i, d) for i, d in enumerate(data)]
    outside = [d for d in dets if d.score is not None and not 0.0 <= d.score <= 1.0]
    if outside:
        console.print(f"{path}: {len(outside)} detection(s) have a score outside [0, 1] (e.g. [{outside[0].index}] "
                      f"score {outside[0].score:g}); used as given", style="yellow", markup=False)
    return dets


def _entry(path: Path, i: int, d: Any) -> Detection:
    where = f"{path}: [{i}]"
    if not isinstance(d, dict):
        raise DataError(f"{where}: expected an object {{image_id, bbox [x, y, w, h], score}}, got {d!r:.80}")
    image_id, file_name = d.get("image_id"), d.get("file_name")
    if is_integral(image_id):
        image_id = int(image_id)
    elif not isinstance(image_id, str):
        image_id = None
    if image_id is None and not isinstance(file_name, str):
        raise DataError(f"{where}: needs an image_id (integer or string) or a file_name, "
                        f"got {d.get('image_id')!r:.60}")
    where += f" (image_id {image_id})" if image_id is not None else f" ({file_name})"
    bbox = d.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(is_number(v) for v in bbox)
            and is_number(bbox[0] + bbox[2]) and is_number(bbox[1] + bbox[3])):
        raise DataError(f"{where}: bbox must be [x, y, w, h], four finite numbers, got {bbox!r:.100}")
    x, y, w, h = (float(v) for v in bbox)
    if w < 0 or h < 0:
        raise DataError(f"{where}: bbox has a negative width or height: {bbox!r:.100}")
    score, cat = d.get("score"), d.get("category_id", -1)
    if score is not None and not is_number(score):
        raise DataError(f"{where}: score must be a finite number, got {score!r:.60}")
    if not is_integral(cat):
        raise DataError(f"{where}: category_id must be an integer, got {cat!r:.60}")
    return Detection(i, d, (x, y, x + w, y + h), None if score is None else float(score), int(cat), image_id,
                     file_name if isinstance(file_name, str) else None)


def load_detections(path: Path, image_ids: Collection[int] | None = None, split_ids: Collection[int] | None = None,
                    missing_score: float | None = None) -> dict[int, list[tuple[list[float], float, int]]]:
    """A detections file as evaluate and train use it: {image_id: [(xyxy, score, category_id), ...]}
    keyed by the integer ids of the COCO annotations. A detection without a score is a DataError naming
    the entry, unless ``missing_score`` gives the score to use. Given the ``image_ids`` in use,
    detections of other images are dropped, with one warning that counts them: apart, those of images
    of the split (``split_ids``) that have no usable row (bad, damaged or not extracted yet)."""
    out: dict[int, list[tuple[list[float], float, int]]] = {}
    for d in read_detections(path):
        if not isinstance(d.image_id, int):
            raise DataError(f"{path}: [{d.index}]: image_id must be an integer (the COCO image id) to score or "
                            f"train on detections, got {d.entry.get('image_id')!r:.60}")
        score = d.score if d.score is not None else missing_score
        if score is None:
            raise DataError(f"{path}: [{d.index}] (image_id {d.image_id}): no score; AP ranks detections by score: "
                            "add one to every entry, or set evaluate.missing_score (e.g. --missing-score 1.0)")
        out.setdefault(d.image_id, []).append((list(d.box), score, d.category_id))
    if image_ids is not None:
        known, in_split = set(image_ids), set(split_ids or ())
        unknown = sorted(k for k in out if k not in known)
        no_row = [k for k in unknown if k in in_split]
        elsewhere = [k for k in unknown if k not in in_split]
        for ids, what in ((no_row, "image(s) of the split without a usable row (bad, damaged or not extracted)"),
                          (elsewhere, "image id(s) not in the split")):
            if ids:
                n = sum(len(out.pop(k)) for k in ids)
                console.print(f"{path}: {n} detection(s) for {len(ids)} {what} (e.g. {ids[0]}); ignored",
                              style="yellow", markup=False)
    return out
