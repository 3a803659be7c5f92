"""shared/data/imageio.py: every supported file comes back as H×W×3 uint8 RGB in the displayed frame;
every unusable file raises ImageError naming the file and the reason."""

from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from boxrefine.shared.data.imageio import decode_rgb, grey_levels, read_rgb, source_fingerprint
from boxrefine.shared.data.intensity import ImageError, Intensity


def _check_rgb(a: np.ndarray, h: int, w: int) -> None:
    assert a.shape == (h, w, 3)
    assert a.dtype == np.uint8
    assert a.flags.c_contiguous


def test_grayscale_png(tmp_path: Path) -> None:
    gray = np.arange(5 * 7, dtype=np.uint8).reshape(5, 7) * 7
    p = tmp_path / "g.png"
    assert cv2.imwrite(str(p), gray)
    a = read_rgb(p)
    _check_rgb(a, 5, 7)
    for c in range(3):
        np.testing.assert_array_equal(a[..., c], gray)


@pytest.mark.parametrize("written, expected", [
    # BGR on disk: blue, green, red / a grey row
    ([[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(10, 20, 30)] * 3],
     [[(0, 0, 255), (0, 255, 0), (255, 0, 0)], [(30, 20, 10)] * 3]),
    # BGRA: opaque red, half-transparent blue, fully transparent (colour kept, not premultiplied), opaque
    ([[(0, 0, 255, 255), (255, 0, 0, 128)], [(10, 200, 30, 0), (1, 2, 3, 255)]],
     [[(255, 0, 0), (0, 0, 255)], [(30, 200, 10), (3, 2, 1)]]),
], ids=["rgb", "rgba-drops-alpha"])
def test_png_channel_order(tmp_path: Path, written: list, expected: list) -> None:
    p = tmp_path / "c.png"
    assert cv2.imwrite(str(p), np.array(written, np.uint8))
    a = read_rgb(p)
    _check_rgb(a, len(expected), len(expected[0]))
    assert a.tolist() == [[list(px) for px in row] for row in expected]


def test_16bit_png_scaled_to_8bit(tmp_path: Path) -> None:
    # every 16-bit value once, in a different place for each channel (so the order is checked too)
    v = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    bgr = np.stack([v, v[::-1], v.T], axis=-1)  # B, G, R
    p = tmp_path / "d.png"
    assert cv2.imwrite(str(p), bgr)
    a = read_rgb(p, Intensity("none"))
    _check_rgb(a, 256, 256)
    want_rgb = np.stack([bgr[..., 2], bgr[..., 1], bgr[..., 0]], axis=-1)
    want = np.round(want_rgb.astype(np.float64) / 257).astype(np.uint8)
    np.testing.assert_array_equal(a, want)
    # 8-bit × 257 (how 16-bit images are often made) comes back exactly
    exact = (v.T % 257) == 0
    assert exact.sum() == 256
    np.testing.assert_array_equal(a[..., 0][exact], (v.T[exact] // 257).astype(np.uint8))
    assert a[255, 255].tolist() == [255, 1, 255]  # R = 65535, G = 255 (→ 0.99), B = 65535


def test_16bit_grayscale_png_mode_none(tmp_path: Path) -> None:
    g = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000 + 100)
    p = tmp_path / "g16.png"
    assert cv2.imwrite(str(p), g)
    a = read_rgb(p, Intensity("none"))
    _check_rgb(a, 3, 4)
    want = np.round(g / 257).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(a[..., c], want)


def _dim_16bit(tmp_path: Path) -> Path:
    """A 16-bit grayscale microscopy-like image with values 0–235 of 65535 (a smooth blob on noise)."""
    yy, xx = np.mgrid[0:120, 0:160]
    blob = 200 * np.exp(-((xx - 80) ** 2 + (yy - 60) ** 2) / 800.0)
    g = np.clip(blob + np.random.default_rng(0).integers(0, 36, (120, 160)), 0, 235).astype(np.uint16)
    assert g.max() == 235 and g.min() == 0
    p = tmp_path / "dim16.png"
    assert cv2.imwrite(str(p), g)
    return p


def test_dim_16bit_image_spans_the_8bit_range(tmp_path: Path) -> None:
    """Values 0–235 of 65535: ÷257 made 2 grey levels; the default percentile mapping gives the
    encoder ≥ 200 grey levels (checked on what extract feeds the encoder, after ResizeLongestSide)."""
    from boxrefine.extract.loader import ImageJobs
    from boxrefine.extract.plan import Job
    from boxrefine.shared.data.records import ImageRecord

    p = _dim_16bit(tmp_path)
    assert grey_levels(read_rgb(p, Intensity("none"))) <= 2
    rec = ImageRecord(1, p.name, 1, 120, 160, (), 0)
    item = ImageJobs([Job(0, rec, p, gt_only=False)], 256)[0]
    assert "error" not in item, item
    assert len(np.unique(item["image"].numpy())) >= 200


def test_intensity_modes(tmp_path: Path) -> None:
    p = _dim_16bit(tmp_path)
    a = read_rgb(p, Intensity("percentile", (0.0, 100.0)))
    assert a.min() == 0 and a.max() == 255  # min and max of the image → 0 and 255
    r = read_rgb(p, Intensity("range", range=(0.0, 470.0)))
    assert r.max() == 128  # 235 of [0, 470] → half way
    assert Intensity().fingerprint == "percentile:0.5-99.5"
    assert Intensity("range", range=(0, 4095)).fingerprint == "range:0-4095"
    eight = tmp_path / "e.png"
    assert cv2.imwrite(str(eight), np.full((4, 4), 7, np.uint8))
    assert read_rgb(eight, Intensity("range", range=(0.0, 14.0))).max() == 7  # 8-bit images are never remapped


def test_float_tiff_is_mapped_by_its_range(tmp_path: Path) -> None:
    p = tmp_path / "f.tiff"
    f = np.linspace(-1.0, 3.0, 4 * 50 * 3, dtype=np.float32).reshape(4, 50, 3)
    f[0, 0, 0] = np.nan  # a NaN does not poison the mapping
    assert cv2.imwrite(str(p), f)
    a = read_rgb(p, Intensity("percentile", (0.0, 100.0)))
    _check_rgb(a, 4, 50)
    assert a.max() == 255 and len(np.unique(a)) > 200
    with pytest.raises(ImageError, match="float32 needs data.intensity.mode percentile or range"):
        read_rgb(p, Intensity("none"))


def _tiff(a: np.ndarray) -> bytes:
    """A minimal uncompressed little-endian TIFF of an H×W×C uint8 array (cv2 cannot write C > 4)."""
    h, w, c = a.shape
    data, n = a.tobytes(), 10
    bps = 8 + 2 + 12 * n + 4
    extra = bps + 2 * c
    tags = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, c, bps), (259, 3, 1, 1), (262, 3, 1, 1),
            (273, 4, 1, extra + 2 * (c - 1)), (277, 3, 1, c), (278, 4, 1, h), (279, 4, 1, len(data)),
            (338, 3, c - 1, extra)]
    ifd = struct.pack("<H", n) + b"".join(struct.pack("<HHII", *t) for t in tags) + struct.pack("<I", 0)
    return (b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack(f"<{c}H", *[8] * c)
            + struct.pack(f"<{c - 1}H", *[0] * (c - 1)) + data)


def test_more_than_four_channels_refused(tmp_path: Path) -> None:
    p = tmp_path / "c5.tiff"
    p.write_bytes(_tiff(np.zeros((4, 6, 5), np.uint8)))
    with pytest.raises(ImageError, match="unsupported channel count 5 .1, 3 or 4 channels"):
        read_rgb(p)


def test_jpeg_matches_pil(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rgb = cv2.GaussianBlur(rng.integers(0, 255, (48, 64, 3), np.uint8), (0, 0), 2)
    p = tmp_path / "x.jpg"
    Image.fromarray(rgb).save(p, quality=92)
    a = read_rgb(p)
    _check_rgb(a, 48, 64)
    want = np.asarray(Image.open(p).convert("RGB")).astype(int)
    assert np.abs(a.astype(int) - want).max() <= 3  # different IDCTs, same colours and orientation


def test_exif_rotated_jpeg(tmp_path: Path) -> None:
    """EXIF orientation 6 = display rotated 90° clockwise: the annotation frame is the displayed image."""
    stored = np.full((40, 60, 3), 20, np.uint8)
    stored[:12, :12] = (250, 10, 10)  # red marker top-left in the stored pixels
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = 6
    p = tmp_path / "rot.jpg"
    im.save(p, exif=exif, quality=95)

    a = read_rgb(p)
    _check_rgb(a, 60, 40)  # width and height swapped
    want = np.rot90(stored, k=-1)  # 90° clockwise: top-left → top-right
    assert np.abs(a.astype(int) - want.astype(int)).mean() < 3
    assert a[:10, -10:, 0].mean() > 200 and a[:10, -10:, 1].mean() < 50  # marker top-right, red
    assert a[:10, :10, 0].mean() < 50
    assert a[-10:, -10:, 0].mean() < 50


# --------------------------------------------------------------------------------------- bad files


def _jpeg_bytes() -> bytes:
    rng = np.random.default_rng(0)
    ok, buf = cv2.imencode(".jpg", rng.integers(0, 255, (64, 64, 3), np.uint8))
    assert ok
    return buf.tobytes()


def test_truncated_jpeg(tmp_path: Path) -> None:
    data = _jpeg_bytes()
    p = tmp_path / "cut.jpg"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as ei:
        read_rgb(p)
    assert str(ei.value).startswith(f"{p}: ")
    assert "truncated" in str(ei.value)
    # the intact file decodes
    p.write_bytes(data)
    _check_rgb(read_rgb(p), 64, 64)


def test_truncated_png(tmp_path: Path) -> None:
    ok, buf = cv2.imencode(".png", np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8))
    p = tmp_path / "cut.png"
    p.write_bytes(buf.tobytes()[:-20])
    with pytest.raises(ImageError, match="cannot decode") as ei:
        read_rgb(p)
    assert str(ei.value).startswith(str(p))


@pytest.mark.parametrize("data", [b"this is not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
                                  b"GIF89a-broken"])
def test_garbage_bytes(tmp_path: Path, data: bytes) -> None:
    p = tmp_path / "garbage.jpg"
    p.write_bytes(data)
    with pytest.raises(ImageError) as ei:
        read_rgb(p)
    assert str(ei.value).startswith(f"{p}: ")
    assert "\n" not in str(ei.value)


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.png"
    with pytest.raises(ImageError) as ei:
        read_rgb(p)
    assert str(ei.value) == f"{p}: file not found"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="is a folder") as ei:
        read_rgb(tmp_path)
    assert str(ei.value).startswith(str(tmp_path))


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(ImageError) as ei:
        read_rgb(p)
    assert str(ei.value) == f"{p}: empty file"


def test_decode_rgb_names_given_source() -> None:
    with pytest.raises(ImageError, match=r"^<bytes>: empty file$"):
        decode_rgb(b"")
    with pytest.raises(ImageError, match=r"^photo\.jpg: "):
        decode_rgb(b"junk", "photo.jpg")


def test_source_fingerprint_changes_with_content(tmp_path: Path) -> None:
    p = tmp_path / "f.bin"
    p.write_bytes(b"abc")
    size, mtime = source_fingerprint(p)
    assert size == 3 and mtime > 0
    p.write_bytes(b"abcd")
    assert source_fingerprint(p)[0] == 4


def test_jpeg_with_data_appended_after_eoi_is_accepted(tmp_path):
    """'Motion photos' append a video after the JPEG's end marker: still a whole image."""
    img = np.full((32, 48, 3), 120, np.uint8)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    data = buf.tobytes() + b"\x00" * 2000 + b"ftypmp42" + bytes(range(256)) * 8
    assert decode_rgb(data, "motion.jpg").shape == (32, 48, 3)
