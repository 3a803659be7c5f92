"""The 8-bit mapping of ``data.intensity`` value by value (``shared/data/intensity.py``): each mode's
formula, rounding and clipping at both ends, non-finite pixels, flat images, the refusals and the
fingerprint that enters the store identity. numpy only."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from boxrefine.shared.data.intensity import ImageError, Intensity


def _spec(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """docs/architecture.md, "Pixels": [lo, hi] → 0–255 linearly, clipped, rounded half up."""
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.floor(np.clip((a.astype(np.float64) - lo) * scale, 0, 255) + 0.5).astype(np.uint8)


def test_range_maps_linearly_with_rounding_and_clips_both_ends() -> None:
    a = np.arange(-100, 1200, 7, dtype=np.int16).reshape(1, -1)  # below lo, the range, above hi
    m = Intensity("range", range=(100.0, 1000.0))
    out = m.to_uint8(a, "x.tif")
    assert out.dtype == np.uint8 and out.shape == a.shape
    np.testing.assert_array_equal(out, _spec(a, 100.0, 1000.0))
    assert out.min() == 0 and out.max() == 255
    assert out[a < 100].max() == 0 and out[a > 1000].min() == 255  # clipped, never wrapped around
    edges = m.to_uint8(np.array([100, 1000, 990, 550], np.uint16), "x")
    assert edges.tolist() == [0, 255, 252, 128]  # 990 → 252.45 → 252; 550 → 127.5 → 128 (half up)


def test_percentile_uses_the_images_own_percentiles_over_all_channels() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4096, (40, 50, 3)).astype(np.uint16)
    lo, hi = np.percentile(a.astype(np.float32), (2.0, 98.0))
    out = Intensity("percentile", (2.0, 98.0)).to_uint8(a, "x.png")
    np.testing.assert_array_equal(out, _spec(a.astype(np.float32), float(lo), float(hi)))
    assert (out == 0).mean() == pytest.approx(0.02, abs=0.005) and (out == 255).mean() == pytest.approx(0.02, abs=0.005)


def test_non_finite_pixels_map_to_the_low_end_and_all_non_finite_is_refused() -> None:
    a = np.array([[0.0, np.nan, 0.5, np.inf, 1.0, -np.inf]], np.float32)
    out = Intensity("range", range=(0.0, 1.0)).to_uint8(a, "f.tif")
    assert out.tolist() == [[0, 0, 128, 0, 255, 0]]
    p = Intensity().to_uint8(np.array([[0.0, np.nan, 1.0, 2.0]], np.float64), "f.tif")  # percentiles of finite only
    assert p[0, 1] == 0 and p[0, 3] == 255
    with pytest.raises(ImageError, match="f.tif: no finite pixel values"):
        Intensity().to_uint8(np.full((2, 2), np.nan, np.float32), "f.tif")


def test_a_flat_window_maps_everything_to_zero() -> None:
    """Percentiles that coincide (a flat image, or one with a few outliers) give a window of width 0:
    every pixel, outliers included, maps to 0 instead of dividing by zero."""
    flat = np.full((10, 10), 300, np.uint16)
    assert not Intensity().to_uint8(flat, "f").any()
    spikes = np.full((100, 100), 300, np.uint16)
    spikes[0, :3] = 60000
    assert not Intensity().to_uint8(spikes, "f").any()


def test_mode_none_divides_16_bit_by_257_rounding_half_up() -> None:
    a = np.array([0, 128, 129, 256, 257, 385, 386, 65535, 65407], np.uint16)
    out = Intensity("none").to_uint8(a, "x.png")
    assert out.tolist() == [int((v + 128) // 257) for v in a.tolist()] == [0, 0, 1, 1, 1, 1, 2, 255, 255]
    with pytest.raises(ImageError, match="x.tif: pixel type float32 needs data.intensity.mode percentile or range"):
        Intensity("none").to_uint8(np.zeros(3, np.float32), "x.tif")
    with pytest.raises(ImageError, match="pixel type int32"):
        Intensity("none").to_uint8(np.zeros(3, np.int32), "x.tif")


def test_8_bit_is_never_remapped_and_odd_types_are_refused() -> None:
    a = np.array([[0, 7, 255]], np.uint8)
    for m in (Intensity(), Intensity("range", range=(0.0, 10.0)), Intensity("none")):
        assert m.to_uint8(a, "x") is a
    with pytest.raises(ImageError, match="x: unsupported pixel type bool"):
        Intensity().to_uint8(np.zeros(3, bool), "x")
    with pytest.raises(ImageError, match="unsupported pixel type complex64"):
        Intensity().to_uint8(np.zeros(3, np.complex64), "x")
    signed = Intensity("range", range=(-10.0, 10.0)).to_uint8(np.array([-10, 0, 10], np.int8), "x")
    assert signed.tolist() == [0, 128, 255]
    wide = Intensity("range", range=(0.0, 2.0**40)).to_uint8(np.array([0, 2**39, 2**40], np.int64), "x")
    assert wide.tolist() == [0, 128, 255]


def test_fingerprint_names_mode_and_values_and_the_mapping_is_a_frozen_value() -> None:
    assert Intensity().fingerprint == "percentile:0.5-99.5"
    assert Intensity("percentile", (1.0, 99.0)).fingerprint == "percentile:1-99"
    assert Intensity("range", range=(0.0, 4095.0)).fingerprint == "range:0-4095"
    assert Intensity("range", range=(0.25, 1.5)).fingerprint == "range:0.25-1.5"
    assert Intensity("none").fingerprint == "none"
    m = Intensity()
    assert hash(m) == hash(Intensity()) and m == Intensity()
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.mode = "none"  # type: ignore[misc]
