"""How values are stored: the storage dtype of features (numpy has no bfloat16: its bits are stored
as uint16 and reinterpreted on read), the codecs of each array, and the content digests of a row.

Every array ends its codec chain with zarr's ``crc32c`` codec: the checksum covers the bytes as
stored (after Blosc), so a flipped bit anywhere in a chunk file is caught before Blosc decodes it
(zarr raises ``ValueError: Stored and computed checksum do not match``). The chunk checksum cannot
see a chunk that is *missing* (zarr reads the fill value), so each row's record also holds the
crc32c of the values of each of its arrays (:func:`digest`), checked on every read. Also: the zarr
group calls that several writers may make at the same moment."""

from __future__ import annotations

from typing import Any

import google_crc32c
import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec
from zarr.errors import ContainsGroupError


def compressors(codec: str, clevel: int, typesize: int) -> list[Any]:
    """The bytes codecs of an array: Blosc (unless ``codec`` is "none"), then the crc32c checksum."""
    if codec == "none":
        return [Crc32cCodec()]
    shuffle = BloscShuffle.shuffle if typesize > 1 else BloscShuffle.bitshuffle
    return [BloscCodec(cname=codec, clevel=clevel, shuffle=shuffle, typesize=typesize), Crc32cCodec()]


def mask_codec(codec: str) -> str:
    """The Blosc codec of the GT masks (and the index arrays): the store's, or zstd when the features
    are stored without a compressor (``store.codec: none``, the default: masks shrink 100x and more,
    float16 features 1.1-1.4x at 5-9x the read cost)."""
    return "zstd" if codec == "none" else codec


def digest(a: np.ndarray) -> int:
    """crc32c of an array's values (C order, as stored), as a non-negative int for a row record."""
    return int(google_crc32c.value(np.ascontiguousarray(a).view(np.uint8)))


def storage_numpy_dtype(dtype: str) -> np.dtype:
    # numpy has no bfloat16: its bits are stored as uint16 and reinterpreted on read.
    return np.dtype({"float16": "float16", "float32": "float32", "bfloat16": "uint16"}[dtype])


def to_storage(t: torch.Tensor, dtype: str) -> np.ndarray:
    """Cast a float tensor to the storage dtype (on its device) and return a CPU numpy array."""
    if dtype == "bfloat16":
        t = t.to(torch.bfloat16).view(torch.int16)
        return t.cpu().numpy().view(np.uint16)
    t = t.to(torch.float16 if dtype == "float16" else torch.float32)
    return t.cpu().numpy()


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Inverse of :func:`to_storage`: numpy chunk → torch tensor in float16/bfloat16/float32."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def require_group(parent: zarr.Group, name: str) -> zarr.Group:
    """``parent.require_group(name)``, safe when another process creates it at the same moment."""
    try:
        return parent.require_group(name)
    except ContainsGroupError:
        return parent[name]
