"""Where a store lives: what a store path holds (nothing, a boxrefine store, or something else),
deleting a store's own content (``--overwrite``), and one-line errors for the faults the
environment causes (a missing fsspec backend, cloud credentials, permissions, a full disk, corrupt
``zarr.json`` metadata).

Local paths and fsspec URLs go through the same code (``fsspec.core.url_to_fs``; ``s3://`` through
``shared/store/objstore.py``'s adapter over obstore).
"""

from __future__ import annotations

import errno
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from boxrefine.shared.errors import BoxrefineError, first_line
from boxrefine.shared.runtime.fileio import atomic_write_bytes
from boxrefine.shared.runtime.urls import is_url
from boxrefine.shared.store.objstore import location_fs

# Exceptions raised by cloud backends for missing or wrong credentials are not OSErrors
# (botocore.exceptions.NoCredentialsError, google.auth.exceptions.DefaultCredentialsError, ...).
CLOUD_ERROR_MODULES = ("botocore", "aiobotocore", "boto3", "s3fs", "obstore", "gcsfs", "google.auth",
                       "google.api_core", "google.cloud", "adlfs", "azure")
_S3_ERROR = re.compile(r"<Code>([^<]+)</Code>\s*<Message>([^<]*)</Message>")
# A request that never reached the server (refused, unresolvable or timed-out connection): obstore's
# "error sending request" / reqwest's Connect kind, botocore's EndpointConnectionError.
_UNREACHABLE = re.compile(r"error sending request|kind: Connect|dns error|Could not connect to the endpoint", re.I)
TEMP_SUFFIX = ".partial"  # zarr's LocalStore writes <key>.<uuid>.partial, then renames it
OWN_FOLDERS = ("watchers",)  # a store's own folders that are not zarr nodes (shared/store/watchers.py)


class StoreError(BoxrefineError, ValueError):
    """A store that cannot be used as asked; the message names the store and the problem."""


def _cloud_line(e: BaseException) -> str:
    """:func:`first_line`, but for an S3 error response its code and message (obstore puts the whole
    response, then the request's details, in the text)."""
    m = _S3_ERROR.search(str(e))
    if m:
        return f"{m.group(1)}: {m.group(2)}"[:200]
    return first_line(e).split(": Error performing ")[0]


def environment_problem(e: BaseException) -> str | None:
    """One line describing an exception the environment caused, or None (a bug: keep its traceback)."""
    if isinstance(e, ImportError):  # fsspec: "Install gcsfs to access Google Storage"; s3://: obstore
        return f"{_cloud_line(e)} (the storage backend for this URL is not installed)"
    if isinstance(e, OSError):
        what = e.strerror or _cloud_line(e) or type(e).__name__
        if e.errno == errno.ENOSPC:
            what = "disk full (No space left on device)"
        return f"{what} ({e.filename})" if getattr(e, "filename", None) else what
    if type(e).__module__.startswith(CLOUD_ERROR_MODULES):
        unreachable = _unreachable(str(e))
        if unreachable:
            return unreachable
        return f"{type(e).__name__}: {_cloud_line(e)} (check the cloud credentials)"
    return None


def _unreachable(text: str) -> str | None:
    """The line for a cloud request that never reached its endpoint, or None."""
    if not _UNREACHABLE.search(text):
        return None
    url = re.search(r"(?:Error performing \w+ |endpoint URL: \W?)(\w+://[^/\s\"']+)", text)
    why = re.search(r'message: "([^"]+)"', text)
    return (f"cannot reach the storage endpoint{' ' + url.group(1) if url else ''} "
            f"({why.group(1) if why else 'no connection'}): check the endpoint URL and the network")


def raise_environment(path: str, action: str, e: BaseException) -> None:
    """Raise a one-line StoreError for an environment fault met doing ``action``; return otherwise."""
    why = environment_problem(e)
    if why is not None:
        raise StoreError(f"{path}: cannot {action}: {why}") from None


@contextmanager
def store_access(path: str, action: str) -> Iterator[None]:
    """Turn an environment fault or corrupt metadata met while doing ``action`` on the store at
    ``path`` into a one-line :class:`StoreError`; anything else propagates unchanged."""
    try:
        yield
    except BoxrefineError:
        raise
    except (ValueError, KeyError, TypeError):
        found = find_corrupt_metadata(path)
        if found is None:
            raise
        meta, problem = found
        raise StoreError(f"{meta}: corrupt zarr metadata ({problem}); the store cannot be used as it is: "
                         "rebuild it (boxrefine extract --overwrite; if this is the store's root zarr.json, delete "
                         "the store folder first)") from None
    except Exception as e:
        raise_environment(path, action, e)
        raise


def _fs(path: str) -> tuple[Any, str]:
    with store_access(path, "open the store location"):
        return location_fs(path)


def metadata_problem(raw: bytes) -> tuple[str | None, dict[str, Any] | None]:
    """(problem, document) of a zarr.json's bytes; problem is None for a plausible v3 document."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        return f"not valid JSON: {_cloud_line(e)}", None
    if not isinstance(doc, dict) or doc.get("zarr_format") != 3 or doc.get("node_type") not in ("group", "array"):
        return "not a Zarr v3 group or array document", None
    if doc["node_type"] == "array":
        from zarr.core.metadata.v3 import ArrayV3Metadata

        try:
            ArrayV3Metadata.from_dict(dict(doc))
        except Exception as e:  # whatever zarr's parser objects to
            return f"{type(e).__name__}: {_cloud_line(e)}", doc
    return None, doc


def find_corrupt_metadata(path: str, max_depth: int = 3) -> tuple[str, str] | None:
    """The first ``zarr.json`` under ``path`` (root, splits, their arrays and groups) that zarr cannot
    parse, with the problem; None when they all parse. Chunk folders are not walked."""
    try:
        fs, root = location_fs(path)
    except Exception:
        return None

    root = root.rstrip("/")

    def walk(node: str, depth: int) -> tuple[str, str] | None:
        meta = f"{node}/zarr.json"
        try:
            raw = fs.cat_file(meta)
        except Exception:
            return None
        problem, doc = metadata_problem(raw)
        if problem is not None:
            return path.rstrip("/") + meta[len(root):], problem
        if depth >= max_depth or doc is None or doc.get("node_type") != "group":
            return None
        try:
            children = [c["name"] for c in fs.ls(node, detail=True) if c.get("type") == "directory"]
        except Exception:
            return None
        for child in sorted(children):
            found = walk(child.rstrip("/"), depth + 1)
            if found:
                return found
        return None

    return walk(root, 0)


@dataclass
class StorePath:
    """What a store path holds. ``kind``: "absent", "empty", "store" (a boxrefine store), "foreign"."""
    path: str
    kind: str
    own: list[str] = field(default_factory=list)  # a store's own entries (child groups, temp files)
    other: list[str] = field(default_factory=list)  # entries that are not part of a store
    attrs: dict[str, Any] = field(default_factory=dict)


def inspect_store_path(path: str) -> StorePath:
    """Classify ``path`` before extract writes there. A corrupt root zarr.json raises StoreError:
    without it nothing can tell whose folder this is."""
    fs, root = _fs(path)
    root = root.rstrip("/")
    with store_access(path, "look at the store location"):
        if not fs.exists(root):
            return StorePath(path, "absent")
        if not fs.isdir(root):
            return StorePath(path, "foreign", other=[root.rsplit("/", 1)[-1]])
        entries = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e.get("type") for e in fs.ls(root, detail=True)}
    temp = sorted(n for n in entries if n.endswith(TEMP_SUFFIX))
    rest = sorted(n for n in entries if n not in temp and n != "zarr.json")
    if "zarr.json" not in entries:
        return StorePath(path, "empty" if not rest else "foreign", own=temp, other=rest)
    with store_access(path, "read the store's zarr.json"):
        raw = fs.cat_file(f"{root}/zarr.json")
    problem, doc = metadata_problem(raw)
    if problem is not None:
        raise StoreError(f"{path}/zarr.json: corrupt zarr metadata ({problem}): cannot tell whether this is a "
                         "boxrefine store, so extract neither writes into it nor deletes it; if it is one, delete "
                         "the folder yourself and run extract again")
    attrs = (doc or {}).get("attributes") or {}
    if (doc or {}).get("node_type") != "group" or not isinstance(attrs.get("boxrefine"), dict):
        return StorePath(path, "foreign", other=sorted(entries))
    own, other = [], []
    for name in rest:
        is_node = entries[name] == "directory" and (name in OWN_FOLDERS or fs.exists(f"{root}/{name}/zarr.json"))
        (own if is_node else other).append(name)
    return StorePath(path, "store", own=own + temp, other=other, attrs=attrs)


def delete_store_content(where: StorePath) -> list[str]:
    """Delete a boxrefine store's own content (its child groups, zarr's temp files, then its root
    zarr.json: a delete cut short still leaves a store that --overwrite recognises). Returns what
    it deleted; entries that are not part of the store stay."""
    assert where.kind == "store"
    fs, root = _fs(where.path)
    root = root.rstrip("/")
    deleted = []
    with store_access(where.path, "delete the store's content"):
        for name in where.own:
            fs.rm(f"{root}/{name}", recursive=True)
            deleted.append(name + ("/" if not name.endswith(TEMP_SUFFIX) else ""))
        fs.rm(f"{root}/zarr.json")
    return [*deleted, "zarr.json"]


def write_store_file(path: str, key: str, data: bytes) -> None:
    """Write a small object ``key`` (``folder/name``) under the store root, replacing it whole: a local
    file through ``fileio.atomic_write_bytes`` (temp + rename), an object store's single PUT elsewhere."""
    with store_access(path, f"write {key}"):
        if not is_url(path):

            target = Path(path.removeprefix("file://")) / key
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(target, data)
            return
        fs, root = _fs(path)
        fs.pipe_file(f"{root.rstrip('/')}/{key}", data)


def list_store_files(path: str, folder: str) -> dict[str, bytes]:
    """The small objects under ``folder`` of the store root, by name (empty when there are none)."""
    fs, root = _fs(path)
    where = f"{root.rstrip('/')}/{folder}"
    out = {}
    with store_access(path, f"read {folder}"):
        try:
            names = [e["name"] for e in fs.ls(where, detail=True) if e.get("type") == "file"]
        except FileNotFoundError:
            return {}
        for name in names:
            if name.rsplit("/", 1)[-1].startswith("."):  # a temp file of a write in progress
                continue
            try:
                out[name.rsplit("/", 1)[-1]] = fs.cat_file(name)
            except FileNotFoundError:  # replaced or removed meanwhile
                continue
    return out
