"""DataLoader workers that die with their parent.

torch's workers notice a dead parent only between items, and a worker whose queue feeder thread is
blocked writing a large item into a pipe nobody reads never exits: after a ``kill -9`` of extract,
workers (hundreds of MB each) were seen alive for minutes. :func:`worker_init` asks Linux to SIGKILL
the worker when its parent dies (``prctl(PR_SET_PDEATHSIG)``); elsewhere a watchdog thread polls
``os.getppid()``. Either way a parent that died before the worker started is caught at once.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

from boxrefine.shared.runtime.urls import is_s3

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCHDOG_S = 1.0


def _arm_pdeathsig() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(WATCHDOG_S)
        if os.getppid() != parent_pid:
            os._exit(1)


def _die_with_parent(parent_pid: int, worker_id: int) -> None:
    armed = _arm_pdeathsig()
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="parent-watchdog").start()


def worker_init() -> Callable[[int], None]:
    """A DataLoader ``worker_init_fn`` that makes each worker exit when this process dies."""
    return functools.partial(_die_with_parent, os.getpid())


def worker_context(store_path: str, num_workers: int) -> str | None:
    """The start method of DataLoader workers that read the store at ``store_path``: "spawn" for an
    ``s3://`` store, whose client (obstore's Rust runtime, ``shared/store/objstore.py``) does not survive a
    fork (a forked worker's first request never returns), else the platform's default (fork on Linux)."""
    return "spawn" if num_workers and is_s3(store_path) else None

