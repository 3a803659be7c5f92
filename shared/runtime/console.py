"""Terminal output: results on stdout (``result_console``: tables, ``store info``, what a command
answers), everything else on stderr (``console``: logs, notes, warnings, progress), so that
``boxrefine evaluate > results.txt`` captures the results and nothing else; progress bars with rate
and ETA on a terminal, and plain periodic log lines when output is not a terminal (CI, log files).

Messages carry user data (paths, values such as ``[x, y, w, h]`` or ``[inf, ...]``), so nothing is
read as rich markup: print strings with ``markup=False`` (colour through ``style=``) and build other
renderables from ``rich.text.Text`` (``tests/test_bad_input.py`` checks every ``console.print``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text


def _make_console(stderr: bool) -> Console:
    c = Console(stderr=stderr, highlight=False)
    if not c.is_terminal:
        # CI logs and files: one line per message at any length, never rich's 80-column wrapping
        c = Console(stderr=stderr, highlight=False, soft_wrap=True, width=1000)
    return c


console = _make_console(stderr=True)
result_console = _make_console(stderr=False)


def is_interactive() -> bool:
    return console.is_terminal and not os.environ.get("CI")


def warn_loud(title: str, text: str) -> None:
    """A warning that cannot be missed (e.g. random-init weights)."""
    if is_interactive():
        console.print(Panel(Text(text), title=Text(title), border_style="bold yellow"))
    else:
        console.print(f"WARNING [{title}] {text}", markup=False)


class _Task:
    """Handle for one progress loop; ``advance`` with the number of items done."""

    def __init__(self, progress: Progress | None, task_id: int | None, desc: str, total: int, unit: str):
        self._p, self._id, self.desc, self.total, self.unit = progress, task_id, desc, total, unit
        self.done = 0
        self._t0 = self._last = time.perf_counter()
        self.postfix = ""

    def advance(self, n: int = 1, postfix: str | None = None) -> None:
        self.done += n
        if postfix is not None:
            self.postfix = postfix
        if self._p is not None:
            self._p.update(self._id, advance=n, postfix=self.postfix)
            return
        now = time.perf_counter()
        if now - self._last >= 10.0 or self.done >= self.total:
            self._last = now
            rate = self.done / max(now - self._t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            console.print(f"{self.desc}: {self.done}/{self.total} {self.unit} "
                          f"({rate:.2f} {self.unit}/s, eta {eta:.0f}s) {self.postfix}".rstrip(), markup=False)


@contextmanager
def progress(desc: str, total: int, unit: str = "img") -> Iterator[_Task]:
    """Progress for a loop of ``total`` items: a rich bar on a terminal, log lines otherwise."""
    if not is_interactive():
        yield _Task(None, None, desc, total, unit)
        return
    cols = (
        TextColumn("{task.description}", style="bold", markup=False),  # descriptions name checkpoints
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}", markup=False),
        TimeElapsedColumn(),
        TextColumn("eta", markup=False),
        TimeRemainingColumn(),
        TextColumn("{task.fields[postfix]}", markup=False),
    )
    with Progress(*cols, console=console, transient=False) as p:
        task_id = p.add_task(desc, total=total, rate="", postfix="")
        task = _Task(p, task_id, desc, total, unit)
        orig = task.advance

        def advance(n: int = 1, postfix: str | None = None) -> None:
            orig(n, postfix)
            elapsed = max(time.perf_counter() - task._t0, 1e-9)
            p.update(task_id, rate=f"{task.done / elapsed:.2f} {unit}/s")

        task.advance = advance  # type: ignore[method-assign]
        yield task
