"""How values are stored: the storage dtype of features (numpy has no bfloat16: its bits are stored
as uint16 and reinterpreted on read), the Blosc codecs of each array, and the zarr group calls that
several writers may make at the same moment."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, BloscShuffle
from zarr.errors import ContainsGroupError


def compressors(codec: str, clevel: int, typesize: int) -> Any:
    if codec == "none":
        return None
    shuffle = BloscShuffle.shuffle if typesize > 1 else BloscShuffle.bitshuffle
    return BloscCodec(cname=codec, clevel=clevel, shuffle=shuffle, typesize=typesize)


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


def create_or_open_group(path: str, attributes: dict[str, Any]) -> zarr.Group:
    """Open the group at ``path``, or create it with ``attributes`` (one metadata write), safely when
    several processes do so at once: zarr checks for a group, then creates it, and a process that lost
    that race gets ContainsGroupError; the group is there by then, so it opens it."""
    try:
        return zarr.open_group(path, mode="a", zarr_format=3, attributes=attributes)
    except ContainsGroupError:
        return zarr.open_group(path, mode="a", zarr_format=3)


def require_group(parent: zarr.Group, name: str) -> zarr.Group:
    """``parent.require_group(name)``, safe when another process creates it at the same moment."""
    try:
        return parent.require_group(name)
    except ContainsGroupError:
        return parent[name]
