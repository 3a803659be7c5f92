"""Stores at ``s3://bucket/path``: zarr reads and writes through ``zarr.storage.ObjectStore`` over an
obstore ``S3Store`` (chosen over s3fs by measurement: ``bench/store_backends.py``), and the few
file-system operations boxrefine does on a store location (look at it, read or write a small object,
delete the store's content, add up its size) go through :class:`ObjectFS`, a minimal fsspec-like
adapter over the same client. Every other URL scheme goes through fsspec as before.

Configuration is the usual AWS environment: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``
(``AWS_SESSION_TOKEN``), ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` for an
S3-compatible server (MinIO, Ceph, ...; an ``http://`` endpoint is allowed), or the machine's instance
role. A request fails after ``CONNECT_TIMEOUT`` to connect and stops being retried ``RETRY_TIMEOUT``
after it began, so a missing bucket, wrong credentials or an unreachable endpoint end in one line
within seconds, never a hang.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

from boxrefine.shared.runtime.urls import is_s3

CONNECT_TIMEOUT = "3s"
REQUEST_TIMEOUT = "60s"  # one request (a 2-4 MiB chunk) on a slow link
RETRY_TIMEOUT = timedelta(seconds=5)
MAX_RETRIES = 3


def _split(url: str) -> tuple[str, str]:
    rest = url.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    return bucket, prefix.strip("/")


def s3_store(bucket: str, prefix: str = "") -> Any:
    """An obstore S3Store for ``bucket``/``prefix`` configured from the environment, with bounded
    timeouts and retries."""
    from obstore.store import S3Store

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    client = {"connect_timeout": CONNECT_TIMEOUT, "timeout": REQUEST_TIMEOUT,
              "allow_http": endpoint.startswith("http://")}
    retry = {"max_retries": MAX_RETRIES, "retry_timeout": RETRY_TIMEOUT,
             "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=1),
                         "base": 2}}
    config = {"endpoint": endpoint} if endpoint else {}
    return S3Store(bucket, prefix=prefix or None, config=config, client_options=client, retry_config=retry)


def zarr_location(path: str, mode: str) -> Any:
    """What ``zarr.open_group`` / ``create_group`` get for a store path: the path itself, or for
    ``s3://`` a ``zarr.storage.ObjectStore`` (read-only for ``mode='r'``)."""
    if not is_s3(path):
        return path
    from zarr.storage import ObjectStore

    return ObjectStore(s3_store(*_split(path)), read_only=mode == "r")


class ObjectFS:
    """The fsspec calls boxrefine makes on a store location, over one bucket. Paths are
    ``bucket/key`` as fsspec's S3 file system spells them; an object store has no folders, so a
    "directory" is a prefix that holds objects."""

    def __init__(self, bucket: str):
        self.bucket = bucket
        self.store = s3_store(bucket)

    def _key(self, path: str) -> str:
        bucket, key = _split("s3://" + path.removeprefix("s3://"))
        assert bucket == self.bucket, (bucket, self.bucket)
        return key

    def exists(self, path: str) -> bool:
        return self.isfile(path) or self.isdir(path)

    def isfile(self, path: str) -> bool:
        import obstore

        try:
            obstore.head(self.store, self._key(path))
            return True
        except FileNotFoundError:
            return False

    def isdir(self, path: str) -> bool:
        import obstore

        key = self._key(path)
        found = obstore.list(self.store, prefix=key + "/" if key else None, chunk_size=1)
        return any(len(batch) for batch in found)

    def ls(self, path: str, detail: bool = True) -> list[Any]:
        import obstore

        key = self._key(path)
        res = obstore.list_with_delimiter(self.store, prefix=key or None)
        out = [{"name": f"{self.bucket}/{p.rstrip('/')}", "type": "directory", "size": 0}
               for p in res["common_prefixes"]]
        out += [{"name": f"{self.bucket}/{o['path']}", "type": "file", "size": o["size"]} for o in res["objects"]]
        if not out and not self.isdir(path):
            raise FileNotFoundError(path)
        return out if detail else [e["name"] for e in out]

    def cat_file(self, path: str) -> bytes:
        import obstore

        return bytes(obstore.get(self.store, self._key(path)).bytes())

    def pipe_file(self, path: str, data: bytes) -> None:
        import obstore

        obstore.put(self.store, self._key(path), data)

    def rm(self, path: str, recursive: bool = False) -> None:
        import obstore

        key = self._key(path)
        keys = [key] if self.isfile(path) else []
        if recursive:
            keys += [o["path"] for batch in obstore.list(self.store, prefix=key + "/") for o in batch]
        if not keys:
            raise FileNotFoundError(path)
        for start in range(0, len(keys), 1000):
            obstore.delete(self.store, keys[start:start + 1000])

    def du(self, path: str, total: bool = True) -> int:
        import obstore

        key = self._key(path)
        return sum(o["size"] for batch in obstore.list(self.store, prefix=key + "/" if key else None) for o in batch)


def location_fs(path: str) -> tuple[Any, str]:
    """``fsspec.core.url_to_fs(path)``, but :class:`ObjectFS` for ``s3://`` (the root as ``bucket/prefix``)."""
    if is_s3(path):
        bucket, prefix = _split(path)
        return ObjectFS(bucket), f"{bucket}/{prefix}".rstrip("/")
    import fsspec

    return fsspec.core.url_to_fs(path)
