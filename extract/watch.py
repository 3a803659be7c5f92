"""``boxrefine extract --watch``: the extractor as a service (docs/architecture.md, "The extractor as a
service").

Runs until SIGTERM/SIGINT. Every cycle re-reads the annotation files, lays out every split again
and plans what is new (new images, changed images, changed annotations), encodes it, then waits
``--interval`` seconds. The first signal finishes the batch in flight, commits its rows and exits 0;
a second one exits at once (the rows in flight are redone next time, as after ``kill -9``). The
watcher publishes its state in the store (``shared/store/watchers.py``), refreshed by a heartbeat thread.
Several watchers (``--shard i/n`` or torchrun ranks) may serve one store, each on its own rows.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

import torch

from boxrefine.extract.run import ExtractError, Extractor
from boxrefine.shared.config import PipelineConfig
from boxrefine.shared.errors import BoxrefineError, first_line
from boxrefine.shared.runtime.console import console
from boxrefine.shared.runtime.signals import StopSignals
from boxrefine.shared.store.location import StoreError
from boxrefine.shared.store.watchers import HEARTBEAT_S, WatcherState, read_watchers


class Heartbeat:
    """Publishes ``state`` now and every ``HEARTBEAT_S`` seconds on a thread (a failed write is
    retried at the next beat: the state is information, never a reason to stop extracting)."""

    def __init__(self, store_path: str, state: WatcherState, extractor: Extractor):
        self.store_path, self.state, self.ex = store_path, state, extractor
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.cycle_start = (time.monotonic(), 0)  # (time, rows_done) when the current cycle began
        self.thread = threading.Thread(target=self._loop, name="watch-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self.beat()
        self.thread.start()
        return self

    def new_cycle(self, todo: int) -> None:
        with self.lock:
            self.cycle_start = (time.monotonic(), self.ex.rows_done)
            self.state.cycle += 1
            self.state.rows_todo = todo
            self.state.status = "extracting" if todo else "idle"
            self.todo_at_start = todo
        self.beat()

    def beat(self) -> None:
        with self.lock:
            t0, done0 = self.cycle_start
            in_cycle = self.ex.rows_done - done0
            self.state.rows_done = self.ex.rows_done
            if self.state.status == "extracting":
                self.state.rows_todo = max(0, getattr(self, "todo_at_start", 0) - in_cycle)
                if in_cycle:
                    self.state.images_per_s = in_cycle / max(time.monotonic() - t0, 1e-9)
            try:
                self.state.publish(self.store_path)
            except BoxrefineError as e:
                console.print(f"warning: watcher state not published: {e}", style="yellow", markup=False)

    def _loop(self) -> None:
        while not self.done.wait(HEARTBEAT_S):
            self.beat()

    def stop(self, status: str, message: str = "") -> None:
        self.done.set()
        if self.thread.is_alive():
            self.thread.join()
        with self.lock:
            self.state.status, self.state.message = status, message
        self.beat()


def _refuse_second_watcher(store_path: str, state: WatcherState) -> None:
    for other in read_watchers(store_path):
        if other.shard == state.shard and other.running() and (other.host, other.pid) != (state.host, state.pid):
            raise StoreError(f"{store_path}: {state.shard} is already served by a running watcher "
                             f"({other.describe()}); stop it first, or give this one another --shard")


def exit_at_once() -> None:
    """A second signal: leave now (exit code 130); the rows in flight are redone by the next extract, as
    after ``kill -9``, and the published state goes stale ("not running")."""
    console.print("stopped at once; the rows in flight are redone by the next extract", style="yellow",
                  markup=False)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def run_watch(cfg: PipelineConfig, interval: float, *, model: torch.nn.Module | None = None,
              announce: bool = True) -> int:
    """Serve the configured store until SIGTERM/SIGINT; returns the number of cycles run. A second
    signal ends the process at once (:func:`exit_at_once`)."""
    stop = StopSignals("finishing the rows in flight, then exiting (again to exit at once)", on_force=exit_at_once)
    with stop:
        ex = Extractor(cfg, model, announce, stop=stop, quiet=True).setup()
        state = WatcherState(shard=ex.shard_name, host=socket.gethostname(), pid=os.getpid(), started=time.time(),
                             interval_s=interval)
        _refuse_second_watcher(cfg.store.path, state)
        console.print(f"watching {cfg.store.path} ({ex.shard_name}): a new cycle every {interval:g} s until "
                      "SIGTERM/SIGINT", markup=False)
        beat = Heartbeat(cfg.store.path, state, ex).start()
        status, message = "stopped", ""
        try:
            while True:
                beat.new_cycle(sum(len(jobs) for _, jobs, _ in ex.plans))
                try:
                    ex.run()
                except ExtractError as e:  # e.g. every image of a split bad (not arrived yet?): say so, go on
                    console.print(f"warning: {e}", style="yellow", markup=False)
                with beat.lock:
                    state.status = "idle"
                if stop.requested or stop.event.wait(interval):
                    break
                with beat.lock:
                    state.status = "planning"
                ex.plan()
        except KeyboardInterrupt:
            status, message = "stopped", "stopped at once (second signal)"
            raise
        except BaseException as e:
            status, message = "failed", first_line(e, 300)
            raise
        finally:
            beat.stop(status, message)
        console.print(f"watcher {ex.shard_name} stopped after {state.cycle} cycle(s), {ex.rows_done} rows done",
                      markup=False)
        return state.cycle
