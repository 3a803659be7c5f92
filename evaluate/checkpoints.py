"""Which checkpoints evaluate scores, in which order, and loading a refiner from one.

Default: ``best.pt`` of the latest run in ``train.runs_dir`` that holds a checkpoint; else a
checkpoint file, or every ``*.pt`` of a folder in natural order (as timm's ``validate.py`` takes a
folder of checkpoints).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from boxrefine.shared.config import PipelineConfig
from boxrefine.shared.errors import BoxrefineError
from boxrefine.shared.model.checkpoint import CheckpointFileError, load_checkpoint, refiner_from_checkpoint
from boxrefine.shared.model.refiner import BoxRefiner
from boxrefine.shared.runtime.console import console
from boxrefine.shared.store.feature_store import FeatureStore
from boxrefine.shared.store.identity import feature_differences


class EvaluateError(BoxrefineError, RuntimeError):
    """A problem that stops evaluation with a one-line message."""


def natural_key(name: str) -> tuple[int, list[Any]]:
    """Numbered checkpoints first, numbers compared as numbers (epoch_2 < epoch_10 < epoch_010b),
    then the named ones alphabetically: epoch_005.pt, epoch_010.pt, best.pt, last.pt."""
    parts = [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]
    return (0 if any(c.isdigit() for c in name) else 1, parts)


def folder_checkpoints(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.suffix == ".pt" and not p.name.startswith(".") and p.is_file()]
    return sorted(files, key=lambda p: natural_key(p.name))


def _activity(run: Path) -> int:
    """When a run folder last changed, from the files directly in it (so that writing its eval/
    subfolder does not make an old run the latest)."""
    stamps = [p.stat().st_mtime_ns for p in run.iterdir() if p.is_file()]
    return max(stamps) if stamps else run.stat().st_mtime_ns


def latest_best(runs_dir: Path) -> Path:
    if not runs_dir.is_dir():
        raise EvaluateError(f"{runs_dir}: no runs folder (train.runs_dir); train first or pass --checkpoint")
    runs = [d for d in runs_dir.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if not runs:
        raise EvaluateError(f"{runs_dir}: no run folders; train first or pass --checkpoint")
    # a run without any checkpoint (a start killed before its first save) is not a candidate
    runs = [d for d in runs if folder_checkpoints(d)]
    if not runs:
        raise EvaluateError(f"{runs_dir}: no run folder holds a checkpoint (*.pt); train first or pass --checkpoint")
    latest = max(runs, key=_activity)
    best = latest / "best.pt"
    if not best.is_file():
        raise EvaluateError(f"{latest}: the latest run has no best.pt (trained without a validation split?); "
                            f"pass --checkpoint {latest}/last.pt or --checkpoint {latest}")
    return best


def resolve_checkpoints(cfg: PipelineConfig, checkpoint: Path | None) -> tuple[list[Path], Path]:
    """(checkpoint files in evaluation order, output folder)."""
    target = checkpoint if checkpoint is not None else cfg.evaluate.checkpoint
    if target is None:
        target = latest_best(cfg.train.runs_dir)
        console.print(f"checkpoint: {target} (best.pt of the latest run in {cfg.train.runs_dir})", markup=False)
    target = Path(target)
    if target.is_dir():
        files = folder_checkpoints(target)
        if not files:
            raise EvaluateError(f"{target}: no *.pt checkpoint files in this folder")
        return files, target / "eval"
    if not target.exists():
        raise EvaluateError(f"{target}: checkpoint not found")
    return [target], target.parent / "eval"


def load_refiner(path: Path, store: FeatureStore, device: torch.device) -> tuple[BoxRefiner, dict[str, Any]]:
    """Load a training checkpoint and rebuild its refiner from ``refiner_args``; CheckpointFileError
    (one line, naming the file) for anything that cannot be evaluated on this store."""
    ckpt = load_checkpoint(path)
    ck_identity = ckpt.get("store_identity")
    diffs = (feature_differences(ck_identity, store.identity, ("checkpoint", "store"))
             if isinstance(ck_identity, dict) else ["the checkpoint records no store identity"])
    if diffs:
        raise CheckpointFileError(f"{path}: trained on another feature store ({'; '.join(diffs)})")
    refiner = refiner_from_checkpoint(ckpt, path)
    state = ckpt.get("state") if isinstance(ckpt.get("state"), dict) else {}
    info = {"epoch": state.get("epoch"), "best_iou": (state.get("saver") or {}).get("best")}
    return refiner.to(device).eval(), info
