"""Stopping on SIGINT/SIGTERM at a safe point: the first signal asks, a second one stops at once.

Used by train (finish the step in flight, save, exit) and by extract (finish and commit the rows in
flight, exit: ``extract --watch`` runs as a service until one of these signals)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from boxrefine.shared.runtime.console import console


class StopSignals:
    """While active (main thread only): the first SIGINT or SIGTERM sets ``requested`` and prints
    ``"<SIGNAL>: <what>"``, and the caller stops at its next safe point; a second one sets ``forced``
    and calls ``on_force`` (``extract --watch``: leave the process at once) or, without one, raises
    KeyboardInterrupt. (A KeyboardInterrupt raised from a handler is lost when the signal arrives while
    Python runs a finaliser or a weakref callback: a process that must end has to end in the handler.)"""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, what: str = "stopping after the current step (again to stop at once)",
                 on_force: Callable[[], None] | None = None) -> None:
        self.what, self.on_force = what, on_force
        self.requested = False
        self.forced = False
        self.event = threading.Event()  # set with ``requested``: a sleeping loop can wait on it
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            self.forced = True
            if self.on_force is not None:
                self.on_force()
            raise KeyboardInterrupt
        self.requested = True
        self.event.set()
        console.print(f"{signal.Signals(signum).name}: {self.what}", style="yellow", markup=False)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
