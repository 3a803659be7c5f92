"""Dataset records: COCO instances JSON → :class:`ImageRecord` per image.

Rows of the feature store are keyed by :func:`image_key`, a hash of the image path relative to the
image root, so a store survives the dataset moving to another folder or machine.

Malformed input raises :class:`DataError` with one line naming the file and the problem.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from boxrefine.shared.errors import BoxrefineError
from boxrefine.shared.runtime.fileio import read_bytes


class DataError(BoxrefineError, ValueError):
    """Bad input data: the message names the file and the problem on one line."""


@dataclass(frozen=True)
class Instance:
    """One COCO annotation. ``box`` is xyxy in original image pixels, clipped to the image (as its mask
    is): a box reaching outside the image is cut at its edges, one wholly outside has zero size."""

    ann_id: int
    category_id: int
    box: tuple[float, float, float, float]
    iscrowd: int
    segmentation: Any


@dataclass(frozen=True)
class ImageRecord:
    """One image of a split, as the COCO file describes it."""

    image_id: int
    file_name: str  # POSIX path relative to the split's image root
    key: int  # image_key(file_name), a positive int64
    height: int
    width: int
    instances: tuple[Instance, ...]
    ann_hash: int  # positive int64 hash of this image's annotations (changes → GT recomputed)


@dataclass(frozen=True)
class SplitRecords:
    annotations: Path | None  # None: an image folder without a COCO file
    sha256: str  # fingerprint of the annotations file (of the file listing for a folder)
    images: tuple[ImageRecord, ...]
    categories: tuple[dict[str, Any], ...]
    ground_truth: bool = True  # False: images only (no annotations), nothing to train on or score
    clipped: tuple[int, ...] = ()  # ids of the annotations whose box reached outside the image (clipped)
    emptied: tuple[int, ...] = ()  # of those, the boxes wholly outside the image (zero size once clipped)


def _int63(data: bytes) -> int:
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little") & ((1 << 63) - 1)


def image_key(file_name: str) -> int:
    """Row key of an image: 63 bits of sha256 of its POSIX path relative to the image root."""
    return _int63(file_name.encode("utf-8"))


def safe_relpath(file_name: str, source: str | Path = "") -> str:
    """Normalise a COCO ``file_name`` (``a/./b``, ``a//b``, ``a\\b`` and ``a/../b`` are taken apart by name);
    refuse absolute paths and anything whose name leads out of the image root. Where the file really
    is (symlinks) is :func:`resolve_image`'s check."""
    prefix = f"{source}: " if source else ""
    if not isinstance(file_name, str) or not file_name.strip():
        raise DataError(f"{prefix}empty or non-string file_name {file_name!r}")
    if "\x00" in file_name:
        raise DataError(f"{prefix}file_name {file_name!r} contains a NUL byte")
    win = PureWindowsPath(file_name)
    if file_name.startswith(("/", "\\")) or win.drive or PurePosixPath(file_name).is_absolute():
        raise DataError(f"{prefix}file_name {file_name!r} is absolute; it must be relative to the image root")
    parts: list[str] = []
    for p in file_name.replace("\\", "/").split("/"):
        if p == "..":
            if not parts:
                raise DataError(f"{prefix}file_name {file_name!r} escapes the image root ('..')")
            parts.pop()
        elif p not in ("", "."):
            parts.append(p)
    if not parts:
        raise DataError(f"{prefix}file_name {file_name!r} names no file")
    return "/".join(parts)


@functools.lru_cache(maxsize=64)
def _real_root(root: Path) -> Path:
    return root.resolve()


def resolve_image(root: Path, file_name: str) -> Path:
    """Path of an image under ``root``. The file's real path (symlinks followed) must lie under the
    root's real path too: a symlink leading outside it is a DataError naming both, and is never read."""
    path = root.joinpath(*safe_relpath(file_name).split("/"))
    real, real_root = path.resolve(), _real_root(root)
    if not real.is_relative_to(real_root):
        raise DataError(f"{path}: a symlink leading outside the image root {root} (to {real}); not read")
    return path


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _need(cond: bool, path: Path, where: str, problem: str) -> None:
    if not cond:
        raise DataError(f"{path}: {where}: {problem}")


def _need_fields(obj: Any, keys: tuple[str, ...], path: Path, where: str) -> None:
    _need(isinstance(obj, dict), path, where, "not an object")
    for k in keys:
        _need(k in obj, path, where, f"missing '{k}'")


def is_number(x: Any) -> bool:
    """A finite JSON number (not a bool): the check of every number read from a COCO or results file."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def is_integral(x: Any) -> bool:
    """A JSON integer, or a float with an integral value (``3.0``), not a bool."""
    return (isinstance(x, int) and not isinstance(x, bool)) or (isinstance(x, float) and x.is_integer())


def load_coco(path: Path, allow_images_only: bool = False) -> SplitRecords:
    """Read and validate a COCO instances file.

    ``allow_images_only``: a file with images and no annotations (the ``annotations`` key missing or
    an empty list) is accepted as an *images-only* split (``SplitRecords.ground_truth`` False); its
    images may leave out width/height (0 in the records: the caller reads them from the image
    headers, ``images_only_record``)."""
    data_bytes = read_bytes(path, DataError, "annotations file")
    try:
        data = json.loads(data_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON: {e}") from None
    _need(isinstance(data, dict), path, "top level", "expected a COCO object with 'images' and 'annotations'")
    images_only = allow_images_only and not data.get("annotations")
    if images_only:
        data = {**data, "annotations": []}
    for k in ("images", "annotations"):
        _need(isinstance(data.get(k), list), path, k, "missing or not a list")
    categories = data.get("categories", [])
    _need(isinstance(categories, list), path, "categories", "not a list")

    images = _checked_images(path, data["images"], images_only)
    for i, ann in enumerate(data["annotations"]):
        _check_annotation(path, f"annotations[{i}]", ann, images)
        images[ann["image_id"]]["anns"].append(ann)
    records = [_record(im) for im in sorted(images.values(), key=lambda r: r["file_name"])]
    if images_only:
        records = [images_only_record(r.image_id, r.file_name, r.height, r.width) for r in records]
    keys = {r.key for r in records}
    _need(len(keys) == len(records), path, "images", "two file names hash to the same key (rename one)")
    clipped, emptied = _clipped(data["annotations"], images)
    return SplitRecords(path, hashlib.sha256(data_bytes).hexdigest(), tuple(records),
                        tuple(c for c in categories if isinstance(c, dict)), ground_truth=not images_only,
                        clipped=clipped, emptied=emptied)


def clip_box(x: float, y: float, w: float, h: float, height: int, width: int) -> tuple[float, float, float, float]:
    """A COCO ``[x, y, w, h]`` box as xyxy clipped to a ``height`` × ``width`` image."""
    return (min(max(x, 0.0), width), min(max(y, 0.0), height), min(max(x + w, 0.0), width),
            min(max(y + h, 0.0), height))


def _clipped(anns: list[dict[str, Any]], images: dict[int, dict[str, Any]]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(ids of the annotations whose box reaches outside its image, ids of those wholly outside it)."""
    clipped, emptied = [], []
    for ann in anns:
        im = images[ann["image_id"]]
        x, y, w, h = (float(v) for v in ann["bbox"])
        x0, y0, x1, y1 = clip_box(x, y, w, h, im["height"], im["width"])
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            clipped.append(int(ann["id"]))
            if (x1 <= x0 or y1 <= y0) and w > 0 and h > 0:
                emptied.append(int(ann["id"]))
    return tuple(clipped), tuple(emptied)


def _checked_images(path: Path, entries: list[Any], images_only: bool) -> dict[int, dict[str, Any]]:
    """The ``images`` of a COCO file by id, each checked (an images-only split may leave out the size:
    0, read from the image header later), with its file name made safe and an empty ``anns`` list."""
    images: dict[int, dict[str, Any]] = {}
    names: dict[str, int] = {}
    for i, im in enumerate(entries):
        where = f"images[{i}]"
        _need_fields(im, ("id", "file_name") if images_only else ("id", "file_name", "width", "height"), path, where)
        _need(isinstance(im["id"], int) and not isinstance(im["id"], bool), path, where, "id must be an integer")
        _need(im["id"] not in images, path, where, f"duplicate image id {im['id']}")
        for k in ("width", "height"):
            if images_only and im.get(k) is None:
                im = {**im, k: 0}  # unknown: read from the image header
                continue
            _need(isinstance(im[k], int) and im[k] > 0, path, where, f"{k} must be a positive integer")
        try:
            rel = safe_relpath(im["file_name"])
        except DataError as e:
            raise DataError(f"{path}: {where}: {e}") from None
        _need(rel not in names, path, where, f"file_name {rel!r} listed twice (ids {names.get(rel)} and {im['id']})")
        names[rel] = im["id"]
        images[im["id"]] = {**im, "file_name": rel, "anns": []}
    return images


def _check_annotation(path: Path, where: str, ann: Any, images: dict[int, dict[str, Any]]) -> None:
    _need_fields(ann, ("id", "image_id", "category_id", "bbox"), path, where)
    for k in ("id", "image_id", "category_id"):
        _need(is_integral(ann[k]), path, where, f"{k} must be an integer, got {ann[k]!r}")
    _need(ann.get("iscrowd", 0) in (0, 1), path, where, f"iscrowd must be 0 or 1, got {ann.get('iscrowd')!r}")
    _need(ann["image_id"] in images, path, where, f"image_id {ann['image_id']!r} is not in 'images'")
    bbox = ann["bbox"]
    _need(isinstance(bbox, list) and len(bbox) == 4 and all(is_number(v) for v in bbox),
          path, where, f"bbox must be [x, y, w, h] numbers, got {bbox!r}")
    _need(bbox[2] >= 0 and bbox[3] >= 0, path, where, f"bbox has negative size {bbox!r}")


def _record(im: dict[str, Any]) -> ImageRecord:
    """An image with its annotations (sorted by id) as a record; its ``ann_hash`` covers the
    annotations and the image size."""
    insts = []
    for ann in sorted(im["anns"], key=lambda a: a["id"]):
        box = clip_box(*(float(v) for v in ann["bbox"]), im["height"], im["width"])
        insts.append(Instance(int(ann["id"]), int(ann["category_id"]), box, int(ann.get("iscrowd", 0)),
                              ann.get("segmentation")))
    blob = json.dumps([[a.ann_id, a.category_id, a.box, a.iscrowd, a.segmentation] for a in insts],
                      sort_keys=True, separators=(",", ":")).encode()
    blob += f"|{im['height']}x{im['width']}".encode()
    return ImageRecord(int(im["id"]), im["file_name"], image_key(im["file_name"]), int(im["height"]),
                       int(im["width"]), tuple(insts), _int63(blob))


def images_only_record(image_id: int, file_name: str, height: int, width: int) -> ImageRecord:
    """The record of an image without annotations (no instances; its hash depends on the size only)."""
    return ImageRecord(image_id, file_name, image_key(file_name), height, width, (),
                       _int63(f"images-only|{height}x{width}".encode()))


def instance_mask(inst: Instance, height: int, width: int) -> np.ndarray:
    """Binary mask (H×W uint8) of one instance at the original resolution.

    Polygons, uncompressed and compressed RLE are accepted; an annotation without a segmentation
    gets its box filled (clipped to the image), so box-only datasets still evaluate.
    """
    seg = inst.segmentation
    if seg is None or seg == [] or seg == {}:
        m = np.zeros((height, width), np.uint8)
        x0, y0, x1, y1 = inst.box
        # clipped to the image: a negative start would be a numpy index from the far edge
        c0, c1 = max(0, int(np.floor(x0))), min(width, int(np.ceil(x1)))
        r0, r1 = max(0, int(np.floor(y0))), min(height, int(np.ceil(y1)))
        if c1 > c0 and r1 > r0:
            m[r0:r1, c0:c1] = 1
        return m
    if isinstance(seg, list):
        rles = mask_utils.frPyObjects(seg, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, height, width)
    elif isinstance(seg, dict):
        rle = dict(seg)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise DataError(f"annotation {inst.ann_id}: unsupported segmentation type {type(seg).__name__}")
    m = mask_utils.decode(rle)
    if m.shape != (height, width):
        raise DataError(f"annotation {inst.ann_id}: mask is {m.shape[1]}x{m.shape[0]}, image is {width}x{height}")
    return m.astype(np.uint8)
