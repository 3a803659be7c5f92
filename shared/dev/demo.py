"""Built-in synthetic demo dataset: "mushroom" photos in COCO instances format.

The generator paints forest-floor backgrounds (smooth colour gradient, blurred low-frequency
blobs, a few leaves and fine grain) and drops 3-8 mushroom-like objects on each image. An object
is a pale stem under a cap; the cap is brown/tan for category 1 ("mushroom") or red with white
spots for category 2 ("toadstool"). Objects are painted one after another, so later objects
occlude earlier ones: every instance mask holds only the instance's *visible* pixels, the masks
of one image are disjoint, and objects near the border are cut by it.

Layout written under ``out``::

    images/train/train_0000.jpg ...     images/val/val_0000.jpg ...
    annotations/instances_{train,val}.json   COCO instances (RLE masks with str counts)
    annotations/detections_{train,val}.json  COCO results: one noisy "coarse" box per GT

File formats vary on purpose so that image readers get exercised: in ``train`` index 1 is an
8-bit grayscale PNG, index 2 an RGBA PNG (opaque alpha) and index 3 a 16-bit RGB PNG (8-bit
value * 257); in ``val`` index 1 is an 8-bit RGB PNG; all other images are JPEG (quality 90).
Annotations are in the pixel frame of the written file.

Everything is seeded: each image draws from its own ``np.random.default_rng((seed, split, index))``,
so the same seed gives byte-identical JSON and identical pixels, and an image does not depend on
how many other images are generated.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils

CATEGORIES = [
    {"id": 1, "name": "mushroom", "supercategory": "fungus"},
    {"id": 2, "name": "toadstool", "supercategory": "fungus"},
]
IMAGE_SIZES = [(640, 480), (480, 640), (800, 600), (512, 512), (720, 540), (400, 560), (960, 640), (600, 800)]
MIN_AREA = 50  # instances with fewer visible pixels are dropped
MIN_SIDE = 5  # ... and so are slivers whose tight box is thinner than this (keeps detections valid)
MIN_INSTANCES, MAX_INSTANCES = 3, 8
_SPLIT_IDS = {"train": 0, "val": 1}
_JPEG_PARAMS = [cv2.IMWRITE_JPEG_QUALITY, 90]
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 3]


# --------------------------------------------------------------------------------------------- drawing


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Forest-floor texture as float32 RGB (0..255), without the fine grain (added last)."""
    browns = np.array([[92, 70, 45], [120, 92, 60], [70, 55, 38], [105, 85, 50]], np.float32)
    greens = np.array([[70, 90, 50], [55, 75, 40], [95, 105, 60]], np.float32)
    c0 = browns[rng.integers(len(browns))] * rng.uniform(0.8, 1.2)
    c1 = (greens if rng.random() < 0.5 else browns)[rng.integers(3)] * rng.uniform(0.8, 1.2)
    theta = rng.uniform(0, 2 * math.pi)
    xs = np.linspace(-0.5, 0.5, w, dtype=np.float32)
    ys = np.linspace(-0.5, 0.5, h, dtype=np.float32)
    t = np.clip(math.cos(theta) * xs[None, :] + math.sin(theta) * ys[:, None] + 0.5, 0, 1)
    img = c0 + (c1 - c0) * t[..., None]
    # low- and mid-frequency blobs: small noise grids upsampled smoothly
    for cells, amp in ((4, 22.0), (12, 12.0)):
        gw, gh = max(2, cells * w // max(w, h)), max(2, cells * h // max(w, h))
        grid = rng.normal(0.0, 1.0, (gh, gw, 3)).astype(np.float32)
        grid = grid[..., :1] + 0.3 * grid[..., 1:2] * np.array([-0.3, 1.0, -0.5], np.float32)  # luma + green
        img += amp * cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    # a few fallen leaves / twigs
    for _ in range(int(rng.integers(6, 16))):
        col = (browns[rng.integers(len(browns))] * rng.uniform(0.5, 1.3)).tolist()
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(4, max(5, w // 18))), int(rng.integers(2, max(3, h // 50))))
        cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, col, -1, cv2.LINE_AA)
    return cv2.GaussianBlur(img, (0, 0), 1.2)


def _mushroom(rng: np.random.Generator, size: float, category: int) -> tuple[np.ndarray, np.ndarray]:
    """Paint one object centred in a square local canvas; return (float32 RGB, bool mask)."""
    side = int(math.ceil(1.6 * size)) + 6
    c = side / 2.0
    rgb = np.zeros((side, side, 3), np.float32)
    mask = np.zeros((side, side), np.uint8)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    cap_w = size * rng.uniform(0.7, 1.1)
    cap_h = size * (rng.uniform(0.28, 0.42) if category == 1 else rng.uniform(0.38, 0.5))
    stem_w = cap_w * rng.uniform(0.2, 0.34)
    stem_h = size * rng.uniform(0.45, 0.7)
    top = c - (cap_h + stem_h) / 2.0
    base = top + cap_h  # y of the cap's underside
    mask |= _paint_stem(rng, rgb, xx, yy, c, base, cap_h, stem_w, stem_h)
    mask |= _paint_cap(rng, rgb, xx, yy, c, top, base, cap_w, cap_h, category)
    return _tilt(rng, rgb, mask, c, side)


def _paint_stem(rng: np.random.Generator, rgb: np.ndarray, xx: np.ndarray, yy: np.ndarray, c: float, base: float,
                cap_h: float, stem_w: float, stem_h: float) -> np.ndarray:
    """The stem (a slightly flared trapezoid with a rounded foot, cylinder shading) painted into
    ``rgb``; its mask."""
    stem = np.zeros(rgb.shape[:2], np.uint8)
    y0, y1 = int(round(base - 0.3 * cap_h)), int(round(base + stem_h))
    hw_top, hw_bot = stem_w / 2.0, stem_w / 2.0 * rng.uniform(1.0, 1.35)
    poly = np.array([[c - hw_top, y0], [c + hw_top, y0], [c + hw_bot, y1], [c - hw_bot, y1]], np.float32)
    cv2.fillPoly(stem, [poly.round().astype(np.int32)], 1)
    cv2.ellipse(stem, (int(round(c)), y1), (max(1, int(round(hw_bot))), max(1, int(round(stem_w * 0.2)))),
                0, 0, 360, 1, -1)
    stem_col = np.array([232, 222, 200], np.float32) * rng.uniform(0.85, 1.05)
    shade = 0.72 + 0.32 * np.cos(np.clip((xx - c) / max(hw_bot, 1.0), -1, 1) * math.pi / 2)
    shade = shade - 0.12 * np.clip((yy - y0) / max(y1 - y0, 1), 0, 1)  # darker towards the ground
    sel = stem > 0
    rgb[sel] = stem_col * shade[sel, None]
    return stem


def _paint_cap(rng: np.random.Generator, rgb: np.ndarray, xx: np.ndarray, yy: np.ndarray, c: float, top: float,
               base: float, cap_w: float, cap_h: float, category: int) -> np.ndarray:
    """The cap (an upper half-ellipse and a flat lower rim; gills on brown mushrooms, white spots on
    red ones) painted into ``rgb``; its mask."""
    cap = np.zeros(rgb.shape[:2], np.uint8)
    ax = (max(2, int(round(cap_w / 2))), max(2, int(round(cap_h))))
    rim = (ax[0], max(1, int(round(cap_h * rng.uniform(0.12, 0.22)))))
    cx, cy = int(round(c)), int(round(base))
    cv2.ellipse(cap, (cx, cy), ax, 0, 180, 360, 1, -1)
    cv2.ellipse(cap, (cx, cy), rim, 0, 0, 360, 1, -1)
    if category == 1:
        cap_col = np.array([150, 100, 55], np.float32) * rng.uniform(0.7, 1.25, 3).astype(np.float32)
    else:
        cap_col = np.array([200, 30, 25], np.float32) * rng.uniform(0.8, 1.1, 3).astype(np.float32)
    hx, hy = c - 0.25 * cap_w, top + 0.3 * cap_h  # highlight, light from the upper left
    dist = np.sqrt((xx - hx) ** 2 + (yy - hy) ** 2) / max(0.8 * cap_w, 1.0)
    shade = np.clip(1.18 - 0.55 * dist, 0.45, 1.2)
    sel = cap > 0
    rgb[sel] = cap_col * shade[sel, None]
    marks = np.zeros_like(cap)
    if category == 1:  # gill band under the cap
        cv2.ellipse(marks, (cx, cy), (int(ax[0] * 0.9), rim[1]), 0, 0, 180, 1, -1)
        rgb[(marks > 0) & sel] = cap_col * 0.55
        return cap
    for _ in range(int(rng.integers(3, 8))):  # white spots, clipped to the cap
        sx = c + rng.uniform(-0.4, 0.4) * cap_w
        sy = base - rng.uniform(0.15, 0.85) * cap_h
        r = max(1, int(round(cap_w * rng.uniform(0.04, 0.09))))
        cv2.circle(marks, (int(round(sx)), int(round(sy))), r, 1, -1)
    spots = (marks > 0) & sel
    rgb[spots] = np.array([245, 242, 235], np.float32) * shade[spots, None].clip(0.8, 1.0)
    return cap


def _tilt(rng: np.random.Generator, rgb: np.ndarray, mask: np.ndarray, c: float, side: int
          ) -> tuple[np.ndarray, np.ndarray]:
    """The painted object turned by a small random angle: (RGB, bool mask)."""
    rot = cv2.getRotationMatrix2D((c, c), float(rng.uniform(-25, 25)), 1.0)
    rgb = cv2.warpAffine(rgb, rot, (side, side), flags=cv2.INTER_LINEAR)
    cover = cv2.warpAffine(mask.astype(np.float32), rot, (side, side), flags=cv2.INTER_LINEAR)
    rgb /= np.maximum(cover, 1e-3)[..., None]  # un-premultiply: no dark fringe from the black canvas
    mask = cv2.warpAffine(mask, rot, (side, side), flags=cv2.INTER_NEAREST)
    return rgb, mask.astype(bool)


def _place(rng: np.random.Generator, w: int, h: int, size: float, centres: list) -> tuple[float, float]:
    """Choose an object centre: near an earlier object, over the border, or anywhere."""
    u = rng.random()
    if centres and u < 0.3:  # overlap an earlier object
        px, py, ps = centres[int(rng.integers(len(centres)))]
        return px + rng.normal(0, 0.35 * ps), py + rng.normal(0, 0.35 * ps)
    if 0.3 <= u < 0.5:  # near / over the image border (~20% of centres)
        along = rng.uniform(0, 1)
        off = rng.uniform(-0.3, 0.3) * size
        side = int(rng.integers(4))
        if side == 0:
            return off, along * h
        if side == 1:
            return w - 1 + off, along * h
        if side == 2:
            return along * w, off
        return along * w, h - 1 + off
    m = 0.3 * size
    return rng.uniform(m, w - m), rng.uniform(m, h - m)


def _tight_box(m: np.ndarray) -> list[float]:
    """Pixel-tight COCO box [x0, y0, x1-x0+1, y1-y0+1] of a boolean mask."""
    ys = np.flatnonzero(m.any(axis=1))
    xs = np.flatnonzero(m.any(axis=0))
    x0, x1, y0, y1 = int(xs[0]), int(xs[-1]), int(ys[0]), int(ys[-1])
    return [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)]


def _render_image(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, list[dict]]:
    """Render one RGB uint8 image and its visible instances (category, bool mask, box)."""
    short = min(w, h)
    while True:
        img = _background(rng, w, h)
        label = np.zeros((h, w), np.int16)  # 0 = background, k = k-th object (1-based)
        cats: list[int] = []
        centres: list[tuple[float, float, float]] = []
        for k in range(1, int(rng.integers(MIN_INSTANCES, MAX_INSTANCES + 1)) + 1):
            cat = 2 if rng.random() < 0.4 else 1
            size = float(rng.uniform(0.06, 0.35)) * short
            ox, oy = _place(rng, w, h, size, centres)
            centres.append((ox, oy, size))
            cats.append(cat)
            rgb, m = _mushroom(rng, size, cat)
            side = m.shape[0]
            x0, y0 = int(round(ox - side / 2)), int(round(oy - side / 2))
            ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x0 + side, w), min(y0 + side, h)
            if ix0 >= ix1 or iy0 >= iy1:
                continue
            lm = m[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
            img[iy0:iy1, ix0:ix1][lm] = rgb[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0][lm]
            label[iy0:iy1, ix0:ix1][lm] = k
        instances = []
        for k, cat in enumerate(cats, start=1):
            vis = label == k
            if int(vis.sum()) < MIN_AREA:
                continue
            box = _tight_box(vis)
            if box[2] < MIN_SIDE or box[3] < MIN_SIDE:
                continue
            instances.append({"category_id": cat, "mask": vis, "bbox": box})
        if len(instances) >= MIN_INSTANCES:
            break
    img += rng.normal(0.0, 5.0, img.shape).astype(np.float32)  # fine grain
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), instances


def _noisy_box(
    rng: np.random.Generator, box: list[float], w: int, h: int, r: float
) -> tuple[list[float], float] | None:
    """Coarse box from a GT box (centre shift, size jitter, clipped) and its score, or None."""
    bx, by, bw, bh = box
    cx = bx + bw / 2 + rng.uniform(-r, r) * bw
    cy = by + bh / 2 + rng.uniform(-r, r) * bh
    nw = bw * (1 + rng.uniform(-r, r))
    nh = bh * (1 + rng.uniform(-r, r))
    x0, y0 = max(0.0, cx - nw / 2), max(0.0, cy - nh / 2)
    x1, y1 = min(float(w), cx + nw / 2), min(float(h), cy + nh / 2)
    noise = rng.normal(0.0, 0.05)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    det = [x0, y0, x1 - x0, y1 - y0]
    score = round(float(np.clip(0.25 + 0.75 * box_iou(det, box) + noise, 0.01, 1.0)), 4)
    return [round(v, 2) for v in det], score


def box_iou(a: list[float], b: list[float]) -> float:
    """IoU of two COCO [x, y, w, h] boxes."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


# --------------------------------------------------------------------------------------------- writing


def _file_format(split: str, index: int) -> str:
    """Which on-disk format image ``index`` of ``split`` uses."""
    if split == "train":
        return {1: "gray", 2: "rgba", 3: "rgb16"}.get(index, "jpeg")
    return "png" if index == 1 else "jpeg"


def _write_image(path: Path, rgb: np.ndarray, fmt: str) -> np.ndarray:
    """Write ``rgb`` in ``fmt`` with cv2 (BGR order); return the pixels as written (before JPEG)."""
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if fmt == "gray":
        out = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    elif fmt == "rgba":
        out = cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA)  # alpha 255 everywhere
    elif fmt == "rgb16":
        out = bgr.astype(np.uint16) * 257
    else:
        out = bgr
    params = _JPEG_PARAMS if fmt == "jpeg" else _PNG_PARAMS
    if not cv2.imwrite(str(path), out, params):
        raise OSError(f"cv2.imwrite failed for {path}")
    return out


def _dump_json(obj: object, path: Path) -> None:
    """Compact, deterministic JSON."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=None, separators=(",", ":"))


def _generate_split(out: Path, split: str, num: int, seed: int, noise: float) -> dict:
    """Render and write one split; return {"images": n, "instances": m}."""
    img_dir = out / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    stale = re.compile(rf"^{split}_\d{{4,}}\.(jpg|png)$")
    for p in img_dir.iterdir():  # leftovers of an earlier, larger run would confuse readers
        if p.is_file() and stale.match(p.name):
            p.unlink()

    images, annotations, detections = [], [], []
    for i in range(num):
        rng = np.random.default_rng((seed % 2**64, _SPLIT_IDS[split], i))
        w, h = IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
        rgb, instances = _render_image(rng, w, h)
        fmt = _file_format(split, i)
        name = f"{split}_{i:04d}.{'jpg' if fmt == 'jpeg' else 'png'}"
        _write_image(img_dir / name, rgb, fmt)
        image_id = i + 1
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        for inst in instances:
            rle = mask_utils.encode(np.asfortranarray(inst["mask"].astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": inst["category_id"],
                    "bbox": inst["bbox"],
                    "area": float(inst["mask"].sum()),
                    "iscrowd": 0,
                    "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"]},
                }
            )
            det = _noisy_box(rng, inst["bbox"], w, h, noise)
            if det is not None:
                detections.append(
                    {
                        "image_id": image_id,
                        "category_id": inst["category_id"],
                        "bbox": det[0],
                        "score": det[1],
                    }
                )

    ann_dir = out / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    coco = {
        "info": {"description": "boxrefine synthetic mushroom demo", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    _dump_json(coco, ann_dir / f"instances_{split}.json")
    _dump_json(detections, ann_dir / f"detections_{split}.json")
    return {"images": len(images), "instances": len(annotations)}


def generate_demo(
    out: Path, num_train: int = 16, num_val: int = 8, seed: int = 0, noise: float = 0.25
) -> dict:
    """Write the synthetic demo dataset under ``out`` and return a summary.

    ``noise`` is the relative jitter r of the coarse detection boxes (centre shift and size change
    drawn from uniform(-r, r)); for r <= 0.4 every GT instance gets exactly one detection.
    """
    if num_train < 1 or num_val < 1:
        raise ValueError("num_train and num_val must be >= 1")
    if noise < 0:
        raise ValueError("noise must be >= 0")
    out = Path(out)
    splits = {
        "train": _generate_split(out, "train", num_train, seed, noise),
        "val": _generate_split(out, "val", num_val, seed, noise),
    }
    return {"out": str(out), "splits": splits}


def demo_root_of(splits: dict[str, Any]) -> Path:
    """The folder a config's ``train`` and ``val`` splits name when they follow the demo layout
    (``<root>/images/<split>``, ``<root>/annotations/instances_<split>.json``, detections beside), so
    ``make demo CONFIG=...`` writes the demo where that config reads it; ValueError naming the first
    path that does not fit."""
    roots = set()
    for name in ("train", "val"):
        sc = splits.get(name)
        if sc is None:
            raise ValueError(f"the config has no split {name!r}: the demo writes train and val")
        root = Path(sc.images).parent.parent
        want = {"images": root / "images" / name, "annotations": root / "annotations" / f"instances_{name}.json",
                "detections": root / "annotations" / f"detections_{name}.json"}
        for key, path in want.items():
            got = getattr(sc, key)
            if got is None or Path(got) != path:
                raise ValueError(f"data.splits.{name}.{key} is {got}, not {path}: not the demo layout")
        roots.add(root)
    if len(roots) != 1:
        raise ValueError(f"the train and val splits lie under different folders ({', '.join(map(str, roots))})")
    return roots.pop()
