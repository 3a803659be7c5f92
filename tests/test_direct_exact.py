"""Direct chunk reads (``shared/store/direct.py``) at their exact edges, on tiny zarr arrays made in the test:
a chunk file read whole whatever the page cache holds (all of it, none, only its first read, or no way to
ask) and whatever size was expected (one byte short or long, smaller or larger than the first read); the
values of whole rows and of a row's first instances as zarr reads them, with the crc32c of the values
only where one pass over a whole uncompressed chunk gives it; chunks shorter than their checksum; the
arrays the reader refuses; an object store's read-only responses, missing chunks and failed requests in a
prefetched row; which rows read their other files in threads (cold ones only); the reading threads per process."""

from __future__ import annotations

import errno
import math
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import google_crc32c
import numpy as np
import pytest
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, GzipCodec
from zarr.core.sync import sync

import boxrefine.shared.store.direct as direct
from boxrefine.shared.store.codecs import compressors

ROWS, PER, MAX_N = 3, 3, 5  # rows; GT instances per chunk along axis 1; GT instances a row can hold
FILL_INFO = 7
# name: (shape of a row, chunk shape of a row, dtype); the embeddings' chunk is larger than a first read
ARRAYS = {"image_embeddings": ((16, 16, 16), (16, 16, 16), "float16"),
          "interm_embeddings": ((8, 8, 4), (8, 8, 4), "float16"),
          "gt_masks": ((MAX_N, 4, 4), (PER, 4, 4), "uint8"),
          "gt_boxes": ((MAX_N, 4), (PER, 4), "float32"),
          "gt_info": ((MAX_N, 3), (PER, 3), "int64")}


def _values(name: str, row: int) -> np.ndarray:
    shape, _, dtype = ARRAYS[name]
    rng = np.random.default_rng(100 * row + len(name))
    return (rng.standard_normal(shape) * 50).astype(dtype)


def _group(url: str, codec: str) -> zarr.Group:
    """The five row arrays, every row written (``codec``: "none", or a Blosc codec; masks always Blosc)."""
    group = zarr.open_group(url, mode="w")
    for name, (shape, chunks, dtype) in ARRAYS.items():
        itemsize = np.dtype(dtype).itemsize
        arr = group.create_array(name, shape=(ROWS, *shape), chunks=(1, *chunks), dtype=dtype,
                                 compressors=compressors("zstd" if name == "gt_masks" else codec, 1, itemsize),
                                 fill_value=FILL_INFO if name == "gt_info" else 0)
        for row in range(ROWS):
            arr[row] = _values(name, row)
    return group


def _reader(group: zarr.Group) -> direct.DirectReader:
    return direct.DirectReader(group, lambda name: group[name])


def _local(tmp_path: Path, codec: str = "none") -> tuple[zarr.Group, direct.DirectReader]:
    group = _group(str(tmp_path / "s.zarr"), codec)
    return group, _reader(group)


def _remote(codec: str = "none") -> tuple[zarr.Group, direct.DirectReader]:
    group = _group(f"memory://direct-exact-{uuid.uuid4().hex}.zarr", codec)
    return group, _reader(group)


def _key(name: str, row: int, j: int = 0) -> str:
    return f"{name}/c/{row}/{j}" + "/0" * (len(ARRAYS[name][0]) - 1)


def _crc(a: np.ndarray) -> int:
    return google_crc32c.value(np.ascontiguousarray(a).view(np.uint8))


def _same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------- values and their crc32c


@pytest.mark.parametrize("where", ["local", "object store"])
@pytest.mark.parametrize("codec", ["none", "lz4"])
def test_rows_and_first_instances_equal_zarr_reads(tmp_path: Path, where: str, codec: str) -> None:
    """Whole rows and every count of first instances (clamped to the row) read as zarr reads them; the
    crc32c of the values comes back from one whole uncompressed chunk only, and is theirs."""
    group, reader = _local(tmp_path, codec) if where == "local" else _remote(codec)
    for name in ARRAYS:
        arr = group[name]
        whole_chunk_crc = codec == "none" and name != "gt_masks"
        for row in range(ROWS):
            if not name.startswith("gt_"):
                values, crc = reader.read(name, row)
                _same(values, arr[row])
                assert crc == (_crc(values) if whole_chunk_crc else None)
                continue
            for n in range(-1, MAX_N + 3):  # GT: chunked along its instances, read by their number
                values, crc = reader.read(name, row, n)
                _same(values, arr[row, :max(n, 0)])
                assert crc == (_crc(values) if whole_chunk_crc and n == PER else None), (name, n)


def test_values_of_an_object_store_are_the_callers(monkeypatch: pytest.MonkeyPatch) -> None:
    """An object store's response is read-only: the values are copied out of it, writable by the caller,
    and a later read gives the stored values again."""
    group, reader = _remote()
    for name, n in (("interm_embeddings", None), ("gt_boxes", PER), ("gt_boxes", 1), ("gt_boxes", MAX_N)):
        values, _ = reader.read(name, 1, n)
        assert values.flags.writeable
        values[...] = 0
        _same(reader.read(name, 1, n)[0], group[name][1] if n is None else group[name][1, :n])


# ----------------------------------------------------------------------------- damage at the checksum's edge


def _replace(tmp_path: Path, name: str, row: int, data: bytes) -> None:
    (tmp_path / "s.zarr" / _key(name, row)).write_bytes(data)


def _with_crc(body: bytes) -> bytes:
    return body + google_crc32c.value(body).to_bytes(4, "little")


def test_chunks_shorter_or_longer_than_their_values(tmp_path: Path) -> None:
    """A chunk shorter than its checksum fails it; a chunk whose checksum holds but whose values are
    missing or one byte short or long cannot be decoded, and says how many bytes it holds."""
    group, reader = _local(tmp_path)
    name = "interm_embeddings"
    nbytes = math.prod(ARRAYS[name][1]) * 2
    stored = group[name][1].tobytes()
    cases = {b"": direct.CRC_FAILED, b"\0\0\0": direct.CRC_FAILED, _with_crc(b""): None,
             _with_crc(stored[:-1]): None, _with_crc(stored + b"\1"): None,
             stored + bytes(4): direct.CRC_FAILED}
    assert _with_crc(b"") == bytes(4)  # the crc32c of no bytes is 0: four zero bytes hold a valid checksum
    for data, reason in cases.items():
        _replace(tmp_path, name, 1, data)
        with pytest.raises(direct.ChunkDamage) as e:
            reader.read(name, 1)
        held = len(data) - 4
        assert e.value.reason == (reason or direct.undecodable(f"ValueError: {held} bytes, the chunk holds {nbytes}"))
    _replace(tmp_path, name, 1, _with_crc(stored))
    _same(reader.read(name, 1)[0], group[name][1])


# ----------------------------------------------------------------------------- what the reader refuses


def _array(tmp_path: Path, **kw: Any) -> zarr.Array:
    spec = {"shape": (2, 3, 4), "chunks": (1, 3, 4), "dtype": "float32", "compressors": [Crc32cCodec()], **kw}
    return zarr.open_group(str(tmp_path / f"a{uuid.uuid4().hex}.zarr"), mode="w").create_array("x", **spec)


def test_supported_codec_chains_and_chunking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a row per chunk, stored little-endian (on a little-endian machine) with crc32c after the bytes
    (Blosc between them or not), in zarr v3 and whole along every axis past the first two."""
    supported = direct.ArrayChunks.supported
    ok = _array(tmp_path)
    assert supported(ok) and supported(_array(tmp_path, compressors=compressors("zstd", 1, 4)))
    assert direct.ArrayChunks(ok).supported(ok)  # a static check: on a layout too
    assert supported(_array(tmp_path, chunks=(1, 1, 4)))  # chunked along axis 1 (the GT arrays)
    refused = [_array(tmp_path, compressors=None), _array(tmp_path, compressors=[GzipCodec(), Crc32cCodec()]),
               _array(tmp_path, compressors=[Crc32cCodec(), Crc32cCodec()]),
               _array(tmp_path, serializer=BytesCodec(endian="big")), _array(tmp_path, chunks=(2, 3, 4)),
               _array(tmp_path, chunks=(1, 3, 2)),
               zarr.open_group(str(tmp_path / "v2.zarr"), mode="w", zarr_format=2).create_array(
                   "x", shape=(2, 3, 4), chunks=(1, 3, 4), dtype="float32")]
    assert not any(supported(a) for a in refused)
    monkeypatch.setattr(direct, "sys", SimpleNamespace(byteorder="big"))
    assert not supported(ok)


def test_reader_handles_only_what_it_reads_as_zarr_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    group.create_array("plain", shape=(2, 3), chunks=(1, 3), dtype="float32", compressors=None)
    group.create_array("checked", shape=(2, 3), chunks=(1, 3), dtype="float32", compressors=[Crc32cCodec()])
    assert not _reader(group).handles("plain") and _reader(group).handles("checked")
    monkeypatch.setattr(direct, "ENABLED", False)
    assert not _reader(group).handles("checked")


# ----------------------------------------------------------------------------- one file, whatever the cache holds

REAL_PREADV = os.preadv


def _page_cache(monkeypatch: pytest.MonkeyPatch, holds: str) -> None:
    """What reads that must not wait for the disk (``RWF_NOWAIT``) get: every byte ("all"), none ("none"),
    a file's first read only ("first read"), an error ("unsupported"), or no such flag at all ("no flag")."""
    if holds == "no flag":
        monkeypatch.delattr(os, "RWF_NOWAIT")
        return

    def preadv(fd: int, buffers: list[Any], offset: int, *flags: int) -> int:
        if not flags or holds == "all":
            return REAL_PREADV(fd, buffers, offset)
        if holds == "first read" and offset == 0:
            return REAL_PREADV(fd, [memoryview(buffers[0])[:direct.FIRST_READ]], 0)
        if holds == "unsupported":
            raise OSError(errno.EOPNOTSUPP, "not supported")
        raise BlockingIOError(errno.EAGAIN, "would block")

    monkeypatch.setattr(os, "preadv", preadv)


SIZES = (0, 1, 3, 4095, 4096, 4097, 8191, 8192, 9000)
HOLDS = ("all", "none", "first read", "unsupported", "no flag")


@pytest.mark.parametrize("holds", HOLDS)
def test_a_file_is_read_whole_whatever_size_was_expected(tmp_path: Path, holds: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The file's exact bytes, expected at its size, one byte shorter or longer, several bytes off, or
    unknown; ``on_cold`` is called before the disk is waited for, never for a file all in the cache."""
    _page_cache(monkeypatch, holds)
    seed = 0
    for size in SIZES:
        for expected in {size, size - 1, size + 1, size - 4, size + 4, size + 5000, None}:
            if expected is not None and expected < 0:
                continue
            seed += 1
            data = np.random.default_rng(seed).integers(1, 256, size, np.uint8).tobytes()  # no zero byte
            path = tmp_path / f"f{seed}"
            path.write_bytes(data)
            colds: list[None] = []
            got = direct.read_file(str(path), expected, partial(colds.append, None))
            assert got is not None and got.dtype == np.uint8 and got.tobytes() == data, (size, expected)
            wanted = size if expected is None else expected
            if holds == "all" and wanted == size:
                assert not colds, (size, expected)
            if holds in ("none", "unsupported", "no flag") and wanted > 0:
                assert colds == [None], (size, expected)
            if holds == "first read" and min(wanted, size) > direct.FIRST_READ:
                assert colds == [None], (size, expected)
            assert direct.read_file(str(path), expected) is not None


def test_a_missing_file_reads_as_none(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    for path in (tmp_path / "nothing", tmp_path / "dir", tmp_path / "nothing" / "below"):
        assert direct.read_file(str(path), 10) is None and direct.read_file(str(path), None) is None


# ----------------------------------------------------------------------------- local rows: warm and cold


def _spy_cold(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = direct.DirectReader._cold

    def cold(self: direct.DirectReader, current: str) -> None:
        calls.append(current)
        real(self, current)

    monkeypatch.setattr(direct.DirectReader, "_cold", cold)
    return calls


@pytest.mark.parametrize("codec", ["none", "lz4"])
@pytest.mark.parametrize("holds", ["all", "none"])
def test_a_cold_row_and_only_a_cold_one_reads_its_other_files_in_threads(
        tmp_path: Path, codec: str, holds: str, monkeypatch: pytest.MonkeyPatch) -> None:
    group, reader = _local(tmp_path, codec)
    _page_cache(monkeypatch, holds)
    calls = _spy_cold(monkeypatch)
    for row in range(ROWS):
        reader.prefetch(row, MAX_N)
        for name in ARRAYS:
            n = MAX_N if name.startswith("gt_") else None
            _same(reader.read(name, row, n)[0], group[name][row] if n is None else group[name][row, :n])
        reader.release()
    assert calls == ([] if holds == "all" else [f"image_embeddings/c/{row}/0/0/0" for row in range(ROWS)])


# ----------------------------------------------------------------------------- object stores: one round trip


def test_prefetch_fetches_features_and_every_gt_array_by_default() -> None:
    group, reader = _remote()
    for n, chunks in ((0, 0), (1, 1), (PER, 1), (MAX_N, 2)):
        reader.requests = 0
        reader.prefetch(2, n)
        assert reader.requests == 2 + 3 * chunks
        for name in ARRAYS:
            count = n if name.startswith("gt_") else None
            _same(reader.read(name, 2, count)[0], group[name][2] if count is None else group[name][2, :n])
        assert reader.requests == 2 + 3 * chunks  # all read from what was fetched
    reader.requests = 0
    reader.prefetch(2, MAX_N, features=False, masks=False)
    assert reader.requests == 2 * 2


class _Failing:
    """A store whose requests for ``key`` fail."""

    def __init__(self, store: Any, key: str, error: BaseException):
        self.store, self.key, self.error = store, key, error

    async def get(self, key: str, prototype: Any) -> Any:
        if key == self.key:
            raise self.error
        return await self.store.get(key, prototype=prototype)


def test_a_prefetched_row_with_missing_chunks_and_failed_requests() -> None:
    """A missing chunk reads as the fill value; a failed request is raised by the read that needs its chunk
    (not by the prefetch), and the row's other chunks read as stored."""
    group, reader = _remote()
    sync(group.store_path.store.delete(_key("gt_info", 0, 1)))
    sync(group.store_path.store.delete(_key("image_embeddings", 0)))
    error = OSError(errno.ECONNRESET, "connection reset")
    reader.store = _Failing(reader.store, _key("interm_embeddings", 0), error)
    reader.prefetch(0, MAX_N)
    assert reader.requests == 2 + 3 * 2
    with pytest.raises(OSError) as e:
        reader.read("interm_embeddings", 0)
    assert e.value is error
    emb, _ = reader.read("image_embeddings", 0)
    _same(emb, np.zeros(ARRAYS["image_embeddings"][0], np.float16))
    info, _ = reader.read("gt_info", 0, MAX_N)
    _same(info, group["gt_info"][0, :MAX_N])
    assert (info[PER:] == FILL_INFO).all() and (info[:PER] == _values("gt_info", 0)[:PER]).all()
    for name in ("gt_masks", "gt_boxes"):
        _same(reader.read(name, 0, MAX_N)[0], group[name][0, :MAX_N])


# ----------------------------------------------------------------------------- reading threads


def test_reading_threads_are_kept_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """One pool of reading threads per process: kept between rows, started anew in a forked process."""
    parent = ThreadPoolExecutor(1)
    monkeypatch.setattr(direct, "_POOL", (os.getpid() + 1, parent))  # made by the process this one forked from
    pool = direct._pool()
    try:
        assert pool is not parent and direct._pool() is pool and direct._pool() is pool
        assert pool.submit(lambda: 3).result() == 3
    finally:
        pool.shutdown(wait=False)
        parent.shutdown(wait=False)
