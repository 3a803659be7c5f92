"""Atomic file writes: the one helper behind every file boxrefine writes outside the Zarr store
(checkpoints, configs, metrics, results JSON, plots, caches).

The content goes to a temp file in the destination folder with a name unique to this writer
(``tempfile.mkstemp``: never shared by two processes or threads), is flushed and fsynced, then
``os.replace``\\ d over the destination, and the folder entry is fsynced. A reader sees the old file
or the new one, never a torn one; a crash leaves at most a hidden ``.<name>.*.tmp`` file behind. A write
that fails (a full disk, a missing or read-only folder, a folder in the way) raises :class:`WriteError`,
one line naming the path and the cause, and leaves the old file as it was.

The file gets the mode a plain ``open(path, "w")`` would give it (0666 less the process's umask):
``mkstemp`` creates its temp file 0600, which would leave a shared ``runs/`` unreadable to colleagues.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from boxrefine.shared.errors import BoxrefineError


class WriteError(BoxrefineError, OSError):
    """A file that could not be written; the message names it and the cause (one line)."""


def _write_error(path: Path, e: OSError) -> WriteError:
    if isinstance(e, WriteError):
        return e
    if isinstance(e, FileNotFoundError) and not path.parent.is_dir():
        return WriteError(f"{path}: cannot write: the folder {path.parent} does not exist")
    if path.is_dir():
        return WriteError(f"{path}: cannot write: a folder of that name is in the way")
    return WriteError(f"{path}: cannot write: {e.strerror or e}")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms/filesystems without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask, read without changing it where the system tells it (Linux's
    /proc/self/status); elsewhere set and restored at once."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode of a file created now by ``open(path, "w")``: 0666 less the umask."""
    return 0o666 & ~current_umask()


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(f)`` on a binary temp file beside ``path``, then atomically move it to ``path``
    (with the mode of a new file: the umask is honoured)."""
    path = Path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _write_error(path, e) from None
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, new_file_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _write_error(path, e) from None
        raise
    _fsync_dir(path.parent)
    return path


def atomic_link(source: str | Path, path: str | Path, data: bytes) -> Path:
    """``path`` as a second name of the file ``source`` (a hard link, made under a temp name and then
    ``os.replace``\\ d over ``path``): the same bytes without a second copy. Where the file system
    has no hard links, ``data`` (the bytes of ``source``) is written instead."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.link")
    try:
        os.link(source, tmp)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        return atomic_write_bytes(path, data)
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = None) -> Path:
    """JSON with ``allow_nan=False``: a NaN is a bug to report here, not a file no parser reads."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, allow_nan=False))


def atomic_append_text(path: str | Path, text: str) -> Path:
    """``path`` with ``text`` added at its end, written as a whole new file (a log such as
    metrics.jsonl: small, and never left half-written)."""
    path = Path(path)
    try:
        old = path.read_bytes()
    except FileNotFoundError:
        old = b""
    return atomic_write_bytes(path, old + text.encode("utf-8"))


def atomic_savefig(fig: Any, path: str | Path, dpi: int = 90) -> Path:
    """A matplotlib figure as PNG, atomically."""
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))


def read_bytes(path: str | Path, error: type[Exception], what: str = "file") -> bytes:
    """A whole file's bytes; a missing or unreadable one raises ``error`` with one line naming the
    path (``<path>: <what> not found`` / ``<path>: cannot read <what>: <reason>``)."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder, not a {what}") from None
    except OSError as e:
        raise error(f"{path}: cannot read {what}: {e.strerror or e}") from None
