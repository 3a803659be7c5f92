"""Run folders and the one rule for "the latest checkpoint", which evaluate, refine and the Makefile
(``make refine``, ``make demo``) all follow: the checkpoint the config names (``evaluate.checkpoint`` /
``refine.checkpoint``), else ``best.pt`` of the latest run in ``train.runs_dir`` — the run folder
holding a checkpoint whose files changed last (its ``eval/`` subfolder does not count, so evaluating an
old run does not make it the latest).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from boxrefine.shared.errors import BoxrefineError


class NoCheckpointError(BoxrefineError, FileNotFoundError):
    """No checkpoint where the rule looked; the message names the folder and what to do."""


def natural_key(name: str) -> tuple[int, list[Any]]:
    """Numbered checkpoints first, numbers compared as numbers (epoch_2 < epoch_10 < epoch_010b),
    then the named ones alphabetically: epoch_005.pt, epoch_010.pt, best.pt, last.pt."""
    parts = [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]
    return (0 if any(c.isdigit() for c in name) else 1, parts)


def folder_checkpoints(folder: Path) -> list[Path]:
    """The ``*.pt`` files of a run folder, in natural order."""
    files = [p for p in folder.iterdir() if p.suffix == ".pt" and not p.name.startswith(".") and p.is_file()]
    return sorted(files, key=lambda p: natural_key(p.name))


def _activity(run: Path) -> int:
    """When a run folder last changed, from the files directly in it."""
    stamps = [p.stat().st_mtime_ns for p in run.iterdir() if p.is_file()]
    return max(stamps) if stamps else run.stat().st_mtime_ns


def latest_run(runs_dir: Path) -> Path:
    """The latest run folder of ``runs_dir`` that holds a checkpoint (a start killed before its first
    save is not a candidate); NoCheckpointError naming the folder when there is none."""
    if not runs_dir.is_dir():
        raise NoCheckpointError(f"{runs_dir}: no runs folder (train.runs_dir); train first or pass --checkpoint")
    runs = [d for d in runs_dir.iterdir() if d.is_dir() and not d.name.startswith(".") and folder_checkpoints(d)]
    if not runs:
        raise NoCheckpointError(f"{runs_dir}: no run folder holds a checkpoint (*.pt); train first or pass "
                                  "--checkpoint")
    return max(runs, key=_activity)


def run_best(run: Path) -> Path:
    """``best.pt`` of a run folder; NoCheckpointError when it has none."""
    best = run / "best.pt"
    if not best.is_file():
        raise NoCheckpointError(f"{run}: the run has no best.pt (trained without a validation split?); "
                                  f"pass --checkpoint {run}/last.pt")
    return best


def latest_checkpoint(configured: Path | None, runs_dir: Path) -> tuple[Path, str]:
    """(checkpoint or run folder, how it was chosen): ``configured`` (a flag or the config's
    ``*.checkpoint``) when given, else best.pt of :func:`latest_run`."""
    if configured is not None:
        return Path(configured), "given"
    return run_best(latest_run(runs_dir)), f"best.pt of the latest run in {runs_dir}"
