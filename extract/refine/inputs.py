"""What ``boxrefine refine`` reads: a detections file (``boxrefine.shared.data.detections``, the reader
evaluate uses too) and which image each detection belongs to.

A well-formed detection that cannot be refined is *passed through* unrefined with its reason
(``RefineDetection.status``), never dropped silently: an image that is unknown, missing or
unreadable, a zero-size box, a box entirely outside its image, a score below ``refine.min_score``.

A detection with a ``file_name`` (path relative to the image folder, or a unique base name) names
that image. Otherwise its ``image_id`` is matched against the COCO file's ids or, for a folder of
images without a COCO file, against the file stems (numbers compared as numbers: image_id 42
matches ``000042.jpg``, as Ultralytics writes the results of a folder).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from boxrefine.shared.data.detections import Detection, read_detections
from boxrefine.shared.data.records import DataError, ImageRecord, safe_relpath
from boxrefine.shared.scoring.predictor import RefineError

# why a detection is passed through unrefined (RefineDetection.status)
UNKNOWN, UNREADABLE, LOW_SCORE, ZERO_SIZE, OUTSIDE = ("unknown image", "image unreadable", "score below min_score",
                                                      "zero-size box", "box outside the image")


@dataclass
class RefineDetection(Detection):
    """A detection with what refine finds out about it."""

    key: int | None = None  # row key of its image in the store split; None while unknown
    status: str | None = None  # None: to refine; else why it is passed through
    detail: str = ""  # why, in words: the report and the output's "reason" field
    extra: dict[str, Any] = field(default_factory=dict)


def load_detection_entries(path: Path) -> list[RefineDetection]:
    """Every detection of the file (:func:`read_detections`), ready to be assigned to images."""
    return [RefineDetection(**{f.name: getattr(d, f.name) for f in dataclasses.fields(d)})
            for d in read_detections(path)]


class ImageIndex:
    """Which image of a split a detection belongs to (see the module docstring)."""

    def __init__(self, images: list[tuple[int, str, int]], by_file: bool, source: str):
        """``images``: (image_id, file_name, key) of every image of the split, readable or not."""
        self.by_file, self.source = by_file, source
        self.by_id = {image_id: key for image_id, _, key in images}
        self.by_name = {name: key for _, name, key in images}
        self.by_stem: dict[str, list[str]] = {}
        self.by_base: dict[str, list[str]] = {}
        for _, name, _ in images:
            p = PurePosixPath(name)
            self.by_stem.setdefault(_number_as_text(p.stem), []).append(name)
            self.by_base.setdefault(p.name, []).append(name)

    def _unique(self, table: dict[str, list[str]], name: str, what: str) -> int | None:
        files = table.get(name, [])
        if len(files) > 1:
            raise DataError(f"{self.source}: {what} {name!r} matches several images ({files[0]}, {files[1]}); "
                            "give the detections a file_name relative to the image folder")
        return self.by_name[files[0]] if files else None

    def key_of(self, d: Detection) -> int | None:
        """The row key of the detection's image, or None when it names no image of the split."""
        file_name, image_id = d.file_name, d.image_id
        if file_name is not None:
            try:
                rel = safe_relpath(file_name)
            except DataError:
                return None
            return self.by_name.get(rel) or self._unique(self.by_base, PurePosixPath(rel).name, "file_name")
        if not self.by_file:
            return self.by_id.get(image_id) if isinstance(image_id, int) else None
        return self._unique(self.by_stem, _number_as_text(str(image_id)), "image_id")


def _number_as_text(stem: str) -> str:
    """A file stem or image id as matched: digits without leading zeros ("000042" and 42 match)."""
    return (stem.lstrip("0") or "0") if stem.isdigit() else stem


def assign_images(dets: list[RefineDetection], index: ImageIndex, records: dict[int, ImageRecord],
                  unreadable: dict[int, dict[str, Any]]) -> None:
    """Give each detection its image's key, or a status saying why it cannot be refined: an unknown
    or unreadable image, a zero-size box, a box entirely outside its image."""
    for d in dets:
        d.key = index.key_of(d)
        if d.key in unreadable:
            d.status, d.detail = UNREADABLE, unreadable[d.key]["reason"]
        elif d.key is None or d.key not in records:
            d.status, d.detail = UNKNOWN, f"no such image in {index.source}"
        else:
            h, w = records[d.key].height, records[d.key].width
            x0, y0, x1, y1 = d.box
            if x1 <= x0 or y1 <= y0:
                d.status, d.detail = ZERO_SIZE, "zero-size box"
            elif x0 >= w or y0 >= h or x1 <= 0 or y1 <= 0:
                d.status, d.detail = OUTSIDE, f"box lies outside the {w}x{h} image"


def apply_min_score(dets: list[RefineDetection], min_score: float) -> None:
    """Mark detections scoring below ``min_score`` (no score counts as 1.0) to be passed through."""
    for d in dets:
        if d.status is None and (d.score if d.score is not None else 1.0) < min_score:
            d.status, d.detail = LOW_SCORE, f"score {d.score} below min_score {min_score}"


def check_output(out: Path, inputs: dict[str, Path | None]) -> None:
    """Refuse, before any work, an output path that names one of the run's ``inputs`` ({what: path}; the
    same file also through a symlink, ``..`` or a hard link), a folder, or a file in a folder that does
    not exist: refine never overwrites its input, and a bad path is not found out after the work."""
    real = out.resolve()
    for what, path in inputs.items():
        if path is None:
            continue
        same = real == path.resolve()
        if not same and out.exists() and path.exists():
            same = os.path.samefile(out, path)
        if same:
            raise RefineError(f"{out}: the output is the {what} ({path}); refine never overwrites its input: "
                              "give --out another file")
    if out.is_dir():
        raise RefineError(f"{out}: the output is a folder; give --out a file name (e.g. {out / 'refined.json'})")
    parent = real.parent
    if not parent.is_dir():
        why = "is not a folder" if parent.exists() else "does not exist"
        raise RefineError(f"{out}: cannot write the output: the folder {parent} {why}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RefineError(f"{out}: cannot write the output: the folder {parent} is not writable")
