"""Image decoding for the extract stage (the only stage that opens image files)."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from boxrefine.shared.data.intensity import ImageError, Intensity
from boxrefine.shared.runtime.fileio import read_bytes


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


def is_8bit_file(path: Path) -> bool:
    """Whether an image file holds 8-bit samples (no intensity mapping applies to it). JPEG and PNG
    are told from their headers; other formats are decoded."""
    with open(path, "rb") as f:
        head = f.read(26)
    if head[:2] == b"\xff\xd8":
        return True
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 25:
        return head[24] <= 8  # IHDR bit depth
    arr = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    return arr is not None and arr.dtype == np.uint8


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")  # an images-only folder's files


def header_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image as :func:`decode_rgb` will decode it, from the file header alone
    (PIL reads no pixels): EXIF orientations 5-8 (a quarter turn) swap the two, as the decoder
    applies them. :class:`ImageError` names a file whose header cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
            try:
                orientation = im.getexif().get(0x0112)
            except Exception:  # a damaged EXIF block: the decoder will not rotate either
                orientation = None
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: cannot read the image header ({e})") from None
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def grey_levels(rgb: np.ndarray) -> int:
    """How many distinct values an 8-bit image holds (over all channels)."""
    return int(np.count_nonzero(np.bincount(rgb.ravel(), minlength=256)))


def _tiff_samples_per_pixel(data: bytes) -> int | None:
    """SamplesPerPixel (tag 277) of a TIFF's first image, read from its header; None if not a TIFF."""
    order = {b"II": "<", b"MM": ">"}.get(data[:2])
    if order is None or len(data) < 8 or int.from_bytes(data[2:4], "little" if order == "<" else "big") != 42:
        return None
    end = "little" if order == "<" else "big"
    ifd = int.from_bytes(data[4:8], end)
    if ifd + 2 > len(data):
        return None
    for k in range(int.from_bytes(data[ifd:ifd + 2], end)):
        entry = data[ifd + 2 + 12 * k: ifd + 14 + 12 * k]
        if len(entry) == 12 and int.from_bytes(entry[:2], end) == 277:
            return int.from_bytes(entry[8:10], end)  # a SHORT value, left-justified in the field
    return 1


def decode_rgb(data: bytes, name: str | Path = "<bytes>", intensity: Intensity | None = None) -> np.ndarray:
    """Decode encoded image bytes to H×W×3 uint8 RGB, as HQ-SAM expects.

    EXIF orientation is applied (the annotation frame is the displayed image); alpha is dropped;
    images that are not 8-bit (12/16-bit, float TIFF) are mapped to 8 bits by ``intensity``
    (default: each image's 0.5–99.5 percentiles, see :class:`Intensity`); grayscale is replicated to
    three channels. More than 4 channels is an error.
    """
    if not data:
        raise ImageError(f"{name}: empty file")
    if data[:2] == b"\xff\xd8" and _jpeg_truncated(data):
        # libjpeg decodes a truncated JPEG to a grey-filled image with only a warning; refuse it.
        raise ImageError(f"{name}: truncated JPEG (no end-of-image marker after the image data)")
    samples = _tiff_samples_per_pixel(data)
    if samples is not None and samples > 4:
        raise ImageError(f"{name}: unsupported channel count {samples} (1, 3 or 4 channels: grayscale, RGB, "
                         "RGBA); save the channels to use as an RGB image")
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    if arr is None:
        raise ImageError(f"{name}: cannot decode image (corrupt, truncated or unsupported format)")
    if arr.ndim == 3 and arr.shape[2] not in (1, 3, 4):
        raise ImageError(f"{name}: unsupported channel count {arr.shape[2]} (1, 3 or 4 channels)")
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]  # BGRA: the alpha channel is not part of the picture HQ-SAM sees
    arr = (intensity or Intensity()).to_uint8(arr, name)
    if arr.ndim == 2 or arr.shape[2] == 1:
        arr = cv2.cvtColor(arr, cv2.COLOR_GRAY2RGB)
    else:
        arr = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(arr)


def read_rgb(path: Path, intensity: Intensity | None = None) -> np.ndarray:
    """Read an image file to H×W×3 uint8 RGB; :class:`ImageError` names the file and the reason."""
    return decode_rgb(read_bytes(path, ImageError), path, intensity)
