"""Which checkpoints evaluate scores, in which order, and loading a refiner from one.

Default: the one "latest checkpoint" rule (``shared/model/runs.py``: ``evaluate.checkpoint``, else
``best.pt`` of the latest run in ``train.runs_dir``); else a checkpoint file, or every ``*.pt`` of a
folder in natural order (as timm's ``validate.py`` takes a folder of checkpoints).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from boxrefine.shared.config import PipelineConfig
from boxrefine.shared.errors import BoxrefineError
from boxrefine.shared.model.checkpoint import CheckpointFileError, load_checkpoint, refiner_from_checkpoint
from boxrefine.shared.model.refiner import BoxRefiner
from boxrefine.shared.model.runs import folder_checkpoints, latest_checkpoint, natural_key  # noqa: F401
from boxrefine.shared.runtime.console import console
from boxrefine.shared.store.feature_store import FeatureStore
from boxrefine.shared.store.identity import feature_differences


class EvaluateError(BoxrefineError, RuntimeError):
    """A problem that stops evaluation with a one-line message."""


def resolve_checkpoints(cfg: PipelineConfig, checkpoint: Path | None) -> tuple[list[Path], Path]:
    """(checkpoint files in evaluation order, output folder)."""
    target, how = latest_checkpoint(checkpoint if checkpoint is not None else cfg.evaluate.checkpoint,
                                    cfg.train.runs_dir)
    if how != "given":
        console.print(f"checkpoint: {target} ({how})", markup=False)
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


def unique_checkpoints(files: list[Path]) -> list[tuple[Path, list[str]]]:
    """Each distinct checkpoint once, in the given order, with the names of the files that hold the
    same bytes (hard links, as training writes best.pt and epoch files, or copies), by stem as the
    rows name checkpoints: ``[(epoch_002.pt, ["best", "last"]), ...]``. Files are compared by inode,
    then by size and sha256."""
    out: list[tuple[Path, list[str]]] = []
    seen: dict[Any, int] = {}
    for f in files:
        st = f.stat()
        same = seen.get(("inode", st.st_dev, st.st_ino))
        if same is None:
            digest = hashlib.sha256(f.read_bytes()).hexdigest()
            same = seen.get(("bytes", st.st_size, digest))
            seen[("bytes", st.st_size, digest)] = same if same is not None else len(out)
        seen[("inode", st.st_dev, st.st_ino)] = same if same is not None else len(out)
        if same is None:
            out.append((f, []))
        else:
            out[same][1].append(f.stem)
    return out
