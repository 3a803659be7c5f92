"""What the extract services serving a store publish about themselves (docs/architecture.md,
"The extractor as a service").

Each ``boxrefine extract --watch`` process writes one small JSON object per shard at the store root,
``watchers/shard-<i>-of-<n>.json``, replaced whole (atomically) on every heartbeat:
host, pid, started, heartbeat, status, cycle, rows done / to do, images/s. ``boxrefine store info``
shows them; a heartbeat older than ``STALE_S`` reads as "not running" (the process was killed, or its
machine is gone). No lock server: the objects are only information, and a second watcher of the same
shard refuses to start while the first one's heartbeat is fresh.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from boxrefine.shared.store.location import OWN_FOLDERS, list_store_files, write_store_file

FOLDER = OWN_FOLDERS[0]  # "watchers"
HEARTBEAT_S = 10.0  # a running watcher rewrites its state at least this often
STALE_S = 60.0  # a heartbeat older than this: the watcher is not running


@dataclass
class WatcherState:
    shard: str  # shard-<i>-of-<n>
    host: str
    pid: int
    started: float  # unix time
    interval_s: float
    heartbeat: float = 0.0
    status: str = "starting"  # starting | planning | extracting | idle | stopped | failed
    cycle: int = 0
    rows_done: int = 0  # rows processed since the watcher started
    rows_todo: int = 0  # rows still to do in the current cycle
    images_per_s: float = 0.0  # over the current (or last) cycle with work
    message: str = ""  # the error of a failed watcher
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{FOLDER}/{self.shard}.json"

    def age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.heartbeat

    def running(self, now: float | None = None) -> bool:
        return self.status not in ("stopped", "failed") and self.age(now) <= STALE_S

    def publish(self, store_path: str) -> None:
        self.heartbeat = time.time()
        write_store_file(store_path, self.key, json.dumps(asdict(self), sort_keys=True).encode())

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        where = f"{self.host} pid {self.pid}, started {when}"
        if self.status in ("stopped", "failed"):
            ended = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.heartbeat))
            why = f": {self.message}" if self.message else ""
            return f"{self.shard}: {self.status} at {ended}{why} ({where}; {self.rows_done} rows done)"
        if not self.running(now):
            return (f"{self.shard}: not running (last heartbeat {_ago(self.age(now))} ago, status was {self.status}; "
                    f"{where}; {self.rows_done} rows done, {self.rows_todo} to do)")
        return (f"{self.shard}: running, {self.status} (cycle {self.cycle}; {where}; heartbeat {_ago(self.age(now))} "
                f"ago); rows done {self.rows_done}, to do {self.rows_todo}, {self.images_per_s:.2f} images/s")


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h"


def read_watchers(store_path: str) -> list[WatcherState]:
    """The published states of every watcher of the store (unreadable objects are skipped)."""
    names = set(WatcherState.__dataclass_fields__)
    out = []
    for name, raw in sorted(list_store_files(store_path, FOLDER).items()):
        if not name.endswith(".json"):
            continue
        try:
            d = json.loads(raw)
            out.append(WatcherState(**{k: v for k, v in d.items() if k in names}))
        except (ValueError, TypeError):
            continue
    return out
