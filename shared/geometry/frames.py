"""The frames of one image, in one object (as HQ-SAM's ``SamPredictor`` keeps ``original_size``,
``input_size``, ``apply_boxes`` and ``postprocess_masks`` together).

Frames (docs/architecture.md, "Frames"):

- **original** — the image as decoded, ``orig_hw`` = (H, W); COCO boxes, xyxy in pixels.
- **input** — longest side resized to 1024 (``ResizeLongestSide``: ``int(x * scale + 0.5)``), giving
  ``input_hw`` = (h, w), then zero-padded bottom/right to 1024×1024. Boxes map by per-axis scale
  (``sx = w / W``, ``sy = h / H``), exactly as ``apply_boxes``.
- **embedding** — 64×64; one cell = 16 input px.
- **low-res** — SAM's mask-decoder output, 256×256; one pixel = 4×4 input px, pixel (i, j) covers
  input rows [4i, 4i + 4) and columns [4j, 4j + 4). The image covers ``h / 4`` × ``w / 4`` low-res
  pixels (may be fractional); ``lowres_valid`` = (ceil(h / 4), ceil(w / 4)) are the pixels that hold
  any image content. Everything beyond is padding: never scored.

Ground truth in the low-res frame is laid out exactly as SAM lays out its masks: the coverage of
each low-res pixel by the object (the mask resized like the image to the input size, padded,
averaged over 4×4), thresholded at 0.5 (:meth:`ImageGeometry.masks_to_lowres`). SAM's
``postprocess_masks`` (:meth:`ImageGeometry.lowres_to_original`) maps it back with no shift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as nnf

from boxrefine.shared.geometry.boxes import clip_boxes, mask_boxes

IMG_SIZE = 1024  # long side of the model input
LOWRES = 256  # side of SAM's low-res mask frame
LOWRES_STRIDE = IMG_SIZE // LOWRES  # input px per low-res pixel (4)
EMBED_STRIDE = 16  # input px per embedding cell


def input_shape(h: int, w: int, long_side: int = IMG_SIZE) -> tuple[int, int]:
    """(h, w) after resizing the longest side to ``long_side``, with HQ-SAM's rounding."""
    scale = long_side * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def _integrate(a: np.ndarray, edges: np.ndarray, axis: int) -> np.ndarray:
    """Integrals of ``a`` (piecewise constant, unit cells along ``axis``) between consecutive
    fractional ``edges`` (clipped to the array: beyond it the integrand is 0). Exact: the running
    integral of a piecewise-constant function is piecewise linear, so it is interpolated linearly."""
    n = a.shape[axis]
    cum = np.cumsum(a, axis=axis, dtype=np.float64)
    cum = np.concatenate([np.zeros_like(np.take(cum, [0], axis=axis)), cum], axis=axis)  # C(k), k = 0..n
    x = np.clip(edges, 0.0, n)
    k0 = np.minimum(np.floor(x).astype(np.int64), n - 1)
    frac = x - k0
    shape = [1] * a.ndim
    shape[axis] = len(x)
    c = np.take(cum, k0, axis=axis) * (1 - frac).reshape(shape) + np.take(cum, k0 + 1, axis=axis) * frac.reshape(shape)
    return np.diff(c, axis=axis)


@dataclass(frozen=True)
class ImageGeometry:
    """Frame maps of one image. ``orig_hw`` (H, W) and ``input_hw`` (h, w) as ``SamPredictor``'s
    ``original_size`` and ``input_size``."""

    orig_hw: tuple[int, int]
    input_hw: tuple[int, int]

    @classmethod
    def of(cls, orig_h: int, orig_w: int) -> ImageGeometry:
        return cls((int(orig_h), int(orig_w)), input_shape(orig_h, orig_w))

    # ---- boxes ------------------------------------------------------------------------------
    def _box_scale(self, ref: torch.Tensor) -> torch.Tensor:
        (oh, ow), (ih, iw) = self.orig_hw, self.input_hw
        return ref.new_tensor([iw / ow, ih / oh, iw / ow, ih / oh])

    def boxes_to_input(self, boxes: torch.Tensor) -> torch.Tensor:
        """n×4 xyxy original px → input px (``ResizeLongestSide.apply_boxes``)."""
        return boxes * self._box_scale(boxes)

    def boxes_to_original(self, boxes: torch.Tensor) -> torch.Tensor:
        """n×4 xyxy input px → original px (inverse of :meth:`boxes_to_input`)."""
        return boxes / self._box_scale(boxes)

    def clip_original(self, boxes: torch.Tensor, min_size: float = 1.0) -> torch.Tensor:
        """Clip n×4 original-px boxes to the image, keeping them at least ``min_size`` wide/high."""
        return clip_boxes(boxes, self.orig_hw, min_size)

    # ---- the low-res mask frame -------------------------------------------------------------
    @property
    def lowres_valid(self) -> tuple[int, int]:
        """(rows, cols) of the 256 frame that hold any image content: ceil(h/4), ceil(w/4)."""
        return self.lowres_valid_at(LOWRES)

    def lowres_valid_at(self, size: int) -> tuple[int, int]:
        """:attr:`lowres_valid` for the same frame at ``size``×``size`` (1024/size input px a pixel)."""
        ih, iw = self.input_hw
        return math.ceil(ih * size / IMG_SIZE), math.ceil(iw * size / IMG_SIZE)

    def masks_to_lowres(self, masks: np.ndarray, size: int = LOWRES) -> np.ndarray:
        """K×H×W binary masks (original frame) → K×size×size uint8 in SAM's low-res frame.

        Each low-res pixel gets the exact share of its area the object covers (the mask resized like
        the image to the input size and zero-padded, then averaged over the pixel's cell), and is
        set where that share is ≥ 0.5. ``size`` other than 256 keeps the same frame at another
        resolution (one pixel = 1024/size input px)."""
        (oh, ow), (ih, iw) = self.orig_hw, self.input_hw
        stride = IMG_SIZE / size
        x_edges = np.arange(size + 1) * stride * ow / iw  # cell edges in original px
        y_edges = np.arange(size + 1) * stride * oh / ih
        cell = (stride * ow / iw) * (stride * oh / ih)  # cell area in original px²
        out = np.zeros((len(masks), size, size), np.uint8)
        for k, m in enumerate(masks):
            cov = _integrate(_integrate(m.astype(np.float32), x_edges, axis=1), y_edges, axis=0) / cell
            out[k] = cov >= 0.5 - 1e-9
        return out

    def lowres_to_original(self, lowres: torch.Tensor) -> torch.Tensor:
        """B×C×256×256 logits → B×C×H×W, exactly ``Sam.postprocess_masks``: bilinear to 1024,
        crop to the input size, bilinear to the original size."""
        x = nnf.interpolate(lowres.float(), (IMG_SIZE, IMG_SIZE), mode="bilinear", align_corners=False)
        x = x[..., : self.input_hw[0], : self.input_hw[1]]
        return nnf.interpolate(x, self.orig_hw, mode="bilinear", align_corners=False)

    def lowres_to_boxes(self, logits: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
        """Boxes (n×4, original px) of HQ-SAM's masks: n×256×256 low-res logits through
        :meth:`lowres_to_original`, ``> 0``, pixel-tight; padding can never widen them. Empty masks
        get their ``fallback`` box (original px)."""
        if len(logits) == 0:
            return fallback.float()
        return mask_boxes(self.lowres_to_original(logits[:, None])[:, 0] > 0, fallback.float())
