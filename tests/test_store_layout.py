"""The store's layout and codecs on tiny stores: a layout that grows, marks rows stale and rewrites image
ids; the instance slots; every storage dtype; each array's chunks, fill value and codecs (crc32c last);
chunk errors named, environment faults in one line."""

from __future__ import annotations

from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import torch
from tiny_store import C, S, make_images, make_row, new_store, read_all, write_row

from boxrefine.shared.data.records import ImageRecord
from boxrefine.shared.store.codecs import (
    compressors,
    digest,
    from_storage,
    storage_numpy_dtype,
    to_storage,
)
from boxrefine.shared.store.feature_store import open_store
from boxrefine.shared.store.location import StoreError
from boxrefine.shared.store.schema import (
    FIELD,
    ROW_ARRAYS,
    ROW_FIELDS,
    STATE_COMPLETE,
    STATE_EMPTY,
    STATE_STALE,
)
from boxrefine.shared.store.split import StoreDamage, _reason

# ------------------------------------------------------------------------------------ layout


def test_layout_grows_marks_stale_and_rewrites_image_ids(tmp_path: Path) -> None:
    store, split = new_store(tmp_path, images=make_images(3, k=2))
    write_row(split, 0, make_row(0))
    write_row(split, 2, make_row(2))
    assert split.n_rows == 3 and split.max_instances == 2
    digest_before = split.layout_digest()
    # image 2 leaves, two new ones arrive (one with more instances), image 0 gets another id
    images = make_images(2, k=2)
    images[0] = ImageRecord(999, images[0].file_name, images[0].key, 48, 64, (0, 1), 7)
    images += make_images(2, k=5, first=10)
    grown = store.layout_split("train", images, {"path": "a.json", "sha256": "cd"}, "/images", C)
    assert grown.n_rows == 5 and grown.max_instances == 5
    assert grown.keys().tolist() == [5000, 5001, 5002, 5010, 5011]
    assert grown.image_ids().tolist() == [999, 101, -1, 110, 111]
    rec = grown.read_rows()
    assert rec[:, FIELD["state"]].tolist() == [STATE_COMPLETE, STATE_EMPTY, STATE_STALE, STATE_EMPTY, STATE_EMPTY]
    assert rec[2, FIELD["generation"]] == 2  # a stale mark is a write of the row
    assert list(grown.marked_stale) == [2]
    assert grown.layout_digest() != digest_before and grown.annotations_sha256 == "cd"
    assert grown.group.attrs["layout"]["n_rows"] == 5 and grown.group.attrs["max_instances"] == 5
    assert tuple(grown.array("gt_masks").shape) == (5, 5, S, S)
    read_all(grown, 0)  # the old row is intact and still checks out
    # again: nothing to do, the stale row stays as it is (no new generation)
    again = store.layout_split("train", images, {"path": "a.json", "sha256": "cd"}, "/images", C)
    assert again.read_rows()[2, FIELD["generation"]] == 2 and not again.marked_stale
    # a layout never shrinks the instance slots
    fewer = store.layout_split("train", make_images(2, k=1), {"path": "b.json", "sha256": "ef"}, "/images", C)
    assert fewer.max_instances == 5


def test_instance_slots_are_the_most_instances_of_any_image(tmp_path: Path) -> None:
    store, split = new_store(tmp_path, images=make_images(3, k=1))
    assert split.max_instances == 1 and tuple(split.array("gt_info").shape) == (3, 1, 3)
    write_row(split, 0, make_row(0, k=1))
    again = store.layout_split("train", make_images(3, k=1), {"path": "a.json", "sha256": "cd"}, "/images", C)
    assert again.max_instances == 1 and tuple(again.array("gt_masks").shape) == (3, 1, S, S)
    _, none = new_store(tmp_path / "none", images=make_images(2, k=0))
    assert none.max_instances == 1  # at least one slot


def test_a_damaged_image_ids_chunk_is_rewritten_by_the_next_layout(tmp_path: Path) -> None:
    store, split = new_store(tmp_path)
    path = tmp_path / "features.zarr"
    f = [p for p in (path / "train" / "image_ids").rglob("*") if p.is_file() and p.name != "zarr.json"][0]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(StoreDamage, match="array image_ids: .*`boxrefine extract` rewrites it"):
        open_store(str(path)).split("train").image_ids()
    again = store.layout_split("train", make_images(), {"path": "a.json", "sha256": "ab"}, "/images", C)
    assert again.image_ids().tolist() == [100, 101, 102, 103]


# ------------------------------------------------------------------------------------ codecs


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_every_storage_dtype_round_trips_and_reads_as_written(tmp_path: Path, dtype: str) -> None:
    _, split = new_store(tmp_path, dtype=dtype)
    row = make_row(3)
    write_row(split, 0, row, dtype=dtype)
    emb, interm = open_store(str(tmp_path / "features.zarr")).split("train").read_features(0)
    want = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    assert emb.dtype == want and torch.equal(emb, row["emb"].to(want)) and torch.equal(interm, row["interm"].to(want))
    assert storage_numpy_dtype(dtype) == np.dtype({"bfloat16": "uint16"}.get(dtype, dtype))


def test_storage_casts_and_digests() -> None:
    t = torch.tensor([1.0, -2.5, 3.140625, 65504.0])
    assert to_storage(t, "float16").dtype == np.float16 and to_storage(t, "float32").dtype == np.float32
    bits = to_storage(t, "bfloat16")
    assert bits.dtype == np.uint16 and bits.tolist() == t.to(torch.bfloat16).view(torch.int16).numpy().view(
        np.uint16).tolist()
    assert torch.equal(from_storage(bits, "bfloat16"), t.to(torch.bfloat16))
    a = np.arange(12, dtype=np.int64).reshape(3, 4)
    assert digest(a) == google_crc32c.value(a.tobytes()) and digest(a[:, ::2]) == google_crc32c.value(
        np.ascontiguousarray(a[:, ::2]).tobytes())
    assert digest(a) != digest(a[::-1]) and 0 <= digest(a) < 2**32


def test_every_array_ends_its_codecs_with_crc32c(tmp_path: Path) -> None:
    from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

    assert [type(c) for c in compressors("none", 0, 8)] == [Crc32cCodec]
    blosc, crc = compressors("zstd", 5, 2)
    assert isinstance(crc, Crc32cCodec) and isinstance(blosc, BloscCodec)
    assert blosc.cname.value == "zstd" and blosc.clevel == 5 and blosc.shuffle == BloscShuffle.shuffle
    assert blosc.typesize == 2
    assert compressors("lz4", 1, 1)[0].shuffle == BloscShuffle.bitshuffle
    _, split = new_store(tmp_path, codec="lz4")
    for name in ("keys", "image_ids", "rows", *ROW_ARRAYS):
        arr = split.array(name)
        assert type(arr.compressors[-1]).__name__ == "Crc32cCodec", name
    assert tuple(split.array("rows").chunks) == (1, len(ROW_FIELDS))
    assert tuple(split.array("gt_masks").chunks) == (1, 3, S, S)
    assert split.array("gt_boxes").fill_value is not None and np.isnan(split.array("gt_boxes").fill_value)
    assert split.array("gt_info").fill_value == -1 and split.array("image_ids").fill_value == -1


@pytest.mark.parametrize("codec", ["none", "lz4"])
def test_each_array_is_laid_out_with_its_chunks_fill_and_codecs(tmp_path: Path, codec: str) -> None:
    """What a reader of the zarr.json files finds: shape, chunks, fill value, Blosc settings (GT masks
    and the index arrays always compressed: zstd when the features are stored without a compressor)."""
    _, split = new_store(tmp_path, codec=codec)
    n, k = 4, 3
    want = {"keys": ((n,), 0, "index"), "image_ids": ((n,), -1, "index"), "rows": ((1, len(ROW_FIELDS)), 0, None),
            "image_embeddings": ((1, 256, 64, 64), 0, "features"), "interm_embeddings": ((1, 64, 64, C), 0, "features"),
            "gt_masks": ((1, k, S, S), 0, "masks"), "gt_boxes": ((1, k, 4), None, None),
            "gt_info": ((1, k, 3), -1, None)}
    blosc = {"index": ("zstd" if codec == "none" else codec, 8), "masks": ("zstd" if codec == "none" else codec, 1),
             "features": (None if codec == "none" else codec, 2)}
    for name, (chunks, fill, kind) in want.items():
        arr = split.array(name)
        if name not in ("keys", "image_ids"):
            assert tuple(arr.chunks) == chunks, name
        if fill is None:
            assert np.isnan(arr.fill_value), name
        else:
            assert arr.fill_value == fill, name
        comp = arr.compressors
        cname, typesize = blosc.get(kind, (None, 0)) if kind else (None, 0)
        assert [type(c).__name__ for c in comp] == (["BloscCodec"] if cname else []) + ["Crc32cCodec"], name
        if cname:
            assert (comp[0].cname.value, comp[0].typesize) == (cname, typesize), name


def test_chunk_errors_are_named_and_environment_faults_are_one_line(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    assert _reason(ValueError("Stored and computed checksum do not match")) == (
        "the chunk fails its crc32c checksum (its stored bytes changed)")
    assert _reason(RuntimeError("bad blosc header\nmore")) == (
        "the chunk cannot be decoded (RuntimeError: bad blosc header)")
    assert _reason(RuntimeError("")) == "the chunk cannot be decoded (RuntimeError: )"
    _, split = new_store(tmp_path)

    class Unreadable:
        def __getitem__(self, sel):
            raise PermissionError(13, "Permission denied")

    monkeypatch.setitem(split._arrays, "image_ids", Unreadable())
    with pytest.raises(StoreError, match=r"cannot read train/image_ids: .*ermission denied"):
        split.image_ids()
