"""Direct row reads (``shared/store/direct.py``) against zarr's own reads of the same store: the same
values, and for every damage (a flipped byte, a missing, truncated, longer, swapped or undecodable
chunk, a damaged record) the same outcome and message; a row rewritten while it is read is served whole or
left out on both paths; GT arrays whose chunks were split by a growing layout; an object store
(``memory://``; S3 in ``tests/test_s3.py``) fetching a row's chunks in one round trip."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import pytest
import torch

import boxrefine.shared.store.direct as direct
from boxrefine.shared.config import StoreConfig
from boxrefine.shared.data.records import ImageRecord, Instance
from boxrefine.shared.store.feature_store import FeatureStore, open_store
from boxrefine.shared.store.identity import StoreIdentity
from boxrefine.shared.store.rows import StoreRows
from boxrefine.shared.store.schema import STATE_COMPLETE
from boxrefine.shared.store.split import RowBusy, SplitStore, StoreDamage

S, C = 16, 8  # GT mask size and interm channels: small rows
ARRAYS = ("image_embeddings", "interm_embeddings", "gt_masks", "gt_boxes", "gt_info", "rows")


def identity() -> StoreIdentity:
    return StoreIdentity(model_type="vit_tiny", checkpoint="random-init:seed=0", img_size=1024,
                         pixel_mean=(123.675, 116.28, 103.53), pixel_std=(58.395, 57.12, 57.375), dtype="float16",
                         encoder_precision="float32", gt_mask_size=S, intensity="percentile:0.5-99.5")


def image(i: int, k: int) -> ImageRecord:
    inst = tuple(Instance(ann_id=100 * i + j, category_id=1, box=(1.0, 2.0, 3.0, 4.0), iscrowd=0, segmentation=None)
                 for j in range(k))
    return ImageRecord(image_id=i + 1, file_name=f"img_{i:03d}.jpg", key=1000 + i, height=48, width=64,
                       instances=inst, ann_hash=7)


def write_row(split: SplitStore, i: int, k: int, sign: float = 1.0, generation: int = 1) -> None:
    rng = np.random.default_rng(i)
    emb = (sign * rng.standard_normal((256, 64, 64))).astype(np.float16)
    interm = (sign * rng.standard_normal((64, 64, C))).astype(np.float16)
    masks = (rng.random((k, S, S)) < 0.3).astype(np.uint8)
    boxes = rng.uniform(0, 40, (k, 4)).astype(np.float32)
    info = np.stack([np.arange(k) + 100 * i, np.ones(k), np.zeros(k)], axis=1).astype(np.int64)
    split.clear_row(i, generation)
    digests = split.write_features(i, emb, interm)
    digests.update(split.write_gt(i, masks, boxes, info))
    split.commit_row(i, {"state": STATE_COMPLETE, "orig_h": 48, "orig_w": 64, "input_h": 768, "input_w": 1024,
                         "n_instances": k, "generation": generation, **digests})


INSTANCES = (3, 0, 2, 1)  # row 1 has no instance: its GT chunks are never written (zarr leaves fill values)


def make_store(path: str, codec: str) -> str:
    store = FeatureStore.open_or_create(StoreConfig(path=path, gt_mask_size=S, codec=codec), identity(),
                                        {"kind": "random-init", "seed": 0}, {"note": "test"})
    split = store.layout_split("train", [image(i, k) for i, k in enumerate(INSTANCES)],
                               {"path": "x.json", "sha256": "0"}, "/images", C)
    for i, k in enumerate(INSTANCES):
        write_row(split, i, k)
    return path


@pytest.fixture(scope="module", params=["none", "zstd"])
def pristine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(make_store(str(tmp_path_factory.mktemp(f"direct-{request.param}") / "s.zarr"), request.param))


@pytest.fixture
def store(pristine: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "s.zarr"
    shutil.copytree(pristine, dst)
    return dst


def read(store: Path | str, row: int, use_direct: bool, monkeypatch: pytest.MonkeyPatch) -> Any:
    """What reading ``row`` (features, GT with masks) gives: its arrays, or the exception (type, message)."""
    monkeypatch.setattr(direct, "ENABLED", use_direct)
    split = open_store(str(store)).split("train")
    assert split.direct.handles("image_embeddings") == use_direct
    records = split.records()
    try:
        _, parts = split.read_row(row, records[row])
    except (StoreDamage, RowBusy) as e:
        return type(e).__name__, str(e)
    return [np.asarray(p) for p in parts]


def same(a: Any, b: Any) -> None:
    if isinstance(a, tuple) or isinstance(b, tuple):
        assert a == b
        return
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def chunk(store: Path, array: str, row: int) -> Path:
    return next(p for p in sorted((store / "train" / array / "c" / str(row)).rglob("*")) if p.is_file())


def test_direct_reads_equal_zarr_reads(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for row, k in enumerate(INSTANCES):
        got = read(store, row, True, monkeypatch)
        same(got, read(store, row, False, monkeypatch))
        assert got[0].shape == (256, 64, 64) and got[2].shape == (k, S, S) and got[3].shape == (k, 4)


def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x10
    p.write_bytes(bytes(data))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])


def _valid_crc_wrong_size(p: Path) -> None:
    body = p.read_bytes()[:-4][:-2]  # two bytes short, with a checksum that matches what is stored
    p.write_bytes(body + np.uint32(google_crc32c.value(body)).tobytes())


def _appended(p: Path) -> None:
    p.write_bytes(p.read_bytes() + bytes(5000))  # longer than any first read


DAMAGE = {"flipped byte": _flip, "missing": Path.unlink, "truncated": _truncate, "appended": _appended,
          "undecodable": _valid_crc_wrong_size}


@pytest.mark.parametrize("array", ARRAYS)
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damage_is_found_and_named_as_zarr_does(store: Path, array: str, damage: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    DAMAGE[damage](chunk(store, array, 2))
    got = read(store, 2, True, monkeypatch)
    want = read(store, 2, False, monkeypatch)
    assert isinstance(got, tuple), f"{damage} {array} was served"
    if damage == "undecodable" and got[0] == want[0] == "StoreDamage":  # zarr's own words for the decoding error
        assert got[1].split("cannot be decoded")[0] == want[1].split("cannot be decoded")[0]
        assert "cannot be decoded" in got[1] and "cannot be decoded" in want[1]
    else:
        assert got == want
    if array != "rows":
        assert got[0] == "StoreDamage" and "row 2 (" in got[1] and f"array {array}:" in got[1]
    if damage == "flipped byte":
        assert "crc32c" in got[1]


@pytest.mark.parametrize("array", ARRAYS[:5])
def test_chunk_of_another_row_is_found(store: Path, array: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A swapped chunk passes its own checksum; the row's record digest catches it, on both paths."""
    src = chunk(store, array, 0)
    shutil.copy(src, chunk(store, array, 2))
    got = read(store, 2, True, monkeypatch)
    assert got == read(store, 2, False, monkeypatch)
    assert got[0] == "StoreDamage" and "differ from the row's record" in got[1] and f"array {array}:" in got[1]


@pytest.mark.parametrize("use_direct", [True, False])
def test_torn_row_is_never_served(store: Path, use_direct: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rewritten between its features and its GT: read again in the new version (never features of one
    write with the GT of another); cleared midway: left out (busy), never damage."""
    monkeypatch.setattr(direct, "ENABLED", use_direct)
    ds = StoreRows.from_store(str(store), "train", with_masks=True)
    writer = FeatureStore.open(str(store), "a").split("train")
    real = SplitStore.read_gt
    calls = {"n": 0}

    def rewrite_midway(self: SplitStore, i: int, *a: Any, **k: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            write_row(writer, i, 1, sign=-1.0, generation=2)
        return real(self, i, *a, **k)

    monkeypatch.setattr(SplitStore, "read_gt", rewrite_midway)
    item = ds[0]
    assert calls["n"] == 2 and "damage" not in item and len(item["gt_boxes"]) == 1
    emb, _ = open_store(str(store)).split("train").read_features(0)
    assert torch.equal(item["image_embeddings"], emb)  # the new (negated) version, whole

    def clear_midway(self: SplitStore, i: int, *a: Any, **k: Any) -> Any:
        writer.clear_row(i, 9)
        return real(self, i, *a, **k)

    monkeypatch.setattr(SplitStore, "read_gt", clear_midway)
    assert ds[1].get("busy") and "damage" not in ds[1]


def test_gt_chunked_along_instances_by_a_growing_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An image with more instances than the layout held resizes the GT arrays; their chunks keep their
    shape, so such a row's GT spans several chunks along axis 1."""
    path = make_store(str(tmp_path / "s.zarr"), "none")
    store = FeatureStore.open(path, "a")
    split = store.layout_split("train", [image(i, k) for i, k in enumerate((3, 0, 2, 1, 8))],
                               {"path": "x.json", "sha256": "0"}, "/images", C)
    assert split.array("gt_boxes").chunks[1] == 3 and split.max_instances == 8
    write_row(split, 4, 8)
    write_row(split, 0, 7, generation=2)
    for row in range(5):
        got = read(path, row, True, monkeypatch)
        same(got, read(path, row, False, monkeypatch))
    assert read(path, 4, True, monkeypatch)[3].shape == (8, 4)


def test_object_store_reads_a_row_in_one_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-local store (fsspec ``memory://``): the row's chunks are fetched together, then the record."""
    url = make_store(f"memory://direct-{uuid.uuid4().hex}.zarr", "none")
    split = open_store(url).split("train")
    assert split.direct.root is None and split.direct.handles("interm_embeddings")
    records = split.records()
    split.direct.requests = 0
    _, parts = split.read_row(0, records[0], masks=False)
    assert split.direct.requests == 2 + 2 + 1  # features, boxes and info; then the record
    for row in range(len(INSTANCES)):
        same(read(url, row, True, monkeypatch), read(url, row, False, monkeypatch))
    monkeypatch.setattr(direct, "ENABLED", True)
    split.read_row(0, records[0])  # features, masks, boxes, info, record
    assert split.direct.requests == 5 + 6


@pytest.mark.parametrize("damage", ["none", "interm flipped", "boxes missing", "emb missing"])
def test_cold_rows_read_in_threads_are_checked_alike(store: Path, damage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A row whose files are not in the page cache (``RWF_NOWAIT`` reads nothing: forced here) has its
    other chunk files read in threads: the same values and the same damage as zarr's reads."""
    if damage == "interm flipped":
        _flip(chunk(store, "interm_embeddings", 2))
    elif damage != "none":
        chunk(store, "gt_boxes" if damage == "boxes missing" else "image_embeddings", 2).unlink()
    threaded = []
    real_cold = direct.DirectReader._cold

    def cold(self: direct.DirectReader, current: str) -> None:
        real_cold(self, current)
        threaded.extend(self._reading)

    monkeypatch.setattr(direct, "_cached", lambda fd, view: 0)
    monkeypatch.setattr(direct.DirectReader, "_cold", cold)
    for row in (0, 2):
        same(read(store, row, True, monkeypatch), read(store, row, False, monkeypatch))
    assert any("interm_embeddings" in k for k in threaded) and not any("/rows/" in k for k in threaded)
