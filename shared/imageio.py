"""Image decoding for the extract stage (the only stage that opens image files)."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from boxrefine.shared.errors import BoxrefineError
from boxrefine.shared.fileio import read_bytes


class ImageError(BoxrefineError, ValueError):
    """An image that cannot be used; the message names the file and the reason."""


def source_fingerprint(path: Path) -> tuple[int, int]:
    """(size in bytes, mtime in ns) of an image file: cheap change detection without hashing."""
    st = os.stat(path)
    return int(st.st_size), int(st.st_mtime_ns)


def _jpeg_truncated(data: bytes) -> bool:
    """True when a JPEG has no end-of-image marker after its first scan. Segments before the scan
    are skipped by their lengths (an EXIF thumbnail holds markers of its own); inside entropy-coded
    data 0xFF is stuffed as FF00, so an FFD9 after the scan start is the real EOI. Data appended
    after EOI (e.g. "motion photos") is fine."""
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return False  # not a marker where one should be: let the decoder judge
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:  # start of scan
            return data.find(b"\xff\xd9", pos) == -1
        if 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a length
            pos += 2
            continue
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return True  # ran out of data before the scan


def decode_rgb(data: bytes, name: str | Path = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes to H×W×3 uint8 RGB, as HQ-SAM expects.

    EXIF orientation is applied (the annotation frame is the displayed image); 16-bit images are
    scaled to 8 bits (÷257); grayscale is replicated to three channels; alpha is dropped.
    """
    if not data:
        raise ImageError(f"{name}: empty file")
    if data[:2] == b"\xff\xd8" and _jpeg_truncated(data):
        # libjpeg decodes a truncated JPEG to a grey-filled image with only a warning; refuse it.
        raise ImageError(f"{name}: truncated JPEG (no end-of-image marker after the image data)")
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    if arr is None:
        raise ImageError(f"{name}: cannot decode image (corrupt, truncated or unsupported format)")
    if arr.dtype == np.uint16:
        arr = ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise ImageError(f"{name}: unsupported pixel type {arr.dtype} (need 8- or 16-bit integers)")
    if arr.ndim == 2:
        arr = cv2.cvtColor(arr, cv2.COLOR_GRAY2RGB)
    elif arr.shape[2] == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    elif arr.shape[2] == 4:
        arr = cv2.cvtColor(arr, cv2.COLOR_BGRA2RGB)
    else:
        raise ImageError(f"{name}: unsupported channel count {arr.shape[2]}")
    return np.ascontiguousarray(arr)


def read_rgb(path: Path) -> np.ndarray:
    """Read an image file to H×W×3 uint8 RGB; :class:`ImageError` names the file and the reason."""
    return decode_rgb(read_bytes(path, ImageError), path)
