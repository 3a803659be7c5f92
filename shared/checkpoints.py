"""Training checkpoints: atomic writes (timm CheckpointSaver style) and safe loading."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

CKPT_FORMAT = 1


class CheckpointFileError(ValueError):
    """A file that is not a usable boxrefine checkpoint; the message names it (one line)."""


def atomic_save(obj: Any, path: Path) -> None:
    """Write a temp file in the same folder, then ``os.replace``: a crash never leaves a torn file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a boxrefine checkpoint with ``weights_only=True``; one-line errors."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointFileError(f"{path}: checkpoint not found") from None
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointFileError(f"{path}: not a readable checkpoint ({first[:160]})") from None
    if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT or "refiner" not in ck:
        raise CheckpointFileError(f"{path}: not a boxrefine training checkpoint")
    return ck
