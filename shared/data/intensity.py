"""How pixels that are not 8-bit become the 8-bit RGB HQ-SAM expects (``data.intensity``): plain numpy,
no image decoding, so that the config can name a mapping without importing an image library."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from boxrefine.shared.errors import BoxrefineError


class ImageError(BoxrefineError, ValueError):
    """An image that cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class Intensity:
    """How an image that is not 8-bit becomes the 8-bit RGB HQ-SAM expects (``data.intensity``).

    - ``percentile`` (default): each image's own [p_lo, p_hi] percentiles (over all colour channels)
      map linearly to 0–255, clipped; micro-sam and napari normalise the same way.
    - ``range``: a fixed [lo, hi] maps to 0–255 (absolute intensities stay comparable across images).
    - ``none``: 16-bit ÷ 257, as a plain converter would; float images are refused.

    8-bit images are never remapped. The mapping changes the features, so :attr:`fingerprint` is part
    of the store identity.
    """

    mode: str = "percentile"
    percentiles: tuple[float, float] = (0.5, 99.5)
    range: tuple[float, float] | None = None

    @property
    def fingerprint(self) -> str:
        if self.mode == "percentile":
            return f"percentile:{self.percentiles[0]:g}-{self.percentiles[1]:g}"
        if self.mode == "range":
            assert self.range is not None
            return f"range:{self.range[0]:g}-{self.range[1]:g}"
        return "none"

    def to_uint8(self, arr: np.ndarray, name: str | Path) -> np.ndarray:
        """H×W or H×W×C pixels of any integer or float type → uint8, per :attr:`mode`."""
        if arr.dtype == np.uint8:
            return arr
        if arr.dtype.kind not in "uif":
            raise ImageError(f"{name}: unsupported pixel type {arr.dtype}")
        if self.mode == "none":
            if arr.dtype != np.uint16:
                raise ImageError(f"{name}: pixel type {arr.dtype} needs data.intensity.mode percentile or range "
                                 "(mode none only converts 8- and 16-bit integers)")
            return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
        a = arr.astype(np.float32 if arr.dtype.itemsize <= 4 else np.float64)
        finite = np.isfinite(a)
        if not finite.any():
            raise ImageError(f"{name}: no finite pixel values")
        if self.mode == "range":
            assert self.range is not None
            lo, hi = self.range
        else:
            lo, hi = (float(v) for v in np.percentile(a[finite], self.percentiles))
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        out = np.clip((np.where(finite, a, lo) - lo) * scale, 0, 255) + 0.5
        return out.astype(np.uint8)
