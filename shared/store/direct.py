"""Reading a row's chunks without zarr's per-call machinery, with exactly zarr's checks.

zarr-python spends ~1 ms of event-loop round trip on every ``array[i]`` (``zarr.core.sync``), five
times per training item, while the row's bytes take ~0.3 ms to copy and checksum. For the codec
chains the store writes (``bytes`` little-endian, optionally ``blosc``, then ``crc32c``; one chunk per
row along axis 0, the other axes whole, or chunked along axis 1 only for the GT arrays) a
:class:`DirectReader` reads a row's chunk objects itself:

* a **local store** (``zarr.storage.LocalStore``): each chunk file is read with one ``os.preadv``
  into a new buffer (zarr writes every key as a temp file renamed into place, so an open file is
  always one whole write). The first read asks the page cache only (``RWF_NOWAIT``); a row whose
  file is not cached has its other chunk files read in threads meanwhile, so that the disk serves
  them together (a cold row ~1.5-2x sooner than one file after the other). The record is never read
  ahead: it is opened after the chunks are read (``SplitStore.read_row``'s generation check);
* **any other store** (S3 through obstore, fsspec URLs): the chunks a row read needs are fetched
  together with the store's own async ``get`` in one event-loop round trip (:meth:`DirectReader.prefetch`).

The checks are zarr's: the stored crc32c suffix of every chunk (``ChunkDamage``: "the chunk fails its
crc32c checksum", before Blosc decodes it), a chunk that cannot be decoded (wrong size, bad Blosc
frame), and a missing chunk reads as the array's fill value (the row's record digest then tells).
With no compressor the stored bytes *are* the values, so the one crc32c pass over a whole-row chunk
is also the crc32c of the row's values: the caller compares it with the record's digest instead of
computing it again (:meth:`DirectReader.read` returns it).

Arrays with another codec chain, chunking or byte order are read through zarr (``handles`` is false);
``ENABLED = False`` sends every read through zarr (the tests run the damage cases both ways).
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import google_crc32c
import numpy as np
import zarr
from numcodecs import blosc
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.core.metadata.v3 import ArrayV3Metadata
from zarr.core.sync import sync
from zarr.storage import LocalStore

from boxrefine.shared.errors import first_line
from boxrefine.shared.store.schema import FEATURE_ARRAYS, GT_ARRAYS

ENABLED = True  # False: every read goes through zarr's array indexing (the path before this module)
CRC_FAILED = "the chunk fails its crc32c checksum (its stored bytes changed)"
FIRST_READ = 4096  # bytes of a file's first read from the disk (see read_file)
MISSING = (FileNotFoundError, IsADirectoryError, NotADirectoryError)  # zarr's LocalStore: the fill value


class ChunkDamage(Exception):
    """A chunk that fails its checksum or cannot be decoded; ``reason`` completes the damage message."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def undecodable(what: str) -> str:
    """The damage reason for a chunk that cannot be decoded (as ``split._reason`` words zarr's errors)."""
    return f"the chunk cannot be decoded ({what})"


class ArrayChunks:
    """One array's chunks as a row reader needs them (from its zarr metadata): where each lives, how
    many bytes its values take, whether Blosc compresses them, and its fill value."""

    def __init__(self, arr: zarr.Array):
        meta = arr.metadata
        self.path = arr.store_path.path
        self.shape, self.chunks = tuple(arr.shape), tuple(arr.chunks)
        self.dtype = np.dtype(arr.dtype)
        self.nbytes = math.prod(self.chunks) * self.dtype.itemsize
        self.key = meta.chunk_key_encoding.encode_chunk_key
        self.fill_value = meta.fill_value
        self.blosc = any(isinstance(c, BloscCodec) for c in meta.codecs)

    @staticmethod
    def supported(arr: zarr.Array) -> bool:
        """A codec chain and chunking this reader handles exactly as zarr does."""
        meta = arr.metadata
        if not isinstance(meta, ArrayV3Metadata) or meta.storage_transformers or sys.byteorder != "little":
            return False
        if not isinstance(meta.chunk_grid, RegularChunkGrid) or meta.chunk_grid.chunk_shape[0] != 1:
            return False
        codecs = list(meta.codecs)
        kinds = [type(c) for c in codecs]
        if kinds not in ([BytesCodec, Crc32cCodec], [BytesCodec, BloscCodec, Crc32cCodec]):
            return False
        endian = codecs[0].endian
        return (endian is None or endian.value == "little") and tuple(arr.chunks[2:]) == tuple(arr.shape[2:])

    def keys(self, row: int, n: int | None) -> list[str]:
        """The chunk keys holding row ``row`` (``n`` None: all of it; else its first ``n`` along axis 1)."""
        if n is None:
            return [self.key((row,) + (0,) * (len(self.shape) - 1))]
        per = self.chunks[1]
        return [self.key((row, j) + (0,) * (len(self.shape) - 2)) for j in range(-(-n // per))]

    def decode(self, stored: np.ndarray | None, whole: bool) -> tuple[np.ndarray, int | None]:
        """A chunk's values (``chunks[1:]``) from its stored bytes (None: missing, the fill value), and
        the crc32c of those values when this pass already computed it (no compressor)."""
        shape = self.chunks[1:]
        if stored is None:
            return np.full(shape, self.fill_value, self.dtype), None
        if len(stored) < 4:
            raise ChunkDamage(CRC_FAILED)
        body = stored[:-4]
        crc = google_crc32c.value(body)
        if crc != int.from_bytes(stored[-4:].tobytes(), "little"):
            raise ChunkDamage(CRC_FAILED)
        if self.blosc:
            out = np.empty(self.nbytes, np.uint8)
            try:
                blosc.decompress(body, out)
            except Exception as e:  # a valid checksum over a bad frame (written so)
                raise ChunkDamage(undecodable(f"{type(e).__name__}: {first_line(e, 120)}")) from None
            return out.view(self.dtype).reshape(shape), None
        if len(body) != self.nbytes:
            raise ChunkDamage(undecodable(f"ValueError: {len(body)} bytes, the chunk holds {self.nbytes}"))
        if not body.flags.writeable:  # an object store's response: the caller may own the values
            body = body.copy()
        return body.view(self.dtype).reshape(shape), (crc if whole else None)


def _cached(fd: int, view: memoryview, offset: int = 0) -> int:
    """Bytes read from ``fd`` at ``offset`` into ``view`` without waiting for the disk: what the page cache
    holds (``RWF_NOWAIT``); 0 where that cannot be asked. Missing pages are still read ahead, as a read
    of ``view``'s size would: callers ask small first (see :func:`read_file`)."""
    try:
        return os.preadv(fd, [view], offset, os.RWF_NOWAIT)
    except (BlockingIOError, OSError, AttributeError):  # nothing cached, or no RWF_NOWAIT (filesystem, OS)
        return 0


def read_file(path: str, size: int | None, on_cold: Callable[[], None] | None = None) -> np.ndarray | None:
    """A chunk file's bytes (None when it is missing, as zarr's LocalStore reads it): one ``preadv`` into
    a buffer of ``size`` + 1 bytes (``size`` None: the file's size), more reads only if it is longer.
    ``on_cold``: called when the file is not all in the page cache, before waiting for the disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except MISSING:
        return None
    try:
        size = os.fstat(fd).st_size if size is None else size
        buf = np.empty(size + 1, np.uint8)  # one byte more: a longer file shows
        view = memoryview(buf)
        # A small first read, then the rest: from the disk, the kernel then reads the rest ahead in large
        # folios. One read of the whole file filled the page cache with 4 KiB pages here (Linux 6.18,
        # ext4): 1.7x slower cold, and 2.7x slower to read again warm (np.load reads a header first).
        got = _cached(fd, view[:FIRST_READ])  # from the page cache only: is the file cached?
        if got == min(FIRST_READ, size + 1):
            got += _cached(fd, view[got:], got)
        if on_cold is not None and got < size:
            on_cold()
        while got <= size:
            n = os.preadv(fd, [view[got:FIRST_READ] if got == 0 else view[got:]], got)
            if n == 0:
                return buf[:got]
            got += n
        parts = [buf]  # longer than expected (damage): read it whole, the checks say what is wrong
        while more := os.pread(fd, 1 << 20, got):
            parts.append(np.frombuffer(more, np.uint8))
            got += len(more)
        return np.concatenate(parts)
    except MISSING:
        return None
    finally:
        os.close(fd)


_POOL: tuple[int, ThreadPoolExecutor] | None = None


def _pool() -> ThreadPoolExecutor:
    """Threads reading a cold row's other files while the first one is read (per process: a forked
    DataLoader worker starts its own)."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():
        _POOL = (os.getpid(), ThreadPoolExecutor(4, thread_name_prefix="boxrefine-read"))
    return _POOL[1]


class DirectReader:
    """Reads rows' chunks of one split (``array(name)`` opens its zarr arrays) for the arrays it
    ``handles``; see the module docstring."""

    def __init__(self, group: zarr.Group, array: Callable[[str], zarr.Array]):
        store = group.store_path.store
        self.store, self.array = store, array
        self.root = str(store.root) if isinstance(store, LocalStore) else None
        self._layout: dict[str, ArrayChunks | None] = {}
        self._fetched: dict[str, np.ndarray | BaseException | None] = {}  # chunks fetched by prefetch
        self._ahead: dict[str, int | None] = {}  # a local row's chunk files (and sizes) to read together when cold
        self._reading: dict[str, Future] = {}  # those being read in threads
        self.requests = 0  # chunk objects read (files or GET requests), for the bench

    def layout(self, name: str) -> ArrayChunks | None:
        if name not in self._layout:
            arr = self.array(name)
            self._layout[name] = ArrayChunks(arr) if ENABLED and ArrayChunks.supported(arr) else None
        return self._layout[name]

    def handles(self, name: str) -> bool:
        return self.layout(name) is not None

    def _full_key(self, chunks: ArrayChunks, key: str) -> str:
        return f"{chunks.path}/{key}" if chunks.path else key

    def prefetch(self, row: int, n: int, features: bool = True, masks: bool = True) -> None:
        """Prepare a read of ``row`` (its features unless not ``features``, its first ``n`` instances of
        GT, masks unless not ``masks``). Any store but a local one: the chunks are fetched now, in one
        event-loop round trip (a failed request is raised by the read that needs it). A local store: the
        first of the row's files found outside the page cache has the disk read all of them at once
        (nothing is opened ahead: the record in particular is opened after the chunks are read)."""
        self.release()
        wanted = [(a, None) for a in FEATURE_ARRAYS if features]
        wanted += [(a, n) for a in GT_ARRAYS if masks or a != "gt_masks"]
        chunks = [(self._full_key(c, k), c) for name, count in wanted if (c := self.layout(name))
                  for k in c.keys(row, count)]
        keys = [key for key, _ in chunks]
        if self.root is not None:
            self._ahead = {key: None if c.blosc else c.nbytes + 4 for key, c in chunks}
        elif keys:
            self.requests += len(keys)
            self._fetched = dict(zip(keys, sync(self._get_all(keys)), strict=True))

    async def _get_all(self, keys: list[str]) -> list[np.ndarray | BaseException | None]:
        proto = default_buffer_prototype()
        got = await asyncio.gather(*(self.store.get(k, prototype=proto) for k in keys), return_exceptions=True)
        return [b if b is None or isinstance(b, BaseException) else b.as_numpy_array() for b in got]

    def release(self) -> None:
        """Forget the prefetched chunks (the next read of a row fetches its chunks anew; reads still
        running in threads finish unseen)."""
        self._fetched, self._ahead, self._reading = {}, {}, {}

    def _cold(self, current: str) -> None:
        """The row's file ``current`` is not in the page cache: read its other chunk files in threads
        meanwhile (so the disk serves them together). Never the record: it is read after the chunks."""
        ahead, self._ahead = self._ahead, {}
        for key, size in ahead.items():
            if key != current:
                self._reading[key] = _pool().submit(read_file, os.path.join(self.root or "", key), size)

    def _stored(self, chunks: ArrayChunks, key: str) -> np.ndarray | None:
        full = self._full_key(chunks, key)
        self.requests += full not in self._fetched
        if self.root is not None:
            if full in self._reading:
                return self._reading.pop(full).result()
            size = None if chunks.blosc else chunks.nbytes + 4
            cold = (lambda: self._cold(full)) if full in self._ahead else None
            return read_file(os.path.join(self.root, full), size, cold)
        if full in self._fetched:
            got = self._fetched.pop(full)
            if isinstance(got, BaseException):
                raise got
            return got
        buf = sync(self.store.get(full, prototype=default_buffer_prototype()))
        return None if buf is None else buf.as_numpy_array()

    def read(self, name: str, row: int, n: int | None = None) -> tuple[np.ndarray, int | None]:
        """Row ``row`` of ``name`` (``n`` None: the whole row, as ``array[row]``; else its first ``n``
        along axis 1, as ``array[row, :n]``) and, when already known, the crc32c of those values.
        Raises :class:`ChunkDamage` for a chunk failing its checksum or its decoding."""
        chunks = self.layout(name)
        assert chunks is not None, name
        if n is not None:
            n = max(0, min(n, chunks.shape[1]))
        keys = chunks.keys(row, n)
        if n is None or len(keys) == 1 and n == chunks.chunks[1]:
            values, crc = chunks.decode(self._stored(chunks, keys[0]), whole=True)
            return values, crc
        if not keys:
            return np.empty((0, *chunks.shape[2:]), chunks.dtype), None
        parts = [chunks.decode(self._stored(chunks, k), whole=False)[0] for k in keys]
        values = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return values[:n], None
