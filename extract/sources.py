"""The images of a split: a COCO file's records, or an *images-only* split without ground truth.

A split with annotations is its COCO instances file (``load_coco``). An images-only split is either
a folder (``data.splits.<name>.annotations`` not set: every image below it, recursively, with one of
``IMAGE_EXTENSIONS``, image ids 1..N in path order) or a COCO file with images and no annotations.
Either way its sizes come from the image headers (PIL reads no pixels; EXIF quarter turns swap them
as the decoder does), and an image whose header cannot be read is reported as bad and gets no row.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from boxrefine.shared.config import SplitConfig
from boxrefine.shared.data.imageio import IMAGE_EXTENSIONS, header_size, read_rgb
from boxrefine.shared.data.intensity import ImageError
from boxrefine.shared.data.records import DataError, SplitRecords, images_only_record, load_coco, resolve_image


def split_records(split_cfg: SplitConfig) -> tuple[SplitRecords, dict[int, dict[str, str]]]:
    """(the split's records, {key: {"file", "reason", "image_id"}} of images-only files whose size is
    unknown: they get no row)."""
    if split_cfg.annotations is None:
        return folder_records(split_cfg.images)
    recs = load_coco(split_cfg.annotations, allow_images_only=True)
    return (recs, {}) if recs.ground_truth else sized(recs, split_cfg.images)


def list_images(root: Path) -> list[str]:
    """Image files below ``root`` (POSIX paths relative to it, sorted); hidden files and folders skipped."""
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found" if not root.exists() else f"{root}: not a folder")
    names = []
    for folder, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        names += [Path(folder, f).relative_to(root).as_posix() for f in files
                  if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(names)


def folder_records(root: Path) -> tuple[SplitRecords, dict[int, dict[str, str]]]:
    """An images-only split of every image below ``root``; image ids are 1..N in path order."""
    names = list_images(root)
    if not names:
        raise DataError(f"{root}: no images in this folder or below (looked for {', '.join(IMAGE_EXTENSIONS)})")
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()
    records = tuple(images_only_record(i + 1, name, 0, 0) for i, name in enumerate(names))
    return sized(SplitRecords(None, digest, records, (), ground_truth=False), root)


def sized(recs: SplitRecords, root: Path) -> tuple[SplitRecords, dict[int, dict[str, str]]]:
    """Images-only records with their sizes read from the image headers (a file whose header PIL
    cannot read is decoded instead; one that cannot be decoded either is reported and left out)."""
    out, bad = [], {}
    for r in recs.images:
        try:
            path = resolve_image(root, r.file_name)
            try:
                h, w = header_size(path)
            except ImageError:
                if not path.is_file():
                    raise
                h, w = read_rgb(path).shape[:2]  # formats PIL does not know, but the decoder does
        except (ImageError, DataError) as e:
            bad[r.key] = {"file": r.file_name, "reason": str(e), "image_id": r.image_id}
            continue
        out.append(images_only_record(r.image_id, r.file_name, h, w))
    return SplitRecords(recs.annotations, recs.sha256, tuple(out), recs.categories, ground_truth=False), bad
